"""slideio backend: VSI, CZI, NDPI, SCN, ZVI, QPTIFF, ..."""

from __future__ import annotations

from .base import Slide, _suffix

SLIDEIO_DRIVERS = {
    ".vsi": "VSI", ".czi": "CZI", ".zvi": "ZVI", ".afi": "AFI", ".qptiff": "QPTIFF",
    ".dcm": "DCM", ".svs": "SVS", ".ndpi": "NDPI", ".scn": "SCN",
    ".ome.tif": "OMETIFF", ".ome.tiff": "OMETIFF",
}


class SlideIOSlide(Slide):
    backend = "slideio"

    def __init__(self, path, mpp=None, scene: int = 0):
        super().__init__(path, mpp)
        import slideio

        driver = SLIDEIO_DRIVERS.get(_suffix(self.path), "AUTO")
        try:
            self._sl = slideio.open_slide(str(self.path), driver)
        except Exception:
            if driver == "AUTO":
                raise
            self._sl = slideio.open_slide(str(self.path), "AUTO")
        self._sc = self._sl.get_scene(scene)
        rx, ry, rw, rh = self._sc.rect
        self._rw, self._rh = rw, rh
        nz = max(1, self._sc.num_zoom_levels)
        dims, dss = [], []
        for k in range(nz):
            zi = self._sc.get_zoom_level_info(k)
            dims.append((zi.size.width, zi.size.height))
            dss.append(1.0 / zi.scale if zi.scale else rw / max(zi.size.width, 1))
        if not dims:
            dims, dss = [(rw, rh)], [1.0]
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(dss)
        res = self._sc.resolution[0]
        self._mpp_meta = res * 1e6 if res and res > 0 else None
        mag = self._sc.magnification
        self.magnification = float(mag) if mag and mag > 0 else None
        self.metadata = {"slideio.driver": driver, "slideio.scene": self._sc.name,
                         "slideio.raw_metadata": str(self._sl.raw_metadata)[:20000]}
        self._finish_init()

    def _read(self, lx, ly, w, h, level):
        if level == 0:
            return self._sc.read_block(rect=(lx, ly, w, h))
        ds = self.level_downsamples[level]
        x0, y0 = int(round(lx * ds)), int(round(ly * ds))
        x1 = min(int(round((lx + w) * ds)), self._rw)
        y1 = min(int(round((ly + h) * ds)), self._rh)
        return self._sc.read_block(rect=(x0, y0, x1 - x0, y1 - y0), size=(w, h))

    def _close(self):
        self._sc = None
        self._sl = None
