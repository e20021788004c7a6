"""Shared base of the SSL LightningModules: optimiser, epoch-loss history, checkpoint state."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from ..training.resume import CheckpointedPlateau


class SSLModule(L.LightningModule):
    """Base class. Subclasses set ``self.backbone_model`` (the plain timm backbone whose weights
    are exported) and implement ``training_step`` returning the loss.

    Optimiser (seed 000 §4.3): AdamW; the learning rate is reduced by ``lr_factor`` (0.25) when
    the monitored loss plateaus for ``lr_patience`` (10) epochs. Seed 000 monitors a validation
    loss; here there is no labelled validation set inside pretraining, so the epoch-mean
    training loss is monitored (documented deviation). The module steps the scheduler itself at
    the end of each training epoch and keeps its state in the checkpoint
    (:class:`cellstage.training.resume.CheckpointedPlateau`), so a resumed run reduces the learning
    rate exactly when an uninterrupted one does. ``history`` rows: epoch (1-based), mean loss,
    learning rate used in that epoch.
    """

    #: seed 000: 1e-3 (SimCLR, DINO), 1.5e-4 (MAE)
    default_lr: float = 1e-3

    def __init__(self, *, lr: float | None = None, weight_decay: float = 0.05, lr_factor: float = 0.25,
                 lr_patience: int = 10) -> None:
        super().__init__()
        self.lr = float(lr if lr is not None else self.default_lr)
        self.weight_decay = float(weight_decay)
        self.lr_factor = float(lr_factor)
        self.lr_patience = int(lr_patience)
        self.history: list[dict] = []
        self._epoch_losses: list[torch.Tensor] = []
        # the per-epoch learning-rate schedule the module steps itself and keeps in its checkpoint
        # (a subclass may attach another one, e.g. CheckpointedMultiStep; unattached: constant lr)
        self.lr_schedule = CheckpointedPlateau()

    # exported weights ---------------------------------------------------------------------
    def export_backbone(self) -> nn.Module:
        return self.backbone_model

    # bookkeeping ----------------------------------------------------------------------------
    def _record(self, loss: torch.Tensor, batch_size: int) -> None:
        self._epoch_losses.append(loss.detach().float().cpu())
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch_size, sync_dist=True)

    def on_train_epoch_start(self) -> None:
        self._epoch_losses = []

    def on_train_epoch_end(self) -> None:
        if self._epoch_losses:
            mean = float(torch.stack(self._epoch_losses).mean())
            lr = float(self.optimizers().param_groups[0]["lr"])  # before this epoch's scheduler step
            self.history.append({"epoch": int(self.current_epoch) + 1, "loss": mean, "lr": lr})
        # Lightning's epoch mean of the logged loss (what its own scheduler step used to monitor)
        self.lr_schedule.step(self.trainer.callback_metrics.get("train_loss"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cellstage_history"] = list(self.history)
        self.lr_schedule.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("cellstage_history", []))
        self.lr_schedule.load(checkpoint)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        self.lr_schedule.attach(opt, mode="min", factor=self.lr_factor, patience=self.lr_patience)
        return opt


def is_vit(backbone: str) -> bool:
    return backbone.startswith(("vit", "deit"))
