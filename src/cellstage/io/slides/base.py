"""The backend-independent :class:`Slide` and what every reader backend shares: the pixel
helpers (:func:`_to_rgb`, :func:`_white`), metadata number parsing and the TIFF pixel-size helpers.

The conventions every backend keeps (coordinates, white outside, ``mpp``, errors) are listed
in the package docstring (:mod:`cellstage.io.slides`); :meth:`Slide.read_region` enforces them.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np

from ...utils import CellstageError


# --------------------------------------------------------------------------- helpers
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for multi in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.endswith(multi):
            return multi
    return path.suffix.lower()


def _white(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), 255, dtype=np.uint8)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(h, w, c) any channel count/dtype -> (h, w, 3) uint8."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize == 2:
            a = (a >> 8).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    c = a.shape[2]
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 2:
        return np.concatenate([a, a[..., :1]], axis=2)
    if c == 4:  # RGBA: transparent (outside / empty tiles) -> white
        if a[..., 3].min() == 255:  # opaque (the usual case): a SIMD channel drop, no arithmetic
            import cv2

            return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGBA2RGB)
        rgb = a[..., :3].astype(np.uint16)
        alpha = a[..., 3:4].astype(np.uint16)
        return (rgb * alpha // 255 + 255 - alpha).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


# --------------------------------------------------------------------------- base class
class Slide:
    """Backend-independent slide. Subclasses implement ``_read(lx, ly, w, h, level)``
    (level coordinates, region fully inside the level) and ``_close()``."""

    backend: str = "?"

    def __init__(self, path, mpp_override: float | None = None):
        self.path = Path(path)
        self.dimensions: tuple[int, int] = (0, 0)
        self.level_count: int = 0
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self.magnification: float | None = None
        self.metadata: dict = {}
        self._mpp_meta: float | None = None
        self._mpp_override = mpp_override
        self._lock = threading.Lock()

    # -- set by subclasses once levels are known
    def _finish_init(self) -> None:
        try:
            self._finish_init_inner()
        except CellstageError:
            try:
                self._close()
            except Exception:  # pragma: no cover
                pass
            raise

    def _finish_init_inner(self) -> None:
        if not self.level_dimensions:
            raise CellstageError(f"{self.path}: the slide has no image levels ({self.backend})")
        for k, (w, h) in enumerate(self.level_dimensions):
            if int(w) <= 0 or int(h) <= 0:
                raise CellstageError(f"{self.path}: level {k} has zero size {w}x{h} ({self.backend})")
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.level_count = len(self.level_dimensions)
        if not self.level_downsamples:
            w0, h0 = self.dimensions
            self.level_downsamples = tuple(
                (w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions
            )
        self.level_downsamples = tuple(float(d) for d in self.level_downsamples)
        if self._mpp_override is not None:
            try:
                m = float(self._mpp_override)
            except (TypeError, ValueError):
                raise CellstageError(f"{self.path}: mpp {self._mpp_override!r} is not a number") from None
            if not (m > 0 and math.isfinite(m)):
                raise CellstageError(f"{self.path}: mpp must be > 0, got {self._mpp_override!r}")
            self.mpp = m
        elif self._mpp_meta is not None and self._mpp_meta > 0 and math.isfinite(self._mpp_meta):
            self.mpp = float(self._mpp_meta)
        else:
            raise CellstageError(
                f"{self.path}: the slide metadata gives no pixel size (µm/px); add an `mpp` "
                f"value for this slide to the slide sheet (config/slides.tsv)"
            )

    # -- public API
    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB (h, w, 3) uint8; x, y level-0 px; w, h level px; outside -> white."""
        w, h, level = int(w), int(h), int(level)
        if not 0 <= level < self.level_count:
            raise CellstageError(f"{self.path}: level {level} does not exist (level_count={self.level_count})")
        if w < 0 or h < 0:
            raise CellstageError(f"{self.path}: negative region size {w}x{h}")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx = int(math.floor(x / ds)) if level else int(x)
        ly = int(math.floor(y / ds)) if level else int(y)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        if x1 <= x0 or y1 <= y0:
            return _white(h, w)
        try:
            tile = self._read(x0, y0, x1 - x0, y1 - y0, level)
        except CellstageError:
            raise
        except Exception as e:
            raise CellstageError(
                f"{self.path}: reading region x={x} y={y} w={w} h={h} level={level} failed "
                f"with {self.backend} (truncated or corrupt file?): {type(e).__name__}: {e}"
            ) from e
        tile = _to_rgb(tile)
        if tile.shape[:2] != (y1 - y0, x1 - x0):
            raise CellstageError(
                f"{self.path}: {self.backend} returned {tile.shape[:2]} for a "
                f"{y1 - y0}x{x1 - x0} region at level {level}"
            )
        if tile.shape[:2] == (h, w):  # fully inside: no padding copy
            return tile
        out = _white(h, w)
        out[y0 - ly: y1 - ly, x0 - lx: x1 - lx] = tile
        return out

    def get_best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for k, d in enumerate(self.level_downsamples):
            if d <= downsample + 1e-6:
                best = k
        return best

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """Whole slide at the smallest level whose long side is >= max_size (or the last level)."""
        import cv2

        level = self.level_count - 1
        for k, (w, h) in enumerate(self.level_dimensions):
            if max(w, h) >= max_size:
                level = k
        w, h = self.level_dimensions[level]
        img = self.read_region(0, 0, w, h, level)
        s = max_size / max(w, h)
        if s < 1:
            img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        return img

    def _read(self, lx, ly, w, h, level) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _close(self) -> None:  # pragma: no cover
        pass

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.path.name} backend={self.backend} "
                f"dims={self.dimensions} levels={self.level_count} mpp={getattr(self, 'mpp', None)}>")



# --------------------------------------------------------------------------- metadata helpers
def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3,
               "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6,
               "Å": 1e-4, "pm": 1e-6}


def _tiff_mpp(tf, page) -> tuple[float | None, float | None]:
    """µm/px and magnification from OME-XML, the SVS description or X/YResolution tags."""
    mpp = mag = None
    if tf.is_ome and tf.ome_metadata:
        import re

        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
        if m:
            u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
            unit = u.group(1) if u else "µm"
            mpp = _float(m.group(1))
            if mpp is not None:
                mpp *= _UNIT_TO_UM.get(unit, 1.0)
        m = re.search(r'NominalMagnification="([0-9.eE+-]+)"', tf.ome_metadata)
        if m:
            mag = _float(m.group(1))
    desc = page.description or ""
    if mpp is None and "Aperio" in desc:
        import re

        m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
        mpp = _float(m.group(1)) if m else None
        m = re.search(r"AppMag\s*=\s*([0-9.eE+-]+)", desc)
        mag = _float(m.group(1)) if m else mag
    if mpp is None:
        tags = page.tags
        xres = tags.get("XResolution")
        unit = tags.get("ResolutionUnit")
        unit = int(unit.value) if unit is not None else 2
        if xres is not None:
            num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
            ppu = num / den if den else 0
            if ppu > 0 and unit in (2, 3):
                mpp = (25400.0 if unit == 2 else 10000.0) / ppu
    return mpp, mag


def _tiff_tags(page) -> dict:
    out = {}
    for tag in page.tags:
        if tag.name in ("TileOffsets", "TileByteCounts", "StripOffsets", "StripByteCounts",
                        "JPEGTables", "ICCProfile", "SubIFDs", "XMP"):
            continue
        v = tag.value
        if isinstance(v, bytes):
            continue
        out[f"tiff.{tag.name}"] = v if isinstance(v, (str, int, float)) else str(v)[:2000]
    return out
