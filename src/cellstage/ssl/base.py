"""Shared base of the SSL LightningModules: optimiser, validation loss, best epoch, checkpoint state."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from ..training.resume import CheckpointedPlateau, reseed

_VAL_STREAM = 0x7A1  # the validation pass's RNG stream (same masks/views in every epoch)


class SSLModule(L.LightningModule):
    """Base class. Subclasses set ``self.backbone_model`` (the plain timm backbone whose weights
    are exported) and implement :meth:`ssl_loss` (the method's loss of one batch, no labels).

    Seed 000 §4.3: "All self-supervised algorithms were trained ... using the AdamW optimiser and
    validated on the training/validation dataset. The learning rate was reduced by a factor of
    0.25 when reaching a plateau in the validation loss (patience 10 epochs). The model with the
    best validation loss after 200 epochs was chosen as the final pretrained model."

    - ``training_step`` / ``validation_step``: the same :meth:`ssl_loss`, the latter on the
      validation crops (the labelled train/validation cells, labels unused), logged as
      ``val_loss`` (epoch mean, synced across DDP ranks). The validation pass reseeds the RNGs
      with a fixed seed (``val_seed``), so every epoch sees the same views and masks and the
      values are comparable between epochs; the next training epoch reseeds anyway
      (:class:`~cellstage.training.resume.ReseedEveryEpoch`), so resuming stays bit-identical.
    - the monitored loss is ``val_loss`` when the run has validation crops, else the epoch-mean
      training loss (documented fallback: runs without labelled crops, unit tests);
    - optimiser: AdamW; the learning rate is multiplied by ``lr_factor`` (0.25) when the monitored
      loss plateaus for ``lr_patience`` (10) epochs. The module steps the scheduler itself at the
      end of each training epoch and keeps its state in the checkpoint
      (:class:`cellstage.training.resume.CheckpointedPlateau`), so a resumed run reduces the learning
      rate exactly when an uninterrupted one does;
    - best epoch: with validation, the state of the epoch with the lowest ``val_loss`` (the
      backbone and the heads, :meth:`exported_state`) is kept in memory and in the checkpoint;
      :meth:`restore_best` loads it before export.

    ``history`` rows: epoch (1-based), mean training loss, validation loss (NaN without
    validation), learning rate used in that epoch.
    """

    #: seed 000: 1e-3 (SimCLR, DINO), 1.5e-4 (MAE)
    default_lr: float = 1e-3
    #: state_dict prefixes that are neither exported nor kept as the best state (EMA teachers,
    #: wrappers that share the backbone's tensors)
    not_exported: tuple[str, ...] = ()

    def __init__(self, *, lr: float | None = None, weight_decay: float = 0.05, lr_factor: float = 0.25,
                 lr_patience: int = 10) -> None:
        super().__init__()
        self.lr = float(lr if lr is not None else self.default_lr)
        self.weight_decay = float(weight_decay)
        self.lr_factor = float(lr_factor)
        self.lr_patience = int(lr_patience)
        self.history: list[dict] = []
        self._epoch_losses: list[torch.Tensor] = []
        self.val_seed = 0  # set by cellstage.ssl.pretrain.pretrain (not a hyperparameter)
        self.best: dict = {"epoch": None, "val_loss": math.inf, "state": None}
        # the per-epoch learning-rate schedule the module steps itself and keeps in its checkpoint
        # (a subclass may attach another one, e.g. CheckpointedMultiStep; unattached: constant lr)
        self.lr_schedule = CheckpointedPlateau()

    # the method --------------------------------------------------------------------------
    def ssl_loss(self, batch) -> tuple[torch.Tensor, int]:
        """(loss, batch size) of one batch ``(views, distance, label)``; labels are never used."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        loss, n = self.ssl_loss(batch)
        self._record(loss, n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, n = self.ssl_loss(batch)
        self.log("val_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=n,
                 sync_dist=True)
        return loss

    # exported weights ---------------------------------------------------------------------
    def export_backbone(self) -> nn.Module:
        return self.backbone_model

    def exported_state(self) -> dict[str, torch.Tensor]:
        """Backbone and heads (every key but ``not_exported``), cloned to CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
                if not k.startswith(self.not_exported)}

    def heads_state(self) -> dict[str, torch.Tensor]:
        """The exported state without the backbone (projection heads, predictors, decoders)."""
        return {k: v for k, v in self.exported_state().items() if not k.startswith("backbone_model.")}

    def restore_best(self) -> bool:
        """Load the best epoch's exported state (True) or keep the current one (False: no validation)."""
        if self.best["state"] is None:
            return False
        missing, unexpected = self.load_state_dict(self.best["state"], strict=False)
        assert not unexpected and all(k.startswith(self.not_exported) for k in missing), (missing, unexpected)
        return True

    # bookkeeping ----------------------------------------------------------------------------
    def _record(self, loss: torch.Tensor, batch_size: int) -> None:
        self._epoch_losses.append(loss.detach().float().cpu())
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch_size, sync_dist=True)

    def on_train_epoch_start(self) -> None:
        self._epoch_losses = []

    def on_validation_epoch_start(self) -> None:
        reseed(self.val_seed, _VAL_STREAM, self.global_rank)

    def on_train_epoch_end(self) -> None:
        # Lightning runs the epoch's validation before this hook: val_loss is this epoch's
        metrics = self.trainer.callback_metrics
        val = metrics.get("val_loss")
        val = float(val) if val is not None else None
        if self._epoch_losses:
            mean = float(torch.stack(self._epoch_losses).mean())
            lr = float(self.optimizers().param_groups[0]["lr"])  # before this epoch's scheduler step
            self.history.append({"epoch": int(self.current_epoch) + 1, "loss": mean,
                                 "val_loss": val if val is not None else math.nan, "lr": lr})
        if val is not None and (val < self.best["val_loss"] or self.best["state"] is None):
            self.best = {"epoch": int(self.current_epoch) + 1, "val_loss": val, "state": self.exported_state()}
        # the monitored loss: validation, else Lightning's epoch mean of the training loss
        self.lr_schedule.step(val if val is not None else metrics.get("train_loss"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cellstage_history"] = list(self.history)
        checkpoint["cellstage_best"] = dict(self.best)
        self.lr_schedule.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("cellstage_history", []))
        self.best = dict(checkpoint.get("cellstage_best") or {"epoch": None, "val_loss": math.inf, "state": None})
        self.lr_schedule.load(checkpoint)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        self.lr_schedule.attach(opt, mode="min", factor=self.lr_factor, patience=self.lr_patience)
        return opt


def is_vit(backbone: str) -> bool:
    return backbone.startswith(("vit", "deit"))
