"""Seed 003's unsupervised data-reduction filters (Level One / Level Two) and the cascade table.

- Level One: Laplace-variance blur filter on patches (:func:`laplacian_variance`,
  :func:`blur_filter`); CIELab a/b K-means segmentation (:func:`lab_kmeans_nuclei`, k = 3).
- Level Two: compactness = perimeter² / area of the crop's central object, K-means with k = 2
  on it, keep the compact cluster (:func:`compactness_filter`; :func:`keep_compact` on values
  already measured).
- The levels on whole slides: :mod:`cellstage.reduce.levels`.
- :func:`reduction_table`: counts kept per level (seed 003 Table 2 shape).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..utils import CellstageError


def _gray(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif a.ndim != 2:
        raise CellstageError(f"expected an (H, W, 3) RGB or (H, W) grey image, got shape {a.shape}")
    return a.astype(np.float64)


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image (0..255 scale); low = blurry (seed 003 L(·))."""
    from scipy.ndimage import laplace

    return float(laplace(_gray(rgb), mode="reflect").var())


def blur_filter(crops, threshold: float) -> np.ndarray:
    """Boolean keep-array: True where ``laplacian_variance`` >= ``threshold`` (sharp enough).

    ``crops``: (N, H, W, 3) array or an iterable of images (patches or crops)."""
    return np.array([laplacian_variance(c) >= threshold for c in crops], dtype=bool)


def _lab_ab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise CellstageError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
    lab = rgb2lab(a[..., :3].astype(np.uint8) if a.dtype != np.uint8 else a[..., :3])
    return lab[..., 1:3].reshape(-1, 2)


def lab_kmeans_nuclei(
    rgb: np.ndarray,
    k: int = 3,
    seed: int = 0,
    *,
    criterion: str = "purple",
    max_fit_pixels: int = 20000,
    closing_radius: int = 1,
    min_size: int = 8,
    min_contrast: float = 0.0,
) -> np.ndarray:
    """Segment stained cells/nuclei of an RGB patch by K-means on CIELab a/b (L dropped).

    The nucleus cluster is chosen by ``criterion`` on the cluster centre (a*, b*):
    ``"purple"`` (default, haematoxylin: red + blue, max a* − b*), ``"blue"`` (min b*) or
    ``"red"`` (max a*, seed 003's choice for May-Grünwald-Giemsa blasts). Then a morphological
    closing (``closing_radius``) and removal of objects smaller than ``min_size`` px (seed 003
    M(·)). Objects are 8-connected (as the contours Level One counts). K-means is fitted on at
    most ``max_fit_pixels`` sampled pixels (seeded) and predicts all pixels. Returns a bool mask
    (H, W).

    ``min_contrast`` (a*b* units, 0 = off): K-means always returns k clusters, so a patch of
    background alone is split into clusters of its noise whose centres lie close together; the
    mask is empty unless the chosen centre is at least ``min_contrast`` away from the farthest
    other centre (our guard; seed 003 does not say how empty patches behave). Stained cells lie
    tens of units from a white background, noise a unit or two.
    """
    from scipy import ndimage as ndi
    from sklearn.cluster import KMeans

    h, w = np.asarray(rgb).shape[:2]
    ab = _lab_ab(rgb)
    rng = np.random.default_rng(seed)
    fit = ab if len(ab) <= max_fit_pixels else ab[rng.choice(len(ab), max_fit_pixels, replace=False)]
    n_distinct = len(np.unique(np.round(fit, 3), axis=0))
    if n_distinct < 2:
        return np.zeros((h, w), bool)
    km = KMeans(n_clusters=min(k, n_distinct), n_init=4, random_state=seed).fit(fit)
    c = km.cluster_centers_
    if criterion == "purple":
        score = c[:, 0] - c[:, 1]
    elif criterion == "blue":
        score = -c[:, 1]
    elif criterion == "red":
        score = c[:, 0]
    else:
        raise CellstageError(f"lab_kmeans_nuclei: criterion {criterion!r} not in purple/blue/red")
    chosen = int(np.argmax(score))
    if min_contrast > 0 and np.linalg.norm(c - c[chosen], axis=1).max() < min_contrast:
        return np.zeros((h, w), bool)
    mask = (km.predict(ab) == chosen).reshape(h, w)
    if closing_radius > 0:
        st = ndi.generate_binary_structure(2, 1)
        mask = ndi.binary_closing(mask, structure=st, iterations=closing_radius, border_value=0)
        mask = ndi.binary_fill_holes(mask)
    if min_size > 0:
        lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
        if n:
            sizes = np.bincount(lab.ravel())
            small = sizes < min_size
            small[0] = False
            mask = mask & ~small[lab]
    return mask


