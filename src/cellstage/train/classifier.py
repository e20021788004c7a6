"""Cell-stage classifier: timm backbone (+ optional normalised distance) -> linear head.

Seed 000 §3.2/§4.2: the embedding is optionally concatenated with the compactness-normalised
distance to the tubule wall, then classified into the configured classes. Distance
augmentation: during training each distance is replaced by -0.5 (the "unknown" value, also
used for missing distances) with probability ``distance_dropout_p``.

Optimiser: AdamW with two parameter groups, ``backbone`` and ``head``, whose learning rates
follow the module's recipe (:mod:`cellstage.train.recipes`): ``baseline`` (§4.2, one rate,
ReduceLROnPlateau 0.5 / 10 on the validation loss) or ``pretrained`` (§4.3, backbone frozen for
the first epoch, then its own per-epoch rate; constant head rate). At the start of every training
epoch the module freezes or unfreezes the backbone and, for a per-epoch recipe, sets each group's
rate from the epoch number alone. A frozen backbone is in eval mode (BatchNorm statistics kept)
and its gradients are dropped before the optimiser step (no update, no AdamW state, no weight
decay); they are still computed, so DDP sees every parameter used.

Loss (``loss``, ``loss_settings``; :mod:`cellstage.train.losses`): cross-entropy (``ce``, the
paper's), soft adjacent-stage labels (``soft``) or cross-entropy plus the expected ordinal cost
(``ordinal``); the same loss is the validation loss that the plateau scheduler and the best
epoch follow.

The plateau scheduler is stepped by the module at the end of each validation epoch (with
Lightning's epoch-mean ``val_loss``) and its state travels in the checkpoint
(:class:`cellstage.training.resume.CheckpointedPlateau`), so the checkpoint written at the end of an
epoch already holds the learning rate of the next one and a resumed run reduces the learning rate
exactly when an uninterrupted run does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..taxonomy import Taxonomy
from ..training.backbones import create_backbone, feature_dim, load_weights
from ..training.data import UNKNOWN_DISTANCE
from ..training.resume import CheckpointedPlateau
from ..utils import CellstageError
from .losses import check_loss, cost_matrix, soft_targets
from .recipes import Recipe, as_recipe

__all__ = ["CellClassifier", "StageLoss", "UNKNOWN_DISTANCE", "load_pretrained"]


def load_pretrained(backbone: nn.Module, path: str | Path, backbone_name: str, *, key: str = "pretrained_path") -> None:
    """Load a backbone's or a whole timm model's weights (safetensors or tensors-only .pth).

    ``key`` names where the path came from (a config key) in the error that says what to fix.
    """
    p = Path(path)
    if not p.is_file():
        raise CellstageError(
            f"{key}: {p} does not exist (expected a safetensors backbone state dict, e.g. "
            f"results/pretrain/<method>/{backbone_name}/<scan>/backbone.safetensors, or timm weights "
            f"of {backbone_name!r})"
        )
    try:
        load_weights(backbone, p, strict=True)
    except ValueError as e:
        raise CellstageError(
            f"{key}: {p} does not fit backbone {backbone_name!r} "
            f"(weights of another backbone, or another image / patch size?): {e}"
        ) from e
    except Exception as e:  # corrupt / not a safetensors file / a pickle with more than tensors
        kind = "safetensors" if p.suffix not in (".pth", ".pt", ".bin") else "tensors-only torch"
        raise CellstageError(f"{key}: {p} is not a readable {kind} file: {e}") from e


class StageLoss(nn.Module):
    """``loss(logits, y)``, the batch mean of loss ``name`` (``ce``, ``soft``, ``ordinal``) with
    ``settings`` over ``taxonomy`` (:mod:`cellstage.train.losses`)."""

    def __init__(self, name: str, taxonomy: Taxonomy, settings: Mapping | None = None) -> None:
        super().__init__()
        self.name = name
        self.settings = check_loss(name, settings)
        n = taxonomy.n_classes
        targets = soft_targets(taxonomy, self.settings["adjacent_share"]) if name == "soft" else np.eye(n)
        cost = cost_matrix(taxonomy) if name == "ordinal" else np.zeros((n, n))
        # not persistent: rebuilt from the hyperparameters, so checkpoints of every loss look alike
        self.register_buffer("targets", torch.as_tensor(targets, dtype=torch.float32), persistent=False)
        self.register_buffer("cost", torch.as_tensor(cost, dtype=torch.float32), persistent=False)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.name == "ce":
            return F.cross_entropy(logits, y)
        if self.name == "soft":
            return F.cross_entropy(logits, self.targets[y].to(logits.dtype))
        expected_cost = (torch.softmax(logits, dim=1) * self.cost[y].to(logits.dtype)).sum(1).mean()
        return F.cross_entropy(logits, y) + self.settings["weight"] * expected_cost


class CellClassifier(L.LightningModule):
    def __init__(
        self,
        backbone_name: str = "resnet18",
        n_classes: int = 8,
        img_size: int = 80,
        use_distance: bool = False,
        pretrained_path: str | None = None,
        pretrained_key: str = "pretrained_path",
        recipe: Recipe | Mapping | str = "baseline",
        weight_decay: float = 0.01,
        distance_dropout_p: float = 0.1,
        loss: str = "ce",
        loss_settings: Mapping | None = None,
        classes: Sequence[str] | None = None,
        static_classes: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if pretrained_path is not None:
            pretrained_path = str(pretrained_path)
        self.recipe = as_recipe(recipe)
        recipe = self.recipe.to_dict()  # plain values in the checkpoint's hyperparameters
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone_name, img_size=img_size)
        if pretrained_path is not None:
            load_pretrained(self.backbone, pretrained_path, backbone_name, key=pretrained_key)
        self.feat_dim = feature_dim(self.backbone)
        self.head = nn.Linear(self.feat_dim + (1 if use_distance else 0), n_classes)
        # the training and validation loss (:mod:`cellstage.train.losses`): soft and ordinal need
        # the class order, i.e. ``classes`` (n_classes of them) and the static ones
        if classes is None:
            if loss != "ce":
                raise CellstageError(f"loss {loss!r} needs the ordered classes (classes=...), not only n_classes")
            classes = [str(i) for i in range(n_classes)]
        if len(classes) != n_classes:
            raise CellstageError(f"classes: {len(classes)} names for n_classes={n_classes}")
        self.criterion = StageLoss(loss, Taxonomy(tuple(classes), tuple(static_classes)), loss_settings)
        self.plateau = CheckpointedPlateau()

    # ---------------------------------------------------------------- model
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor, distance: torch.Tensor | None = None) -> torch.Tensor:
        z = self.backbone(x)
        if self.hparams.use_distance:
            if distance is None:
                distance = torch.full((z.shape[0],), UNKNOWN_DISTANCE, device=z.device)
            z = torch.cat([z, distance.to(z.dtype).reshape(-1, 1)], dim=1)
        return self.head(z)

    def _augment_distance(self, d: torch.Tensor) -> torch.Tensor:
        p = self.hparams.distance_dropout_p
        if not self.hparams.use_distance or p <= 0:
            return d
        drop = torch.rand(d.shape, device=d.device) < p
        return torch.where(drop, torch.full_like(d, UNKNOWN_DISTANCE), d)

    # ------------------------------------------------------------- training
    def _step(self, batch, stage: str):
        x, d, y = batch
        if stage == "train":
            d = self._augment_distance(d)
        logits = self(x, d)
        loss = self.criterion(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        bs = y.shape[0]
        sync = stage == "val"  # one validation loss for the scheduler on every DDP rank
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs,
                 sync_dist=sync)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=bs,
                 sync_dist=sync)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        x, d, _ = batch
        return torch.softmax(self(x, d), dim=1)

    def configure_optimizers(self):
        hp, recipe = self.hparams, self.recipe
        lr = recipe.initial_lr(hp.backbone_name)
        groups = [
            {"name": "backbone", "params": list(self.backbone.parameters()), "lr": lr},
            {"name": "head", "params": list(self.head.parameters()), "lr": lr},
        ]
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=hp.weight_decay)
        if recipe.uses_plateau():
            # stepped in on_validation_epoch_end, not by Lightning (see the module docstring)
            self.plateau.attach(opt, mode="min", factor=recipe.plateau_factor, patience=recipe.plateau_patience)
        return opt

    def backbone_frozen(self) -> bool:
        return self.recipe.frozen(int(self.current_epoch))

    def on_train_epoch_start(self) -> None:
        epoch = int(self.current_epoch)
        self.backbone.train(not self.recipe.frozen(epoch))
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                lr = self.recipe.lr_at(group["name"], epoch, self.hparams.backbone_name)
                if lr is not None:
                    group["lr"] = lr

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.backbone_frozen():
            for p in self.backbone.parameters():
                p.grad = None  # AdamW skips parameters without a gradient

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.plateau.step(self.trainer.callback_metrics.get("val_loss"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.plateau.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.plateau.load(checkpoint)

    def predict_proba(self, loader) -> torch.Tensor:
        """Softmax probabilities over ``loader`` (eval mode, on the module's device)."""
        from ..training.fit import predict_proba

        return predict_proba(self, loader, n_classes=self.hparams.n_classes)
