"""Backbones by name from timm, and safetensors save/load of their weights."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def create_backbone(name: str, *, img_size: int | None = None, **kwargs) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): forward() returns pooled features.

    ViTs get ``img_size`` (and a patch size of img_size/10, so 40 px -> 4, 80 px -> 8 as in
    seed 000) unless given explicitly.
    """
    import timm

    if name.startswith(("vit", "deit")) and img_size is not None:
        kwargs.setdefault("img_size", img_size)
        kwargs.setdefault("patch_size", max(1, img_size // 10))
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    from ..utils import atomic_path

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path}: weights do not fit the backbone (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model
