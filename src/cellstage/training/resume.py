"""Resume after a kill, bit-identically: the pieces shared by every Lightning trainer of cellstage.

Fine-tuning (:func:`cellstage.train.cv.run_fold`), SSL pretraining
(:func:`cellstage.ssl.pretrain.pretrain`) and the grading network
(:func:`cellstage.reduce.grader.train_grader`) all train through
:func:`cellstage.training.fit.fit_resumable`, which wires up:

* :class:`EpochCheckpoint` — after every epoch the full Lightning checkpoint (weights, optimiser,
  loop counters, callback states, the module's own extra state, and a resume stamp
  ``{"hash", "epochs_done"}``) is written crash-safely (issue 15, item 2): to a temp file private
  to the process (``last.ckpt.<host>-<pid>-<random>.tmp``, so two copies of a job never share
  one), fsynced, its sha256 recorded in the sidecar ``last.json`` (``{"hash", "config_hash",
  "inputs", "config", "epochs_done", "sha256", "sha256_previous"}``, itself written the same
  way), then renamed onto ``last.ckpt`` and the folder fsynced.
* :func:`resumable_checkpoint` (and :func:`find_resumable`) — content-keyed resume (issue 15,
  item 1): the checkpoint is resumed only when its sidecar carries :func:`resume_key` of the
  current arguments *and* of the content of the trainer's input files (:func:`content_hash`:
  sha256 of the bytes, zarr stores walked in sorted order), its bytes match the recorded
  sha256, it loads with ``torch.load(weights_only=True)`` (nothing on disk is unpickled) and it
  has no more epochs done than the run is configured for. A damaged checkpoint is set aside as
  ``last.ckpt.corrupt-<UTC time>``, a stale one deleted; either way a log line says why and
  training starts afresh. Temp files of killed runs are removed first.
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

Damage, changed inputs, lowered ``epochs`` and removal after success are tested for every trainer
in tests/unit/test_resume_safety.py.

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
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch.utils.data import Sampler

from ..utils import CellstageError, clean_stale_temporaries, temp_owner

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


# ------------------------------------------------------------------- content of the inputs
_CHUNK = 1 << 20


def _feed(h, path: Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
            n += len(block)
    return n


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    _feed(h, Path(path))
    return h.hexdigest()


def path_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of one input's content: a file's bytes, or — for a directory such as a zarr
    store — every file below it in sorted order, each as its relative path, size and bytes (so a
    renamed chunk or a moved byte changes the hash). Raises :class:`CellstageError` if missing."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        h.update(b"file\0")
        _feed(h, p)
    elif p.is_dir():
        h.update(b"dir\0")
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                f = Path(root, name)
                h.update(f"{f.relative_to(p).as_posix()}\0{f.stat().st_size}\0".encode())
                _feed(h, f)
    else:
        raise CellstageError(
            f"{p}: a training input to hash for the resume check does not exist (the trainer reads it; check the path)"
        )
    return h.hexdigest()


def input_hashes(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{path: path_hash(path)}`` for the distinct ``paths``, in sorted order."""
    return {p: path_hash(p) for p in sorted({str(p) for p in paths})}


def content_hash(paths: Iterable[str | os.PathLike]) -> str:
    """One sha256 (hex) over the content of every input in ``paths`` (files or directories such as
    zarr stores; :func:`path_hash`); the order and repetition of ``paths`` do not matter."""
    return _digest(input_hashes(paths))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------ checkpoints
RESUME_KEY = "cellstage_resume"  # in the checkpoint: {"hash", "epochs_done"} (what resuming trusts)


def config_hash(config: Mapping) -> str:
    return _digest(config)[:16]


def resume_key(config: Mapping, inputs: Mapping[str, str] | None = None) -> str:
    """What a checkpoint must carry to be resumed: a hash of the arguments and, when the trainer
    names its input files, of their content (:func:`input_hashes`)."""
    if not inputs:
        return config_hash(config)  # no files named: the arguments alone (as before inputs were hashed)
    return _digest({"config": config_hash(config), "inputs": dict(inputs)})[:16]


