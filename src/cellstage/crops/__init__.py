"""cellstage.crops: single-cell crops from converted slides and label images."""

from .extract import INDEX_COLUMNS, crops_at_points, extract_crops, window_origin

__all__ = ["INDEX_COLUMNS", "crops_at_points", "extract_crops", "window_origin"]
