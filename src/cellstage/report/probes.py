"""Table of the frozen-backbone probes of every pretraining run (issue 12 item 7).

One row per pretraining run (``results/pretrain/{method}/{backbone}/{scan}/probe.json``, written by
:mod:`cellstage.ssl.probe`): kNN and linear-probe Top-1 and Adjacent-1 (seed 000 §3.2) of the
pretrained backbone, mean ± std over the grouped folds of the labelled train cells, beside the same
probes on a random-init backbone of the same architecture and seed, so the gain of pretraining is
read off before any fine-tuning.

CSV values are fractions in [0, 1] (like ``cv_results.csv``), with ``_std`` columns; the Markdown
shows percent with one decimal, "mean ± std".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..utils import CellstageError

#: (init in probe.json, column prefix) x (probe, label) x (metric, label)
INITS = (("pretrained", ""), ("random", "random_"))
PROBES = (("knn", "kNN"), ("linear", "linear"))
METRICS = (("top1", "Top-1"), ("adj1", "Adj-1"))
KEY_COLUMNS = ("method", "backbone", "scan", "n_cells", "n_folds", "group_by")
VALUE_COLUMNS = tuple(
    f"{prefix}{probe}_{metric}" for _, prefix in INITS for probe, _ in PROBES for metric, _ in METRICS
)


def _row(path: Path) -> dict:
    if not path.is_file():
        raise CellstageError(
            f"probe table: {path} does not exist (rule probe writes it beside the run's pretrain.json)"
        )
    try:
        info = json.loads(path.read_text())
        row = {
            "method": info["method"],
            "backbone": info["backbone"],
            "scan": info["scan"],
            "n_cells": int(info["n_cells"]),
            "n_folds": int(info["folds"]["n_folds"]),
            "group_by": info["folds"]["group_by"],
        }
        for init, prefix in INITS:
            for probe, _ in PROBES:
                for metric, _ in METRICS:
                    row[f"{prefix}{probe}_{metric}"] = info[init][probe]["mean"][metric]
                    row[f"{prefix}{probe}_{metric}_std"] = info[init][probe]["std"][metric]
    except (KeyError, TypeError, ValueError) as e:
        raise CellstageError(f"probe table: {path} lacks field {e} (not written by cellstage.ssl.probe?)") from e
    return row


def probe_table(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """One row per ``probe.json`` (sorted by method, backbone, scan): the run's identity, cells, folds,
    and per init (pretrained, ``random_``) x probe (knn, linear) x metric (top1, adj1) the mean
    over folds and its ``_std``."""
    columns = [*KEY_COLUMNS, *[c for v in VALUE_COLUMNS for c in (v, f"{v}_std")]]
    rows = [_row(Path(p)) for p in paths]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["method", "backbone", "scan"], kind="stable").reset_index(drop=True)


def _cell(mean, std) -> str:
    return "–" if mean is None or pd.isna(mean) else f"{100 * mean:.1f} ± {100 * (0 if pd.isna(std) else std):.1f}"


def probe_markdown(table: pd.DataFrame, *, header: str = "") -> str:
    """The table in percent ("mean ± std"), pretrained then random init, with a heading and a note."""
    labels = [
        f"{'random ' if prefix else ''}{plabel} {mlabel}"
        for _, prefix in INITS
        for _, plabel in PROBES
        for _, mlabel in METRICS
    ]
    lines = [
        "# Frozen-backbone probes of the pretraining runs",
        "",
        header,
        "kNN (cosine) and linear-probe (logistic regression on standardised features) accuracy on the labelled "
        "cells of the train slides, mean ± std in % over grouped folds; *random* = the same probes on a "
        "random-init backbone of the same architecture and seed. No fine-tuning.",
        "",
    ]
    if table.empty:
        return "\n".join([*lines, "No pretraining runs in this configuration.", ""])
    head = ["method", "backbone", "scan", "cells", "folds", *labels]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, row in table.iterrows():
        cells = [str(row["method"]), str(row["backbone"]), str(row["scan"]), str(row["n_cells"]), str(row["n_folds"])]
        cells += [_cell(row[v], row[f"{v}_std"]) for v in VALUE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])
