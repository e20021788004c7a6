"""The convert stage: a vendor slide -> ``results/slides/{slide}.ome.zarr`` (OME-NGFF multiscale).

Called by ``workflow/scripts/convert.py``, by ``cellstage convert`` and, inside the Bio-Formats
environment, by rule ``convert_bioformats``. The arguments are the validated config values
(``convert.tile``) and the slide sheet's ``backend`` / ``mpp`` columns; defaults live only in the
schema.
"""

from __future__ import annotations

import logging

from .omezarr import convert_to_omezarr

log = logging.getLogger("cellstage.io")


def convert(slide_path, out_path, *, backend: str | None, mpp: float | None, tile: int) -> dict:
    """Stream ``slide_path`` into the OME-Zarr store ``out_path`` (written atomically) and return
    the conversion summary of :func:`cellstage.io.omezarr.convert_to_omezarr`."""
    info = convert_to_omezarr(slide_path, out_path, backend=backend, mpp=mpp, tile=tile)
    log.info("converted %s -> %s: %s", slide_path, out_path, info)
    return info
