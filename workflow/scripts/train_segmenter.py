from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.train_segmenter(
        list(snakemake.input.slides),
        list(snakemake.input.masks),
        snakemake.output.model,
        seg=snakemake.params.seg,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
    )
