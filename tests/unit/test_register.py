"""Tests for cellstage.register: real ORB/RANSAC registration on synthetic tissue-like images.

The only stand-in here is ``FakeSlide``, an in-memory numpy pyramid with the slide-reader
interface of ``cellstage.io.ZarrSlide``; registration, mapping and warping are the real code.
"""

from __future__ import annotations

import json
import math
import time

import cv2
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Polygon

# test double for the slide reader: tests/slide_doubles.py
from slide_doubles import FakeSlide

from cellstage.register import (
    RegistrationResult,
    map_cell_table,
    map_points,
    map_points_report,
    map_polygons,
    overlay_png,
    register_pair,
    save_result,
    warp_labels,
    warp_labels_zarr,
)
from cellstage.register.homography import local_scale_rotation
from cellstage.utils import CellstageError


# ----------------------------------------------------------------------------------------------
# synthetic tissue
# ----------------------------------------------------------------------------------------------
def make_tissue(size: int = 2000, seed: int = 0) -> np.ndarray:
    """Pink tissue with tubule-like ellipses of varied colour and a dense nuclei texture."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (236, 188, 212)
    # low-frequency stain variation
    lf = cv2.GaussianBlur(rng.normal(0, 1, (size // 16, size // 16)).astype(np.float32), (0, 0), 2)
    lf = cv2.resize(lf, (size, size), interpolation=cv2.INTER_LINEAR)
    img += lf[..., None] * np.array([12, 18, 10], np.float32)
    # tubule-like ellipses (outlined rings with lighter lumen)
    for _ in range(70):
        c = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        ax = (int(rng.integers(60, 180)), int(rng.integers(50, 150)))
        ang = float(rng.uniform(0, 180))
        col = tuple(float(v) for v in rng.uniform([170, 90, 150], [225, 160, 210]))
        cv2.ellipse(img, c, ax, ang, 0, 360, col, -1, cv2.LINE_AA)
        lumen = (max(5, ax[0] // 3), max(5, ax[1] // 3))
        cv2.ellipse(img, c, lumen, ang, 0, 360, (245, 225, 238), -1, cv2.LINE_AA)
    # nuclei: many small dark-purple ellipses
    n = size * size // 600
    cx = rng.integers(0, size, n)
    cy = rng.integers(0, size, n)
    ra = rng.integers(3, 8, n)
    rb = rng.integers(2, 6, n)
    an = rng.uniform(0, 180, n)
    cols = rng.uniform([60, 20, 90], [140, 80, 170], (n, 3))
    for i in range(n):
        cv2.ellipse(img, (int(cx[i]), int(cy[i])), (int(ra[i]), int(rb[i])), float(an[i]), 0, 360,
                    tuple(float(v) for v in cols[i]), -1, cv2.LINE_AA)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_h_true(theta_deg, tx, ty, h31, h32, size=2000, scale=0.5, mov_size=1100):
    """ref level-0 → mov level-0: rotate about the ref centre, scale, perspective, translate."""
    c = (size - 1) / 2
    th = math.radians(theta_deg)
    R = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])
    T1 = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]], float)
    m = (mov_size - 1) / 2
    T2 = np.array([[1, 0, m + tx], [0, 1, m + ty], [0, 0, 1]], float)
    S = np.diag([scale, scale, 1.0])
    P = np.array([[1, 0, 0], [0, 1, 0], [h31, h32, 1]], float)
    H = T2 @ S @ R @ T1 @ P
    return H / H[2, 2]


def make_mov(ref: np.ndarray, H_true: np.ndarray, mov_size=1100, seed=1, blur=1.5,
             stain=(0.92, 1.06, 0.86), gamma=1.25, noise=3.0) -> np.ndarray:
    """Render the 20x scan: warp at 2× then area-average (a real larger pixel), stain shift,
    defocus blur and noise."""
    A = np.array([[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1]], float)  # mov px → 2× px (centres)
    big = cv2.warpPerspective(ref, A @ H_true, (2 * mov_size, 2 * mov_size),
                              flags=cv2.INTER_LINEAR, borderValue=(250, 250, 250))
    mov = cv2.resize(big, (mov_size, mov_size), interpolation=cv2.INTER_AREA).astype(np.float32)
    mov = 255.0 * (mov / 255.0) ** gamma * np.array(stain, np.float32)
    mov = cv2.GaussianBlur(mov, (0, 0), blur)
    mov += np.random.default_rng(seed).normal(0, noise, mov.shape).astype(np.float32)
    return np.clip(mov, 0, 255).astype(np.uint8)


def corner_error_ref_px(H_est, H_true, size=2000) -> float:
    """Mean corner error measured in the ref (40x) level-0 frame: inv(H_true)·H_est(corners)."""
    c = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], float)
    back = map_points(map_points(c, H_est), np.linalg.inv(H_true))
    return float(np.mean(np.linalg.norm(back - c, axis=1)))


@pytest.fixture(scope="module")
def ref_img():
    return make_tissue(2000, seed=0)


CASES = [
    # theta, tx, ty, h31, h32
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (15.0, 25.0, -30.0, 1e-5, -1e-5),
    (-9.0, -40.0, 20.0, -1e-5, 1.5e-5),
    (5.0, 10.0, 35.0, 2e-5, 5e-6),
]


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[f"rot{c[0]:+.0f}" for c in CASES])
def test_known_homography_recovered_to_1px(ref_img, case):
    """Issue: a known homography recovered to ≤ 1 px corner error (40x level-0 frame)."""
    H_true = make_h_true(*case)
    ref = FakeSlide(ref_img, 0.17, "sec_40x")
    mov = FakeSlide(make_mov(ref_img, H_true), 0.34, "sec_20x")
    t = time.perf_counter()
    res = register_pair(ref, mov, expected_scale=0.17 / 0.34)
    dt = time.perf_counter() - t
    err = corner_error_ref_px(res.H, H_true)
    print(f"case {case}: corner error {err:.3f} px (ref frame), {dt:.2f} s, stage {res.stage}, "
          f"{res.n_inliers}/{res.n_matches} inliers, rmse {res.rmse_px:.2f} px")
    assert res.ok, res.message
    assert err <= 1.0
    assert res.stage == "refined"  # ref coarse image is level 1 → a level-0 refinement ran
    true_scale, true_rot = local_scale_rotation(H_true, 999.5, 999.5)
    assert res.scale == pytest.approx(true_scale, rel=0.01)
    assert abs(true_scale - 0.5) < 0.05
    assert res.rotation_deg == pytest.approx(true_rot, abs=0.2)
    assert abs(true_rot - case[0]) < 1.0
    assert res.n_inliers >= 30 and 0 < res.inlier_ratio <= 1
    assert res.rmse_um == pytest.approx(res.rmse_px * 0.34)
    assert dt < 15


def test_strongly_downsampled_coarse_then_refined(ref_img):
    """Both coarse images below level 0 (coarse_max_side=512): refinement still reaches ≤ 1 px."""
    H_true = make_h_true(*CASES[1])
    ref = FakeSlide(ref_img, 0.17)
    mov = FakeSlide(make_mov(ref_img, H_true), 0.34)
    coarse = register_pair(ref, mov, coarse_max_side=512, refine=False)
    res = register_pair(ref, mov, coarse_max_side=512)
    assert coarse.ok and coarse.stage == "coarse"
    assert res.ok and res.stage == "refined"
    assert res.details["coarse_downsample_ref"] > 2
    assert corner_error_ref_px(res.H, H_true) <= 1.0
    # the level-0 windows must actually have been read (not only the coarse level)
    assert any(r[4] == 0 and r[2] < 2000 for r in ref.reads)


def test_without_pixel_sizes_scale_invariant(ref_img):
    """No mpp known: coarse images at different scales, ORB's pyramid still matches."""
    H_true = make_h_true(*CASES[2])
    res = register_pair(FakeSlide(ref_img, None), FakeSlide(make_mov(ref_img, H_true), None))
    assert res.ok, res.message
    assert res.rmse_um is None
    assert corner_error_ref_px(res.H, H_true) <= 2.0


