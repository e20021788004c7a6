"""QuPath-compatible annotations: tubule polygons, labelled points, detection export.

All coordinates are level-0 pixels of the slide (x = column, y = row), like QuPath's
GeoJSON export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import CellstageError, atomic_path

_UUID_NS = uuid.UUID("6f1d3c1e-8c3b-4c7e-9a59-3f1e2b7c0d11")
log = logging.getLogger("cellstage.io")
REGION_CLASSES_KEY = "annotations.region_classes"


# --------------------------------------------------------------------------- reading
def _load_features(path: Path) -> list[dict]:
    if not path.exists():
        raise CellstageError(f"{path}: annotation file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CellstageError(f"{path}: not valid GeoJSON/JSON ({e})") from e
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features", [])
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    elif isinstance(obj, dict) and "type" in obj and "coordinates" in obj:  # bare geometry
        feats = [{"type": "Feature", "geometry": obj, "properties": {}}]
    elif isinstance(obj, list):
        feats = obj
    else:
        raise CellstageError(f"{path}: expected a GeoJSON FeatureCollection or a list of features")
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise CellstageError(f"{path}: feature {i} is not a JSON object")
    return feats


def _class_name(props: dict) -> str:
    c = props.get("classification")
    if isinstance(c, dict):
        return str(c.get("name") or "")
    if isinstance(c, str):
        return c
    return ""


def _feature_name(f: dict, i: int) -> str:
    props = f.get("properties") or {}
    name = props.get("name")
    return str(name) if name not in (None, "") else str(i)


def read_polygons(
    path: str | os.PathLike,
    *,
    classification: str | None = None,
    multipolygon: str = "largest",
    repair: bool = True,
    classes: Sequence[str] | None = None,
) -> list[tuple[str, shapely.Polygon]]:  # noqa: F821
    """(roi_id, Polygon) for every Polygon/MultiPolygon feature of a QuPath GeoJSON.

    * roi id = ``properties.name``, else the feature index; duplicates get ``_<index>``.
    * ``multipolygon="largest"`` keeps the largest part (id unchanged) and logs a warning naming
      the feature and the parts dropped; ``"each"`` yields every part as ``<id>_<k>``.
    * invalid polygons (e.g. a self-intersecting "bow-tie") are repaired with
      ``shapely.make_valid`` when ``repair``, with a warning naming the feature and the reason;
      otherwise, or if nothing polygonal is left, a CellstageError names the feature.
    * features with other geometry types (points, lines) are skipped; ``classification``
      keeps only features with that class name, ``classes`` only those whose class name is in
      the list (``""`` = unclassified).
    """
    import shapely
    from shapely.geometry import MultiPolygon, Polygon, shape

    if multipolygon not in ("largest", "each"):
        raise CellstageError(f"multipolygon must be 'largest' or 'each', got {multipolygon!r}")
    path = Path(path)
    out: list[tuple[str, Polygon]] = []
    seen: set[str] = set()
    for i, f in enumerate(_load_features(path)):
        geom = f.get("geometry")
        if not geom or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        props = f.get("properties") or {}
        if classification is not None and _class_name(props) != classification:
            continue
        if classes is not None and _class_name(props) not in classes:
            continue
        rid = _feature_name(f, i)
        if rid in seen:
            rid = f"{rid}_{i}"
        seen.add(rid)
        try:
            g = shape(geom)
        except Exception as e:
            raise CellstageError(f"{path}: feature {rid!r} (index {i}) has a malformed geometry: {e}") from e
        if g.is_empty:
            raise CellstageError(f"{path}: feature {rid!r} (index {i}) has an empty geometry")
        if not g.is_valid:
            reason = shapely.is_valid_reason(g)
            if not repair:
                raise CellstageError(f"{path}: feature {rid!r} (index {i}) is an invalid polygon ({reason})")
            g = shapely.make_valid(g)
            polys = _polygon_parts(g)
            if not polys:
                raise CellstageError(
                    f"{path}: feature {rid!r} (index {i}) is an invalid polygon ({reason}) "
                    f"that cannot be repaired into a polygon; redraw it in QuPath"
                )
            g = MultiPolygon(polys) if len(polys) > 1 else polys[0]
            log.warning(
                "%s: feature %r (index %d) is an invalid polygon (%s); repaired by make_valid into "
                "%d part(s), %.0f px² in all; check the outline in QuPath",
                path,
                rid,
                i,
                reason,
                len(polys),
                g.area,
            )
        parts = _polygon_parts(g)
        if not parts:
            raise CellstageError(f"{path}: feature {rid!r} (index {i}) has no area (a degenerate polygon)")
        if multipolygon == "largest" or len(parts) == 1:
            keep = max(parts, key=lambda p: p.area)
            if len(parts) > 1:
                log.warning(
                    "%s: feature %r (index %d) has %d parts; only the largest (%.0f of %.0f px²) is kept",
                    path,
                    rid,
                    i,
                    len(parts),
                    keep.area,
                    sum(p.area for p in parts),
                )
            out.append((rid, keep))
        else:
            out.extend((f"{rid}_{k}", p) for k, p in enumerate(parts))
    return out


def read_regions(
    path: str | os.PathLike, *, classes: Sequence[str] | None = None, key: str = REGION_CLASSES_KEY
) -> list[tuple[str, shapely.Polygon]]:  # noqa: F821
    """The ROI polygons (tubules) of one slide: every polygonal part of every feature whose class
    name is in ``classes`` (config ``annotations.region_classes``; ``""`` = unclassified;
    ``None`` = every class).

    Nothing is dropped silently: a multi-part feature yields every part (``<id>_<k>``) with a
    warning, an invalid (self-intersecting) one is repaired by ``shapely.make_valid`` keeping all
    parts, with a warning; polygons of other classes (e.g. a "Tissue" outline) are skipped with a
    warning naming them. A file with no polygon at all, or none of ``classes``, raises a
    :class:`CellstageError` naming the file, the classes found and ``key``.
    """
    from shapely.geometry import shape

    path = Path(path)
    feats = _load_features(path)
    poly_feats = [
        (i, f) for i, f in enumerate(feats) if (f.get("geometry") or {}).get("type") in ("Polygon", "MultiPolygon")
    ]
    if not poly_feats:
        kinds = sorted({str((f.get("geometry") or {}).get("type")) for f in feats})
        raise CellstageError(
            f"{path}: no polygons in the ROI (tubules) file ({len(feats)} feature(s)"
            + (f" of type {', '.join(kinds)}" if kinds else "")
            + "); export the tubule outlines from QuPath as Polygon annotations"
        )
    out = read_polygons(path, multipolygon="each", classes=classes)
    if classes is not None:
        skipped = [
            (_feature_name(f, i), _class_name(f.get("properties") or {}))
            for i, f in poly_feats
            if _class_name(f.get("properties") or {}) not in classes
        ]
        if skipped and not out:
            found = sorted({c for _, c in skipped})
            raise CellstageError(
                f"{path}: none of the {len(skipped)} polygon(s) has a class in {key} {list(classes)} "
                f"(classes found: {found}; '' = unclassified); add the tubule class to {key}"
            )
        if skipped:
            listed = ", ".join(f"{n!r} ({c or 'unclassified'})" for n, c in skipped[:10])
            log.warning(
                "%s: %d polygon(s) not used as regions, their class is not in %s %s: %s%s",
                path,
                len(skipped),
                key,
                list(classes),
                listed,
                " ..." if len(skipped) > 10 else "",
            )
    multi = {}
    for i, f in poly_feats:
        if classes is not None and _class_name(f.get("properties") or {}) not in classes:
            continue
        try:
            g = shape(f["geometry"])
        except Exception:  # read_polygons has already raised on malformed geometry
            continue
        if g.is_valid and len(_polygon_parts(g)) > 1:
            multi[_feature_name(f, i)] = len(_polygon_parts(g))
    if multi:
        log.warning(
            "%s: multi-part feature(s) %s: every part is kept as its own region (<id>_<k>)",
            path,
            ", ".join(f"{n!r} ({k} parts)" for n, k in multi.items()),
        )
    return out


def _polygon_parts(g) -> list:
    from shapely.geometry import Polygon

    if isinstance(g, Polygon):
        return [g] if not g.is_empty else []
    parts = []
    for sub in getattr(g, "geoms", []):
        parts.extend(_polygon_parts(sub))
    return [p for p in parts if p.area > 0]


def read_points(path: str | os.PathLike) -> pd.DataFrame:
    """DataFrame[x, y, label] from QuPath GeoJSON Point/MultiPoint features or a CSV/TSV.

    GeoJSON: label = ``properties.classification.name`` ("" if unclassified); other geometry
    types are skipped. CSV (``.csv``; ``.tsv``/``.txt`` tab-separated): columns ``x, y, label``
    are required — a missing one raises a CellstageError naming the file and the column.
    """
    path = Path(path)
    if not path.exists():
        raise CellstageError(f"{path}: points file not found")
    suf = path.suffix.lower()
    if suf in (".geojson", ".json"):
        rows = []
        for i, f in enumerate(_load_features(path)):
            geom = f.get("geometry") or {}
            label = _class_name(f.get("properties") or {})
            t = geom.get("type")
            try:
                if t == "Point":
                    x, y = geom["coordinates"][:2]
                    rows.append((float(x), float(y), label))
                elif t == "MultiPoint":
                    for c in geom["coordinates"]:
                        rows.append((float(c[0]), float(c[1]), label))
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise CellstageError(f"{path}: feature {i} has malformed point coordinates ({e})") from e
        df = pd.DataFrame(rows, columns=["x", "y", "label"])
    else:
        sep = "\t" if suf in (".tsv", ".txt", ".tab") else ","
        try:
            df = pd.read_csv(path, sep=sep, dtype={"label": str}, keep_default_na=False)
        except Exception as e:
            raise CellstageError(f"{path}: cannot read points table ({type(e).__name__}: {e})") from e
        df.columns = [str(c).strip() for c in df.columns]
        for col in ("x", "y", "label"):
            if col not in df.columns:
                raise CellstageError(
                    f"{path}: missing column {col!r} (points tables need columns x, y, label; found {list(df.columns)})"
                )
        try:
            df = pd.DataFrame(
                {
                    "x": pd.to_numeric(df["x"]).astype(float),
                    "y": pd.to_numeric(df["y"]).astype(float),
                    "label": df["label"].astype(str),
                }
            )
        except (ValueError, TypeError) as e:
            raise CellstageError(f"{path}: non-numeric x/y value ({e})") from e
    df["x"] = df["x"].astype(float)
    df["y"] = df["y"].astype(float)
    df["label"] = df["label"].fillna("").astype(str)
    if not (np.isfinite(df["x"]).all() and np.isfinite(df["y"]).all()):
        raise CellstageError(f"{path}: points with missing/non-finite x or y")
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------- writing
def _class_color(name: str) -> int:
    """Stable packed 0xRRGGBB colour for a class name."""
    return int(uuid.uuid5(_UUID_NS, name).hex[:6], 16)


def write_cells_geojson(
    cells: pd.DataFrame,
    path: str | os.PathLike,
    *,
    mpp: float,
    label_col: str = "label",
    prob_col: str | None = None,
    geometry_col: str = "geometry",
    x_col: str = "centroid_x",
    y_col: str = "centroid_y",
    id_col: str = "cell_id",
) -> int:
    """Write a QuPath-importable FeatureCollection of detections; returns the number written.

    Geometry: the ``geometry_col`` value if present (shapely geometry or WKT), else a Point at
    (``x_col``, ``y_col``). Properties: ``objectType="detection"``, ``classification={"name"}``
    (omitted when the label is empty), ``name`` = cell id, and ``measurements`` = every finite
    numeric column (+ "Probability" from ``prob_col``, "Centroid X µm"/"Centroid Y µm" via mpp).
    """
    import shapely
    from shapely.geometry import mapping

    path = Path(path)
    for col in (x_col, y_col):
        if col not in cells.columns and geometry_col not in cells.columns:
            raise CellstageError(f"{path}: cells table lacks column {col!r} (and no {geometry_col!r})")
    if prob_col is not None and prob_col not in cells.columns:
        raise CellstageError(f"{path}: cells table lacks probability column {prob_col!r}")
    skip = {label_col, geometry_col, prob_col}
    num_cols = [
        c
        for c in cells.columns
        if c not in skip and pd.api.types.is_numeric_dtype(cells[c]) and not pd.api.types.is_bool_dtype(cells[c])
    ]
    has_geom = geometry_col in cells.columns
    has_label = label_col in cells.columns
    feats = []
    colors: dict[str, int] = {}
    for i, row in enumerate(cells.itertuples(index=False)):
        r = dict(zip(cells.columns, row))
        geom = None
        g = r[geometry_col] if has_geom else None
        if g is not None and not (isinstance(g, float) and math.isnan(g)):
            if isinstance(g, (str, bytes)):
                g = shapely.from_wkt(g) if isinstance(g, str) else shapely.from_wkb(g)
            geom = mapping(g)
        if geom is None:
            geom = {"type": "Point", "coordinates": [float(r[x_col]), float(r[y_col])]}
        meas = {}
        for c in num_cols:
            v = r[c]
            if v is not None and np.isfinite(v):
                meas[c] = float(v)
        if x_col in r and np.isfinite(r[x_col]):
            meas["Centroid X µm"] = float(r[x_col]) * mpp
            meas["Centroid Y µm"] = float(r[y_col]) * mpp
        if prob_col is not None and r[prob_col] is not None and np.isfinite(r[prob_col]):
            meas["Probability"] = float(r[prob_col])
        props: dict = {"objectType": "detection", "isLocked": False}
        cid = r.get(id_col, i)
        props["name"] = str(cid)
        label = (
            str(r[label_col])
            if has_label
            and r[label_col] is not None
            and not (isinstance(r[label_col], float) and math.isnan(r[label_col]))
            else ""
        )
        if label:
            if label not in colors:
                colors[label] = _class_color(label)
            props["classification"] = {"name": label, "color": _rgb(colors[label])}
        props["measurements"] = meas
        feats.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_UUID_NS, f"{path.name}:{cid}")),
                "geometry": geom,
                "properties": props,
            }
        )
    fc = {"type": "FeatureCollection", "features": feats}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fc, ensure_ascii=False))
    return len(feats)


def _rgb(packed: int) -> list[int]:
    v = packed & 0xFFFFFF
    return [(v >> 16) & 255, (v >> 8) & 255, v & 255]


def write_polygons_geojson(
    polygons, path, *, classification: str | None = None, object_type: str = "annotation"
) -> None:
    """(roi_id, Polygon) list -> QuPath annotation FeatureCollection (inverse of read_polygons)."""
    from shapely.geometry import mapping

    feats = []
    for rid, poly in polygons:
        props = {"objectType": object_type, "name": str(rid)}
        if classification:
            props["classification"] = {"name": classification}
        feats.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_UUID_NS, f"roi:{rid}")),
                "geometry": mapping(poly),
                "properties": props,
            }
        )
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def write_points_geojson(points: pd.DataFrame, path, *, properties=(), color: bool = False) -> int:
    """DataFrame[x, y, label] -> QuPath Point annotations (inverse of read_points); returns the count.

    ``properties``: further columns copied into every feature's ``properties`` (numbers as
    float/int, the rest as str) and, the numeric ones, into ``measurements`` too (QuPath keeps
    measurements through its own GeoJSON round trip). ``color``: add the class colour
    (``classification.color``, stable per class name) as QuPath does on export.
    """
    feats = []
    extra = list(properties)
    for i, (x, y, lab) in enumerate(zip(points["x"], points["y"], points["label"])):
        props: dict = {"objectType": "annotation"}
        if lab:
            props["classification"] = {"name": str(lab)}
            if color:
                props["classification"]["color"] = _rgb(_class_color(str(lab)))
        meas = {}
        for c in extra:
            v = points[c].iloc[i]
            if isinstance(v, (bool, np.bool_)):
                props[c] = bool(v)
            elif isinstance(v, (int, np.integer)):
                props[c] = meas[c] = int(v)
            elif isinstance(v, (float, np.floating)):
                props[c] = meas[c] = float(v) if np.isfinite(v) else None
            else:
                props[c] = str(v)
        if meas:
            props["measurements"] = {k: v for k, v in meas.items() if v is not None}
        feats.append(
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(x), float(y)]}, "properties": props}
        )
    write_features(feats, path)
    return len(feats)


def write_features(features: list[dict], path) -> None:
    """A list of GeoJSON features -> FeatureCollection file, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def load_features(path: str | os.PathLike) -> list[dict]:
    """The features of a GeoJSON file (FeatureCollection, Feature, bare geometry or list)."""
    return _load_features(Path(path))


