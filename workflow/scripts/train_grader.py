from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.train_grader(
        list(snakemake.input.slides),
        list(snakemake.input.grades),
        snakemake.output.model,
        grading=snakemake.params.grading,
        size=snakemake.params.size,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
    )
