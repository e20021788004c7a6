import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import drop_excluded
from cellstage.report.stage import report
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    # slides excluded upstream (require_all_slides: false) are left out and listed
    inputs, excluded = drop_excluded(snakemake)
    report(
        dict(inputs.items()),
        dict(snakemake.output.items()),
        experiments=snakemake.params.experiments,
        classes=list(snakemake.params.classes),
        metric=snakemake.params.metric,
        seed=snakemake.params.seed,
        min_points_on_nuclei=snakemake.params.min_points_on_nuclei,
        config_hash=snakemake.params.config_hash,
        excluded=excluded,
    )
