"""Seed 003 Tables 3–8 from the ``metrics.json`` of many MIL fold runs.

Seed 003 Tables 3–8: "Results of the 5-fold cross-validation of the Level <X> dataset
<without/with> background for the <task> label": one row per fold (0–4), per model
(ResNet18, modified ResNet18, modified ResNet18 Attention based, InceptionV3; Table 3 ResNet18
without and with background) the columns Training Loss, Training Acc., Validation Loss,
Validation Acc. A fold that was not run shows "-" (Table 8, InceptionV3 fold 2).

:func:`cv_tables` returns one DataFrame per (task, level, background): index fold 0..n-1 then
``mean`` and ``std`` (sample std over the folds present); columns a MultiIndex (model,
split ∈ {Training, Validation}, metric ∈ {Loss, Acc.}). :func:`write_tables` writes each as CSV
and all as one markdown file (mean ± std in the last row).

:func:`out_of_fold_summary` (not in seed 003) pools every fold's validation slides of one model:
with 5 folds of a few slides each, a fold's accuracy moves in steps of 1/4 on the smear demo, and
the mean of such steps says little. The pooled table gives, per (task, level, background, model),
the out-of-fold slide accuracy and the slide-level ROC AUC (binary tasks: P(second class), e.g.
P(mut) for classes ``[wt, mut]``; three classes: one-vs-rest, macro), which is free of the 0.5 cut.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import CellstageError, atomic_path

COLUMNS = (("Training", "Loss", "train_loss"), ("Training", "Acc.", "train_acc"),
           ("Validation", "Loss", "val_loss"), ("Validation", "Acc.", "val_acc"))
MODEL_ORDER = ("ResNet18", "ResNet50", "modified ResNet18", "modified ResNet18 Attention based", "InceptionV3")


def _read(path) -> dict:
    try:
        m = json.loads(Path(path).read_text())
        c = m["config"]
        return {"task": c["task"], "level": c["level"], "background": bool(c["background"]), "model": c["model"],
                "fold": int(c["fold"]), **{k: float(m["final"][k]) for _, _, k in COLUMNS}}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CellstageError(f"{path}: not a MIL metrics.json with config and final values ({e!r})") from None


def cv_tables(metrics_paths: Iterable[str | os.PathLike], n_folds: int) -> dict[tuple[str, str, bool], pd.DataFrame]:
    """{(task, level, background): table} (module docstring)."""
    rows = [_read(p) for p in metrics_paths]
    if not rows:
        return {}
    df = pd.DataFrame(rows)
    dup = df.duplicated(["task", "level", "background", "model", "fold"])
    if dup.any():
        raise CellstageError(f"MIL tables: the same run appears twice: {df[dup].iloc[0].to_dict()}")
    out = {}
    for (task, level, bg), part in df.groupby(["task", "level", "background"], sort=True):
        models = sorted(part["model"].unique(), key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else 99, m))
        cols = pd.MultiIndex.from_tuples([(m, s, n) for m in models for s, n, _ in COLUMNS],
                                         names=["model", "split", "metric"])
        table = pd.DataFrame(np.nan, index=pd.Index(range(n_folds), name="fold", dtype=object), columns=cols)
        for r in part.itertuples():
            for s, n, k in COLUMNS:
                table.loc[r.fold, (r.model, s, n)] = getattr(r, k)
        folds = table.copy()
        table.loc["mean"] = folds.mean(axis=0)
        table.loc["std"] = folds.std(axis=0, ddof=1)
        out[(str(task), str(level), bool(bg))] = table
    return out


def out_of_fold_summary(metrics_paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per (task, level, background, model): ``folds``, ``slides`` (validation slides
    over all folds), ``accuracy`` and ``auc`` of the pooled out-of-fold slide predictions (module
    docstring; ``auc`` is NaN when a class is missing)."""
    from sklearn.metrics import roc_auc_score

    rows = []
    for p in metrics_paths:
        try:
            m = json.loads(Path(p).read_text())
            c = m["config"]
            for r in m["val_predictions"]:
                rows.append({"task": c["task"], "level": c["level"], "background": bool(c["background"]),
                             "model": c["model"], "fold": int(c["fold"]), "classes": tuple(c["classes"]),
                             "label": r["label"], "pred": r["pred"],
                             **{f"p_{k}": float(r[f"p_{k}"]) for k in c["classes"]}})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CellstageError(f"{p}: not a MIL metrics.json with config and val_predictions ({e!r})") from None
    cols = ["task", "level", "background", "model", "folds", "slides", "accuracy", "auc"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    out = []
    for (task, level, bg, model), part in df.groupby(["task", "level", "background", "model"], sort=True):
        classes = list(part["classes"].iloc[0])
        y = part["label"].to_numpy()
        auc = float("nan")
        if set(classes) <= set(y):
            prob = part[[f"p_{k}" for k in classes]].to_numpy()
            if len(classes) == 2:
                auc = float(roc_auc_score(y == classes[1], prob[:, 1]))
            else:
                auc = float(roc_auc_score(y, prob / prob.sum(1, keepdims=True), multi_class="ovr",
                                          labels=classes))
        out.append({"task": task, "level": level, "background": bool(bg), "model": model,
                    "folds": int(part["fold"].nunique()), "slides": len(part),
                    "accuracy": float((part["pred"] == part["label"]).mean()), "auc": auc})
    order = {lv: i for i, lv in enumerate(("one", "two", "three"))}
    res = pd.DataFrame(out, columns=cols)
    return res.sort_values(["task", "level", "background", "model"],
                           key=lambda c: c.map(order) if c.name == "level" else c).reset_index(drop=True)


def out_of_fold_markdown(summary: pd.DataFrame) -> str:
    if summary.empty:
        return ""
    lines = ["**Out-of-fold slide predictions (not in seed 003): every fold's validation slides pooled**", "",
             "| task | level | background | model | folds | slides | accuracy | AUC |", "|---" * 8 + "|"]
    for r in summary.itertuples():
        auc = "-" if pd.isna(r.auc) else f"{r.auc:.3f}"
        lines.append(f"| {r.task} | {r.level} | {'with' if r.background else 'without'} | {r.model} | {r.folds} | "
                     f"{r.slides} | {r.accuracy:.3f} | {auc} |")
    return "\n".join(lines) + "\n"


def caption(task: str, level: str, background: bool) -> str:
    return (f"Results of the 5-fold cross-validation of the Level {level.capitalize()} dataset "
            f"{'with' if background else 'without'} background for the {task} label.")


def to_markdown(table: pd.DataFrame, title: str) -> str:
    """A markdown table; "-" where a fold was not run; last row ``mean ± std``."""
    heads = [f"{m} {s} {n}" for m, s, n in table.columns]
    lines = [f"**{title}**", "", "| fold | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for idx in table.index:
        if idx in ("mean", "std"):
            continue
        vals = ["-" if pd.isna(v) else f"{v:.3f}" for v in table.loc[idx]]
        lines.append(f"| {idx} | " + " | ".join(vals) + " |")
    ms = ["-" if pd.isna(m) else (f"{m:.3f} ± {s:.3f}" if not pd.isna(s) else f"{m:.3f}")
          for m, s in zip(table.loc["mean"], table.loc["std"])]
    lines.append("| mean ± std | " + " | ".join(ms) + " |")
    return "\n".join(lines) + "\n"


def write_tables(tables: dict, out_dir: str | os.PathLike) -> list[Path]:
    """``<task>_level<level>_<bg|nobg>.csv`` per table and ``tables.md`` with all of them."""
    out_dir = Path(out_dir)
    written, md = [], []
    for (task, level, bg), table in sorted(tables.items()):
        path = out_dir / f"{task}_level{level}_{'bg' if bg else 'nobg'}.csv"
        with atomic_path(path) as tmp:
            table.to_csv(tmp)
        written.append(path)
        md.append(to_markdown(table, caption(task, level, bg)))
    path = out_dir / "tables.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(md))
    written.append(path)
    return written
