"""Classification metrics of seed 000 §3.2: Top-1, Top-2, Adjacent-1 and Adjacent-1 Dynamic.

* **Top-k**: correct if the true class is among the k highest probabilities. Ties are broken
  towards the lower class index (stable sort), the same choice as ``argmax`` makes for Top-1.
* **Adjacent-k**: correct if the prediction is exact, or if the *true* class is dynamic (part of
  the developmental sequence ``Taxonomy.dynamic``) and the predicted class is dynamic too and at
  most ``k`` steps away along that sequence. Static classes (PMC, SC) must be predicted exactly;
  a dynamic cell predicted as a static class is wrong. Computed over **all** samples.
* **Adjacent-k Dynamic**: the same rule evaluated only over samples whose true class is dynamic
  (NaN when there are none).
"""

from __future__ import annotations

import math

import numpy as np

from ..taxonomy import Taxonomy


def _labels(y_true) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    return y.astype(np.int64, copy=False)


def top_k_accuracy(y_true, probs, k: int = 1) -> float:
    """Fraction of samples whose true class is among the ``k`` largest scores (NaN if empty)."""
    y = _labels(y_true)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must have shape (n_samples={y.shape[0]}, n_classes), got {p.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if y.size == 0:
        return math.nan
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true has labels outside 0..{p.shape[1] - 1}")
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return float((order == y[:, None]).any(axis=1).mean())


def _adjacent_hits(y_true, y_pred, taxonomy: Taxonomy, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample correctness under the Adjacent-k rule, and the mask of dynamic true classes."""
    y = _labels(y_true)
    yp = _labels(y_pred)
    if y.shape != yp.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {yp.shape} differ in length")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    stage = np.asarray(taxonomy.stage(), dtype=np.int64)  # -1 for static classes
    n = len(stage)
    for name, arr in (("y_true", y), ("y_pred", yp)):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(f"{name} has labels outside 0..{n - 1}")
    st, sp = stage[y], stage[yp]
    dyn_true = st >= 0
    hits = (y == yp) | (dyn_true & (sp >= 0) & (np.abs(st - sp) <= k))
    return hits, dyn_true


def adjacent_k_accuracy(y_true, y_pred, taxonomy: Taxonomy, k: int = 1) -> float:
    """Adjacent-k accuracy over all samples (NaN if empty)."""
    hits, _ = _adjacent_hits(y_true, y_pred, taxonomy, k)
    return float(hits.mean()) if hits.size else math.nan


def adjacent_k_dynamic_accuracy(y_true, y_pred, taxonomy: Taxonomy, k: int = 1) -> float:
    """Adjacent-k accuracy over the samples whose true class is dynamic (NaN if none)."""
    hits, dyn = _adjacent_hits(y_true, y_pred, taxonomy, k)
    return float(hits[dyn].mean()) if dyn.any() else math.nan


def confusion(y_true, y_pred, n: int) -> np.ndarray:
    """Confusion matrix ``C[true, pred]`` (counts, int64) of shape (n, n)."""
    y = _labels(y_true)
    yp = _labels(y_pred)
    if y.shape != yp.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {yp.shape} differ in length")
    for name, arr in (("y_true", y), ("y_pred", yp)):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(f"{name} has labels outside 0..{n - 1}")
    c = np.zeros((n, n), dtype=np.int64)
    np.add.at(c, (y, yp), 1)
    return c


def compute_metrics(y_true, probs, taxonomy: Taxonomy) -> dict:
    """``{"top1", "top2", "adj1", "adj1_dyn", "n", "n_dyn"}``; metrics are NaN when undefined.

    The prediction used for the Adjacent metrics is the argmax of ``probs`` (lowest index on ties).
    """
    y = _labels(y_true)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] != taxonomy.n_classes:
        raise ValueError(f"probs must have shape (n, {taxonomy.n_classes}), got {p.shape}")
    pred = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=np.int64)
    _, dyn = _adjacent_hits(y, pred, taxonomy, 1)
    return {
        "top1": top_k_accuracy(y, p, 1),
        "top2": top_k_accuracy(y, p, min(2, p.shape[1])),
        "adj1": adjacent_k_accuracy(y, pred, taxonomy, 1),
        "adj1_dyn": adjacent_k_dynamic_accuracy(y, pred, taxonomy, 1),
        "n": int(y.size),
        "n_dyn": int(dyn.sum()),
    }
