from pathlib import Path

import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import drop_excluded
from cellstage.train.stage import finetune
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    # slides excluded upstream (require_all_slides: false) are left out and listed
    inputs, excluded = drop_excluded(snakemake)
    finetune(
        train_zarr=list(inputs.train_zarr),
        train_index=list(inputs.train_index),
        test_zarr=list(inputs.test_zarr),
        test_index=list(inputs.test_index),
        fold_index=list(inputs.fold_index),  # reference-scan indexes: one fold per cell
        pretrained=inputs.get("pretrained"),
        out_dir=Path(snakemake.output.metrics).parent,  # writes metrics.json, predictions.parquet, history.csv
        fold=int(snakemake.wildcards.fold),
        backbone=snakemake.wildcards.backbone,
        img_size=snakemake.params.img_size,
        background=snakemake.params.background,
        distance=snakemake.params.distance,
        n_folds=snakemake.params.n_folds,
        init=snakemake.wildcards.init,
        recipe=snakemake.params.recipe,
        recipe_settings=dict(snakemake.params.recipe_settings),
        loss=snakemake.wildcards.loss,  # ce, soft or ordinal (cellstage.train.losses)
        loss_settings=dict(snakemake.params.loss_settings),
        batch_size=snakemake.params.batch_size,
        group_by=snakemake.params.group_by,
        augment=dict(snakemake.params.augment),  # stain jitter / Macenko (training/stain.py)
        classes=list(snakemake.params.classes),
        static_classes=list(snakemake.params.static_classes),
        seed=snakemake.params.seed,
        threads=snakemake.threads,
        devices=snakemake.params.devices,
    )
