"""Cellpose segmenter training: our epoch loop equals cellpose's ``train_seg``, and it resumes.

The resume test kills a real training process (SIGKILL, as a walltime limit ends a job) after a
checkpoint exists and checks that the rerun continues from it and ends bit-identical to an
uninterrupted run (CPU, fixed seed, same thread count).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Tiny synthetic training material: 128² RGB tiles, a dozen dark discs on a noisy pink ground.
DISCS_SRC = '''
import numpy as np

def disc_tiles(n=6, size=128, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs, masks = [], []
    for _ in range(n):
        lab = np.zeros((size, size), np.int32)
        k = 0
        for _ in range(200):
            if k == 12:
                break
            r = rng.uniform(6, 9)
            cy, cx = rng.uniform(r, size - r, 2)
            d = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if (lab[d] > 0).any():
                continue
            k += 1
            lab[d] = k
        img = np.empty((size, size, 3), np.float32)
        img[:] = (230, 180, 205)
        img[lab > 0] = (95, 70, 150)
        img += rng.normal(0, 12, img.shape)
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(lab)
    return imgs, masks
'''
_ns: dict = {}
exec(DISCS_SRC, _ns)
disc_tiles = _ns["disc_tiles"]

FIT = dict(n_epochs=3, learning_rate=0.005, batch_size=2, weight_decay=1e-5, channels=[0, 0],
           nimg_per_epoch=4, bsize=48, min_train_masks=1)


def _net(seed=0):
    import torch
    from cellpose import models

    torch.manual_seed(seed)
    return models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=17.0).net


def _assert_same_weights(a: dict, b: dict):
    import torch

    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def test_fit_cellpose_matches_cellpose_train_seg(tmp_path):
    """Same arguments, same initial weights → weights torch.equal to cellpose.train.train_seg."""
    import torch
    from cellpose import train as cp_train

    from cellstage.segment.train import fit_cellpose

    torch.set_num_threads(1)  # robust timing on a shared machine
    imgs, masks = disc_tiles(6, seed=1)
    ref = _net()
    _, ref_losses, _ = cp_train.train_seg(
        ref, train_data=[i.copy() for i in imgs], train_labels=[m.copy() for m in masks],
        normalize=True, save_path=str(tmp_path), save_every=10**9, model_name="ref",
        scale_range=None, **FIT)
    ours = _net()
    fit = fit_cellpose(ours, [i.copy() for i in imgs], [m.copy() for m in masks],
                       checkpoint_dir=tmp_path / "ckpt", **FIT)
    _assert_same_weights(ref.state_dict(), ours.state_dict())
    assert np.array_equal(fit["train_losses"], ref_losses) and fit["resumed_from_epoch"] is None
    assert ours.diam_labels.item() == ref.diam_labels.item()
    # only the last epoch's checkpoint is kept, and nothing half-written
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch-00002.pt"]
    # the weights actually moved (LR is 0 in cellpose's first warm-up epoch only)
    assert not torch.equal(_net().state_dict()["output.2.weight"], ours.state_dict()["output.2.weight"])


def test_checkpoint_resumes_only_with_the_same_arguments(tmp_path, caplog):
    import logging

    import torch

    from cellstage.segment.train import fit_cellpose

    torch.set_num_threads(1)  # robust timing on a shared machine
    imgs, masks = disc_tiles(4, seed=2)
    args = {**FIT, "n_epochs": 2, "nimg_per_epoch": 2}
    first = fit_cellpose(_net(), imgs, masks, checkpoint_dir=tmp_path / "ck", **args)
    # a finished checkpoint with the same arguments: nothing left to train, same result
    again_net = _net()
    again = fit_cellpose(again_net, imgs, masks, checkpoint_dir=tmp_path / "ck", **args)
    assert again["resumed_from_epoch"] == 2
    assert np.array_equal(again["train_losses"], first["train_losses"])
    # other arguments (learning rate) or other initial weights: the checkpoint is ignored, loudly
    for net, kw in ((_net(), {**args, "learning_rate": 0.001}), (_net(seed=1), args)):
        with caplog.at_level(logging.WARNING, logger="cellstage.segment"):
            caplog.clear()
            other = fit_cellpose(net, imgs, masks, checkpoint_dir=tmp_path / "ck", **kw)
        assert other["resumed_from_epoch"] is None and "other arguments" in caplog.text
        if kw is args:  # ...and it was replaced by this run's own checkpoint
            assert fit_cellpose(_net(seed=1), imgs, masks, checkpoint_dir=tmp_path / "ck",
                                **args)["resumed_from_epoch"] == 2


def train_demo(out, epochs: int):
    """The training run of the kill test (also run as a script in a subprocess)."""
    import torch

    from cellstage.segment import train_segmenter

    torch.set_num_threads(1)  # robust timing on a shared machine
    imgs, masks = disc_tiles(6, seed=3)
    return train_segmenter(imgs, masks, out, epochs=epochs, tile_size=128, bsize=48, batch_size=2,
                           nimg_per_epoch=4, diam_mean=17, held_out_fraction=0, seed=0)


def _run(out: Path, epochs: int):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_segment_resume as t; t.train_demo({str(out)!r}, {epochs})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL after a checkpoint exists, rerun: continues there and ends bit-identical."""
    import torch

    from cellstage.segment.train import CHECKPOINT_SUFFIX

    epochs, kill_after = 6, 1  # kill once epoch index >= 1 (2 epochs done) is checkpointed
    killed = tmp_path / "killed" / "model"
    ckpt = Path(str(killed) + CHECKPOINT_SUFFIX)
    p = _run(killed, epochs)
    deadline = time.time() + 120
    done = []
    while time.time() < deadline and p.poll() is None:
        done = sorted(ckpt.glob("epoch-*.pt"))
        if done and int(done[-1].stem.split("-")[1]) >= kill_after:
            break
        time.sleep(0.02)
    assert p.poll() is None, f"training ended before it could be killed: {p.stderr.read().decode()[-2000:]}"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not killed.exists(), "killed run must not leave a finished model"
    left = sorted(ckpt.glob("epoch-*.pt"))
    assert left, "no checkpoint left after the kill"
    last_epoch = int(left[-1].stem.split("-")[1])
    assert kill_after <= last_epoch < epochs - 1, last_epoch

    rerun = _run(killed, epochs)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-3000:]
    ref_out = tmp_path / "ref" / "model"
    train_demo(ref_out, epochs)  # uninterrupted, in this process (same thread count)

    meta_k = json.loads(Path(str(killed) + ".json").read_text())
    meta_r = json.loads(Path(str(ref_out) + ".json").read_text())
    assert meta_k["resumed_from_epoch"] == last_epoch + 1 and meta_r["resumed_from_epoch"] is None
    assert meta_k["train_losses"] == meta_r["train_losses"] and len(meta_r["train_losses"]) == epochs
    _assert_same_weights(torch.load(killed, weights_only=True), torch.load(ref_out, weights_only=True))
    assert not ckpt.exists(), "the checkpoint folder is removed once the model is stored"
    print(f"killed after epoch {last_epoch + 1} of {epochs}; resumed weights equal uninterrupted: True")


