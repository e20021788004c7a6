"""Paper-shaped result tables from the per-fold metric files (seed 000, Tables A.5-A.7 shape)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = ("top1", "top2", "adj1", "adj1_dyn")
METRIC_NAMES = {"top1": "Top-1", "top2": "Top-2", "adj1": "Adj-1", "adj1_dyn": "Adj-1 Dyn"}
SPLITS = ("val", "test")
FILE_KEYS = ("metrics", "predictions", "embeddings")  # per-fold file lists of an experiment, not settings


def fold_table(experiments: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per (experiment, fold, split) with the four metrics and the configuration columns.

    ``experiments[name]`` holds the configuration (scan, background, backbone, init, distance, ...)
    and ``"metrics"``: the fold metric files of that configuration (``"predictions"`` and
    ``"embeddings"``, the fold's other files, are not settings either). The fold number is read from
    each file's ``"fold"`` field; names are taken as given, never parsed out of paths.
    """
    rows = []
    for experiment, spec in experiments.items():
        settings = {k: v for k, v in spec.items() if k not in FILE_KEYS}
        for p in spec["metrics"]:
            data = json.loads(Path(p).read_text())
            if "fold" not in data:
                raise ValueError(f"{p}: no 'fold' field (not a fine-tuning metrics.json?)")
            for split in SPLITS:
                if split not in data:
                    raise ValueError(f"{p}: no '{split}' metrics")
                row = {"experiment": experiment, "fold": int(data["fold"]), "split": split, **settings}
                row.update({m: float(np.nan if data[split].get(m) is None else data[split][m]) for m in METRICS})
                row["n"] = data[split].get("n")
                rows.append(row)
    return pd.DataFrame(rows)


def summary_table(folds: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over folds: one row per experiment, columns ``{split}_{metric}_{mean|std}``."""
    config_cols = [c for c in folds.columns if c not in {"fold", "split", "n", *METRICS}]
    agg = folds.groupby(["experiment", "split"])[list(METRICS)].agg(["mean", "std"])
    wide = agg.unstack("split")
    wide.columns = [f"{split}_{metric}_{stat}" for metric, stat, split in wide.columns]
    config = folds[config_cols].drop_duplicates("experiment").set_index("experiment")
    ordered = [f"{s}_{m}_{st}" for s in SPLITS for m in METRICS for st in ("mean", "std")]
    out = config.join(wide[ordered])
    out.insert(0, "n_folds", folds.groupby("experiment")["fold"].nunique())
    return out.reset_index()


def best_experiment(summary: pd.DataFrame, metric: str = "top1", split: str = "val") -> str:
    """The configuration with the best mean ``metric`` on ``split`` (ties: first in order)."""
    col = f"{split}_{metric}_mean"
    return str(summary.loc[summary[col].idxmax(), "experiment"])


def mean_std_cell(row, split: str, metric: str) -> str:
    """"mean ± std" in % of a summary row's ``{split}_{metric}``; "–" where undefined."""
    mean, std = row[f"{split}_{metric}_mean"], row[f"{split}_{metric}_std"]
    return "–" if pd.isna(mean) else f"{100 * mean:.1f} ± {100 * (0 if pd.isna(std) else std):.1f}"


def markdown_table(summary: pd.DataFrame, *, best: str | None = None, columns=("init", "recipe", "loss")) -> str:
    """Percentages as "mean ± std", validation then test, like the paper's appendix tables; the
    configuration's ``columns`` (those present; default init, recipe and loss, so baseline and
    pretrained recipes, and the losses, read side by side) follow its name."""
    shown = [c for c in columns if c in summary.columns]
    head = ["Configuration", *shown] + [f"{s} {METRIC_NAMES[m]}" for s in SPLITS for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in summary.iterrows():
        name = row["experiment"] + (" **(best)**" if row["experiment"] == best else "")
        cells = [name, *[str(row[c]) for c in shown]]
        for s in SPLITS:
            for m in METRICS:
                cells.append(mean_std_cell(row, s, m))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
