"""Figures for the report, in the main paper's shapes (seed 000):

* Fig. 4 (:func:`fig4_boxplots`): baseline Top-1 Acc per backbone and scan (a: val, b: test; with
  background, with and without distance pooled) and with vs without background (c: val, d: test;
  ResNets only);
* Fig. 5 (:func:`umap_figure`): test-set UMAP coloured by class and by staining intensity;
* Fig. 6 (:func:`fig6_boxplots`): influence of distance information on val (a) and test (b) Top-1
  Acc per scan and pretraining type ("SSL represents the combined results of SimCLR, DINO and
  MAE"), with background only;
* Fig. 7 (:func:`metric_boxplots`): val (a-c) and test (d-f) Top-1, Adjacent-1 and Adjacent-1
  Dynamic Acc of all cross-validation models for every configuration with background;
* confusion matrices (:func:`confusion_figure`, :func:`confusion_grid`).

PNGs are written small (100 dpi, 256-colour palette, optimised) so the HTML report stays small.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..utils import atomic_path  # noqa: E402
from .tables import METRIC_NAMES  # noqa: E402

DPI = 100


MAX_SIDE = 2000  # px, longest side of a written figure


def _save(fig, path):
    """PNG: drawn at ``DPI``, longest side capped at ``MAX_SIDE``, 256-colour palette, optimised
    (:func:`cellstage.utils.save_capped_png`); any other suffix: matplotlib's own writer."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    if fmt == "png":
        import io

        from PIL import Image

        from ..utils import save_capped_png

        buf = io.BytesIO()
        fig.savefig(buf, dpi=DPI, bbox_inches="tight", format="png")
        save_capped_png(np.asarray(Image.open(buf).convert("RGB")), path, max_side=MAX_SIDE, colors=256)
    else:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=fmt)
    plt.close(fig)


def _empty(ax, text="no configuration of this kind in the grid"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def grouped_boxplot(ax, data: pd.DataFrame, *, group: str, hue: str, metric: str, title: str = "",
                    hue_order=None, group_order=None) -> None:
    """Boxes of ``metric`` (one per fold row of ``data``) per ``group`` value on the x axis, one
    coloured box per ``hue`` value inside each group; a legend names the hues."""
    data = data.dropna(subset=[metric])
    if data.empty:
        _empty(ax)
        ax.set_title(title)
        return
    groups = list(group_order or dict.fromkeys(data[group]))
    hues = list(hue_order or dict.fromkeys(data[hue]))
    width = 0.8 / max(len(hues), 1)
    colors = plt.get_cmap("tab10")
    for h, hv in enumerate(hues):
        pos, vals = [], []
        for g, gv in enumerate(groups):
            v = data.loc[(data[group] == gv) & (data[hue] == hv), metric].to_numpy()
            if len(v):
                pos.append(g + (h - (len(hues) - 1) / 2) * width)
                vals.append(v)
        if not vals:
            continue
        bp = ax.boxplot(vals, positions=pos, widths=width * 0.9, patch_artist=True, showmeans=True,
                        manage_ticks=False)
        for box in bp["boxes"]:
            box.set_facecolor(colors(h % 10))
            box.set_alpha(0.7)
        ax.plot([], [], "s", color=colors(h % 10), label=str(hv))
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, title=hue, title_fontsize=7)


def _with(df: pd.DataFrame, **cols) -> pd.DataFrame:
    out = df.copy()
    for name, fn in cols.items():
        out[name] = fn(out) if len(out) else pd.Series(dtype=object)
    return out


def fig4_boxplots(folds: pd.DataFrame, path, baseline_inits=("scratch", "imagenet")) -> None:
    """Seed 000 Fig. 4: Top-1 Acc of the baseline inits (a, b: with background, per backbone, one
    box per scan × init; c, d: ResNets only, per scan × init, with vs without background)."""
    base = folds[folds["init"].isin(baseline_inits)]
    base = _with(base, setting=lambda d: d["scan"].astype(str) + " " + d["init"].astype(str),
                 bg=lambda d: d["background"].map({True: "with background", False: "without background"}))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    with_bg = base[base["background"].astype(bool)] if len(base) else base
    resnets = base[base["backbone"].astype(str).str.startswith("resnet")] if len(base) else base
    for j, split in enumerate(("val", "test")):
        grouped_boxplot(axes[0][j], with_bg[with_bg["split"] == split], group="backbone", hue="setting",
                        metric="top1", title=f"({'ab'[j]}) {split} Top-1, with background")
        grouped_boxplot(axes[1][j], resnets[resnets["split"] == split], group="setting", hue="bg", metric="top1",
                        title=f"({'cd'[j]}) {split} Top-1, ResNets: with / without background")
    fig.suptitle("Baseline: backbones, scan settings and background (seed 000 Fig. 4 shape)")
    fig.tight_layout()
    _save(fig, path)


