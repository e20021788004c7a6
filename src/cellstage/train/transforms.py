"""Image transforms for fine-tuning (seed 000 §4.2).

Training: random horizontal and vertical flip, random rotation up to ±180° and random
translation up to 1 % along both axes (one ``RandomAffine``, bilinear, zero fill), then
conversion to a float tensor in [0, 1] and normalisation with the channel mean/std of the
fold's training crops (:func:`channel_stats`). Evaluation: conversion + normalisation only.
Inputs are PIL images or (H, W, 3) uint8 arrays / tensors, as ``ZarrCropDataset`` passes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

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
) -> v2.Compose:
    return v2.Compose(
        [
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
