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
(:mod:`cellstage.train.resume`). Rerunning ``train_grader`` with the same crops, grades and
arguments continues from the last finished epoch; a checkpoint from other crops or arguments is
ignored (logged) and training starts afresh. The folder is removed when training has finished.
On CPU with ``num_workers=0`` the resumed result is bit-identical to an uninterrupted run
(tests/unit/test_reduce.py::test_grader_killed_after_epoch_1_resumes_to_identical_weights:
SIGKILL after epoch 1 of 4; same weights, metrics and history).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..utils import CellstageError, atomic_path, provenance, write_json

log = logging.getLogger("cellstage.reduce")

GRADES = (1, 2, 3, 4, 5, 6)
CLASSES = ("useful", "unsuitable")
WEIGHTS_FILE = "grader.safetensors"
SIDECAR_FILE = "grader.model.json"
METRICS_FILE = "grader.json"


class GraderNet(nn.Module):
    """timm backbone (``create_backbone``, pooled features) + a linear 2-way head."""

    def __init__(self, backbone: str = "resnet18", img_size: int | None = None) -> None:
        super().__init__()
        from ..backbones import create_backbone, feature_dim

        self.backbone = create_backbone(backbone, img_size=img_size)
        self.head = nn.Linear(feature_dim(self.backbone), len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class _Crops(Dataset):
    """uint8 (N,H,W,3) -> normalised float (3,H,W); random flips + 90° rotations if ``augment``."""

    def __init__(self, crops: np.ndarray, targets: np.ndarray, mean, std, augment: bool) -> None:
        self.crops, self.targets, self.augment = crops, targets, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i):
        x = torch.from_numpy(np.ascontiguousarray(self.crops[i])).permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            if torch.rand(()) < 0.5:
                x = x.flip(-2)
            x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))
        return (x - self.mean) / self.std, int(self.targets[i])


def _module(net: GraderNet, weight: torch.Tensor, lr: float):
    import lightning as L

    class GraderModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.criterion = nn.CrossEntropyLoss(weight=weight)
            self.history: list[dict] = []
            self._losses: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.criterion(self.net(x), y)
            self._losses.append(loss.detach().cpu())
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
            return loss

        def on_train_epoch_start(self) -> None:
            self._losses = []

        def on_train_epoch_end(self) -> None:
            if self._losses:
                self.history.append({"epoch": int(self.current_epoch) + 1,
                                     "loss": float(torch.stack(self._losses).mean())})
            self._losses = []

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            checkpoint["cellstage_history"] = list(self.history)

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            self.history = list(checkpoint.get("cellstage_history", []))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.net.parameters(), lr=lr)

    return GraderModule()


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


