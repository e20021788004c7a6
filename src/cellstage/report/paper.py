"""The main paper's table shapes (seed 000): Table 1 and appendix Tables A.5, A.6, A.7.

* Table 1 ("Overview of our datasets", §3.1): cells per class in the train/val, test and
  unlabelled datasets (paper: 5,200 / 1,151 / 503,189 cells) — here per scan, counted from the
  crop indexes (results/crops/{slide}.parquet: one row per crop, ``split`` of its slide,
  ``label_idx`` -1 for a crop without label).
* Tables A.5 and A.6 (§4.2: "All aggregated Top-1 Acc, Top-2 Acc, Adjacent-1 Acc and Adjacent-1
  Dynamic Acc values for validation and test set are presented in detail in Tables A.5 (from
  scratch) and A.6 (ImageNet)"): the baseline recipe's configurations — scan × background ×
  distance × backbone — mean ± std over the 5 folds, validation then test.
* Table A.7 (§4.3 "Fine-Tuning ... focuses solely on images with background"; "The training
  results are displayed in Table A.7"): every configuration with background, self-supervised
  (pretrained recipe) and baseline initialisations side by side per scan × backbone × distance,
  with the ``recipe`` column saying which recipe trained each row.

All three keep the configurations trained with the paper's cross-entropy (``loss`` ``ce``); the
ordinal-aware losses are compared in :mod:`cellstage.report.losses`.

The appendix tables themselves are not in the text we have (ARCHITECTURE.md, "Reading the
papers"); their shapes follow the sentences above.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .tables import METRIC_NAMES, METRICS, SPLITS, mean_std_cell

__all__ = ["BASELINE_INITS", "PAPER_TABLES", "dataset_markdown", "dataset_table", "paper_markdown", "paper_table"]

BASELINE_INITS = ("scratch", "imagenet")  # seed 000 §4.2; every other init is a self-supervised method (§4.3)
SPLIT_NAMES = {"train": "train/val", "test": "test", "unlabelled": "unlabelled"}

# name -> (title, row filter, key columns in sort order)
PAPER_TABLES = {
    "A5": ("Table A.5 shape: trained from scratch (baseline recipe, seed 000 §4.2)",
           lambda s: s["init"] == "scratch", ["scan", "background", "distance", "backbone", "init", "recipe"]),
    "A6": ("Table A.6 shape: initialised with ImageNet weights (baseline recipe, seed 000 §4.2)",
           lambda s: s["init"] == "imagenet", ["scan", "background", "distance", "backbone", "init", "recipe"]),
    "A7": ("Table A.7 shape: fine-tuning with background, self-supervised (pretrained recipe, §4.3) and "
           "baseline initialisations side by side",
           lambda s: s["background"].astype(bool), ["scan", "backbone", "distance", "recipe", "init"]),
}


def dataset_table(indexes: Sequence[pd.DataFrame], classes: Sequence[str]) -> pd.DataFrame:
    """Table 1 shape: one row per (scan, split) with the number of labelled crops per class (config
    class order), ``all labelled`` and ``unlabelled`` (crops without a label on those slides).

    ``indexes``: crop index tables (columns ``scan``, ``split``, ``label_idx``).
    """
    classes = list(classes)
    frames = [t[["scan", "split", "label_idx"]] for t in indexes if len(t)]
    cols = ["scan", "split", *classes, "all labelled", "unlabelled"]
    if not frames:
        return pd.DataFrame(columns=cols)
    crops = pd.concat(frames, ignore_index=True)
    bad = crops.loc[crops["label_idx"] >= len(classes), "label_idx"]
    if len(bad):
        raise ValueError(f"crop index has label_idx {int(bad.max())} but config 'classes' has {len(classes)} classes")
    rows = []
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    for (scan, split), g in sorted(crops.groupby(["scan", "split"]), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9))):
        labelled = g.loc[g["label_idx"] >= 0, "label_idx"].value_counts()
        row = {"scan": scan, "split": SPLIT_NAMES.get(split, split)}
        row.update({c: int(labelled.get(i, 0)) for i, c in enumerate(classes)})
        row["all labelled"] = int(labelled.sum())
        row["unlabelled"] = int((g["label_idx"] < 0).sum())
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def paper_table(summary: pd.DataFrame, which: str) -> pd.DataFrame:
    """The rows of :func:`~cellstage.report.tables.summary_table` that belong in appendix table
    ``which`` ("A5", "A6", "A7"), sorted by that table's key columns (key columns first)."""
    if which not in PAPER_TABLES:
        raise ValueError(f"paper table {which!r}: expected one of {sorted(PAPER_TABLES)}")
    _, select, keys = PAPER_TABLES[which]
    missing = [k for k in keys if k not in summary.columns]
    if missing:
        raise ValueError(f"summary table has no column(s) {missing} (needed for Table {which})")
    if summary.empty:
        return summary.reindex(columns=[*keys, *[c for c in summary.columns if c not in keys]])
    rows = summary[select(summary)].copy()
    if "loss" in rows.columns:  # the paper trains with cross-entropy; other losses: report.losses
        rows = rows[rows["loss"] == "ce"]
    if which == "A7":  # baseline rows first within a (scan, backbone, distance) block
        rows["_baseline_first"] = ~rows["init"].isin(BASELINE_INITS)
        rows = rows.sort_values([*keys[:3], "_baseline_first", *keys[3:]], kind="stable")
        rows = rows.drop(columns="_baseline_first")
    else:
        rows = rows.sort_values(keys, kind="stable")
    return rows[[*keys, *[c for c in rows.columns if c not in keys]]].reset_index(drop=True)


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def paper_markdown(table: pd.DataFrame, keys: Sequence[str], *, title: str, best: str | None = None,
                   header: str = "") -> str:
    """Markdown of a paper table: key columns, then val and test Top-1, Top-2, Adj-1, Adj-1 Dyn as
    "mean ± std" in %, like the paper's appendix tables. ``header``: the provenance block."""
    head = [k.capitalize() for k in keys] + ["folds"] + [f"{s} {METRIC_NAMES[m]}" for s in SPLITS for m in METRICS]
    lines = [f"# {title}", "", header, "Mean ± std over folds, in %.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if table.empty:
        lines.append("| " + " | ".join(["–"] * len(head)) + " |")
        lines += ["", "_No configuration of this kind in the config's finetune.grid._"]
        return "\n".join(lines) + "\n"
    for _, row in table.iterrows():
        cells = [_fmt(row[k]) for k in keys]
        if best is not None and row.get("experiment") == best:
            cells[0] += " **(best)**"
        cells.append(str(int(row["n_folds"])))
        for s in SPLITS:
            for m in METRICS:
                cells.append(mean_std_cell(row, s, m))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dataset_markdown(table: pd.DataFrame, *, header: str = "") -> str:
    """Markdown of Table 1 (cells per class and split, per scan)."""
    body = table.to_markdown(index=False) if len(table) else "_No crops._"
    return "\n".join(["# Table 1 shape: cells per class and split (seed 000 §3.1)", "", header,
                      "Labelled crops per class (config class order); `unlabelled`: crops without a label on "
                      "the slides of that split.", "", body, ""])
