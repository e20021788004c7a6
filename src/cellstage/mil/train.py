"""The MIL training system (LightningModule) of seed 003 §3.

Seed 003 §3: "For optimisation, we used the Adam [17] optimiser with a learning rate of
lr = 0.001. The models for the Level One dataset were trained for 10 epochs, while the
multi-input models for Level Two and Level Three were trained for 30 epochs." Loss: cross-entropy
(the paper names none; softmax cross-entropy is the standard for its 2- and 3-class tasks).

Metrics per epoch (Tables 3–8 report training/validation loss and accuracy per fold):

* ``train_loss`` / ``train_acc``: over the epoch's training **bags** (as a Keras fit reports
  them: mean of the bag losses, fraction of bags classified correctly), in training mode;
* ``val_loss`` / ``val_acc``: **slide level**: a slide's class probabilities are the mean of its
  validation bags' softmax probabilities; ``val_loss`` is the mean over slides of
  ``-log p(true class)``, ``val_acc`` the fraction of slides whose argmax is the true class.

The last validation's slide probabilities travel in the resume checkpoint, so a run resumed after
its last epoch still reports them.

**Precise BatchNorm** (``bn_batches``, config ``aml.mil.precise_bn_batches``; not in seed 003):
before each validation the BatchNorm running statistics are recomputed, as a cumulative average
(``momentum=None``), over the first ``bn_batches`` batches of the epoch's training bags with the
current weights (no gradients, no weight change). The exponential running averages lag behind
weights that Adam at 10⁻³ moves a lot in the few steps a small cohort gives (the smear demo:
8 steps per epoch), and the lag shifts every validation slide the same way. Measured on the smear
demo (NPM1, Level Three, 8 epochs, folds 0–2, 4 validation slides each): without, P(mut) of all
four validation slides of fold 0 was 0.88–0.98 (accuracy 0.5 in every fold); with 8 batches,
0.34–0.79 and accuracy 0.75 in each fold. 0 turns it off (plain running averages).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from .models import MILNet


class MILModule(L.LightningModule):
    """:class:`~cellstage.mil.models.MILNet` trained with cross-entropy and Adam at ``lr``."""

    def __init__(self, backbone: str = "resnet18", n_classes: int = 2, attention: bool = False,
                 size: int | None = None, lr: float = 1e-3, bn_batches: int = 0,
                 pooling: str = "mean") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MILNet(backbone, n_classes, attention, size, pooling)
        self._val: dict[int, list] = {}
        self.val_slide_probs: dict[int, list[float]] | None = None
        self.val_slide_labels: dict[int, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, _, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train_acc", acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = {}
        if self.hparams.bn_batches and not self.trainer.sanity_checking:
            self.precise_bn(self.trainer.train_dataloader, int(self.hparams.bn_batches))

    def precise_bn(self, loader, n_batches: int) -> int:
        """Recompute every BatchNorm's running mean/var over the first ``n_batches`` batches of
        ``loader`` (cumulative average, current weights: :func:`torch.optim.swa_utils.update_bn`);
        returns the number of batches used."""
        from itertools import islice

        from torch.optim.swa_utils import update_bn

        if loader is None:
            return 0
        used = 0

        def batches():  # streamed: one batch in memory at a time
            nonlocal used
            for batch in islice(loader, n_batches):
                used += 1
                yield batch

        update_bn(batches(), self.net, device=self.device)
        return used

    def validation_step(self, batch, batch_idx):
        x, s, y = batch
        p = torch.softmax(self(x), dim=1).detach().cpu()
        for pi, si, yi in zip(p, s.tolist(), y.tolist()):
            self._val.setdefault(int(si), []).append(pi)
            self.val_slide_labels[int(si)] = int(yi)

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        slides = sorted(self._val)
        probs = torch.stack([torch.stack(self._val[s]).mean(0) for s in slides])
        labels = torch.tensor([self.val_slide_labels[s] for s in slides])
        loss = F.nll_loss(torch.log(probs.clamp_min(1e-7)), labels)
        acc = (probs.argmax(1) == labels).float().mean()
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", acc, prog_bar=True)
        self.val_slide_probs = {s: probs[i].tolist() for i, s in enumerate(slides)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mil_val"] = {"probs": self.val_slide_probs, "labels": self.val_slide_labels}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("mil_val") or {}
        self.val_slide_probs = state.get("probs")
        self.val_slide_labels = dict(state.get("labels") or {})

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
