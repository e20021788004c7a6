"""Per-nucleus table (``results/cells/{slide}.parquet``) computed block-wise from the label image.

Columns and meaning: see docs/contracts.md "Cell table columns". Choices made here:

- ``perimeter_px`` is skimage ``regionprops(...).perimeter`` (4-connectivity contour estimate
  through the centres of border pixels; 0 for a single pixel), ``compactness = 4π·A/P²``
  (NaN when P = 0).
- Centroids are pixel-centre means (pixel (r, c) has its centre at x = c, y = r), bboxes are
  half-open ``[x0, x1) × [y0, y1)``.
- ``roi_id`` is the first ROI (in the given order) whose polygon contains the centroid.
  Nuclei whose centroid lies in no ROI are dropped (segmentation is already restricted to
  tubules, so these are stray interstitial objects) unless ``keep_outside=True``: then they
  get ``roi_id = ""`` and NaN distances. ``rois=None`` keeps every nucleus that way.

Block-wise: the label array (zarr or numpy) is read in ``block``² blocks. Objects that do
not touch an inner block edge are measured in their block; the others (crossing a block
edge, or appearing in several blocks) get their bbox merged over blocks and are measured
once more on the crop of that bbox, so the result equals whole-image ``regionprops`` while
memory stays bounded by the block size.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from .distance import distance_to_wall, roi_geometry

log = logging.getLogger("cellstage.cells")

COLUMNS = {
    "cell_id": "int64", "slide": "object", "centroid_x": "float64", "centroid_y": "float64",
    "bbox_x0": "int64", "bbox_y0": "int64", "bbox_x1": "int64", "bbox_y1": "int64",
    "area_px": "int64", "perimeter_px": "float64", "compactness": "float64",
    "area_um2": "float64", "perimeter_um": "float64", "roi_id": "object", "distance_to_wall_px": "float64",
    "distance_to_wall_um": "float64", "distance_norm": "float64", "anchor": "object", "label": "object",
}


def _props(lab: np.ndarray, oy: int, ox: int, only: int | None = None):
    """Yield (id, cy, cx, y0, x0, y1, x1, area, perimeter, touches(top,left,bottom,right))."""
    from skimage.measure import regionprops
    from skimage.segmentation import relabel_sequential

    if only is not None:
        seq = (lab == only).astype(np.uint8)
        inv = np.array([0, only], dtype=np.int64)
    else:
        seq, _, inv_map = relabel_sequential(lab)
        inv = np.zeros(int(seq.max()) + 1, np.int64)
        inv[np.asarray(inv_map.in_values)] = np.asarray(inv_map.out_values)
    h, w = lab.shape
    for r in regionprops(seq):
        y0, x0, y1, x1 = r.bbox
        cy, cx = r.centroid
        yield (int(inv[r.label]) if only is None else only, cy + oy, cx + ox, y0 + oy, x0 + ox,
               y1 + oy, x1 + ox, int(r.area), float(r.perimeter), (y0 == 0, x0 == 0, y1 == h, x1 == w))


def _roi_index(rois):
    import shapely

    polys = [p for _, p in rois]
    for p in polys:
        shapely.prepare(p)
    return shapely.STRtree(polys) if polys else None


def _assign_rois(rois, xs, ys) -> np.ndarray:
    """Index into ``rois`` of the first ROI containing each point (-1 = none)."""
    import shapely

    out = np.full(len(xs), -1, np.int64)
    if not rois or len(xs) == 0:
        return out
    tree = _roi_index(rois)
    pi, ri = tree.query(shapely.points(np.asarray(xs, float), np.asarray(ys, float)), predicate="within")
    if len(pi):
        order = np.lexsort((ri, pi))
        pi, ri = pi[order], ri[order]
        first = np.r_[True, pi[1:] != pi[:-1]]
        out[pi[first]] = ri[first]
    return out


def measure_labels(labels, *, block: int = 2048, points_xy: np.ndarray | None = None):
    """Block-wise regionprops of a (y, x) label array (zarr or numpy).

    Returns (DataFrame[cell_id, centroid_x, centroid_y, bbox_*, area_px, perimeter_px] sorted
    by cell_id, label value under each point of ``points_xy`` (N, 2) as x, y rounded; 0 when
    outside the image).
    """
    H, W = (int(v) for v in labels.shape[:2])
    rows: dict[int, tuple] = {}
    partial: dict[int, list[int]] = {}
    pts = None if points_xy is None else np.asarray(points_xy, float).reshape(-1, 2)
    pt_ids = np.zeros(0 if pts is None else len(pts), np.int64)
    if pts is not None and len(pts):
        px = np.rint(pts[:, 0]).astype(np.int64)
        py = np.rint(pts[:, 1]).astype(np.int64)
    for by in range(0, H, block):
        for bx in range(0, W, block):
            blk = np.asarray(labels[by:by + block, bx:bx + block])
            bh, bw = blk.shape
            if pts is not None and len(pts):
                sel = np.flatnonzero((px >= bx) & (px < bx + bw) & (py >= by) & (py < by + bh))
                if len(sel):
                    pt_ids[sel] = blk[py[sel] - by, px[sel] - bx]
            if not blk.any():
                continue
            for rec in _props(blk, by, bx):
                cid, touch = rec[0], rec[-1]
                inner = ((touch[0] and by > 0) or (touch[1] and bx > 0)
                         or (touch[2] and by + bh < H) or (touch[3] and bx + bw < W))
                if inner or cid in rows or cid in partial:
                    b = partial.get(cid)
                    if cid in rows:  # seen complete elsewhere (disconnected label): re-measure
                        old = rows.pop(cid)
                        b = [old[3], old[4], old[5], old[6]]
                    y0, x0, y1, x1 = rec[3:7]
                    partial[cid] = ([y0, x0, y1, x1] if b is None else
                                    [min(b[0], y0), min(b[1], x0), max(b[2], y1), max(b[3], x1)])
                else:
                    rows[cid] = rec[:-1]
    for cid, (y0, x0, y1, x1) in partial.items():
        crop = np.asarray(labels[y0:y1, x0:x1])
        for rec in _props(crop, y0, x0, only=cid):
            rows[cid] = rec[:-1]
    cols = ["cell_id", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1",
            "area_px", "perimeter_px"]
    df = pd.DataFrame([rows[k] for k in sorted(rows)], columns=cols)
    return df, pt_ids


POINT_STATUS = ("nucleus", "point", "outside")  # per annotated point: what its crop is centred on
POINT_COLUMNS = ["point", "x", "y", "label", "status", "cell_id", "match"]
ADVICE = ("train or fine-tune the segmenter on a few nucleus masks of these slides (sheet column 'masks'), "
          "or adjust segmentation.diameter")


def match_points(cells: pd.DataFrame, points: pd.DataFrame, point_cell_ids=None, *,
                 match_radius_px: float | None = None, shape: tuple[int, int] | None = None) -> pd.DataFrame:
    """What every annotation point is matched to (one row per point, in ``points`` order).

    A point is matched to the nucleus whose label is under it (``point_cell_ids``: label value
    at each rounded point, 0 = background; None → not used; ``match = "under"``), else to the
    nearest centroid within ``match_radius_px`` (default 10 px; ``match = "nearest"``). A point
    on a nucleus that is not in ``cells`` (dropped: outside ROIs) is unmatched. When several
    points reach one nucleus the first (in ``points`` order) wins; the others are unmatched
    with ``match = "multiple"``. ``shape`` (H, W): points whose rounded position lies outside
    it are ``outside`` the slide (never matched).

    Columns ``POINT_COLUMNS``: ``point`` (index in ``points``), x, y, label, ``status``
    (``nucleus`` = matched, ``point`` = inside the slide but matched to no nucleus: its crop is
    centred on the point itself, ``outside``), ``cell_id`` (the matched nucleus, -1 otherwise),
    ``match`` ("under", "nearest", "multiple" or "").
    """
    from scipy.spatial import cKDTree

    r = 10.0 if match_radius_px is None else float(match_radius_px)
    n = len(points)
    xs = points["x"].to_numpy(float) if n else np.zeros(0)
    ys = points["y"].to_numpy(float) if n else np.zeros(0)
    status = np.full(n, "point", dtype=object)
    cell_id = np.full(n, -1, np.int64)
    match = np.full(n, "", dtype=object)
    if shape is not None and n:
        px, py = np.rint(xs), np.rint(ys)
        off = ~((px >= 0) & (px < shape[1]) & (py >= 0) & (py < shape[0]))
        status[off] = "outside"
    ids_all = cells["cell_id"].to_numpy(np.int64)
    row_of = {int(c): i for i, c in enumerate(ids_all)}
    tree = cKDTree(cells[["centroid_x", "centroid_y"]].to_numpy(float)) if len(cells) else None
    ids = np.zeros(n, np.int64) if point_cell_ids is None else np.asarray(point_cell_ids, np.int64)
    taken: set[int] = set()
    for i in range(n):
        if status[i] == "outside":
            continue
        row, how = None, None
        if ids[i] > 0:
            row, how = row_of.get(int(ids[i])), "under"
        elif tree is not None:
            d, j = tree.query([xs[i], ys[i]], distance_upper_bound=r)
            if np.isfinite(d):
                row, how = int(j), "nearest"
        if row is None:
            continue
        if row in taken:
            match[i] = "multiple"
            continue
        taken.add(row)
        status[i], cell_id[i], match[i] = "nucleus", ids_all[row], how
    return pd.DataFrame({
        "point": np.arange(n, dtype=np.int64), "x": xs, "y": ys,
        "label": points["label"].astype(str).to_numpy() if n else np.zeros(0, object),
        "status": status, "cell_id": cell_id, "match": match,
    })[POINT_COLUMNS]


def point_counts(matched: pd.DataFrame) -> dict:
    """Counts of a :func:`match_points` table, and ``on_nucleus_fraction``: the share of the points
    inside the slide that were matched to a segmented nucleus (None when there are none): the
    segmentation QC figure."""
    st = matched["status"]
    inside = int((st != "outside").sum())
    n_nuc = int((st == "nucleus").sum())
    return {
        "points": int(len(matched)), "matched": n_nuc,
        "unmatched": int(((st == "point") & (matched["match"] != "multiple")).sum()),
        "multiple": int((matched["match"] == "multiple").sum()),
        "by_label": int((matched["match"] == "under").sum()), "by_nearest": int((matched["match"] == "nearest").sum()),
        "outside": int((st == "outside").sum()), "point_anchored": int((st == "point").sum()),
        "inside": inside,
        "on_nucleus_fraction": (n_nuc / inside) if inside else None,
    }


def segmentation_qc(fraction: float | None, min_points_on_nuclei: float) -> str:
    """"" when the share of annotated points on a segmented nucleus (``on_nucleus_fraction`` of
    :func:`point_counts`; None = no points) reaches ``min_points_on_nuclei``, else the warning
    with what to do about it."""
    if fraction is None or fraction >= float(min_points_on_nuclei):
        return ""
    return (f"only {100 * fraction:.0f}% of the annotated points fall on a segmented nucleus "
            f"(threshold {100 * float(min_points_on_nuclei):.0f}%): {ADVICE}")


def assign_points(cells: pd.DataFrame, points: pd.DataFrame, point_cell_ids=None, *,
                  match_radius_px: float | None = None):
    """Give each nucleus the class of the annotation point on it (matching: :func:`match_points`).

    Returns (array of str aligned with ``cells`` rows, "" = unlabelled; counts dict
    {"points", "matched", "unmatched", "multiple", "by_label", "by_nearest", ...} of
    :func:`point_counts`).
    """
    out = np.full(len(cells), "", dtype=object)
    matched = match_points(cells, points, point_cell_ids, match_radius_px=match_radius_px)
    counts = point_counts(matched)
    hit = matched[matched["status"] == "nucleus"]
    if len(hit):
        row_of = pd.Series(np.arange(len(cells)), index=cells["cell_id"].to_numpy(np.int64))
        out[row_of.loc[hit["cell_id"].to_numpy()].to_numpy()] = hit["label"].to_numpy()
    if counts["multiple"]:
        log.warning("%d annotation points hit a nucleus that already had a point (first kept)",
                    counts["multiple"])
    return out, counts


def _roi_columns(rois, xs, ys):
    """(roi index (-1 = none), roi_id, distance_to_wall_px, distance_norm) of points (xs, ys)."""
    idx = _assign_rois(rois, xs, ys)
    dist = np.full(len(xs), np.nan)
    norm = np.full(len(xs), np.nan)
    roi_ids = np.full(len(xs), "", dtype=object)
    for k in np.unique(idx[idx >= 0]):
        rid, poly = rois[k]
        sel = np.flatnonzero(idx == k)
        d = distance_to_wall(poly, np.asarray(xs)[sel], np.asarray(ys)[sel])
        dist[sel] = d
        norm[sel] = d / roi_geometry(poly)["norm_factor"]
        roi_ids[sel] = str(rid)
    return idx, roi_ids, dist, norm


def cell_table(labels, rois, *, mpp: float, slide: str, points: pd.DataFrame | None = None,
               match_radius_px: float | None = None, block: int = 2048,
               keep_outside: bool = False, with_points: bool = False):
    """One row per nucleus, then one per point-anchored annotation, with the columns of
    docs/contracts.md (``COLUMNS`` order/dtypes).

    ``labels``: (y, x) label array (zarr or numpy). ``rois``: list of (roi_id, Polygon) in
    level-0 px (None = no ROI filter). ``points``: DataFrame[x, y, label] of annotations.

    Every annotation point inside the slide reaches a row (:func:`match_points`): a matched
    point labels its nucleus (``anchor = "nucleus"``); any other (on no kept nucleus, or on a
    nucleus another point already labelled) gets a row of its own, ``anchor = "point"``, with
    ``cell_id = -(point index + 1)``, the point as centroid, a 1-px bbox, area and perimeter 0,
    compactness NaN, and the ROI and wall distance of the point (kept, ``roi_id = ""``, when
    the point lies in no ROI). Points outside the slide get no row. Counts
    (:func:`point_counts`) are in ``df.attrs["point_matching"]``; ``with_points=True`` returns
    ``(df, per-point table of match_points)``, where a point-anchored point's ``cell_id`` is its row's.
    """
    if mpp is None or not (float(mpp) > 0):
        from ..utils import CellstageError

        raise CellstageError(f"cell_table: mpp must be a positive number, got {mpp!r}")
    mpp = float(mpp)
    pxy = None if points is None else points[["x", "y"]].to_numpy(float)
    df, pt_ids = measure_labels(labels, block=block, points_xy=pxy)
    df["slide"] = slide
    P = df["perimeter_px"].to_numpy(float)
    A = df["area_px"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["compactness"] = np.where(P > 0, 4 * math.pi * A / P**2, np.nan)
    df["area_um2"] = A * mpp * mpp
    df["perimeter_um"] = P * mpp
    df["roi_id"] = ""
    df["distance_to_wall_px"] = np.nan
    df["distance_norm"] = np.nan
    if rois is not None:
        idx, roi_ids, dist, norm = _roi_columns(rois, df["centroid_x"].to_numpy(), df["centroid_y"].to_numpy())
        keep = np.ones(len(df), bool) if keep_outside else idx >= 0
        n_out = int((~keep).sum())
        if n_out:
            log.info("%s: dropped %d nuclei outside all ROIs", slide, n_out)
        df = df[keep].reset_index(drop=True)
        df["roi_id"] = roi_ids[keep]
        df["distance_to_wall_px"] = dist[keep]
        df["distance_norm"] = norm[keep]
    df["anchor"] = "nucleus"
    df["label"] = ""
    matched = None
    if points is not None:
        shape = tuple(int(v) for v in labels.shape[:2])
        matched = match_points(df, points, pt_ids, match_radius_px=match_radius_px, shape=shape)
        hit = matched[matched["status"] == "nucleus"]
        if len(hit):
            row_of = pd.Series(np.arange(len(df)), index=df["cell_id"].to_numpy(np.int64))
            df.loc[row_of.loc[hit["cell_id"].to_numpy()].to_numpy(), "label"] = hit["label"].to_numpy()
        own = matched[matched["status"] == "point"]
        matched.loc[own.index, "cell_id"] = -(own["point"].to_numpy(np.int64) + 1)
        if len(own):
            xs, ys = own["x"].to_numpy(float), own["y"].to_numpy(float)
            cx, cy = np.floor(xs + 0.5).astype(np.int64), np.floor(ys + 0.5).astype(np.int64)
            prow = pd.DataFrame({
                "cell_id": -(own["point"].to_numpy(np.int64) + 1), "slide": slide, "centroid_x": xs, "centroid_y": ys,
                "bbox_x0": cx, "bbox_y0": cy, "bbox_x1": cx + 1, "bbox_y1": cy + 1, "area_px": 0,
                "perimeter_px": 0.0, "compactness": np.nan, "area_um2": 0.0, "perimeter_um": 0.0,
                "roi_id": "", "distance_to_wall_px": np.nan, "distance_norm": np.nan,
                "anchor": "point", "label": own["label"].to_numpy(),
            })
            if rois is not None:
                _, prow["roi_id"], prow["distance_to_wall_px"], prow["distance_norm"] = _roi_columns(rois, xs, ys)
            df = pd.concat([df, prow], ignore_index=True)
    df["distance_to_wall_um"] = df["distance_to_wall_px"] * mpp
    df = df[list(COLUMNS)].astype(COLUMNS)
    if matched is not None:
        counts = point_counts(matched)
        df.attrs["point_matching"] = counts
        if counts["multiple"]:
            log.info("%s: %d annotation points hit a nucleus that already had a point: cropped at the point",
                     slide, counts["multiple"])
    return (df, matched) if with_points else df
