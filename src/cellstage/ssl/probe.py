"""Evaluation of a pretrained backbone without fine-tuning: kNN and linear probes on frozen features.

Issue 12 item 7: "kNN and linear-probe accuracy on the labelled crops (Top-1 and Adjacent-1),
beside the same probes on a random-init backbone", written per pretraining run. The frozen-backbone
idea is seed 001's "backbone evaluation" ("the weights in the backbone are frozen after the
pre-training, so that only the neck part and the two heads of our model adapt to the downstream
task"); here the heads are the two standard probes of the SSL literature, so a run can be judged
before fine-tuning 5 folds.

Protocol (:func:`run_probe`):

* **Crops**: the labelled cells of the train slides of the run's scan (``label_idx >= 0``,
  ``split == "train"``; :func:`cellstage.ssl.pretrain.validation_rows`) - the crops pretraining uses
  as its validation set (seed 000 §4.3), in the run's crop variant (``pretrain.json``), with the
  run's Macenko normalisation when it had one; no augmentation.
* **Features**: one forward pass of the frozen backbone (``eval()``, no gradients) over every crop,
  converted to [0, 1] and normalised with ImageNet mean/std as the SSL views are (lightly's
  transforms); resized to the run's ``img_size`` when the crops differ. The same for a backbone of
  the same architecture initialised at random under the run's seed (``seed_all(seed)`` then the timm
  model: for SimCLR and DINO exactly the weights pretraining started from - checked for resnet18;
  MAE re-initialises its ViT, so there it is another random draw), so the gain of pretraining is
  the difference.
* **Folds**: grouped k-fold over the cells (:func:`cellstage.training.folds.make_folds`, stratified
  by class, grouped by ``group_by`` - section by default - so no section has cells on both sides);
  fewer groups than ``n_folds`` lower the number of folds to the number of groups (recorded as
  ``n_folds``); fewer than two groups fall back to folds over single cells (recorded, logged).
* **Probes**, fitted per fold on the other folds' features and scored on the held-out fold:
  kNN (``KNeighborsClassifier``, cosine distance, ``k`` neighbours, 20 by default as in DINO's
  k-NN evaluation, fewer when a training fold has fewer cells) and a linear probe
  (``LogisticRegression`` on standardised features, L2, ``C``). Scores are class probabilities
  over the configured taxonomy; metrics are :func:`cellstage.metrics.compute_metrics` (Top-1,
  Top-2, Adjacent-1, Adjacent-1 Dynamic, seed 000 §3.2), mean ± std (ddof 1, as the report's fold
  tables) over folds.

Everything runs on CPU in float32 with fixed seeds, so a rerun gives the same numbers.
Output: ``probe.json`` (:func:`probe`) beside the run's ``pretrain.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics import compute_metrics
from ..taxonomy import Taxonomy
from ..utils import CellstageError, provenance, set_torch_threads, write_json

log = logging.getLogger("cellstage.ssl")

PROBES = ("knn", "linear")
INITS = ("pretrained", "random")
METRIC_NAMES = ("top1", "top2", "adj1", "adj1_dyn")


def embed(model, images: Sequence[np.ndarray], *, img_size: int | None = None, batch_size: int = 256) -> np.ndarray:
    """Features (N, D) float32 of uint8 crops (H, W, 3) through the frozen ``model`` (eval mode,
    no gradients): [0, 1], ImageNet mean/std (as the SSL views), resized to ``img_size`` when the
    crops have another size."""
    import torch
    import torch.nn.functional as F

    from ..training.transforms import IMAGENET_MEAN, IMAGENET_STD

    model.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = np.stack([np.asarray(images[i]) for i in range(start, min(start + batch_size, len(images)))])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
            if img_size is not None and tuple(x.shape[-2:]) != (img_size, img_size):
                x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
            out.append(model((x - mean) / std).reshape(len(x), -1).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _full_probs(proba: np.ndarray, classes_: np.ndarray, n_classes: int) -> np.ndarray:
    """A classifier's probabilities over its seen classes -> (N, n_classes) over the taxonomy."""
    full = np.zeros((len(proba), n_classes))
    full[:, classes_.astype(int)] = proba
    return full


