"""Figures for the report: metric boxplots over folds (seed 000, Fig. 7 shape), confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..utils import atomic_path  # noqa: E402
from .tables import METRIC_NAMES  # noqa: E402


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def metric_boxplots(folds: pd.DataFrame, path, metrics=("top1", "adj1", "adj1_dyn"), chance: float | None = None):
    """One panel per (split, metric); one box per configuration over its folds."""
    experiments = list(dict.fromkeys(folds["experiment"]))
    splits = [s for s in ("val", "test") if s in set(folds["split"])]
    fig, axes = plt.subplots(
        len(splits), len(metrics), figsize=(4 * len(metrics), 0.6 * len(experiments) + 2.5 * len(splits)),
        squeeze=False, sharex=True,
    )
    for i, split in enumerate(splits):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            data = [
                folds.loc[(folds.experiment == e) & (folds.split == split), metric].dropna().to_numpy()
                for e in experiments
            ]
            positions = list(range(1, len(experiments) + 1))
            ax.boxplot(data, positions=positions, orientation="horizontal", showmeans=True)
            ax.set_yticks(positions, experiments if j == 0 else [""] * len(experiments))
            if chance is not None and metric == "top1":
                ax.axvline(chance, color="grey", linestyle=":", label="chance")
            ax.set_title(f"{split} {METRIC_NAMES[metric]}")
            ax.set_xlim(0, 1)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Cross-validation folds per configuration")
    _save(fig, path)


def confusion_figure(y_true, y_pred, classes, path, title="Confusion matrix"):
    from ..metrics import confusion

    n = len(classes)
    cm = confusion(y_true, y_pred, n)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * n, 0.8 + 0.7 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("annotated")
    ax.set_title(title)
    _save(fig, path)
    return cm
