"""Benchmark: registration time per pair (coarse-to-fine ORB/Hamming/RANSAC) on a demo pair.

``results/bench/register_seconds_per_pair.json``: value = wall seconds of ``register_pair``
on one demo-size pair (40x 1536², 20x 768², rendered by ``cellstage.demo``); anchor = the seed
paper's plain method on the same pair in the same run: one ORB pass (10,000 features) over both
whole level-0 images, cross-checked brute-force Hamming matching, ``findHomography(RANSAC, 5.0)``.
Goal: at most 2× the plain method (ratio ≤ 2) — the coarse pass, the guided re-matching, nine
refinement windows and the least-squares polish must not cost more than one more plain pass.
Both corner errors against the generator's truth are printed (the plain method is less accurate).
"""

from __future__ import annotations

import time

import cv2
import numpy as np
from _bench import write_result
from slide_doubles import FakeSlide as ArraySlide  # noqa: E402


def _corner_err(H, T, size):
    from cellstage.register import map_points

    c = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], float)
    return float(np.mean(np.linalg.norm(map_points(map_points(c, H), np.linalg.inv(T)) - c, axis=1)))


def _plain(ref, mov):
    orb = cv2.ORB_create(nfeatures=10000)
    g1 = cv2.cvtColor(ref, cv2.COLOR_RGB2GRAY)
    g2 = cv2.cvtColor(mov, cv2.COLOR_RGB2GRAY)
    k1, d1 = orb.detectAndCompute(g1, None)
    k2, d2 = orb.detectAndCompute(g2, None)
    m = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(d1, d2)
    src = np.float64([k1[x.queryIdx].pt for x in m])
    dst = np.float64([k2[x.trainIdx].pt for x in m])
    H, _ = cv2.findHomography(src, dst, cv2.RANSAC, 5.0)
    return H


def test_bench_register_pair():
    from cellstage.demo.generate import PRESETS
    from cellstage.demo.render import MPP_20X, MPP_40X, random_homography, render_scan_20x, render_section
    from cellstage.register import register_pair

    cv2.setNumThreads(2)
    cfg = PRESETS["demo"]
    rng = np.random.default_rng(21)
    sec = render_section(rng, cfg.size, 3, tubule_radius=cfg.tubule_radius)
    T = random_homography(rng, cfg.size, cfg.size // 2)
    mov = render_scan_20x(sec, T, cfg.size // 2, rng)
    ref_s, mov_s = ArraySlide(sec.image, MPP_40X), ArraySlide(mov, MPP_20X)

    register_pair(ref_s, mov_s, expected_scale=0.5)  # warm-up (OpenCV thread pool, caches)
    ts, tp = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        res = register_pair(ref_s, mov_s, expected_scale=0.5)
        ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        Hp = _plain(sec.image, mov)
        tp.append(time.perf_counter() - t0)
    assert res.ok, res.message
    print(f"corner error: register_pair {_corner_err(res.H, T, cfg.size):.3f} px ({res.stage}), "
          f"plain ORB+RANSAC {_corner_err(Hp, T, cfg.size):.3f} px (40x frame)")
    write_result("register_seconds_per_pair", float(np.median(ts)), "s/pair",
                "plain ORB(10k)+BF Hamming+RANSAC(5.0) on the same level-0 pair, same run",
                float(np.median(tp)), "<=", 2.0)
