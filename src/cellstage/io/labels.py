"""The nucleus label store ``results/segmentation/{slide}.zarr``: a zarr v3 group with one
``labels`` array (y, x) uint32, 0 = background, and the group attributes ``mpp`` and ``slide``.

Written by the segmentation stage (:func:`cellstage.segment.tiling.segment_slide` fills it), and
by the mapping of cells onto another scan (:mod:`cellstage.register`); read by cells and crops.
It lives in ``io`` so those stages need not import ``segment``.
"""

from __future__ import annotations

from pathlib import Path

from ..utils import CellstageError

LABELS_ARRAY = "labels"


def create_labels(path, shape, *, mpp: float | None = None, slide: str | None = None, chunk: int = 512):
    """Create the label store ``results/segmentation/{slide}.zarr``: a zarr v3 group with array
    ``labels`` (y, x) uint32, chunks ``chunk``², fill 0; group attributes ``mpp``, ``slide``.

    Write it atomically: ``with atomic_path(final) as tmp: arr = create_labels(tmp, ...);
    segment_slide(..., arr)`` — the group only appears under its final name once complete.
    Returns the (writable) zarr array.
    """
    import zarr

    h, w = (int(v) for v in shape)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update({"mpp": None if mpp is None else float(mpp), "slide": slide,
                    "axes": ["y", "x"], "content": "nucleus labels, 0 = background"})
    from zarr.codecs import BloscCodec

    # blosc-lz4: label planes are mostly 0 and runs of one id; lz4 decodes them ~3x faster than
    # zarr's default zstd (crop extraction reads every chunk), for ~7 KB instead of ~2 KB a chunk
    return g.create_array(LABELS_ARRAY, shape=(h, w), chunks=(chunk, chunk), dtype="uint32",
                          fill_value=0, compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")])


def open_labels(path, mode: str = "r"):
    """Open the ``labels`` array of a label store (attributes of the group in ``.attrs`` of
    the returned array's parent: use ``labels_attrs(path)``)."""
    import zarr

    p = Path(str(path))
    if not p.exists():
        raise CellstageError(f"label store not found: {str(p)!r} (run the segmentation stage)")
    g = zarr.open_group(str(p), mode=mode)
    if LABELS_ARRAY not in g:
        raise CellstageError(f"{str(p)!r} has no array {LABELS_ARRAY!r}")
    return g[LABELS_ARRAY]


def labels_attrs(path) -> dict:
    import zarr

    return dict(zarr.open_group(str(path), mode="r").attrs)


__all__ = ["LABELS_ARRAY", "create_labels", "labels_attrs", "open_labels"]
