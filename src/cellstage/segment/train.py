"""Train a Cellpose 3.1 segmenter on (image, label mask) pairs and measure AP@0.5 on held-out tiles.

Training: :func:`fit_cellpose` is ``cellpose.train.train_seg`` re-assembled from cellpose's own
pieces (data preparation, batches, augmentation, loss, learning-rate schedule, AdamW), bit-for-bit
the same on CPU (tested), plus a checkpoint after every epoch in ``<model>.ckpt/`` (network +
optimizer state, epoch, losses, a fingerprint of arguments, data and initial weights). A run
killed at any point (e.g. a SLURM walltime) and started again with the same inputs continues
after the last finished epoch and ends with the same weights as an uninterrupted run (cellpose
seeds numpy with the epoch number, so an epoch's crops and augmentation depend only on it).
A checkpoint from other inputs is ignored (logged); the folder is removed once the model and its
JSON are written.

Images are cut into ``tile_size`` tiles; a deterministic ``held_out_fraction`` of them is kept
for evaluation (up to ``max_eval_tiles`` evaluated, ~1 s per 256² tile on 2 CPU cores).
AP@0.5 = TP / (TP + FP + FN) pooled over those tiles, without the nuclei cut by a tile edge
(see :func:`held_out_counts`). The held-out tiles are segmented by the production segmenter as
whole-slide inference runs it (:func:`predict_held_out`): the saved model file through
:class:`~cellstage.segment.cellpose_seg.CellposeSegmenter`, with the intensity normalisation
fitted once on the slide each tile was cut from, so the AP is the AP of what runs. (Until
2026-12-02 each tile was normalised to its own percentiles, Cellpose's default; the figures
below marked "per-tile" were measured that way.) The same model scores lower through the
production path. On the demo's 49 held-out tiles (seed 0, the recipe below, 2026-12-02): the
``make demo`` model (2 torch threads) 0.825 per-tile (358 TP / 19 FP / 57 FN) but 0.791
(344 / 20 / 71) with slide normalisation; a model trained with 1 torch thread 0.807
(351 / 20 / 64) per-tile, 0.753 (326 / 18 / 89) per slide. The network is trained on crops
normalised per tile (Cellpose's training does that), and the tiles' own 1-99 % bounds spread
widely (grey lo 71-170, hi 201-230) around their slides' (lo 83-94, hi ~228), so one
slide-level normalisation is a shift from what it learned. (The ``make demo`` model's 0.825
differs from the 0.800 below: same code and seed, a run on heavily shared cores, 2026-12-02.)

Recipe (defaults; demo nuclei: 6 mask slides of 1536², 193 tiles of 256², 144 for training,
49 held out, all 49 evaluated; 2 shared CPU cores): from scratch, ``diam_mean`` 17, crops of
64², AdamW lr 0.005, 120 epochs of 16 crops in batches of 4 (4 steps per epoch, 480 steps).
AP@0.5 on the 49 held-out tiles (per-tile normalisation): 0.800 for seed 0 in ``make demo``
(348 TP / 20 FP / 67 FN, the same in a separate rerun, 2026-12-01); an earlier sweep gave
0.825 / 0.845 / 0.784 for split-and-initialisation seeds 0 / 1 / 2 (its seed-0 figure was not
reproduced; seed 2's held-out tiles have more thin, elongated interstitial nuclei, which are most
of what is missed). Training ≈ 180-195 s and evaluation ≈ 50 s at a load of ~2 on 2 cores
(several times longer when other jobs share the cores). Tried (AP@0.5 per-tile, same 49 tiles;
seed 0 unless said):

* 200 epochs x 1 step of 8 crops (the previous default, ~130 s of training): 0.799 (seed 1:
  0.805); the same with crops of 128² and 2 per step (same pixels): 0.810; ``diam_mean`` 24:
  0.788;
* 120 epochs x 2 steps of 8 (240 steps): 0.804; x 4 steps of 8 (480 steps, ~2x the recipe's
  cost): 0.840; x 4 steps of 4 (the recipe, cost of ~240 steps of 8): 0.825;
* seed 2, recipe variants: 150 epochs 0.789, ``min_train_masks`` 5 0.794, lr 0.01 0.782.

More optimiser steps is what helps; for the same compute, more and smaller batches beat fewer
larger ones. Keep ``epochs`` > 100: cellpose anneals the learning rate (halving it every 5
epochs over the last 50) only then. A 16-tile evaluation is too small to judge a recipe:
random 16-tile subsets of the 49 spread over ±0.055 around the 49-tile figure (5-95 %:
0.73-0.85 for the 200-step model, 0.78-0.89 for the 480-step one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
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


def split_tiles(images, masks, tile_size: int = 256, min_objects: int = 1, *,
                with_origins: bool = False):
    """Cut image/mask pairs into non-overlapping tiles (edge tiles shifted inwards).

    Tiles with fewer than ``min_objects`` labelled objects are skipped. Masks are relabelled
    1..n per tile. Returns (list of (T,T,3) uint8, list of (T,T) int32), and with
    ``with_origins`` a third list of ``(image index, y0, x0)``: where each tile was cut from.
    """
    from skimage.segmentation import relabel_sequential

    out_i, out_m, out_o = [], [], []
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
                out_o.append((k, y, x))
    return (out_i, out_m, out_o) if with_origins else (out_i, out_m)


CHECKPOINT_SUFFIX = ".ckpt"
_CKPT_GLOB = "epoch-*.pt"


def lr_schedule(learning_rate: float, n_epochs: int) -> np.ndarray:
    """cellpose 3.1 ``train_seg``'s per-epoch learning rates (warm-up 10 epochs; halvings at the end)."""
    LR = np.linspace(0, learning_rate, 10)
    LR = np.append(LR, learning_rate * np.ones(max(0, n_epochs - 10)))
    if n_epochs > 300:
        LR = LR[:-100]
        for _ in range(10):
            LR = np.append(LR, LR[-1] / 2 * np.ones(10))
    elif n_epochs > 100:
        LR = LR[:-50]
        for _ in range(10):
            LR = np.append(LR, LR[-1] / 2 * np.ones(5))
    return LR


