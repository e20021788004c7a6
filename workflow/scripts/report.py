from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.report(
        dict(snakemake.input.items()),
        dict(snakemake.output.items()),
        config=snakemake.params.config,
        experiments=snakemake.params.experiments,
    )
