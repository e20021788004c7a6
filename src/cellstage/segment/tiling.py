"""Tiled whole-slide nucleus segmentation restricted to ROIs, with border-safe stitching.

Tiling
    A global grid of ``tile`` x ``tile`` *cores* (origin 0, 0) over level 0; only cores that
    intersect a ROI polygon are processed (STRtree query). Each core is read with ``overlap``
    px of context on every side, the window clipped to the slide bounds (edge tiles are
    smaller; no padding pixels are segmented).

Stitching (no split, no duplicate)
    From each tile the segmenter's objects are kept when their centroid lies inside the core
    grown by ``margin`` px (default ``overlap // 4``) **and** inside a ROI polygon. Because
    ``overlap`` exceeds the largest nucleus, a kept object is always complete inside the read
    window. An object whose centroid falls near a core border is therefore found by both
    neighbouring tiles (no miss even when the two tiles place the centroid slightly
    differently); tiles run in raster order and a candidate that overlaps an already written
    object (overlap ≥ ``dup_fraction`` of either object's area within the window) is a
    duplicate and dropped. Otherwise it is written only into still-unlabelled pixels (labels
    already written stay), so objects never split or overwrite each other. Ids are a running
    counter 1, 2, … (uint32), unique across the slide.

Output
    ``write_labels`` is either an array-like with numpy slicing (a zarr array (y, x) uint32:
    windows are read back and written in place; memory ~ one tile) or a callable
    ``write_labels(y0, x0, block)``: then labels live in a chunk cache (512² chunks) of the
    rows still reachable by later tiles and every chunk is passed to the callable exactly once,
    when no later tile can touch it (memory ~ one tile row band).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from ..utils import CellstageError

log = logging.getLogger("cellstage.segment")


# --------------------------------------------------------------------------- label stores
class _ArrayStore:
    """Read/write windows of a zarr/numpy (y, x) array, clipped to its shape."""

    def __init__(self, arr):
        self.arr = arr
        self.shape = tuple(arr.shape)

    def read(self, y0, x0, h, w):
        return np.asarray(self.arr[y0:y0 + h, x0:x0 + w])

    def write(self, y0, x0, block):
        self.arr[y0:y0 + block.shape[0], x0:x0 + block.shape[1]] = block

    def release_above(self, y):  # nothing cached
        pass

    def flush(self):
        pass


class _CallbackStore:
    """Chunk cache; a chunk is handed to ``callback(y0, x0, block)`` once no later tile can touch it."""

    def __init__(self, callback, shape, chunk=512):
        self.cb = callback
        self.shape = tuple(shape)
        self.chunk = chunk
        self.chunks: dict[tuple[int, int], np.ndarray] = {}

    def _chunk(self, cy, cx, create):
        key = (cy, cx)
        c = self.chunks.get(key)
        if c is None and create:
            H, W = self.shape
            c = np.zeros((min(self.chunk, H - cy * self.chunk), min(self.chunk, W - cx * self.chunk)), np.uint32)
            self.chunks[key] = c
        return c

    def _iter(self, y0, x0, h, w):
        C = self.chunk
        for cy in range(y0 // C, (y0 + h - 1) // C + 1):
            for cx in range(x0 // C, (x0 + w - 1) // C + 1):
                ys, xs = max(y0, cy * C), max(x0, cx * C)
                ye, xe = min(y0 + h, (cy + 1) * C), min(x0 + w, (cx + 1) * C)
                yield cy, cx, ys, xs, ye, xe

    def read(self, y0, x0, h, w):
        out = np.zeros((h, w), np.uint32)
        for cy, cx, ys, xs, ye, xe in self._iter(y0, x0, h, w):
            c = self._chunk(cy, cx, False)
            if c is not None:
                C = self.chunk
                out[ys - y0:ye - y0, xs - x0:xe - x0] = c[ys - cy * C:ye - cy * C, xs - cx * C:xe - cx * C]
        return out

    def write(self, y0, x0, block):
        h, w = block.shape
        C = self.chunk
        for cy, cx, ys, xs, ye, xe in self._iter(y0, x0, h, w):
            sub = block[ys - y0:ye - y0, xs - x0:xe - x0]
            if not sub.any() and (cy, cx) not in self.chunks:
                continue
            c = self._chunk(cy, cx, True)
            c[ys - cy * C:ye - cy * C, xs - cx * C:xe - cx * C] = sub

    def release_above(self, y):
        """Hand over chunks lying entirely above row ``y`` (no later tile reaches them)."""
        C = self.chunk
        for key in sorted(k for k in self.chunks if (k[0] + 1) * C <= y):
            self.cb(key[0] * C, key[1] * C, self.chunks.pop(key))

    def flush(self):
        self.release_above(10**18)


def _make_store(write_labels, shape):
    if callable(write_labels) and not hasattr(write_labels, "__setitem__"):
        return _CallbackStore(write_labels, shape)
    if hasattr(write_labels, "__setitem__") and hasattr(write_labels, "shape"):
        if tuple(write_labels.shape[:2]) != tuple(shape):
            raise CellstageError(f"label array has shape {tuple(write_labels.shape)}, slide is {shape} (h, w)")
        return _ArrayStore(write_labels)
    raise CellstageError("write_labels must be a (y, x) array (e.g. zarr) or a callable(y0, x0, block)")


# --------------------------------------------------------------------------- tiling
def tile_grid(rois, dimensions, tile: int, margin: int = 0) -> list[tuple[int, int]]:
    """(x0, y0) of the cores of a global ``tile`` grid that intersect any ROI (cores grown by
    ``margin``), in raster order (row by row)."""
    import shapely
    from shapely.geometry import box

    W, H = dimensions
    polys = [p for _, p in rois]
    if not polys:
        return []
    tree = shapely.STRtree(polys)
    minx, miny, maxx, maxy = shapely.total_bounds(np.array(polys, dtype=object))
    gx0 = max(0, int((minx - margin) // tile))
    gy0 = max(0, int((miny - margin) // tile))
    gx1 = min(math.ceil(W / tile) - 1, int((maxx + margin) // tile))
    gy1 = min(math.ceil(H / tile) - 1, int((maxy + margin) // tile))
    cells = []
    for gy in range(gy0, gy1 + 1):
        for gx in range(gx0, gx1 + 1):
            x0, y0 = gx * tile, gy * tile
            b = box(x0 - margin, y0 - margin, x0 + tile + margin, y0 + tile + margin)
            if len(tree.query(b, predicate="intersects")):
                cells.append((x0, y0))
    return cells


def _object_table(lab: np.ndarray):
    """ids, centroid rows, centroid cols, areas, bbox slices of a label image (ids > 0)."""
    from scipy import ndimage as ndi

    ids = np.unique(lab)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return ids, np.zeros(0), np.zeros(0), np.zeros(0, np.int64), []
    com = np.array(ndi.center_of_mass(np.ones_like(lab, dtype=np.uint8), lab, ids), float).reshape(-1, 2)
    areas = ndi.sum_labels(np.ones_like(lab, dtype=np.int64), lab, ids).astype(np.int64)
    slices = ndi.find_objects(lab.astype(np.int32) if lab.dtype != np.int32 else lab)
    sl = [slices[i - 1] for i in ids]
    return ids, com[:, 0], com[:, 1], areas, sl


def segment_slide(
    slide,
    rois,
    model_path,
    write_labels,
    *,
    tile: int = 1024,
    overlap: int = 128,
    diameter: float | None = None,
    batch_size: int = 8,
    classical: bool = False,
    progress: bool = True,
    margin: int | None = None,
    dup_fraction: float = 0.3,
    min_area: int = 15,
    segmenter=None,
) -> dict:
    """Segment nuclei over level 0 of ``slide`` inside ``rois`` and write global labels.

    ``slide``: object with ``dimensions`` (w, h) and ``read_region(x, y, w, h, level=0)``
    → (h, w, 3) uint8. ``rois``: list of (roi_id, shapely Polygon) in level-0 px.
    ``model_path``: Cellpose model file (ignored when ``classical=True``; the
    caller decides, this function only logs which one runs). ``write_labels``: zarr array
    (y, x) uint32 of the slide's level-0 shape, or callable(y0, x0, block).
    ``segmenter``: optional callable rgb → labels overriding both (tests, other models).
    Returns {"n_nuclei", "n_tiles", "megapixels", "seconds", "mp_per_s", "segmenter",
    "n_duplicates_dropped", "n_outside_roi_dropped"}.
    """
    import shapely

    t0 = time.time()
    W, H = (int(v) for v in slide.dimensions)
    if overlap < 0 or tile <= 0:
        raise CellstageError(f"bad tiling: tile={tile}, overlap={overlap}")
    margin = overlap // 4 if margin is None else int(margin)
    if margin > overlap // 2:
        raise CellstageError(f"margin {margin} must be ≤ overlap/2 ({overlap // 2})")
    if segmenter is not None:
        seg, name = segmenter, getattr(segmenter, "name", "custom")
    elif classical:
        seg, name = None, "classical"  # threshold estimated once per slide, after the tile grid
    else:
        from .cellpose_seg import CellposeSegmenter

        seg = CellposeSegmenter(model_path, diameter=diameter, batch_size=batch_size)
        name = seg.name
    log.info("segmenting %s with %s (tile %d, overlap %d, %d ROIs)",
             getattr(slide, "path", "slide"), name, tile, overlap, len(rois))

    store = _make_store(write_labels, (H, W))
    polys = [p for _, p in rois]
    for p in polys:
        shapely.prepare(p)
    tree = shapely.STRtree(polys) if polys else None
    cells = tile_grid(rois, (W, H), tile, margin)
    extra = {}
    if segmenter is None and classical:
        from functools import partial

        from .classical import segment_classical, slide_threshold

        thr = slide_threshold(slide, rois, cells, tile)
        extra["classical_threshold"] = round(thr, 6)
        seg, name = partial(segment_classical, threshold=thr), f"classical (threshold {thr:.3f})"
    elif callable(getattr(seg, "fit_normalization", None)) and getattr(seg, "lowhigh", None) is None and cells:
        # one intensity normalisation per slide, so the result does not depend on the tiling
        extra["normalization_lowhigh"] = np.round(seg.fit_normalization(slide, cells, tile), 4).tolist()
    next_id = 1
    n_dup = n_out = 0
    mp = core_mp = 0.0
    it = cells
    if progress:
        from tqdm import tqdm

        it = tqdm(cells, desc="segment", unit="tile", mininterval=5)
    cur_row = None
    for x0, y0 in it:
        if cur_row is not None and y0 != cur_row:
            store.release_above(y0 - overlap)
        cur_row = y0
        # read window = core + overlap, clipped to the slide (no padding: Cellpose takes any size)
        rx, ry = max(x0 - overlap, 0), max(y0 - overlap, 0)
        rw = min(x0 + tile + overlap, W) - rx
        rh = min(y0 + tile + overlap, H) - ry
        rgb = np.asarray(slide.read_region(rx, ry, rw, rh, level=0))[..., :3]
        mp += rw * rh / 1e6
        core_mp += (min(x0 + tile, W) - x0) * (min(y0 + tile, H) - y0) / 1e6
        lab = np.asarray(seg(rgb))
        ids, cy, cx, areas, sls = _object_table(lab)
        if len(ids) == 0:
            continue
        gy, gx = cy + ry, cx + rx
        lo_x, hi_x = x0 - margin, min(x0 + tile, W) + margin
        lo_y, hi_y = y0 - margin, min(y0 + tile, H) + margin
        in_core = (gx >= lo_x) & (gx < hi_x) & (gy >= lo_y) & (gy < hi_y) & (areas >= min_area)
        in_roi = np.zeros(len(ids), bool)
        if tree is not None and in_core.any():
            idx = np.flatnonzero(in_core)
            pts = shapely.points(gx[idx], gy[idx])
            hit, _ = tree.query(pts, predicate="within")
            in_roi[idx[np.unique(hit)]] = True
        n_out += int((in_core & ~in_roi).sum())
        keep = np.flatnonzero(in_core & in_roi)
        if len(keep) == 0:
            continue
        # window of the store covering the read region, clipped to the slide
        wy0, wx0 = max(ry, 0), max(rx, 0)
        wy1, wx1 = min(ry + rh, H), min(rx + rw, W)
        if wy1 <= wy0 or wx1 <= wx0:
            continue
        win = store.read(wy0, wx0, wy1 - wy0, wx1 - wx0)
        before = win.copy()
        oy, ox = wy0 - ry, wx0 - rx  # window origin inside the tile
        for k in keep:
            sy, sx = sls[k]
            # crop in window coordinates
            ty0, ty1 = max(sy.start - oy, 0), min(sy.stop - oy, win.shape[0])
            tx0, tx1 = max(sx.start - ox, 0), min(sx.stop - ox, win.shape[1])
            if ty1 <= ty0 or tx1 <= tx0:
                continue
            obj = lab[ty0 + oy:ty1 + oy, tx0 + ox:tx1 + ox] == ids[k]
            sub = win[ty0:ty1, tx0:tx1]
            prev = sub[obj]
            claimed = prev[prev > 0]
            if claimed.size:
                vals, cnt = np.unique(claimed, return_counts=True)
                j = int(np.argmax(cnt))
                other_area = int((win == vals[j]).sum())
                if cnt[j] >= dup_fraction * obj.sum() or cnt[j] >= dup_fraction * other_area:
                    n_dup += 1
                    continue
            free = obj & (sub == 0)
            if free.sum() < min_area:
                n_dup += 1
                continue
            sub[free] = next_id
            next_id += 1
        if not np.array_equal(win, before):
            store.write(wy0, wx0, win)
    store.flush()
    secs = time.time() - t0
    stats = {
        "n_nuclei": next_id - 1,
        "n_tiles": len(cells),
        "megapixels": round(mp, 3),  # pixels read and segmented (cores + overlap)
        "core_megapixels": round(core_mp, 3),
        "seconds": round(secs, 2),
        "mp_per_s": round(mp / secs, 4) if secs > 0 else None,
        "segmenter": name,
        "n_duplicates_dropped": n_dup,
        "n_outside_roi_dropped": n_out,
        "tile": tile,
        "overlap": overlap,
        **extra,
    }
    log.info("segmentation: %d nuclei in %d tiles, %.1f MP in %.1f s (%.3f MP/s)",
             stats["n_nuclei"], len(cells), mp, secs, stats["mp_per_s"] or 0)
    return stats
