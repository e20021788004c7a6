"""Stage entry point: a slide's nucleus labels -> its cell table (and QuPath GeoJSON of the cells).

Reads inputs, calls :func:`cellstage.cells.cell_table`, writes outputs atomically. Every argument
arrives validated from the workflow config (defaults live in the schema only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

from ..io.annotations import read_points, read_regions, write_cells_geojson
from ..io.labels import open_labels
from ..io.slides import ZarrSlide
from ..taxonomy import Taxonomy
from ..utils import atomic_path
from .morphology import POINT_COLUMNS, cell_table, segmentation_qc

log = logging.getLogger("cellstage.cells")


def cells(labels_path, slide_path, tubules_path, points_path, out_cells, *, geojson=None, out_points=None,
          slide_id: str, classes: Sequence[str], match_radius_px: float,
          min_points_on_nuclei: float | None = None, region_classes: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per nucleus (morphology, tubule, distance to the tubule wall, annotated class), then
    one per annotated point that matched no nucleus (``anchor = "point"``: cropped at the point).

    Point annotations naming a class that is not in ``classes`` are refused, naming the file and
    the point. ``out_points``: CSV with one row per annotated point and what it was matched to
    (:data:`cellstage.cells.POINT_COLUMNS`; ``status`` nucleus / point / outside); points outside
    the slide are listed there and in the log, never cropped. Below ``min_points_on_nuclei``
    (share of the in-slide points matched to a segmented nucleus) the log warns, with advice.
    ``region_classes``: classes of the ``tubules_path`` polygons used as tubules (config
    ``annotations.region_classes``; None = every class).
    """
    slide = ZarrSlide(slide_path)
    rois = read_regions(tubules_path, classes=region_classes)
    points = read_points(points_path) if points_path else None
    if points is not None:
        taxonomy = Taxonomy(tuple(classes))
        for i, name in enumerate(points["label"]):
            taxonomy.index(name, where=f"{points_path}: point {i} class")
    table, matched = cell_table(open_labels(labels_path), rois, mpp=slide.mpp, slide=slide_id, points=points,
                                match_radius_px=match_radius_px, with_points=True)
    with atomic_path(out_cells) as tmp:
        table.to_parquet(tmp, index=False)
    if geojson:
        write_cells_geojson(table, geojson, mpp=slide.mpp)
    if matched is None:
        matched = pd.DataFrame({c: [] for c in POINT_COLUMNS})
    if out_points:
        with atomic_path(out_points) as tmp:
            matched.to_csv(tmp, index=False)
    nuclei = table["anchor"] == "nucleus"
    log.info("%s: %d nuclei, %d labelled; %d annotated points: %d matched to a nucleus, %d cropped at the point "
             "alone, %d outside the slide", slide_id, int(nuclei.sum()), int((nuclei & (table["label"] != "")).sum()),
             len(matched), int((matched["status"] == "nucleus").sum()), int((matched["status"] == "point").sum()),
             int((matched["status"] == "outside").sum()))
    outside = matched[matched["status"] == "outside"]
    if len(outside):
        w, h = slide.dimensions
        listed = ", ".join(f"point {r.point} ({r.x:.1f}, {r.y:.1f}) {r.label}" for r in outside.head(20).itertuples())
        log.warning("%s: %d annotated point(s) lie outside the slide (%dx%d px) and get no crop: %s%s",
                    points_path, len(outside), w, h, listed, " ..." if len(outside) > 20 else "")
    counts = table.attrs.get("point_matching")
    if counts and min_points_on_nuclei is not None:
        msg = segmentation_qc(counts["on_nucleus_fraction"], min_points_on_nuclei)
        if msg:
            log.warning("%s: segmentation QC: %s", slide_id, msg)
    return table
