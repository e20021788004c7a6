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

from test_bench_segment import write_bench  # local writer (same folder)


class ArraySlide:
    def __init__(self, img, mpp, min_side=128):
        self.mpp = mpp
        self.levels = [img]
        while min(self.levels[-1].shape[:2]) // 2 >= min_side:
            a = self.levels[-1]
            self.levels.append(cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2),
                                          interpolation=cv2.INTER_AREA))

    @property
    def dimensions(self):
        return (self.levels[0].shape[1], self.levels[0].shape[0])

    @property
    def level_dimensions(self):
        return [(a.shape[1], a.shape[0]) for a in self.levels]

    def read_region(self, x, y, w, h, level=0):
        a = self.levels[level]
        ds = self.levels[0].shape[1] / a.shape[1]
        xl, yl = int(round(x / ds)), int(round(y / ds))
        out = np.full((h, w, 3), 255, np.uint8)
        sx0, sy0, sx1, sy1 = max(0, xl), max(0, yl), min(a.shape[1], xl + w), min(a.shape[0], yl + h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - yl:sy1 - yl, sx0 - xl:sx1 - xl] = a[sy0:sy1, sx0:sx1]
        return out


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
    from cellstage.demo.render import (MPP_20X, MPP_40X, random_homography, render_scan_20x,
                                       render_section)
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
    write_bench("register_seconds_per_pair", float(np.median(ts)), "s/pair",
                "plain ORB(10k)+BF Hamming+RANSAC(5.0) on the same level-0 pair, same run",
                float(np.median(tp)), "<=", 2.0)
