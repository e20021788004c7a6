import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import drop_excluded
from cellstage.report.aml import aml_report
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    # slides excluded upstream (require_all_slides: false) are left out and listed
    inputs, excluded = drop_excluded(snakemake)
    aml_report(
        dict(inputs.items()),
        dict(snakemake.output.items()),
        labels=snakemake.params.labels,
        tasks=snakemake.params.tasks,
        experiments=snakemake.params.experiments,
        n_folds=snakemake.params.n_folds,
        min_instances=snakemake.params.min_instances,
        crop_size=snakemake.params.crop_size,
        patch_size=snakemake.params.patch_size,
        config_hash=snakemake.params.config_hash,
        excluded=excluded,
    )
