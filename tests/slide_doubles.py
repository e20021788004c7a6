"""Test double for the slide reader: a numpy image with a x2 pyramid, the interface ZarrSlide
offers (dimensions, level_count, level_dimensions, level_downsamples, read_region with white
padding). Records every read so tests can check which levels were touched. Shared by the
registration tests and benchmarks; the registration itself is always real."""

from __future__ import annotations

import cv2
import numpy as np


class FakeSlide:
    def __init__(self, img: np.ndarray, mpp: float | None, name: str = "fake", min_side: int = 128):
        self.name = name
        self.mpp = mpp
        self.levels = [np.ascontiguousarray(img[..., :3])]
        while min(self.levels[-1].shape[:2]) // 2 >= min_side:
            a = self.levels[-1]
            self.levels.append(
                cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)
            )
        self.reads: list[tuple] = []

    @property
    def dimensions(self):
        return (self.levels[0].shape[1], self.levels[0].shape[0])

    @property
    def level_count(self):
        return len(self.levels)

    @property
    def level_dimensions(self):
        return [(a.shape[1], a.shape[0]) for a in self.levels]

    @property
    def level_downsamples(self):
        w0 = self.levels[0].shape[1]
        return [w0 / a.shape[1] for a in self.levels]

    def read_region(self, x, y, w, h, level=0):
        self.reads.append((x, y, w, h, level))
        ds = self.level_downsamples[level]
        a = self.levels[level]
        xl, yl = int(round(x / ds)), int(round(y / ds))
        out = np.full((h, w, 3), 255, np.uint8)
        sx0, sy0 = max(0, xl), max(0, yl)
        sx1, sy1 = min(a.shape[1], xl + w), min(a.shape[0], yl + h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - yl : sy1 - yl, sx0 - xl : sx1 - xl] = a[sy0:sy1, sx0:sx1]
        return out
