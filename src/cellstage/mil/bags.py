"""Per-slide instances and the bags ("multi instance learning input stacks") of seed 003 §3.

Seed 003 §3: "For all multi-input trainings the number of input images has been set to 32. In
addition, the training data of a WSI is shuffled every epoch, meaning that the multi instance
learning input stacks are random combinations of cell selections to avoid identical stacks
during training." And §3.1: "WSIs for which less than 100 cell crops were found are not
considered for the training."

The instances of a slide are rows of one array of a zarr store (:class:`SlideInstances`): Level
One ``patches`` (N, P, P, 3) — with ``mask="masks"`` for the variant without background, where a
pixel outside the mask is set to the constant 0 (black: ``patches * masks``) — Level Two/Three
``bg`` or ``nobg`` (N, 80, 80, 3).

The bag plan (:class:`BagPlan`):

* training, epoch ``e``: each slide's instance positions are permuted by a generator seeded from
  ``(seed, e, slide position)`` (:func:`cellstage.training.resume.derive_seed`) and cut into
  ``ceil(n / bag_size)`` consecutive bags; the last bag is filled up from the start of the same
  permutation, so every bag holds exactly ``bag_size`` instances and every instance is in at least
  one bag of the epoch (a slide with fewer than ``bag_size`` instances repeats them cyclically).
  ``max_bags_per_slide`` keeps only the first that many bags of each slide (a random subset,
  the permutation being random; a CPU demo needs it). The bags of all slides are then shuffled
  together. The plan is a pure function of ``(seed, epoch)``: a resumed run sees the same bags.
* validation: the same cut of one fixed permutation (epoch key ``-1``), every epoch the same, in
  slide order; the slide's prediction is the mean of its bags' class probabilities
  (:mod:`cellstage.mil.train`). ``max_bags_per_slide`` caps validation bags too.
* single-instance mode (Level One, seed 003 trains a plain ResNet18 on the patches) is
  ``bag_size=1``: every patch is its own bag and the slide prediction is the mean over patches.

Slides with fewer than ``min_instances`` instances are skipped (:func:`split_by_min_instances`
returns them with their counts, the stage writes them out).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..utils import CellstageError

_BAG_STREAM = 0xB4  # seed streams: per-slide permutation, global bag order
_ORDER_STREAM = 0xB5
VAL_EPOCH = -1
BACKGROUND_VALUE = 0  # Level One without background: pixels outside the mask (patches * masks)


@dataclass(frozen=True)
class SlideInstances:
    """One slide's instances: rows ``indices`` of array ``array`` of the zarr store ``zarr_path``.

    ``mask``: name of a boolean (N, P, P) array of the same store (Level One ``masks``); when set,
    pixels outside the mask are set to :data:`BACKGROUND_VALUE` (the "without background" patches).
    """

    slide: str
    zarr_path: str
    array: str
    indices: np.ndarray = field(repr=False)
    mask: str | None = None

    @property
    def n(self) -> int:
        return int(len(self.indices))

    @classmethod
    def from_dict(cls, d: dict) -> SlideInstances:
        missing = {"slide", "zarr", "array", "indices"} - set(d)
        if missing:
            raise CellstageError(f"MIL instances: entry {d.get('slide', d)!r} lacks key(s) {sorted(missing)} "
                                 "(expected slide, zarr, array, indices[, mask])")
        return cls(str(d["slide"]), str(d["zarr"]), str(d["array"]), np.asarray(d["indices"], dtype=np.int64),
                   d.get("mask"))


def split_by_min_instances(slides: Sequence[SlideInstances], min_instances: int):
    """(kept slides, skipped ``[{"slide", "n_instances"}]``): seed 003 §3.1 skips WSIs with fewer
    than 100 crops (``min_instances``)."""
    kept, skipped = [], []
    for s in slides:
        (kept if s.n >= int(min_instances) else skipped).append(s)
    return kept, [{"slide": s.slide, "n_instances": s.n} for s in skipped]


def _generator(*keys: int) -> torch.Generator:
    from ..training.resume import derive_seed

    g = torch.Generator()
    g.manual_seed(derive_seed(*keys))
    return g


def cut_bags(n: int, bag_size: int, perm: np.ndarray, max_bags: int | None) -> list[np.ndarray]:
    """Consecutive bags of ``bag_size`` positions of ``perm``, the last filled up cyclically."""
    n_bags = math.ceil(n / bag_size)
    if max_bags is not None:
        n_bags = min(n_bags, int(max_bags))
    idx = np.arange(n_bags * bag_size) % n
    return [perm[idx[b * bag_size:(b + 1) * bag_size]] for b in range(n_bags)]


class BagPlan:
    """The bags of one epoch: list of ``(slide position, instance positions)``."""

    def __init__(self, counts: Sequence[int], bag_size: int, max_bags_per_slide: int | None, seed: int) -> None:
        if bag_size < 1:
            raise CellstageError(f"bag_size must be >= 1, got {bag_size}")
        if max_bags_per_slide is not None and max_bags_per_slide < 1:
            raise CellstageError(f"max_bags_per_slide must be >= 1 or null, got {max_bags_per_slide}")
        if any(int(c) < 1 for c in counts):
            raise CellstageError("BagPlan: every slide needs at least one instance")
        self.counts = [int(c) for c in counts]
        self.bag_size, self.max_bags, self.seed = int(bag_size), max_bags_per_slide, int(seed)

    def bags(self, epoch: int, *, shuffle: bool = True) -> list[tuple[int, np.ndarray]]:
        out = []
        for s, n in enumerate(self.counts):
            perm = torch.randperm(n, generator=_generator(self.seed, epoch, s, _BAG_STREAM)).numpy()
            out += [(s, b) for b in cut_bags(n, self.bag_size, perm, self.max_bags)]
        if shuffle:
            order = torch.randperm(len(out), generator=_generator(self.seed, epoch, _ORDER_STREAM)).tolist()
            out = [out[i] for i in order]
        return out

    def __len__(self) -> int:
        return sum(min(math.ceil(n / self.bag_size), self.max_bags or math.inf) for n in self.counts)


class BagSampler(Sampler):
    """Yields the keys ``(slide position, instance positions)`` of an epoch's bags.

    Training: reshuffled per epoch (Lightning calls ``set_epoch``; the plan is built when
    iteration starts, as :class:`cellstage.training.resume.EpochSampler` does). Validation
    (``train=False``): the fixed bags of :data:`VAL_EPOCH`, in slide order.
    """

    def __init__(self, plan: BagPlan, train: bool) -> None:
        self.plan, self.train, self.epoch = plan, bool(train), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        bags = self.plan.bags(self.epoch, shuffle=True) if self.train else self.plan.bags(VAL_EPOCH, shuffle=False)
        for s, b in bags:
            yield s, tuple(int(i) for i in b)

    def __len__(self) -> int:
        return len(self.plan)


class BagDataset(Dataset):
    """``dataset[(slide position, instance positions)]`` -> ``(bag, slide position, label)``.

    ``bag``: float32 (K, 3, H, W), pixel values / 255 normalised with mean 0.5 and std 0.5 per
    channel (seed 003 names no normalisation; no augmentation either: the reshuffled stacks are its
    only regularisation). Zarr stores are opened on first use (worker-safe).
    """

    def __init__(self, slides: Sequence[SlideInstances], labels: Sequence[int]) -> None:
        if len(slides) != len(labels):
            raise CellstageError(f"BagDataset: {len(slides)} slides but {len(labels)} labels")
        self.slides, self.labels = list(slides), [int(v) for v in labels]
        self._arrays: dict[int, tuple] = {}

    def _open(self, s: int):
        if s not in self._arrays:
            import zarr

            si = self.slides[s]
            try:
                root = zarr.open_group(si.zarr_path, mode="r")
                arr = root[si.array]
                mask = root[si.mask] if si.mask else None
            except (FileNotFoundError, KeyError) as e:
                raise CellstageError(f"{si.zarr_path}: cannot read array {si.array!r}"
                                     f"{' / ' + si.mask if si.mask else ''} of slide {si.slide} ({e})") from None
            if si.n and int(si.indices.max()) >= arr.shape[0]:
                raise CellstageError(f"{si.zarr_path}/{si.array}: index {int(si.indices.max())} out of range "
                                     f"({arr.shape[0]} rows) for slide {si.slide}")
            self._arrays[s] = (arr, mask)
        return self._arrays[s]

    def read(self, s: int, positions: Sequence[int]) -> np.ndarray:
        """uint8 (K, H, W, 3) instances at ``positions`` (into the slide's ``indices``)."""
        arr, mask = self._open(s)
        rows = self.slides[s].indices[np.asarray(positions, dtype=np.int64)]
        uniq, inv = np.unique(rows, return_inverse=True)  # zarr wants sorted, unique rows
        x = np.asarray(arr.oindex[uniq.tolist()])
        if mask is not None:
            m = np.asarray(mask.oindex[uniq.tolist()]).astype(bool)
            x = np.where(m[..., None], x, np.uint8(BACKGROUND_VALUE))
        return x[inv]

    def __len__(self) -> int:  # keys come from the sampler; this is the number of slides
        return len(self.slides)

    def __getitem__(self, key):
        s, positions = key
        x = torch.from_numpy(np.ascontiguousarray(self.read(s, positions))).permute(0, 3, 1, 2).float()
        x = (x / 255.0 - 0.5) / 0.5
        return x, s, self.labels[s]