def central_compactness(mask: np.ndarray) -> float:
    """perimeter² / area of the object at (or nearest to) the mask centre; inf when empty.

    A disk gives ≈ 4π ≈ 12.6 (a little more on the pixel grid); elongated or ragged objects more.
    """
    from skimage.measure import label, regionprops

    m = np.asarray(mask).astype(bool)
    if not m.any():
        return float("inf")
    lab = label(m, connectivity=2)
    cy, cx = (m.shape[0] - 1) / 2, (m.shape[1] - 1) / 2
    target = lab[int(round(cy)), int(round(cx))]
    if target == 0:
        ys, xs = np.nonzero(lab)
        j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        target = lab[ys[j], xs[j]]
    region = next(r for r in regionprops(lab) if r.label == target)
    if region.area <= 0 or region.perimeter <= 0:
        return float("inf")
    return float(region.perimeter**2 / region.area)


def compactness_filter(masks_or_crops, seed: int = 0, *, min_separation: float = 1.25,
                       return_values: bool = False):
    """Level Two: K-means (k = 2) on the central object's compactness; keep the compact cluster.

    Input: masks (N, H, W) bool, or RGB crops (N, H, W, 3) uint8 which are segmented first with
    :func:`lab_kmeans_nuclei`. Crops with no object (compactness inf) are never kept. If the two
    cluster centres differ by less than ``min_separation`` (ratio), all objects are treated as one
    cluster and kept — a homogeneous set is not split in half (seed 003 used an experimentally
    derived threshold instead; this guard is our reading). Returns a bool keep-array (and the
    compactness values with ``return_values``).
    """
    arr = np.asarray(masks_or_crops)
    if arr.ndim == 4 and arr.shape[-1] >= 3:
        masks = [lab_kmeans_nuclei(c, seed=seed) for c in arr]
    elif arr.ndim == 3:
        masks = list(arr.astype(bool))
    else:
        raise CellstageError(f"compactness_filter: expected (N,H,W) masks or (N,H,W,3) crops, got {arr.shape}")
    values = np.array([central_compactness(m) for m in masks], dtype=float)
    keep = keep_compact(values, seed, min_separation=min_separation)
    return (keep, values) if return_values else keep


def keep_compact(values, seed: int = 0, *, min_separation: float = 1.25) -> np.ndarray:
    """The clustering step of :func:`compactness_filter` on compactness values already measured.

    Seed 003 §2.1.2: "a K-Means clustering C(·) with k = 2 is performed" on perimeter²/area;
    the cluster with the lower centre (rounder objects) is kept. Non-finite values (no object)
    are never kept; centres closer than the ratio ``min_separation`` keep every finite value.
    """
    from sklearn.cluster import KMeans

    values = np.asarray(values, dtype=float).ravel()
    keep = np.isfinite(values)
    finite = values[keep]
    if len(np.unique(finite)) >= 2:
        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(finite.reshape(-1, 1))
        centres = km.cluster_centers_.ravel()
        lo, hi = centres.min(), centres.max()
        if hi / max(lo, 1e-9) >= min_separation:
            sel = km.predict(finite.reshape(-1, 1)) == int(np.argmin(centres))
            keep[np.flatnonzero(keep)] = sel
    return keep


def reduction_table(counts: dict) -> pd.DataFrame:
    """Data-reduction cascade: one row per level in the given order, ``fraction`` = n / first n.

    >>> reduction_table({"crops": 100, "level_two": 60, "level_three": 30})["fraction"].tolist()
    [1.0, 0.6, 0.3]
    """
    if not counts:
        return pd.DataFrame({"level": pd.Series(dtype=str), "n": pd.Series(dtype="int64"),
                             "fraction": pd.Series(dtype=float)})
    levels = list(counts)
    n = np.array([int(counts[k]) for k in levels], dtype=np.int64)
    if (n < 0).any():
        raise CellstageError(f"reduction_table: negative count in {counts}")
    base = n[0] if n[0] > 0 else 1
    return pd.DataFrame({"level": [str(k) for k in levels], "n": n, "fraction": n / base})
