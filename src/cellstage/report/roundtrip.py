"""Annotation round trip: send the most uncertain cells to an expert, merge the labels back.

Seed 003 keeps expert time small by asking for grades only where they are needed (1,506 crops
graded in about 2.5 hours). The same idea for the cell-stage labels:

* :func:`export_uncertain` — the fold ensemble of one fine-tuning configuration
  (:func:`cellstage.report.ensemble.fold_ensemble`: the mean of the fold models' class
  probabilities per cell) ranks each slide's cells by the ensemble's uncertainty (entropy or
  margin, :func:`uncertainty`) and writes the ``n`` most uncertain as QuPath point annotations in
  level-0 pixels of the section's reference slide, classified as the predicted class.
* :func:`import_labels` — the annotated GeoJSON is merged into the slide's points file (sheet
  column ``points``): a point within ``tolerance_px`` of an existing point relabels it, any other
  point is appended; every change is a row of ``<points>.history.csv``. Unchanged labels write
  nothing, so a second import of the same file is a no-op (and Snakemake sees no new input).

Which cells: ``run_fold`` predicts only labelled cells — the validation fold of the train slides
(``split="val"``: each train cell once, by the one fold model that did not train on it) and the
test slides (``split="test"``: every fold model, hence a true fold ensemble). No fold model's
weights are kept, so unlabelled nuclei have no prediction; the exported cells are therefore
labelled cells whose current label the models doubt most — the likeliest label errors
(the demo has 10 % label noise) and the hardest in-between stages. ``split="val"`` sends train
cells (a corrected label changes the training set); the default ``test`` sends test cells.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.annotations import (
    _class_color,
    _rgb,
    class_name,
    load_features,
    read_points,
    write_features,
    write_points_geojson,
)
from ..utils import CellstageError, atomic_path
from .ensemble import fold_ensemble

MEASURES = ("entropy", "margin")
HISTORY_COLUMNS = ["time", "annotator", "source", "feature", "action", "point", "x", "y", "cell_id",
                   "previous_label", "new_label"]


def uncertainty(probs: np.ndarray, measure: str = "entropy") -> np.ndarray:
    """Per row of class probabilities: ``entropy`` (nats, -Σ p log p) or ``margin``
    (1 - (p_best - p_second)); higher = more uncertain for both."""
    p = np.asarray(probs, dtype=float)
    if measure == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    if measure == "margin":
        top2 = -np.sort(-p, axis=1)[:, :2]
        return 1.0 - (top2[:, 0] - (top2[:, 1] if p.shape[1] > 1 else 0.0))
    raise CellstageError(f"uncertainty measure {measure!r}: expected one of {list(MEASURES)}")


def history_path(points_path: str | os.PathLike) -> Path:
    """The history CSV kept next to a points file: ``<points>.history.csv``."""
    p = Path(points_path)
    return p.with_name(p.name + ".history.csv")


def reference_slides(sheet: pd.DataFrame, reference_scan: str) -> dict[str, str]:
    """slide id -> the slide id of its section's reference scan (from a slides.tsv sheet)."""
    ref = sheet[sheet["scan"] == reference_scan].set_index("section")["slide"]
    return {str(s): str(ref[sec]) for s, sec in zip(sheet["slide"], sheet["section"]) if sec in ref.index}