def class_name(properties: dict) -> str:
    """``classification.name`` of a feature's properties ("" when unclassified)."""
    return _class_name(properties or {})


# --------------------------------------------------------------------------- checks
def drop_outside(
    points: pd.DataFrame, dimensions, path, *, slide: str | None = None, what: str = "points"
) -> pd.DataFrame:
    """The rows of ``points`` (columns ``x, y``) inside the image ``dimensions=(width, height)``.

    Points outside (not 0 <= x < width and 0 <= y < height) are excluded, never cropped as white,
    and a warning lists each (row number, x, y) with ``path`` and ``slide``. If every point is
    outside, a :class:`CellstageError` says so (the file is for another slide or frame).
    """
    try:
        xy = points[["x", "y"]].astype(float)
    except (KeyError, ValueError, TypeError) as e:
        raise CellstageError(f"{path}: {what} need numeric columns x and y ({type(e).__name__}: {e})") from None
    bad = ~np.isfinite(xy.to_numpy()).all(axis=1)
    if bad.any():
        rows = [int(i) + 2 for i in np.flatnonzero(bad)[:10]]  # line 1 = header
        raise CellstageError(f"{path}: {what} with missing/non-finite x or y in row(s) {rows}")
    ids = check_inside(xy, dimensions, path, raise_error=False)
    if not ids:
        return points
    W, H = dimensions
    where = f"{path}" + (f" (slide {slide})" if slide else "")
    listed = _listed_points(xy, ids)
    if len(ids) == len(points):
        raise CellstageError(
            f"{where}: all {len(ids)} {what} (index, x, y) lie outside the image ({W}x{H} px): {listed}. Are the "
            f"annotations for another slide or in another coordinate frame (level-0 px, x = column)?"
        )
    log.warning(
        "%s: %d %s (index, x, y) outside the image (%dx%d px) are excluded: %s", where, len(ids), what, W, H, listed
    )
    return points.drop(index=ids)


