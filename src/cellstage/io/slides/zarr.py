"""Reader over an OME-NGFF store written by :func:`cellstage.io.omezarr.convert_to_omezarr`
(``results/slides/{slide}.ome.zarr``): the :class:`Slide` interface, reading only the chunks a
region touches. The writer imports this module, never the other way round.
"""

from __future__ import annotations

import numpy as np

from ...utils import CellstageError
from ..chunks import region_reader
from .base import _UNIT_TO_UM, Slide


class ZarrSlide(Slide):
    """The Slide read interface over a store written by :func:`cellstage.io.omezarr.convert_to_omezarr`.

    Reads only the chunks a region touches. Also accepts NGFF 0.4 (zarr v2, top-level
    ``multiscales``) stores with (c, y, x) or (y, x, c)-free (c, y, x) arrays.
    """

    backend = "zarr"

    def __init__(self, path, mpp: float | None = None):
        super().__init__(path, mpp)
        import zarr

        p = self.path
        if not p.exists():
            raise CellstageError(f"{p}: zarr store not found")
        try:
            self._root = zarr.open_group(str(p), mode="r")
            attrs = dict(self._root.attrs)
        except Exception as e:
            raise CellstageError(f"{p}: not a readable zarr group ({type(e).__name__}: {e})") from e
        ome = attrs.get("ome", attrs)
        ms = (ome.get("multiscales") or [None])[0]
        if ms is None:
            raise CellstageError(f"{p}: zarr group has no OME-NGFF multiscales metadata")
        axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", ["c", "y", "x"])]
        if axes[-2:] != ["y", "x"]:
            raise CellstageError(f"{p}: expected axes (..., y, x), found {axes}")
        self._axes = axes
        self._arrays = []
        self._readers = {}
        dims = []
        for ds in ms["datasets"]:
            try:
                arr = self._root[ds["path"]]
            except KeyError:
                raise CellstageError(f"{p}: multiscales dataset {ds['path']!r} is missing") from None
            self._arrays.append(arr)
            dims.append((arr.shape[-1], arr.shape[-2]))
        self.level_dimensions = tuple(dims)
        ct = ms["datasets"][0].get("coordinateTransformations", [])
        scale = next((t["scale"] for t in ct if t.get("type") == "scale"), None)
        if scale is not None:
            unit = next((a.get("unit") for a in ms["axes"] if isinstance(a, dict) and a.get("name") == "x"), None)
            self._mpp_meta = float(scale[-1]) * _UNIT_TO_UM.get(unit or "micrometer", 1.0)
        cs = attrs.get("cellstage", {})
        self.metadata = dict(cs)
        self.magnification = cs.get("magnification")
        self._finish_init()

    @property
    def arrays(self):
        return list(self._arrays)

    def _read(self, lx, ly, w, h, level):
        arr = self._arrays[level]
        lead = (0,) * (arr.ndim - 3)
        if arr.ndim == 2:
            return np.asarray(arr[ly: ly + h, lx: lx + w])
        if arr.ndim == 3:
            read = self._readers.get(level)
            if read is None:
                read = self._readers[level] = region_reader(arr)
            a = read((0, ly, lx), (arr.shape[0], ly + h, lx + w))
        else:
            a = np.asarray(arr[lead + (slice(None), slice(ly, ly + h), slice(lx, lx + w))])
        if a.shape[0] in (3, 4) and a.dtype == np.uint8:
            import cv2

            return cv2.merge(list(a))  # CHW -> HWC, SIMD (much faster than a numpy transpose copy)
        return np.moveaxis(a, 0, 2)

    def read_chw(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """(3, h, w) uint8, level-0 x/y like read_region, white outside; no HWC transpose."""
        return np.ascontiguousarray(np.moveaxis(self.read_region(x, y, w, h, level), 2, 0))

    def _close(self):
        self._arrays = []


def open_zarr_slide(path, mpp: float | None = None) -> ZarrSlide:
    return ZarrSlide(path, mpp=mpp)
