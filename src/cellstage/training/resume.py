"""Resume after a kill, bit-identically: the pieces shared by every Lightning trainer of cellstage.

Fine-tuning (:func:`cellstage.train.cv.run_fold`), SSL pretraining
(:func:`cellstage.ssl.pretrain.pretrain`) and the grading network
(:func:`cellstage.reduce.grader.train_grader`) all train through
:func:`cellstage.training.fit.fit_resumable`, which wires up:

* :class:`EpochCheckpoint` — after every epoch the full Lightning checkpoint (weights, optimiser,
  loop counters, callback states, the module's own extra state) is written to ``<name>.tmp`` and
  renamed onto ``<name>`` (``last.ckpt``), so a kill never leaves half a file; then the sidecar
  ``last.json`` (``{"hash", "epochs_done", "config"}``) is replaced the same way.
* :func:`find_resumable` — returns the checkpoint to resume from when its sidecar carries the
  hash of the current arguments (:func:`config_hash`); otherwise the stale checkpoint is removed,
  a log line says why, and a fresh sidecar is written.
* :class:`EpochSampler` — the training order of epoch ``e`` is a pure function of
  ``(seed, e)``; Lightning calls ``set_epoch`` before each epoch and the permutation is drawn
  lazily when the epoch's iteration starts, so it does not matter whether the DataLoader
  iterator was created before or after the epoch began (Lightning creates the first epoch's
  iterator of a run earlier than the others, and a resumed run's first epoch is not epoch 0).
* :func:`loader_generator` — every DataLoader gets its own ``torch.Generator``: creating an
  iterator draws a base seed from it instead of from the global torch RNG.
* :class:`ReseedEveryEpoch` — at the start of epoch ``e`` the global torch / numpy / ``random``
  RNGs are reseeded from ``(seed, e, rank)``, so augmentations, dropout, masking and the
  distance-dropout augmentation draw the same numbers in epoch ``e`` whether the run was
  resumed or not (RNG state therefore need not be stored in the checkpoint).
* :class:`CheckpointedPlateau` — a ``ReduceLROnPlateau`` stepped by the LightningModule itself
  (at validation-epoch end for fine-tuning, at training-epoch end for pretraining) and saved in
  the checkpoint: Lightning 2.6 marks an epoch restored from an end-of-epoch checkpoint as
  completed *without* running the epoch-level scheduler step it would have run after the
  checkpoint was written, so a scheduler left to Lightning misses one step on resume.
* :func:`device_kwargs` — ``devices`` / ``strategy`` / ``plugins`` for ``lightning.Trainer``
  (see its docstring for the SLURM rules).

Verified (tests/unit/test_finetune.py, test_ssl.py, test_reduce.py, lightning 2.6.6, torch 2.14.1,
CPU, ``num_workers=0``): a run killed with SIGKILL after its epoch-1 checkpoint and rerun with the
same arguments ends with weights ``torch.equal`` to an uninterrupted run and the same history.
With ``num_workers > 0`` the order and the main-process RNG are still restored, but the workers'
RNG streams (seeded when the workers start) are not, so augmentations may differ after a resume;
on CUDA, bit-identity further needs deterministic kernels (``deterministic=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator, Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch.utils.data import Sampler

from ..utils import write_json

log = logging.getLogger("cellstage.train")  # the trainers' logger (messages name the trainer)

SIDECAR_SUFFIX = ".json"
_ORDER_STREAM = 0x5A  # distinct seed streams for the sample order and the per-epoch reseed
_RESEED_STREAM = 0xE9


# --------------------------------------------------------------------------------- seeds
def derive_seed(*keys: int) -> int:
    """A 32-bit seed that is a pure function of ``keys`` (numpy ``SeedSequence``)."""
    entropy = [int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


def loader_generator(seed: int) -> torch.Generator:
    """A private generator for a DataLoader (iterator creation then leaves the global RNG alone)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed))
    return g


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled per epoch from ``(seed, epoch)`` (or in order if not ``shuffle``).

    ``set_epoch`` is what Lightning (and ``DistributedSamplerWrapper`` under DDP) calls before
    each epoch; the permutation is computed inside ``__iter__`` when iteration starts.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, epoch, _ORDER_STREAM))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)  # generator function: runs after set_epoch

    def __len__(self) -> int:
        return self.n


