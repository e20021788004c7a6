from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.register(
        snakemake.input.ref,
        snakemake.input.mov,
        snakemake.output.registration,
        snakemake.output.overlay,
        reg=snakemake.params.reg,
    )
