"""tiffslide backend: SVS and generic TIFF, incl. SubIFD pyramids (pure python + imagecodecs)."""

from __future__ import annotations

from .base import Slide, _float


class TiffSlideSlide(Slide):
    backend = "tiffslide"

    def __init__(self, path, mpp=None):
        super().__init__(path, mpp)
        import tiffslide

        self._ts = tiffslide.TiffSlide(str(self.path))
        props = {k: v for k, v in dict(self._ts.properties).items()}
        self.metadata = {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v))
                         for k, v in props.items()}
        self.level_dimensions = tuple(self._ts.level_dimensions)
        self.level_downsamples = tuple(self._ts.level_downsamples)
        self._mpp_meta = _float(props.get("tiffslide.mpp-x"))
        self.magnification = _float(props.get("tiffslide.objective-power"))
        self._finish_init()

    def _read(self, lx, ly, w, h, level):
        ds = self.level_downsamples[level]
        x0 = int(round(lx * ds)) if level else lx
        y0 = int(round(ly * ds)) if level else ly
        return self._ts.read_region((x0, y0), level, (w, h), as_array=True)

    def _close(self):
        self._ts.close()
