"""Tubule geometry and nucleus-to-wall distances (seed paper §3.2).

distance_norm = distance_to_wall / (min_bbox_width / (2 · compactness)), where
``min_bbox_width`` is the shorter side of the ROI's minimum-area rotated rectangle
(shapely ``minimum_rotated_rectangle``) and ``compactness = 4π·area / perimeter²`` of the
polygon. For a circle of radius R the factor is 2R / 2 = R (distance_norm = 1 at the centre);
for a square of side s it is s / (π/2).
"""

from __future__ import annotations

import math

import numpy as np


def roi_geometry(polygon) -> dict:
    """{"area", "perimeter", "compactness", "min_bbox_width", "norm_factor"} of a polygon (px)."""
    area = float(polygon.area)
    # the tubule wall is the outer boundary: holes (if any) do not add to the perimeter
    ext = polygon.exterior if polygon.geom_type == "Polygon" else polygon.boundary
    perim = float(ext.length)
    compact = 4 * math.pi * area / perim**2 if perim > 0 else float("nan")
    rect = polygon.minimum_rotated_rectangle
    if rect.geom_type == "Polygon":
        xy = np.asarray(rect.exterior.coords)[:4]
        sides = np.hypot(*(np.roll(xy, -1, axis=0) - xy).T)
        width = float(sides.min())
    else:  # degenerate (line/point)
        width = 0.0
    factor = width / (2 * compact) if compact and compact > 0 and width > 0 else float("nan")
    return {"area": area, "perimeter": perim, "compactness": compact,
            "min_bbox_width": width, "norm_factor": factor}


def distance_to_wall(polygon, xs, ys) -> np.ndarray:
    """Minimum distance (px) from points (xs, ys) to the polygon's outer boundary (its wall)."""
    import shapely

    xs = np.asarray(xs, float)
    ys = np.asarray(ys, float)
    ext = polygon.exterior if polygon.geom_type == "Polygon" else polygon.boundary
    return np.asarray(shapely.distance(ext, shapely.points(xs, ys)), float)
