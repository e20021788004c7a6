"""Ordinal-aware against plain training, on the same folds (issue 14 item 4; beyond seed 000).

One row per (configuration, loss) for every configuration trained with more than one loss
(config ``finetune.grid.loss``): validation and test Top-1, Adjacent-1 and Adjacent-1 Dynamic as
mean ± std over folds, and the difference of the means to the configuration's ``ce`` row in
percentage points. Every loss of a configuration sees the same folds (they depend on the cells
only: :func:`cellstage.training.folds.make_folds`), so the differences compare like with like.
The paper tables (Table A.5-A.7 shapes) keep the paper's cross-entropy rows only.
"""

from __future__ import annotations

import pandas as pd

from .tables import METRIC_NAMES, SPLITS, mean_std_cell

__all__ = ["LOSS_METRICS", "loss_markdown", "loss_table"]

LOSS_METRICS = ("top1", "adj1", "adj1_dyn")
CONFIG_KEYS = ("scan", "background", "backbone", "init", "distance")


def loss_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows of :func:`~cellstage.report.tables.summary_table` whose configuration was trained with
    several losses, ``ce`` first, each with ``d_{split}_{metric}`` = its mean minus the ``ce`` mean
    (NaN without a ``ce`` row)."""
    keys = [k for k in CONFIG_KEYS if k in summary.columns]
    deltas = [f"d_{s}_{m}" for s in SPLITS for m in LOSS_METRICS]
    if "loss" not in summary.columns or summary.empty:
        return pd.DataFrame(columns=[*keys, "loss", "experiment", "n_folds", *deltas])
    groups = []
    for _, g in summary.groupby(keys, sort=False, dropna=False):
        if g["loss"].nunique() < 2:
            continue
        g = g.assign(_order=g["loss"].ne("ce")).sort_values(["_order", "loss"], kind="stable").drop(columns="_order")
        ce = g[g["loss"] == "ce"]
        for s in SPLITS:
            for m in LOSS_METRICS:
                col = f"{s}_{m}_mean"
                g[f"d_{s}_{m}"] = g[col] - (ce[col].iloc[0] if len(ce) else float("nan"))
        groups.append(g)
    if not groups:
        return pd.DataFrame(columns=[*keys, "loss", "experiment", "n_folds", *deltas])
    out = pd.concat(groups, ignore_index=True)
    return out[[*keys, "loss", *[c for c in out.columns if c not in (*keys, "loss")]]]


def _delta(value) -> str:
    return "" if pd.isna(value) else f" ({100 * value:+.1f})"


def loss_markdown(table: pd.DataFrame, *, header: str = "") -> str:
    """Markdown: configuration, loss, folds, then val and test Top-1 / Adj-1 / Adj-1 Dyn as
    "mean ± std (difference to ce)" in %."""
    head = ["Configuration", "Loss", "folds"] + [f"{s} {METRIC_NAMES[m]}" for s in SPLITS for m in LOSS_METRICS]
    lines = ["# Ordinal-aware training against cross-entropy (same folds)", "", header,
             "Mean ± std over folds in %; in brackets the difference of the means to the `ce` row in "
             "percentage points. Losses: src/cellstage/train/losses.py (config finetune.grid.loss).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if table.empty:
        lines.append("| " + " | ".join(["–"] * len(head)) + " |")
        lines += ["", "_No configuration is trained with more than one loss (config finetune.grid.loss)._"]
        return "\n".join(lines) + "\n"
    for _, row in table.iterrows():
        name = str(row["experiment"]).removesuffix(f"-{row['loss']}")
        cells = [name, str(row["loss"]), str(int(row["n_folds"]))]
        for s in SPLITS:
            for m in LOSS_METRICS:
                delta = "" if row["loss"] == "ce" else _delta(row[f"d_{s}_{m}"])
                cells.append(mean_std_cell(row, s, m) + delta)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
