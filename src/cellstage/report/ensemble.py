"""Fold ensemble of a configuration's test predictions, and its QuPath GeoJSON export.

Seed 000 evaluates each cross-validation fold's model on the separate test slides; the report
also averages the five fold models' class probabilities per test cell (the "fold ensemble") and
exports those classified cells for QuPath.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..io.annotations import write_cells_geojson
from ..utils import atomic_path


def fold_ensemble(prediction_paths: Sequence[str | Path], split: str = "test") -> pd.DataFrame:
    """Per (slide, cell_id): the fold models' ``prob_<class>`` columns averaged, and ``pred`` (argmax).

    ``prediction_paths``: the ``predictions.parquet`` of every fold of one configuration.
    """
    preds = pd.concat([pd.read_parquet(p) for p in prediction_paths], ignore_index=True)
    rows = preds[preds["split"] == split]
    prob_cols = [c for c in rows.columns if c.startswith("prob_")]
    ensemble = rows.groupby(["slide", "cell_id", "label_idx"], as_index=False)[prob_cols].mean()
    ensemble["pred"] = ensemble[prob_cols].to_numpy().argmax(axis=1)
    return ensemble


def export_qupath(ensemble: pd.DataFrame, cell_tables: Mapping[str, str | Path], mpp: Mapping[str, float],
                  classes: Sequence[str], out_dir: str | Path) -> dict[str, int]:
    """One QuPath GeoJSON per slide of ``ensemble`` (predicted class + probability per cell),
    written as a folder atomically; returns the number of cells written per slide.

    ``cell_tables`` and ``mpp`` map slide id -> cell table parquet and -> µm per pixel (read from
    the converted slide, never guessed).
    """
    prob_cols = [c for c in ensemble.columns if c.startswith("prob_")]
    written = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for slide_id, group in ensemble.groupby("slide"):
            cells_df = pd.read_parquet(cell_tables[slide_id])
            merged = cells_df.merge(group, on="cell_id", how="inner", suffixes=("", "_pred"))
            merged["predicted"] = [classes[i] for i in merged["pred"]]
            merged["probability"] = merged[prob_cols].max(axis=1)
            written[str(slide_id)] = write_cells_geojson(merged, tmp / f"{slide_id}.geojson", mpp=mpp[slide_id],
                                                         label_col="predicted", prob_col="probability")
    return written
