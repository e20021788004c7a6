"""SSL pretraining: each method runs on a tiny synthetic crop source and exports a backbone."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cellstage.ssl import METHODS, pretrain
from cellstage.training.backbones import create_backbone, load_weights
from cellstage.utils import CellstageError

torch.set_num_threads(2)


def write_crop_source(tmp_path, n=64, size=40, slide="s1_40x", seed=0):
    """A crops zarr (images/masked/masks, chunks of 64) + index parquet per docs/contracts.md."""
    import zarr

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.full((n, size, size, 3), 235, np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        cy, cx = size / 2 + rng.normal(0, 2, 2)
        r = rng.uniform(size * 0.15, size * 0.3)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks[i] = m
        images[i][m] = rng.integers(60, 140, 3)
        images[i] = np.clip(images[i] + rng.normal(0, 8, images[i].shape), 0, 255).astype(np.uint8)
    masked = images * masks[..., None]
    zpath = tmp_path / f"{slide}.zarr"
    g = zarr.open_group(str(zpath), mode="w")
    g.create_array("images", data=images, chunks=(64, size, size, 3))
    g.create_array("masked", data=masked.astype(np.uint8), chunks=(64, size, size, 3))
    g.create_array("masks", data=masks, chunks=(64, size, size))
    index = pd.DataFrame({
        "row": np.arange(n), "cell_id": np.arange(1, n + 1), "slide": slide, "section": slide.split("_")[0],
        "scan": "40x", "patient": "p1", "split": "unlabelled", "label": "", "label_idx": -1,
        "centroid_x": rng.uniform(0, 1000, n), "centroid_y": rng.uniform(0, 1000, n),
        "distance_to_wall_um": rng.uniform(0, 50, n), "distance_norm": rng.uniform(0, 1, n),
    })
    ipath = tmp_path / f"{slide}.parquet"
    index.to_parquet(ipath)
    return str(zpath), str(ipath)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_crop_source(tmp_path_factory.mktemp("crops"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_trains_and_exports_a_loadable_backbone(tmp_path, source, method):
    """Each METHODS entry (not a fixed list: a new method is covered when registered) trains two
    steps through ``pretrain`` and exports a backbone that loads into ``create_backbone`` and
    differs from the initial weights."""
    from cellstage.training.resume import seed_all

    spec = METHODS[method]
    backbone = "vit_tiny_patch16_224" if spec.vit_only else "resnet18"
    out = tmp_path / method
    tkw = {"n_local_views": 2} if method.startswith("dino") else None  # keep the test fast
    # a cross-scan method (simclr_xscan, ...) pairs each crop with the same cell's 20x crop
    partner = [write_crop_source(tmp_path, size=20, slide="s1_20x")] if spec.cross_scan else ()
    res = pretrain(method, backbone, [source], out, img_size=40, epochs=1, batch_size=8, progress=False,
                   max_crops=16, transform_kwargs=tkw, seed=0, partner_sources=partner)
    assert res["epochs"] == 1 and res["n_crops"] == 16 and res["steps_per_epoch"] == 2
    assert np.isfinite(res["final_loss"])
    for name in ("backbone.safetensors", "history.csv", "loss.png", "pretrain.json"):
        assert (out / name).is_file(), name
    assert not (out / "last.ckpt").exists()  # a finished run leaves no checkpoint (issue 15)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["method"] == method and "provenance" in info
    model = load_weights(create_backbone(backbone, img_size=40), out / "backbone.safetensors")
    with torch.no_grad():
        feats = model.eval()(torch.rand(2, 3, 40, 40))
    assert feats.shape[0] == 2 and torch.isfinite(feats).all()
    seed_all(0)  # pretrain's initial weights: the module made right after seeding
    init = spec.module(backbone, 40).export_backbone().state_dict()
    trained = model.state_dict()
    assert init.keys() == trained.keys()
    assert any(not torch.equal(init[k], trained[k]) for k in init if init[k].is_floating_point())
    if spec.vit_only:  # a ViT-only method refuses a CNN backbone
        with pytest.raises(CellstageError, match="Vision Transformer"):
            pretrain(method, "resnet18", [source], tmp_path / "cnn", img_size=40, epochs=1, progress=False)


def test_finished_run_leaves_no_checkpoint_and_a_rerun_trains_afresh(tmp_path, source):
    out = tmp_path / "run"
    pretrain("simclr", "resnet18", [source], out, img_size=40, epochs=1, batch_size=8, progress=False,
             max_crops=16)
    assert not (out / "last.ckpt").exists() and not (out / "last.json").exists()  # issue 15: removed on success
    w1 = (out / "backbone.safetensors").read_bytes()
    res = pretrain("simclr", "resnet18", [source], out, img_size=40, epochs=2, batch_size=8, progress=False,
                   max_crops=16)
    assert res["resumed_from_epoch"] is None and res["epochs"] == 2 and res["epochs_this_run"] == 2
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [1, 2]
    assert (out / "backbone.safetensors").read_bytes() != w1


def test_keep_list_filters(tmp_path, source):
    keep = pd.DataFrame({"slide": "s1_40x", "cell_id": np.arange(1, 65), "keep": np.arange(64) < 40})
    res = pretrain("simclr", "resnet18", [source], tmp_path / "k", img_size=40, epochs=1, batch_size=8,
                   progress=False, keep=keep, max_crops=12)
    assert res["n_crops"] == 12
    from cellstage.ssl.pretrain import select_crops
    from cellstage.training.data import load_index

    assert len(select_crops(load_index([source]), keep=keep)) == 40


def test_mae_needs_vit(tmp_path, source):
    with pytest.raises(CellstageError, match="Vision Transformer"):
        pretrain("mae", "resnet18", [source], tmp_path / "x", img_size=40, epochs=1, progress=False)
    with pytest.raises(CellstageError, match="unknown method"):
        pretrain("byol", "resnet18", [source], tmp_path / "y", img_size=40, epochs=1, progress=False)


# 4 epochs, a plateau scheduler that reacts at once; SimCLR as in the demo
KILL = dict(img_size=40, epochs=4, batch_size=8, progress=False, max_crops=16, accelerator="cpu",
            method_kwargs={"lr_patience": 0})


def test_pretrain_killed_after_epoch_1_resumes_to_identical_weights(tmp_path, source, monkeypatch):
    """SIGKILL in epoch 2 (checkpoints of epochs 0 and 1 on disk), rerun: same as never killed."""
    import signal

    from killed_run import assert_same_tensors, capture_final_states, kill_mid_epoch
    from safetensors.torch import load_file

    killed, straight = tmp_path / "killed", tmp_path / "straight"
    k = kill_mid_epoch("cellstage.ssl.pretrain:pretrain", ["simclr", "resnet18", [source], killed], KILL,
                       pause_epoch=2, workdir=tmp_path / "child", threads=torch.get_num_threads())
    assert k["returncode"] == -signal.SIGKILL and k["paused"]["epochs_done_on_disk"] == 2
    assert (killed / "last.ckpt").is_file() and not (killed / "pretrain.json").exists()

    final = capture_final_states(monkeypatch)
    a = pretrain("simclr", "resnet18", [source], killed, **KILL)
    b = pretrain("simclr", "resnet18", [source], straight, **KILL)
    assert a["resumed_from_epoch"] == 2 and a["epochs_this_run"] == 2 and b["resumed_from_epoch"] is None
    assert_same_tensors(load_file(killed / "backbone.safetensors"), load_file(straight / "backbone.safetensors"))
    assert_same_tensors(final[0], final[1])  # projection head too
    ha, hb = pd.read_csv(killed / "history.csv"), pd.read_csv(straight / "history.csv")
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    assert ha["epoch"].tolist() == [1, 2, 3, 4] and a["final_loss"] == b["final_loss"]


def test_pretrain_ignores_a_checkpoint_written_with_other_arguments(tmp_path, source, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.ckpt").write_bytes(b"would fail to load")
    (out / "last.json").write_text(json.dumps({"hash": "0" * 16, "epochs_done": 3}))
    with caplog.at_level("WARNING", logger="cellstage.train"):
        res = pretrain("simclr", "resnet18", [source], out, img_size=40, epochs=1, batch_size=8, progress=False,
                       max_crops=16)
    assert res["resumed_from_epoch"] is None and res["epochs"] == 1
    assert "written with other arguments" in caplog.text
    assert not (out / "last.ckpt").exists() and not (out / "last.json").exists()  # removed on success
