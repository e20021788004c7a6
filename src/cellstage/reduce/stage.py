"""Stage entry points of data reduction (seed 003 Level Three): train the grader, grade crops.

Every argument is the validated config value; nothing here holds a default.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import CellstageError, atomic_path, set_torch_threads

log = logging.getLogger("cellstage.reduce")


def train_grader(slide_paths, grade_paths, out_dir: str | os.PathLike, *, backbone: str, epochs: int,
                 batch_size: int, loss_weights: dict, size: int, seed: int, threads: int | None,
                 devices: int) -> dict:
    """Train the grader on crops of ``size`` px cut at the graded points (``grade_paths``: CSV with
    x, y, grade per slide of ``slide_paths``; graded points outside their slide are excluded with a
    warning listing them, a file with every point outside is an error). ``devices`` > 1: DDP. The
    resume checkpoint lives next to ``out_dir`` (``<out_dir>.checkpoints/``), not in it: Snakemake
    deletes a failed job's ``directory()`` output as a whole."""
    from ..crops import crops_at_points
    from ..io.annotations import drop_outside
    from ..io.slides import ZarrSlide
    from .grader import train_grader as _train

    crops, grades = [], []
    for sp, gp in zip(slide_paths, grade_paths):
        table = pd.read_csv(gp)
        missing = {"x", "y", "grade"} - set(table.columns)
        if missing:
            raise CellstageError(f"{gp}: missing column(s) {sorted(missing)} (expected x, y, grade)")
        slide = ZarrSlide(sp)
        table = drop_outside(table, slide.dimensions, gp, slide=Path(sp).name, what="graded points")  # no white crops
        crops.append(crops_at_points(slide, table["x"].to_numpy(), table["y"].to_numpy(), int(size)))
        grades.append(table["grade"].to_numpy())
    set_torch_threads(threads)
    return _train(
        np.concatenate(crops),
        np.concatenate(grades),
        out_dir,
        backbone=backbone,
        epochs=int(epochs),
        batch_size=int(batch_size),
        loss_weights=dict(loss_weights),
        seed=int(seed),
        devices=int(devices),
        checkpoint_dir=Path(out_dir).with_name(Path(out_dir).name + ".checkpoints"),
    )


def grade(model_dir, crops_zarr, crops_index, out_path, *, threshold: float, threads: int | None) -> pd.DataFrame:
    """p_unsuitable and keep (p < ``threshold``) per crop of one crop source, with its section."""
    from .grader import grade_crops

    set_torch_threads(threads)
    table = grade_crops(model_dir, [(crops_zarr, crops_index)], threshold=float(threshold))
    sections = pd.read_parquet(crops_index, columns=["slide", "section"]).drop_duplicates()
    table = table.merge(sections, on="slide", how="left")
    with atomic_path(out_path) as tmp:
        table.to_parquet(tmp, index=False)
    log.info("%s: kept %d of %d crops", crops_index, int(table["keep"].sum()), len(table))
    return table
