"""Stage entry points of seed 003's data reduction levels (one call per Snakemake rule).

Every argument is the validated config value; nothing here holds a default. The logic and the
output formats are in :mod:`cellstage.reduce.levels`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import pandas as pd

from ..utils import atomic_path, set_torch_threads
from . import levels

log = logging.getLogger("cellstage.reduce")


def level_one(slide_store, out_zarr, out_parquet, *, grid: Sequence[int], keep_rows: Sequence[int],
              keep_cols: Sequence[int], patch_size: int, blur_threshold: float, kmeans_k: int, criterion: str,
              min_contrast: float, min_cells: int, max_cells: int, max_cell_area: int, min_cell_area: int,
              closing_radius: int, seed: int, slide: str) -> pd.DataFrame:
    """Level One patches (``patches``/``masks`` zarr + one parquet row per examined patch) of one
    ``results/slides/{slide}.ome.zarr`` (seed 003 §2.1.1)."""
    return levels.level_one(
        slide_store, out_zarr, out_parquet, grid=tuple(int(v) for v in grid),
        keep_rows=tuple(int(v) for v in keep_rows), keep_cols=tuple(int(v) for v in keep_cols),
        patch_size=int(patch_size), blur_threshold=float(blur_threshold), kmeans_k=int(kmeans_k),
        criterion=str(criterion), min_contrast=float(min_contrast), min_cells=int(min_cells),
        max_cells=int(max_cells), max_cell_area=int(max_cell_area), min_cell_area=int(min_cell_area),
        closing_radius=int(closing_radius), seed=int(seed), slide=str(slide),
    )


def level_two(level_one_zarr, level_one_parquet, out_zarr, out_parquet, *, crop_size: int, min_separation: float,
              seed: int, slide: str) -> pd.DataFrame:
    """Level Two cell crops (``bg``/``nobg``/``masks`` zarr + one parquet row per candidate crop)
    of one slide's Level One outputs (seed 003 §2.1.2)."""
    return levels.level_two(level_one_zarr, level_one_parquet, out_zarr, out_parquet, crop_size=int(crop_size),
                            min_separation=float(min_separation), seed=int(seed), slide=str(slide))


def grade_level_two(model_dir, level_two_zarr, level_two_parquet, out_parquet, *, threshold: float,
                    threads: int | None) -> pd.DataFrame:
    """Level Three: p_unsuitable and keep per Level Two kept crop (seed 003 §2.1.3)."""
    set_torch_threads(threads)
    table = levels.grade_level_two(model_dir, level_two_zarr, level_two_parquet, out_parquet,
                                   threshold=float(threshold))
    log.info("Level Three %s: kept %d of %d crops", level_two_parquet, int(table["keep"].sum()), len(table))
    return table


def aml_reduction(level1_parquets, level2_parquets, level3_parquets, labels: Mapping, out_csv: str | os.PathLike,
                  *, tasks: Sequence[str], min_crops: int, crop_size: int, patch_size: int) -> pd.DataFrame:
    """Seed 003 Table 2 (one row per level and task, see
    :func:`cellstage.reduce.levels.aml_reduction_table`) as CSV; ``labels``: slide → {task: class}."""
    table = levels.aml_reduction_from_files(level1_parquets, level2_parquets, level3_parquets, dict(labels),
                                            list(tasks), int(min_crops), int(crop_size), int(patch_size))
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table
