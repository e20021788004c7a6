"""Fine-tuning recipes of seed 000: the optimiser's learning rates per epoch, per parameter group.

A recipe is a small frozen dataclass chosen by name (config ``finetune.recipe.<init>``, numbers in
``finetune.recipes.<name>``; the defaults of both the dataclass and the schema are the paper's).
:class:`~cellstage.train.classifier.CellClassifier` has two parameter groups, ``backbone`` and
``head`` (the linear classifier), and asks its recipe, at the start of every epoch, whether the
backbone is frozen and which learning rate each group gets. For the pretrained recipe that rate is
a pure function of the epoch, so a resumed run sets exactly the rates an uninterrupted run sets;
the baseline's plateau scheduler keeps its state in the checkpoint
(:class:`cellstage.training.resume.CheckpointedPlateau`).

Epochs are counted from 0 in code (``history.csv``'s ``epoch`` column) and from 1 in the paper:
code epoch ``e`` is the paper's epoch ``e + 1``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from ..utils import CellstageError

__all__ = ["RECIPES", "Baseline", "Pretrained", "Recipe", "as_recipe", "is_vit_small_or_base"]

_VIT_SMALL_OR_BASE = re.compile(r"^(vit|deit3?)_(small|base)")


def is_vit_small_or_base(backbone: str) -> bool:
    """timm names of ViT-S / ViT-B (``vit_small*``, ``vit_base*``, ``deit_small*``, ``deit3_base*``, ...)."""
    return bool(_VIT_SMALL_OR_BASE.match(backbone.lower()))


@dataclass(frozen=True)
class Baseline:
    """Seed 000 §4.2, used for models trained from scratch and from ImageNet weights.

    "Training was carried out with the AdamW optimiser, a learning rate scheduler starting at 10^-3
    with a reducing factor of 0.5 and a patience of 10 and a batch size of 128, over a total of
    100 epochs. The ViT-S and B models started out with a lower learning rate of 10^-4."

    Backbone and head share one learning rate: ``lr`` (``lr_vit_small_base`` for ViT-S/B), reduced
    by ``plateau_factor`` when the validation loss has not improved for ``plateau_patience``
    epochs. Nothing is frozen. (The batch size, 128, is config ``finetune.batch_size``.)
    """

    name: ClassVar[str] = "baseline"
    epochs: int = 100
    lr: float = 1e-3
    lr_vit_small_base: float = 1e-4
    plateau_factor: float = 0.5
    plateau_patience: int = 10

    def initial_lr(self, backbone: str) -> float:
        return self.lr_vit_small_base if is_vit_small_or_base(backbone) else self.lr

    def uses_plateau(self) -> bool:
        return True

    def frozen(self, epoch: int) -> bool:
        return False

    def lr_at(self, group: str, epoch: int, backbone: str) -> float | None:
        """None: the rate is the plateau scheduler's, not a function of the epoch."""
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Pretrained:
    """Seed 000 §4.3 ("Fine-Tuning"), used for backbones pretrained with a self-supervised method.

    "Each model was trained for 30 epochs with AdamW optimiser, a batch size of 128 and a learning
    rate of 10^-4. The pretrained backbones were frozen for the first epoch and afterwards unfrozen
    with an initial learning rate of 10^-6. The learning rate for the backbone was exponentially
    increased by a factor of 2 until it reached the learning rate of the classifier and kept at
    10^-4 until epoch 22, after which it was exponentially reduced again by a factor of 0.5 each
    epoch until the end of the training."

    Per code epoch ``e`` (0-based; the paper's epoch ``e + 1``):

    * head (the classifier): ``lr`` (10^-4) in every epoch — the paper gives it no schedule;
    * backbone: frozen in ``e < frozen_epochs`` (no update, BatchNorm statistics kept, rate 0);
      then ``min(backbone_lr_start * 2^(e - frozen_epochs), lr)`` — 10^-6, 2·10^-6, ... until it
      reaches ``lr`` — held through the paper's epoch ``hold_until_epoch`` (22, i.e. code epoch
      21), then halved each epoch: ``lr * 0.5^(e + 1 - hold_until_epoch)`` (code epochs 22..29:
      5·10^-5 ... 3.9·10^-7).

    The growth (×2) and decay (×0.5) factors are the paper's and fixed; ``epochs``,
    ``backbone_lr_start`` and ``hold_until_epoch`` may be scaled down (the demo shows the whole
    shape in 4 epochs).
    """

    name: ClassVar[str] = "pretrained"
    growth: ClassVar[float] = 2.0
    decay: ClassVar[float] = 0.5
    epochs: int = 30
    lr: float = 1e-4
    backbone_lr_start: float = 1e-6
    hold_until_epoch: int = 22
    frozen_epochs: int = 1

    def initial_lr(self, backbone: str) -> float:
        return self.lr

    def uses_plateau(self) -> bool:
        return False

    def frozen(self, epoch: int) -> bool:
        return epoch < self.frozen_epochs

    def backbone_lr(self, epoch: int) -> float:
        if self.frozen(epoch):
            return 0.0
        rate = min(self.backbone_lr_start * self.growth ** (epoch - self.frozen_epochs), self.lr)
        past = epoch + 1 - self.hold_until_epoch  # paper epochs after the last held one
        return rate * self.decay ** past if past > 0 else rate

    def lr_at(self, group: str, epoch: int, backbone: str) -> float:
        return self.backbone_lr(epoch) if group == "backbone" else self.lr

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


Recipe = Baseline | Pretrained
RECIPES: dict[str, type] = {"baseline": Baseline, "pretrained": Pretrained}


def as_recipe(recipe: Recipe | Mapping | str) -> Recipe:
    """A recipe from itself, its name, or ``{"name": ..., <field>: value, ...}`` (``to_dict()``)."""
    if isinstance(recipe, (Baseline, Pretrained)):
        return recipe
    if isinstance(recipe, str):
        recipe = {"name": recipe}
    if not isinstance(recipe, Mapping) or recipe.get("name") not in RECIPES:
        raise CellstageError(f"recipe: expected one of {sorted(RECIPES)} (or a mapping with 'name'), got {recipe!r}")
    cls = RECIPES[recipe["name"]]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(recipe) - fields - {"name"})
    if unknown:
        raise CellstageError(f"recipe {recipe['name']!r}: unknown settings {unknown} (known: {sorted(fields)})")
    out = cls(**{k: v for k, v in recipe.items() if k != "name"})
    if out.epochs < 1:
        raise CellstageError(f"recipe {out.name!r}: epochs must be >= 1, got {out.epochs}")
    return out
