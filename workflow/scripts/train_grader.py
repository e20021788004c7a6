import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import drop_excluded
from cellstage.reduce.stage import train_grader
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    # slides excluded upstream (require_all_slides: false) are left out and listed
    inputs, excluded = drop_excluded(snakemake, pairs={"slides": "grades"})
    train_grader(
        list(inputs.slides),
        list(inputs.grades),
        snakemake.output.model,
        backbone=snakemake.params.backbone,
        epochs=snakemake.params.epochs,
        batch_size=snakemake.params.batch_size,
        loss_weights=dict(snakemake.params.loss_weights),
        size=snakemake.params.size,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
        devices=snakemake.params.devices,
    )
