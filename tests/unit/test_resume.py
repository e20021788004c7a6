"""The shared resume pieces (cellstage.train.resume) and the devices / SLURM switch of the trainers.

The real-kill tests of each trainer live next to its other tests:
test_finetune.py / test_ssl.py / test_reduce.py ``test_*_killed_after_epoch_1_resumes_to_identical_weights``.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from cellstage.train import resume

SLURM_ONE_TASK = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "snakejob", "SLURM_PROCID": "0",
                  "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}


# ------------------------------------------------------------------------------- order and seeds
def test_epoch_sampler_order_is_a_function_of_seed_and_epoch_only():
    a, b = resume.EpochSampler(50, seed=3), resume.EpochSampler(50, seed=3)
    torch.manual_seed(0)
    a.set_epoch(2)
    first = list(a)
    torch.manual_seed(123)  # the global RNG plays no part
    b.set_epoch(2)
    assert list(b) == first and sorted(first) == list(range(50))
    b.set_epoch(3)
    assert list(b) != first
    assert list(resume.EpochSampler(50, seed=4, shuffle=True).order(2)) != first
    assert list(resume.EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_epoch_sampler_draws_when_iteration_starts_not_when_the_iterator_is_made():
    s = resume.EpochSampler(20, seed=0)
    it = iter(s)  # Lightning makes a resumed run's first iterator before set_epoch
    s.set_epoch(5)
    assert list(it) == s.order(5)


def test_loader_iterator_leaves_the_global_rng_alone():
    from torch.utils.data import DataLoader

    dl = DataLoader(list(range(10)), batch_size=4, sampler=resume.EpochSampler(10), generator=resume.loader_generator(0))
    torch.manual_seed(7)
    before = torch.get_rng_state()
    iter(dl)
    assert torch.equal(torch.get_rng_state(), before)


def test_reseed_sets_every_rng_from_seed_epoch_and_rank():
    resume.reseed(1, 4)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(10), np.random.rand(10), random.random()
    resume.reseed(1, 4)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
    resume.reseed(1, 5)
    assert not torch.equal(torch.rand(3), draws[0])
    resume.reseed(1, 4, rank=1)
    assert not torch.equal(torch.rand(3), draws[0])


def test_checkpointed_plateau_state_survives_a_checkpoint_loaded_before_the_optimiser_exists():
    p = torch.nn.Parameter(torch.zeros(1))
    plateau = resume.CheckpointedPlateau()
    plateau.attach(torch.optim.SGD([p], lr=1.0), factor=0.5, patience=1)
    for v in (1.0, 2.0, 2.0):
        plateau.step(v)
    ckpt: dict = {}
    plateau.save(ckpt)
    again = resume.CheckpointedPlateau()
    again.load(ckpt)  # Lightning restores the module before configure_optimizers
    sched = again.attach(torch.optim.SGD([p], lr=1.0), factor=0.5, patience=1)
    assert sched.state_dict() == plateau.scheduler.state_dict()
    assert sched.num_bad_epochs == 0 and sched.best == 1.0


# --------------------------------------------------------------------------------- checkpoints
def test_find_resumable_only_for_the_same_config(tmp_path, caplog):
    ck = tmp_path / "checkpoints" / "last.ckpt"
    cfg = {"lr": 1e-3, "seed": 0}
    assert resume.find_resumable(ck, cfg, what="t") is None  # nothing there: sidecar written
    assert json.loads(resume.sidecar_path(ck).read_text())["hash"] == resume.config_hash(cfg)
    ck.write_bytes(b"x")
    assert resume.find_resumable(ck, cfg, what="t") == str(ck)
    with caplog.at_level("WARNING", logger="cellstage.train"):
        assert resume.find_resumable(ck, {**cfg, "seed": 1}, what="t") is None
    assert "written with other arguments" in caplog.text and not ck.exists()
    ck.write_bytes(b"x")
    resume.sidecar_path(ck).unlink()
    with caplog.at_level("WARNING", logger="cellstage.train"):
        assert resume.find_resumable(ck, cfg, what="t") is None  # e.g. from an older cellstage
    assert "no readable sidecar" in caplog.text


# ----------------------------------------------------------------------------- devices / SLURM
@pytest.mark.parametrize("devices", [1, "1", [0]])
def test_one_device_gets_lightning_environment_even_inside_slurm(devices, monkeypatch):
    for k, v in SLURM_ONE_TASK.items():
        monkeypatch.setenv(k, v)
    kw = resume.device_kwargs(devices)
    assert kw["devices"] == devices and kw["strategy"] == "auto"
    assert isinstance(kw["plugins"][0], LightningEnvironment)
    if isinstance(devices, list):
        return  # a GPU index list; the CPU accelerator takes a count only
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", **kw, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, SingleDeviceStrategy)
    assert type(trainer._accelerator_connector.cluster_environment) is LightningEnvironment
    # without the plugin Lightning would have picked SLURMEnvironment in this job
    auto = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert isinstance(auto._accelerator_connector.cluster_environment, SLURMEnvironment)


def test_several_devices_in_snakemakes_single_task_step_use_ddp_launched_by_lightning(monkeypatch):
    for k, v in SLURM_ONE_TASK.items():
        monkeypatch.setenv(k, v)
    kw = resume.device_kwargs(2)
    assert kw["devices"] == 2 and kw["strategy"] == "ddp"
    assert isinstance(kw["plugins"][0], LightningEnvironment)
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", **kw, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert type(trainer.strategy.cluster_environment) is LightningEnvironment
    assert trainer.strategy.num_processes == 2  # Lightning starts the second rank itself


def test_several_devices_as_that_many_slurm_tasks_keep_lightnings_slurm_detection(monkeypatch):
    env = {**SLURM_ONE_TASK, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    kw = resume.device_kwargs(2)
    assert kw == {"devices": 2, "strategy": "ddp", "plugins": None}
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", **kw, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)


def test_device_count_parsing():
    assert resume.n_devices(1) == 1 and resume.n_devices("4") == 4 and resume.n_devices([0, 1]) == 2
    assert resume.n_devices("0,1,2") == 3 and resume.n_devices("auto") is None and resume.n_devices(-1) is None
    assert resume.device_kwargs("auto") == {"devices": "auto", "strategy": "auto", "plugins": None}


def test_trainers_take_their_devices_from_device_kwargs():
    """Each trainer builds its Trainer with **device_kwargs(devices) (no private copy of the rule)."""
    import importlib
    import inspect

    from cellstage.reduce import grader
    from cellstage.train import cv

    pretrain_mod = importlib.import_module("cellstage.ssl.pretrain")  # the package exports the function

    for fn in (cv.run_fold, pretrain_mod.pretrain, grader.train_grader):
        src = inspect.getsource(fn)
        assert "**device_kwargs(devices)" in src, fn.__name__
        assert "LightningEnvironment" not in src, fn.__name__


def test_stages_pass_devices_to_the_trainers(tmp_path, monkeypatch):
    from cellstage import stages

    seen = {}

    def fake(name):
        def f(*args, **kwargs):
            seen[name] = kwargs
            return {}
        return f

    import importlib

    import cellstage.crops
    import cellstage.io.omezarr
    import cellstage.reduce.grader
    import cellstage.train.cv

    monkeypatch.setattr(cellstage.train.cv, "run_fold", fake("finetune"))
    monkeypatch.setattr(importlib.import_module("cellstage.ssl.pretrain"), "pretrain", fake("pretrain"))
    monkeypatch.setattr(cellstage.reduce.grader, "train_grader", fake("grader"))
    monkeypatch.setattr(cellstage.io.omezarr, "ZarrSlide", lambda p: p)
    monkeypatch.setattr(cellstage.crops, "crops_at_points", lambda s, x, y, size: np.zeros((len(x), size, size, 3), np.uint8))

    exp = {"backbone": "resnet18", "scan": "20x", "background": True, "distance": False}
    stages.finetune(train=[], test=[], pretrained=None, out_metrics=tmp_path / "f" / "metrics.json", fold=0,
                    experiment=exp, finetune={}, scans={"20x": {"crop_size": 40}}, classes=["A", "B"],
                    static_classes=["A"], devices=3)
    stages.pretrain("simclr-resnet18-20x", [], [], [], tmp_path / "p" / "backbone.safetensors", pretrain={},
                    scans={"20x": {"crop_size": 40}}, devices=3)
    grades = tmp_path / "g.csv"
    pd.DataFrame({"x": [1, 2], "y": [1, 2], "grade": [1, 6]}).to_csv(grades, index=False)
    stages.train_grader(["slide"], [grades], tmp_path / "grader", grading={}, size=16, devices=3)
    assert seen["finetune"]["devices"] == seen["pretrain"]["devices"] == seen["grader"]["devices"] == 3
    # the grader's checkpoint is kept outside its directory() output, which Snakemake deletes on failure
    assert seen["grader"]["checkpoint_dir"] == tmp_path / "grader.checkpoints"
