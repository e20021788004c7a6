from pathlib import Path

import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.ssl.stage import pretrain
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    pretrain(
        list(snakemake.input.zarr),
        list(snakemake.input.index),
        list(snakemake.input.get("grading", [])),
        Path(snakemake.output.weights).parent,  # backbone/heads.safetensors, history.csv, loss.png, pretrain.json
        method=snakemake.wildcards.method,
        backbone=snakemake.wildcards.backbone,
        img_size=snakemake.params.img_size,
        variant=snakemake.params.variant,
        pool=snakemake.params.pool,
        epochs=snakemake.params.epochs,
        batch_size=snakemake.params.batch_size,
        max_crops=snakemake.params.max_crops,
        method_settings=snakemake.params.method_settings,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
        devices=snakemake.params.devices,
        val_zarr_paths=list(snakemake.input.val_zarr),
        val_index_paths=list(snakemake.input.val_index),
        augment=snakemake.params.augment,
        num_workers=snakemake.params.num_workers,
        # cross-scan methods (simclr_xscan, ...): the partner scan's crops of the same sections
        partner_zarr_paths=list(snakemake.input.get("partner_zarr", [])),
        partner_index_paths=list(snakemake.input.get("partner_index", [])),
    )
