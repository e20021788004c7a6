"""Resume safety (issue 15, items 1-2): content-keyed resume and crash-safe checkpoints.

Every trainer (fine-tuning, SSL pretraining, the grader) is interrupted for real after its
epoch-0 checkpoint (an exception raised at the first batch of epoch 1 stops ``Trainer.fit``; the
files on disk are then what a kill at that moment leaves), its checkpoint is damaged or one of its
inputs rewritten, and the rerun must start afresh, say why, finish, and leave no checkpoint. The
mechanics shared by all three (sha256 in the sidecar, set-aside files, ``weights_only=True``,
temp-file cleanup, the previous checkpoint after a kill between the two renames) are checked on a
two-parameter LightningModule through :func:`cellstage.training.fit.fit_resumable`. Sizes are
tiny: each test takes seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cellstage import utils
from cellstage.training import resume
from cellstage.training.fit import fit_resumable
from cellstage.utils import CellstageError

SRC = Path(__file__).resolve().parents[2] / "src"


class Interrupted(Exception):
    """Raised at the first batch of epoch ``k``: checkpoints of epochs 0..k-1 are on disk."""


@pytest.fixture
def interrupt_at(monkeypatch):
    def arm(epoch: int):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == epoch and batch_idx == 0:
                raise Interrupted(f"stopped in epoch {epoch}")

        monkeypatch.setattr(resume.EpochCheckpoint, "on_train_batch_end", on_train_batch_end, raising=False)

    def disarm():
        monkeypatch.delattr(resume.EpochCheckpoint, "on_train_batch_end", raising=False)

    arm.disarm = disarm
    return arm


# ------------------------------------------------------------------------- the three trainers
@pytest.fixture
def finetune(tmp_path):
    from test_finetune import make_crop_source

    from cellstage.train import run_fold
    from cellstage.training.backbones import create_backbone, save_weights

    d = tmp_path / "ft_crops"
    d.mkdir()
    train = [make_crop_source(d, "s1_20x", n_per_class=3, n_unlabelled=0, seed=1)]
    torch.manual_seed(0)
    weights = d / "backbone.safetensors"
    save_weights(create_backbone("resnet18", img_size=40), weights)
    out = tmp_path / "ft" / "fold0"

    def run(epochs: int):
        return run_fold(
            train,
            [],
            out,
            fold=0,
            n_folds=2,
            batch_size=16,
            recipe={"name": "baseline", "epochs": epochs},
            pretrained_path=weights,
            progress=False,
            accelerator="cpu",
            num_threads=1,
        )

    return {"run": run, "ckpt": out / "checkpoints" / "last.ckpt", "out": out, "weights": weights, "train": train}


@pytest.fixture
def pretrain_run(tmp_path):
    from test_ssl import write_crop_source

    from cellstage.ssl import pretrain

    d = tmp_path / "ssl_crops"
    d.mkdir()
    src = write_crop_source(d, n=12)
    out = tmp_path / "ssl"

    def run(epochs: int):
        return pretrain(
            "simclr",
            "resnet18",
            [src],
            out,
            img_size=40,
            batch_size=6,
            epochs=epochs,
            progress=False,
            accelerator="cpu",
        )

    return {"run": run, "ckpt": out / "last.ckpt", "out": out, "source": src}


@pytest.fixture
def grader(tmp_path):
    from test_reduce import synthetic_graded

    from cellstage.reduce import train_grader

    crops, grades = synthetic_graded(n_per=4, size=16)
    out = tmp_path / "grader"
    data = {"crops": crops, "grades": grades}

    def run(epochs: int):
        return train_grader(
            data["crops"], data["grades"], out, epochs=epochs, batch_size=6, progress=False, accelerator="cpu"
        )

    return {"run": run, "ckpt": out / "checkpoints" / "last.ckpt", "out": out, "data": data}


TRAINERS = ["finetune", "pretrain_run", "grader"]


def _resumed_from(result: dict):
    return result.get("resumed_from_epoch")


def _interrupted_after_epoch_0(t: dict, interrupt_at, epochs: int = 2) -> None:
    interrupt_at(1)
    with pytest.raises(Interrupted):
        t["run"](epochs)
    interrupt_at.disarm()
    meta = resume.read_sidecar(t["ckpt"])
    assert t["ckpt"].is_file() and meta["epochs_done"] == 1
    assert meta["sha256"] == resume.file_sha256(t["ckpt"])


def _no_checkpoint_left(t: dict) -> None:
    ck = t["ckpt"]
    assert not ck.exists() and not resume.sidecar_path(ck).exists()
    assert not list(ck.parent.glob("*.tmp")) if ck.parent.exists() else True


@pytest.mark.parametrize("trainer", TRAINERS)
def test_truncated_checkpoint_is_set_aside_and_training_restarts(trainer, request, interrupt_at, caplog):
    t = request.getfixturevalue(trainer)
    _interrupted_after_epoch_0(t, interrupt_at)
    data = t["ckpt"].read_bytes()
    t["ckpt"].write_bytes(data[: len(data) // 2])  # a half-written file beside a valid sidecar
    with caplog.at_level("INFO", logger="cellstage.train"):
        res = t["run"](2)
    assert _resumed_from(res) is None
    m = re.search(
        r"checkpoint (\S+) has sha256 \S+, not the \S+ its sidecar records \(truncated or damaged\); "
        r"set aside as (\S+), training starts afresh",
        caplog.text,
    )
    assert m and m[1] == str(t["ckpt"]) and ".corrupt-" in m[2], caplog.text
    if trainer != "finetune":  # fine-tuning deletes its whole checkpoints/ folder after success
        assert Path(m[2]).read_bytes() == data[: len(data) // 2]
    _no_checkpoint_left(t)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_changed_input_between_kill_and_rerun_starts_fresh(trainer, request, interrupt_at, caplog):
    import zarr

    t = request.getfixturevalue(trainer)
    _interrupted_after_epoch_0(t, interrupt_at)
    if trainer == "finetune":  # the pretrained weights file is regenerated
        from cellstage.training.backbones import create_backbone, save_weights

        torch.manual_seed(1)
        save_weights(create_backbone("resnet18", img_size=40), t["weights"])
        changed = str(t["weights"])
    elif trainer == "pretrain_run":  # one pixel of the crop store is rewritten (same index)
        z = zarr.open_group(t["source"][0], mode="r+")
        z["images"][0, 0, 0, 0] = (int(z["images"][0, 0, 0, 0]) + 1) % 256
        changed = t["source"][0]
    else:  # the grader gets its crops in memory: one grade differs
        t["data"]["grades"] = t["data"]["grades"].copy()
        t["data"]["grades"][0] = 1 if t["data"]["grades"][0] != 1 else 2
        changed = "data"
    with caplog.at_level("WARNING", logger="cellstage.train"):
        res = t["run"](2)
    assert _resumed_from(res) is None
    assert f"{t['ckpt']} " in caplog.text and "starting afresh" in caplog.text
    if trainer == "grader":
        assert "written with other arguments (data)" in caplog.text
    else:
        assert f"inputs whose content has changed since: {changed}" in caplog.text, caplog.text
    _no_checkpoint_left(t)


def test_lowering_epochs_never_resumes_past_the_count(pretrain_run, interrupt_at, caplog):
    """Pretraining leaves ``epochs`` out of its resume key (a run may be continued to more epochs), so
    the epoch-count rule is what stops it; fine-tuning and the grader have ``epochs`` in their key
    (a lowered count is "other arguments")."""
    t = pretrain_run
    interrupt_at(2)
    with pytest.raises(Interrupted):
        t["run"](3)  # epochs 0 and 1 checkpointed
    interrupt_at.disarm()
    with caplog.at_level("WARNING", logger="cellstage.train"):
        res = t["run"](1)
    assert _resumed_from(res) is None
    assert "has 2 epochs done, more than the 1 configured" in caplog.text
    assert res["epochs"] == 1 and len(pd.read_csv(t["out"] / "history.csv")) == 1
    _no_checkpoint_left(t)


# ------------------------------------------------------------------ the shared mechanics, tiny
class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, epochs, *, inputs=(), config=None):
    loader = DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return fit_resumable(
            Tiny(),
            train_loader=loader,
            ckpt_path_last=tmp_path / "ck" / "last.ckpt",
            resume_config=config or {"x": 1},
            inputs=inputs,
            epochs=epochs,
            seed=0,
            accelerator="cpu",
            deterministic=True,
            progress=False,
            default_root_dir=tmp_path,
        )
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def test_sidecar_records_sha256_inputs_and_the_checkpoint_its_resume_stamp(tmp_path):
    inp = tmp_path / "index.parquet"
    inp.write_bytes(b"rows")
    fit = _fit(tmp_path, 2, inputs=[inp])
    ck = fit.last
    meta = resume.read_sidecar(ck)
    assert meta["sha256"] == resume.file_sha256(ck) and meta["epochs_done"] == 2
    assert meta["inputs"] == {str(inp): resume.path_hash(inp)}
    state = torch.load(ck, map_location="cpu", weights_only=True)
    assert state[resume.RESUME_KEY] == {"hash": meta["hash"], "epochs_done": 2}
    again = _fit(tmp_path, 3, inputs=[inp])
    assert again.resumed_from == 2 and again.trainer.current_epoch == 3


def test_fit_resumable_never_continues_past_epochs(tmp_path, caplog):
    _fit(tmp_path, 3)
    with caplog.at_level("WARNING", logger="cellstage.train"):
        fit = _fit(tmp_path, 2)
    assert not fit.resumed and fit.trainer.current_epoch == 2
    assert "has 3 epochs done, more than the 2 configured" in caplog.text
    assert resume.read_sidecar(fit.last)["epochs_done"] == 2


def test_a_flipped_byte_is_a_sha_mismatch_and_is_set_aside(tmp_path, caplog):
    ck = _fit(tmp_path, 1).last
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte differs
    ck.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="cellstage.train"):
        fit = _fit(tmp_path, 2)
    assert not fit.resumed and fit.trainer.current_epoch == 2
    (aside,) = ck.parent.glob("last.ckpt.corrupt-*")
    assert aside.read_bytes() == bytes(data) and f"set aside as {aside}" in caplog.text
    assert "not the" in caplog.text and "its sidecar records" in caplog.text


def test_a_checkpoint_that_fails_to_load_is_set_aside(tmp_path, caplog):
    ck = _fit(tmp_path, 1).last
    ck.write_bytes(b"not a checkpoint")
    meta = resume.read_sidecar(ck)
    resume.write_durable(resume.sidecar_path(ck), json.dumps({**meta, "sha256": resume.file_sha256(ck)}).encode())
    with caplog.at_level("WARNING", logger="cellstage.train"):
        fit = _fit(tmp_path, 1)
    assert not fit.resumed
    assert "fails to load with torch.load(weights_only=True)" in caplog.text
    assert len(list(ck.parent.glob("last.ckpt.corrupt-*"))) == 1


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CELLSTAGE_TEST_MARKER"]),))


def test_resume_never_unpickles_objects(tmp_path, caplog, monkeypatch):
    """A checkpoint that would run code when unpickled (valid sha256, right stamp) is refused."""
    ck = _fit(tmp_path, 1).last
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("CELLSTAGE_TEST_MARKER", str(marker))
    state = torch.load(ck, map_location="cpu", weights_only=True)
    state["payload"] = _Payload()
    torch.save(state, ck)
    meta = resume.read_sidecar(ck)
    resume.write_durable(resume.sidecar_path(ck), json.dumps({**meta, "sha256": resume.file_sha256(ck)}).encode())
    with caplog.at_level("WARNING", logger="cellstage.train"):
        fit = _fit(tmp_path, 1)
    assert not fit.resumed and not marker.exists()
    assert "fails to load with torch.load(weights_only=True)" in caplog.text


def test_kill_between_sidecar_and_rename_resumes_the_previous_checkpoint(tmp_path):
    ck = _fit(tmp_path, 1).last
    first = ck.read_bytes()
    _fit(tmp_path, 2)  # sidecar: sha256 of epoch 2's file, sha256_previous of epoch 1's
    ck.write_bytes(first)  # the rename of epoch 2's file never happened
    fit = _fit(tmp_path, 3)
    assert fit.resumed and fit.resumed_from == 1 and fit.trainer.current_epoch == 3


def test_changed_input_and_arguments_are_named_in_the_log(tmp_path, caplog):
    a, b = tmp_path / "a.parquet", tmp_path / "b.zarr"
    a.write_bytes(b"a")
    (b / "c").mkdir(parents=True)
    (b / "c" / "0").write_bytes(b"chunk")
    _fit(tmp_path, 1, inputs=[a, b])
    (b / "c" / "0").write_bytes(b"chunK")
    with caplog.at_level("WARNING", logger="cellstage.train"):
        assert not _fit(tmp_path, 1, inputs=[a, b]).resumed
    assert f"inputs whose content has changed since: {b};" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cellstage.train"):
        assert not _fit(tmp_path, 1, inputs=[a, b], config={"x": 2}).resumed
    assert "written with other arguments (x)" in caplog.text


def test_leftover_temp_files_are_cleaned_but_a_live_writers_are_kept(tmp_path):
    ck = tmp_path / "ck" / "last.ckpt"
    ck.parent.mkdir()
    host = utils._HOST
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)  # a process that has exited
    stale = [
        ck.with_name(f"last.ckpt.{host}-{dead_pid}-0a1b2c3d.tmp"),
        ck.with_name(f"last.json.{host}-{dead_pid}-0a1b2c3d.tmp"),
        ck.with_name("last.ckpt.tmp"),
    ]
    live = ck.with_name(f"last.ckpt.{host}-{os.getppid()}-0a1b2c3d.tmp")  # pytest's parent: alive
    for p in (*stale, live):
        p.write_bytes(b"partial")
    fit = _fit(tmp_path, 1)
    assert not fit.resumed and not any(p.exists() for p in stale) and live.exists()
    assert sorted(p.name for p in ck.parent.iterdir()) == sorted(["last.ckpt", "last.json", live.name])


def test_temp_names_are_private_to_the_process():
    a, b = resume.temp_name("/x/last.ckpt"), resume.temp_name("/x/last.ckpt")
    assert a != b and a.name.startswith(f"last.ckpt.{utils._HOST}-{os.getpid()}-") and a.suffix == ".tmp"


def test_content_hash_reads_bytes_of_files_and_zarr_directories(tmp_path):
    import zarr

    z = tmp_path / "crops.zarr"
    g = zarr.open_group(str(z), mode="w")
    g.create_array("images", data=np.zeros((4, 8, 8, 3), np.uint8), chunks=(2, 8, 8, 3))
    p = tmp_path / "index.parquet"
    pd.DataFrame({"row": [0, 1]}).to_parquet(p)
    h = resume.content_hash([z, p])
    assert h == resume.content_hash([p, z, p])  # order and repeats do not matter
    g["images"][3, 0, 0, 0] = 1  # one byte in the second chunk
    assert resume.content_hash([z, p]) != h
    h2 = resume.content_hash([z, p])
    os.utime(p, (0, 0))  # touching is not a change of content
    assert resume.content_hash([z, p]) == h2
    with pytest.raises(CellstageError, match="missing.parquet: a training input"):
        resume.content_hash([tmp_path / "missing.parquet"])


def test_no_unsafe_loading_in_src():
    """`grep -rn "weights_only=False\\|pickle" src/` finds nothing that reads files from disk."""
    hits = subprocess.run(
        ["grep", "-rn", r"weights_only=False\|pickle", str(SRC / "cellstage")], capture_output=True, text=True
    ).stdout.splitlines()
    reads = [
        h for h in hits if "weights_only=False" in h and "torch.load" in h or "pickle.load" in h or "import pickle" in h
    ]
    assert not reads, reads
    for h in hits:  # what may remain: the checkpoint *save* (full state) and prose about in-memory pickling
        assert "weights_only=False" not in h or "save_checkpoint(" in h, h
    loads = subprocess.run(
        ["grep", "-rn", r"torch\.load(", str(SRC / "cellstage")], capture_output=True, text=True
    ).stdout.splitlines()
    assert loads and all("weights_only=True" in h for h in loads), loads
