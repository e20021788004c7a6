import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.report.stage import report
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    report(
        dict(snakemake.input.items()),
        dict(snakemake.output.items()),
        experiments=snakemake.params.experiments,
        classes=list(snakemake.params.classes),
        metric=snakemake.params.metric,
        seed=snakemake.params.seed,
        min_points_on_nuclei=snakemake.params.min_points_on_nuclei,
        config_hash=snakemake.params.config_hash,
    )
