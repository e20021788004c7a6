"""One reader interface over whole-slide image backends.

``open_slide(path)`` returns a :class:`Slide` whatever the backend:

* ``"openslide"``  SVS, NDPI, MRXS, SCN, generic tiled TIFF (sees only level 0 of SubIFD OME-TIFF)
* ``"tiffslide"``  SVS and generic TIFF, incl. SubIFD pyramids (pure python + imagecodecs)
* ``"tifffile"``   OME-TIFF (SubIFD pyramids), generic TIFF pages
* ``"slideio"``    VSI, CZI, NDPI, SCN, ZVI, QPTIFF, ...
* ``"bioformats"`` anything Bio-Formats reads (optional: only in its own numpy<2 + Java
  environment, ``make setup-bioformats`` / workflow/envs/bioformats.yaml; never chosen by format)
* ``"zarr"``       a store written by :func:`cellstage.io.omezarr.convert_to_omezarr`

One module per backend (``openslide.py``, ``tiffslide.py``, ``tifffile.py``, ``slideio.py``,
``bioformats.py``, ``zarr.py``) over the shared :class:`~.base.Slide` (``base.py``); this module
sniffs the format and picks the backend. The readers never import the OME-Zarr writer
(:mod:`cellstage.io.omezarr` imports them).

Conventions (identical for every backend):

* ``read_region(x, y, w, h, level=0)``: ``x, y`` in level-0 pixels, ``w, h`` in pixels of
  ``level``; returns ``(h, w, 3) uint8`` RGB. Parts of the region outside the slide are white
  (255); the window is never shifted to fit.
* ``mpp`` is µm/px at level 0: the ``mpp`` argument wins over metadata; when neither gives
  one a :class:`CellstageError` asks to add ``mpp`` to the slide sheet.
* Every failure (missing file, unknown format, truncated/corrupt file, zero-size level, a
  backend exception while reading) raises :class:`CellstageError` naming the file.
* Pixels: samples other than uint8 are scaled to 0..255 by one rule per slide
  (:meth:`~.base.Slide.white_level`: 12-bit data in uint16 by 4095, floats in 0..1 by 255, other
  float ranges refused); OpenSlide is never used for >8-bit or float TIFFs (it keeps the high
  byte). More than 3 channels (unless the 4th is a declared alpha) are refused: there is no
  setting to pick channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...utils import CellstageError
from .base import Slide, _suffix
from .bioformats import BioFormatsSlide, BioFormatsUnavailable, bioformats_available
from .openslide import OpenSlideSlide
from .slideio import SlideIOSlide
from .tifffile import TiffFileSlide
from .tiffslide import TiffSlideSlide
from .zarr import ZarrSlide, open_zarr_slide

BACKENDS = ("openslide", "tiffslide", "tifffile", "slideio", "bioformats")
SLIDEIO_EXTS = {".vsi", ".czi", ".zvi", ".afi", ".qptiff", ".dcm"}
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


# --------------------------------------------------------------------------- format sniffing
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
    import logging

    import tifffile

    size = path.stat().st_size
    tlog = logging.getLogger("tifffile")
    level = tlog.level
    tlog.setLevel(logging.ERROR)  # tifffile warns about bad offsets; we raise our own message
    try:
        with tifffile.TiffFile(path) as tf:
            p0 = tf.pages[0]
            info = {"is_ome": bool(tf.is_ome), "subifds": "SubIFDs" in p0.tags,
                    "samples": int(getattr(p0, "samplesperpixel", 1) or 1),
                    "bits": int(getattr(p0, "bitspersample", 8) or 8),
                    "float": int(getattr(p0, "sampleformat", 1) or 1) == 3,
                    "alpha": tuple(int(e) for e in (getattr(p0, "extrasamples", ()) or ())) in ((1,), (2,))}
            try:  # OME-TIFF: one plane per channel; a series tifffile cannot parse is left to the backends
                ser = dict(zip(tf.series[0].axes, tf.series[0].shape)) if tf.series else {}
                info["channels"] = int(ser.get("S", 1)) * int(ser.get("C", 1))
            except Exception:  # pragma: no cover
                pass
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


def _check_tiff_pixels(path: Path, tinfo: dict, backend: str | None) -> None:
    """Refuse what would silently lose pixels: more than 3 samples per pixel (unless the 4th is a
    declared alpha), and OpenSlide asked for >8-bit or float samples (libtiff's RGBA interface
    keeps only the high byte: 12-bit data comes out nearly black)."""
    n = tinfo["samples"]
    if tinfo.get("channels", n) > max(n, 3):  # channels stored as separate planes (OME-TIFF C axis)
        raise CellstageError(
            f"{path}: {tinfo['channels']} channels (planes of the first image series); cellstage reads brightfield "
            "RGB (3 channels, or RGB + alpha) only and has no setting to pick channels: export the slide as RGB "
            "(e.g. from QuPath or Fiji) and list that file in the slide sheet"
        )
    if n > 3 and not (n == 4 and tinfo["alpha"]):
        raise CellstageError(
            f"{path}: {n} samples per pixel; cellstage reads brightfield RGB (3 channels, or RGB + alpha) only and "
            "has no setting to pick channels: export the slide as RGB (e.g. from QuPath or Fiji) and list that "
            "file in the slide sheet"
        )
    if backend == "openslide" and (tinfo["bits"] != 8 or tinfo["float"]):
        kind = "float" if tinfo["float"] else f"{tinfo['bits']}-bit"
        raise CellstageError(
            f"{path}: {kind} samples, which OpenSlide reduces to their high byte (dark or black pixels); "
            "leave the slide sheet's `backend` empty or set it to tifffile"
        )


def choose_backend(path: str | os.PathLike) -> str:
    suf = _suffix(Path(path))
    if suf in (".zarr", ".ome.zarr") or Path(path).is_dir():
        return "zarr"
    if suf in SLIDEIO_EXTS:
        return "slideio"
    if suf in (".ome.tif", ".ome.tiff"):
        return "tifffile"
    return "openslide"


_CLASSES = {
    "openslide": OpenSlideSlide,
    "tiffslide": TiffSlideSlide,
    "tifffile": TiffFileSlide,
    "slideio": SlideIOSlide,
    "bioformats": BioFormatsSlide,
}


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
        _check_tiff_pixels(p, tinfo, backend)
        if not (tinfo["bits"] == 8 and not tinfo["float"]) and chosen == "openslide":
            chosen = "tifffile"  # OpenSlide (libtiff RGBA) keeps only the high byte of >8-bit samples

    if backend:
        candidates = [backend]
    elif chosen == "slideio":
        candidates = [chosen]
    elif kind != "tiff":
        candidates = [chosen, "slideio"]
    else:
        candidates = [chosen] + [b for b in ("openslide", "tiffslide", "tifffile") if b != chosen]
        if tinfo["bits"] != 8 or tinfo["float"]:
            candidates = [b for b in candidates if b != "openslide"]
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


__all__ = [
    "BACKENDS", "BioFormatsSlide", "BioFormatsUnavailable", "OpenSlideSlide", "Slide", "SlideIOSlide",
    "TiffFileSlide", "TiffSlideSlide", "ZarrSlide", "bioformats_available", "choose_backend",
    "open_slide", "open_zarr_slide", "sniff_format",
]
