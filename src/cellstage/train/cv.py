"""K-fold cross-validated fine-tuning (seed 000 §4.2) and aggregation of the folds.

``run_fold`` trains on all folds but ``fold`` of the labelled train crops, validates on fold
``fold`` every epoch, keeps the weights of the epoch with the lowest validation loss, and
evaluates them on the validation fold and on the separate test slides. Outputs in ``out_dir``:

* ``predictions.parquet`` — split, cell_id, slide, row, label_idx, label, pred, pred_label,
  ``prob_<class>`` per class;
* ``embeddings.parquet`` — the test crops' backbone embeddings (:func:`_write_test_embeddings`);
* ``history.csv`` — epoch, train_loss, train_acc, val_loss, val_top1, lr, backbone_lr, head_lr (the
  rates used in that epoch; ``lr`` = the backbone's, 0 while it is frozen);
* ``metrics.json`` — written last (a finished fold is one with metrics.json):
  ``{"val", "test", "fold", "epochs", "best_epoch", "best_val_loss", "seconds",
  "normalisation", "stain", "config", "provenance"}`` (``stain``: the per-slide Macenko fits, or
  null); undefined metrics (NaN) are written as null.

Resuming: while training, ``out_dir/checkpoints/last.ckpt`` (Lightning checkpoint: weights,
optimiser, LR-scheduler state, loop counters, and the best-epoch weights and history kept by
callbacks) and its sidecar ``checkpoints/last.json`` (hash of the arguments and of the crop
stores', indexes' and pretrained weights' content, the checkpoint's sha256, epochs done) are
replaced atomically after every epoch (:func:`cellstage.training.fit.fit_resumable`,
:mod:`cellstage.training.resume`). Rerunning ``run_fold`` with the same arguments after a kill
continues from the last finished epoch
(``Trainer.fit(ckpt_path=, weights_only=True)``); with other arguments or changed inputs the
checkpoint is ignored, a damaged one is set aside (both logged), and the fold starts afresh.
The checkpoint folder is deleted just before metrics.json is written. A
resumed run is bit-identical to an uninterrupted one on CPU with ``num_workers=0`` (verified by
tests/unit/test_finetune.py::test_finetune_killed_after_epoch_1_resumes_to_identical_weights:
SIGKILL after epoch 1 of 4, same weights, predictions and history, for both recipes): the training
order is a function of (seed, epoch), the RNGs are reseeded from (seed, epoch) at every epoch
start, the plateau scheduler is stepped by the module and stored in the checkpoint, and the
pretrained recipe's rates and freezing are functions of the epoch alone.

Recipes (:mod:`cellstage.train.recipes`): ``recipe`` gives the epochs, the learning rate of each
parameter group per epoch and the frozen epochs — ``baseline`` (seed 000 §4.2, ViT-S/B at 1e-4)
or ``pretrained`` (§4.3).

Determinism: ``lightning.seed_everything(seed, workers=True)`` and ``Trainer(deterministic=True)``
on CPU give identical results for identical arguments (``num_workers`` is part of the
arguments: changing it changes the result). On CUDA, ``deterministic=None`` resolves to
``"warn"`` because ``AdaptiveAvgPool2d``'s CUDA backward has no deterministic kernel.

SLURM / several devices: ``devices``, ``strategy`` and ``plugins`` come from
:func:`cellstage.training.resume.device_kwargs` (one device: ``LightningEnvironment()``, so Lightning
does not take over the SLURM job step; several: DDP). With DDP only rank 0 evaluates and writes
the outputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics import compute_metrics
from ..taxonomy import Taxonomy
from ..training.folds import make_folds
from ..utils import CellstageError, atomic_path, provenance, set_torch_threads, write_json
from .losses import check_loss
from .recipes import Recipe, as_recipe

__all__ = ["METRIC_KEYS", "aggregate_folds", "make_folds", "run_fold"]

log = logging.getLogger("cellstage.train")

METRIC_KEYS = ("top1", "top2", "adj1", "adj1_dyn")


# ------------------------------------------------------------------------ helpers
def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _check_sources(sources, what: str) -> list[tuple[str, str]]:
    out = []
    for s in sources:
        if len(s) != 2:
            raise CellstageError(f"{what}_sources: expected (zarr, parquet) pairs, got {s!r}")
        z, p = str(s[0]), str(s[1])
        for f in (z, p):
            if not Path(f).exists():
                raise CellstageError(f"{what}_sources: {f} does not exist")
        out.append((z, p))
    return out


# ------------------------------------------------------------------------- run_fold
def run_fold(
    train_sources: Sequence[tuple[str, str]],
    test_sources: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike,
    *,
    fold: int,
    n_folds: int = 5,
    taxonomy: Taxonomy | None = None,
    backbone: str = "resnet18",
    img_size: int | None = None,
    variant: str = "images",
    use_distance: bool = False,
    pretrained_path: str | os.PathLike | None = None,
    pretrained_key: str = "pretrained_path",
    recipe: Recipe | Mapping | str = "baseline",
    batch_size: int = 128,
    weight_decay: float = 0.01,
    distance_dropout_p: float = 0.1,
    group_col: str | None = None,
    fold_reference: Sequence[str | os.PathLike] = (),
    augment: Mapping | None = None,
    loss: str = "ce",
    loss_settings: Mapping | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int = 1,
    num_workers: int = 0,
    deterministic: bool | str | None = None,
    checkpoint_every: int = 1,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Train and evaluate fold ``fold``; write predictions, history and metrics.json into ``out_dir``.

    ``img_size`` defaults to the crop size (a given value must equal it). ``recipe``: a
    :mod:`~cellstage.train.recipes` recipe, its name, or ``{"name": ..., <setting>: value}``.
    ``pretrained_path``: a backbone (SSL) or whole timm model (ImageNet) weights file;
    ``pretrained_key`` names its origin (a config key) in errors. Returns the
    metrics.json content (with NaN instead of null). ``checkpoint_every``: write the resume
    checkpoint every that many epochs (0: never; ~0.35 s and 180 MB for resnet18).
    ``num_threads``: ``torch.set_num_threads`` for this process (e.g. Snakemake's ``{threads}``);
    on shared CPUs an oversubscribed thread count is several times slower than one thread.
    ``fold_reference``: the reference scan's crop index parquets of the same train slides; the
    folds are made over their cells and a crop gets the fold of its (section, cell_id), so a
    cell's crops of every scan share a fold (:func:`cellstage.training.folds.make_folds`;
    empty: folds over the train index itself). ``group_col``: patient, section or slide.
    ``augment``: stain options (config ``finetune.augment``; None/off: none) — ``hed_jitter``
    ``{p, sigma, bias}`` (training only) and ``macenko`` (+ ``macenko_reference``: a slide or
    null), per-slide normalisation of train, validation and test crops
    (:mod:`cellstage.training.stain`); the fitted stain matrices go into metrics.json ``stain``.
    ``loss``: ``ce``, ``soft`` or ``ordinal`` with ``loss_settings`` (config ``finetune.losses.<loss>``;
    :mod:`cellstage.train.losses`); every loss sees the same folds (they depend on the cells only).
    """
    import torch

    from ..training.callbacks import HISTORY_COLUMNS, BestState, History
    from ..training.data import CropDataModule
    from ..training.fit import fit_resumable
    from ..training.resume import resolve_deterministic, seed_all
    from .classifier import CellClassifier

    t0 = time.time()
    set_torch_threads(num_threads)  # config determinism.threads, when pinned, wins
    taxonomy = taxonomy or Taxonomy()
    out_dir = Path(out_dir)
    train_sources = _check_sources(train_sources, "train")
    test_sources = _check_sources(test_sources, "test")
    fold_reference = [str(p) for p in fold_reference]
    for p in fold_reference:
        if not Path(p).is_file():
            raise CellstageError(f"fold_reference: crop index {p} does not exist")
    if pretrained_path is not None:
        pretrained_path = str(pretrained_path)
        if not Path(pretrained_path).is_file():
            raise CellstageError(f"{pretrained_key}: {pretrained_path} does not exist")
    recipe = as_recipe(recipe)
    epochs = recipe.epochs
    loss_settings = check_loss(loss, loss_settings)

    config = {
        "train_sources": [list(s) for s in train_sources],
        "test_sources": [list(s) for s in test_sources],
        "fold": int(fold),
        "n_folds": int(n_folds),
        "classes": list(taxonomy.classes),
        "static": list(taxonomy.static),
        "backbone": backbone,
        "img_size": img_size,
        "variant": variant,
        "use_distance": bool(use_distance),
        "pretrained_path": pretrained_path,
        "recipe": recipe.to_dict(),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "weight_decay": float(weight_decay),
        "distance_dropout_p": float(distance_dropout_p),
        "group_col": group_col,
        "fold_reference": fold_reference,
        "augment": dict(augment or {}),
        "loss": loss,
        "loss_settings": loss_settings,
        "seed": int(seed),
        "accelerator": accelerator,
        "devices": devices,
        "num_workers": int(num_workers),
        "num_threads": int(torch.get_num_threads()),  # changes results slightly
        "deterministic": resolve_deterministic(deterministic, accelerator),
        "checkpoint_every": int(checkpoint_every),
    }

    seed_all(seed)
    dm = CropDataModule(
        train_sources,
        test_sources,
        fold=fold,
        n_folds=n_folds,
        seed=seed,
        group_col=group_col,
        fold_reference=fold_reference,
        variant=variant,
        batch_size=batch_size,
        num_workers=num_workers,
        hed_jitter=(augment or {}).get("hed_jitter"),
        macenko=bool((augment or {}).get("macenko", False)),
        macenko_reference=(augment or {}).get("macenko_reference"),
    )
    dm.setup("fit")
    for what, idx in (("train", dm.train_index), ("test", dm.test_index)):
        if len(idx) and int(idx["label_idx"].max()) >= taxonomy.n_classes:
            raise CellstageError(
                f"{what} crops have label_idx up to {int(idx['label_idx'].max())} but the taxonomy "
                f"has {taxonomy.n_classes} classes"
            )
    h, w = dm.image_size
    if img_size is None:
        if h != w:
            raise CellstageError(f"crops are {h}x{w}; pass img_size explicitly for non-square crops")
        img_size = h
    elif (h, w) != (img_size, img_size):
        raise CellstageError(f"img_size={img_size} but the crops are {h}x{w} px")
    config["img_size"] = int(img_size)

    # fresh model after seeding: identical initial weights for identical arguments
    seed_all(seed)
    model = CellClassifier(
        backbone_name=backbone,
        n_classes=taxonomy.n_classes,
        img_size=img_size,
        use_distance=use_distance,
        pretrained_path=pretrained_path,
        pretrained_key=pretrained_key,
        recipe=recipe,
        weight_decay=weight_decay,
        distance_dropout_p=distance_dropout_p,
        loss=loss,
        loss_settings=loss_settings,
        classes=taxonomy.classes,
        static_classes=taxonomy.static,
    )

    ck_dir = out_dir / "checkpoints"
    history, best = History(), BestState()
    fit = fit_resumable(
        model,
        datamodule=dm,
        ckpt_path_last=ck_dir / "last.ckpt",
        resume_config=config,
        # content-keyed resume: the crop stores, indexes and weights file this fold reads
        inputs=[*(p for s in (*train_sources, *test_sources) for p in s), *fold_reference,
                *([pretrained_path] if pretrained_path else [])],
        epochs=epochs,
        seed=seed,
        accelerator=accelerator,
        devices=devices,
        deterministic=config["deterministic"],
        callbacks=[history, best],  # our callbacks keep the best weights; EpochCheckpoint writes last.ckpt
        progress=progress,
        checkpoint_every=checkpoint_every,
        default_root_dir=out_dir,
        what=f"fold {fold}",
    )
    trainer = fit.trainer
    if not fit.is_global_zero:
        return {}  # DDP: rank 0 evaluates and writes the outputs

    if best.best_state is None:
        raise CellstageError(f"fold {fold}: no validation loss was recorded; nothing to evaluate")
    model.load_state_dict(best.best_state)
    model.to(fit.device)

    results, frames = {}, []
    for split in ("val", "test"):
        idx = dm.split_index(split)
        if len(idx) == 0:
            probs = np.zeros((0, taxonomy.n_classes))
        else:
            probs = model.predict_proba(dm.eval_dataloader(split)).double().numpy()
        y = idx["label_idx"].to_numpy(dtype=np.int64)
        results[split] = compute_metrics(y, probs, taxonomy)
        pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
        df = pd.DataFrame(
            {
                "split": split,
                "fold": int(fold),
                "cell_id": idx["cell_id"].to_numpy(),
                "slide": idx["slide"].astype(str).to_numpy(),
                "row": idx["row"].to_numpy(),
                "label_idx": y,
                "label": [taxonomy.classes[i] for i in y],
                "pred": pred.astype(np.int64),
                "pred_label": [taxonomy.classes[i] for i in pred],
            }
        )
        for c, name in enumerate(taxonomy.classes):
            df[f"prob_{name}"] = probs[:, c].astype(np.float32)
        frames.append(df)

    with atomic_path(out_dir / "predictions.parquet") as tmp:
        pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False)
    _write_test_embeddings(model, dm, out_dir / "embeddings.parquet", fold=int(fold))
    with atomic_path(out_dir / "history.csv") as tmp:
        pd.DataFrame(history.rows, columns=list(HISTORY_COLUMNS)).to_csv(tmp, index=False)

    out = {
        "val": results["val"],
        "test": results["test"],
        "fold": int(fold),
        "epochs": int(trainer.current_epoch),
        "best_epoch": int(best.best_epoch),
        "best_val_loss": float(best.best_loss),
        "n_train": int(len(dm.train_index)),
        "seconds": round(time.time() - t0, 3),
        "fit_seconds": round(fit.fit_seconds, 3),
        "resumed": fit.resumed,
        "resumed_from_epoch": fit.resumed_from,
        "normalisation": {"mean": dm.mean, "std": dm.std},
        "stain": dm.stain.to_dict() if dm.stain is not None else None,
        "config": config,
        "provenance": provenance(),
    }
    fit.remove_checkpoint()
    shutil.rmtree(ck_dir, ignore_errors=True)
    write_json(out_dir / "metrics.json", _nan_to_none(out))  # last: marks the fold finished
    return out