def test_unrelated_pair_is_not_ok(ref_img):
    other = make_tissue(2000, seed=7)
    H_true = make_h_true(*CASES[1])
    res = register_pair(FakeSlide(ref_img, 0.17), FakeSlide(make_mov(other, H_true), 0.34),
                        expected_scale=0.5)
    assert not res.ok
    assert res.message and ("inlier" in res.message or "homography" in res.message)
    d = res.to_dict()
    assert d["ok"] is False and d["message"] == res.message
    json.dumps(d, allow_nan=False)


def test_wrong_pixel_size_ratio_flagged(ref_img):
    H_true = make_h_true(*CASES[1])
    ref, mov = FakeSlide(ref_img, 0.17), FakeSlide(make_mov(ref_img, H_true), 0.34)
    res = register_pair(ref, mov, expected_scale=1.0)  # claims both scans share a pixel size
    assert not res.ok
    assert "scale 0.50 far from pixel-size ratio 1.00" in res.message


def test_blank_slide_raises_naming_it(ref_img):
    blank = FakeSlide(np.full((600, 600, 3), 255, np.uint8), 0.34, name="S9_20x")
    with pytest.raises(CellstageError, match="S9_20x"):
        register_pair(FakeSlide(ref_img, 0.17), blank)


def test_result_json_and_overlay(ref_img, tmp_path):
    H_true = make_h_true(*CASES[3])
    ref, mov = FakeSlide(ref_img, 0.17), FakeSlide(make_mov(ref_img, H_true), 0.34)
    res = register_pair(ref, mov, expected_scale=0.5)
    save_result(res, tmp_path / "reg" / "S1.json")
    d = json.loads((tmp_path / "reg" / "S1.json").read_text())
    for k in ("H", "matches", "inliers", "inlier_ratio", "rmse_px", "rmse_um", "ok", "message"):
        assert k in d
    assert np.allclose(np.array(d["H"]), res.H)
    back = RegistrationResult.from_dict(d)
    assert back.n_inliers == res.n_inliers and np.allclose(back.H, res.H)
    overlay_png(ref, mov, res, tmp_path / "reg" / "S1.png", max_side=400)
    png = cv2.imread(str(tmp_path / "reg" / "S1.png"))
    assert png is not None and png.shape[0] > 100
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["S1.json", "S1.png"]


