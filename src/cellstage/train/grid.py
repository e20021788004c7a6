"""The fine-tuning experiments of a config: the union of the cross products of its grids.

Config ``finetune.grid`` is one cross product of scan × background × backbone × init × distance.
Seed 000's set of 132 configurations is not one cross product (ImageNet weights only for the
ResNets, SSL inits only with background, MAE only for ViTs: docs/paper-grid.md), so
``finetune.grids`` takes a list of such grids; the experiments are the union of their cross
products, duplicates removed, in first-seen order. When ``grids`` is given (non-empty) it replaces
``grid`` (the workflow's own config/config.yaml always carries a ``grid``, and a
``--configfile`` is merged over it).

A grid may also list ``loss`` (``ce``, ``soft``, ``ordinal``: :mod:`cellstage.train.losses`);
without it every configuration trains with ``ce``, the paper's cross-entropy.

An experiment is a dict ``scan, background, backbone, init, distance, loss, recipe``; its name
``{scan}-{bg|nobg}-{backbone}-{init}-{dist|nodist}`` (plus ``-{loss}`` unless the loss is ``ce``,
so the paper's configurations keep their names) is only ever built here, never split back into
its fields (a timm backbone name may itself contain ``-`` or ``.``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

from ..utils import CellstageError
from .losses import LOSSES, check_loss

__all__ = ["GRID_KEYS", "OPTIONAL_GRID_KEYS", "check_backbone", "experiment_name", "experiments"]

GRID_KEYS = ("scan", "background", "backbone", "init", "distance")
OPTIONAL_GRID_KEYS = {"loss": ["ce"]}  # key -> its value when a grid does not list it
VIT_PREFIXES = ("vit", "deit")


def experiment_name(exp: Mapping) -> str:
    loss = exp.get("loss", "ce")
    return (f"{exp['scan']}-{'bg' if exp['background'] else 'nobg'}-{exp['backbone']}-{exp['init']}-"
            f"{'dist' if exp['distance'] else 'nodist'}" + ("" if loss == "ce" else f"-{loss}"))


# the paper's backbones (seed 000 §4.2-4.3): known without importing timm (which takes seconds)
PAPER_BACKBONES = frozenset({"resnet18", "resnet50", "resnet101", "vit_tiny_patch16_224", "vit_small_patch16_224",
                             "vit_base_patch16_224"})


def check_backbone(name: str, where: str) -> None:
    """A :class:`CellstageError` naming ``where`` and the closest timm names when ``name`` is not a
    timm model (a pretrained tag such as ``.augreg_in21k`` is allowed). Imports timm only for names
    outside :data:`PAPER_BACKBONES`, so the workflow checks the grid at start-up cheaply."""
    if name in PAPER_BACKBONES:
        return
    import difflib

    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else " (see timm.list_models())"
    raise CellstageError(f"config {where}.backbone: {name!r} is not a timm model (timm {timm.__version__}){hint}")


def _check_imagenet_weights(finetune: Mapping, backbone: str) -> None:
    weights = finetune.get("imagenet_weights", {}).get(backbone)
    if not weights:
        raise CellstageError(
            f"config finetune.imagenet_weights.{backbone}: init 'imagenet' needs a local timm weights file "
            "for this backbone (nothing is downloaded)"
        )
    if not Path(weights).is_file():
        raise CellstageError(f"config finetune.imagenet_weights.{backbone}: {weights} does not exist")


def _grids(finetune: Mapping) -> list[tuple[str, Mapping]]:
    """(config key, grid) of every grid in use: ``grids`` when non-empty, else ``grid``."""
    grids = finetune.get("grids") or []
    if grids:
        return [(f"finetune.grids[{i}]", g) for i, g in enumerate(grids)]
    return [("finetune.grid", finetune["grid"])]


def experiments(finetune: Mapping, scans) -> dict[str, dict]:
    """Experiment name -> fields, for the config section ``finetune`` (defaults filled) and the
    configured ``scans``. Raises a :class:`~cellstage.utils.CellstageError` naming the config key
    for a value the workflow cannot run (unknown scan, a backbone name with '/' or unknown to timm, MAE on a
    non-ViT, an init without a recipe, ImageNet weights not configured or missing, an unknown
    loss or loss setting)."""
    out: dict[str, dict] = {}
    for where, grid in _grids(finetune):
        missing = [k for k in GRID_KEYS if k not in grid]
        if missing:
            raise CellstageError(f"config {where}: lacks {missing} (every grid lists {list(GRID_KEYS)})")
        losses = list(grid.get("loss") or OPTIONAL_GRID_KEYS["loss"])
        for loss in losses:
            if loss not in LOSSES:
                raise CellstageError(f"config {where}.loss: unknown loss {loss!r}; choose one of {list(LOSSES)}")
            check_loss(loss, (finetune.get("losses") or {}).get(loss))  # its settings, at start-up
        for scan, bg, backbone, init, dist, loss in itertools.product(*(grid[k] for k in GRID_KEYS), losses):
            if scan not in scans:
                raise CellstageError(f"config {where}.scan: {scan!r} is not a key of config 'scans'")
            if "/" in backbone or not backbone:
                raise CellstageError(
                    f"config {where}.backbone: {backbone!r} is not a timm model name usable as a path part "
                    "(no '/'; a hub model must be given by its timm name)"
                )
            check_backbone(backbone, where)
            if init == "mae" and not backbone.startswith(VIT_PREFIXES):
                raise CellstageError(f"config {where}: init 'mae' needs a ViT backbone, not {backbone!r}")
            if init not in finetune["recipe"]:
                raise CellstageError(
                    f"config finetune.recipe.{init}: no recipe (baseline or pretrained) for init {init!r}"
                )
            if init == "imagenet":
                _check_imagenet_weights(finetune, backbone)
            exp = dict(scan=scan, background=bool(bg), backbone=backbone, init=init, distance=bool(dist),
                       loss=loss, recipe=finetune["recipe"][init])  # recipe: a column of the report's tables
            out.setdefault(experiment_name(exp), exp)
    return out