def fig6_boxplots(folds: pd.DataFrame, path, baseline_inits=("scratch", "imagenet")) -> None:
    """Seed 000 Fig. 6: Top-1 Acc with vs without distance per scan and pretraining type (scratch,
    ImageNet, SSL = every self-supervised init pooled), with background only."""
    bg = folds[folds["background"].astype(bool)] if len(folds) else folds
    bg = _with(bg, pretraining=lambda d: d["scan"].astype(str) + " "
               + d["init"].where(d["init"].isin(baseline_inits), "SSL").astype(str),
               dist=lambda d: d["distance"].map({True: "with distance", False: "without distance"}))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), squeeze=False)
    for j, split in enumerate(("val", "test")):
        grouped_boxplot(axes[0][j], bg[bg["split"] == split], group="pretraining", hue="dist", metric="top1",
                        title=f"({'ab'[j]}) {split} Top-1", hue_order=["without distance", "with distance"])
    fig.suptitle("Influence of distance information (seed 000 Fig. 6 shape; with background)")
    fig.tight_layout()
    _save(fig, path)


def metric_boxplots(folds: pd.DataFrame, path, metrics=("top1", "adj1", "adj1_dyn"), chance: float | None = None,
                    background_only: bool = True):
    """Seed 000 Fig. 7: one panel per (split, metric); one box per configuration over its folds
    (configurations with background only, unless ``background_only`` is False or none has one)."""
    if background_only and "background" in folds and folds["background"].astype(bool).any():
        folds = folds[folds["background"].astype(bool)]
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
    fig.suptitle("Cross-validation folds per configuration (seed 000 Fig. 7 shape)")
    _save(fig, path)


def _confusion_axes(ax, cm, classes, title):
    n = len(classes)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
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
    ax.set_title(title, fontsize=9)


def confusion_figure(y_true, y_pred, classes, path, title="Confusion matrix"):
    from ..metrics import confusion

    n = len(classes)
    cm = confusion(y_true, y_pred, n)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * n, 0.8 + 0.7 * n))
    _confusion_axes(ax, cm, classes, title)
    _save(fig, path)
    return cm


def confusion_grid(panels, classes, path) -> None:
    """One confusion matrix per ``(title, cm)`` panel side by side (e.g. the best configuration of
    every scan)."""
    n = len(classes)
    k = max(len(panels), 1)
    fig, axes = plt.subplots(1, k, figsize=(k * (1 + 0.7 * n), 0.8 + 0.7 * n), squeeze=False)
    for ax, (title, cm) in zip(axes[0], panels):
        _confusion_axes(ax, np.asarray(cm), classes, title)
    if not panels:
        _empty(axes[0][0], "no test predictions")
    fig.tight_layout()
    _save(fig, path)


def umap_figure(panels, classes, path) -> None:
    """Seed 000 Fig. 5 shape: one row per ``(title, data)`` panel (data from
    :func:`cellstage.report.embedding.panel_data`), the test-set UMAP coloured by class (left) and
    by staining intensity, mean nucleus optical density (right)."""
    k = max(len(panels), 1)
    fig, axes = plt.subplots(k, 2, figsize=(11, 4.2 * k), squeeze=False)
    colors = plt.get_cmap("tab10")
    for (title, d), (ax_c, ax_i) in zip(panels, axes):
        xy = np.asarray(d["xy"]).reshape(-1, 2)
        labels = np.asarray(d["label"], dtype=object)
        for c, name in enumerate(classes):
            sel = labels == name
            if sel.any():
                ax_c.scatter(xy[sel, 0], xy[sel, 1], s=4, color=colors(c % 10), label=name, rasterized=True)
        ax_c.set_title(f"{title}: class", fontsize=9)
        ax_c.legend(fontsize=7, markerscale=3, loc="best")
        sc = ax_i.scatter(xy[:, 0], xy[:, 1], s=4, c=d["intensity"], cmap="viridis", rasterized=True)
        fig.colorbar(sc, ax=ax_i, label="mean optical density (nucleus)")
        ax_i.set_title(f"{title}: staining intensity", fontsize=9)
        for ax in (ax_c, ax_i):
            ax.set_xticks([])
            ax.set_yticks([])
    if not panels:
        _empty(axes[0][0], "no test embeddings")
        _empty(axes[0][1], "")
    fig.suptitle("Test-set UMAP of the fine-tuned embeddings (seed 000 Fig. 5 shape)")
    fig.tight_layout()
    _save(fig, path)
