"""Single-cell crops from a converted slide + its label image.

Speed comes from reading each slide area once: cells are grouped into spatial blocks
(``block`` px squares of crop-window origins), each block's bounding region is read from the
image and label zarr in one call (padded white / 0 outside the slide), and all its crops are
cut from memory. Memory is bounded by one block plus one write buffer, not by the slide.
Crops are written in block order (so neighbouring cells share chunks); ``row`` in the index
is the position in the zarr arrays.

Crop window (never shifted): ``cx = floor(centroid_x + 0.5)``, columns
``[cx - size//2, cx - size//2 + size)``; the centroid pixel is at crop index ``size//2``.

Point-anchored rows of the cell table (``anchor = "point"``: an annotation that matched no
nucleus) are cropped the same way around the point; their nucleus mask (and so the
without-background crop) comes from a point-prompted classical segmentation of the crop window
itself (:func:`cellstage.segment.classical.segment_at_point`, expected nucleus diameter
``PROMPT_DIAMETER * size``). The index says which: ``anchor`` (nucleus / point) and
``mask_source`` (``segmentation`` = the slide's label image, ``point_prompt``, or ``none`` = no
object near the point: empty mask, black without-background crop).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import CellstageError, atomic_path, release_free_memory

TRIM_EVERY = 8  # blocks between malloc_trim calls
INDEX_ROWS = 65536  # rows per row group of the index parquet (written as the crops are)
INDEX_COLUMNS = ["row", "cell_id", "slide", "section", "scan", "patient", "split", "label",
                 "label_idx", "centroid_x", "centroid_y", "distance_to_wall_um", "distance_norm",
                 "anchor", "mask_source"]
ANCHORS = ["nucleus", "point"]
MASK_SOURCES = ["segmentation", "point_prompt", "none"]
# Expected nucleus diameter of a point prompt as a share of the crop edge: 12 px (the classical
# segmenter's min_diameter) at 80 px crops (40x); the crop edge is set per scan, so this scales
# with the magnification.
PROMPT_DIAMETER = 0.15


def window_origin(coord, size: int) -> np.ndarray:
    """Top/left of the crop window for centroid coordinate(s): round half up, minus size//2."""
    return np.floor(np.asarray(coord, dtype=np.float64) + 0.5).astype(np.int64) - size // 2


def _blocks(wx0: np.ndarray, wy0: np.ndarray, block: int):
    """Order of cells (spatial) and the [start, stop) segments of that order, one per block."""
    bx = np.floor_divide(wx0, block)
    by = np.floor_divide(wy0, block)
    order = np.lexsort((wx0, wy0, bx, by))
    key = by[order] * (1 << 32) + bx[order]
    cuts = np.flatnonzero(np.diff(key)) + 1
    starts = np.concatenate([[0], cuts]).astype(np.int64)
    stops = np.concatenate([cuts, [len(order)]]).astype(np.int64)
    return order, list(zip(starts.tolist(), stops.tolist()))


def read_padded(arr, y0: int, x0: int, h: int, w: int, fill, read=None) -> np.ndarray:
    """arr[..., y0:y0+h, x0:x0+w] of a (y, x) or (c, y, x) array-like, ``fill`` outside.

    ``read``: a :func:`cellstage.io.chunks.region_reader` of ``arr`` (else ``arr[...]``)."""
    H, W = arr.shape[-2:]
    lead = tuple(arr.shape[:-2])
    ya, yb = max(y0, 0), min(y0 + h, H)
    xa, xb = max(x0, 0), min(x0 + w, W)

    def get():
        if read is not None:
            return read((0,) * len(lead) + (ya, xa), lead + (yb, xb))
        return np.asarray(arr[(Ellipsis, slice(ya, yb), slice(xa, xb))])

    if (ya, yb, xa, xb) == (y0, y0 + h, x0, x0 + w):  # inside: no padding copy
        return get()
    out = np.full(lead + (h, w), fill, dtype=arr.dtype)
    if ya < yb and xa < xb:
        out[(Ellipsis, slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))] = get()
    return out