def _write_test_embeddings(model, dm, path: Path, *, fold: int) -> None:
    """``embeddings.parquet``: the best-epoch backbone's embedding of every test crop (the
    report's UMAP, seed 000 Fig. 5 shape) — split, fold, cell_id, slide, row, label_idx and
    ``embedding`` (fixed-size list of float32; the classifier head's input without distance)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    idx = dm.split_index("test")
    chunks = []
    if len(idx):
        dev = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for x, _, _ in dm.eval_dataloader("test"):
                chunks.append(model.embed(x.to(dev)).float().cpu().numpy())
        model.train(was_training)
    dim = int(chunks[0].shape[1]) if chunks else int(model.feat_dim)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    table = pa.table({
        "split": pa.array(["test"] * len(idx), pa.string()),
        "fold": pa.array([fold] * len(idx), pa.int64()),
        "cell_id": pa.array(idx["cell_id"].to_numpy()),
        "slide": pa.array(idx["slide"].astype(str).to_numpy(), pa.string()),
        "row": pa.array(idx["row"].to_numpy()),
        "label_idx": pa.array(idx["label_idx"].to_numpy(dtype=np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float32).ravel()), dim),
    })
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ---------------------------------------------------------------------- aggregation
def aggregate_folds(metrics) -> pd.DataFrame:
    """One row per fold (``val_top1`` … ``test_adj1_dyn``, best_epoch, seconds) + mean and std.

    ``metrics``: which experiment each fold's metrics.json belongs to — a mapping
    ``{metrics_path: experiment_name}`` or a sequence of ``(experiment_name, metrics_path)``
    pairs (names are given, never parsed from paths). With several experiments, mean and std rows
    are per experiment, in the order experiments first appear. std is the sample standard
    deviation (ddof=1) over folds.
    """
    if isinstance(metrics, Mapping):
        pairs = [(name, path) for path, name in metrics.items()]
    else:
        pairs = []
        for item in metrics:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise CellstageError(
                    f"aggregate_folds: expected (experiment_name, metrics_path) pairs or a mapping "
                    f"{{metrics_path: experiment_name}}, got {item!r}"
                )
            pairs.append((item[0], item[1]))
    rows = []
    for experiment, p in pairs:
        p = Path(p)
        m = json.loads(p.read_text())
        row = {"experiment": str(experiment), "fold": str(m.get("fold", p.parent.name))}
        for split in ("val", "test"):
            d = m.get(split) or {}
            for k in METRIC_KEYS:
                v = d.get(k)
                row[f"{split}_{k}"] = float(v) if v is not None else math.nan
            row[f"{split}_n"] = d.get("n", 0)
        row["best_epoch"] = m.get("best_epoch", math.nan)
        row["epochs"] = m.get("epochs", math.nan)
        row["seconds"] = m.get("seconds", math.nan)
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    num = [c for c in df.columns if c not in ("experiment", "fold")]
    out = []
    for exp, g in df.groupby("experiment", sort=False):
        g = g.sort_values("fold", key=lambda s: pd.to_numeric(s, errors="coerce"))
        mean = {"experiment": exp, "fold": "mean", **g[num].astype(float).mean().to_dict()}
        std = {"experiment": exp, "fold": "std", **g[num].astype(float).std(ddof=1).to_dict()}
        out.append(pd.concat([g, pd.DataFrame([mean, std])], ignore_index=True))
    return pd.concat(out, ignore_index=True)

