"""Stage entry point: one self-supervised pretraining run (the workflow's ``pretrain`` rule).

Writes ``out_dir/backbone.safetensors``, ``history.csv``, ``loss.png`` and ``pretrain.json``
(last) (:func:`cellstage.ssl.pretrain.pretrain`). Every argument is the validated config value.
"""

from __future__ import annotations

import os

from ..utils import set_torch_threads


def pretrain(zarr_paths, index_paths, grading_paths, out_dir: str | os.PathLike, *, method: str, backbone: str,
             img_size: int, variant: str, epochs: int, batch_size: int, max_crops: int | None, seed: int,
             threads: int | None, devices: int, method_settings: dict | None = None) -> dict:
    """Pretrain ``backbone`` with ``method`` on the crops of ``zarr_paths``/``index_paths`` (pairs).

    ``grading_paths``: the grader's decisions (``results/grading/*.parquet``); crops a grading
    marks ``keep`` False are left out (:func:`cellstage.ssl.pretrain.keep_lists`); empty: all
    crops. ``devices`` > 1: DDP; resumes from ``out_dir/last.ckpt``. ``method_settings``: the
    method's config (``pretrain.methods.<method>``): ``lr`` and ``batch_size`` replace the method's
    default learning rate and ``batch_size``; the rest are the module's keyword arguments.
    """
    from .pretrain import keep_lists
    from .pretrain import pretrain as _pretrain

    set_torch_threads(threads)
    zarr_paths, index_paths = [str(p) for p in zarr_paths], [str(p) for p in index_paths]
    method_kwargs = dict(method_settings or {})
    lr = method_kwargs.pop("lr", None)
    batch_size = method_kwargs.pop("batch_size", batch_size)
    return _pretrain(
        method,
        backbone,
        list(zip(zarr_paths, index_paths)),
        out_dir,
        img_size=int(img_size),
        variant=variant,
        epochs=int(epochs),
        batch_size=int(batch_size),
        seed=int(seed),
        max_crops=max_crops,
        keep=keep_lists(list(grading_paths), index_paths),
        devices=int(devices),
        lr=lr,
        method_kwargs=method_kwargs or None,
    )
