"""The backend-independent :class:`Slide` and what every reader backend shares: the pixel
helpers (:func:`_to_rgb`, :func:`_white`), metadata number parsing and the TIFF pixel-size helpers.

The conventions every backend keeps (coordinates, white outside, ``mpp``, errors) are listed
in the package docstring (:mod:`cellstage.io.slides`); :meth:`Slide.read_region` enforces them.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import numpy as np

from ...utils import CellstageError

log = logging.getLogger("cellstage.io")


# --------------------------------------------------------------------------- helpers
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for multi in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.endswith(multi):
            return multi
    return path.suffix.lower()


def _white(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), 255, dtype=np.uint8)


# integer bit depths tried, in order, when the metadata gives none below the container's bits
_PROBE_DEPTHS = (10, 12, 14, 16, 32, 64)
_PROBE_MAX_SIDE = 4096  # the pixel-range probe reads at most this window of the smallest level


def _to_uint8(a: np.ndarray, white: float) -> np.ndarray:
    """Samples scaled linearly so that 0 -> 0 and ``white`` -> 255 (rounded; outside -> clipped)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "b":
        return a.astype(np.uint8) * np.uint8(255)
    f = a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating):
        f = np.nan_to_num(f, nan=0.0, posinf=float(white), neginf=0.0)
    f *= np.float32(255.0 / float(white))
    np.clip(f, 0.0, 255.0, out=f)
    return (f + np.float32(0.5)).astype(np.uint8)


def _to_rgb(arr: np.ndarray, white: float | None = None, path=None) -> np.ndarray:
    """(h, w, c) -> (h, w, 3) uint8. 1 channel -> grey, 2 -> (a, b, a), 3 -> RGB, 4 -> RGBA over
    white; more than 4 channels raise a :class:`CellstageError` naming ``path``. Samples other
    than uint8 scale linearly to 0..255 with ``white`` -> 255 (:meth:`Slide.white_level`; None =
    the integer type's maximum, 1.0 for floats)."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] > 4:
        raise CellstageError(
            f"{path}: {a.shape[2]} channels; cellstage reads brightfield RGB (3 channels, or RGBA) only and "
            "has no setting to pick channels: export the slide as RGB and list that file in the slide sheet"
        )
    if a.dtype != np.uint8:
        if white is None:
            white = float(np.iinfo(a.dtype).max) if np.issubdtype(a.dtype, np.integer) else 1.0
        a = _to_uint8(a, white)
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
        # significant bits of integer samples from the file's metadata (set by a backend; None =
        # unknown); see white_level
        self.bit_depth: int | None = None
        self._white: dict[str, float] = {}

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
        tile = np.asarray(tile)
        tile = _to_rgb(tile, None if tile.dtype == np.uint8 else self.white_level(tile.dtype), self.path)
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

    def white_level(self, dtype) -> float:
        """The sample value shown as 255 in the uint8 RGB of :meth:`read_region`, fixed per slide
        and dtype (so every tile of a slide scales alike). The rule:

        * integer samples: ``2**bits - 1``, ``bits`` from the file's metadata (``bit_depth``: TIFF
          BitsPerSample or OME ``SignificantBits``, Bio-Formats bits per pixel) when that is below
          the container's bits; otherwise the smallest of 10, 12, 14, 16 (.. the type's) bits that
          holds the largest sample of the smallest pyramid level (at most a 4096² window of it):
          a 12-bit camera's data in uint16 (max 4095) is scaled by 4095, not shifted by 8 bits.
          Negative values show as 0.
        * float samples: 1.0 when the smallest level lies within 0..1 (0-1 floats are scaled, not
          clipped to black), 255.0 when within 0..255; other ranges are refused with an error.
        """
        dt = np.dtype(dtype)
        key = dt.str
        if key in self._white:
            return self._white[key]
        if dt == np.uint8:
            white = 255.0
        elif dt.kind == "b":
            white = 1.0
        elif np.issubdtype(dt, np.integer):
            bits = np.iinfo(dt).bits - (1 if np.issubdtype(dt, np.signedinteger) else 0)
            meta = self.bit_depth
            if meta is not None and 0 < int(meta) < bits:
                bits, how = int(meta), "metadata"
            else:
                top = self._probe_max()
                bits = next((b for b in _PROBE_DEPTHS if b <= bits and top <= 2**b - 1), bits)
                bits, how = max(bits, 8), f"largest sample {top:g} of level {self.level_count - 1}"
            white = float(2**bits - 1)
            self.metadata["cellstage.bit_depth"] = bits
            log.info("%s: %s samples read as %d-bit (%s)", self.path, dt, bits, how)
        elif np.issubdtype(dt, np.floating):
            top = self._probe_max()
            if top <= 1.0:
                white = 1.0
            elif top <= 255.0:
                white = 255.0
            else:
                raise CellstageError(
                    f"{self.path}: float samples up to {top:g} ({dt}); cellstage reads floats in 0..1 or "
                    "0..255 only: convert the slide to 8-bit RGB and list that file in the slide sheet"
                )
        else:
            raise CellstageError(f"{self.path}: sample type {dt} is not supported; convert the slide to 8-bit RGB")
        self._white[key] = white
        return white

    def _probe_max(self) -> float:
        """The largest finite sample of (a window of) the smallest level."""
        level = self.level_count - 1
        lw, lh = self.level_dimensions[level]
        a = np.asarray(self._read(0, 0, min(lw, _PROBE_MAX_SIDE), min(lh, _PROBE_MAX_SIDE), level))
        if a.ndim == 3 and a.shape[2] == 4:  # RGBA: the alpha channel is not a colour sample
            a = a[..., :3]
        a = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
        return float(a.max()) if a.size else 0.0

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
