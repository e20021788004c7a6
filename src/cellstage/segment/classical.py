"""Classical nucleus segmentation (no model needed): the fallback when no Cellpose model exists.

Haematoxylin channel by colour deconvolution (``skimage.color.rgb2hed``), Gaussian smoothing,
Otsu threshold (with an absolute floor so that a tile without nuclei does not turn its
background noise into objects), hole filling, distance transform and marker-based watershed.
Deterministic: the same pixels always give the same labels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.segmentation import relabel_sequential, watershed


def _drop_small(lab: np.ndarray, min_area: int) -> np.ndarray:
    """Zero objects with fewer than ``min_area`` pixels (labels array, returns a copy)."""
    counts = np.bincount(lab.ravel())
    small = counts < min_area
    small[0] = False
    out = lab.copy()
    out[small[lab]] = 0
    return out


def haematoxylin(rgb: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Smoothed haematoxylin optical density of an (H, W, 3) uint8 image (float32)."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    h = rgb2hed(np.ascontiguousarray(rgb[..., :3]))[..., 0].astype(np.float32)
    if sigma > 0:
        h = gaussian(h, sigma=sigma, preserve_range=True).astype(np.float32)
    return h


def segment_classical(
    rgb: np.ndarray,
    *,
    min_diameter: float = 12.0,
    threshold: float | None = None,
    min_threshold: float = 0.05,
    sigma: float = 1.0,
    peak_min_distance: int | None = None,
) -> np.ndarray:
    """Label nuclei in an RGB tile; returns (H, W) uint32 labels (0 = background, 1..n).

    ``threshold``: fixed haematoxylin OD threshold (None → Otsu, but never below
    ``min_threshold``). ``min_diameter``: objects smaller than a disc of this diameter are
    removed, and watershed seeds are at least ``min_diameter / 2`` apart.
    """
    h = haematoxylin(rgb, sigma=sigma)
    if threshold is None:
        try:
            t = float(threshold_otsu(h))
        except ValueError:  # constant image
            t = np.inf
        threshold = max(t, min_threshold)
    fg = h > threshold
    fg = ndi.binary_opening(fg, structure=np.ones((3, 3), bool))
    fg = ndi.binary_fill_holes(fg)
    min_area = int(np.pi * (min_diameter / 2) ** 2 * 0.5)
    fg = _drop_small(ndi.label(fg)[0], min_area) > 0
    if not fg.any():
        return np.zeros(h.shape, np.uint32)
    dist = ndi.distance_transform_edt(fg)
    dist = gaussian(dist, sigma=1.0, preserve_range=True)
    md = int(peak_min_distance if peak_min_distance is not None else max(3, min_diameter // 2))
    comp, _ = ndi.label(fg)
    peaks = peak_local_max(dist, min_distance=md, labels=comp, exclude_border=False)
    markers = np.zeros(h.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components without a peak (tiny/flat) still get one marker
    missing = np.setdiff1d(np.unique(comp[fg]), np.unique(comp[tuple(peaks.T)]) if len(peaks) else [])
    if len(missing):
        com = ndi.maximum_position(dist, comp, missing)
        for k, (r, c) in enumerate(com):
            markers[r, c] = len(peaks) + 1 + k
    lab = watershed(-dist, markers, mask=fg)
    lab = _drop_small(lab, min_area)
    lab, _, _ = relabel_sequential(lab)
    return lab.astype(np.uint32)


def slide_threshold(slide, rois, cells, tile: int, *, max_windows: int = 16,
                    min_threshold: float = 0.05, sigma: float = 1.0) -> float:
    """One haematoxylin threshold for a whole slide: Otsu over up to ``max_windows`` tile cores
    (evenly spread over ``cells``, the (x0, y0) of the tile grid) restricted to the ROIs.

    Per-tile Otsu would let neighbouring tiles disagree about the same nucleus (and make the
    tiled result depend on the tiling); one slide-level threshold keeps every tile consistent.
    """
    import shapely
    from skimage.draw import polygon as draw_polygon

    W, H = (int(v) for v in slide.dimensions)
    if not cells:
        return float(min_threshold)
    pick = np.unique(np.linspace(0, len(cells) - 1, min(max_windows, len(cells))).round().astype(int))
    vals = []
    for k in pick:
        x0, y0 = cells[k]
        w, h = min(tile, W - x0), min(tile, H - y0)
        rgb = np.asarray(slide.read_region(x0, y0, w, h, level=0))[..., :3]
        hem = haematoxylin(rgb, sigma=sigma)
        inside = np.zeros((h, w), bool)
        win = shapely.box(x0, y0, x0 + w, y0 + h)
        for _, poly in rois:
            part = poly.intersection(win)
            for g in getattr(part, "geoms", [part]):
                if g.is_empty or g.geom_type != "Polygon":
                    continue
                xy = np.asarray(g.exterior.coords)
                rr, cc = draw_polygon(xy[:, 1] - y0, xy[:, 0] - x0, shape=(h, w))
                inside[rr, cc] = True
        vals.append(hem[inside] if inside.any() else hem.ravel())
    v = np.concatenate(vals)
    try:
        t = float(threshold_otsu(v))
    except ValueError:
        t = min_threshold
    return max(t, float(min_threshold))


def segment_at_point(rgb: np.ndarray, x: float, y: float, *, min_diameter: float = 12.0,
                     max_distance: float | None = None, min_threshold: float = 0.0) -> np.ndarray:
    """Mask of the one nucleus a point annotation prompts, from a small RGB window around it.

    ``rgb`` is segmented on its own (:func:`segment_classical`) with the Otsu threshold of the
    haematoxylin in a square of edge ``3 * min_diameter`` centred on the point (the point's own
    neighbourhood: a faint nucleus among dark ones still separates from its surroundings), then,
    if that finds nothing near the point, with the Otsu threshold of the whole window. The object
    under the point (``x``, ``y`` in ``rgb`` px, rounded half up) is taken, else the object
    nearest to it within ``max_distance`` px (default ``min_diameter``). ``min_threshold``
    defaults to 0, not the slide segmenter's floor: that floor keeps nucleus-free tiles from
    turning noise into objects, while here the annotator says a nucleus is there, and the nuclei
    the slide segmentation missed are mostly the faint ones.
    Returns an (H, W) bool mask of ``rgb``, all False when no object is near enough.
    """
    h, w = rgb.shape[:2]
    r, c = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
    half = max(2, int(round(1.5 * min_diameter)))
    hem = haematoxylin(rgb)
    local = hem[max(r - half, 0):max(r + half, 0), max(c - half, 0):max(c + half, 0)]
    reach = float(min_diameter if max_distance is None else max_distance)
    thresholds = []
    for values in (local, hem):
        try:
            thresholds.append(max(float(threshold_otsu(values)), float(min_threshold)))
        except ValueError:  # empty or constant
            continue
    for t in dict.fromkeys(thresholds):
        lab = segment_classical(rgb, min_diameter=min_diameter, threshold=t)
        if not lab.any():
            continue
        target = int(lab[r, c]) if (0 <= r < h and 0 <= c < w) else 0
        if not target:
            yy, xx = np.nonzero(lab)
            d2 = (yy - y) ** 2 + (xx - x) ** 2
            k = int(np.argmin(d2))
            if d2[k] > reach * reach:
                continue
            target = int(lab[yy[k], xx[k]])
        return lab == target
    return np.zeros((h, w), bool)
