"""OpenSlide backend: SVS, NDPI, MRXS, SCN, generic tiled TIFF (sees only level 0 of SubIFD OME-TIFF)."""

from __future__ import annotations

import numpy as np

from ...utils import CellstageError
from .base import Slide, _float


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path, mpp=None):
        super().__init__(path, mpp)
        import openslide

        fmt = openslide.OpenSlide.detect_format(str(self.path))
        if fmt is None:
            raise CellstageError(f"{self.path}: format not recognised by OpenSlide")
        self._os = openslide.OpenSlide(str(self.path))
        props = dict(self._os.properties)
        self.metadata = props
        self.metadata["openslide.format"] = fmt
        self.level_dimensions = tuple(self._os.level_dimensions)
        self.level_downsamples = tuple(self._os.level_downsamples)
        self._mpp_meta = _float(props.get("openslide.mpp-x"))
        self.magnification = _float(props.get("openslide.objective-power"))
        # Region offsets (MRXS, some NDPI): openslide's level-0 coordinates already include them.
        self._finish_init()

    def _read(self, lx, ly, w, h, level):
        ds = self.level_downsamples[level]
        x0 = int(round(lx * ds)) if level else lx
        y0 = int(round(ly * ds)) if level else ly
        return np.asarray(self._os.read_region((x0, y0), level, (w, h)))

    def _close(self):
        self._os.close()
