"""Cellpose inference wrapper (model file → callable rgb → labels).

Normalisation: Cellpose scales every image it is given to its own 1st-99th intensity
percentiles, so a tile full of nuclei and a tile half in the lumen would be scaled differently
and the whole-slide result would depend on the tiling. :meth:`CellposeSegmenter.fit_normalization`
computes those percentiles once per slide, pooled over tile windows spread over the slide
(Cellpose's own channel conversion first), and every tile is then normalised with them
(``normalize={"lowhigh": ...}``) — as the classical fallback uses one threshold per slide.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..utils import CellstageError

log = logging.getLogger("cellstage.segment")


class CellposeSegmenter:
    """Callable rgb -> labels around a Cellpose model file (fails loudly if missing)."""

    def __init__(self, model_path, *, diameter=None, batch_size=8, channels=None, gpu=None):
        import json

        import torch
        from cellpose import models

        p = Path(str(model_path))
        if not p.is_file():
            raise CellstageError(f"Cellpose model file not found: {str(p)!r}")
        meta = {}
        side = Path(str(p) + ".json")
        if side.is_file():
            meta = json.loads(side.read_text())
        self.channels = list(channels if channels is not None else meta.get("channels", [0, 0]))
        self.diameter = diameter if diameter is not None else meta.get("diameter")
        self.batch_size = batch_size
        if gpu is None:
            gpu = torch.cuda.is_available()
        self.model = models.CellposeModel(gpu=gpu, pretrained_model=str(p))
        self.name = f"cellpose:{p.name}"
        self.lowhigh: np.ndarray | None = None  # (nchan, 2) slide-level bounds, see fit_normalization

    def fit_normalization(self, slide, cells, tile: int, *, max_windows: int = 16,
                          percentile=(1.0, 99.0)) -> np.ndarray:
        """Slide-level normalisation bounds: Cellpose's percentiles over up to ``max_windows``
        tile windows ``(x0, y0, tile, tile)`` evenly spread over ``cells``; kept for every later call."""
        from cellpose import transforms

        W, H = (int(v) for v in slide.dimensions)
        pick = np.unique(np.linspace(0, len(cells) - 1, min(max_windows, len(cells))).round().astype(int))
        pool = []
        for k in pick:
            x0, y0 = cells[k]
            rgb = np.asarray(slide.read_region(x0, y0, min(tile, W - x0), min(tile, H - y0), level=0))[..., :3]
            x = transforms.convert_image(rgb, self.channels, nchan=self.model.nchan).astype(np.float32)
            pool.append(x.reshape(-1, x.shape[-1]))
        pool = np.concatenate(pool)
        lo, hi = np.percentile(pool, percentile[0], axis=0), np.percentile(pool, percentile[1], axis=0)
        flat = hi - lo <= 0  # an empty channel (e.g. the second one of a grey image) stays 0
        lo[flat], hi[flat] = 0.0, 1.0
        self.lowhigh = np.stack([lo, hi], axis=1)
        return self.lowhigh

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        kw = {} if self.lowhigh is None else {"normalize": {"lowhigh": self.lowhigh}}
        m = self.model.eval(rgb, channels=self.channels, diameter=self.diameter,
                            batch_size=self.batch_size, **kw)[0]
        return np.asarray(m).astype(np.uint32)