@pytest.mark.parametrize("n_epochs", [1, 9, 10, 150, 400])
def test_lr_schedule_is_cellposes(n_epochs):
    from cellstage.segment.train import lr_schedule

    lr = lr_schedule(0.005, n_epochs)
    assert len(lr) >= n_epochs and lr[0] == 0 and lr[min(n_epochs, 10) - 1] <= 0.005
    if n_epochs > 100:
        assert len(lr) == n_epochs and lr[-1] == pytest.approx(0.005 / 2**10)


def test_stage_forwards_the_segmentation_config_and_defaults_agree(tmp_path, monkeypatch):
    """config.yaml → schema defaults → rule params → stage (typed, no defaults) → train_segmenter."""
    import inspect

    import tifffile
    import yaml
    from snakemake.utils import validate

    import cellstage.segment.stage as seg_stage
    import cellstage.segment.train as seg_train

    repo = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((repo / "config/config.yaml").read_text())
    validate(config, str(repo / "workflow/schemas/config.schema.yaml"))  # fills schema defaults
    stage_sig = inspect.signature(seg_stage.train_segmenter)
    keys = [n for n, p in stage_sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("seed", "threads")]
    # the stage repeats no default: every value comes from the validated config
    assert all(p.default is inspect.Parameter.empty for p in stage_sig.parameters.values())
    # ...and the rule passes each of them from the `segmentation` section
    rule = (repo / "workflow/rules/segment.smk").read_text().split("rule train_segmenter:")[1].split("\nrule ")[0]
    for k in keys:
        assert f'config["segmentation"]["{k}"]' in rule, k

    class FakeSlide:
        dimensions = (8, 8)

        def __init__(self, path):
            pass

        def read_region(self, x, y, w, h, level=0):
            return np.zeros((h, w, 3), np.uint8)

    sig = inspect.signature(seg_train.train_segmenter)
    seen = {}
    monkeypatch.setattr(seg_stage, "ZarrSlide", FakeSlide)
    monkeypatch.setattr(tifffile, "imread", lambda p: np.zeros((8, 8), np.uint16))
    monkeypatch.setattr(seg_train, "train_segmenter", lambda *a, **kw: seen.update(kw) or {})
    seg_stage.train_segmenter(["s.ome.zarr"], ["m.tiff"], tmp_path / "model", None,
                              **{k: config["segmentation"][k] for k in keys}, seed=3, threads=None)
    expect = {"epochs": 120, "nimg_per_epoch": 16, "batch_size": 4, "bsize": 64,
              "max_eval_tiles": 64, "learning_rate": 0.005, "seed": 3, "pretrained": None, "diameter": None}
    for k, v in expect.items():
        assert seen[k] == v, (k, seen[k])
    # the demo config is the code's recipe, and the schema's defaults are the code's defaults
    schema = yaml.safe_load((repo / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["segmentation"]["properties"]
    arg = {"eval_tiles": "max_eval_tiles"}
    for key in ("epochs", "learning_rate", "nimg_per_epoch", "batch_size", "bsize", "diam_mean",
                "eval_tiles"):
        assert props[key]["default"] == sig.parameters[arg.get(key, key)].default, key
