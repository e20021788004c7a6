"""Pairwise slide registration: ORB keypoints, Hamming matching, RANSAC homography.

Method (seed paper §3.1): ORB keypoints + descriptors, brute-force Hamming matching, RANSAC
homography with a 5.0 px threshold. Whole slides are far too large for one ORB pass, so it runs
coarse-to-fine:

1. **Coarse.** Both slides are read at a low resolution (a pyramid level, then area-resampled) at
   one *common* physical pixel size where both pixel sizes are known (ORB then matches images at
   the same scale), grey-scaled with CLAHE (survives stain shifts and defocus), ORB
   (``n_features``) + BFMatcher(NORM_HAMMING, crossCheck) on the ``bf_max_features`` strongest
   keypoints + ``findHomography(RANSAC, ransac_threshold)`` in coarse px. If that passes the
   checks, all keypoints are matched again guided by it (mutual-nearest Hamming within 3× the
   threshold of the prediction, ≤ 64 of 256 bits apart) and RANSAC runs again: brute force over
   10k×10k descriptors costs ~2 s on 2 cores, this ~0.05 s, and it finds more matches. The
   result is lifted to level-0 coordinates with the exact pixel-centre scaling matrices.
2. **Refine** (when a coarse image is not level 0). A grid of windows (default 3×3 of 1024 ref
   level-0 px) placed on coarse inliers; each ref window is read at full resolution and brought to
   the working scale (the coarser of the two native pixel sizes), the mov window predicted by the
   coarse H is warped into the same frame, ORB runs on both, matching is guided (mutual-nearest
   Hamming within a few coarse residuals of the identity), keypoints are mapped to global
   level-0 coordinates of their own slide, and one final ``findHomography(RANSAC,
   ransac_threshold)`` in level-0 px gives H. Windows are read with ORB's border (31 working
   px) of extra context so keypoints cover them up to their edges. If refinement fails its
   checks, the coarse H is kept (and the message says so).
3. **Polish** (every RANSAC above): OpenCV's RANSAC output is not the least-squares fit of its
   inliers and, with thousands of ~1 px-noisy keypoints, its perspective terms wander (demo
   pairs: 0.2-2.3 px mean corner error at the 40x corners); H is re-fitted by least squares on
   the inliers with residual ≤ min(ransac_threshold, 2 × median) (twice), which brings the demo
   pairs to 0.15-0.35 px (see ``_find_h``).

Every RANSAC call (coarse, guided, refined) uses the one configured ``ransac_threshold``
(``registration.ransac_threshold``, 5.0 px by default as in the seed paper), in the pixels of the
images it fits: coarse px for the coarse passes, level-0 px for the refinement.

``H`` maps **ref level-0 px → mov level-0 px** (x = column, y = row, pixel centres at integers).
A bad pair never raises: the result has ``ok=False`` and a ``message`` saying why.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from ..utils import CellstageError, log

__all__ = [
    "RegistrationResult",
    "register_pair",
    "read_at_downsample",
    "scale_matrix",
    "jacobian_det",
    "local_scale_rotation",
    "to_gray",
    "slide_name",
]

# ORB on ~1000² images: a couple of threads is plenty and keeps the 2-core machines responsive.
_ORB_THREADS = 2
# ORB's default edgeThreshold (= patchSize): no keypoint closer than this to an image border
_ORB_EDGE = 31


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------
@dataclass
class RegistrationResult:
    """Outcome of :func:`register_pair`. ``H`` maps ref level-0 px → mov level-0 px."""

    H: np.ndarray
    n_keypoints_ref: int = 0
    n_keypoints_mov: int = 0
    n_matches: int = 0
    n_inliers: int = 0
    inlier_ratio: float = 0.0
    rmse_px: float = float("nan")  # inlier reprojection RMSE, mov level-0 px
    rmse_um: float | None = None  # rmse_px × mov mpp (None when mov mpp unknown)
    scale: float = float("nan")  # sqrt|det J| of H at the ref slide centre (mov px per ref px)
    rotation_deg: float = float("nan")
    ok: bool = False
    message: str = ""
    seconds: float = 0.0
    stage: str = "coarse"  # "coarse" or "refined": which pass produced H
    expected_scale: float | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with the contract keys (``H, matches, inliers, inlier_ratio, rmse_px,
        rmse_um, ok, message``) plus the rest of the fields."""
        d = asdict(self)
        d["H"] = np.asarray(self.H, dtype=float).tolist()
        out: dict[str, Any] = {
            "H": d.pop("H"),
            "matches": int(self.n_matches),
            "inliers": int(self.n_inliers),
            "inlier_ratio": _f(self.inlier_ratio),
            "rmse_px": _f(self.rmse_px),
            "rmse_um": _f(self.rmse_um),
            "ok": bool(self.ok),
            "message": str(self.message),
        }
        for k, v in d.items():
            if k not in out:
                out[k] = _jsonable(v)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RegistrationResult:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["H"] = np.asarray(d["H"], dtype=float)
        kw.setdefault("n_matches", int(d.get("matches", 0)))
        kw.setdefault("n_inliers", int(d.get("inliers", 0)))
        for k in ("rmse_px", "scale", "rotation_deg", "inlier_ratio"):
            if kw.get(k) is None:
                kw[k] = float("nan")
        return cls(**kw)


