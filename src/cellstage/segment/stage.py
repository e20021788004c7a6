"""Stage entry points of nucleus segmentation: train the Cellpose segmenter, segment a slide.

Each function only reads the stage's inputs, calls the algorithms of :mod:`cellstage.segment` and
writes the outputs atomically. Every keyword argument arrives validated from the workflow config
(``segmentation`` section); the defaults live in the schema only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.annotations import check_inside, read_regions
from ..io.labels import create_labels
from ..io.slides import ZarrSlide
from ..utils import CellstageError, atomic_path, set_torch_threads

log = logging.getLogger("cellstage.segment")


def _read_level0(slide) -> np.ndarray:
    w, h = slide.dimensions
    return slide.read_region(0, 0, w, h, level=0)


def train_segmenter(slide_paths, mask_paths, out_model, ap_table: str | os.PathLike | None, *,
                    pretrained: str | None, diameter: float | None,
                    epochs: int, learning_rate: float, batch_size: int, bsize: int, diam_mean: float,
                    nimg_per_epoch: int | None, eval_tiles: int | None, seed: int, threads: int) -> dict:
    """Cellpose trained on whole training slides and their nucleus masks (tiled inside).

    Writes ``out_model`` (Cellpose's format) and ``<out_model>.json`` (AP@0.5 of the held-out
    tiles, segmented as :func:`segment` segments a slide: one normalisation per slide).
    ``nimg_per_epoch`` None = every training tile once per epoch; ``eval_tiles`` None = all
    held-out tiles. Resumable: rerun after a kill, it continues from ``<out_model>.ckpt/`` (see
    :func:`cellstage.segment.train.fit_cellpose`).
    ``ap_table``: also write a CSV (see :func:`ap_frame`; None: not written): AP@0.5 of the trained model and, when
    training started from a model file, of that model before fine-tuning, on the same tiles.
    """
    import tifffile

    from .train import train_segmenter as _train

    set_torch_threads(threads)
    images, masks = [], []
    for sp, mp in zip(slide_paths, mask_paths, strict=True):
        slide = ZarrSlide(sp)
        mask = tifffile.imread(mp)
        if mask.shape[:2] != (slide.dimensions[1], slide.dimensions[0]):
            raise CellstageError(
                f"{mp}: mask shape {mask.shape[:2]} differs from slide {sp} level-0 shape "
                f"{(slide.dimensions[1], slide.dimensions[0])}"
            )
        # Training material is small (masks are per-slide label images of annotated regions).
        images.append(_read_level0(slide))
        masks.append(mask.astype(np.uint32))
    result = _train(
        images,
        masks,
        out_model,
        pretrained=pretrained,
        diameter=diameter,
        epochs=int(epochs),
        learning_rate=float(learning_rate),
        batch_size=int(batch_size),
        bsize=int(bsize),
        diam_mean=float(diam_mean),
        nimg_per_epoch=None if nimg_per_epoch is None else int(nimg_per_epoch),
        max_eval_tiles=None if eval_tiles is None else int(eval_tiles),
        seed=int(seed),
    )
    log.info("segmenter trained: %s", result)
    if ap_table is not None:
        with atomic_path(ap_table) as tmp:
            ap_frame(result).to_csv(tmp, index=False)
    return result


def ap_frame(result: dict) -> pd.DataFrame:
    """AP@0.5 rows of a :func:`train_segmenter` result: the starting model (only when training
    started from a model file: ``ap50_before``) and the trained model, on the same held-out tiles."""
    rows = []
    if "ap50_before" in result:
        rows.append({"model": "starting model", "source": result.get("pretrained"),
                     "ap50": result["ap50_before"], "tp": result["ap50_before_tp"],
                     "fp": result["ap50_before_fp"], "fn": result["ap50_before_fn"],
                     "diameter": result.get("diameter_before")})
    rows.append({"model": "fine-tuned" if "ap50_before" in result else "trained",
                 "source": result.get("init"), "ap50": result["ap50"], "tp": result["ap50_tp"],
                 "fp": result["ap50_fp"], "fn": result["ap50_fn"], "diameter": result.get("diameter")})
    out = pd.DataFrame(rows)
    out["ap50"] = out["ap50"].round(4)
    out["n_tiles"] = result.get("n_test_tiles")
    return out


def segment(slide_path, tubules_path, model_path, out_labels, *, method: str, tile: int, overlap: int,
            diameter: float | None, threads: int, region_classes: Sequence[str] | None = None) -> dict:
    """Nucleus labels of one slide inside its tubules, written to the label store ``out_labels``.

    ``region_classes``: classes of the ``tubules_path`` polygons used as regions (config
    ``annotations.region_classes``; None = every class), read by :func:`cellstage.io.annotations.read_regions`.

    ``method`` "cellpose" (``model_path`` = the trained model file) or "classical" (the
    colour-deconvolution fallback; ``model_path`` unused and torch never imported).
    """
    from .tiling import segment_slide

    if method not in ("cellpose", "classical"):
        raise CellstageError(f"segmentation.method: unknown {method!r}; expected 'cellpose' or 'classical'")
    slide = ZarrSlide(slide_path)
    rois = read_regions(tubules_path, classes=region_classes)
    check_inside(rois, slide.dimensions, tubules_path)
    classical = method == "classical"
    if not classical:  # the classical fallback never loads torch (~0.8 GB of RSS for the CUDA build)
        set_torch_threads(threads)
    log.info("segmenting %s with %s", slide_path, "the classical fallback" if classical else f"Cellpose {model_path}")
    w, h = slide.dimensions
    with atomic_path(out_labels) as tmp:
        labels = create_labels(tmp, (h, w), mpp=slide.mpp, slide=Path(slide_path).name)
        stats = segment_slide(
            slide,
            rois,
            model_path,
            labels,
            tile=int(tile),
            overlap=int(overlap),
            diameter=diameter,
            classical=classical,
        )
        labels.attrs["stats"] = json.loads(json.dumps(stats, default=float))
    log.info("segmentation: %s", stats)
    return stats
