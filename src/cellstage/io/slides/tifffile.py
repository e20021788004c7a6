"""tifffile backend: OME-TIFF (SubIFD or page pyramids) and generic TIFF pages, through zarr."""

from __future__ import annotations

import numpy as np

from ...utils import CellstageError
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
        self._check_channels(page, dict(zip(ser.axes, ser.shape)))
        self.bit_depth = _significant_bits(self._tf, page)
        self._finish_init()

    def _check_channels(self, page, shape: dict) -> None:
        """Refuse more than 3 colour channels unless the 4th is a declared alpha (RGBA)."""
        n = int(np.prod([shape.get(ax, 1) for ax in ("S", "C")]))
        extra = tuple(getattr(page, "extrasamples", ()) or ())
        rgba = n == 4 and shape.get("C", 1) == 1 and len(extra) == 1 and int(extra[0]) in (1, 2)
        if n > 3 and not rgba:
            self._tf.close()
            raise CellstageError(
                f"{self.path}: {n} channels (axes {''.join(shape)} {tuple(shape.values())}); cellstage reads "
                "brightfield RGB (3 channels, or RGB + alpha) only and has no setting to pick channels: "
                "export the slide as RGB (e.g. from QuPath or Fiji) and list that file in the slide sheet"
            )

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


def _significant_bits(tf, page) -> int | None:
    """Significant bits per integer sample from OME ``SignificantBits`` or TIFF BitsPerSample."""
    import re

    ome = getattr(tf, "ome_metadata", None) if getattr(tf, "is_ome", False) else None
    m = re.search(r'SignificantBits="(\d+)"', ome or "")
    if m:
        return int(m.group(1))
    bps = getattr(page, "bitspersample", None)
    return int(bps) if isinstance(bps, (int, np.integer)) and bps > 0 else None
