"""Train a Cellpose 3.1 segmenter on (image, label mask) pairs and measure AP@0.5 on held-out tiles.

Recipe (measured on the project's synthetic nuclei, 2 CPU cores; see ``docs``/report):
random-init ``CellposeModel`` trained with ``cellpose.train.train_seg``; images are cut into
``tile_size`` tiles, a deterministic ``held_out_fraction`` of them is kept for evaluation
(at most ``max_eval_tiles`` of them are evaluated: ~1-2 s per 256² tile on 2 CPU cores).

Epochs: cellpose 3.1's schedule warms up over 10 epochs and, only when ``n_epochs > 100``,
halves the learning rate every 5 epochs over the last 50. That annealing matters more than
anything else here: on the demo nuclei (7 sections, 165 training tiles, 16 held out,
crops 64², 8 per epoch) 100 epochs gave AP@0.5 = 0.78 (final loss 0.48), 200 epochs 0.82
(loss 0.19) at ~2× the cost (one optimiser step per epoch: ≈ 0.4 s on 2 cores).
Keep ``epochs`` > 100.
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


def resolve_pretrained(pretrained) -> tuple[str | None, str]:
    """Where training starts: ``(model file or None, description)``.

    ``pretrained`` is None/"" (from scratch), a path of a Cellpose model file (must exist:
    a typo'd path is an error, never a silent fallback), or the name of a Cellpose model-zoo
    model (``cyto3``, ``nuclei``, …; see ``cellpose.models.MODEL_NAMES``). A name is looked up
    only in the local Cellpose model folder (``CELLPOSE_LOCAL_MODELS_PATH`` or
    ``~/.cellpose/models``) — nothing is downloaded; when its weights are not there, training
    starts from scratch and the description (logged as a warning and stored in the model's
    JSON as ``init``) says so.
    """
    if pretrained is None or str(pretrained).strip() == "":
        return None, "scratch"
    s = str(pretrained)
    if Path(s).is_file():
        return s, f"pretrained file {s}"
    from cellpose import models

    name_like = ("/" not in s and "\\" not in s and not s.startswith(".")
                 and (s in models.MODEL_NAMES or Path(s).suffix == ""))
    if not name_like:
        _check_model_path(s)  # raises with the path in the message
    base = f"{s}torch_0" if s in ("cyto", "cyto2", "nuclei") else s
    for cand in (models.MODEL_DIR / base, models.MODEL_DIR / s):
        if cand.is_file():
            return str(cand), f"Cellpose model {s!r} ({cand})"
    msg = (f"Cellpose model {s!r} is not available locally (looked in {models.MODEL_DIR}; "
           "no download is attempted): training from scratch")
    log.warning(msg)
    return None, f"scratch ({msg})"


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
    epochs: int = 200,
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
    max_eval_tiles: int | None = 16,
    scale_range: float | None = None,
    gpu: bool | None = None,
) -> dict:
    """Train Cellpose, save the weights to ``out_path`` (a file) and ``<out_path>.json``.

    ``pretrained``: Cellpose model to start from, a file path (CellstageError if it does not
    exist) or a model-zoo name used when its weights are in the local Cellpose model folder
    (else from scratch, said in the log and in ``init``; see :func:`resolve_pretrained`);
    None trains from random initialisation. ``diameter``: nucleus diameter
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
    pretrained, init = resolve_pretrained(pretrained)
    if 10 < int(epochs) <= 100:
        log.warning("train_segmenter: epochs=%d ≤ 100 — cellpose anneals the learning rate only "
                    "when n_epochs > 100; expect a clearly worse model (use e.g. 200)", int(epochs))
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
    # evaluation costs ~1 s per 256² tile on 2 CPU cores: cap it (random held-out subset)
    eval_idx = [i for i in order[:n_test]][:max_eval_tiles] if max_eval_tiles else list(order[:n_test])
    te_i = [tiles_i[i] for i in sorted(eval_idx)]
    te_m = [tiles_m[i] for i in sorted(eval_idx)]
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
            min_train_masks=1, bsize=bsize, save_every=10**9, nimg_per_epoch=nimg_per_epoch,
            scale_range=scale_range)
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
        "n_test_tiles": len(te_i),  # tiles evaluated
        "n_held_out_tiles": int(n_test),
        "tile_size": tile_size,
        "epochs": int(epochs),
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "bsize": bsize,
        "nimg_per_epoch": nimg_per_epoch,
        "scale_range": scale_range,
        "seconds_eval": round(time.time() - t0 - seconds_train, 2),
        "seconds": round(time.time() - t0, 2),
        "seconds_train": round(seconds_train, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),
        "diameter": float(diameter) if diameter else diam_labels,
        "diam_mean": float(model.diam_mean),
        "channels": channels,
        "pretrained": str(pretrained) if pretrained else None,
        "init": init,
        "seed": seed,
        "final_train_loss": float(train_losses[-1]) if len(train_losses) else None,
    }
    write_json(str(out_path) + ".json", result)
    log.info("segmenter: AP@0.5 = %.3f on %d held-out tiles, %.0f s", ap50, len(te_i), result["seconds"])
    return result