def seed_all(seed: int) -> None:
    """The trainers' one seeding call: ``lightning.seed_everything(seed, workers=True)`` (torch,
    numpy, ``random``, and ``PL_SEED_WORKERS`` so DataLoader workers are seeded from it too)."""
    L.seed_everything(int(seed), workers=True, verbose=False)


def reseed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed torch (CPU and CUDA), numpy and ``random`` from ``(seed, epoch, rank)``."""
    s = derive_seed(seed, epoch, rank, _RESEED_STREAM)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


class ReseedEveryEpoch(L.Callback):
    """Calls :func:`reseed` at the start of every training epoch (rank-dependent under DDP)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        reseed(self.seed, trainer.current_epoch, trainer.global_rank)


# --------------------------------------------------------------------- LR on plateau
class CheckpointedPlateau:
    """``ReduceLROnPlateau`` that a LightningModule steps itself and keeps in its checkpoint.

    Use: ``attach(optimizer, ...)`` in ``configure_optimizers`` (return only the optimiser to
    Lightning), ``step(value)`` once per epoch before the checkpoint is written, ``save(ckpt)`` /
    ``load(ckpt)`` from ``on_save_checkpoint`` / ``on_load_checkpoint`` (Lightning may call the
    latter before ``configure_optimizers``; the state is then applied on ``attach``).
    """

    KEY = "cellstage_plateau"

    def __init__(self) -> None:
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._pending: dict | None = None

    def attach(self, optimizer, **kwargs) -> torch.optim.lr_scheduler.LRScheduler:
        self.scheduler = self._make(optimizer, **kwargs)
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None
        return self.scheduler

    def _make(self, optimizer, **kwargs):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)

    def step(self, value) -> None:
        if self.scheduler is not None and value is not None:
            self.scheduler.step(float(value))

    def save(self, checkpoint: dict) -> None:
        if self.scheduler is not None:
            checkpoint[self.KEY] = self.scheduler.state_dict()

    def load(self, checkpoint: dict) -> None:
        state = checkpoint.get(self.KEY)
        if state is None:
            return
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)
        else:
            self._pending = state


class CheckpointedMultiStep(CheckpointedPlateau):
    """``MultiStepLR`` (×``gamma`` at the given epochs) with the same interface as
    :class:`CheckpointedPlateau`: ``attach(optimizer, milestones=..., gamma=...)``, ``step(value)``
    once per epoch (the value is ignored), ``save`` / ``load`` through the checkpoint."""

    KEY = "cellstage_multistep"

    def _make(self, optimizer, **kwargs):
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, **kwargs)

    def step(self, value=None) -> None:
        if self.scheduler is not None:
            self.scheduler.step()


# ------------------------------------------------------------------------ checkpoints
def config_hash(config: Mapping) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jsonable(config: Mapping) -> dict:
    """``config`` as the sidecar stores it (values JSON cannot hold become their ``str``)."""
    return json.loads(json.dumps(dict(config), default=str))


def sidecar_path(ckpt: str | os.PathLike) -> Path:
    return Path(ckpt).with_suffix(SIDECAR_SUFFIX)


def read_sidecar(ckpt: str | os.PathLike) -> dict:
    try:
        return json.loads(sidecar_path(ckpt).read_text())
    except (OSError, ValueError):
        return {}


def find_resumable(ckpt: str | os.PathLike, config: Mapping, *, what: str) -> str | None:
    """``str(ckpt)`` if it exists and was written with the same ``config``, else ``None``.

    When ``None`` is returned the stale checkpoint (and its temporary file) are removed, the
    reason is logged, and a sidecar for ``config`` (``epochs_done`` 0) is written, so that the
    checkpoints this run writes are recognised by the next attempt.
    """
    ckpt = Path(ckpt)
    h = config_hash(config)
    if ckpt.is_file():
        meta = read_sidecar(ckpt)
        if meta.get("hash") == h:
            log.info("%s: resuming from %s (%s epoch(s) done)", what, ckpt, meta.get("epochs_done", "?"))
            return str(ckpt)
        reason = "has no readable sidecar" if not meta else "was written with other arguments"
        log.warning("%s: %s %s; ignoring it and starting afresh", what, ckpt, reason)
    for p in (ckpt, ckpt.with_name(ckpt.name + ".tmp"), sidecar_path(ckpt)):
        p.unlink(missing_ok=True)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    write_json(sidecar_path(ckpt), {"hash": h, "epochs_done": 0, "config": _jsonable(config)})
    return None


