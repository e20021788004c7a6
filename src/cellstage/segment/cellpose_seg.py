"""Cellpose inference wrapper (model file → callable rgb → labels)."""

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

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        m = self.model.eval(rgb, channels=self.channels, diameter=self.diameter,
                            batch_size=self.batch_size)[0]
        return np.asarray(m).astype(np.uint32)
