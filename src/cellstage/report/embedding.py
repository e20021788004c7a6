"""Test-set embeddings for the UMAP figure (seed 000 Fig. 5 shape).

Seed 000 §4.3 "Visualisation": "We visualised the ViT-B embedding ... on the 40× EFI images (with
background) in Figure 5 using UMAP [28] ... all approaches have difficulties to cluster the same
cell type with vastly different staining intensities". Fig. 5 colours the test-set UMAP by class
(a, c, e) and by staining intensity (b, d, f). Here the embedding is the fine-tuned backbone's
(``embeddings.parquet`` written beside each fold's predictions by
:func:`cellstage.train.cv.run_fold`); the staining intensity of a crop is the mean optical
density (Beer-Lambert, OD = -log10((I + 1) / 256), averaged over R, G, B) over its nucleus mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..crops.store import CropStoreReader

__all__ = ["mean_optical_density", "read_embeddings", "stain_intensity", "umap_2d"]


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(cells, embeddings): the table without its ``embedding`` column and an (N, D) float32 array."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "embedding" not in table.column_names:
        raise ValueError(f"{path}: no 'embedding' column (not a fine-tuning embeddings.parquet?)")
    col = table.column("embedding").combine_chunks()
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    emb = flat.reshape(n, -1) if n else np.zeros((0, col.type.list_size), np.float32)
    return table.drop_columns(["embedding"]).to_pandas(), emb


def mean_optical_density(images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """Per crop: mean optical density of (N, H, W, 3) uint8 ``images`` over the pixels of ``masks``
    (N, H, W) bool (whole crop where a mask is empty or not given)."""
    od = -np.log10((images.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)  # (N, H, W)
    if masks is None:
        return od.reshape(len(od), -1).mean(axis=1)
    m = masks.reshape(len(masks), -1).astype(bool)
    flat = od.reshape(len(od), -1)
    n_in = m.sum(axis=1)
    inside = (flat * m).sum(axis=1) / np.maximum(n_in, 1)
    return np.where(n_in > 0, inside, flat.mean(axis=1))


def stain_intensity(cells: pd.DataFrame, crop_stores: Mapping[str, str | Path]) -> np.ndarray:
    """Mean nucleus optical density of every (``slide``, ``row``) crop, read from the slides' crop
    stores (``crop_stores``: slide -> results/crops/{slide}.zarr)."""
    out = np.full(len(cells), np.nan, dtype=np.float64)
    for slide, g in cells.groupby("slide", sort=False):
        if slide not in crop_stores:
            raise ValueError(f"no crop store for slide {slide!r} (expected results/crops/{slide}.zarr in the inputs)")
        rows = g["row"].to_numpy(dtype=np.int64)
        images = CropStoreReader(crop_stores[slide], "images").take(rows)
        masks = CropStoreReader(crop_stores[slide], "masks").take(rows)
        out[g.index.to_numpy()] = mean_optical_density(np.asarray(images), np.asarray(masks))
    return out


def umap_2d(embeddings: np.ndarray, *, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """2-D UMAP (umap-learn, McInnes et al. 2018 defaults) of ``embeddings``; ``seed`` fixes it."""
    n = len(embeddings)
    if n < 3:
        return np.zeros((n, 2), np.float32)
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": deterministic on purpose
        reducer = umap.UMAP(n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist, random_state=seed,
                            init="spectral" if n > n_neighbors + 1 else "random")
        return reducer.fit_transform(np.asarray(embeddings, np.float32)).astype(np.float32)


def panel_data(embedding_path: str | Path, crop_stores: Mapping[str, str | Path], classes: Sequence[str],
               seed: int = 0) -> dict:
    """UMAP coordinates, class names and stain intensity of one fold's test embeddings."""
    cells, emb = read_embeddings(embedding_path)
    cells = cells.reset_index(drop=True)
    return {
        "xy": umap_2d(emb, seed=seed),
        "label": [classes[i] if 0 <= i < len(classes) else "?" for i in cells["label_idx"].astype(int)],
        "intensity": stain_intensity(cells, crop_stores),
        "n": len(cells),
    }
