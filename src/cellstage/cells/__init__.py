"""Per-nucleus measurements: morphology, tubule-wall distance, annotation point matching.

Public API::

    cell_table(labels, rois, *, mpp, slide, points=None, match_radius_px=None, block=2048) -> DataFrame
    assign_points(cells, points, point_cell_ids=None, *, match_radius_px=None) -> (labels, counts)
    roi_geometry(polygon) -> dict;  distance_to_wall(polygon, xs, ys) -> ndarray
"""

from .distance import distance_to_wall, roi_geometry
from .morphology import COLUMNS, assign_points, cell_table, measure_labels

__all__ = ["COLUMNS", "assign_points", "cell_table", "distance_to_wall", "measure_labels", "roi_geometry"]
