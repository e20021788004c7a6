"""Mapping points, polygons, cell tables and label images through a homography.

All coordinates are level-0 px of their slide (x = column, y = row, pixel centres at integers).
Points that land outside the target slide are *reported* (``inside`` = False), never clipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import cv2
import numpy as np
import pandas as pd
import shapely

from ..utils import CellstageError
from .homography import jacobian_det

__all__ = [
    "map_points",
    "map_points_report",
    "map_polygons",
    "map_cell_table",
    "warp_labels",
    "warp_labels_zarr",
    "OUTSIDE_COLUMNS",
    "outside_report",
]

# columns of the outside-the-slide report (``results/annotations/{slide}.outside.csv``)
OUTSIDE_COLUMNS = ["kind", "id", "label", "source_x", "source_y", "mapped_x", "mapped_y"]


def _H(H) -> np.ndarray:
    H = np.asarray(H, dtype=np.float64)
    if H.shape != (3, 3) or not np.all(np.isfinite(H)):
        raise CellstageError(f"homography must be a finite 3×3 matrix, got shape {H.shape}")
    return H


def map_points(xy, H) -> np.ndarray:
    """Map (N, 2) points (x, y) through H → float64 (N, 2); points sent to infinity → NaN."""
    H = _H(H)
    xy = np.asarray(xy, dtype=np.float64)
    if xy.size == 0:
        return np.zeros((0, 2), np.float64)
    xy = xy.reshape(-1, 2)
    p = xy @ H[:, :2].T + H[:, 2]
    w = p[:, 2:3]
    bad = np.abs(w) < 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        out = p[:, :2] / w
    out[bad[:, 0]] = np.nan
    return out


def _inside(xy: np.ndarray, target_dimensions) -> np.ndarray:
    w, h = (float(v) for v in target_dimensions)
    x, y = xy[:, 0], xy[:, 1]
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0) & (x < w) & (y < h)


def map_points_report(
    df: pd.DataFrame, H, target_dimensions, *, x_col: str = "x", y_col: str = "y"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Map the ``x_col``/``y_col`` columns of ``df`` through H.

    Returns ``(mapped_df, outside_df)``: ``mapped_df`` holds every row (coordinates mapped, never
    clipped) plus a boolean ``inside`` column (0 ≤ x < width and 0 ≤ y < height of the target
    slide, ``target_dimensions`` = (width, height)); ``outside_df`` is the rows with ``inside``
    False.
    """
    for c in (x_col, y_col):
        if c not in df.columns:
            raise CellstageError(f"point table has no column {c!r} (columns: {list(df.columns)})")
    out = df.copy()
    xy = map_points(df[[x_col, y_col]].to_numpy(dtype=np.float64), H)
    out[x_col] = xy[:, 0]
    out[y_col] = xy[:, 1]
    out["inside"] = _inside(xy, target_dimensions)
    return out, out.loc[~out["inside"]].copy()


def map_polygons(
    polygons: Iterable[tuple[object, shapely.Geometry]], H
) -> list[tuple[object, shapely.Geometry]]:
    """Map ``[(id, shapely geometry), …]`` through H (every vertex, holes included).

    Vertices are mapped exactly; edges stay straight (a homography maps lines to lines).
    """
    H = _H(H)
    out = []
    for pid, geom in polygons:
        out.append((pid, shapely.transform(geom, lambda c: map_points(c, H))))
    return out