def gather_windows(src: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, ...) copies of ``src[y:y+size, x:x+size]`` for every (y, x), one gather.

    Windows must lie inside ``src`` (callers read a padded region covering all of them).
    """
    src = np.ascontiguousarray(src)
    H, W = src.shape[:2]
    if len(ys) and (ys.min() < 0 or xs.min() < 0 or ys.max() + size > H or xs.max() + size > W):
        raise ValueError("window outside the source region")
    rest = src.shape[2:]
    view = np.lib.stride_tricks.as_strided(
        src,
        shape=(H - size + 1, W - size + 1, size, size) + rest,
        strides=(src.strides[0], src.strides[1], src.strides[0], src.strides[1]) + src.strides[2:],
        writeable=False,
    )
    return view[np.asarray(ys, np.intp), np.asarray(xs, np.intp)]


def cut_cells(region: np.ndarray, labreg: np.ndarray, ys: np.ndarray, xs: np.ndarray, ids: np.ndarray,
              size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, masked, masks) for windows at (ys, xs) of an (h, w, 3) region and its labels."""
    import cv2

    m = len(ys)
    imgs = gather_windows(region, ys, xs, size)
    masks = gather_windows(labreg, ys, xs, size) == ids.astype(labreg.dtype, copy=False)[:, None, None]
    masked = np.zeros_like(imgs)
    if m:  # cv2's masked AND: ~5x faster than numpy's uint8 * bool
        flat = imgs.reshape(m * size, size, 3)
        cv2.bitwise_and(flat, flat, dst=masked.reshape(m * size, size, 3),
                        mask=masks.view(np.uint8).reshape(m * size, size))
    return imgs, masked, masks


def prompt_mask(image: np.ndarray, masked: np.ndarray, mask: np.ndarray, x: float, y: float, size: int) -> int:
    """Fill ``mask`` and ``masked`` (in place) of one point-anchored crop from a point-prompted
    segmentation of its ``image`` (point at crop px ``x``, ``y``); returns the MASK_SOURCES code."""
    from ..segment.classical import segment_at_point

    m = segment_at_point(image, x, y, min_diameter=PROMPT_DIAMETER * size)
    mask[...] = m
    masked[...] = image * m[..., None]
    return MASK_SOURCES.index("point_prompt" if m.any() else "none")


# --------------------------------------------------------------------------- arbitrary points
def crops_at_points(slide, xs, ys, size: int, *, block: int = 2048) -> np.ndarray:
    """(N, size, size, 3) uint8 crops centred on level-0 points of a Slide/ZarrSlide.

    Same window rule as :func:`extract_crops` (round half up, ``[c - size//2, c - size//2 + size)``),
    white outside the slide, never shifted. Output is in input order.
    """
    size = int(size)
    xs = np.asarray(xs, dtype=np.float64).ravel()
    ys = np.asarray(ys, dtype=np.float64).ravel()
    if xs.shape != ys.shape:
        raise CellstageError(f"crops_at_points: {len(xs)} x values but {len(ys)} y values")
    out = np.empty((len(xs), size, size, 3), dtype=np.uint8)
    if len(xs) == 0:
        return out
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise CellstageError(f"{getattr(slide, 'path', 'slide')}: non-finite point coordinates")
    wx0, wy0 = window_origin(xs, size), window_origin(ys, size)
    order, segs = _blocks(wx0, wy0, block)
    for a, b in segs:
        idx = order[a:b]
        gx, gy = wx0[idx], wy0[idx]
        rx0, ry0 = int(gx.min()), int(gy.min())
        rw, rh = int(gx.max()) + size - rx0, int(gy.max()) + size - ry0
        region = slide.read_region(rx0, ry0, rw, rh, 0)
        out[idx] = gather_windows(region, gy - ry0, gx - rx0, size)
    return out


