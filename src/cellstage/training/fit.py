"""``fit_resumable``: the one place that builds a ``lightning.Trainer`` and fits a module.

Every trainer of cellstage — fine-tuning (:func:`cellstage.train.cv.run_fold`), SSL pretraining
(:func:`cellstage.ssl.pretrain.pretrain`), the grading network
(:func:`cellstage.reduce.grader.train_grader`) — is a LightningModule plus its data, handed to
:func:`fit_resumable`, which owns:

* the Trainer (``logger=False``, no model summary, no sanity validation, progress bar optional);
* the resume decision (:func:`cellstage.training.resume.resumable_checkpoint`): the checkpoint
  at ``ckpt_path_last`` is resumed only when its sidecar carries the hash of ``resume_config`` and
  of the content of the ``inputs`` files (crop zarr stores, index parquets, pretrained weights;
  :func:`~cellstage.training.resume.input_hashes`), its bytes match the sha256 in the sidecar, it
  loads with ``torch.load(weights_only=True)`` and it has at most ``epochs`` epochs done; a
  damaged one is set aside (``last.ckpt.corrupt-<time>``), any other mismatch deletes it, and
  either way the log says why and training starts afresh. Lightning then restores the training
  state with ``Trainer.fit(..., weights_only=True)``: nothing on disk is unpickled;
* the per-epoch crash-safe checkpoint (:class:`~cellstage.training.resume.EpochCheckpoint`, every
  ``checkpoint_every`` epochs, 0 = never: private temp file, fsync, sha256 in the sidecar, rename)
  and the per-epoch reseeding
  (:class:`~cellstage.training.resume.ReseedEveryEpoch`), which make a resumed run bit-identical to
  an uninterrupted one on CPU with ``num_workers=0`` (the killed-run tests of each trainer);
* devices, DDP strategy and the SLURM plugin (:func:`~cellstage.training.resume.device_kwargs`);
* ``torch``'s deterministic-algorithms flag: the Trainer sets it globally for the fit; it is
  restored afterwards, so code run later in the same process is not affected;
* fit timing and the rank-0 flag (under DDP only rank 0 should evaluate and write outputs).

The caller removes the checkpoint with :meth:`FitResult.remove_checkpoint` once its outputs are
written (a kill before that leaves a resumable checkpoint): a stage that succeeded leaves none.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .resume import (
    EpochCheckpoint,
    ReseedEveryEpoch,
    device_kwargs,
    input_hashes,
    remove_checkpoint,
    resumable_checkpoint,
)

log = logging.getLogger("cellstage.train")


@dataclass
class FitResult:
    """What :func:`fit_resumable` did. ``resumed_from``: epochs done in the resumed checkpoint
    (stored inside it), None for a fresh run."""

    trainer: object
    ckpt_path: str | None
    resumed_from: int | None
    fit_seconds: float
    last: Path

    @property
    def resumed(self) -> bool:
        return self.ckpt_path is not None

    @property
    def is_global_zero(self) -> bool:
        return bool(self.trainer.is_global_zero)

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    def remove_checkpoint(self, *, remove_dir: bool = False) -> None:
        """Delete ``last.ckpt``, its temporary file and sidecar; with ``remove_dir`` also the
        checkpoint folder if nothing else is in it."""
        remove_checkpoint(self.last)
        if remove_dir:
            try:
                self.last.parent.rmdir()
            except OSError:
                pass


def fit_resumable(
    module,
    *,
    datamodule=None,
    train_loader=None,
    val_loader=None,
    ckpt_path_last: str | os.PathLike,
    resume_config: Mapping,
    inputs: Iterable[str | os.PathLike] = (),
    epochs: int,
    seed: int,
    accelerator: str = "auto",
    devices=1,
    deterministic: bool | str = True,
    callbacks: Sequence = (),
    progress: bool = True,
    checkpoint_every: int = 1,
    default_root_dir: str | os.PathLike | None = None,
    what: str = "training",
) -> FitResult:
    """Fit ``module`` for ``epochs`` epochs on ``datamodule`` or ``train_loader`` (with the optional
    ``val_loader``, run after every training epoch), resuming from ``ckpt_path_last`` when it was
    written with the same ``resume_config`` from inputs with the same content.

    ``inputs``: every file or directory (zarr store) the training reads; their content is hashed
    (sha256 of the bytes, :func:`~cellstage.training.resume.content_hash`) into the resume key, so a
    checkpoint made before an input was regenerated is not resumed. A run never continues past
    ``epochs`` (a checkpoint with more epochs done is deleted).

    ``deterministic``: the resolved ``Trainer(deterministic=)`` value
    (:func:`~cellstage.training.resume.resolve_deterministic`). ``callbacks`` run after the
    reseeding and before the checkpoint (whose file therefore holds their end-of-epoch state).
    ``what`` names the run in log lines.
    """
    import lightning as L

    if (datamodule is None) == (train_loader is None):
        raise ValueError("fit_resumable: pass exactly one of datamodule and train_loader")
    if val_loader is not None and datamodule is not None:
        raise ValueError("fit_resumable: val_loader goes with train_loader (a datamodule has its own)")
    last = Path(ckpt_path_last)
    t_hash = time.perf_counter()
    hashes = input_hashes(inputs)
    if hashes:
        log.info("%s: hashed the content of %d input(s) in %.2f s", what, len(hashes), time.perf_counter() - t_hash)
    found = resumable_checkpoint(last, resume_config, what=what, inputs=hashes, epochs=int(epochs))
    ckpt_path = found.path if found is not None else None
    resumed_from = found.epochs_done if found is not None else None
    checkpoint = EpochCheckpoint(
        last,
        resume_config,
        checkpoint_every,
        inputs=hashes,
        previous_sha256=found.sha256 if found is not None else None,
    )
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        trainer = L.Trainer(
            max_epochs=int(epochs),
            accelerator=accelerator,
            **device_kwargs(devices),
            deterministic=deterministic,
            logger=False,
            callbacks=[ReseedEveryEpoch(seed), *callbacks, checkpoint],
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=str(default_root_dir) if default_root_dir is not None else None,
        )
        t_fit = time.perf_counter()
        if datamodule is not None:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        else:
            trainer.fit(
                module,
                train_dataloaders=train_loader,
                val_dataloaders=val_loader,
                ckpt_path=ckpt_path,
                weights_only=True,
            )
        fit_seconds = time.perf_counter() - t_fit
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    return FitResult(
        trainer=trainer, ckpt_path=ckpt_path, resumed_from=resumed_from, fit_seconds=fit_seconds, last=last
    )


@torch.no_grad()
def predict_proba(model, loader, device=None, *, n_classes: int | None = None) -> torch.Tensor:
    """Softmax probabilities (N, C), float32 on CPU, of ``model`` over ``loader``.

    Batches are ``(image, distance, label)`` (every cellstage crop dataset yields that triple);
    the model is called as ``model(image, distance)``. ``device`` None = the model's device
    (else the model is moved there). The model is put in eval mode and its mode restored after.
    """
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for x, d, _ in loader:
        out.append(torch.softmax(model(x.to(dev), d.to(dev)), dim=1).cpu())
    model.train(was_training)
    if not out:
        return torch.zeros((0, int(n_classes or 0)))
    return torch.cat(out)