def export_uncertain(prediction_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, n: int,
                     classes: Sequence[str], ref_slide_of: dict[str, str], cells_dir: str | os.PathLike,
                     measure: str = "entropy", split: str = "test") -> dict[str, int]:
    """Write ``out_dir/<reference slide>.geojson`` with each slide's ``n`` most uncertain cells.

    ``prediction_paths``: every fold's ``predictions.parquet`` of one configuration.
    ``ref_slide_of``: slide -> its section's reference slide (:func:`reference_slides`).
    ``cells_dir``: holds ``<ref>.parquet`` (cell table) and ``<ref>.points.csv`` (which point
    labelled which cell) of the reference slides. A cell labelled by a point is written at that
    point's position (so the import relabels that very point); any other at its centroid.
    The points are written *unclassified*: the annotator gives each one a class in QuPath, and
    :func:`import_labels` skips unclassified points, so a point nobody reviewed can never
    overwrite a label with the model's guess. Feature properties: ``predicted`` (the fold
    ensemble's class), ``probability`` (its ensemble probability), ``uncertainty``, ``measure``,
    ``cell_id``, ``annotated`` (the current label, "" if none), ``rank`` (1 = most uncertain),
    ``name`` (shown by QuPath: ``cell <id>: <predicted> <probability>``), objectType ``annotation``.
    Ties are broken by cell id, so the selection is deterministic. Returns the count per file.
    """
    if n < 1:
        raise CellstageError(f"n must be at least 1, got {n}")
    if not prediction_paths:
        raise CellstageError("export-uncertain: no predictions.parquet given (is the configuration trained?)")
    ens = fold_ensemble([str(p) for p in prediction_paths], split=split)
    if ens.empty:
        raise CellstageError(f"{prediction_paths[0]}: no predictions of split {split!r}")
    prob_cols = [f"prob_{c}" for c in classes]
    missing = [c for c in prob_cols if c not in ens.columns]
    if missing:
        raise CellstageError(f"{prediction_paths[0]}: lacks columns {missing} (config classes {list(classes)})")
    probs = ens[prob_cols].to_numpy(float)
    ens["uncertainty"] = uncertainty(probs, measure)
    ens["probability"] = probs.max(axis=1)
    ens["predicted"] = [classes[i] for i in probs.argmax(axis=1)]
    cells_dir = Path(cells_dir)
    out_dir = Path(out_dir)
    written: dict[str, int] = {}
    for slide, group in ens.groupby("slide", sort=True):
        ref = ref_slide_of.get(str(slide))
        if ref is None:
            raise CellstageError(f"predictions name slide {slide!r}, which the sample sheet does not list")
        top = group.sort_values(["uncertainty", "cell_id"], ascending=[False, True]).head(int(n))
        cells_path = cells_dir / f"{ref}.parquet"
        if not cells_path.is_file():
            raise CellstageError(f"{cells_path}: cell table of {ref} not found (run the workflow's cells rule)")
        cells = pd.read_parquet(cells_path, columns=["cell_id", "centroid_x", "centroid_y", "label"]).rename(
            columns={"label": "annotated"})
        pts_path = cells_dir / f"{ref}.points.csv"
        if pts_path.is_file():
            pts = pd.read_csv(pts_path, keep_default_na=False)
            pts = pts[pts["status"] != "outside"].drop_duplicates("cell_id")[["cell_id", "x", "y"]]
            cells = cells.merge(pts, on="cell_id", how="left")
        else:
            cells["x"] = np.nan
            cells["y"] = np.nan
        merged = top.merge(cells, on="cell_id", how="left", validate="one_to_one")
        lost = merged["centroid_x"].isna()
        if lost.any():
            raise CellstageError(f"{cells_path}: cells {merged.loc[lost, 'cell_id'].head(5).tolist()} of the "
                                 f"predictions of {slide} are not in the cell table (rerun the workflow)")
        out = pd.DataFrame({
            "x": merged["x"].fillna(merged["centroid_x"]).to_numpy(float),
            "y": merged["y"].fillna(merged["centroid_y"]).to_numpy(float),
            "label": "",  # unclassified: the annotator classifies (see docstring)
            "predicted": merged["predicted"].to_numpy(),
            "probability": merged["probability"].to_numpy(float),
            "uncertainty": merged["uncertainty"].to_numpy(float),
            "measure": measure,
            "cell_id": merged["cell_id"].to_numpy(np.int64),
            "annotated": merged["annotated"].fillna("").astype(str).to_numpy(),
            "rank": np.arange(1, len(merged) + 1, dtype=np.int64),
        })
        out["name"] = [f"cell {c}: {k} {q:.2f}"
                       for c, k, q in zip(out["cell_id"], out["predicted"], out["probability"], strict=True)]
        path = out_dir / f"{ref}.geojson"
        if path.exists() and str(ref) in written:  # two scans of one section in the predictions
            raise CellstageError(f"{path}: predictions of two slides of section of {ref}; export one scan")
        written[str(ref)] = write_points_geojson(
            out, path,
            properties=["predicted", "probability", "uncertainty", "measure", "cell_id", "annotated", "rank", "name"])
    return written


