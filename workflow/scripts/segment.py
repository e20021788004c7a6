from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.segment(
        snakemake.input.slide,
        snakemake.input.tubules,
        snakemake.input.model[0] if snakemake.input.model else None,
        snakemake.output.labels,
        seg=snakemake.params.seg,
        threads=snakemake.threads,
    )
