from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.grade(
        snakemake.input.model,
        snakemake.input.zarr,
        snakemake.input.index,
        snakemake.output.grading,
        threshold=snakemake.params.threshold,
        threads=snakemake.threads,
    )