def map_cell_table(
    cells_df: pd.DataFrame, H, target_mpp: float | None, target_dimensions
) -> pd.DataFrame:
    """Cell table (contract columns, source level-0 px) → the same cells in the target frame.

    Same rows and ``cell_id``; centroid mapped; bbox recomputed from the mapped bbox corners
    (floor/ceil, half-open ints); ``area_px`` scaled by the local Jacobian determinant |det J| at
    the centroid, ``perimeter_px`` and ``distance_to_wall_px`` by sqrt|det J|; ``area_um2``
    recomputed as ``area_px × target_mpp²`` when ``target_mpp`` is given (physical quantities
    ``distance_to_wall_um``, ``distance_norm``, ``compactness`` unchanged); ``slide`` is left to
    the caller; adds a boolean ``inside`` (mapped centroid within the target slide).
    """
    H = _H(H)
    out = cells_df.copy()
    if len(out) == 0:
        out["inside"] = pd.Series(dtype=bool)
        return out
    for c in ("centroid_x", "centroid_y"):
        if c not in out.columns:
            raise CellstageError(f"cell table has no column {c!r}")
    src = out[["centroid_x", "centroid_y"]].to_numpy(dtype=np.float64)
    xy = map_points(src, H)
    out["centroid_x"] = xy[:, 0]
    out["centroid_y"] = xy[:, 1]
    jd = np.abs(jacobian_det(H, src))
    lin = np.sqrt(jd)
    bbox_cols = ["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]
    if all(c in out.columns for c in bbox_cols):
        b = cells_df[bbox_cols].to_numpy(dtype=np.float64)
        corners = np.stack(
            [b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]]], axis=1
        )  # (N, 4, 2)
        m = map_points(corners.reshape(-1, 2), H).reshape(-1, 4, 2)
        lo = np.floor(np.nanmin(m, axis=1))
        hi = np.ceil(np.nanmax(m, axis=1))
        finite = np.all(np.isfinite(lo), axis=1) & np.all(np.isfinite(hi), axis=1)
        lo[~finite] = 0
        hi[~finite] = 0
        out["bbox_x0"] = lo[:, 0].astype(np.int64)
        out["bbox_y0"] = lo[:, 1].astype(np.int64)
        out["bbox_x1"] = hi[:, 0].astype(np.int64)
        out["bbox_y1"] = hi[:, 1].astype(np.int64)
    if "area_px" in out.columns:
        out["area_px"] = cells_df["area_px"].to_numpy(dtype=np.float64) * jd
        if "area_um2" in out.columns and target_mpp:
            out["area_um2"] = out["area_px"] * float(target_mpp) ** 2
    if "perimeter_px" in out.columns:
        out["perimeter_px"] = cells_df["perimeter_px"].to_numpy(dtype=np.float64) * lin
    if "distance_to_wall_px" in out.columns:
        d = cells_df["distance_to_wall_px"].to_numpy(dtype=np.float64)
        out["distance_to_wall_px"] = d * lin
    out["inside"] = _inside(xy, target_dimensions)
    return out