def _f(x):
    """float or None (JSON has no NaN/inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _f(v)
    return v


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------
def scale_matrix(sx: float, sy: float) -> np.ndarray:
    """Map pixel-centre coordinates of an image downsampled by (sx, sy) to the full-res frame.

    Downsampled pixel i covers full-res [i·s, (i+1)·s), whose centre is s·(i + ½) − ½.
    """
    return np.array(
        [[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]], dtype=np.float64
    )


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], dtype=np.float64)


def _apply(H: np.ndarray, xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    p = xy @ H[:, :2].T + H[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return p[:, :2] / p[:, 2:3]


def jacobian_det(H: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """det of the Jacobian of the projective map H at points xy (N,2): det(H) / w³."""
    H = np.asarray(H, dtype=np.float64)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    w = H[2, 0] * xy[:, 0] + H[2, 1] * xy[:, 1] + H[2, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.linalg.det(H) / w**3


def local_scale_rotation(H: np.ndarray, x: float, y: float) -> tuple[float, float]:
    """(sqrt|det J|, rotation in degrees of the closest similarity) of H at (x, y)."""
    H = np.asarray(H, dtype=np.float64)
    w = H[2, 0] * x + H[2, 1] * y + H[2, 2]
    u = H[0, 0] * x + H[0, 1] * y + H[0, 2]
    v = H[1, 0] * x + H[1, 1] * y + H[1, 2]
    if not np.isfinite(w) or abs(w) < 1e-12:
        return float("nan"), float("nan")
    J = np.array(
        [
            [(H[0, 0] * w - u * H[2, 0]) / w**2, (H[0, 1] * w - u * H[2, 1]) / w**2],
            [(H[1, 0] * w - v * H[2, 0]) / w**2, (H[1, 1] * w - v * H[2, 1]) / w**2],
        ]
    )
    scale = math.sqrt(abs(float(np.linalg.det(J))))
    rot = math.degrees(math.atan2(J[1, 0] - J[0, 1], J[0, 0] + J[1, 1]))
    return scale, rot


def slide_name(slide) -> str:
    for attr in ("name", "path", "slide", "filename"):
        v = getattr(slide, attr, None)
        if isinstance(v, (str, bytes)) or hasattr(v, "__fspath__"):
            return str(v)
    return repr(slide)


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _dims(slide) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in slide.dimensions)
    except Exception as e:  # noqa: BLE001
        raise CellstageError(f"slide {slide_name(slide)}: unusable dimensions ({e})") from e
    if w <= 0 or h <= 0:
        raise CellstageError(f"slide {slide_name(slide)}: empty image (dimensions {w}×{h})")
    return w, h


def _level_dims(slide) -> list[tuple[int, int]]:
    try:
        dims = [tuple(int(v) for v in d) for d in slide.level_dimensions]
    except Exception:  # noqa: BLE001
        dims = []
    return dims or [_dims(slide)]


def _read_rgb(slide, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
    img = np.asarray(slide.read_region(int(x), int(y), int(w), int(h), level=int(level)))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise CellstageError(
            f"slide {slide_name(slide)}: read_region returned shape {img.shape}, expected (h, w, 3)"
        )
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def read_at_downsample(slide, downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """Whole slide as RGB uint8 at about ``downsample`` × level 0 (≥ 1).

    Reads the finest pyramid level not coarser than the target, then area-resamples. Returns
    ``(image, S)`` with S (3×3) mapping image pixel centres → level-0 pixel centres.
    """
    w0, h0 = _dims(slide)
    downsample = max(1.0, float(downsample))
    tw, th = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    dims = _level_dims(slide)
    best = 0
    for k, (lw, lh) in enumerate(dims):
        if lw >= tw and lh >= th and lw * lh < dims[best][0] * dims[best][1]:
            best = k
    lw, lh = dims[best]
    img = _read_rgb(slide, 0, 0, lw, lh, best)
    if img.shape[0] != lh or img.shape[1] != lw:
        lh, lw = img.shape[:2]
    if (lw, lh) != (tw, th):
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    return img, scale_matrix(w0 / tw, h0 / th)


def _read_window(slide, x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, int, int]:
    """Level-0 region clipped to the slide; returns (image, x0, y0) of what was read."""
    w0, h0 = _dims(slide)
    x0, y0 = max(0, int(x0)), max(0, int(y0))
    x1, y1 = min(w0, int(x1)), min(h0, int(y1))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return np.zeros((0, 0, 3), np.uint8), x0, y0
    return _read_rgb(slide, x0, y0, x1 - x0, y1 - y0, 0), x0, y0


def to_gray(img: np.ndarray, clahe: bool = True) -> np.ndarray:
    """RGB uint8 → inverted grey (tissue bright), CLAHE-equalised."""
    g = 255 - cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if clahe:
        g = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(g)
    return g


# ----------------------------------------------------------------------------------------------
# ORB + matching
# ----------------------------------------------------------------------------------------------
def _orb(gray: np.ndarray, n_features: int, nlevels: int = 8, fast_threshold: int = 20):
    orb = cv2.ORB_create(
        nfeatures=int(n_features), scaleFactor=1.2, nlevels=nlevels, fastThreshold=fast_threshold
    )
    kps, desc = orb.detectAndCompute(gray, None)
    if desc is None or len(kps) == 0:
        return np.zeros((0, 2), np.float64), None, np.zeros(0)
    pts = np.array([k.pt for k in kps], dtype=np.float64)
    return pts, desc, np.array([k.response for k in kps], dtype=np.float64)


def _match(d1, d2) -> np.ndarray:
    """Cross-checked Hamming matches as an (M, 2) index array (query into d1, train into d2)."""
    if d1 is None or d2 is None or len(d1) == 0 or len(d2) == 0:
        return np.zeros((0, 2), np.int64)
    bf = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
    m = bf.match(d1, d2)
    return np.array([(x.queryIdx, x.trainIdx) for x in m], dtype=np.int64).reshape(-1, 2)


def _strongest(kps: np.ndarray, desc, resp: np.ndarray, k: int):
    if len(kps) <= k:
        return np.arange(len(kps))
    return np.sort(np.argsort(-resp, kind="stable")[:k])


def _guided_match(kp_r, de_r, kp_m, de_m, H, radius: float, max_hamming: int = 64) -> np.ndarray:
    """Mutual-nearest Hamming matches restricted to pairs within ``radius`` of H's prediction.

    Deterministic and linear-time; ``max_hamming`` (of 256 bits; unrelated ORB descriptors sit
    near 128 ± 8) rejects chance pairings.
    """
    from scipy.spatial import cKDTree

    if de_r is None or de_m is None or len(kp_r) == 0 or len(kp_m) == 0:
        return np.zeros((0, 2), np.int64)
    pred = _apply(H, kp_r)
    ok = np.all(np.isfinite(pred), axis=1)
    idx_r = np.flatnonzero(ok)
    if len(idx_r) == 0:
        return np.zeros((0, 2), np.int64)
    sdm = cKDTree(pred[idx_r]).sparse_distance_matrix(cKDTree(kp_m), radius, output_type="ndarray")
    if len(sdm) == 0:
        return np.zeros((0, 2), np.int64)
    i, j = idx_r[sdm["i"]], sdm["j"].astype(np.int64)
    a = np.ascontiguousarray(de_r).view(np.uint64)
    b = np.ascontiguousarray(de_m).view(np.uint64)
    ham = np.bitwise_count(a[i] ^ b[j]).sum(axis=1).astype(np.int64)
    keep = ham <= max_hamming
    i, j, ham = i[keep], j[keep], ham[keep]
    if len(i) == 0:
        return np.zeros((0, 2), np.int64)
    # tie-break by distance to the prediction, then index: deterministic
    d = np.linalg.norm(pred[i] - kp_m[j], axis=1)
    o = np.lexsort((j, d, ham, i))
    first_i = o[np.r_[True, i[o][1:] != i[o][:-1]]]
    o2 = np.lexsort((i, d, ham, j))
    first_j = o2[np.r_[True, j[o2][1:] != j[o2][:-1]]]
    mutual = np.intersect1d(first_i, first_j)
    return np.stack([i[mutual], j[mutual]], axis=1)


def _find_h(src: np.ndarray, dst: np.ndarray, thr: float, polish: bool = True):
    """RANSAC homography (threshold ``thr``) + least-squares polish on its inliers.

    OpenCV's RANSAC returns the model of its best minimal sample after a Levenberg-Marquardt
    step that, on thousands of level-0 correspondences with ~1 px keypoint noise, does not
    reach the least-squares fit of the inliers: on the demo pairs its corner error jumped
    between 1.2 and 3.8 px with the threshold (5, 3, 2 px) while the inlier least-squares fit
    was at 0.1-0.4 px. So the model is re-fitted (normalised DLT + LM, ``method=0``) on the
    inliers whose residual is under ``min(thr, 3 × median residual)``, twice; the returned
    inlier mask is recomputed with ``thr`` under the final H.
    """
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if len(src) < 4:
        return None, np.zeros(len(src), bool)
    H, mask = cv2.findHomography(src, dst, cv2.RANSAC, float(thr), maxIters=5000,
                                 confidence=0.999)
    if H is None or mask is None:
        return None, np.zeros(len(src), bool)
    inl = mask.ravel().astype(bool)
    if not polish:
        return H, inl
    for _ in range(2):
        e = np.linalg.norm(_apply(H, src) - dst, axis=1)
        if inl.sum() < 8:
            break
        cut = min(float(thr), max(2.0 * float(np.median(e[inl])), 1e-3))
        fit = inl & (e <= cut)
        if fit.sum() < 8:
            break
        H2, _ = cv2.findHomography(src[fit], dst[fit], 0)
        if H2 is None or not np.all(np.isfinite(H2)):
            break
        e2 = np.linalg.norm(_apply(H2, src) - dst, axis=1)
        inl2 = e2 <= thr
        if inl2.sum() < 0.9 * inl.sum():  # polish must not lose the consensus
            break
        H, inl = H2 / H2[2, 2], inl2
    return H, inl


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def _check(H, n_matches, n_inliers, ref_wh, mov_wh, min_inliers, min_inlier_ratio,
           expected_scale, scale_tolerance) -> tuple[bool, str, float, float]:
    """Plausibility of H; returns (ok, message, scale, rotation_deg)."""
    if H is None or not np.all(np.isfinite(H)):
        return False, "no homography found (RANSAC failed)", float("nan"), float("nan")
    rw, rh = ref_wh
    scale, rot = local_scale_rotation(H, (rw - 1) / 2, (rh - 1) / 2)
    if n_inliers < min_inliers:
        return False, f"only {n_inliers} inliers (need ≥ {min_inliers})", scale, rot
    ratio = n_inliers / max(1, n_matches)
    if ratio < min_inlier_ratio:
        return (False, f"inlier ratio {ratio:.3f} below {min_inlier_ratio:g} "
                f"({n_inliers}/{n_matches} matches)", scale, rot)
    corners = np.array([[0, 0], [rw - 1, 0], [rw - 1, rh - 1], [0, rh - 1]], np.float64)
    jd = jacobian_det(H, corners)
    if not np.all(np.isfinite(jd)) or np.max(np.abs(jd)) < 1e-8 or not np.isfinite(scale) \
            or scale < 1e-4:
        return False, "degenerate homography (det≈0)", scale, rot
    if np.any(np.sign(jd) != np.sign(jd[0])):
        return False, "homography folds the reference slide (Jacobian changes sign)", scale, rot
    w = H[2, 0] * corners[:, 0] + H[2, 1] * corners[:, 1] + H[2, 2]
    if np.any(np.sign(w) != np.sign(w[0])):
        return False, "homography sends part of the reference slide to infinity", scale, rot
    # local scale must not vary wildly across the slide (strong perspective = wrong match)
    s = np.sqrt(np.abs(jd))
    if s.max() / s.min() > 1.5:
        return (False, f"implausible perspective: local scale varies {s.min():.3g}–{s.max():.3g} "
                "across the reference slide", scale, rot)
    if expected_scale is not None and expected_scale > 0:
        rel = abs(scale - expected_scale) / expected_scale
        if rel > scale_tolerance:
            return (False, f"scale {scale:.2f} far from pixel-size ratio {expected_scale:.2f} "
                    f"(tolerance {scale_tolerance:.0%})", scale, rot)
    if jd[0] < 0:
        return False, "homography mirrors the slide (negative determinant)", scale, rot
    return True, "", scale, rot


def _rmse(H, src, dst) -> float:
    if len(src) == 0 or H is None:
        return float("nan")
    e = _apply(H, src) - dst
    return float(np.sqrt(np.mean(np.sum(e**2, axis=1))))


# ----------------------------------------------------------------------------------------------
# main entry
# ----------------------------------------------------------------------------------------------
def _mpp(slide) -> float | None:
    try:
        m = getattr(slide, "mpp", None)
        if m is None:
            return None
        if isinstance(m, (tuple, list, np.ndarray)):
            m = float(np.mean(m))
        m = float(m)
        return m if math.isfinite(m) and m > 0 else None
    except Exception:  # noqa: BLE001
        return None


def _coarse_downsamples(ref_wh, mov_wh, ref_mpp, mov_mpp, expected_scale, max_side):
    """Downsample factors so both coarse images share one pixel size where that is known."""
    if ref_mpp and mov_mpp:
        ratio = ref_mpp / mov_mpp  # mov px per ref px
    elif expected_scale:
        ratio = float(expected_scale)
    else:
        ratio = None
    if ratio is None:
        return max(1.0, max(ref_wh) / max_side), max(1.0, max(mov_wh) / max_side)
    # common unit: ref level-0 px. mov px = 1/ratio ref px.
    ext = max(max(ref_wh), max(mov_wh) / ratio)
    d_ref = max(ext / max_side, 1.0, 1.0 / ratio)  # never finer than either native resolution
    d_mov = d_ref * ratio
    if d_mov < 1.0:  # should not happen given the max() above, but keep it safe
        d_ref, d_mov = d_ref / d_mov, 1.0
    return d_ref, d_mov


def register_pair(
    ref,
    mov,
    *,
    n_features: int = 10000,
    ransac_threshold: float = 5.0,
    coarse_max_side: int = 2048,
    refine: bool = True,
    min_inliers: int = 30,
    min_inlier_ratio: float = 0.1,
    expected_scale: float | None = None,
    scale_tolerance: float = 0.25,
    clahe: bool = True,
    refine_window: int = 1024,
    refine_grid: int = 3,
    refine_features: int = 3000,
    bf_max_features: int = 3000,
) -> RegistrationResult:
    """Homography mapping ``ref`` level-0 px → ``mov`` level-0 px (see module docstring).

    ``ref``/``mov`` are slide-like objects (``dimensions``, ``mpp``, ``level_dimensions``,
    ``read_region(x, y, w, h, level)``). ``expected_scale`` = ref_mpp / mov_mpp enables the
    pixel-size-ratio check. Never raises for a bad pair (``ok=False`` + ``message``); raises
    :class:`CellstageError` only for unusable input (empty/blank images).
    """
    t0 = time.perf_counter()
    cv2.setNumThreads(_ORB_THREADS)
    ref_wh, mov_wh = _dims(ref), _dims(mov)
    ref_mpp, mov_mpp = _mpp(ref), _mpp(mov)
    d_ref, d_mov = _coarse_downsamples(
        ref_wh, mov_wh, ref_mpp, mov_mpp, expected_scale, coarse_max_side
    )
    img_r, S_r = read_at_downsample(ref, d_ref)
    img_m, S_m = read_at_downsample(mov, d_mov)
    for sl, im in ((ref, img_r), (mov, img_m)):
        if im.size == 0 or float(im.std()) < 1e-3:
            raise CellstageError(f"slide {slide_name(sl)}: image is empty/blank, cannot register")
    g_r, g_m = to_gray(img_r, clahe), to_gray(img_m, clahe)
    kp_r, de_r, rs_r = _orb(g_r, n_features)
    kp_m, de_m, rs_m = _orb(g_m, n_features)
    details: dict[str, Any] = {
        "coarse_downsample_ref": float(S_r[0, 0]),
        "coarse_downsample_mov": float(S_m[0, 0]),
        "coarse_shape_ref": list(g_r.shape),
        "coarse_shape_mov": list(g_m.shape),
    }

    def result(H, n_match, n_inl, rmse, ok, msg, scale, rot, stage):
        return RegistrationResult(
            H=np.eye(3) if H is None else np.asarray(H, dtype=np.float64),
            n_keypoints_ref=len(kp_r), n_keypoints_mov=len(kp_m),
            n_matches=int(n_match), n_inliers=int(n_inl),
            inlier_ratio=float(n_inl / n_match) if n_match else 0.0,
            rmse_px=float(rmse),
            rmse_um=(float(rmse) * mov_mpp if mov_mpp and np.isfinite(rmse) else None),
            scale=float(scale), rotation_deg=float(rot), ok=bool(ok), message=msg,
            seconds=time.perf_counter() - t0, stage=stage, expected_scale=expected_scale,
            details=details,
        )

    nan = float("nan")
    if len(kp_r) < 4 or len(kp_m) < 4:
        return result(None, 0, 0, nan, False,
                      f"too few keypoints (ref {len(kp_r)}, mov {len(kp_m)})", nan, nan, "coarse")
    # (a) cross-checked brute-force Hamming matching of the strongest keypoints + RANSAC
    sel_r = _strongest(kp_r, de_r, rs_r, bf_max_features)
    sel_m = _strongest(kp_m, de_m, rs_m, bf_max_features)
    mt = _match(de_r[sel_r], de_m[sel_m])
    mt = np.stack([sel_r[mt[:, 0]], sel_m[mt[:, 1]]], axis=1) if len(mt) else mt
    if len(mt) < 4:
        return result(None, len(mt), 0, nan, False, f"only {len(mt)} matches", nan, nan, "coarse")

    def lift(mt):
        Hc, inl = _find_h(kp_r[mt[:, 0]], kp_m[mt[:, 1]], ransac_threshold)
        H0 = None if Hc is None else S_m @ Hc @ np.linalg.inv(S_r)
        if H0 is not None:
            H0 = H0 / H0[2, 2]
        return Hc, H0, inl

    Hc, H0, inl = lift(mt)
    ok, msg, scale, rot = _check(H0, len(mt), int(inl.sum()), ref_wh, mov_wh, min_inliers,
                                 min_inlier_ratio, expected_scale, scale_tolerance)
    details.update(bf_matches=len(mt), bf_inliers=int(inl.sum()))
    # (b) guided matching of all keypoints around the RANSAC prediction, RANSAC again
    if ok:
        mt_g = _guided_match(kp_r, de_r, kp_m, de_m, Hc, radius=3 * ransac_threshold)
        if len(mt_g) >= 4:
            Hc_g, H0_g, inl_g = lift(mt_g)
            ok_g, msg_g, scale_g, rot_g = _check(
                H0_g, len(mt_g), int(inl_g.sum()), ref_wh, mov_wh, min_inliers, min_inlier_ratio,
                expected_scale, scale_tolerance)
            details.update(guided_matches=len(mt_g), guided_inliers=int(inl_g.sum()))
            if ok_g and inl_g.sum() >= inl.sum():
                mt, H0, inl, ok, msg, scale, rot = mt_g, H0_g, inl_g, ok_g, msg_g, scale_g, rot_g
    src0 = _apply(S_r, kp_r[mt[:, 0]])  # level-0 ref
    dst0 = _apply(S_m, kp_m[mt[:, 1]])  # level-0 mov
    n_inl = int(inl.sum())
    rmse = _rmse(H0, src0[inl], dst0[inl]) if H0 is not None else nan
    details.update(coarse_matches=len(mt), coarse_inliers=n_inl, coarse_rmse_px=_f(rmse))
    coarse = result(H0, len(mt), n_inl, rmse, ok, msg, scale, rot, "coarse")
    if not ok or not refine or (S_r[0, 0] == 1.0 and S_m[0, 0] == 1.0):  # coarse = level 0
        if ok:
            coarse.message = "ok (coarse only)"
        log.debug("registration coarse: %s", coarse.message)
        return coarse

    # ---------------------------------------------------------------- refinement
    # matching radius in the working frame (≈ mov px): a few coarse residuals
    rmse_f_guess = 3.0 * (rmse if np.isfinite(rmse) else ransac_threshold * S_m[0, 0])
    try:
        ref_pts, mov_pts, info = _refine_matches(
            ref, mov, H0, src0[inl], ref_wh, refine_window, refine_grid, refine_features,
            scale, clahe, radius=max(8.0, 2 * rmse_f_guess),
        )
    except CellstageError:
        raise
    except Exception as e:  # noqa: BLE001  (never let refinement break a good coarse result)
        log.warning("registration refinement failed: %s", e)
        ref_pts, mov_pts, info = np.zeros((0, 2)), np.zeros((0, 2)), {"error": str(e)}
    details["refine"] = info
    Hf, inl_f = _find_h(ref_pts, mov_pts, ransac_threshold)
    if Hf is not None:
        Hf = Hf / Hf[2, 2]
    n_inl_f = int(inl_f.sum())
    ok_f, msg_f, scale_f, rot_f = _check(Hf, len(ref_pts), n_inl_f, ref_wh, mov_wh, min_inliers,
                                         min_inlier_ratio, expected_scale, scale_tolerance)
    if ok_f:
        # guard against a refinement that wanders away from the coarse solution
        grid = np.array([[x, y] for x in np.linspace(0, ref_wh[0] - 1, 5)
                         for y in np.linspace(0, ref_wh[1] - 1, 5)])
        dev = float(np.max(np.linalg.norm(_apply(Hf, grid) - _apply(H0, grid), axis=1)))
        details["refine"]["max_deviation_from_coarse_px"] = dev
        tol = max(20.0, 4 * ransac_threshold * S_m[0, 0])
        if dev > tol:
            ok_f, msg_f = False, f"refined H deviates {dev:.1f} px from the coarse H"
    if not ok_f:
        coarse.message = f"ok (coarse only; refinement rejected: {msg_f})"
        coarse.seconds = time.perf_counter() - t0
        return coarse
    rmse_f = _rmse(Hf, ref_pts[inl_f], mov_pts[inl_f])
    return result(Hf, len(ref_pts), n_inl_f, rmse_f, True, "ok", scale_f, rot_f, "refined")


def _window_centres(pts: np.ndarray, ref_wh, win: int, grid: int) -> list[tuple[float, float]]:
    """Grid of window centres within the bbox of the coarse inliers, snapped to an inlier."""
    if len(pts) == 0:
        return []
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    half = win / 2
    if len(pts) < 4:
        return []
    lo = np.minimum(lo + half, (lo + hi) / 2)
    hi = np.maximum(hi - half, (lo + hi) / 2)
    centres = []
    for gy in np.linspace(lo[1], hi[1], grid):
        for gx in np.linspace(lo[0], hi[0], grid):
            i = int(np.argmin(np.sum((pts - (gx, gy)) ** 2, axis=1)))
            c = tuple(pts[i])
            if all(abs(c[0] - o[0]) > half or abs(c[1] - o[1]) > half for o in centres):
                centres.append(c)
    return centres


def _refine_matches(ref, mov, H0, inlier_ref_pts, ref_wh, win, grid, n_feat, scale, clahe,
                    radius):
    """Point correspondences (ref level-0, mov level-0) from full-resolution windows."""
    # working frame F: ref level-0 scaled by f (the coarser native pixel size of the two)
    f = float(min(1.0, scale)) if np.isfinite(scale) and scale > 0 else 1.0
    ds = 1.0 / f
    ref_all, mov_all = [], []
    info: dict[str, Any] = {"windows": 0, "window_size_ref_px": win, "working_downsample": ds,
                            "per_window_matches": []}
    if len(inlier_ref_pts):
        ext = float(np.max(inlier_ref_pts.max(axis=0) - inlier_ref_pts.min(axis=0)))
        win = int(min(win, max(256.0, np.ceil(ext / grid))))
    info["window_size_ref_px"] = win
    # ORB finds no keypoint within ~edgeThreshold (31 px) of an image border: read each window
    # with that much context (in the working frame) so keypoints cover the whole window, and
    # the outer windows reach the edge of the tissue (the homography is extrapolated less)
    pad = int(math.ceil(_ORB_EDGE * ds))
    info["window_pad_ref_px"] = pad
    for cx, cy in _window_centres(inlier_ref_pts, ref_wh, win, grid):
        x0, y0 = int(round(cx - win / 2)) - pad, int(round(cy - win / 2)) - pad
        img_r, rx0, ry0 = _read_window(ref, x0, y0, x0 + win + 2 * pad, y0 + win + 2 * pad)
        if img_r.size == 0:
            continue
        h, w = img_r.shape[:2]
        tw, th = max(8, round(w / ds)), max(8, round(h / ds))
        if (tw, th) != (w, h):
            img_r = cv2.resize(img_r, (tw, th), interpolation=cv2.INTER_AREA)
        # F-local → ref level-0
        A = translation(rx0, ry0) @ scale_matrix(w / tw, h / th)
        M = H0 @ A  # F-local → mov level-0
        c = _apply(M, np.array([[0, 0], [tw - 1, 0], [tw - 1, th - 1], [0, th - 1]], float))
        if not np.all(np.isfinite(c)):
            continue
        mx0, my0 = np.floor(c.min(axis=0)).astype(int) - 16
        mx1, my1 = np.ceil(c.max(axis=0)).astype(int) + 17
        img_m, mx0, my0 = _read_window(mov, mx0, my0, mx1, my1)
        if img_m.size == 0:
            continue
        Mloc = translation(-mx0, -my0) @ M  # F-local → mov-window-local
        warped = cv2.warpPerspective(
            img_m, Mloc, (tw, th), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255),
        )
        g_r, g_m = to_gray(img_r, clahe), to_gray(warped, clahe)
        k_r, d_r, _ = _orb(g_r, n_feat, nlevels=4, fast_threshold=10)
        k_m, d_m, _ = _orb(g_m, n_feat, nlevels=4, fast_threshold=10)
        # the coarse H already aligned the windows: match around the identity
        mt = _guided_match(k_r, d_r, k_m, d_m, np.eye(3), radius=radius)
        if len(mt) == 0:
            info["per_window_matches"].append(0)
            continue
        pr, pm = k_r[mt[:, 0]], k_m[mt[:, 1]]
        info["per_window_matches"].append(int(len(pr)))
        info["windows"] += 1
        ref_all.append(_apply(A, pr))
        mov_all.append(_apply(M, pm))
    if not ref_all:
        return np.zeros((0, 2)), np.zeros((0, 2)), info
    return np.concatenate(ref_all), np.concatenate(mov_all), info
