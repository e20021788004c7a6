"""Seed 003's grading network (Level Three): a binary ResNet18 "useful vs unsuitable" crop grader.

Experts grade crops 1..6 (1 = valid cell … 5 = damaged, 6 = no cell). Grades 1–4 are *useful*
(class 0), 5–6 *unsuitable* (class 1). Seed 003: "given the imbalanced nature of these two
classes a loss weighting of 3 to 1 was used"; there the useful class was the minority (365 of
1,506 crops, ~25 %), so we read it as weight 3 on *useful* and 1 on *unsuitable*
(``loss_weights={"useful": 3, "unsuitable": 1}``, configurable). Crops predicted unsuitable
(p_unsuitable >= threshold) are removed.

Files in ``out_dir``: ``grader.safetensors`` (full model: ``backbone.*`` + ``head.*``),
``grader.model.json`` (sidecar: backbone, img_size, threshold, normalisation, grade mapping) and
``grader.json`` (validation metrics, counts per grade, timing, provenance), all atomic.

Resuming: while training, ``checkpoint_dir`` (default ``out_dir/checkpoints``; the workflow puts
it next to ``results/grader``, which Snakemake deletes as a whole when the job fails) holds
``last.ckpt`` and its sidecar ``last.json``, replaced atomically after every epoch
(:func:`cellstage.training.fit.fit_resumable`). Rerunning ``train_grader`` with the same crops, grades and
arguments continues from the last finished epoch; a checkpoint from other crops or arguments is
ignored (logged) and training starts afresh. The folder is removed when training has finished.
On CPU with ``num_workers=0`` the resumed result is bit-identical to an uninterrupted run
(tests/unit/test_reduce.py::test_grader_killed_after_epoch_1_resumes_to_identical_weights:
SIGKILL after epoch 1 of 4; same weights, metrics and history).

The model is :class:`GraderModule`, a module-level LightningModule (timm backbone + linear 2-way
head, class-weighted cross-entropy); data, augmentation (flips + 90° rotations), channel
statistics, the training loop and the prediction loop are the shared ones of
:mod:`cellstage.training`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..training.backbones import create_backbone, feature_dim
from ..utils import CellstageError, provenance, write_json

log = logging.getLogger("cellstage.reduce")

GRADES = (1, 2, 3, 4, 5, 6)
CLASSES = ("useful", "unsuitable")
WEIGHTS_FILE = "grader.safetensors"
SIDECAR_FILE = "grader.model.json"
METRICS_FILE = "grader.json"


class GraderModule(L.LightningModule):
    """timm backbone (``create_backbone``, pooled features) + a linear 2-way head (useful,
    unsuitable), trained with cross-entropy weighted by ``loss_weights`` (useful, unsuitable) and
    AdamW at ``lr`` (torch's default weight decay 0.01). Its ``state_dict`` (``backbone.*``,
    ``head.*``) is what ``grader.safetensors`` holds."""

    def __init__(self, backbone: str = "resnet18", img_size: int | None = None, lr: float = 1e-3,
                 loss_weights: tuple[float, float] = (3.0, 1.0)) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone, img_size=img_size)
        self.head = nn.Linear(feature_dim(self.backbone), len(CLASSES))
        self.register_buffer("class_weight", torch.tensor([float(w) for w in loss_weights], dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor, distance: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, 2); ``distance`` (of the shared crop batches) is not used."""
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, _, y = batch
        loss = F.cross_entropy(self(x), y, weight=self.class_weight)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def _check_grades(grades) -> np.ndarray:
    g = np.asarray(grades)
    if g.ndim != 1:
        raise CellstageError(f"grades: expected a 1-D array, got shape {g.shape}")
    try:
        gf = g.astype(float)
    except (TypeError, ValueError) as e:
        raise CellstageError(f"grades: not numeric ({e})") from None
    bad = ~np.isin(gf, GRADES)
    if bad.any():
        vals, counts = np.unique(g[bad].astype(str), return_counts=True)
        listed = ", ".join(f"{v!s} (x{c})" for v, c in zip(vals, counts))
        raise CellstageError(f"grades: {int(bad.sum())} value(s) outside 1..6: {listed}")
    return gf.astype(np.int64)


def _split(grades: np.ndarray, binary: np.ndarray, val_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(grades))
    if val_fraction <= 0:
        return idx, idx[:0]
    for strat in (grades, binary, None):
        try:
            tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=strat)
            return np.sort(tr), np.sort(va)
        except ValueError:
            continue
    raise CellstageError(f"grader: cannot split {len(idx)} crops with val_fraction={val_fraction}")


