"""Cell-stage classifier: timm backbone (+ optional normalised distance) -> linear head.

Seed 000 §3.2/§4.2: the embedding is optionally concatenated with the compactness-normalised
distance to the tubule wall, then classified into the configured classes. Distance
augmentation: during training each distance is replaced by -0.5 (the "unknown" value, also
used for missing distances) with probability ``distance_dropout_p``. AdamW, ReduceLROnPlateau
(factor 0.5, patience 10) on the validation loss.

The plateau scheduler is stepped by the module at the end of each validation epoch (with
Lightning's epoch-mean ``val_loss``) and its state travels in the checkpoint
(:class:`cellstage.training.resume.CheckpointedPlateau`), so the checkpoint written at the end of an
epoch already holds the learning rate of the next one and a resumed run reduces the learning rate
exactly when an uninterrupted run does.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ..training.backbones import create_backbone, feature_dim, load_weights
from ..training.data import UNKNOWN_DISTANCE
from ..training.resume import CheckpointedPlateau
from ..utils import CellstageError

__all__ = ["CellClassifier", "UNKNOWN_DISTANCE", "load_pretrained"]


def load_pretrained(backbone: nn.Module, path: str | Path, backbone_name: str) -> None:
    """Load a safetensors backbone state dict, with an error that says what to fix."""
    p = Path(path)
    if not p.is_file():
        raise CellstageError(
            f"pretrained_path: {p} does not exist (expected a safetensors backbone state dict, "
            f"e.g. results/pretrain/<method>/{backbone_name}/<scan>/backbone.safetensors)"
        )
    try:
        load_weights(backbone, p, strict=True)
    except ValueError as e:
        raise CellstageError(
            f"pretrained_path: {p} does not fit backbone {backbone_name!r} "
            f"(was it pretrained with another backbone or image size?): {e}"
        ) from e
    except Exception as e:  # corrupt / not a safetensors file
        raise CellstageError(f"pretrained_path: {p} is not a readable safetensors file: {e}") from e


class CellClassifier(L.LightningModule):
    def __init__(
        self,
        backbone_name: str = "resnet18",
        n_classes: int = 8,
        img_size: int = 80,
        use_distance: bool = False,
        pretrained_path: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        max_epochs: int = 100,
        lr_patience: int = 10,
        lr_factor: float = 0.5,
        distance_dropout_p: float = 0.1,
    ) -> None:
        super().__init__()
        if pretrained_path is not None:
            pretrained_path = str(pretrained_path)
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone_name, img_size=img_size)
        if pretrained_path is not None:
            load_pretrained(self.backbone, pretrained_path, backbone_name)
        self.feat_dim = feature_dim(self.backbone)
        self.head = nn.Linear(self.feat_dim + (1 if use_distance else 0), n_classes)
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
        loss = F.cross_entropy(logits, y)
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
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        # stepped in on_validation_epoch_end, not by Lightning (see the module docstring)
        self.plateau.attach(opt, mode="min", factor=hp.lr_factor, patience=hp.lr_patience)
        return opt

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
