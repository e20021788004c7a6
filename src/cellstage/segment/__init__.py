"""Nucleus segmentation: Cellpose training/inference, tiled whole-slide stitching, classical fallback.

Public API::

    train_segmenter(images, masks, out_path, *, pretrained=None, epochs=..., ...) -> dict
    segment_slide(slide, rois, model_path, write_labels, *, tile=1024, overlap=128, ...) -> dict
    segment_classical(rgb) -> labels;  segment_at_point(rgb, x, y) -> mask of the nucleus a point prompts
    create_labels(path, shape, *, mpp, slide) -> zarr array;  open_labels(path) -> zarr array
    (the label store lives in cellstage.io.labels; re-exported here)

Stage entry points (read inputs, call these, write outputs): :mod:`cellstage.segment.stage`.
The held-out AP of ``train_segmenter`` is measured through the same ``CellposeSegmenter`` and
per-slide normalisation that ``segment_slide`` uses (``cellstage.segment.train.predict_held_out``).
"""

from ..io.labels import create_labels, labels_attrs, open_labels
from .cellpose_seg import CellposeSegmenter
from .classical import segment_at_point, segment_classical
from .tiling import segment_slide, tile_grid
from .train import split_tiles, train_segmenter

__all__ = [
    "CellposeSegmenter", "create_labels", "labels_attrs", "open_labels", "segment_at_point", "segment_classical",
    "segment_slide", "split_tiles", "tile_grid", "train_segmenter",
]
