"""``pretrain``: one SSL run over a pool of crops, validated on the labelled crops, with resume
and atomic outputs.

Protocol (seed 000 §4.3): the pool is the unlabelled-nucleus dataset (``pool="unlabelled"``:
rows whose ``split`` is ``unlabelled``; ``"unlabelled+train"`` adds every crop of the train
slides, labelled ones included, their labels unused); the validation crops are the labelled
cells of the train/validation slides (``val_sources``: rows with ``label_idx >= 0``), on which the
method's own SSL loss is computed after every epoch, no labels used. The learning rate follows a
plateau of that validation loss (×0.25, patience 10) and the epoch with the best validation
loss is exported ("The model with the best validation loss after 200 epochs was chosen as the
final pretrained model"). Without validation crops the training loss is monitored and the last
epoch exported (logged; ``pretrain.json`` says ``"monitor": "train_loss"``).

Outputs in ``out_dir`` (each written atomically, ``pretrain.json`` last, so its presence means
the run finished):
- ``backbone.safetensors`` — the timm backbone only (``num_classes=0``) of the best epoch; load it
  with ``load_weights(create_backbone(name, img_size=img_size), path)``;
- ``heads.safetensors`` — the rest of the SSL model at the same epoch (projection heads,
  predictors, MAE's decoder; not DINO's EMA teacher): what ``mae_reconstructions`` needs;
- ``history.csv`` (epoch, loss, val_loss, lr), ``loss.png`` (training and validation curves),
  ``pretrain.json`` (summary with ``best_epoch`` / ``best_val_loss``, config, provenance);
- ``last.ckpt`` — while training only: Lightning checkpoint written crash-safely after every epoch,
  with its sidecar ``last.json`` (hash of the arguments and of the crop stores' and indexes'
  content, sha256 of the checkpoint, epochs done; :mod:`cellstage.training.resume`); removed
  once ``pretrain.json`` is written. A rerun after a kill with the same ``out_dir``, arguments and
  input content resumes from it; ``epochs`` is not part of the comparison, but a checkpoint with
  more epochs done than ``epochs`` is never resumed (with exactly ``epochs`` done nothing is
  trained and the outputs are written from the checkpoint). A checkpoint written with other
  arguments (method, backbone, crops selected, batch size, lr, seed, ...) or from changed crops
  is ignored, a damaged one set aside, both logged, and training starts afresh.
  Resuming after a kill is bit-identical to an uninterrupted run on CPU with ``num_workers=0``
  (tests/unit/test_ssl.py::test_pretrain_killed_after_epoch_1_resumes_to_identical_weights:
  SIGKILL after epoch 1 of 4; same backbone weights and history).

Cluster note: ``devices`` / ``strategy`` / ``plugins`` come from
:func:`cellstage.training.resume.device_kwargs` (through
:func:`cellstage.training.fit.fit_resumable`): for single-device runs the trainer gets Lightning's
plain ``LightningEnvironment`` plugin, so a job started inside a SLURM allocation (``snakemake
--profile slurm``) is not auto-detected as a SLURM multi-process launch (Lightning's
``SLURMEnvironment`` would otherwise read ``SLURM_NTASKS``/``SLURM_PROCID`` and may refuse or
mis-rank the run, and installs its requeue signal handler). Several devices train with DDP; only
rank 0 writes the outputs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import CellstageError, atomic_path, canonical_safetensors, provenance, write_json

log = logging.getLogger("cellstage.ssl")


def _read_keep(keep) -> pd.DataFrame:
    """Keep-lists -> frame (slide, cell_id, keep). Accepts a DataFrame, a path, or a list of them;
    a file without a ``slide`` column (``results/grading/{slide}.parquet``) takes its slide from
    the file name."""
    items = keep if isinstance(keep, (list, tuple)) else [keep]
    frames = []
    for item in items:
        if isinstance(item, pd.DataFrame):
            df = item.copy()
            where = "keep DataFrame"
        else:
            path = Path(item)
            if not path.is_file():
                raise CellstageError(f"keep-list not found: {path}")
            df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
            where = str(path)
            if "slide" not in df.columns:
                df["slide"] = path.name.split(".")[0]
        missing = {"slide", "cell_id", "keep"} - set(df.columns)
        if missing:
            raise CellstageError(f"{where}: keep-list lacks column(s) {sorted(missing)}")
        frames.append(df[["slide", "cell_id", "keep"]])
    out = pd.concat(frames, ignore_index=True)
    out["slide"] = out["slide"].astype(str)
    out["cell_id"] = out["cell_id"].astype("int64")
    out["keep"] = out["keep"].astype(bool)
    return out.drop_duplicates(["slide", "cell_id"], keep="last")


def keep_lists(grading_paths, index_paths) -> pd.DataFrame | None:
    """Grading decisions (made on the reference scan) for every crop source, joined by section + cell id,
    so the other scan of a section keeps exactly the cells its reference scan kept. None without
    gradings; sections without a grading keep everything."""
    if not grading_paths:
        return None
    grading = pd.concat([pd.read_parquet(p, columns=["section", "cell_id", "keep"]) for p in grading_paths])
    index = pd.concat([pd.read_parquet(p, columns=["slide", "section", "cell_id"]) for p in index_paths])
    keep = index.merge(grading, on=["section", "cell_id"], how="left")
    keep["keep"] = keep["keep"].fillna(True).astype(bool)
    return keep[["slide", "cell_id", "keep"]]


def select_crops(index: pd.DataFrame, *, keep=None, max_crops: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Apply keep-lists (rows with keep False removed; rows not in any list are kept) and a
    seeded random subset of ``max_crops`` rows (original order preserved)."""
    if keep is not None:
        kl = _read_keep(keep)
        idx = index.assign(slide=index["slide"].astype(str), cell_id=index["cell_id"].astype("int64"))
        merged = idx.merge(kl, on=["slide", "cell_id"], how="left")
        index = index.loc[merged["keep"].fillna(True).astype(bool).to_numpy()]
    if max_crops is not None and len(index) > max_crops:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(index), size=int(max_crops), replace=False))
        index = index.iloc[pick]
    return index.reset_index(drop=True)


