"""Stage entry point: one cross-validation fold of fine-tuning (the workflow's ``finetune`` rule).

Writes ``out_dir/metrics.json`` (last), ``predictions.parquet`` and ``history.csv``
(:func:`cellstage.train.cv.run_fold`). Every argument is the validated config value; nothing here
holds a default.
"""

from __future__ import annotations

import os

from ..taxonomy import Taxonomy
from ..utils import set_torch_threads


def finetune(*, train_zarr: list, train_index: list, test_zarr: list, test_index: list, pretrained: str | None,
             out_dir: str | os.PathLike, fold: int, backbone: str, img_size: int, background: bool, distance: bool,
             n_folds: int, init: str, recipe: str, recipe_settings: dict, batch_size: int, group_by: str | None,
             classes: list[str], static_classes: list[str], seed: int, threads: int | None, devices: int,
             fold_index: list | None = None, augment: dict | None = None, loss: str = "ce",
             loss_settings: dict | None = None) -> dict:
    """Train on all folds but ``fold`` of the train crops, evaluate on ``fold`` and the test crops.

    ``background`` False trains on the masked crops (background removed); ``distance`` adds the
    normalised distance to the tubule wall as an input; ``init`` is ``scratch`` (``pretrained``
    None), ``imagenet`` (``pretrained`` = config ``finetune.imagenet_weights.<backbone>``, timm
    weights) or an SSL method (``pretrained`` = its ``backbone.safetensors``). ``recipe``
    (baseline / pretrained) and ``recipe_settings`` (its numbers, config ``finetune.recipes.<recipe>``)
    give the epochs and learning rates (:mod:`cellstage.train.recipes`). ``devices`` > 1: DDP;
    resumes from ``out_dir/checkpoints/last.ckpt``. ``fold_index``: the reference scan's crop
    indexes of the train slides, over whose cells the folds are made, so a cell's crops of every
    scan share one fold (seed 000 §3.1, §4.2; None: folds over ``train_index`` itself, which is
    the same for the reference scan). ``group_by``: patient, section or slide (= section).
    ``augment``: config ``finetune.augment`` (HED stain jitter, per-slide Macenko normalisation;
    :mod:`cellstage.training.stain`). ``loss``, ``loss_settings``: ``ce``, ``soft`` or ``ordinal``
    and config ``finetune.losses.<loss>`` (:mod:`cellstage.train.losses`).
    """
    from .cv import run_fold

    set_torch_threads(threads)
    return run_fold(
        list(zip(train_zarr, train_index)),
        list(zip(test_zarr, test_index)),
        out_dir,
        fold=int(fold),
        n_folds=int(n_folds),
        taxonomy=Taxonomy(tuple(classes), tuple(static_classes)),
        backbone=backbone,
        img_size=int(img_size),
        variant="images" if background else "masked",
        use_distance=bool(distance),
        pretrained_path=pretrained,
        pretrained_key=(f"config finetune.imagenet_weights.{backbone}" if init == "imagenet"
                        else f"pretrained backbone of init {init!r}"),
        recipe={"name": recipe, **recipe_settings},
        batch_size=int(batch_size),
        group_col=group_by,
        fold_reference=list(fold_index or ()),
        augment=dict(augment or {}),
        loss=loss,
        loss_settings=dict(loss_settings or {}),
        seed=int(seed),
        devices=int(devices),
    )