# ----------------------------------------------------------------------------------------------
# mapping
# ----------------------------------------------------------------------------------------------
H_MAP = make_h_true(10.0, 5.0, -8.0, 1e-5, -5e-6)


def test_map_points_roundtrip():
    xy = np.array([[0, 0], [1999, 0], [1000.5, 700.25], [5, 1999]], float)
    back = map_points(map_points(xy, H_MAP), np.linalg.inv(H_MAP))
    assert np.allclose(back, xy, atol=1e-8)
    assert map_points(np.zeros((0, 2)), H_MAP).shape == (0, 2)


def test_points_outside_target_reported_not_clipped():
    H = np.array([[0.5, 0, 100], [0, 0.5, -50], [0, 0, 1]], float)
    df = pd.DataFrame(
        {"x": [10.0, 1000.0, 3000.0], "y": [200.0, 1000.0, 50.0], "label": list("abc")}
    )
    mapped, outside = map_points_report(df, H, target_dimensions=(1000, 800))
    assert mapped["x"].tolist() == [105.0, 600.0, 1600.0]
    assert mapped["y"].tolist() == [50.0, 450.0, -25.0]
    assert mapped["inside"].tolist() == [True, True, False]
    assert outside["label"].tolist() == ["c"]
    assert outside["x"].iloc[0] == 1600.0 and outside["y"].iloc[0] == -25.0  # not clipped
    assert df["x"].tolist() == [10.0, 1000.0, 3000.0]  # input untouched


def test_map_polygons_with_hole():
    shell = [(100, 100), (900, 100), (900, 700), (100, 700)]
    hole = [(300, 300), (500, 300), (500, 500), (300, 500)]
    out = map_polygons([("t1", Polygon(shell, [hole]))], H_MAP)
    pid, poly = out[0]
    assert pid == "t1" and len(poly.interiors) == 1
    expected = map_points(np.array(shell, float), H_MAP)
    assert np.allclose(np.array(poly.exterior.coords)[:4], expected)


def test_map_cell_table_rescales_px_keeps_um():
    H = np.array([[0.5, 0, 10], [0, 0.5, 20], [0, 0, 1]], float)  # 40x → 20x
    cells = pd.DataFrame({
        "cell_id": [7, 70000], "slide": ["S1_40x"] * 2,
        "centroid_x": [100.0, 5000.0], "centroid_y": [200.0, 300.0],
        "bbox_x0": [90, 4990], "bbox_y0": [190, 290], "bbox_x1": [111, 5011], "bbox_y1": [211, 311],
        "area_px": [400.0, 300.0], "perimeter_px": [80.0, 70.0], "compactness": [0.8, 0.77],
        "area_um2": [400 * 0.17**2, 300 * 0.17**2], "roi_id": ["a", "b"],
        "distance_to_wall_px": [40.0, 10.0], "distance_to_wall_um": [6.8, 1.7],
        "distance_norm": [0.3, 0.1], "label": ["SC", ""],
    })
    out = map_cell_table(cells, H, target_mpp=0.34, target_dimensions=(1000, 1000))
    assert out["cell_id"].tolist() == [7, 70000]
    assert out["slide"].tolist() == ["S1_40x"] * 2  # left to the caller
    assert out["centroid_x"].tolist() == [60.0, 2510.0]
    assert out["centroid_y"].tolist() == [120.0, 170.0]
    assert out[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].iloc[0].tolist() == [55, 115, 66, 126]
    assert np.allclose(out["distance_to_wall_px"], [20.0, 5.0])  # × 0.5
    assert out["distance_to_wall_um"].tolist() == [6.8, 1.7]  # physical: unchanged
    assert out["distance_norm"].tolist() == [0.3, 0.1]
    assert np.allclose(out["area_px"], [100.0, 75.0])
    assert np.allclose(out["area_um2"], cells["area_um2"])  # same physical area
    assert np.allclose(out["perimeter_px"], [40.0, 35.0])
    assert out["inside"].tolist() == [True, False]