def _fingerprint(net, data, labels, args: dict) -> str:
    """Hash of everything that decides the result: arguments, data, initial weights, versions."""
    import cellpose
    import torch

    h = hashlib.sha256()
    h.update(json.dumps({**args, "cellpose": getattr(cellpose, "version", "?"),
                         "torch": torch.__version__}, sort_keys=True, default=str).encode())
    for a in (*data, *labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    for k, v in net.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files in ``ckpt_dir``, newest epoch first."""
    return sorted(ckpt_dir.glob(_CKPT_GLOB), reverse=True) if ckpt_dir.is_dir() else []


def _save_checkpoint(ckpt_dir: Path, state: dict) -> Path:
    """Write ``epoch-NNNNN.pt`` atomically (temp file, fsync, rename), then drop older ones."""
    import torch

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"epoch-{state['epoch']:05d}.pt"
    tmp = ckpt_dir / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    for old in _checkpoints(ckpt_dir):
        if old != final:
            old.unlink(missing_ok=True)
    return final


def _load_checkpoint(ckpt_dir: Path, fingerprint: str) -> dict | None:
    """The newest readable checkpoint made with the same ``fingerprint``, else None (logged)."""
    import torch

    for p in _checkpoints(ckpt_dir):
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)  # tensors and plain types only
        except Exception as e:  # noqa: BLE001 - a damaged file must not stop training
            log.warning("ignoring unreadable checkpoint %s (%s)", p, e)
            continue
        if state.get("fingerprint") != fingerprint:
            log.warning("ignoring checkpoint %s: it was made with other arguments, data or initial "
                        "weights (training starts over)", p)
            return None
        return state
    return None


def fit_cellpose(
    net,
    train_data,
    train_labels,
    *,
    n_epochs: int,
    learning_rate: float = 0.005,
    batch_size: int = 8,
    weight_decay: float = 1e-5,
    channels=None,
    normalize=True,
    nimg_per_epoch: int | None = None,
    rescale: bool = True,
    scale_range: float | None = None,
    bsize: int = 224,
    min_train_masks: int = 5,
    checkpoint_dir=None,
    fingerprint_extra: dict | None = None,
    log_every: int = 10,
) -> dict:
    """``cellpose.train.train_seg`` (3.1, AdamW, no test set), step for step, resumable.

    Same data preparation (``_process_train_test``), per-epoch ``np.random.seed(epoch)``,
    image sampling, ``random_rotate_and_resize`` augmentation, loss, learning-rate schedule
    and AdamW settings as the library function, so on CPU the weights are bit-identical to
    ``train_seg`` with the same arguments (tested). In addition, when ``checkpoint_dir`` is
    given, the network and optimizer state, the epoch and the losses are written there
    atomically after every epoch (``epoch-NNNNN.pt``, the previous one is then removed), and a
    rerun with the same arguments, data and initial weights continues after the last saved
    epoch; because the sampling and augmentation of an epoch depend only on its number, the
    resumed result equals an uninterrupted run (same device and thread count). A checkpoint
    from other arguments is ignored (and logged). The caller removes ``checkpoint_dir`` once
    the result is safely stored. The net is trained in place; ``net.diam_labels`` is set to
    the training masks' mean diameter as ``train_seg`` does.

    Returns {"train_losses": array (n_epochs,), "resumed_from_epoch": epoch index training
    continued at (None when it started afresh), "n_train": images used}.
    """
    import torch
    from cellpose import models, transforms
    from cellpose import train as cp_train

    n_epochs = int(n_epochs)
    device = net.device
    scale_range = (0.5 if rescale else 1.0) if scale_range is None else scale_range
    if isinstance(normalize, dict):
        normalize_params = {**models.normalize_default, **normalize}
    elif isinstance(normalize, bool):
        normalize_params = {**models.normalize_default, "normalize": normalize}
    else:
        raise ValueError("normalize parameter must be a bool or a dict")

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = None
    if ckpt_dir is not None:
        args = dict(n_epochs=n_epochs, learning_rate=learning_rate, batch_size=batch_size,
                    weight_decay=weight_decay, channels=channels, normalize=normalize_params,
                    nimg_per_epoch=nimg_per_epoch, rescale=rescale, scale_range=scale_range,
                    bsize=bsize, min_train_masks=min_train_masks, device=str(device),
                    extra=fingerprint_extra)
        fingerprint = _fingerprint(net, train_data, train_labels, args)

    # cellpose relabels the label arrays in place: work on copies, the caller's stay untouched
    train_labels = [np.array(m, copy=True) for m in train_labels]
    out = cp_train._process_train_test(
        train_data=train_data, train_labels=train_labels, load_files=True,
        min_train_masks=min_train_masks, compute_flows=False, channels=channels,
        channel_axis=None, rgb=False, normalize_params=normalize_params, device=device)
    (train_data, train_labels, _, _, train_probs, diam_train, *_, normed) = out
    kwargs = {} if normed else {"normalize_params": normalize_params, "channels": channels,
                                "channel_axis": None, "rgb": False}
    net.diam_labels.data = torch.Tensor([diam_train.mean()]).to(device)
    nimg = len(train_data)
    nimg_per_epoch = nimg if nimg_per_epoch is None else int(nimg_per_epoch)
    LR = lr_schedule(learning_rate, n_epochs)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    train_losses = np.zeros(n_epochs)

    start, resumed = 0, None
    if ckpt_dir is not None:
        state = _load_checkpoint(ckpt_dir, fingerprint)
        if state is not None:
            net.load_state_dict(state["net"])
            optimizer.load_state_dict(state["optimizer"])
            train_losses[:] = state["train_losses"].numpy()
            start = resumed = int(state["epoch"]) + 1
            log.info("resuming Cellpose training after epoch %d of %d (checkpoint in %s)",
                     start, n_epochs, ckpt_dir)

    t0 = time.time()
    for iepoch in range(start, n_epochs):
        np.random.seed(iepoch)
        if nimg != nimg_per_epoch:
            rperm = np.random.choice(np.arange(0, nimg), size=(nimg_per_epoch,), p=train_probs)
        else:
            rperm = np.random.permutation(np.arange(0, nimg))
        for param_group in optimizer.param_groups:
            param_group["lr"] = float(LR[iepoch])  # a Python float: the checkpoint loads with weights_only=True
        net.train()
        for k in range(0, nimg_per_epoch, batch_size):
            inds = rperm[k:min(k + batch_size, nimg_per_epoch)]
            imgs, lbls = cp_train._get_batch(inds, data=train_data, labels=train_labels, **kwargs)
            diams = np.array([diam_train[i] for i in inds])
            rsc = diams / net.diam_mean.item() if rescale else np.ones(len(diams), "float32")
            imgi, lbl = transforms.random_rotate_and_resize(imgs, Y=lbls, rescale=rsc,
                                                            scale_range=scale_range,
                                                            xy=(bsize, bsize))[:2]
            X = torch.from_numpy(imgi).to(device)
            y = net(X)[0]
            loss = cp_train._loss_fn_seg(lbl, y, device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train_losses[iepoch] += loss.item() * len(imgi)
        train_losses[iepoch] /= nimg_per_epoch
        if ckpt_dir is not None:
            _save_checkpoint(ckpt_dir, {
                "epoch": iepoch, "n_epochs": n_epochs, "fingerprint": fingerprint,
                "net": net.state_dict(), "optimizer": optimizer.state_dict(),
                "train_losses": torch.from_numpy(train_losses.copy()),  # a tensor: loadable with weights_only=True
            })
        if iepoch == n_epochs - 1 or (log_every and iepoch % log_every == 0):
            log.info("epoch %d/%d: train loss %.4f, lr %.6f, %.1f s", iepoch + 1, n_epochs,
                     train_losses[iepoch], LR[iepoch], time.time() - t0)
    return {"train_losses": train_losses, "resumed_from_epoch": resumed, "n_train": nimg}


def held_out_counts(gt_masks, pred_masks, threshold: float = 0.5) -> dict:
    """TP / FP / FN at IoU >= ``threshold`` over tiles, without the objects cut by the tile edge.

    A nucleus that touches the tile edge is cut off in the ground truth, and Cellpose's mask of
    it often stops a pixel short of the edge. So: ground-truth objects touching the edge are
    left out; predicted objects are left out when they touch the edge or when most (> 50 %) of
    their pixels lie on a left-out ground-truth object (they are that cut nucleus, which is
    neither a hit nor a false positive). Every other ground-truth object must be found (FN
    otherwise) and every other prediction must match one (FP otherwise). ``naive_*`` is the
    plain ``clear_border`` on both masks, which counts a correct mask of a cut nucleus that
    ends short of the edge as a false positive (kept to compare with earlier figures).
    """
    from cellpose import metrics
    from skimage.segmentation import clear_border, relabel_sequential

    def _rel(m):  # metrics count objects by max label: relabel 1..n
        return relabel_sequential(m)[0]

    gi, pi, pn = [], [], []
    for g, p in zip(gt_masks, pred_masks, strict=True):
        g = np.asarray(g).astype(np.int32)
        p = np.asarray(p).astype(np.int32)
        g_in = clear_border(g)
        cut = (g > 0) & (g_in == 0)  # pixels of ground-truth nuclei touching the edge
        p_in = clear_border(p)
        if p_in.any():
            n = np.bincount(p_in.ravel())
            on_cut = np.bincount(p_in.ravel(), weights=cut.ravel(), minlength=len(n))
            drop = np.flatnonzero(on_cut > 0.5 * np.maximum(n, 1))
            p_kept = np.where(np.isin(p_in, drop[drop > 0]), 0, p_in)
        else:
            p_kept = p_in
        gi.append(_rel(g_in))
        pi.append(_rel(p_kept))
        pn.append(_rel(p_in))
    out = {}
    for key, preds in (("", pi), ("naive_", pn)):
        with np.errstate(invalid="ignore", divide="ignore"):  # tiles without any object
            _, tps, fps, fns = metrics.average_precision(gi, preds, threshold=[threshold])
        tp, fp, fn = int(tps.sum()), int(fps.sum()), int(fns.sum())
        out.update({f"{key}tp": tp, f"{key}fp": fp, f"{key}fn": fn,
                    f"{key}ap": tp / max(tp + fp + fn, 1)})
    return out


class _ImageSlide:
    """An in-memory image (a whole training slide's level 0) with the slide interface
    (``dimensions``, ``read_region``) that :meth:`CellposeSegmenter.fit_normalization` reads."""

    def __init__(self, image: np.ndarray):
        img = np.asarray(image)
        self.image = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
        self.dimensions = (self.image.shape[1], self.image.shape[0])

    def read_region(self, x, y, w, h, level=0):
        return self.image[y:y + h, x:x + w]


# the windows over which a slide's normalisation is fitted: segment_slide's default inference tile
NORM_TILE = 1024


def predict_held_out(model_path, images, tiles, origins, *, diameter: float | None, channels,
                     batch_size: int, gpu: bool | None = None,
                     norm_tile: int = NORM_TILE) -> tuple[list, dict]:
    """Labels of the held-out ``tiles`` from the production segmenter, normalised per slide.

    The model runs as whole-slide inference runs it (:func:`cellstage.segment.tiling.segment_slide`):
    a :class:`~cellstage.segment.cellpose_seg.CellposeSegmenter` whose intensity normalisation is
    fitted once on the slide the tile was cut from (``fit_normalization`` over that slide's
    ``norm_tile`` grid, the whole image as the region), never on the tile itself. ``origins[i]``
    = ``(image index, y0, x0)`` of ``tiles[i]`` in ``images`` (see :func:`split_tiles`).
    Returns (list of (T, T) int32 label images, {image index: fitted (nchan, 2) bounds}).
    """
    from shapely.geometry import box

    from .cellpose_seg import CellposeSegmenter
    from .tiling import tile_grid

    seg = CellposeSegmenter(model_path, diameter=diameter, batch_size=batch_size,
                            channels=channels, gpu=gpu)
    pred: list = [None] * len(tiles)
    lowhigh = {}
    for k in sorted({int(o[0]) for o in origins}):
        slide = _ImageSlide(images[k])
        W, H = slide.dimensions
        cells = tile_grid([("slide", box(0, 0, W, H))], (W, H), int(norm_tile))
        lowhigh[k] = seg.fit_normalization(slide, cells, int(norm_tile)).copy()
        for i, o in enumerate(origins):
            if int(o[0]) == k:
                pred[i] = np.asarray(seg(tiles[i])).astype(np.int32)
    return pred, lowhigh


def train_segmenter(
    images: list[np.ndarray],
    masks: list[np.ndarray],
    out_path,
    *,
    pretrained: str | None = None,
    epochs: int = 120,
    learning_rate: float = 0.005,
    batch_size: int = 4,
    held_out_fraction: float = 0.25,
    diameter: float | None = None,
    seed: int = 0,
    channels=(0, 0),
    tile_size: int = 256,
    bsize: int = 64,
    diam_mean: float = 17.0,
    max_train_tiles: int | None = None,
    nimg_per_epoch: int | None = 16,
    max_eval_tiles: int | None = 64,
    scale_range: float | None = None,
    min_train_masks: int = 1,
    checkpoint: bool = True,
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
    ``ap50`` = TP / (TP + FP + FN) at IoU 0.5 pooled over the evaluated held-out tiles,
    leaving out nuclei cut by a tile edge (:func:`held_out_counts`); ``ap50_all`` keeps them,
    ``ap50_naive_border`` is the earlier ``clear_border``-on-both-masks figure. The tiles are
    segmented as :func:`~cellstage.segment.tiling.segment_slide` segments a slide
    (:func:`predict_held_out`: the saved model, ``diameter`` as stored in its JSON, one intensity
    normalisation per source image, recorded as ``eval_lowhigh``; ``eval_tile_origins`` lists
    the evaluated tiles as (image index, y0, x0)).
    ``checkpoint``: write a resume checkpoint after every epoch into ``<out_path>.ckpt/`` and
    continue from one left by a killed run with the same inputs (see :func:`fit_cellpose`).
    With ``pretrained``, the starting model is first evaluated on the same held-out tiles in the
    same way: ``ap50_before`` (+ ``_tp/_fp/_fn``, ``diameter_before`` = ``diameter`` or the
    starting model's own mean nucleus diameter), so the gain of fine-tuning is on record.
    Returns {"ap50", "n_train_tiles", "n_test_tiles", "epochs", "seconds", "diameter", ...}.
    """
    import torch
    from cellpose import metrics, models

    if len(images) == 0:
        raise CellstageError("train_segmenter: no training images given")
    pretrained, init = resolve_pretrained(pretrained)
    if 10 < int(epochs) <= 100:
        log.warning("train_segmenter: epochs=%d ≤ 100 — cellpose anneals the learning rate only "
                    "when n_epochs > 100; expect a clearly worse model (use e.g. 200)", int(epochs))
    seed_everything(seed)
    tiles_i, tiles_m, tiles_o = split_tiles(images, masks, tile_size=tile_size, with_origins=True)
    n = len(tiles_i)
    if n < 2:
        raise CellstageError(f"train_segmenter: only {n} tile(s) with nuclei; need at least 2")
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, math.ceil(held_out_fraction * n))) if held_out_fraction > 0 else 0
    train_idx = sorted(order[n_test:])
    if max_train_tiles is not None:
        train_idx = train_idx[:max_train_tiles]
    tr_i = [tiles_i[i] for i in train_idx]
    tr_m = [tiles_m[i] for i in train_idx]
    # evaluation costs ~1 s per 256² tile on 2 CPU cores: cap it (random held-out subset)
    eval_idx = [i for i in order[:n_test]][:max_eval_tiles] if max_eval_tiles else list(order[:n_test])
    te_i = [tiles_i[i] for i in sorted(eval_idx)]
    te_m = [tiles_m[i] for i in sorted(eval_idx)]
    te_o = [tiles_o[i] for i in sorted(eval_idx)]
    channels = [int(c) for c in channels]
    if gpu is None:
        gpu = torch.cuda.is_available()

    before: dict = {}
    if pretrained is not None:
        model = models.CellposeModel(gpu=gpu, pretrained_model=_check_model_path(pretrained))
        log.info("fine-tuning Cellpose model %s on %d tiles", pretrained, len(tr_i))
        if te_i:
            # the starting model on the same held-out tiles, segmented the same way: the gain of
            # fine-tuning (seed 000 fine-tuned `cyto` on 25,935 annotated nuclei) is measured
            d0 = float(diameter) if diameter else float(model.net.diam_labels.item())
            pr0, _ = predict_held_out(_check_model_path(pretrained), images, te_i, te_o,
                                      diameter=d0, channels=channels,
                                      batch_size=int(batch_size), gpu=gpu)
            b = held_out_counts([m.astype(np.int32) for m in te_m], pr0, 0.5)
            before = {"ap50_before": b["ap"], "ap50_before_tp": b["tp"],
                      "ap50_before_fp": b["fp"], "ap50_before_fn": b["fn"],
                      "diameter_before": d0}
            log.info("starting model %s: AP@0.5 = %.3f on %d held-out tiles (before fine-tuning)",
                     pretrained, b["ap"], len(te_i))
    else:
        model = models.CellposeModel(gpu=gpu, pretrained_model=False, diam_mean=diam_mean)
        log.info("training Cellpose from scratch on %d tiles (%d held out)", len(tr_i), len(te_i))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(str(out_path) + CHECKPOINT_SUFFIX)
    t0, c0 = time.time(), time.process_time()
    fit = fit_cellpose(
        model.net, tr_i, tr_m, n_epochs=int(epochs), learning_rate=learning_rate,
        batch_size=int(batch_size), weight_decay=1e-5, channels=channels, normalize=True,
        nimg_per_epoch=nimg_per_epoch, scale_range=scale_range, bsize=int(bsize),
        min_train_masks=int(min_train_masks), checkpoint_dir=ckpt_dir if checkpoint else None,
        fingerprint_extra={"init": init, "seed": seed})
    train_losses = fit["train_losses"]
    seconds_train = time.time() - t0
    with atomic_path(out_path) as tmp:
        model.net.save_model(str(tmp))  # cellpose's own format: CellposeModel(pretrained_model=...)
    diam_labels = float(model.net.diam_labels.item())
    # what the model's JSON will say, and so what whole-slide inference will use
    diameter_used = float(diameter) if diameter else diam_labels

    # evaluate the saved file (also proves it loads) the way segment_slide runs it: through
    # CellposeSegmenter, each tile normalised with its slide's bounds (not its own percentiles)
    ap50 = ap50_all = float("nan")
    tp = fp = fn_ = 0
    counts = {}
    lowhigh = {}
    if te_i:
        pr, lowhigh = predict_held_out(_check_model_path(out_path), images, te_i, te_o,
                                       diameter=diameter_used, channels=channels,
                                       batch_size=int(batch_size), gpu=gpu)
        gt = [m.astype(np.int32) for m in te_m]
        _, tps, fps, fns = metrics.average_precision(gt, pr, threshold=[0.5])
        ap50_all = float(tps.sum() / max(tps.sum() + fps.sum() + fns.sum(), 1))
        # main score: objects cut by the tile edge (partial in both masks) are left out
        counts = held_out_counts(gt, pr, 0.5)
        tp, fp, fn_, ap50 = counts["tp"], counts["fp"], counts["fn"], counts["ap"]
    result = {
        "ap50": ap50,
        "ap50_all": ap50_all,  # incl. objects cut by the tile edge
        "ap50_tp": tp, "ap50_fp": fp, "ap50_fn": fn_,
        # clear_border on both masks alone: a correct mask of a cut nucleus that ends short of
        # the edge counts as FP (the main figure before the edge fix)
        "ap50_naive_border": counts.get("naive_ap", float("nan")),
        "n_train_tiles": len(tr_i),
        "n_test_tiles": len(te_i),  # tiles evaluated
        "n_held_out_tiles": int(n_test),
        # evaluation = production inference: one intensity normalisation per source slide
        "eval_normalization": "slide",
        "eval_lowhigh": {str(k): np.round(v, 4).tolist() for k, v in lowhigh.items()},
        "eval_tile_origins": [[int(v) for v in o] for o in te_o],  # (image index, y0, x0)
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
        "diameter": diameter_used,
        "diam_mean": float(model.diam_mean),
        "channels": channels,
        "pretrained": str(pretrained) if pretrained else None,
        "init": init,
        "seed": seed,
        "final_train_loss": float(train_losses[-1]) if len(train_losses) else None,
        "min_train_masks": int(min_train_masks),
        "resumed_from_epoch": fit["resumed_from_epoch"],
        "train_losses": [float(x) for x in train_losses],
        **before,
    }
    write_json(str(out_path) + ".json", result)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the model and its JSON are stored: no resume needed
    log.info("segmenter: AP@0.5 = %.3f on %d held-out tiles, %.0f s", ap50, len(te_i), result["seconds"])
    return result