# ----------------------------------------------------------------------------------------------
# label images
# ----------------------------------------------------------------------------------------------
def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def warp_labels(
    src_labels_read: Callable[[int, int, int, int], np.ndarray],
    H_src_to_dst,
    dst_shape: tuple[int, int],
    write_tile: Callable[[int, int, np.ndarray], None],
    tile: int = 1024,
    *,
    src_shape: tuple[int, int] | None = None,
    margin: int = 2,
) -> None:
    """Warp a label image into the destination frame tile by tile (nearest neighbour).

    For every destination tile (``tile``×``tile``, row-major) the tile corners are mapped through
    H⁻¹, the source bbox (+ ``margin``) is read with ``src_labels_read(x, y, w, h)`` → (h, w)
    uint32 array, warped with ``cv2.warpPerspective(INTER_NEAREST)`` on the int32 view of the labels
    (bit-exact for every uint32 id; no interpolation mixing), and handed to
    ``write_tile(y0, x0, tile_array)`` (uint32, zeros where no source pixel maps). Memory is
    bounded by one destination tile and its source region.

    ``src_shape`` (h, w) clips reads to the source image; without it, reads start at ≥ 0 and the
    reader may return a smaller array at the far edges (numpy slicing does), padded with 0.
    """
    H = _H(H_src_to_dst)
    Hinv = np.linalg.inv(H)
    Dh, Dw = (int(v) for v in dst_shape)
    tile = int(tile)
    if tile <= 0:
        raise CellstageError(f"tile must be positive, got {tile}")
    for y0 in range(0, Dh, tile):
        for x0 in range(0, Dw, tile):
            th, tw = min(tile, Dh - y0), min(tile, Dw - x0)
            out = np.zeros((th, tw), np.uint32)
            corners = np.array(
                [[x0, y0], [x0 + tw - 1, y0], [x0 + tw - 1, y0 + th - 1], [x0, y0 + th - 1]],
                np.float64,
            )
            w = Hinv[2, 0] * corners[:, 0] + Hinv[2, 1] * corners[:, 1] + Hinv[2, 2]
            if np.any(w <= 0) and np.any(w > 0):
                # tile straddles the horizon of the projective map: fall back to sub-tiles
                half = max(1, tile // 2)
                if half < tile:
                    def sub_write(yy, xx, t, _y0=y0, _x0=x0, _out=out):
                        _out[yy - _y0 : yy - _y0 + t.shape[0], xx - _x0 : xx - _x0 + t.shape[1]] = t
                    _warp_region(src_labels_read, H, y0, x0, th, tw, sub_write, half, src_shape,
                                 margin)
                write_tile(y0, x0, out)
                continue
            src_c = map_points(corners, Hinv)
            if not np.all(np.isfinite(src_c)):
                write_tile(y0, x0, out)
                continue
            sx0 = int(np.floor(src_c[:, 0].min())) - margin
            sy0 = int(np.floor(src_c[:, 1].min())) - margin
            sx1 = int(np.ceil(src_c[:, 0].max())) + margin + 1
            sy1 = int(np.ceil(src_c[:, 1].max())) + margin + 1
            sx0, sy0 = max(0, sx0), max(0, sy0)
            if src_shape is not None:
                sx1, sy1 = min(int(src_shape[1]), sx1), min(int(src_shape[0]), sy1)
            if sx1 <= sx0 or sy1 <= sy0:
                write_tile(y0, x0, out)
                continue
            region = _read_labels(src_labels_read, sx0, sy0, sx1 - sx0, sy1 - sy0)
            if region.size and region.any():
                # dst-tile-local → src-region-local
                M = _translation(-sx0, -sy0) @ Hinv @ _translation(x0, y0)
                warped = cv2.warpPerspective(
                    region.view(np.int32), M, (tw, th),
                    flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=0,
                )
                out = warped.view(np.uint32)
            write_tile(y0, x0, out)


def _warp_region(read, H, y0, x0, th, tw, write, tile, src_shape, margin):
    """warp_labels restricted to a destination sub-rectangle (used at projective horizons)."""
    T = _translation(-x0, -y0)

    def local_write(yy, xx, t):
        write(yy + y0, xx + x0, t)

    if tile < 16:  # give up on pathological tiles; they stay 0
        return
    warp_labels(read, T @ H, (th, tw), local_write, tile, src_shape=src_shape, margin=margin)


def _read_labels(read, x, y, w, h) -> np.ndarray:
    a = np.asarray(read(int(x), int(y), int(w), int(h)))
    if a.ndim != 2:
        raise CellstageError(f"label reader returned shape {a.shape}, expected (h, w)")
    if a.dtype != np.uint32:
        if a.dtype.kind not in "ui":
            raise CellstageError(f"label image must be integer, got {a.dtype}")
        if a.size and (a.min() < 0 or a.max() > np.iinfo(np.uint32).max):
            raise CellstageError("label ids must fit in uint32")
        a = a.astype(np.uint32)
    if a.shape != (h, w):
        pad = np.zeros((h, w), np.uint32)
        pad[: min(h, a.shape[0]), : min(w, a.shape[1])] = a[:h, :w]
        a = pad
    return np.ascontiguousarray(a)


def warp_labels_zarr(src_zarr_array, H, dst_zarr_array, tile: int = 1024) -> None:
    """:func:`warp_labels` between two 2-D (y, x) zarr arrays (dst must exist with its shape).

    ``tile`` should be a multiple of the destination chunk size so each chunk is written once.
    """
    if len(src_zarr_array.shape) != 2 or len(dst_zarr_array.shape) != 2:
        raise CellstageError(
            f"label arrays must be 2-D (y, x): src {src_zarr_array.shape}, "
            f"dst {dst_zarr_array.shape}"
        )
    sh, sw = src_zarr_array.shape

    def read(x, y, w, h):
        return np.asarray(src_zarr_array[y : y + h, x : x + w])

    def write(y0, x0, t):
        dst_zarr_array[y0 : y0 + t.shape[0], x0 : x0 + t.shape[1]] = t.astype(dst_zarr_array.dtype)

    warp_labels(read, H, tuple(dst_zarr_array.shape), write, tile, src_shape=(sh, sw))


# ----------------------------------------------------------------------------------------------
# what lands outside the target slide
# ----------------------------------------------------------------------------------------------
def outside_report(
    target_dimensions,
    *,
    cells: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    points: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    tubules: list[tuple[object, shapely.Geometry]] | None = None,
) -> pd.DataFrame:
    """One row per cell, point annotation or tubule that maps outside the target slide.

    Nothing is clipped: each row gives ``kind`` (cell, point, tubule), ``id``, ``label``, the
    source coordinates and the mapped ones (:data:`OUTSIDE_COLUMNS`), as the mapping put them.

    ``cells`` = (source cell table, :func:`map_cell_table` of it) (rows with ``inside`` False are
    reported, joined to their source row by ``cell_id``); ``points`` = (source point table,
    :func:`map_points_report` table of it) (rows with ``inside`` False, joined by index);
    ``tubules`` = mapped ``[(id, geometry)]`` (those not covered by the slide frame
    ``0 ≤ x ≤ width, 0 ≤ y ≤ height``, mapped centroid; tubules have no single source point).
    ``target_dimensions`` = (width, height) of the target slide in level-0 px.
    """
    from shapely.geometry import box

    frames = []
    if cells is not None:
        source, mapped = cells
        off = mapped[~mapped["inside"].astype(bool)]
        src = source.set_index("cell_id").loc[off["cell_id"]]
        frames.append(pd.DataFrame({
            "kind": "cell", "id": off["cell_id"].astype(str).to_numpy(),
            "label": off["label"].to_numpy() if "label" in off else "",
            "source_x": src["centroid_x"].to_numpy(), "source_y": src["centroid_y"].to_numpy(),
            "mapped_x": off["centroid_x"].to_numpy(), "mapped_y": off["centroid_y"].to_numpy()}))
    if points is not None:
        source, mapped = points
        off = mapped[~mapped["inside"].astype(bool)] if "inside" in mapped else mapped.iloc[0:0]
        frames.append(pd.DataFrame({
            "kind": "point", "id": off.index.astype(str), "label": off["label"].to_numpy(),
            "source_x": source.loc[off.index, "x"].to_numpy(),
            "source_y": source.loc[off.index, "y"].to_numpy(),
            "mapped_x": off["x"].to_numpy(), "mapped_y": off["y"].to_numpy()}))
    if tubules is not None:
        w, h = (float(v) for v in target_dimensions)
        frame = box(0, 0, w, h)
        off_t = [(rid, g) for rid, g in tubules if not frame.covers(g)]
        frames.append(pd.DataFrame({
            "kind": "tubule", "id": [str(r) for r, _ in off_t], "label": "Tubule",
            "source_x": np.nan, "source_y": np.nan,
            "mapped_x": [g.centroid.x for _, g in off_t], "mapped_y": [g.centroid.y for _, g in off_t]}))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True)[OUTSIDE_COLUMNS] if frames else pd.DataFrame(columns=OUTSIDE_COLUMNS)