# ----------------------------------------------------------------------------------------------
# label warping
# ----------------------------------------------------------------------------------------------
def _labels(h, w, seed=3):
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.uint32)
    ids = np.concatenate([[1, 65535, 65536, 70001, 2**31 + 5, 2**32 - 2],
                          rng.integers(65536, 2**32 - 1, 200)]).astype(np.uint32)
    for i in ids:
        cv2.circle(lab.view(np.int32), (int(rng.integers(0, w)), int(rng.integers(0, h))),
                   int(rng.integers(3, 15)), int(np.array(i).view(np.int32)), -1)
    return lab


@pytest.mark.parametrize("H", [
    np.array([[0.5, 0.0, 3.0], [0.0, 0.5, -2.0], [0, 0, 1]]),
    make_h_true(12.0, 4.0, -6.0, 2e-4, -1e-4, size=400, mov_size=230),
])
def test_warp_labels_tiled_equals_one_shot(H):
    src = _labels(400, 380)
    dst_shape = (230, 210)
    one_shot = cv2.warpPerspective(src.view(np.int32), H, (dst_shape[1], dst_shape[0]),
                                   flags=cv2.INTER_NEAREST).view(np.uint32)
    out = np.full(dst_shape, 123, np.uint32)
    reads = []

    def read(x, y, w, h):
        reads.append((w, h))
        return src[y:y + h, x:x + w]

    def write(y0, x0, t):
        assert t.dtype == np.uint32 and t.shape[0] <= 64 and t.shape[1] <= 64
        out[y0:y0 + t.shape[0], x0:x0 + t.shape[1]] = t

    warp_labels(read, H, dst_shape, write, tile=64)
    assert np.array_equal(out, one_shot)
    assert set(np.unique(out)) <= set(np.unique(src))  # no mixed ids
    assert (out > 65535).any() and (out > 2**31).any()
    assert max(w * h for w, h in reads) < 200 * 200  # only a tile's source region is read


def test_warp_labels_zarr_roundtrip():
    import zarr

    src_np = _labels(300, 260, seed=5)
    src = zarr.create_array(store={}, shape=src_np.shape, chunks=(64, 64), dtype="uint32")
    src[:] = src_np
    H = np.array([[0.5, 0.0, 1.0], [0.0, 0.5, 2.0], [0, 0, 1]])
    dst = zarr.create_array(store={}, shape=(150, 130), chunks=(32, 32), dtype="uint32")
    warp_labels_zarr(src, H, dst, tile=64)
    one_shot = cv2.warpPerspective(src_np.view(np.int32), H, (130, 150),
                                   flags=cv2.INTER_NEAREST).view(np.uint32)
    assert np.array_equal(dst[:], one_shot)


def test_configured_ransac_threshold_reaches_every_ransac_call(ref_img, tmp_path, monkeypatch):
    """registration.ransac_threshold, given to the stage, is the threshold of every RANSAC fit:
    coarse, guided and the level-0 refinement (none falls back to a hard-coded value)."""
    import cellstage.register.stage as reg_stage

    H_true = make_h_true(*CASES[1])
    slides = {"ref.ome.zarr": FakeSlide(ref_img, 0.17, "sec_40x"),
              "mov.ome.zarr": FakeSlide(make_mov(ref_img, H_true), 0.34, "sec_20x")}
    monkeypatch.setattr(reg_stage, "ZarrSlide", lambda p: slides[str(p)])
    calls = []
    real = cv2.findHomography

    def spy(src, dst, method=0, ransacReprojThreshold=None, *args, **kw):  # noqa: N803 (OpenCV's name)
        calls.append((method, ransacReprojThreshold))
        if ransacReprojThreshold is None:
            return real(src, dst, method, *args, **kw)
        return real(src, dst, method, ransacReprojThreshold, *args, **kw)

    monkeypatch.setattr(cv2, "findHomography", spy)
    for thr in (3.25, 7.5):
        calls.clear()
        data = reg_stage.register("ref.ome.zarr", "mov.ome.zarr", tmp_path / f"{thr}.json", tmp_path / f"{thr}.png",
                                  n_features=10000, ransac_threshold=thr, min_inliers=30, min_inlier_ratio=0.1,
                                  coarse_max_side=2048)
        assert data["ok"] and data["stage"] == "refined", data["message"]
        ransac = [t for m, t in calls if m == cv2.RANSAC]
        assert len(ransac) >= 3  # brute-force coarse, guided coarse, refined level 0
        assert ransac == [thr] * len(ransac)
        assert {m for m, _ in calls} <= {cv2.RANSAC, 0}  # the rest: least-squares polish, no threshold
        assert corner_error_ref_px(np.asarray(data["H"]), H_true) <= 1.0
        assert json.loads((tmp_path / f"{thr}.json").read_text())["ok"] and (tmp_path / f"{thr}.png").is_file()