def train_grader(
    crops: np.ndarray,
    grades: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    backbone: str = "resnet18",
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    val_fraction: float = 0.2,
    unsuitable_grades: Sequence[int] = (5, 6),
    loss_weights: dict | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    accelerator: str = "auto",
    devices=1,
    num_workers: int = 0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
) -> dict:
    """Train the binary grader on expert-graded crops; returns (and writes) its metrics.

    ``crops``: (N, H, W, 3) uint8; ``grades``: (N,) ints in 1..6. ``loss_weights`` default
    ``{"useful": 3.0, "unsuitable": 1.0}`` (seed 003's 3:1, see module doc). Stratified
    train/validation split on the grades (falls back to the binary class); flips and 90°
    rotations as augmentation; AdamW at ``lr``; inputs normalised with the training crops'
    channel mean/std (stored in the sidecar). ``checkpoint_dir``: where the per-epoch resume
    checkpoint lives (default ``out_dir/checkpoints``; removed at the end); ``checkpoint_every``:
    every that many epochs (0: never). ``devices`` > 1 trains with DDP (rank 0 writes the files).
    """
    from ..training.backbones import save_weights
    from ..training.callbacks import LossHistory
    from ..training.data import ArrayCropDataset
    from ..training.fit import fit_resumable, predict_proba
    from ..training.resume import EpochSampler, loader_generator, resolve_deterministic, seed_all
    from ..training.transforms import channel_stats, grader_transform

    t0 = time.perf_counter()
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise CellstageError(f"train_grader: crops must be (N, H, W, 3) uint8, got {crops.shape} {crops.dtype}")
    g = _check_grades(grades)
    if len(g) != len(crops):
        raise CellstageError(f"train_grader: {len(crops)} crops but {len(g)} grades")
    unsuitable = tuple(int(u) for u in unsuitable_grades)
    y = np.isin(g, unsuitable).astype(np.int64)
    if len(np.unique(y)) < 2:
        raise CellstageError(
            f"train_grader: all {len(y)} crops are {CLASSES[int(y[0])]} (grades {sorted(set(g.tolist()))}); "
            "need both useful (1-4) and unsuitable grades"
        )
    lw = {"useful": 3.0, "unsuitable": 1.0, **(loss_weights or {})}
    tr, va = _split(g, y, val_fraction, seed)
    mean, std = channel_stats(crops[tr])
    img_size = int(crops.shape[1])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    seed_all(seed)
    module = GraderModule(backbone, img_size=img_size, lr=float(lr),
                          loss_weights=(float(lw["useful"]), float(lw["unsuitable"])))
    bs = int(min(batch_size, len(tr)))
    train_ds = ArrayCropDataset(crops[tr], y[tr], transform=grader_transform(mean, std, augment=True))
    train_loader = DataLoader(train_ds, batch_size=bs, sampler=EpochSampler(len(tr), seed),
                              drop_last=len(tr) > bs and len(tr) % bs == 1, num_workers=num_workers,
                              generator=loader_generator(seed))
    config = {"backbone": backbone, "epochs": int(epochs), "batch_size": bs, "lr": float(lr),
              "val_fraction": float(val_fraction), "unsuitable_grades": list(unsuitable), "loss_weights": lw,
              "threshold": float(threshold), "seed": int(seed), "accelerator": accelerator,
              "devices": devices, "num_workers": int(num_workers)}
    # a checkpoint is resumed only for the same crops, grades and arguments
    data_digest = hashlib.sha256(np.ascontiguousarray(crops).tobytes() + g.tobytes()).hexdigest()[:16]
    resume_config = {**config, "data": data_digest, "shape": list(crops.shape),
                     "checkpoint_every": int(checkpoint_every)}
    ck_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
    history = LossHistory()
    fit = fit_resumable(
        module, train_loader=train_loader, ckpt_path_last=ck_dir / "last.ckpt", resume_config=resume_config,
        epochs=int(epochs), seed=seed, accelerator=accelerator, devices=devices,
        deterministic=resolve_deterministic(None, accelerator), callbacks=[history], progress=progress,
        checkpoint_every=checkpoint_every, default_root_dir=out_dir, what="grader",
    )
    if not fit.is_global_zero:
        return {}  # DDP: rank 0 evaluates and writes the files

    metrics: dict = {"n_val": int(len(va))}
    if len(va):
        from sklearn.metrics import accuracy_score, balanced_accuracy_score

        from ..metrics import confusion

        val_ds = ArrayCropDataset(crops[va], y[va], transform=grader_transform(mean, std, augment=False))
        p = predict_proba(module, DataLoader(val_ds, batch_size=256), fit.device, n_classes=2)[:, 1].numpy()
        pred = (p >= threshold).astype(np.int64)
        metrics.update({
            "accuracy": float(accuracy_score(y[va], pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y[va], pred)),
            "confusion_matrix": confusion(y[va], pred, len(CLASSES)).tolist(),
            "confusion_matrix_labels": list(CLASSES),
            "accuracy_per_grade": {int(k): float((pred[g[va] == k] == y[va][g[va] == k]).mean())
                                   for k in GRADES if (g[va] == k).any()},
        })
    module.cpu()
    sidecar = {
        "backbone": backbone, "img_size": img_size, "threshold": float(threshold),
        "classes": list(CLASSES), "unsuitable_grades": list(unsuitable),
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
    }
    save_weights(module, out_dir / WEIGHTS_FILE, metadata={k: json.dumps(v) for k, v in sidecar.items()})
    write_json(out_dir / SIDECAR_FILE, sidecar)
    result = {
        "val": metrics,
        "n_per_grade": {int(k): int((g == k).sum()) for k in GRADES},
        "n_train": int(len(tr)),
        "n_useful": int((y == 0).sum()),
        "n_unsuitable": int((y == 1).sum()),
        "history": history.rows,
        "seconds": round(time.perf_counter() - t0, 3),
        "resumed_from_epoch": fit.resumed_from,
        "config": config,
        "provenance": provenance(config),
    }
    write_json(out_dir / METRICS_FILE, result)
    fit.remove_checkpoint(remove_dir=True)  # the folder only if nothing else is in it
    return result


