from cellstage import stages
from cellstage.utils import redirect_output

# data-parallel devices per training job: config devices_per_job, used only with GPUs (gpus_per_job > 0);
# the rule's gpu resource asks SLURM for gpus_per_job x devices_per_job GPUs
DEVICES = int(snakemake.config.get("devices_per_job", 1)) if int(snakemake.config.get("gpus_per_job", 0)) > 0 else 1

with redirect_output(snakemake.log[0]):
    stages.train_grader(
        list(snakemake.input.slides),
        list(snakemake.input.grades),
        snakemake.output.model,
        grading=snakemake.params.grading,
        size=snakemake.params.size,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
        devices=DEVICES,
    )
