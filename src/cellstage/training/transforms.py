"""Image transforms of the trainers, and the crops' channel statistics (one copy).

Fine-tuning (seed 000 §4.2):

Training: random horizontal and vertical flip, random rotation up to ±180° and random
translation up to 1 % along both axes (one ``RandomAffine``, bilinear, zero fill), then
conversion to a float tensor in [0, 1] and normalisation with the channel mean/std of the
fold's training crops (:func:`channel_stats`). Evaluation: conversion + normalisation only.
Inputs are PIL images or (H, W, 3) uint8 arrays / tensors, as ``ZarrCropDataset`` passes them.
Optional stain augmentation (config ``finetune.augment.hed_jitter``, off by default):
``train_transform(hed_jitter=...)`` puts a :class:`cellstage.training.stain.HEDJitter` first.

Grader (seed 003 Level Three): :func:`grader_transform` — (H, W, 3) uint8 -> float in [0, 1],
random horizontal flip, vertical flip (p 0.5 each) and rotation by a random multiple of 90°
(``augment``), then normalisation with the training crops' :func:`channel_stats`. Its random
numbers come from the global torch RNG in that order (flip, flip, rotation), per item.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from .stain import HEDJitter

# fallback when no statistics are given: ImageNet's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_float() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def train_transform(
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    degrees: float = 180.0,
    translate: float = 0.01,
    hed_jitter: HEDJitter | None = None,
) -> v2.Compose:
    """``hed_jitter``: stain jitter applied first, on the uint8 crop (None: none, the default)."""
    stain = [hed_jitter] if hed_jitter is not None else []
    return v2.Compose(
        [
            *stain,
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomAffine(
                degrees=degrees,
                translate=(translate, translate),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=0,
            ),
            *_to_float(),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def eval_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    return v2.Compose([*_to_float(), v2.Normalize(list(mean), list(std))])


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 crops shaped (N, H, W, 3)."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
        raise ValueError(f"expected (N, H, W, 3) crops, got shape {x.shape}")
    x = x.reshape(-1, 3).astype(np.float64) / 255.0
    mean = x.mean(axis=0)
    std = np.maximum(x.std(axis=0), 1e-3)  # all-constant channel: avoid division by ~0
    return [float(v) for v in mean], [float(v) for v in std]


def to_float_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def random_flip_rot90(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip, vertical flip (p 0.5 each), rotation by k·90° (k uniform in 0..3)."""
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    if torch.rand(()) < 0.5:
        x = x.flip(-2)
    return torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))


class GraderTransform:
    """uint8 (H, W, 3) array -> normalised float (3, H, W); flips + 90° rotations if ``augment``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: bool) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = bool(augment)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = to_float_tensor(image)
        if self.augment:
            x = random_flip_rot90(x)
        return (x - self.mean) / self.std


def grader_transform(mean: Sequence[float], std: Sequence[float], *, augment: bool) -> GraderTransform:
    return GraderTransform(mean, std, augment)