def _fit_predict(probe: str, x_train, y_train, x_test, n_classes: int, *, k: int, C: float, seed: int):
    """Class probabilities (N_test, n_classes) of one probe fitted on the training fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    seen = np.unique(y_train)
    if len(seen) == 1:  # one class in the training folds: both probes can only predict it
        probs = np.zeros((len(x_test), n_classes))
        probs[:, int(seen[0])] = 1.0
        return probs
    if probe == "knn":
        clf = KNeighborsClassifier(n_neighbors=min(int(k), len(x_train)), metric="cosine", algorithm="brute")
        clf.fit(x_train, y_train)
        return _full_probs(clf.predict_proba(x_test), clf.classes_, n_classes)
    if probe == "linear":
        scaler = StandardScaler().fit(x_train)
        clf = LogisticRegression(C=float(C), max_iter=2000, random_state=int(seed))
        clf.fit(scaler.transform(x_train), y_train)
        return _full_probs(clf.predict_proba(scaler.transform(x_test)), clf.classes_, n_classes)
    raise CellstageError(f"probe: unknown probe {probe!r}; expected one of {list(PROBES)}")


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def probe_features(
    features: np.ndarray,
    labels: np.ndarray,
    folds: np.ndarray,
    taxonomy: Taxonomy,
    *,
    k: int = 20,
    C: float = 1.0,
    seed: int = 0,
) -> dict:
    """kNN and linear-probe metrics of ``features`` (N, D) with ``labels`` (N,) over ``folds`` (N,):
    ``{probe: {"folds": [metrics per fold], "mean": {metric: ...}, "std": {metric: ...}}}``; every
    fold is held out once and scored by probes fitted on the others."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    folds = np.asarray(folds, dtype=np.int64)
    if not (len(features) == len(labels) == len(folds)):
        raise CellstageError(f"probe: {len(features)} features, {len(labels)} labels, {len(folds)} folds differ")
    fold_ids = sorted(set(folds.tolist()) - {-1})
    if len(fold_ids) < 2:
        raise CellstageError(f"probe: need at least 2 folds, got {fold_ids}")
    result = {}
    for probe in PROBES:
        rows = []
        for f in fold_ids:
            train, test = folds != f, folds == f
            # one BLAS thread (threadpoolctl, a scikit-learn dependency): these small fits ran ~6x
            # faster than with 2 threads competing for 2 busy cores
            with warnings.catch_warnings(), threadpool_limits(1):
                warnings.simplefilter("ignore", ConvergenceWarning)
                probs = _fit_predict(
                    probe, features[train], labels[train], features[test], taxonomy.n_classes, k=k, C=C, seed=seed
                )
            m = compute_metrics(labels[test], probs, taxonomy)
            extra = {"k": min(int(k), int(train.sum()))} if probe == "knn" else {}
            rows.append(
                {
                    "fold": int(f),
                    "n_train": int(train.sum()),
                    **extra,
                    **{key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in m.items()},
                }
            )
        stats = {name: _mean_std([r[name] for r in rows]) for name in METRIC_NAMES}
        result[probe] = {
            "folds": rows,
            "mean": {n: s[0] for n, s in stats.items()},
            "std": {n: s[1] for n, s in stats.items()},
        }
    return result


def probe_folds(cells: pd.DataFrame, n_folds: int, *, group_by: str | None, seed: int) -> tuple[np.ndarray, dict]:
    """Folds of the labelled ``cells`` (:func:`cellstage.training.folds.make_folds`, stratified and
    grouped by ``group_by``), and what was used (``n_folds``, ``group_by``, ``note``)."""
    from ..training.folds import make_folds

    used = {"n_folds": int(n_folds), "group_by": group_by, "note": None}
    if group_by is not None:
        # a slide is one scan of a section: grouping by slide is grouping by section (training.folds)
        column = "section" if group_by == "slide" and "section" in cells else group_by
        if column not in cells:
            raise CellstageError(
                f"probe: group_by {group_by!r}: the crop index has no {column!r} column "
                "(docs/contracts.md); use another group_by or null"
            )
        n_groups = int(cells[column].astype(str).nunique())
        if n_groups < 2:
            used.update(group_by=None, note=f"one {group_by} only: folds over single cells (no grouping)")
            log.warning("probe: %s", used["note"])
        elif n_groups < n_folds:
            used.update(n_folds=n_groups, note=f"{n_groups} {group_by} groups: {n_groups} folds, not {n_folds}")
            log.info("probe: %s", used["note"])
    used["n_folds"] = min(used["n_folds"], len(cells))
    return make_folds(cells, used["n_folds"], seed=seed, group_col=used["group_by"]), used


