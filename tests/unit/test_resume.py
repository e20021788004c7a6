"""The shared resume pieces (cellstage.training.resume), the one Trainer path
(cellstage.training.fit.fit_resumable) and the devices / SLURM switch of the trainers.

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

from cellstage.training import resume

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

    dl = DataLoader(list(range(10)), batch_size=4, sampler=resume.EpochSampler(10),
                    generator=resume.loader_generator(0))
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
def _stamped_checkpoint(ck, cfg, epochs_done=1):
    """A checkpoint as EpochCheckpoint writes it: resume stamp inside, its sha256 in the sidecar."""
    torch.save({resume.RESUME_KEY: {"hash": resume.resume_key(cfg), "epochs_done": epochs_done}}, ck)
    meta = {**resume.checkpoint_meta(cfg), "epochs_done": epochs_done, "sha256": resume.file_sha256(ck)}
    resume.write_durable(resume.sidecar_path(ck), json.dumps(meta).encode())


def test_find_resumable_only_for_the_same_config(tmp_path, caplog):
    ck = tmp_path / "checkpoints" / "last.ckpt"
    cfg = {"lr": 1e-3, "seed": 0}
    assert resume.find_resumable(ck, cfg, what="t") is None  # nothing there: sidecar written
    assert json.loads(resume.sidecar_path(ck).read_text())["hash"] == resume.config_hash(cfg)
    _stamped_checkpoint(ck, cfg)
    assert resume.find_resumable(ck, cfg, what="t") == str(ck)
    with caplog.at_level("WARNING", logger="cellstage.train"):
        assert resume.find_resumable(ck, {**cfg, "seed": 1}, what="t") is None
    assert "written with other arguments (seed)" in caplog.text and not ck.exists()
    _stamped_checkpoint(ck, cfg)
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


def _tiny_trainer_runs(tmp_path, devices):
    """Run fine-tuning, SSL pretraining and the grader for 2 epochs each on tiny data."""
    from test_finetune import make_crop_source
    from test_reduce import synthetic_graded
    from test_ssl import write_crop_source

    from cellstage.reduce import train_grader
    from cellstage.ssl import pretrain
    from cellstage.train import run_fold

    d = tmp_path / "crops"
    d.mkdir()
    train = [make_crop_source(d, "s1_20x", n_per_class=4, seed=1)]
    common = dict(epochs=2, progress=False, accelerator="cpu", devices=devices)
    yield "finetune", lambda: run_fold(train, [], tmp_path / "ft" / "fold0", fold=0, n_folds=2, batch_size=16,
                                       recipe={"name": "baseline", "epochs": 2}, progress=False,
                                       accelerator="cpu", devices=devices)
    src = write_crop_source(d, n=16)
    yield "pretrain", lambda: pretrain("simclr", "resnet18", [src], tmp_path / "ssl", img_size=40, batch_size=8,
                                       **common)
    crops, grades = synthetic_graded(n_per=4, size=16)
    yield "grader", lambda: train_grader(crops, grades, tmp_path / "grader", batch_size=8, **common)


def test_every_trainer_builds_its_trainer_in_fit_resumable_and_checkpoints_every_epoch(tmp_path, monkeypatch):
    """At run time: each trainer constructs ``lightning.Trainer`` only inside
    ``cellstage.training.fit`` (with the devices / strategy / plugins of ``device_kwargs``), and a
    checkpoint with its sidecar is written after every epoch."""
    import inspect

    from lightning.pytorch.trainer.trainer import Trainer

    built, saved = [], []
    init = Trainer.__init__

    def recording_init(self, *args, **kwargs):
        caller = inspect.stack()[1].frame.f_globals.get("__name__")
        built.append((caller, kwargs))
        init(self, *args, **kwargs)

    epoch_end = resume.EpochCheckpoint.on_train_epoch_end

    def recording_epoch_end(self, trainer, pl_module):
        epoch_end(self, trainer, pl_module)
        saved.append((trainer.current_epoch, self.path.is_file(), resume.read_sidecar(self.path).get("epochs_done")))

    monkeypatch.setattr(Trainer, "__init__", recording_init)
    monkeypatch.setattr(resume.EpochCheckpoint, "on_train_epoch_end", recording_epoch_end)
    for name, run in _tiny_trainer_runs(tmp_path, devices=1):
        built.clear()
        saved.clear()
        run()
        assert [c for c, _ in built] == ["cellstage.training.fit"], name
        kw = built[0][1]
        assert kw["devices"] == 1 and kw["strategy"] == "auto", name
        assert [type(p) for p in kw["plugins"]] == [LightningEnvironment], name
        assert saved == [(0, True, 1), (1, True, 2)], name


def test_fit_resumable_restores_torchs_deterministic_flag(tmp_path):
    """The Trainer turns deterministic algorithms on for the fit; afterwards the caller's setting is back."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from cellstage.training.fit import fit_resumable

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(False)
    try:
        fit = fit_resumable(Tiny(), train_loader=loader, ckpt_path_last=tmp_path / "last.ckpt",
                            resume_config={"x": 1}, epochs=2, seed=0, accelerator="cpu", deterministic=True,
                            progress=False, default_root_dir=tmp_path)
        assert not torch.are_deterministic_algorithms_enabled()
        assert fit.is_global_zero and not fit.resumed and (tmp_path / "last.ckpt").is_file()
        again = fit_resumable(Tiny(), train_loader=loader, ckpt_path_last=tmp_path / "last.ckpt",
                              resume_config={"x": 1}, epochs=3, seed=0, accelerator="cpu", deterministic=True,
                              progress=False, default_root_dir=tmp_path)
        assert again.resumed and again.resumed_from == 2 and again.trainer.current_epoch == 3
        again.remove_checkpoint(remove_dir=False)
        assert not (tmp_path / "last.ckpt").exists() and not resume.sidecar_path(tmp_path / "last.ckpt").exists()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_stages_pass_devices_to_the_trainers(tmp_path, monkeypatch):
    from cellstage.reduce.stage import train_grader
    from cellstage.ssl.stage import pretrain
    from cellstage.train.stage import finetune

    seen = {}

    def fake(name):
        def f(*args, **kwargs):
            seen[name] = (args, kwargs)
            return {}
        return f

    import importlib
    import types

    import cellstage.crops
    import cellstage.io.slides
    import cellstage.reduce.grader
    import cellstage.train.cv

    monkeypatch.setattr(cellstage.train.cv, "run_fold", fake("finetune"))
    monkeypatch.setattr(importlib.import_module("cellstage.ssl.pretrain"), "pretrain", fake("pretrain"))
    monkeypatch.setattr(cellstage.reduce.grader, "train_grader", fake("grader"))
    # a stand-in slide: the grader stage checks its points against the slide's size
    monkeypatch.setattr(cellstage.io.slides, "ZarrSlide", lambda p: types.SimpleNamespace(dimensions=(100, 100)))
    monkeypatch.setattr(cellstage.crops, "crops_at_points",
                        lambda s, x, y, size: np.zeros((len(x), size, size, 3), np.uint8))

    finetune(train_zarr=[], train_index=[], test_zarr=[], test_index=[], pretrained=None, out_dir=tmp_path / "f",
             fold=0, backbone="resnet18", img_size=40, background=True, distance=False, n_folds=5, init="scratch",
             recipe="baseline", recipe_settings={"epochs": 3, "lr": 1e-3}, batch_size=8, group_by=None,
             classes=["A", "B"], static_classes=["A"], seed=0, threads=None, devices=3)
    pretrain([], [], [], tmp_path / "p", method="simclr", backbone="vit-with-dash", img_size=40, variant="images",
             epochs=2, batch_size=8, max_crops=None, seed=0, threads=None, devices=3)
    grades = tmp_path / "g.csv"
    pd.DataFrame({"x": [1, 2], "y": [1, 2], "grade": [1, 6]}).to_csv(grades, index=False)
    train_grader(["slide"], [grades], tmp_path / "grader", backbone="resnet18", epochs=8, batch_size=64,
                 loss_weights={"useful": 3.0, "unsuitable": 1.0}, size=16, seed=0, threads=None, devices=3)
    assert seen["finetune"][1]["devices"] == seen["pretrain"][1]["devices"] == seen["grader"][1]["devices"] == 3
    # names are passed through, never split: a backbone with "-" reaches the trainer whole
    assert seen["pretrain"][0][:2] == ("simclr", "vit-with-dash")
    assert seen["grader"][1]["epochs"] == 8 and seen["finetune"][1]["recipe"] == {"name": "baseline", "epochs": 3,
                                                                                "lr": 1e-3}
    # the grader's checkpoint is kept outside its directory() output, which Snakemake deletes on failure
    assert seen["grader"][1]["checkpoint_dir"] == tmp_path / "grader.checkpoints"
