from pathlib import Path

import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import drop_excluded
from cellstage.mil.stage import mil_fold_from_files
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    # slides excluded upstream (require_all_slides: false) are left out and listed
    inputs, excluded = drop_excluded(snakemake)
    gone = {r["slide"] for r in excluded}
    w = snakemake.wildcards
    mil_fold_from_files(
        {k: list(v) for k, v in inputs.items()},
        {s: v for s, v in dict(snakemake.params.labels).items() if s not in gone},
        {s: v for s, v in dict(snakemake.params.patients).items() if s not in gone},
        list(snakemake.params.classes),
        int(w.fold),
        Path(snakemake.output.metrics).parent,
        task=w.task,
        level=w.level,
        background=w.background == "bg",
        backbone=w.mil_backbone,
        attention=w.attention == "attn",
        settings=snakemake.params.settings,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
        devices=snakemake.params.devices,
    )
