"""Crop datasets and the cross-validation data module of the trainers.

A *crop source* is a pair (``results/crops/{slide}.zarr``, its index ``.parquet``). Items are
read lazily, one crop at a time (:class:`cellstage.crops.store.CropStoreReader`), so memory does
not grow with the data set (:class:`ZarrCropDataset`), or once into memory
(:class:`CachedCropDataset`). :class:`ArrayCropDataset` serves crops already in memory (the
grader's crops cut at graded points). Every dataset yields ``(image, distance, label)``.

:class:`CropDataModule`: labelled rows (``label_idx >= 0``) of the *train* sources are split into
``n_folds`` folds (:func:`cellstage.training.folds.make_folds`); fold ``fold`` is validation, the
others are training. *Test* sources are separate slides, evaluated only (their labelled rows).
Normalisation uses the channel mean/std of this fold's training crops (seed 000 §4.2).
Crops are read once into memory by default (``cache=True``: 1,000 crops of 80×80×3 are 19 MB;
the 5,200 of seed 000 are 100 MB), which removes a Zarr chunk decode per item and epoch.

Stain (config ``finetune.augment``, off by default; :mod:`cellstage.training.stain`):
``macenko=True`` fits one Macenko stain matrix per slide of the train and test sources (from at
most 256 evenly spaced crops of that slide, deterministic, so pretraining computes the same) and
maps every crop to the reference before anything else (statistics, transforms); the cache then
holds normalised crops (same memory). ``hed_jitter`` ({p, sigma, bias}) adds a random HED-space
stain jitter in front of the training transform.

Training order: :class:`cellstage.training.resume.EpochSampler` (a permutation per epoch that
depends only on ``seed`` and the epoch), and every loader has its own ``torch.Generator``, so
that a run resumed from a checkpoint sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils import CellstageError
from .folds import make_folds
from .resume import EpochSampler, loader_generator
from .stain import HEDJitter, SlideStainNormaliser, stain_options
from .transforms import channel_stats, eval_transform, train_transform

VARIANTS = ("images", "masked")
REQUIRED_COLUMNS = ("row", "cell_id", "slide", "label_idx")
UNKNOWN_DISTANCE = -0.5  # seed 000's "unknown" distance (missing distances, distance dropout)


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
        stain: Callable | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant: {variant!r} is not one of {VARIANTS}")
        self.index = index.reset_index(drop=True)
        self.variant = variant
        self.transform = transform
        # stain(images, slide) -> images: per-slide stain normalisation (cellstage.training.stain)
        self.stain = stain
        self._slides = self.index["slide"].astype(str).to_numpy() if stain is not None else None
        self._arrays: dict[str, object] = {}
        self._rows = self.index["row"].to_numpy()
        self._paths = self.index["zarr_path"].to_numpy()
        self._labels = (
            self.index["label_idx"].to_numpy() if "label_idx" in self.index else np.full(len(self.index), -1)
        )
        dist = self.index["distance_norm"].to_numpy(dtype=float) if "distance_norm" in self.index else None
        self._dist = np.nan_to_num(dist, nan=UNKNOWN_DISTANCE) if dist is not None else np.zeros(len(self.index))

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
        img = self._array(self._paths[i])[int(self._rows[i])]
        return self.stain(img, self._slides[i]) if self.stain is not None else img

    def __getitem__(self, i: int):
        img = self.image(i)
        if self.transform is not None:
            from PIL import Image

            x = self.transform(Image.fromarray(img))
        else:
            x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        return x, torch.tensor(self._dist[i], dtype=torch.float32), int(self._labels[i])

    def images(self) -> ImageSequence:
        """The raw uint8 crops as a sequence (no transform), e.g. for :class:`ArrayCropDataset`."""
        return ImageSequence(self)

    def __getstate__(self):  # zarr handles are reopened in worker processes
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


class ImageSequence:
    """``seq[i]`` = ``dataset.image(i)``: a dataset's raw crops, read on access."""

    def __init__(self, dataset: ZarrCropDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.dataset.image(int(i))


class ArrayCropDataset(Dataset):
    """(image, distance, label) over crops already in memory.

    ``images``: (N, H, W, 3) uint8 array or any sequence of such crops; ``labels``: (N,) ints
    (None: -1); ``distances``: (N,) floats (None: all unknown, -0.5). ``transform`` receives the
    uint8 (H, W, 3) array (e.g. :func:`cellstage.training.transforms.grader_transform`); without
    one the crop is converted to float in [0, 1].
    """

    def __init__(self, images, labels=None, *, distances=None, transform: Callable | None = None) -> None:
        self.images = images
        n = len(images)
        self.labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels)
        self.distances = (np.full(n, UNKNOWN_DISTANCE) if distances is None
                          else np.nan_to_num(np.asarray(distances, dtype=float), nan=UNKNOWN_DISTANCE))
        if len(self.labels) != n or len(self.distances) != n:
            raise ValueError(f"{n} images but {len(self.labels)} labels / {len(self.distances)} distances")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.transform is not None:
            x = self.transform(img)
        else:
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        return x, torch.tensor(self.distances[i], dtype=torch.float32), int(self.labels[i])


