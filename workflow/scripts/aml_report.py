import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.report.aml import aml_report
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    aml_report(
        dict(snakemake.input.items()),
        dict(snakemake.output.items()),
        labels=snakemake.params.labels,
        tasks=snakemake.params.tasks,
        experiments=snakemake.params.experiments,
        n_folds=snakemake.params.n_folds,
        min_instances=snakemake.params.min_instances,
        crop_size=snakemake.params.crop_size,
        patch_size=snakemake.params.patch_size,
        config_hash=snakemake.params.config_hash,
    )
