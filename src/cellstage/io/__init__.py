"""cellstage.io: one slide-reader interface, OME-Zarr conversion, QuPath annotations."""

from .annotations import (
    check_inside,
    read_points,
    read_polygons,
    write_cells_geojson,
    write_points_geojson,
    write_polygons_geojson,
)
from .omezarr import check_omezarr, convert_to_omezarr
from .slides import BACKENDS, Slide, ZarrSlide, open_slide

__all__ = [
    "BACKENDS", "Slide", "open_slide", "ZarrSlide", "convert_to_omezarr", "check_omezarr",
    "read_polygons", "read_points", "write_cells_geojson", "write_polygons_geojson",
    "write_points_geojson", "check_inside",
]
