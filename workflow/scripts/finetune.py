from cellstage import stages
from cellstage.utils import redirect_output

# data-parallel devices per training job: config devices_per_job, used only with GPUs (gpus_per_job > 0);
# the rule's gpu resource asks SLURM for gpus_per_job x devices_per_job GPUs
DEVICES = int(snakemake.config.get("devices_per_job", 1)) if int(snakemake.config.get("gpus_per_job", 0)) > 0 else 1

with redirect_output(snakemake.log[0]):
    stages.finetune(
        train=list(zip(snakemake.input.train_zarr, snakemake.input.train_index)),
        test=list(zip(snakemake.input.test_zarr, snakemake.input.test_index)),
        pretrained=snakemake.input.get("pretrained"),
        out_metrics=snakemake.output.metrics,
        fold=int(snakemake.wildcards.fold),
        experiment=snakemake.params.experiment,
        finetune=snakemake.params.finetune,
        scans=snakemake.params.scans,
        classes=snakemake.params.classes,
        static_classes=snakemake.params.static_classes,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
        devices=DEVICES,
    )
