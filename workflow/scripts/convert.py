from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.convert(
        snakemake.input[0],
        snakemake.output[0],
        backend=snakemake.params.backend,
        mpp=snakemake.params.mpp,
        tile=snakemake.params.tile,
    )
