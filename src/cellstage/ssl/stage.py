"""Stage entry points: one self-supervised pretraining run (the workflow's ``pretrain`` rule) and
the MAE reconstruction figure (rule ``mae_reconstructions``).

``pretrain`` writes ``out_dir/backbone.safetensors``, ``heads.safetensors``, ``history.csv``,
``loss.png`` and ``pretrain.json`` (last) (:func:`cellstage.ssl.pretrain.pretrain`). Every
argument is the validated config value.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..utils import CellstageError, set_torch_threads


def pretrain(zarr_paths, index_paths, grading_paths, out_dir: str | os.PathLike, *, method: str, backbone: str,
             img_size: int, variant: str, epochs: int, batch_size: int, max_crops: int | None, seed: int,
             threads: int | None, devices: int, method_settings: dict | None = None, pool: str | None = None,
             val_zarr_paths=(), val_index_paths=(), augment: dict | None = None, partner_zarr_paths=(),
             partner_index_paths=(), num_workers: int = 0) -> dict:
    """Pretrain ``backbone`` with ``method`` on the crops of ``zarr_paths``/``index_paths`` (pairs),
    validated on the labelled crops of ``val_zarr_paths``/``val_index_paths`` (the train slides).

    ``epochs``, ``batch_size``: ``pretrain.epochs`` / ``pretrain.batch_size``; ``method_settings``:
    the block ``pretrain.methods.<method>`` (with its ``backbones``), which overrides them
    (:func:`cellstage.ssl.settings.resolve_settings`: backbone > method > pretrain). ``pool``:
    ``pretrain.pool`` (rows of other splits are left out). ``grading_paths``: the grader's decisions
    (``results/grading/*.parquet``); crops a grading marks ``keep`` False are left out of the pool
    (:func:`cellstage.ssl.pretrain.keep_lists`); empty: all crops. ``devices`` > 1: DDP; resumes
    from ``out_dir/last.ckpt``. ``augment``: ``pretrain.augment`` (stain jitter / normalisation).
    ``partner_zarr_paths``/``partner_index_paths``: a cross-scan method's partner-scan crops
    (:mod:`cellstage.ssl.crossscan`). ``num_workers``: ``pretrain.num_workers`` (DataLoader workers).
    """
    from .pretrain import keep_lists
    from .pretrain import pretrain as _pretrain
    from .settings import resolve_settings

    set_torch_threads(threads)
    run = resolve_settings(method, backbone, epochs=epochs, batch_size=batch_size, method_settings=method_settings)
    zarr_paths, index_paths = [str(p) for p in zarr_paths], [str(p) for p in index_paths]
    val_sources = list(zip([str(p) for p in val_zarr_paths], [str(p) for p in val_index_paths]))
    partner_sources = list(zip([str(p) for p in partner_zarr_paths], [str(p) for p in partner_index_paths]))
    return _pretrain(
        method,
        backbone,
        list(zip(zarr_paths, index_paths)),
        out_dir,
        img_size=int(img_size),
        variant=variant,
        epochs=run.epochs,
        batch_size=run.batch_size,
        seed=int(seed),
        max_crops=max_crops,
        keep=keep_lists(list(grading_paths), index_paths),
        devices=int(devices),
        lr=run.lr,
        method_kwargs=run.method_kwargs or None,
        transform_kwargs=run.transform_kwargs or None,
        val_sources=val_sources,
        partner_sources=partner_sources,
        pool=pool,
        augment=augment,
        num_workers=int(num_workers),
    )


def mae_reconstructions(run_dir: str | os.PathLike, val_zarr_paths, val_index_paths, out_png: str | os.PathLike, *,
                        n_crops: int = 8, seed: int = 0, threads: int | None = None) -> None:
    """Seed 000 Fig. A.2: input, masked input and reconstruction of ``n_crops`` validation crops
    (labelled train crops, a seeded choice) by the MAE run in ``run_dir`` (its ``pretrain.json``,
    ``backbone.safetensors`` and ``heads.safetensors``: the best epoch)."""
    import json

    import numpy as np
    from safetensors.torch import load_file

    from ..training.backbones import load_weights
    from ..training.data import ZarrCropDataset, load_index
    from .mae import MAE, reconstruction_figure
    from .pretrain import validation_rows

    set_torch_threads(threads)
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "pretrain.json").read_text())
    if info["method"] != "mae":
        raise CellstageError(f"{run_dir}/pretrain.json: method is {info['method']!r}, not 'mae'")
    cfg = info["config"]
    model = MAE(cfg["backbone"], int(cfg["img_size"]), **(cfg.get("method_kwargs") or {}))
    load_weights(model.backbone_model, run_dir / "backbone.safetensors")
    heads = load_file(str(run_dir / "heads.safetensors"))
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith(("backbone_model.", *model.not_exported))]
    if missing or unexpected:
        raise CellstageError(f"{run_dir}/heads.safetensors does not fit the MAE model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    val = validation_rows(load_index(list(zip([str(p) for p in val_zarr_paths], [str(p) for p in val_index_paths]))))
    if len(val) == 0:
        raise CellstageError(f"mae_reconstructions: no labelled train crops in {list(val_index_paths)}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(val), size=min(n_crops, len(val)), replace=False))
    dataset = ZarrCropDataset(val.iloc[pick], variant=cfg.get("variant", "images"))
    crops = np.stack([np.asarray(dataset.image(i)) for i in range(len(dataset))])
    reconstruction_figure(model, crops, out_png, seed=seed,
                          title=f"MAE {cfg['backbone']} (epoch {info.get('best_epoch')}, "
                                f"mask ratio {model.mask_ratio:g})")
