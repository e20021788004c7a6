import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.reduce.aml_stage import grade_level_two
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    grade_level_two(
        snakemake.input.model,
        snakemake.input.zarr,
        snakemake.input.index,
        snakemake.output.grading,
        threshold=snakemake.params.threshold,
        threads=snakemake.threads,
    )
