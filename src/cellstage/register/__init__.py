"""cellstage.register: ORB + RANSAC homography from a section's reference scan to one other scan
of it (a section may have any number of scans: each non-reference one is registered on its own),
and mapping of points, polygons, cell tables and label images through it (ref level-0 px → mov
level-0 px). Stage entry points: :mod:`cellstage.register.stage`."""

from .homography import RegistrationResult, register_pair
from .mapping import (
    map_cell_table,
    map_points,
    map_points_report,
    map_polygons,
    outside_report,
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
    "outside_report",
    "warp_labels",
    "warp_labels_zarr",
    "overlay_png",
    "save_result",
]
