"""Nucleus segmentation: Cellpose training/inference, tiled whole-slide stitching, classical fallback.

Public API::

    train_segmenter(images, masks, out_path, *, pretrained=None, epochs=..., ...) -> dict
    segment_slide(slide, rois, model_path, write_labels, *, tile=1024, overlap=128, ...) -> dict
    segment_classical(rgb) -> labels
    create_labels(path, shape, *, mpp, slide) -> zarr array;  open_labels(path) -> zarr array
"""

from .cellpose_seg import CellposeSegmenter
from .classical import segment_classical
from .tiling import create_labels, labels_attrs, open_labels, segment_slide, tile_grid
from .train import split_tiles, train_segmenter

__all__ = [
    "CellposeSegmenter", "create_labels", "labels_attrs", "open_labels", "segment_classical",
    "segment_slide", "split_tiles", "tile_grid", "train_segmenter",
]