def _jsonable(config: Mapping) -> dict:
    """``config`` as the sidecar stores it (values JSON cannot hold become their ``str``)."""
    return json.loads(json.dumps(dict(config), default=str))


def sidecar_path(ckpt: str | os.PathLike) -> Path:
    return Path(ckpt).with_suffix(SIDECAR_SUFFIX)


def read_sidecar(ckpt: str | os.PathLike) -> dict:
    try:
        meta = json.loads(sidecar_path(ckpt).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def temp_name(path: str | os.PathLike) -> Path:
    """A temporary sibling of ``path`` private to this process: ``<name>.<host>-<pid>-<random>.tmp``
    (two copies of one job never write the same temp file)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{temp_owner()}{secrets.token_hex(4)}.tmp")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry (a rename) to disk where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_durable(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a private temp file, fsync it, rename it onto ``path``, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _write_sidecar(ckpt: Path, meta: Mapping) -> None:
    write_durable(sidecar_path(ckpt), (json.dumps(meta, indent=2) + "\n").encode())


def clean_temporaries(ckpt: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed runs left beside ``ckpt`` and its sidecar; returns them.

    The rule is :func:`cellstage.utils.clean_stale_temporaries`'s (kept: another live writer's
    on this host, other hosts' younger than :data:`cellstage.utils.STALE_TEMP_S`), for the
    checkpoint writer's ``<name>.<owner>.tmp`` files and :func:`~cellstage.utils.atomic_path`'s
    ``.<name>.<owner>.tmp`` folders. Also removed: ``<name>.tmp`` of older cellstage versions.
    """
    ckpt = Path(ckpt)
    if not ckpt.parent.is_dir():
        return []
    removed = []
    for base in (ckpt, sidecar_path(ckpt)):
        removed += clean_stale_temporaries(base, hidden=False) + clean_stale_temporaries(base, hidden=True)
        legacy = base.with_name(base.name + ".tmp")
        if legacy.is_file():
            legacy.unlink(missing_ok=True)
            removed.append(legacy)
    return removed


@dataclass
class Resumable:
    """A verified checkpoint: ``path``, ``epochs_done`` (stored inside it) and its ``sha256``."""

    path: str
    epochs_done: int
    sha256: str


def _is_rank_zero() -> bool:
    """False in the other DDP ranks (they read the same files; only rank 0 changes them)."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0


def _stale_reason(meta: Mapping, config: Mapping, inputs: Mapping[str, str], key: str) -> str | None:
    """Why a checkpoint with sidecar ``meta`` does not belong to this run (None: it does)."""
    if not meta:
        return "has no readable sidecar"
    if meta.get("hash") == key:
        return None
    reasons = []
    old_config, new_config = meta.get("config"), _jsonable(config)
    if "config_hash" in meta:
        config_differs = meta["config_hash"] != config_hash(config)
    else:  # an older sidecar: compare the stored arguments themselves when there are any
        config_differs = not isinstance(old_config, dict) or old_config != new_config
    if config_differs:
        changed = ""
        if isinstance(old_config, dict):
            keys = sorted(k for k in {*old_config, *new_config} if old_config.get(k) != new_config.get(k))
            changed = f" ({', '.join(keys)})" if keys else ""
        reasons.append(f"was written with other arguments{changed}")
    old_inputs = meta.get("inputs")
    if isinstance(old_inputs, dict) and old_inputs != dict(inputs):
        changed = sorted(p for p in {*old_inputs, *inputs} if old_inputs.get(p) != inputs.get(p))
        reasons.append("was written from inputs whose content has changed since: " + ", ".join(changed))
    elif not isinstance(old_inputs, dict) and inputs:
        reasons.append("carries no hash of its inputs' content (an older cellstage)")
    return " and ".join(reasons) or "was written with other arguments"


def _set_aside(ckpt: Path, why: str, what: str) -> Path:
    """Rename a damaged checkpoint to ``<name>.corrupt-<UTC time>`` (kept for inspection), drop its
    sidecar and log where it went."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = ckpt.with_name(f"{ckpt.name}.corrupt-{stamp}")
    if dest.exists():
        dest = ckpt.with_name(f"{dest.name}-{os.getpid()}-{secrets.token_hex(2)}")
    os.replace(ckpt, dest)
    sidecar_path(ckpt).unlink(missing_ok=True)
    fsync_dir(ckpt.parent)
    log.warning("%s: checkpoint %s %s; set aside as %s, training starts afresh", what, ckpt, why, dest)
    return dest


def _verify(ckpt: Path, meta: Mapping, key: str, what: str, *, rank_zero: bool) -> Resumable | str | None:
    """The checkpoint if its bytes match the sidecar's sha256 and it loads with
    ``torch.load(weights_only=True)``; else it is set aside (None) — or a reason string when it is
    intact but was written for another run."""
    sha = file_sha256(ckpt)
    expected = {meta.get("sha256"), meta.get("sha256_previous")} - {None}
    if sha not in expected:
        why = (
            f"has sha256 {sha[:16]}…, not the {meta['sha256'][:16]}… its sidecar records (truncated or damaged)"
            if meta.get("sha256")
            else "has no sha256 in its sidecar"
        )
        if rank_zero:
            _set_aside(ckpt, why, what)
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        stamp = state[RESUME_KEY]
        epochs_done = int(stamp["epochs_done"])
        written_for = stamp["hash"]
        del state
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is set aside, not fatal
        why = f"fails to load with torch.load(weights_only=True) ({type(e).__name__}: {str(e)[:300]})"
        if rank_zero:
            _set_aside(ckpt, why, what)
        return None
    if written_for != key:
        return "was written with other arguments (its own resume hash differs from the sidecar's)"
    return Resumable(str(ckpt), epochs_done, sha)


def resumable_checkpoint(
    ckpt: str | os.PathLike,
    config: Mapping,
    *,
    what: str,
    inputs: Mapping[str, str] | None = None,
    epochs: int | None = None,
) -> Resumable | None:
    """The checkpoint at ``ckpt`` if this run may resume from it, else ``None`` (training starts afresh).

    Resumed only if all hold, otherwise the reason is logged:

    * its sidecar carries :func:`resume_key` of ``config`` and ``inputs`` (``{path: content hash}``,
      :func:`input_hashes`) — else the checkpoint is deleted (log: which arguments or which inputs
      changed);
    * its bytes have the sha256 recorded in the sidecar and it loads with
      ``torch.load(weights_only=True)`` (no unpickling of arbitrary objects) — else it is set aside
      as ``<name>.corrupt-<UTC time>`` (log: the new path);
    * it has at most ``epochs`` epochs done — a run never continues past its configured epoch
      count (lowering ``epochs`` trains afresh instead of exporting a longer-trained model).

    First, temp files left by killed runs are removed (:func:`clean_temporaries`). Whenever
    ``None`` is returned, a sidecar for this run (``epochs_done`` 0) is written. In DDP ranks
    other than 0 nothing is changed on disk.
    """
    ckpt = Path(ckpt)
    inputs = dict(inputs or {})
    key = resume_key(config, inputs)
    rank_zero = _is_rank_zero()
    if rank_zero:
        for p in clean_temporaries(ckpt):
            log.info("%s: removed %s, left by a killed run", what, p)
    if ckpt.is_file():
        meta = read_sidecar(ckpt)
        reason = _stale_reason(meta, config, inputs, key)
        if reason is None:
            found = _verify(ckpt, meta, key, what, rank_zero=rank_zero)
            if isinstance(found, Resumable):
                if epochs is None or found.epochs_done <= int(epochs):
                    log.info(
                        "%s: resuming from %s (%d epoch(s) done, sha256 %s…)",
                        what,
                        ckpt,
                        found.epochs_done,
                        found.sha256[:16],
                    )
                    return found
                reason = (
                    f"has {found.epochs_done} epochs done, more than the {int(epochs)} configured "
                    "(a run never continues past its epoch count)"
                )
            else:
                reason = found
        if reason is not None:
            log.warning("%s: %s %s; ignoring it and starting afresh", what, ckpt, reason)
    if rank_zero:
        for p in (ckpt, sidecar_path(ckpt)):
            p.unlink(missing_ok=True)
        _write_sidecar(ckpt, {**checkpoint_meta(config, inputs), "epochs_done": 0, "sha256": None})
    return None


def find_resumable(
    ckpt: str | os.PathLike,
    config: Mapping,
    *,
    what: str,
    inputs: Mapping[str, str] | None = None,
    epochs: int | None = None,
) -> str | None:
    """``str(ckpt)`` if :func:`resumable_checkpoint` accepts it, else ``None``."""
    found = resumable_checkpoint(ckpt, config, what=what, inputs=inputs, epochs=epochs)
    return found.path if found is not None else None


def checkpoint_meta(config: Mapping, inputs: Mapping[str, str] | None = None) -> dict:
    """The sidecar's description of a run: its resume hash, the arguments and the inputs' hashes."""
    inputs = dict(inputs or {})
    return {
        "hash": resume_key(config, inputs),
        "config_hash": config_hash(config),
        "inputs": inputs,
        "config": _jsonable(config),
    }


def remove_checkpoint(ckpt: str | os.PathLike) -> None:
    """Delete ``ckpt``, its sidecar and the temp files killed runs left (set-aside
    ``*.corrupt-*`` files are kept)."""
    ckpt = Path(ckpt)
    clean_temporaries(ckpt)
    for p in (ckpt, sidecar_path(ckpt)):
        p.unlink(missing_ok=True)


class EpochCheckpoint(Checkpoint):
    """Full checkpoint at the end of every ``every``-th epoch, written crash-safely; 0 = never.

    A ``Checkpoint`` subclass, so Lightning runs it after the LightningModule's and the other
    callbacks' ``on_train_epoch_end`` (their end-of-epoch state is in the file). Each save:

    1. the checkpoint, with ``{"hash", "epochs_done"}`` under :data:`RESUME_KEY`, goes to a temp
       file private to this process (:func:`temp_name`) and is fsynced;
    2. the sidecar — :func:`checkpoint_meta`, ``epochs_done``, the new file's ``sha256`` and the
       previous one's (``sha256_previous``) — replaces the old one (fsynced);
    3. the temp file is renamed onto ``path`` and the folder fsynced.

    A kill between 2 and 3 leaves the previous checkpoint beside a sidecar that still accepts it
    (``sha256_previous``); its own ``epochs_done`` says where it stands.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: Mapping,
        every: int = 1,
        *,
        inputs: Mapping[str, str] | None = None,
        previous_sha256: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.every = int(every)
        self.meta = checkpoint_meta(config, inputs)
        self.sha256 = previous_sha256
        self._saving: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._saving is not None:
            checkpoint[RESUME_KEY] = {"hash": self.meta["hash"], "epochs_done": self._saving}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every <= 0 or (trainer.current_epoch + 1) % self.every:
            return
        done = int(trainer.current_epoch) + 1
        tmp = temp_name(self.path)
        self._saving = done
        try:
            # the full training state (a save, not a load); every rank calls it, rank 0 writes
            trainer.save_checkpoint(str(tmp), weights_only=False)
        finally:
            self._saving = None
        if not trainer.is_global_zero:
            return
        try:
            fsync_file(tmp)
            sha = file_sha256(tmp)
            _write_sidecar(self.path, {**self.meta, "epochs_done": done, "sha256": sha, "sha256_previous": self.sha256})
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            self.sha256 = sha
        finally:
            tmp.unlink(missing_ok=True)


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
