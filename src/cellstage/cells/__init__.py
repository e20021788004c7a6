"""Per-nucleus measurements: morphology, tubule-wall distance, annotation point matching.

Public API::

    cell_table(labels, rois, *, mpp, slide, points=None, match_radius_px=None, block=2048,
               with_points=False) -> DataFrame (or (DataFrame, per-point table))
    match_points(cells, points, point_cell_ids=None, *, match_radius_px=None, shape=None) -> DataFrame
    assign_points(cells, points, point_cell_ids=None, *, match_radius_px=None) -> (labels, counts)
    segmentation_qc(counts, min_points_on_nuclei) -> str ("" = passed, else the warning with advice)
    roi_geometry(polygon) -> dict;  distance_to_wall(polygon, xs, ys) -> ndarray
"""

from .distance import distance_to_wall, roi_geometry
from .morphology import (
    ADVICE,
    COLUMNS,
    POINT_COLUMNS,
    assign_points,
    cell_table,
    match_points,
    measure_labels,
    point_counts,
    segmentation_qc,
)

__all__ = ["ADVICE", "COLUMNS", "POINT_COLUMNS", "assign_points", "cell_table", "distance_to_wall", "match_points",
           "measure_labels", "point_counts", "roi_geometry", "segmentation_qc"]
