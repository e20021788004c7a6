from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.pretrain(
        snakemake.wildcards.run,
        list(snakemake.input.zarr),
        list(snakemake.input.index),
        list(snakemake.input.get("grading", [])),
        snakemake.output.weights,
        pretrain=snakemake.params.pretrain,
        scans=snakemake.params.scans,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
    )