#: the crop pools of ``pretrain.pool``: the sheet splits whose crops pretrain
POOLS = {"unlabelled": ("unlabelled",), "unlabelled+train": ("unlabelled", "train")}


def pool_rows(index: pd.DataFrame, pool: str | None, where: str = "crop index") -> pd.DataFrame:
    """Rows of ``index`` in ``pool`` (by their ``split``); None: every row."""
    if pool is None:
        return index
    if pool not in POOLS:
        raise CellstageError(f"pretrain.pool: {pool!r} is not one of {sorted(POOLS)}")
    if "split" not in index.columns:
        raise CellstageError(f"{where}: no 'split' column; pretrain.pool {pool!r} needs it (docs/contracts.md)")
    return index.loc[index["split"].astype(str).isin(POOLS[pool])].reset_index(drop=True)


def validation_rows(index: pd.DataFrame) -> pd.DataFrame:
    """The labelled train/validation cells (``label_idx >= 0``; ``split == "train"`` where given)."""
    if len(index) == 0:
        return index
    keep = index["label_idx"].fillna(-1).astype(int) >= 0 if "label_idx" in index else pd.Series(False, index.index)
    if "split" in index.columns:
        keep &= index["split"].astype(str) == "train"
    return index.loc[keep.to_numpy()].reset_index(drop=True)


