"""Stage entry point: one crop per nucleus of a slide (with and without background) into Zarr + index."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from .extract import extract_crops as _extract

log = logging.getLogger("cellstage.crops")


def extract_crops(slide_path, labels_path, cells_path, out_zarr, out_index, *, size: int, meta: Mapping,
                  classes: Sequence[str]) -> dict:
    """Crops of ``size`` px around every nucleus of ``cells_path``; ``meta`` (slide, section, scan,
    patient, split) is written into every index row."""
    info = _extract(slide_path, labels_path, cells_path, out_zarr, out_index, size=int(size), meta=dict(meta),
                    classes=list(classes))
    log.info("crops %s: %s", out_zarr, info)
    return info