def _listed_points(df: pd.DataFrame, ids: list, n: int = 10) -> str:
    shown = ", ".join(f"{i} ({df.at[i, 'x']:g}, {df.at[i, 'y']:g})" for i in ids[:n])
    return shown + (" ..." if len(ids) > n else "")


def check_inside(points_or_polygons, dimensions, path, *, raise_error: bool = True) -> list:
    """Annotations lying (partly) outside the image ``dimensions=(width, height)``.

    ``points_or_polygons``: a DataFrame with ``x, y`` (ids = DataFrame index values; a point is
    outside unless 0 <= x < width and 0 <= y < height) or a list of ``(roi_id, geometry)``
    (outside unless the image rectangle covers the whole geometry).
    Returns the offending ids (empty list if all inside). With ``raise_error=True`` (default)
    any offender raises a CellstageError naming ``path``, the count and the first ids.
    """
    W, H = dimensions
    if isinstance(points_or_polygons, pd.DataFrame):
        df = points_or_polygons
        x, y = df["x"].to_numpy(float), df["y"].to_numpy(float)
        bad = ~((x >= 0) & (x < W) & (y >= 0) & (y < H))
        ids = list(df.index[bad])
        what = "points"
    else:
        from shapely.geometry import box  # polygons only: the ml env (points of the grader) has no shapely

        frame = box(0, 0, W, H)
        ids = [rid for rid, g in points_or_polygons if not frame.covers(g)]
        what = "polygons"
    if ids and raise_error:
        if what == "points":
            shown = _listed_points(points_or_polygons, ids)
        else:
            shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
        raise CellstageError(
            f"{path}: {len(ids)} {what} lie outside the image ({W}x{H} px): {shown}. "
            f"Are the annotations for another slide or in another coordinate frame/scan?"
        )
    return ids
