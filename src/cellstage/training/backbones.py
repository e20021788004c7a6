"""Backbones by name from timm, and save/load of their weights (safetensors; tensors-only .pth read)."""

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

    from ..utils import atomic_path, canonical_safetensors

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        canonical_safetensors(tmp)  # the same bytes for the same weights (metadata order)


def _read_state_dict(path: Path) -> dict:
    """A state dict from ``.safetensors`` or, refusing anything but tensors, a ``.pth``/``.pt``/``.bin``."""
    if path.suffix in (".pth", ".pt", ".bin"):
        import torch

        state = torch.load(str(path), map_location="cpu", weights_only=True)  # no arbitrary pickles
        for key in ("state_dict", "model"):  # common checkpoint wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        return state
    from safetensors.torch import load_file

    return load_file(str(path))


def _classifier_keys(model: nn.Module, keys) -> set[str]:
    """Keys of a full timm model's classifier (``fc.*``, ``head.*``) that a backbone (num_classes=0) lacks."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    own = set(model.state_dict())
    return {k for k in keys if k not in own and any(k == n or k.startswith(n + ".") for n in names)}


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load ``path`` (safetensors, or a tensors-only .pth) into ``model``.

    The weights may be a backbone's (:func:`save_weights`) or a whole timm model's, e.g. its
    ImageNet weights: the classifier of the latter (timm's ``pretrained_cfg["classifier"]``) is
    dropped. ``strict``: every other key must match in name and shape (``ValueError`` otherwise).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = _read_state_dict(path)
    drop = _classifier_keys(model, state)
    state = {k: v for k, v in state.items() if k not in drop}
    own = model.state_dict()
    wrong_shape = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
                   if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong_shape:
        raise ValueError(f"{path}: weights do not fit the backbone (shapes differ: {wrong_shape[:3]})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path}: weights do not fit the backbone (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model
