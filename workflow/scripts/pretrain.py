from cellstage import stages
from cellstage.utils import redirect_output

# data-parallel devices per training job: config devices_per_job, used only with GPUs (gpus_per_job > 0);
# the rule's gpu resource asks SLURM for gpus_per_job x devices_per_job GPUs
DEVICES = int(snakemake.config.get("devices_per_job", 1)) if int(snakemake.config.get("gpus_per_job", 0)) > 0 else 1

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
        devices=DEVICES,
    )
