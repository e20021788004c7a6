"""Crops in Zarr as torch datasets.

A *crop source* is a pair (``results/crops/{slide}.zarr``, its index ``.parquet``). Items are
read lazily, one crop at a time (:class:`cellstage.crops.store.CropStoreReader`), so memory does
not grow with the data set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

VARIANTS = ("images", "masked")


def load_index(sources: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Concatenate crop indices; adds ``source`` (position in ``sources``)."""
    frames = []
    for i, (zarr_path, index_path) in enumerate(sources):
        df = pd.read_parquet(index_path)
        df["source"] = i
        df["zarr_path"] = str(zarr_path)
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


class ZarrCropDataset(Dataset):
    """(image, distance, label) per row of ``index`` (a frame from :func:`load_index`).

    image: float tensor (3, H, W) in [0, 1] after ``transform`` (which receives a PIL image
    when given, else the uint8 array is converted directly). distance: ``distance_norm`` as float
    (NaN -> -0.5, the "unknown" value of seed 000's distance augmentation). label: ``label_idx``.
    """

    def __init__(
        self,
        index: pd.DataFrame,
        variant: str = "images",
        transform: Callable | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant: {variant!r} is not one of {VARIANTS}")
        self.index = index.reset_index(drop=True)
        self.variant = variant
        self.transform = transform
        self._arrays: dict[str, object] = {}
        self._rows = self.index["row"].to_numpy()
        self._paths = self.index["zarr_path"].to_numpy()
        self._labels = (
            self.index["label_idx"].to_numpy() if "label_idx" in self.index else np.full(len(self.index), -1)
        )
        dist = self.index["distance_norm"].to_numpy(dtype=float) if "distance_norm" in self.index else None
        self._dist = np.nan_to_num(dist, nan=-0.5) if dist is not None else np.zeros(len(self.index))

    def _array(self, path: str):
        arr = self._arrays.get(path)
        if arr is None:
            from ..crops.store import CropStoreReader

            arr = CropStoreReader(path, self.variant)  # one pread + decode per crop
            self._arrays[path] = arr
        return arr

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> np.ndarray:
        return self._array(self._paths[i])[int(self._rows[i])]

    def __getitem__(self, i: int):
        img = self.image(i)
        if self.transform is not None:
            from PIL import Image

            x = self.transform(Image.fromarray(img))
        else:
            x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        return x, torch.tensor(self._dist[i], dtype=torch.float32), int(self._labels[i])

    def __getstate__(self):  # zarr handles are reopened in worker processes
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