# --------------------------------------------------------------------------- cell crops
def _labels_array(labels_zarr):
    import zarr

    p = Path(labels_zarr)
    if not p.exists():
        raise CellstageError(f"{p}: label image zarr not found")
    try:
        node = zarr.open(str(p), mode="r")
    except Exception as e:
        raise CellstageError(f"{p}: cannot open label zarr ({type(e).__name__}: {e})") from e
    if hasattr(node, "shape"):
        arr = node
    else:
        if "labels" not in node:
            raise CellstageError(f"{p}: label zarr group has no array 'labels'")
        arr = node["labels"]
    if arr.ndim != 2:
        raise CellstageError(f"{p}: 'labels' must be 2-D (y, x), got shape {arr.shape}")
    return arr


def label_indices(labels: pd.Series, classes: list[str], source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row class codes without one Python string per row.

    Returns ``(names, code, label_idx)``: ``names[code[i]]`` is row i's label ("" for none) and
    ``label_idx[i]`` its index in ``classes`` (-1 for none). Unknown labels raise.
    """
    cat = labels.array if isinstance(labels.dtype, pd.CategoricalDtype) else pd.Categorical(labels)
    names = [str(c) for c in cat.categories]
    lut = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for c in names if c and c not in lut})
    if unknown:
        raise CellstageError(
            f"{source}: unknown label(s) {unknown} not among the configured classes {list(classes)}"
        )
    codes = np.asarray(cat.codes, dtype=np.int32)
    codes = np.where(codes < 0, len(names), codes)  # missing -> the trailing ""
    idx_of = np.array([lut.get(c, -1) for c in names] + [-1], dtype=np.int8 if len(classes) < 127 else np.int32)
    return np.array(names + [""], dtype=object), codes, idx_of[codes]


def _index_schema():
    import pyarrow as pa

    types = {"row": pa.int64(), "cell_id": pa.int64(), "label_idx": pa.int64(), "centroid_x": pa.float64(),
             "centroid_y": pa.float64(), "distance_to_wall_um": pa.float64(), "distance_norm": pa.float64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in INDEX_COLUMNS])


def extract_crops(
    slide_zarr,
    labels_zarr,
    cells_parquet,
    out_zarr,
    out_index,
    *,
    size: int,
    meta: dict,
    classes: list[str],
    batch: int = 256,
    block: int = 2048,
) -> dict:
    """Cut size×size crops for every cell of ``cells_parquet``; see module docstring.

    Writes the zarr v3 group ``out_zarr`` (``images`` (N,s,s,3) uint8 with background,
    ``masked`` (N,s,s,3) uint8 with non-cell pixels 0, ``masks`` (N,s,s) bool; the sharded
    layout of :mod:`cellstage.crops.store`) and then the index parquet ``out_index`` (columns
    ``INDEX_COLUMNS``). Both are atomic (temp + rename; the parquet is renamed last).
    ``batch``: crops cut and handed to the writer at a time. ``block``: edge (px) of the
    square areas of crop-window origins read in one piece (a 2048 block of an 80 px crop
    reads a 2128² region: 14 MB of RGB and 18 MB of labels). Larger blocks decode fewer chunk
    borders twice but were not faster here, and their varying ~50-70 MB regions made peak RSS
    creep up with the number of blocks (allocator reuse across threads) on a 60k² slide.
    """
    import zarr

    from ..io.chunks import region_reader
    from ..io.slides import ZarrSlide
    from .store import CropStoreWriter, create_crop_arrays

    t0 = time.perf_counter()
    size = int(size)
    if size <= 0:
        raise CellstageError(f"{out_zarr}: crop size must be > 0, got {size}")
    cells_parquet = Path(cells_parquet)
    if not cells_parquet.exists():
        raise CellstageError(f"{cells_parquet}: cell table not found")
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted = ["cell_id", "centroid_x", "centroid_y", "label", "distance_to_wall_um", "distance_norm", "anchor"]
    present = set(pq.read_schema(cells_parquet).names)
    # not the whole table, and labels as categories: no Python string per nucleus
    cells = pq.read_table(cells_parquet, columns=[c for c in wanted if c in present],
                          read_dictionary=[c for c in ("label", "anchor") if c in present] or None)
    cells = cells.to_pandas(split_blocks=True, self_destruct=True)
    pa.default_memory_pool().release_unused()  # else arrow's pool keeps the table's buffers too
    release_free_memory()
    for col in ("cell_id", "centroid_x", "centroid_y"):
        if col not in cells.columns:
            raise CellstageError(f"{cells_parquet}: cell table lacks column {col!r}")
    n = len(cells)
    label_names, label_code, label_idx = label_indices(
        cells["label"] if "label" in cells.columns else pd.Series(pd.Categorical([""] * n)), classes, cells_parquet
    )
    cx = cells["centroid_x"].to_numpy(np.float64)
    cy = cells["centroid_y"].to_numpy(np.float64)
    if n and not (np.isfinite(cx).all() and np.isfinite(cy).all()):
        raise CellstageError(f"{cells_parquet}: non-finite centroid_x/centroid_y")
    cell_ids = cells["cell_id"].to_numpy()
    at_point = (cells["anchor"] == "point").to_numpy(bool) if "anchor" in cells.columns else np.zeros(n, bool)
    mask_code = np.zeros(n, np.int8)  # index into MASK_SOURCES, per cell position

    slide = ZarrSlide(slide_zarr)
    img_arr = slide.arrays[0]  # (c, y, x)
    lab_arr = _labels_array(labels_zarr)
    if tuple(lab_arr.shape) != tuple(img_arr.shape[-2:]):
        raise CellstageError(
            f"{labels_zarr}: label image shape {tuple(lab_arr.shape)} differs from slide level 0 "
            f"{tuple(img_arr.shape[-2:])} ({slide_zarr})"
        )
    read_labels = region_reader(lab_arr)

    wx0, wy0 = window_origin(cx, size), window_origin(cy, size)
    order, segs = _blocks(wx0, wy0, block) if n else (np.zeros(0, np.int64), [])
    batch = max(1, int(batch))

    out_zarr, out_index = Path(out_zarr), Path(out_index)
    t_read = t_cut = 0.0
    schema = _index_schema()
    const = {c: str(meta.get(c, "")) for c in ("slide", "section", "scan", "patient", "split")}
    extra = {c: cells[c].to_numpy(np.float64) if c in cells.columns else None
             for c in ("distance_to_wall_um", "distance_norm")}
    pending: list[np.ndarray] = []  # cell positions (in block order) not yet in the index file
    n_pending = n_indexed = 0

    def flush_index(iw, force=False):
        """Append the pending rows to the index parquet as one row group (>= INDEX_ROWS rows)."""
        nonlocal n_pending, n_indexed
        if not n_pending or (not force and n_pending < INDEX_ROWS):
            return
        pos = np.concatenate(pending)
        pending.clear()
        m, n_pending = len(pos), 0
        cols = {
            "row": np.arange(n_indexed, n_indexed + m, dtype=np.int64),
            "cell_id": cell_ids[pos].astype(np.int64),
            **{c: pa.DictionaryArray.from_arrays(np.zeros(m, np.int8), [v]) for c, v in const.items()},
            "label": pa.DictionaryArray.from_arrays(label_code[pos], label_names.tolist()),
            "label_idx": label_idx[pos].astype(np.int64),
            "centroid_x": cx[pos],
            "centroid_y": cy[pos],
            **{c: (v[pos] if v is not None else np.full(m, np.nan)) for c, v in extra.items()},
            "anchor": pa.DictionaryArray.from_arrays(at_point[pos].astype(np.int8), ANCHORS),
            "mask_source": pa.DictionaryArray.from_arrays(mask_code[pos], MASK_SOURCES),
        }
        arrays = [pa.array(cols[c]) if isinstance(cols[c], np.ndarray) else cols[c].cast(pa.string())
                  for c in INDEX_COLUMNS]
        iw.write_table(pa.Table.from_arrays(arrays, schema=schema))
        n_indexed += m

    with atomic_path(out_index) as tmp_index, pq.ParquetWriter(str(tmp_index), schema) as iw:
        with atomic_path(out_zarr) as tmp_zarr:
            root = zarr.open_group(str(tmp_zarr), mode="w", zarr_format=3)
            writer = CropStoreWriter(tmp_zarr, create_crop_arrays(root, n, size))

            def load(seg):
                a, b = seg
                idx = order[a:b]
                rx0, ry0 = int(wx0[idx].min()), int(wy0[idx].min())
                rw, rh = int(wx0[idx].max()) + size - rx0, int(wy0[idx].max()) + size - ry0
                region = slide.read_region(rx0, ry0, rw, rh, 0)  # (rh, rw, 3), white outside
                labreg = read_padded(lab_arr, ry0, rx0, rh, rw, 0, read_labels)
                return idx, rx0, ry0, region, labreg

            from concurrent.futures import ThreadPoolExecutor

            reader = ThreadPoolExecutor(1)  # prefetch the next block while cutting this one
            nxt = None
            try:
                nxt = reader.submit(load, segs[0]) if segs else None
                for k in range(len(segs)):
                    t = time.perf_counter()
                    idx_all, rx0, ry0, region, labreg = nxt.result()
                    nxt = reader.submit(load, segs[k + 1]) if k + 1 < len(segs) else None
                    t_read += time.perf_counter() - t
                    t = time.perf_counter()
                    for c0 in range(0, len(idx_all), batch):
                        idx = idx_all[c0: c0 + batch]
                        images, masked, masks = cut_cells(region, labreg, wy0[idx] - ry0, wx0[idx] - rx0,
                                                          cell_ids[idx], size)
                        for j in np.flatnonzero(at_point[idx]):
                            mask_code[idx[j]] = prompt_mask(images[j], masked[j], masks[j], cx[idx[j]] - wx0[idx[j]],
                                                            cy[idx[j]] - wy0[idx[j]], size)
                        writer.add(images=images, masked=masked, masks=masks)
                    pending.append(idx_all)
                    n_pending += len(idx_all)
                    flush_index(iw)
                    t_cut += time.perf_counter() - t
                    del region, labreg
                    if k % TRIM_EVERY == TRIM_EVERY - 1:
                        release_free_memory()  # else freed pages pile up in the threads' arenas
            except BaseException:
                writer.abort()
                raise
            finally:
                if nxt is not None:
                    nxt.cancel()
                reader.shutdown(wait=True)
            t = time.perf_counter()
            writer.close()  # waits for the writer threads, writes the last shard indices
            t_write = time.perf_counter() - t
            assert writer.n_written == n, (writer.n_written, n)

            root.attrs.update({
                "cellstage": {
                    "kind": "crops",
                    "size": size,
                    "n": n,
                    "slide_zarr": str(slide_zarr),
                    "labels_zarr": str(labels_zarr),
                    "cells": str(cells_parquet),
                    "classes": list(classes),
                    "meta": {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v))
                             for k, v in dict(meta).items()},
                    "mpp": slide.mpp,
                    "window": "[round(c) - size//2, round(c) - size//2 + size), white/0 padding",
                    "order": "spatial blocks; see index parquet column 'row'",
                    "point_prompt": f"classical, crop window, nucleus diameter {PROMPT_DIAMETER} x size",
                }
            })

            flush_index(iw, force=True)
            assert n_indexed == n, (n_indexed, n)
        # zarr renamed into place here; parquet renamed last on leaving the outer block
    slide.close()
    dt = time.perf_counter() - t0
    return {
        "n": n,
        "size": size,
        "seconds": round(dt, 3),
        "crops_per_s": round(n / dt, 1) if dt > 0 else None,
        "t_read": round(t_read, 3),
        "t_cut": round(t_cut, 3),
        "t_write": round(t_write, 3),
        "blocks": len(segs),
        "point_anchored": int(at_point.sum()),
        **{f"mask_{k}": int((mask_code == i).sum()) for i, k in enumerate(MASK_SOURCES)},
        "zarr": str(out_zarr),
        "index": str(out_index),
    }