def load_grader(model_dir: str | os.PathLike) -> tuple[GraderModule, dict]:
    """(model in eval mode, sidecar dict) from a ``train_grader`` output folder."""
    from ..training.backbones import load_weights

    model_dir = Path(model_dir)
    side = model_dir / SIDECAR_FILE
    if not side.is_file():
        raise CellstageError(f"grader: {side} not found (train the grader first)")
    meta = json.loads(side.read_text())
    net = GraderModule(meta["backbone"], img_size=int(meta["img_size"]))
    load_weights(net, model_dir / WEIGHTS_FILE)
    return net.eval(), meta


def grade_crops(
    model_dir: str | os.PathLike,
    sources,
    *,
    threshold: float | None = None,
    batch_size: int = 256,
    variant: str = "images",
    device: str | None = None,
) -> pd.DataFrame:
    """Grade crops: DataFrame(slide, cell_id, p_unsuitable, keep) in the order of the index.

    ``sources``: list of (crops zarr, index parquet) or a ``ZarrCropDataset`` (its raw images
    are used; its transform is ignored). ``threshold`` None = the sidecar's (default 0.5);
    ``keep`` = p_unsuitable < threshold. ``variant`` must match what the grader was trained on.
    """
    from ..training.data import ArrayCropDataset, ZarrCropDataset, load_index
    from ..training.fit import predict_proba
    from ..training.transforms import grader_transform

    net, meta = load_grader(model_dir)
    thr = float(meta.get("threshold", 0.5) if threshold is None else threshold)
    ds = sources if isinstance(sources, ZarrCropDataset) else ZarrCropDataset(load_index(sources), variant=variant)
    idx = ds.index
    if len(ds) == 0:
        return pd.DataFrame({"slide": pd.Series(dtype=str), "cell_id": pd.Series(dtype="int64"),
                             "p_unsuitable": pd.Series(dtype="float32"), "keep": pd.Series(dtype=bool)})
    shape = tuple(ds.image(0).shape)
    if shape[0] != int(meta["img_size"]) or shape[1] != int(meta["img_size"]):
        raise CellstageError(
            f"grade_crops: crops are {shape[0]}x{shape[1]} px but the grader in {model_dir} was trained on "
            f"{meta['img_size']}x{meta['img_size']} px crops"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    raw = ArrayCropDataset(ds.images(), transform=grader_transform(meta["mean"], meta["std"], augment=False))
    p = predict_proba(net, DataLoader(raw, batch_size=batch_size, shuffle=False), dev, n_classes=2)[:, 1].numpy()
    return pd.DataFrame({
        "slide": idx["slide"].astype(str).to_numpy(),
        "cell_id": idx["cell_id"].astype("int64").to_numpy(),
        "p_unsuitable": p.astype(np.float32),
        "keep": p < thr,
    })
