"""Settings of one pretraining run: ``pretrain.*`` < ``pretrain.methods.<method>`` <
``pretrain.methods.<method>.backbones.<backbone>`` (the later wins), checked against the method.

Seed 000 §4.3 trains every (method, backbone) pair with its own batch size ("with similar memory
requirements", Tables A.2 SimCLR, A.3 DINO, A.4 MAE) for 200 epochs, learning rate 1e-3 (SimCLR,
DINO) or 1.5e-4 (MAE). The appendix tables are not in the text this project has, so no
per-backbone batch size is preset (``pretrain.batch_size`` applies unless a method or backbone
block sets one; docs/defaults.md).

Keys of a method or backbone block:

- ``epochs``, ``batch_size``, ``lr``: the run's epochs, crops per step and initial learning rate;
  a null value (the schema default of a method's ``epochs``/``batch_size``) leaves a key unset;
- ``views``: keyword arguments of the method's view transform (``make_transform``: e.g. DINO's
  ``n_local_views``, SimCLR's ``min_scale``, MAE's ``min_scale``), merged key by key;
- ``backbones`` (method block only): blocks per timm backbone name;
- every other key: a keyword argument of the method's LightningModule (``temperature``,
  ``mask_ratio``, ``decoder_depth``, ``lr_patience``, ...), checked against its signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..utils import CellstageError

RUN_KEYS = ("epochs", "batch_size", "lr")
VIEWS_KEY = "views"
BACKBONES_KEY = "backbones"


@dataclass(frozen=True)
class RunSettings:
    """Resolved settings of one (method, backbone) run."""

    epochs: int
    batch_size: int
    lr: float | None = None  # None: the method's default (seed 000: 1e-3 SimCLR/DINO, 1.5e-4 MAE)
    method_kwargs: dict = field(default_factory=dict)
    transform_kwargs: dict = field(default_factory=dict)


def check_applicable(method: str, backbone: str) -> None:
    """Raise a :class:`CellstageError` when ``method`` is unknown or cannot train ``backbone``
    (MAE masks patch tokens: Vision Transformers only, seed 000 §4.3)."""
    from . import METHODS
    from .base import is_vit

    if method not in METHODS:
        raise CellstageError(f"pretrain: unknown method {method!r}; choose one of {sorted(METHODS)}")
    if METHODS[method].vit_only and not is_vit(backbone):
        raise CellstageError(
            f"pretrain: method {method!r} needs a Vision Transformer backbone, got {backbone!r} "
            "(seed 000 §4.3 pretrains MAE on ViT-T/S/B only: use e.g. vit_tiny_patch16_224, or "
            "simclr/dino for ResNets); remove the combination from config finetune.grid"
        )


def module_keys(method: str) -> set[str]:
    """Keyword arguments the method's LightningModule accepts (its own and, with ``**kw``, the
    :class:`~cellstage.ssl.base.SSLModule` optimiser settings), without backbone/img_size/lr."""
    from . import METHODS
    from .base import SSLModule

    keys: set[str] = set()
    for cls in METHODS[method].module.__mro__:
        if cls is object or "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters
        keys |= {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break  # the base's keywords are not passed on
        if cls is SSLModule:
            break
    return keys - {"lr"}


def _check_block(block: Mapping, where: str, allowed: set[str]) -> None:
    if not isinstance(block, Mapping):
        raise CellstageError(f"config {where}: expected a mapping of settings, got {type(block).__name__}")
    unknown = sorted(set(block) - allowed)
    if unknown:
        raise CellstageError(
            f"config {where}: unknown setting(s) {unknown}; allowed: {sorted(allowed)}"
        )
    views = block.get(VIEWS_KEY, {})
    if not isinstance(views, Mapping):
        raise CellstageError(f"config {where}.{VIEWS_KEY}: expected a mapping (transform keyword arguments)")


def resolve_settings(method: str, backbone: str, *, epochs: int, batch_size: int,
                     method_settings: Mapping | None = None) -> RunSettings:
    """Merge ``pretrain.{epochs,batch_size}`` < ``method_settings`` (the block
    ``pretrain.methods.<method>``) < ``method_settings["backbones"][backbone]``.

    Raises :class:`CellstageError` for an unknown method, a method that cannot train the
    backbone, or a key the method does not have (naming the config key).
    """
    check_applicable(method, backbone)
    method_settings = dict(method_settings or {})
    backbones = method_settings.pop(BACKBONES_KEY, None) or {}
    if not isinstance(backbones, Mapping):
        raise CellstageError(f"config pretrain.methods.{method}.{BACKBONES_KEY}: expected a mapping of timm names")
    allowed = set(RUN_KEYS) | {VIEWS_KEY} | module_keys(method)
    where = f"pretrain.methods.{method}"
    _check_block(method_settings, where, allowed)
    backbone_settings = dict(backbones.get(backbone) or {})
    _check_block(backbone_settings, f"{where}.{BACKBONES_KEY}.{backbone}", allowed)

    merged: dict = {"epochs": epochs, "batch_size": batch_size}
    views: dict = {}
    for block in (method_settings, backbone_settings):  # a null value leaves the key unset
        views.update({k: v for k, v in (block.get(VIEWS_KEY) or {}).items() if v is not None})
        merged.update({k: v for k, v in block.items() if k != VIEWS_KEY and v is not None})
    if int(merged["epochs"]) < 1:
        raise CellstageError(f"config {where}: epochs must be >= 1, got {merged['epochs']}")
    if int(merged["batch_size"]) < 2:
        raise CellstageError(f"config {where}: batch_size must be >= 2, got {merged['batch_size']}")
    lr = merged.pop("lr", None)
    return RunSettings(
        epochs=int(merged.pop("epochs")),
        batch_size=int(merged.pop("batch_size")),
        lr=float(lr) if lr is not None else None,
        method_kwargs=merged,
        transform_kwargs=views,
    )


def resolve_from_config(pretrain_config: Mapping, method: str, backbone: str) -> RunSettings:
    """:func:`resolve_settings` from the whole ``pretrain`` config block."""
    methods = pretrain_config.get("methods") or {}
    return resolve_settings(method, backbone, epochs=pretrain_config["epochs"],
                            batch_size=pretrain_config["batch_size"], method_settings=methods.get(method))
