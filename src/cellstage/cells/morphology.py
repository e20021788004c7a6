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
    "distance_to_wall_um": "float64", "distance_norm": "float64", "label": "object",
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


def assign_points(cells: pd.DataFrame, points: pd.DataFrame, point_cell_ids=None, *,
                  match_radius_px: float | None = None):
    """Give each nucleus the class of the annotation point on it.

    A point is matched to the nucleus whose label is under it (``point_cell_ids``: label value
    at each rounded point, 0 = background; None → not used), else to the nearest centroid
    within ``match_radius_px`` (default 10 px). A point lying on a nucleus that is not in
    ``cells`` (dropped: outside ROIs) is unmatched. When several points reach one nucleus the
    first (in ``points`` order) wins, the others are counted as ``multiple``.
    Returns (array of str aligned with ``cells`` rows, "" = unlabelled; counts dict
    {"points", "matched", "unmatched", "multiple", "by_label", "by_nearest"}).
    """
    from scipy.spatial import cKDTree

    r = 10.0 if match_radius_px is None else float(match_radius_px)
    out = np.full(len(cells), "", dtype=object)
    counts = {"points": int(len(points)), "matched": 0, "unmatched": 0, "multiple": 0,
              "by_label": 0, "by_nearest": 0}
    if len(points) == 0:
        return out, counts
    row_of = {int(c): i for i, c in enumerate(cells["cell_id"].to_numpy())}
    tree = cKDTree(cells[["centroid_x", "centroid_y"]].to_numpy(float)) if len(cells) else None
    xs = points["x"].to_numpy(float)
    ys = points["y"].to_numpy(float)
    labs = points["label"].astype(str).to_numpy()
    ids = np.zeros(len(points), np.int64) if point_cell_ids is None else np.asarray(point_cell_ids, np.int64)
    for i in range(len(points)):
        row, how = None, None
        if ids[i] > 0:
            row, how = row_of.get(int(ids[i])), "by_label"
        elif tree is not None:
            d, j = tree.query([xs[i], ys[i]], distance_upper_bound=r)
            if np.isfinite(d):
                row, how = int(j), "by_nearest"
        if row is None:
            counts["unmatched"] += 1
        elif out[row] != "":
            counts["multiple"] += 1
        else:
            out[row] = labs[i]
            counts["matched"] += 1
            counts[how] += 1
    if counts["multiple"]:
        log.warning("%d annotation points hit a nucleus that already had a point (first kept)",
                    counts["multiple"])
    return out, counts


def cell_table(labels, rois, *, mpp: float, slide: str, points: pd.DataFrame | None = None,
               match_radius_px: float | None = None, block: int = 2048,
               keep_outside: bool = False) -> pd.DataFrame:
    """One row per nucleus with the columns of docs/contracts.md (``COLUMNS`` order/dtypes).

    ``labels``: (y, x) label array (zarr or numpy). ``rois``: list of (roi_id, Polygon) in
    level-0 px (None = no ROI filter). ``points``: DataFrame[x, y, label] of annotations.
    Point matching counts are in ``df.attrs["point_matching"]``.
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
        idx = _assign_rois(rois, df["centroid_x"].to_numpy(), df["centroid_y"].to_numpy())
        if not keep_outside:
            n_out = int((idx < 0).sum())
            if n_out:
                log.info("%s: dropped %d nuclei outside all ROIs", slide, n_out)
            df = df[idx >= 0].reset_index(drop=True)
            idx = idx[idx >= 0]
        dist = np.full(len(df), np.nan)
        norm = np.full(len(df), np.nan)
        roi_ids = np.full(len(df), "", dtype=object)
        for k in np.unique(idx[idx >= 0]):
            rid, poly = rois[k]
            sel = np.flatnonzero(idx == k)
            d = distance_to_wall(poly, df["centroid_x"].to_numpy()[sel], df["centroid_y"].to_numpy()[sel])
            dist[sel] = d
            norm[sel] = d / roi_geometry(poly)["norm_factor"]
            roi_ids[sel] = str(rid)
        df["roi_id"] = roi_ids
        df["distance_to_wall_px"] = dist
        df["distance_norm"] = norm
    df["distance_to_wall_um"] = df["distance_to_wall_px"] * mpp
    counts = None
    if points is not None:
        df["label"], counts = assign_points(df, points, pt_ids, match_radius_px=match_radius_px)
    else:
        df["label"] = ""
    df = df[list(COLUMNS)].astype(COLUMNS)
    if counts is not None:
        df.attrs["point_matching"] = counts
    return df
