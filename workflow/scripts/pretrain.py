from pathlib import Path

import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import drop_excluded
from cellstage.ssl.stage import pretrain
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    # slides excluded upstream (require_all_slides: false) are left out and listed
    inputs, excluded = drop_excluded(snakemake)
    pretrain(
        list(inputs.zarr),
        list(inputs.index),
        list(inputs.get("grading", [])),
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
        val_zarr_paths=list(inputs.val_zarr),
        val_index_paths=list(inputs.val_index),
        augment=snakemake.params.augment,
        num_workers=snakemake.params.num_workers,
        # cross-scan methods (simclr_xscan, ...): the partner scan's crops of the same sections
        partner_zarr_paths=list(inputs.get("partner_zarr", [])),
        partner_index_paths=list(inputs.get("partner_index", [])),
    )