def _backbone(name: str, img_size: int, seed: int, weights: Path | None):
    """The timm backbone of the run: random init under ``seed`` (as pretraining starts), then the
    exported weights when given."""
    from ..training.backbones import create_backbone, load_weights
    from ..training.resume import seed_all

    seed_all(seed)
    model = create_backbone(name, img_size=img_size)
    if weights is None:
        return model
    if not weights.is_file():
        raise CellstageError(
            f"probe: weights file {weights} does not exist (the pretraining run's exported "
            f"backbone; run rule pretrain for {weights.parent} first)"
        )
    try:
        load_weights(model, weights, strict=True)
    except ValueError as e:
        raise CellstageError(f"probe: {weights} does not fit backbone {name!r} at img_size {img_size}: {e}") from e
    except Exception as e:  # corrupt / not a safetensors file
        raise CellstageError(f"probe: {weights} is not a readable safetensors file: {e}") from e
    return model


def run_probe(
    run_dir: str | os.PathLike,
    val_sources: Sequence[tuple[str, str]],
    *,
    taxonomy: Taxonomy,
    n_folds: int = 5,
    group_by: str | None = "section",
    k: int = 20,
    C: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    out_json: str | os.PathLike | None = None,
    stain_sources: Sequence[tuple[str, str]] = (),
) -> dict:
    """kNN and linear probes of the pretraining run in ``run_dir`` (its ``pretrain.json`` and
    ``backbone.safetensors``) and of a random-init backbone of the same architecture, over the
    labelled train crops of ``val_sources`` ((crops zarr, index parquet) pairs); see the module
    docstring. ``stain_sources``: crops of the run's ``augment.macenko_reference`` slide when it is
    not a train slide (fitted for the Macenko reference only). Returns the summary, also written to
    ``out_json`` (default ``run_dir/probe.json``)."""
    from ..training.data import CachedCropDataset, load_index
    from ..training.stain import stain_options
    from .pretrain import validation_rows

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    info_path, weights = run_dir / "pretrain.json", run_dir / "backbone.safetensors"
    if not info_path.is_file():
        raise CellstageError(
            f"probe: {info_path} does not exist (the pretraining run's summary; run rule pretrain first)"
        )
    if not weights.is_file():
        raise CellstageError(
            f"probe: weights file {weights} does not exist (the pretraining run's exported "
            "backbone; run rule pretrain first)"
        )
    info = json.loads(info_path.read_text())
    cfg = info.get("config", {})
    try:
        method, backbone, img_size = info["method"], info["backbone"], int(info["img_size"])
    except KeyError as e:
        raise CellstageError(f"probe: {info_path} lacks field {e} (written by cellstage.ssl.pretrain)") from e
    variant = cfg.get("variant", "images")
    sources = [(str(z), str(p)) for z, p in val_sources]
    if not sources:
        raise CellstageError("probe: no crop sources of the train slides given (val_zarr / val_index)")
    cells = validation_rows(load_index(sources))
    if len(cells) < 2:
        raise CellstageError(
            f"probe: {len(cells)} labelled train crop(s) in {[s[1] for s in sources]}; need at "
            "least 2 (label_idx >= 0, split train)"
        )
    bad = cells["label_idx"].astype(int) >= taxonomy.n_classes
    if bad.any():
        raise CellstageError(
            f"probe: label_idx up to {int(cells['label_idx'].max())} in {[s[1] for s in sources]} "
            f"but config classes has {taxonomy.n_classes} classes"
        )
    folds, used = probe_folds(cells, n_folds, group_by=group_by, seed=seed)
    init_seed = int(cfg.get("seed", seed))  # the run's seed: its random init
    augment = cfg.get("augment") or {}
    stain_sources = [(str(z), str(p)) for z, p in stain_sources]
    _, stain = stain_options(
        {"macenko": augment.get("macenko", False), "macenko_reference": augment.get("macenko_reference")},
        sources + [s for s in stain_sources if s not in sources],
    )
    images = CachedCropDataset(cells, variant=variant, stain=stain).all_images()
    labels = cells["label_idx"].to_numpy(np.int64)

    result = {}
    for init in INITS:
        model = _backbone(backbone, img_size, init_seed, weights if init == "pretrained" else None)
        feats = embed(model, images, img_size=img_size, batch_size=batch_size)
        result[init] = probe_features(feats, labels, folds, taxonomy, k=k, C=C, seed=seed)
        log.info(
            "probe %s/%s %s: kNN top1 %.3f, linear top1 %.3f",
            method,
            backbone,
            init,
            _nan(result[init]["knn"]["mean"]["top1"]),
            _nan(result[init]["linear"]["mean"]["top1"]),
        )
    counts = pd.Series(labels).value_counts().sort_index()
    summary = {
        "method": method,
        "backbone": backbone,
        "scan": sorted(cells["scan"].astype(str).unique().tolist()) if "scan" in cells else None,
        "img_size": img_size,
        "variant": variant,
        "pretrain_best_epoch": info.get("best_epoch"),
        "n_cells": int(len(cells)),
        "n_per_class": {taxonomy.classes[int(i)]: int(n) for i, n in counts.items()},
        "feature_dim": int(feats.shape[1]),
        "folds": used,
        "config": {
            "k": int(k),
            "knn_metric": "cosine",
            "linear_C": float(C),
            "linear_standardised": True,
            "seed": int(seed),
            "init_seed": init_seed,
            "group_by": group_by,
            "n_folds": int(n_folds),
            "macenko": stain is not None,
            "classes": list(taxonomy.classes),
            "static_classes": list(taxonomy.static),
        },
        **result,
        "gain": {
            p: {
                m: _difference(result["pretrained"][p]["mean"][m], result["random"][p]["mean"][m]) for m in METRIC_NAMES
            }
            for p in PROBES
        },  # pretrained minus random init
        "seconds": round(time.perf_counter() - t0, 3),
        "provenance": provenance(inputs=[str(weights), str(info_path), *[s[1] for s in sources]]),
    }
    if isinstance(summary["scan"], list) and len(summary["scan"]) == 1:
        summary["scan"] = summary["scan"][0]
    write_json(out_json if out_json is not None else run_dir / "probe.json", summary)
    return summary


