"""Module-level Lightning callbacks whose state travels in the resume checkpoint.

Used by fine-tuning (:func:`cellstage.train.cv.run_fold`); any trainer may pass them to
:func:`cellstage.training.fit.fit_resumable`. The per-epoch checkpoint itself is
:class:`cellstage.training.resume.EpochCheckpoint`.
"""

from __future__ import annotations

import math

import lightning as L

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_top1", "lr", "backbone_lr", "head_lr")


class History(L.Callback):
    """Per-epoch row of losses, accuracy and the learning rates used in that epoch.

    ``lr`` is the first parameter group's rate; ``<name>_lr`` that of each named group (the
    fine-tuning classifier's ``backbone`` and ``head``; NaN for a group the optimiser lacks). The
    rates are read when the epoch's first batch starts: after every ``on_train_epoch_start`` hook
    (where a recipe sets them) and before the module steps its plateau scheduler at validation end.
    """

    GROUPS = ("backbone", "head")

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._lrs: dict = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._lrs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._lrs or not trainer.optimizers:
            return
        groups = trainer.optimizers[0].param_groups
        self._lrs = {"lr": float(groups[0]["lr"])}
        for g in groups:
            if g.get("name") in self.GROUPS:
                self._lrs[f"{g['name']}_lr"] = float(g["lr"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics

        def f(key):
            v = m.get(key)
            return float(v) if v is not None else math.nan

        row = {
            "epoch": int(trainer.current_epoch),
            "train_loss": f("train_loss"),
            "train_acc": f("train_acc"),
            "val_loss": f("val_loss"),
            "val_top1": f("val_acc"),
            **{k: self._lrs.get(k, math.nan) for k in ("lr", *(f"{g}_lr" for g in self.GROUPS))},
        }
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state) -> None:
        self.rows = list(state.get("rows", []))


class BestState(L.Callback):
    """Weights of the epoch with the lowest validation loss (in memory and checkpoints)."""

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.best_epoch = -1
        self.best_state = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        v = trainer.callback_metrics.get("val_loss")
        if v is None:
            return
        v = float(v)
        if v < self.best_loss or self.best_state is None:
            self.best_loss, self.best_epoch = v, int(trainer.current_epoch)
            self.best_state = {k: t.detach().cpu().clone() for k, t in pl_module.state_dict().items()}

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state) -> None:
        self.best_loss = float(state["best_loss"])
        self.best_epoch = int(state["best_epoch"])
        self.best_state = state["best_state"]


class LossHistory(L.Callback):
    """Per-epoch row ``{"epoch": 1-based, "loss": unweighted mean of the epoch's step losses}``.

    The step losses are the values ``training_step`` returned (float32, on CPU), so the mean is
    that of the batches as trained (a short last batch counts as one step).
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._losses: list = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(loss.detach().cpu())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import torch

        if self._losses:
            self.rows.append({"epoch": int(trainer.current_epoch) + 1,
                              "loss": float(torch.stack(self._losses).mean())})
        self._losses = []

    def state_dict(self) -> dict:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state) -> None:
        self.rows = list(state.get("rows", []))
