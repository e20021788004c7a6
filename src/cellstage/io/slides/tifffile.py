"""tifffile backend: OME-TIFF (SubIFD or page pyramids) and generic TIFF pages, through zarr."""

from __future__ import annotations

import numpy as np

from .base import Slide, _tiff_mpp, _tiff_tags


class TiffFileSlide(Slide):
    """OME-TIFF (SubIFD or page pyramids) and generic TIFF through tifffile + zarr."""

    backend = "tifffile"

    def __init__(self, path, mpp=None, series: int = 0):
        super().__init__(path, mpp)
        import tifffile
        import zarr

        self._tf = tifffile.TiffFile(self.path)
        ser = self._tf.series[series]
        levels = list(ser.levels)
        self._arrays = []
        self._axes = []
        dims = []
        for k, lv in enumerate(levels):
            axes = lv.axes
            store = ser.aszarr(level=k)
            arr = zarr.open(store, mode="r")
            if hasattr(arr, "shape") is False:  # a group (should not happen with level=)
                arr = arr["0"]
            self._arrays.append(arr)
            self._axes.append(axes)
            shape = dict(zip(axes, lv.shape))
            dims.append((shape.get("X", 0), shape.get("Y", 0)))
        self.level_dimensions = tuple(dims)
        page = ser.pages[0] if ser.pages else self._tf.pages[0]
        self.metadata = _tiff_tags(page)
        self.metadata["tifffile.series_kind"] = ser.kind
        self.metadata["tifffile.axes"] = ser.axes
        self._mpp_meta, self.magnification = _tiff_mpp(self._tf, page)
        self._finish_init()

    def _read(self, lx, ly, w, h, level):
        arr, axes = self._arrays[level], self._axes[level]
        sl = []
        for ax, n in zip(axes, arr.shape):
            if ax == "Y":
                sl.append(slice(ly, ly + h))
            elif ax == "X":
                sl.append(slice(lx, lx + w))
            elif ax in ("S", "C") and n <= 4:
                sl.append(slice(None))
            else:
                sl.append(0)  # T, Z, extra channel planes: first
        a = np.asarray(arr[tuple(sl)])
        kept = [ax for ax, s in zip(axes, sl) if not isinstance(s, int)]
        order = [kept.index("Y"), kept.index("X")] + [i for i, ax in enumerate(kept) if ax not in "YX"]
        a = np.transpose(a, order)
        if a.ndim == 2:
            a = a[..., None]
        return a

    def _close(self):
        self._tf.close()