@torch.no_grad()
def _predict(net: nn.Module, loader, device) -> np.ndarray:
    net.eval().to(device)
    out = []
    for x, *_ in loader:
        out.append(torch.softmax(net(x.to(device)), dim=1)[:, 1].float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


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
    import lightning as L

    from ..backbones import save_weights
    from ..train.resume import (EpochCheckpoint, EpochSampler, ReseedEveryEpoch, device_kwargs, find_resumable,
                                loader_generator, read_sidecar, remove_checkpoint,
                                resolve_deterministic)

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
    weight = torch.tensor([float(lw["useful"]), float(lw["unsuitable"])], dtype=torch.float32)
    tr, va = _split(g, y, val_fraction, seed)
    train_px = crops[tr].reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = train_px.mean(0), np.maximum(train_px.std(0), 1e-3)
    img_size = int(crops.shape[1])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    L.seed_everything(seed, workers=True)
    net = GraderNet(backbone, img_size=img_size)
    module = _module(net, weight, lr)
    bs = int(min(batch_size, len(tr)))
    train_loader = DataLoader(_Crops(crops[tr], y[tr], mean, std, augment=True), batch_size=bs,
                              sampler=EpochSampler(len(tr), seed), drop_last=len(tr) > bs and len(tr) % bs == 1,
                              num_workers=num_workers, generator=loader_generator(seed))
    config = {"backbone": backbone, "epochs": int(epochs), "batch_size": bs, "lr": float(lr),
              "val_fraction": float(val_fraction), "unsuitable_grades": list(unsuitable), "loss_weights": lw,
              "threshold": float(threshold), "seed": int(seed), "accelerator": accelerator,
              "devices": devices, "num_workers": int(num_workers)}
    # a checkpoint is resumed only for the same crops, grades and arguments
    data_digest = hashlib.sha256(np.ascontiguousarray(crops).tobytes() + g.tobytes()).hexdigest()[:16]
    resume_config = {**config, "data": data_digest, "shape": list(crops.shape),
                     "checkpoint_every": int(checkpoint_every)}
    ck_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
    last = ck_dir / "last.ckpt"
    ckpt_path = find_resumable(last, resume_config, what="grader")
    resumed_from = read_sidecar(last).get("epochs_done") if ckpt_path else None
    trainer = L.Trainer(
        max_epochs=int(epochs), accelerator=accelerator, **device_kwargs(devices),
        deterministic=resolve_deterministic(None, accelerator), logger=False,
        callbacks=[ReseedEveryEpoch(seed), EpochCheckpoint(last, resume_config, checkpoint_every)],
        enable_progress_bar=progress, enable_model_summary=False, default_root_dir=str(out_dir),
    )
    trainer.fit(module, train_dataloaders=train_loader, ckpt_path=ckpt_path)
    if trainer.global_rank != 0:
        return {}  # DDP: rank 0 evaluates and writes the files

    metrics: dict = {"n_val": int(len(va))}
    if len(va):
        from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

        val_loader = DataLoader(_Crops(crops[va], y[va], mean, std, augment=False), batch_size=256)
        p = _predict(net, val_loader, trainer.strategy.root_device)
        pred = (p >= threshold).astype(np.int64)
        metrics.update({
            "accuracy": float(accuracy_score(y[va], pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y[va], pred)),
            "confusion_matrix": confusion_matrix(y[va], pred, labels=[0, 1]).tolist(),
            "confusion_matrix_labels": list(CLASSES),
            "accuracy_per_grade": {int(k): float((pred[g[va] == k] == y[va][g[va] == k]).mean())
                                   for k in GRADES if (g[va] == k).any()},
        })
    net.cpu()
    sidecar = {
        "backbone": backbone, "img_size": img_size, "threshold": float(threshold),
        "classes": list(CLASSES), "unsuitable_grades": list(unsuitable),
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
    }
    save_weights(net, out_dir / WEIGHTS_FILE, metadata={k: json.dumps(v) for k, v in sidecar.items()})
    write_json(out_dir / SIDECAR_FILE, sidecar)
    result = {
        "val": metrics,
        "n_per_grade": {int(k): int((g == k).sum()) for k in GRADES},
        "n_train": int(len(tr)),
        "n_useful": int((y == 0).sum()),
        "n_unsuitable": int((y == 1).sum()),
        "history": module.history,
        "seconds": round(time.perf_counter() - t0, 3),
        "resumed_from_epoch": resumed_from,
        "config": config,
        "provenance": provenance(config),
    }
    write_json(out_dir / METRICS_FILE, result)
    remove_checkpoint(last)
    try:
        ck_dir.rmdir()  # only if nothing else is in it
    except OSError:
        pass
    return result


def load_grader(model_dir: str | os.PathLike) -> tuple[GraderNet, dict]:
    """(model in eval mode, sidecar dict) from a ``train_grader`` output folder."""
    from ..backbones import load_weights

    model_dir = Path(model_dir)
    side = model_dir / SIDECAR_FILE
    if not side.is_file():
        raise CellstageError(f"grader: {side} not found (train the grader first)")
    meta = json.loads(side.read_text())
    net = GraderNet(meta["backbone"], img_size=int(meta["img_size"]))
    load_weights(net, model_dir / WEIGHTS_FILE)
    return net.eval(), meta


class _Raw(Dataset):
    def __init__(self, ds, mean, std) -> None:
        self.ds = ds
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        x = torch.from_numpy(np.ascontiguousarray(self.ds.image(i))).permute(2, 0, 1).float().div_(255.0)
        return ((x - self.mean) / self.std,)


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
    from ..train.data import ZarrCropDataset, load_index

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
    loader = DataLoader(_Raw(ds, meta["mean"], meta["std"]), batch_size=batch_size, shuffle=False)
    p = _predict(net, loader, dev)
    return pd.DataFrame({
        "slide": idx["slide"].astype(str).to_numpy(),
        "cell_id": idx["cell_id"].astype("int64").to_numpy(),
        "p_unsuitable": p.astype(np.float32),
        "keep": p < thr,
    })