def probe(
    run_dir: str | os.PathLike,
    val_zarr_paths,
    val_index_paths,
    out_json: str | os.PathLike,
    *,
    stain_zarr_paths=(),
    stain_index_paths=(),
    classes: Sequence[str],
    static_classes: Sequence[str],
    n_folds: int,
    group_by: str | None,
    k: int,
    C: float,
    seed: int,
    threads: int | None = None,
) -> dict:
    """Stage entry point (rule ``probe``): :func:`run_probe` of the run in ``run_dir`` over the
    labelled crops of the train slides (``val_zarr_paths`` / ``val_index_paths``, the pretraining
    validation crops), written to ``out_json``; ``stain_*_paths``: the crops of the Macenko reference
    slide of the run (config ``pretrain.augment.macenko_reference``) when it is set. Every argument
    is the validated config value."""
    set_torch_threads(threads)
    return run_probe(
        run_dir,
        list(zip([str(p) for p in val_zarr_paths], [str(p) for p in val_index_paths])),
        taxonomy=Taxonomy(tuple(classes), tuple(static_classes)),
        n_folds=int(n_folds),
        group_by=group_by,
        k=int(k),
        C=float(C),
        seed=int(seed),
        out_json=out_json,
        stain_sources=list(zip([str(p) for p in stain_zarr_paths], [str(p) for p in stain_index_paths])),
    )