def _point_rows(path: Path) -> tuple[pd.DataFrame, str, object]:
    """(points DataFrame[x, y, label], format, raw) of a points file; raw = GeoJSON features with
    ``feature`` = the feature index of each point row, or the raw CSV table."""
    suf = path.suffix.lower()
    if suf in (".geojson", ".json"):
        if not path.exists():
            return pd.DataFrame({"x": [], "y": [], "label": [], "feature": [], "multi": []}), "geojson", []
        feats = load_features(path)
        pts = read_points(path)
        feature, multi = [], []
        for i, f in enumerate(feats):  # read_points' order: a row per Point, per MultiPoint coordinate
            geom = f.get("geometry") or {}
            if geom.get("type") == "Point":
                feature.append(i)
                multi.append(False)
            elif geom.get("type") == "MultiPoint":
                feature += [i] * len(geom.get("coordinates") or [])
                multi += [True] * len(geom.get("coordinates") or [])
        pts["feature"] = feature
        pts["multi"] = multi
        return pts, "geojson", feats
    if not path.exists():
        raise CellstageError(f"{path}: points file not found (a new points file must be .geojson)")
    sep = "\t" if suf in (".tsv", ".txt", ".tab") else ","
    pts = read_points(path)
    raw = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    return pts, "table", raw