def _index_digest(index: pd.DataFrame) -> str:
    """Hash of the crops a run trains on (source, row, slide, cell id, in order)."""
    import hashlib

    cols = [c for c in ("zarr_path", "row", "slide", "cell_id") if c in index.columns]
    h = hashlib.sha256(pd.util.hash_pandas_object(index[cols], index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def _plot(history: pd.DataFrame, path: Path, title: str, best_epoch: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    if len(history):
        ax.plot(history["epoch"], history["loss"], marker="o", ms=3, label="training")
        if history["val_loss"].notna().any():
            ax.plot(history["epoch"], history["val_loss"], marker="s", ms=3, label="validation")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.5", ls=":", lw=1, label=f"best (epoch {best_epoch})")
        ax.legend(fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("SSL loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def pretrain(
    method: str,
    backbone: str,
    sources: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike,
    *,
    img_size: int,
    variant: str = "images",
    epochs: int,
    batch_size: int = 128,
    lr: float | None = None,
    seed: int = 0,
    max_crops: int | None = None,
    accelerator: str = "auto",
    devices=1,
    num_workers: int = 0,
    keep=None,
    progress: bool = True,
    method_kwargs: dict | None = None,
    transform_kwargs: dict | None = None,
    val_sources: Sequence[tuple[str, str]] = (),
    pool: str | None = None,
    checkpoint_every: int = 1,
    augment: dict | None = None,
    partner_sources: Sequence[tuple[str, str]] = (),
) -> dict:
    """Self-supervised pretraining of ``backbone`` with ``method`` on the crops of ``sources``.

    ``sources``: (crops zarr, index parquet) pairs (labels are ignored); ``pool``: keep only the
    rows of a :data:`POOLS` entry (None: every row). ``val_sources``: pairs whose labelled
    train rows are the validation crops (empty: no validation, the training loss is monitored
    and the last epoch exported). ``keep``: optional grading keep-lists (DataFrame(s) or parquet
    path(s) with slide, cell_id, keep) for the pool. ``lr`` None = the method's seed-000 default
    (1e-3 SimCLR/DINO, 1.5e-4 MAE). ``checkpoint_every``: resume checkpoint every that many epochs
    (0: never). ``augment``: config ``pretrain.augment`` (HED jitter in front of every view, Macenko
    normalisation per slide of pool and validation crops; :func:`cellstage.training.stain.stain_options`).
    ``partner_sources``: for a cross-scan method (``simclr_xscan``, ...; :mod:`cellstage.ssl.crossscan`)
    the crops of the partner scan of the same sections: each pool and validation crop is paired with
    its cell's crop there (crops without one are left out), and the odd views come from it.
    Returns the summary that is also written to ``pretrain.json``.
    """
    import torch
    from torch.utils.data import DataLoader

    from ..training.backbones import save_weights
    from ..training.data import ZarrCropDataset, load_index
    from ..training.fit import fit_resumable
    from ..training.resume import (
        EpochSampler,
        loader_generator,
        resolve_deterministic,
        seed_all,
    )
    from ..training.stain import add_hed_jitter, stain_options
    from . import METHODS
    from .settings import check_applicable

    check_applicable(method, backbone)
    spec = METHODS[method]
    if int(epochs) < 1:
        raise CellstageError(f"pretrain: epochs must be >= 1, got {epochs}")
    if not sources:
        raise CellstageError("pretrain: no crop sources given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    index = pool_rows(load_index(sources), pool, where=str([s[1] for s in sources]))
    n_all = len(index)
    index = select_crops(index, keep=keep, max_crops=max_crops, seed=seed)
    if len(index) < 2:
        raise CellstageError(
            f"pretrain: only {len(index)} crop(s) left of {n_all} in {[s[1] for s in sources]} "
            f"(pool {pool!r}, after keep-lists / max_crops); need at least 2"
        )
    val_index = validation_rows(load_index(val_sources)) if val_sources else pd.DataFrame()
    if val_sources and len(val_index) == 0:
        log.warning("pretrain: no labelled train crops in %s; monitoring the training loss",
                    [s[1] for s in val_sources])
    n_val_in_pool = 0
    if len(val_index):
        pool_keys = set(zip(index["slide"].astype(str), index["cell_id"].astype("int64")))
        n_val_in_pool = sum((s, c) in pool_keys for s, c in zip(val_index["slide"].astype(str),
                                                                 val_index["cell_id"].astype("int64")))
        if n_val_in_pool:
            log.warning("pretrain: %d of %d validation crops are also in the training pool (pool %r): the "
                        "validation loss is not held out", n_val_in_pool, len(val_index), pool)
    partner_index = pd.DataFrame()
    if spec.cross_scan:
        from .crossscan import pair_rows

        if not partner_sources:
            raise CellstageError(
                f"pretrain: method {method!r} pairs every crop with the same cell's crop on the partner scan, "
                "but no partner crops were given (config pretrain.partner_scan)"
            )
        partner_index = load_index(partner_sources)
        n_paired_from = len(index)
        index, partner_pos = pair_rows(index, partner_index, where=f"pretrain {method} pool")
        if len(index) < 2:
            raise CellstageError(f"pretrain: only {len(index)} of {n_paired_from} pool crops have a partner-scan crop")
        if len(val_index):
            val_index, val_partner_pos = pair_rows(val_index, partner_index, where=f"pretrain {method} validation")
    elif partner_sources:
        raise CellstageError(f"pretrain: partner crops given, but method {method!r} is not a cross-scan method")
    jitter, stain = stain_options(augment, [*sources, *val_sources, *partner_sources])
    try:
        transform = add_hed_jitter(spec.make_transform(img_size, **(transform_kwargs or {})), jitter)
    except TypeError as e:
        raise CellstageError(f"pretrain.methods.{method}.views: {e} (keyword arguments of the method's "
                             "view transform)") from e
    if spec.cross_scan:
        from .crossscan import CrossScanDataset

        partner_crops = ZarrCropDataset(partner_index, variant=variant, stain=stain)

        def paired(own, pos):  # one view per scan, or the method's own pairing (ctfm: context field + targets)
            if spec.paired_dataset is not None:
                return spec.paired_dataset(own, partner_crops, pos, transform, method_kwargs)
            return CrossScanDataset(own, partner_crops, pos, transform)

        dataset = paired(ZarrCropDataset(index, variant=variant, stain=stain), partner_pos)
    else:
        dataset = ZarrCropDataset(index, variant=variant, transform=transform, stain=stain)
    crop_shape = tuple(dataset.image(0).shape)

    seed_all(seed)
    model = spec.module(backbone, img_size, lr=lr, **(method_kwargs or {}))
    model.val_seed = int(seed)
    bs = int(min(batch_size, len(dataset)))
    loader = DataLoader(
        dataset, batch_size=bs, sampler=EpochSampler(len(dataset), seed), drop_last=len(dataset) > bs,
        num_workers=num_workers, persistent_workers=num_workers > 0, generator=loader_generator(seed),
    )
    val_loader = None
    if len(val_index):
        if spec.cross_scan:
            val_dataset = paired(ZarrCropDataset(val_index, variant=variant, stain=stain), val_partner_pos)
        else:
            val_dataset = ZarrCropDataset(val_index, variant=variant, transform=transform, stain=stain)
        # the training batch size (contrastive losses depend on it); a last batch of 1 crop is dropped
        vbs = int(min(bs, len(val_dataset)))
        val_loader = DataLoader(
            val_dataset, batch_size=vbs, shuffle=False, drop_last=len(val_dataset) % vbs == 1,
            num_workers=num_workers, persistent_workers=num_workers > 0, generator=loader_generator(seed + 1),
        )

    # what must match for a checkpoint to be resumed (not `epochs`: a run may be continued)
    resume_config = {
        "method": method, "backbone": backbone, "img_size": int(img_size), "variant": variant,
        "batch_size": bs, "lr": model.lr, "seed": int(seed), "accelerator": accelerator, "devices": devices,
        "num_workers": int(num_workers), "method_kwargs": method_kwargs or {},
        "transform_kwargs": transform_kwargs or {}, "crops": _index_digest(index),
        "val_crops": _index_digest(val_index) if len(val_index) else None, "augment": augment or {},
        "partner_crops": _index_digest(partner_index) if len(partner_index) else None,
    }
    last = out_dir / "last.ckpt"
    fit = fit_resumable(
        model, train_loader=loader, val_loader=val_loader, ckpt_path_last=last, resume_config=resume_config,
        # resumed only if their content is unchanged
        inputs=[p for s in (*sources, *val_sources, *partner_sources) for p in s],
        epochs=int(epochs), seed=seed, accelerator=accelerator, devices=devices,
        deterministic=resolve_deterministic(None, accelerator),  # True on CPU, "warn" on CUDA
        progress=progress, checkpoint_every=checkpoint_every, default_root_dir=out_dir,
        what=f"pretrain {method}/{backbone}",
    )
    if not fit.is_global_zero:
        return {}  # DDP: rank 0 writes the outputs
    resumed_from = fit.resumed_from  # epochs done in the resumed checkpoint (never more than `epochs`)
    if resumed_from is not None and resumed_from >= int(epochs):
        # nothing trained: Lightning may not have restored the weights; load them explicitly
        state = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(state["state_dict"])
        model.on_load_checkpoint(state)

    history = pd.DataFrame(model.history, columns=["epoch", "loss", "val_loss", "lr"])
    epochs_run = len(history) - (resumed_from or 0)
    monitor = "val_loss" if val_loader is not None else "train_loss"
    model.cpu()
    best_epoch = model.best["epoch"] if model.restore_best() else (int(history["epoch"].iloc[-1]) if len(history)
                                                                  else None)
    best_val = float(model.best["val_loss"]) if model.best["epoch"] is not None else None
    config = {
        "method": method, "backbone": backbone, "img_size": int(img_size), "variant": variant,
        "epochs": int(epochs), "batch_size": bs, "lr": model.lr, "seed": int(seed), "max_crops": max_crops,
        "pool": pool, "accelerator": accelerator, "devices": devices, "num_workers": int(num_workers),
        "keep_lists": keep is not None and not isinstance(keep, pd.DataFrame) and [str(k) for k in (
            keep if isinstance(keep, (list, tuple)) else [keep]) if not isinstance(k, pd.DataFrame)] or None,
        "method_kwargs": method_kwargs or {}, "transform_kwargs": transform_kwargs or {}, "augment": augment or {},
        "partner_sources": [list(s) for s in partner_sources] or None,
        "hparams": {k: v for k, v in dict(model.hparams).items()},
    }
    meta = {"method": method, "backbone": backbone, "img_size": img_size, "epoch": best_epoch}
    save_weights(model.export_backbone(), out_dir / "backbone.safetensors", metadata=meta)
    _save_state(model.heads_state(), out_dir / "heads.safetensors", meta)
    with atomic_path(out_dir / "history.csv") as tmp:
        history.to_csv(tmp, index=False)
    _plot(history, out_dir / "loss.png", f"{method} / {backbone} ({len(index)} crops, {len(val_index)} val)",
          best_epoch if monitor == "val_loss" else None)
    steps_per_epoch = len(loader)
    summary = {
        "method": method,
        "backbone": backbone,
        "img_size": int(img_size),
        "crop_shape": list(crop_shape),
        "epochs": int(len(history)),
        "epochs_this_run": int(max(0, epochs_run)),
        "resumed_from_epoch": resumed_from,
        "monitor": monitor,
        "best_epoch": best_epoch,  # the exported epoch (1-based): best val_loss, or the last without validation
        "best_val_loss": best_val,
        "n_crops": int(len(index)),
        "n_crops_available": int(n_all),
        "n_val_crops": int(len(val_index)),
        "n_val_crops_in_pool": int(n_val_in_pool),
        "steps_per_epoch": int(steps_per_epoch),
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_per_epoch": round(fit.fit_seconds / epochs_run, 3) if epochs_run > 0 else None,
        "final_loss": float(history["loss"].iloc[-1]) if len(history) else None,
        "device": str(fit.device),
        "config": config,
        "provenance": provenance(inputs=[s[1] for s in [*sources, *val_sources]]),
    }
    write_json(out_dir / "pretrain.json", summary)
    fit.remove_checkpoint()  # a finished run leaves no checkpoint (a rerun trains afresh)
    return summary


def _save_state(state: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        canonical_safetensors(tmp)  # the same bytes for the same weights (metadata order)
