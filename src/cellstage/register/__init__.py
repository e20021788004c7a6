"""cellstage.register: ORB + RANSAC homography between the two scans of a section, and mapping
of points, polygons, cell tables and label images through it (ref level-0 px → mov level-0 px)."""

from .homography import RegistrationResult, register_pair
from .mapping import (
    map_cell_table,
    map_points,
    map_points_report,
    map_polygons,
    warp_labels,
    warp_labels_zarr,
)
from .qc import overlay_png, save_result

__all__ = [
    "RegistrationResult",
    "register_pair",
    "map_points",
    "map_points_report",
    "map_polygons",
    "map_cell_table",
    "warp_labels",
    "warp_labels_zarr",
    "overlay_png",
    "save_result",
]
