"""Stage entry point: the cross-validation tables and figures, per-stage counts and QuPath export.

Reads the fold metrics and predictions, the per-slide stage outputs and the converted slides'
pixel sizes; calls :mod:`cellstage.report.tables`, :mod:`.figures`, :mod:`.stages` and
:mod:`.ensemble`; writes every output atomically. ``experiments`` comes from the workflow
(name -> configuration + its fold metric files): nothing is parsed back out of paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..io.slides import ZarrSlide
from ..utils import atomic_path, provenance, write_json
from .ensemble import export_qupath, fold_ensemble
from .figures import confusion_figure, metric_boxplots
from .stages import stage_table
from .tables import METRICS, best_experiment, fold_table, markdown_table, summary_table

log = logging.getLogger("cellstage.report")


def _as_list(x) -> list:
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)


def report(inputs: Mapping, outputs: Mapping, *, experiments: Mapping[str, Mapping], classes: Sequence[str],
           metric: str, config: Mapping, min_points_on_nuclei: float | None = None) -> dict:
    """Paper-shaped tables, figures, per-stage counts and QuPath GeoJSON of the classified test cells.

    The best configuration is chosen by its mean validation ``metric`` over folds; its fold models'
    test probabilities are averaged per cell (fold ensemble) for the confusion matrix and the
    GeoJSON. ``config`` is recorded as provenance only. Slides whose share of annotated points on a
    segmented nucleus is below ``min_points_on_nuclei`` are flagged in the stage table and warned
    about in the log and the Markdown, with advice.
    """
    classes = list(classes)
    folds = fold_table(experiments)
    summary = summary_table(folds)
    best = best_experiment(summary, metric=metric, split="val")

    with atomic_path(outputs["folds"]) as tmp:
        folds.to_csv(tmp, index=False)
    with atomic_path(outputs["csv"]) as tmp:
        summary.to_csv(tmp, index=False)
    chance = 1.0 / len(classes)
    metric_boxplots(folds, outputs["boxplot"], chance=chance)

    ensemble = fold_ensemble([Path(p).with_name("predictions.parquet") for p in experiments[best]["metrics"]])
    cm = confusion_figure(ensemble["label_idx"], ensemble["pred"], classes, outputs["confusion"],
                          title=f"{best}: test, fold ensemble")

    stages = stage_table(inputs, min_points_on_nuclei=min_points_on_nuclei)
    qc = stages.get("segmentation_qc", pd.Series(dtype=object))
    qc_warnings = [f"{slide}: {msg}" for slide, msg in zip(stages["slide"], qc)
                   if isinstance(msg, str) and msg not in ("", "ok")]
    for w in qc_warnings:
        log.warning("segmentation QC %s", w)
    with atomic_path(outputs["stages"]) as tmp:
        stages.to_csv(tmp, index=False)

    slides = {Path(p).name.removesuffix(".ome.zarr"): p for p in _as_list(inputs["slides"])}
    cell_tables = {Path(p).stem: p for p in _as_list(inputs["cells"])}
    needed = set(ensemble["slide"].astype(str))
    export_qupath(ensemble, cell_tables, {s: ZarrSlide(slides[s]).mpp for s in needed}, classes, outputs["geojson"])

    best_row = summary.set_index("experiment").loc[best]
    result = {
        "best_experiment": best,
        "selected_by": f"val {metric}",
        "chance_top1": chance,
        "test": {m: float(best_row[f"test_{m}_mean"]) for m in METRICS},
        "val": {m: float(best_row[f"val_{m}_mean"]) for m in METRICS},
        "test_ensemble_top1": float((ensemble["pred"] == ensemble["label_idx"]).mean()) if len(ensemble) else None,
        "confusion_test_ensemble": cm.tolist(),
        "n_configurations": int(len(summary)),
        "n_folds": int(folds["fold"].nunique()),
        "provenance": provenance(dict(config)),
    }
    md = [
        "# Cross-validation results",
        "",
        f"{result['n_configurations']} configurations x {result['n_folds']} folds; mean ± std over folds in %. "
        f"Best configuration by validation {metric}: **{best}** (chance Top-1 = {100 * chance:.1f} %).",
        "",
        markdown_table(summary, best=best),
        "## Pipeline stages",
        "",
        stages.to_markdown(index=False),
        "",
        *([f"**Segmentation QC warning** - {w}" for w in qc_warnings] + [""] if qc_warnings else []),
    ]
    with atomic_path(outputs["md"]) as tmp:
        tmp.write_text("\n".join(md))
    write_json(outputs["summary"], result)
    log.info("report: best %s test %s", best, result["test"])
    return result
