"""Train a Cellpose 3.1 segmenter on (image, label mask) pairs and measure AP@0.5 on held-out tiles.

Recipe (measured on the project's synthetic nuclei, 2 CPU cores; see ``docs``/report):
random-init ``CellposeModel`` trained with ``cellpose.train.train_seg``; images are cut into
``tile_size`` tiles, a deterministic ``held_out_fraction`` of them is kept for evaluation.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..utils import CellstageError, atomic_path, seed_everything, write_json

log = logging.getLogger("cellstage.segment")


def _check_model_path(p) -> str:
    """cellpose silently tries to download when a path does not exist: check first."""
    s = str(p)
    if not Path(s).is_file():
        raise CellstageError(f"Cellpose model file not found: {s!r} (train one with "
                             "`train_segmenter` or point the config at an existing model file)")
    return s


def split_tiles(images, masks, tile_size: int = 256, min_objects: int = 1):
    """Cut image/mask pairs into non-overlapping tiles (edge tiles shifted inwards).

    Tiles with fewer than ``min_objects`` labelled objects are skipped. Masks are relabelled
    1..n per tile. Returns (list of (T,T,3) uint8, list of (T,T) int32).
    """
    from skimage.segmentation import relabel_sequential

    out_i, out_m = [], []
    for k, (img, m) in enumerate(zip(images, masks, strict=True)):
        img = np.asarray(img)
        m = np.asarray(m)
        if img.shape[:2] != m.shape:
            raise CellstageError(f"image {k} has shape {img.shape[:2]} but its mask {m.shape}")
        H, W = m.shape
        ts_y, ts_x = min(tile_size, H), min(tile_size, W)
        ys = sorted({min(y, H - ts_y) for y in range(0, H, ts_y)})
        xs = sorted({min(x, W - ts_x) for x in range(0, W, ts_x)})
        for y in ys:
            for x in xs:
                mt = m[y:y + ts_y, x:x + ts_x]
                if len(np.unique(mt[mt > 0])) < min_objects:
                    continue
                out_i.append(np.ascontiguousarray(img[y:y + ts_y, x:x + ts_x]))
                out_m.append(relabel_sequential(mt.astype(np.int32))[0])
    return out_i, out_m


def train_segmenter(
    images: list[np.ndarray],
    masks: list[np.ndarray],
    out_path,
    *,
    pretrained: str | None = None,
    epochs: int = 100,
    learning_rate: float = 0.005,
    batch_size: int = 8,
    held_out_fraction: float = 0.25,
    diameter: float | None = None,
    seed: int = 0,
    channels=(0, 0),
    tile_size: int = 256,
    bsize: int = 64,
    diam_mean: float = 17.0,
    max_train_tiles: int | None = None,
    nimg_per_epoch: int | None = 8,
    gpu: bool | None = None,
) -> dict:
    """Train Cellpose, save the weights to ``out_path`` (a file) and ``<out_path>.json``.

    ``pretrained``: path of an existing Cellpose model file to fine-tune (CellstageError if it
    does not exist); None trains from random initialisation. ``diameter``: nucleus diameter
    in px used at inference (None → the mean diameter of the training masks, stored in the
    model). ``bsize``: training crop size (cellpose default 224). ``max_train_tiles``: cap on
    the number of training tiles (after the held-out split), to bound training time.
    ``nimg_per_epoch``: crops per epoch (None → all training tiles); one optimiser step per
    ``batch_size`` crops, so training cost ≈ epochs · ceil(nimg_per_epoch / batch_size) steps.
    ``diam_mean``: the diameter the network sees (images are rescaled so that nuclei have it);
    smaller → faster training and inference.
    ``ap50`` = TP / (TP + FP + FN) at IoU 0.5 pooled over the held-out tiles, leaving out
    objects that touch a tile edge (they are cut off in both masks); ``ap50_all`` keeps them.
    Returns {"ap50", "n_train_tiles", "n_test_tiles", "epochs", "seconds", "diameter", ...}.
    """
    import torch
    from cellpose import metrics, models
    from cellpose import train as cp_train

    if len(images) == 0:
        raise CellstageError("train_segmenter: no training images given")
    if pretrained is not None:
        pretrained = _check_model_path(pretrained)
    seed_everything(seed)
    tiles_i, tiles_m = split_tiles(images, masks, tile_size=tile_size)
    n = len(tiles_i)
    if n < 2:
        raise CellstageError(f"train_segmenter: only {n} tile(s) with nuclei; need at least 2")
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, math.ceil(held_out_fraction * n))) if held_out_fraction > 0 else 0
    test_idx, train_idx = sorted(order[:n_test]), sorted(order[n_test:])
    if max_train_tiles is not None:
        train_idx = train_idx[:max_train_tiles]
    tr_i = [tiles_i[i] for i in train_idx]
    tr_m = [tiles_m[i] for i in train_idx]
    te_i = [tiles_i[i] for i in test_idx]
    te_m = [tiles_m[i] for i in test_idx]
    channels = [int(c) for c in channels]
    if gpu is None:
        gpu = torch.cuda.is_available()

    if pretrained is not None:
        model = models.CellposeModel(gpu=gpu, pretrained_model=_check_model_path(pretrained))
        log.info("fine-tuning Cellpose model %s on %d tiles", pretrained, len(tr_i))
    else:
        model = models.CellposeModel(gpu=gpu, pretrained_model=False, diam_mean=diam_mean)
        log.info("training Cellpose from scratch on %d tiles (%d held out)", len(tr_i), len(te_i))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory(prefix=".cp_train.", dir=out_path.parent) as td:
        fn, train_losses, _ = cp_train.train_seg(
            model.net, train_data=tr_i, train_labels=tr_m, channels=channels,
            normalize=True, save_path=td, n_epochs=int(epochs), learning_rate=learning_rate,
            batch_size=batch_size, weight_decay=1e-5, model_name="cellstage",
            min_train_masks=1, bsize=bsize, save_every=10**9, nimg_per_epoch=nimg_per_epoch)
        seconds_train = time.time() - t0
        with atomic_path(out_path) as tmp:
            shutil.copyfile(fn, tmp)
    diam_labels = float(model.net.diam_labels.item())

    # evaluate the saved file (also proves it loads)
    ap50 = ap50_all = float("nan")
    tp = fp = fn_ = 0
    if te_i:
        from skimage.segmentation import clear_border, relabel_sequential

        def _inner(m):  # objects not touching the tile edge, relabelled 1..n (metrics count max id)
            return relabel_sequential(clear_border(m))[0]

        ev = models.CellposeModel(gpu=gpu, pretrained_model=_check_model_path(out_path))
        pred = ev.eval(te_i, channels=channels, diameter=diameter, batch_size=batch_size)[0]
        gt = [m.astype(np.int32) for m in te_m]
        pr = [p.astype(np.int32) for p in pred]
        _, tps, fps, fns = metrics.average_precision(gt, pr, threshold=[0.5])
        ap50_all = float(tps.sum() / max(tps.sum() + fps.sum() + fns.sum(), 1))
        # main score: objects cut by the tile edge (partial in both masks) are left out
        _, tps, fps, fns = metrics.average_precision([_inner(m) for m in gt],
                                                     [_inner(p) for p in pr], threshold=[0.5])
        tp, fp, fn_ = int(tps.sum()), int(fps.sum()), int(fns.sum())
        ap50 = tp / max(tp + fp + fn_, 1)
    result = {
        "ap50": ap50,
        "ap50_all": ap50_all,  # incl. objects cut by the tile edge
        "ap50_tp": tp, "ap50_fp": fp, "ap50_fn": fn_,
        "n_train_tiles": len(tr_i),
        "n_test_tiles": len(te_i),
        "tile_size": tile_size,
        "epochs": int(epochs),
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "bsize": bsize,
        "nimg_per_epoch": nimg_per_epoch,
        "seconds": round(time.time() - t0, 2),
        "seconds_train": round(seconds_train, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),
        "diameter": float(diameter) if diameter else diam_labels,
        "diam_mean": float(model.diam_mean),
        "channels": channels,
        "pretrained": str(pretrained) if pretrained else None,
        "seed": seed,
        "final_train_loss": float(train_losses[-1]) if len(train_losses) else None,
    }
    write_json(str(out_path) + ".json", result)
    log.info("segmenter: AP@0.5 = %.3f on %d held-out tiles, %.0f s", ap50, len(te_i), result["seconds"])
    return result