def remove_checkpoint(ckpt: str | os.PathLike) -> None:
    ckpt = Path(ckpt)
    for p in (ckpt, ckpt.with_name(ckpt.name + ".tmp"), sidecar_path(ckpt)):
        p.unlink(missing_ok=True)


class EpochCheckpoint(Checkpoint):
    """Full checkpoint at the end of every ``every``-th epoch, replaced atomically; 0 = never.

    A ``Checkpoint`` subclass, so Lightning runs it after the LightningModule's and the other
    callbacks' ``on_train_epoch_end`` (their end-of-epoch state is in the file). The sidecar's
    ``epochs_done`` is updated after the checkpoint (a kill between the two renames leaves a
    sidecar one epoch behind, which is only informational).
    """

    def __init__(self, path: str | os.PathLike, config: Mapping, every: int = 1) -> None:
        self.path = Path(path)
        self.every = int(every)
        self.meta = {"hash": config_hash(config), "config": _jsonable(config)}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every <= 0 or (trainer.current_epoch + 1) % self.every:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(str(tmp), weights_only=False)  # every rank; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
            done = int(trainer.current_epoch) + 1
            write_json(sidecar_path(self.path), {**self.meta, "epochs_done": done})


# ----------------------------------------------------------------------------- devices
def resolve_deterministic(deterministic, accelerator: str):
    """``Trainer(deterministic=)``: as given, else True on CPU and "warn" on CUDA (where
    ``AdaptiveAvgPool2d``'s backward has no deterministic kernel and True would raise)."""
    if deterministic is not None:
        return deterministic
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return True if on_cpu else "warn"


def n_devices(devices) -> int | None:
    """Number of devices ``devices`` asks for; None when Lightning decides (``"auto"``, -1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        s = devices.strip()
        if "," in s:
            return len([d for d in s.split(",") if d.strip()])
        if s.lstrip("-").isdigit():
            devices = int(s)
        else:
            return None
    devices = int(devices)
    return None if devices < 0 else devices


def device_kwargs(devices=1, environ: Mapping[str, str] | None = None) -> dict:
    """``devices``, ``strategy`` and ``plugins`` for ``lightning.Trainer``.

    * one device: ``LightningEnvironment()`` — inside a SLURM job Lightning does not auto-detect
      ``SLURMEnvironment`` (which would take over ranks, signals and requeueing of the job step
      that Snakemake's executor started);
    * several devices: ``strategy="ddp"``. If this process is one of exactly that many SLURM
      tasks (``SLURM_NTASKS`` equals the device count: the job was started with one task per
      device, e.g. ``srun --ntasks-per-node=N``), Lightning's own SLURM detection is left on and
      SLURM's tasks become the ranks. Otherwise — the usual case under Snakemake, whose job step
      is ``srun -n1`` — the process is the only task: ``LightningEnvironment()`` again, and
      Lightning starts the other ranks itself on this node (with SLURM detection on, the single
      task would be taken for the whole world and only one of the job's GPUs would train);
    * ``"auto"`` / -1: left to Lightning.
    """
    from lightning.pytorch.plugins.environments import LightningEnvironment

    env = os.environ if environ is None else environ
    n = n_devices(devices)
    if n is None:
        return {"devices": devices, "strategy": "auto", "plugins": None}
    if n <= 1:
        return {"devices": devices, "strategy": "auto", "plugins": [LightningEnvironment()]}
    try:
        slurm_tasks = int(env.get("SLURM_NTASKS", "0"))
    except ValueError:
        slurm_tasks = 0
    if slurm_tasks == n:
        return {"devices": devices, "strategy": "ddp", "plugins": None}
    return {"devices": devices, "strategy": "ddp", "plugins": [LightningEnvironment()]}
