"""Stage entry point: a slide's nucleus labels -> its cell table (and QuPath GeoJSON of the cells).

Reads inputs, calls :func:`cellstage.cells.cell_table`, writes outputs atomically. Every argument
arrives validated from the workflow config (defaults live in the schema only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

from ..io.annotations import read_points, read_polygons, write_cells_geojson
from ..io.labels import open_labels
from ..io.slides import ZarrSlide
from ..taxonomy import Taxonomy
from ..utils import atomic_path
from .morphology import cell_table

log = logging.getLogger("cellstage.cells")


def cells(labels_path, slide_path, tubules_path, points_path, out_cells, *, geojson=None, slide_id: str,
          classes: Sequence[str], match_radius_px: float) -> pd.DataFrame:
    """One row per nucleus (morphology, tubule, distance to the wall, annotated class).

    Point annotations naming a class that is not in ``classes`` are refused, naming the file and
    the point.
    """
    slide = ZarrSlide(slide_path)
    rois = read_polygons(tubules_path)
    points = read_points(points_path) if points_path else None
    if points is not None:
        taxonomy = Taxonomy(tuple(classes))
        for i, name in enumerate(points["label"]):
            taxonomy.index(name, where=f"{points_path}: point {i} class")
    table = cell_table(open_labels(labels_path), rois, mpp=slide.mpp, slide=slide_id, points=points,
                       match_radius_px=match_radius_px)
    with atomic_path(out_cells) as tmp:
        table.to_parquet(tmp, index=False)
    if geojson:
        write_cells_geojson(table, geojson, mpp=slide.mpp)
    n_lab = int((table["label"] != "").sum()) if "label" in table else 0
    log.info("%s: %d nuclei, %d labelled", slide_id, len(table), n_lab)
    return table