class CachedCropDataset(ZarrCropDataset):
    """:class:`ZarrCropDataset` whose images are read from Zarr once, at construction."""

    def __init__(self, index: pd.DataFrame, variant: str = "images", transform=None, stain=None) -> None:
        super().__init__(index, variant, transform, stain)
        n = len(self.index)
        self._cache: np.ndarray | None = None
        if n == 0:
            return
        cache = None
        for path in pd.unique(self._paths):
            sel = np.flatnonzero(self._paths == path)
            rows = self._rows[sel].astype(np.int64)
            arr = self._array(path)
            if rows.min() < 0 or rows.max() >= arr.shape[0]:
                raise CellstageError(
                    f"{path}/{variant}: index rows outside 0..{arr.shape[0] - 1} "
                    "(crop index does not match its zarr)"
                )
            uniq, inv = np.unique(rows, return_inverse=True)
            if len(uniq) > arr.shape[0] // 2:
                block = np.asarray(arr[:])[uniq]
            else:
                block = np.asarray(arr.oindex[uniq])
            if cache is None:
                cache = np.empty((n, *block.shape[1:]), dtype=block.dtype)
            cache[sel] = block[inv]
        if self.stain is not None:  # normalised once, in place, 256 crops of one slide at a time
            for slide in pd.unique(self._slides):  # (float temporaries ~40 MB for 80x80 crops)
                sel = np.flatnonzero(self._slides == slide)
                for part in np.array_split(sel, -(-len(sel) // 256)):
                    cache[part] = self.stain(cache[part], slide)
        self._cache = cache
        self._arrays = {}  # handles no longer needed

    def image(self, i: int) -> np.ndarray:
        return self._cache[i]

    def all_images(self) -> np.ndarray:
        return self._cache if self._cache is not None else np.zeros((0, 1, 1, 3), np.uint8)

    def __getstate__(self):
        return self.__dict__.copy()


class CropDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_sources: Sequence[tuple[str, str]],
        test_sources: Sequence[tuple[str, str]] = (),
        *,
        fold: int = 0,
        n_folds: int = 5,
        seed: int = 0,
        group_col: str | None = None,
        fold_reference: Sequence[str] = (),
        variant: str = "images",
        batch_size: int = 128,
        num_workers: int = 0,
        cache: bool = True,
        augment: bool = True,
        hed_jitter: Mapping | None = None,
        macenko: bool = False,
        macenko_reference: str | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise CellstageError(f"variant: {variant!r} is not one of {VARIANTS}")
        if not 0 <= fold < n_folds:
            raise CellstageError(f"fold: {fold} is outside 0..{n_folds - 1}")
        if batch_size < 1:
            raise CellstageError(f"batch_size must be >= 1, got {batch_size}")
        self.train_sources = [(str(z), str(p)) for z, p in train_sources]
        self.test_sources = [(str(z), str(p)) for z, p in test_sources]
        self.fold, self.n_folds, self.seed = int(fold), int(n_folds), int(seed)
        self.group_col = group_col
        # crop indexes (parquet) of the reference scan whose cells the folds are made over
        # (cellstage.training.folds.make_folds); empty: the train sources' own index
        self.fold_reference = [str(p) for p in fold_reference]
        self.variant = variant
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.cache = cache
        self.augment = augment
        self.hed_jitter = HEDJitter.from_config(hed_jitter)  # None when off (p 0)
        self.macenko = bool(macenko)
        self.macenko_reference = macenko_reference
        self.stain: SlideStainNormaliser | None = None
        self._ready = False

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _labelled(sources, what: str) -> pd.DataFrame:
        if not sources:
            return pd.DataFrame(columns=[*REQUIRED_COLUMNS, "zarr_path", "source"])
        df = load_index(sources)
        missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
        if missing:
            raise CellstageError(f"{what} crop index lacks columns {missing} (see docs/contracts.md)")
        return df[df["label_idx"] >= 0].reset_index(drop=True)

    def _dataset(self, index: pd.DataFrame, transform):
        cls = CachedCropDataset if self.cache else ZarrCropDataset
        return cls(index, self.variant, transform, self.stain)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        labelled = self._labelled(self.train_sources, "train")
        if labelled.empty:
            raise CellstageError(f"no labelled crops (label_idx >= 0) in train sources {self.train_sources}")
        reference = None
        if self.fold_reference:
            reference = pd.concat([pd.read_parquet(p) for p in self.fold_reference], ignore_index=True)
        folds = make_folds(labelled, self.n_folds, seed=self.seed, group_col=self.group_col, reference=reference)
        labelled["fold"] = folds
        self.train_index = labelled[folds != self.fold].reset_index(drop=True)
        self.val_index = labelled[folds == self.fold].reset_index(drop=True)
        if self.val_index.empty or self.train_index.empty:
            raise CellstageError(f"fold {self.fold}: empty train or validation split")
        self.test_index = self._labelled(self.test_sources, "test")
        if self.macenko:  # one fit per slide of the train and test sources
            _, self.stain = stain_options({"macenko": True, "macenko_reference": self.macenko_reference},
                                          self.train_sources + self.test_sources)

        plain = self._dataset(self.train_index, None)
        if self.cache:
            imgs = plain.all_images()
        else:  # statistics from at most 2,000 crops
            rng = np.random.default_rng(self.seed)
            pick = rng.permutation(len(plain))[:2000]
            imgs = np.stack([plain.image(int(i)) for i in pick])
        self.mean, self.std = channel_stats(imgs)
        self.image_size = tuple(int(s) for s in imgs.shape[1:3])

        ttf = (train_transform(self.mean, self.std, hed_jitter=self.hed_jitter) if self.augment
               else eval_transform(self.mean, self.std))
        etf = eval_transform(self.mean, self.std)
        self.train_ds = plain
        self.train_ds.transform = ttf
        self.val_ds = self._dataset(self.val_index, etf)
        self.test_ds = self._dataset(self.test_index, etf) if len(self.test_index) else None
        self._ready = True

    # ------------------------------------------------------------- loaders
    def _loader(self, ds, *, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(ds), self.seed, shuffle=shuffle),
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=loader_generator(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        # a last batch of one sample breaks BatchNorm in training mode
        return self._loader(self.train_ds, shuffle=True, drop_last=len(self.train_ds) % self.batch_size == 1)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_ds, shuffle=False)

    def test_dataloader(self) -> DataLoader | None:
        return self._loader(self.test_ds, shuffle=False) if self.test_ds is not None else None

    def eval_dataloader(self, split: str) -> DataLoader | None:
        """Un-augmented, ordered loader for ``split`` in {"train", "val", "test"}."""
        if split == "train":
            ds = self._dataset(self.train_index, eval_transform(self.mean, self.std))
            return self._loader(ds, shuffle=False)
        if split == "val":
            return self.val_dataloader()
        if split == "test":
            return self.test_dataloader()
        raise ValueError(f"split: {split!r}")

    def split_index(self, split: str) -> pd.DataFrame:
        return {"train": self.train_index, "val": self.val_index, "test": self.test_index}[split]