def import_labels(geojson: str | os.PathLike, points_path: str | os.PathLike, *, classes: Sequence[str],
                  annotator: str, tolerance_px: float = 3.0, now: _dt.datetime | None = None) -> dict:
    """Merge the classified points of ``geojson`` into ``points_path``; returns counts.

    Each classified Point (MultiPoint: each of its points) of ``geojson`` is matched to the
    nearest point of the points file within ``tolerance_px`` (level-0 px): a different class
    replaces that point's label, the same class changes nothing; with no point that close, the
    point is appended. Unclassified points are skipped (not reviewed). A class name not in
    ``classes`` is an error naming the file, the feature index and the allowed classes; two
    features of one file on the same point with different classes are an error too. Every
    change is appended to :func:`history_path` (time UTC ISO-8601, annotator, source file,
    feature index, action relabel/add, point index, x, y, cell_id, previous and new label).
    The points file (GeoJSON: other features and properties kept; CSV/TSV: other columns kept)
    and the history are replaced atomically, and only when something changed.
    """
    if not annotator or not str(annotator).strip():
        raise CellstageError("import-labels: --annotator (who labelled these cells) is required")
    geojson, points_path = Path(geojson), Path(points_path)
    allowed = list(classes)
    new = []
    bad = []
    for i, f in enumerate(load_features(geojson)):
        geom = f.get("geometry") or {}
        props = f.get("properties") or {}
        t = geom.get("type")
        if t not in ("Point", "MultiPoint"):
            continue
        name = class_name(props)
        if not name:
            continue
        if name not in allowed:
            bad.append(f"feature {i}: {name!r}")
            continue
        coords = [geom.get("coordinates")] if t == "Point" else list(geom.get("coordinates") or [])
        cid = props.get("cell_id", (props.get("measurements") or {}).get("cell_id", ""))
        for c in coords:
            try:
                x, y = float(c[0]), float(c[1])
            except (TypeError, ValueError, IndexError) as e:
                raise CellstageError(f"{geojson}: feature {i} has malformed point coordinates ({e})") from e
            if not (np.isfinite(x) and np.isfinite(y)):
                raise CellstageError(f"{geojson}: feature {i} has non-finite coordinates")
            new.append((i, x, y, name, "" if cid is None else str(cid).removesuffix(".0")))
    if bad:
        raise CellstageError(f"{geojson}: unknown class names ({len(bad)}): {'; '.join(bad[:10])}"
                             f"{' ...' if len(bad) > 10 else ''}; allowed classes (config 'classes'): {allowed}")

    pts, fmt, raw = _point_rows(points_path)
    xs = pts["x"].to_numpy(float).tolist()
    ys = pts["y"].to_numpy(float).tolist()
    labels = pts["label"].astype(str).tolist()
    claimed: dict[int, tuple[int, str]] = {}
    changes = []  # (feature, action, point, x, y, cell_id, previous, new)
    unchanged = 0
    for i, x, y, name, cid in new:
        k = -1
        if xs:
            d = np.hypot(np.asarray(xs) - x, np.asarray(ys) - y)
            j = int(d.argmin())
            if d[j] <= tolerance_px:
                k = j
        if k >= 0 and k in claimed and claimed[k][1] != name:
            raise CellstageError(f"{geojson}: features {claimed[k][0]} and {i} both lie on point {k} of "
                                 f"{points_path} ({xs[k]:.1f}, {ys[k]:.1f}) with different classes "
                                 f"({claimed[k][1]!r}, {name!r}); keep one")
        if k < 0:
            xs.append(x)
            ys.append(y)
            labels.append(name)
            k = len(xs) - 1
            changes.append((i, "add", k, x, y, cid, "", name))
        elif labels[k] != name:
            if fmt == "geojson" and k < len(pts) and bool(pts["multi"].iloc[k]):
                raise CellstageError(f"{points_path}: point {k} is part of a MultiPoint feature; split it into "
                                     f"Point features to relabel it")
            changes.append((i, "relabel", k, xs[k], ys[k], cid, labels[k], name))
            labels[k] = name
        else:
            unchanged += 1
        claimed[k] = (i, name)

    hist = history_path(points_path)
    counts = {"points": str(points_path), "history": str(hist),
              "relabelled": sum(c[1] == "relabel" for c in changes),
              "added": sum(c[1] == "add" for c in changes), "unchanged": unchanged}
    if not changes:
        return counts
    n_old = len(pts)
    if fmt == "geojson":
        feats = [dict(f) for f in raw]
        for _, action, k, _x, _y, _, _, name in changes:
            if action == "relabel" and k < n_old:
                fi = int(pts["feature"].iloc[k])
                props = dict(feats[fi].get("properties") or {})
                cls = {"name": name}
                if isinstance(props.get("classification"), dict) and "color" in props["classification"]:
                    cls["color"] = _rgb(_class_color(name))
                props["classification"] = cls
                feats[fi] = {**feats[fi], "properties": props}
        for k in range(n_old, len(xs)):
            feats.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [xs[k], ys[k]]},
                          "properties": {"objectType": "annotation", "classification": {"name": labels[k]}}})
        write_features(feats, points_path)
    else:
        table = raw.copy()
        table["label"] = labels[:n_old]
        add = pd.DataFrame({c: [""] * (len(xs) - n_old) for c in table.columns})
        add["x"] = [repr(v) for v in xs[n_old:]]
        add["y"] = [repr(v) for v in ys[n_old:]]
        add["label"] = labels[n_old:]
        table = pd.concat([table, add], ignore_index=True)
        sep = "\t" if points_path.suffix.lower() in (".tsv", ".txt", ".tab") else ","
        with atomic_path(points_path) as tmp:
            table.to_csv(tmp, sep=sep, index=False)
    when = (now or _dt.datetime.now(_dt.UTC)).astimezone(_dt.UTC).isoformat(timespec="seconds")
    rows = pd.DataFrame([(when, annotator, str(geojson), *c) for c in changes], columns=HISTORY_COLUMNS)
    if hist.exists():
        rows = pd.concat([pd.read_csv(hist, dtype=str, keep_default_na=False), rows.astype(str)], ignore_index=True)
    with atomic_path(hist) as tmp:
        rows.to_csv(tmp, index=False)
    return counts
