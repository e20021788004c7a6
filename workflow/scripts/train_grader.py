import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.reduce.stage import train_grader
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    train_grader(
        list(snakemake.input.slides),
        list(snakemake.input.grades),
        snakemake.output.model,
        backbone=snakemake.params.backbone,
        epochs=snakemake.params.epochs,
        batch_size=snakemake.params.batch_size,
        loss_weights=dict(snakemake.params.loss_weights),
        size=snakemake.params.size,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
        devices=snakemake.params.devices,
    )
