"""Seed 003 data reduction: filters, cascade table and the grading network."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cellstage.reduce import (
    blur_filter,
    compactness_filter,
    grade_crops,
    lab_kmeans_nuclei,
    laplacian_variance,
    reduction_table,
    train_grader,
)
from cellstage.utils import CellstageError

torch.set_num_threads(2)
BG = np.array([236, 226, 232])  # pinkish-white background
NUC = np.array([70, 50, 130])  # haematoxylin purple


def _disk(size, rng, r=None):
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.normal(0, 1, 2)
    r = r or rng.uniform(size * 0.2, size * 0.3)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _fragments(size, rng):
    m = np.zeros((size, size), bool)
    for _ in range(rng.integers(5, 9)):
        y, x = rng.integers(1, size - 4, 2)
        h, w = rng.integers(1, 3), rng.integers(3, 8)
        m[y:y + h, x:x + w] = True
    return m


def _paint(mask, rng):
    img = np.where(mask[..., None], NUC, BG).astype(float)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_graded(n_per=40, size=32, seed=0):
    """valid cells (grades 1-2: dark disks), damaged (5: fragments), no cell (6: background)."""
    rng = np.random.default_rng(seed)
    crops, grades = [], []
    for _ in range(n_per):
        crops.append(_paint(_disk(size, rng), rng))
        grades.append(int(rng.integers(1, 3)))
        crops.append(_paint(_fragments(size, rng), rng))
        grades.append(5)
        crops.append(_paint(np.zeros((size, size), bool), rng))
        grades.append(6)
    return np.stack(crops), np.array(grades)


# -- filters -------------------------------------------------------------------------------------
def test_laplacian_variance_lower_when_blurred():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    sharp = np.stack([_paint(_disk(64, rng, r=10) | _fragments(64, rng), rng) for _ in range(4)])
    blurred = np.stack([gaussian_filter(c.astype(float), sigma=(2, 2, 0)).astype(np.uint8) for c in sharp])
    for s, b in zip(sharp, blurred):
        assert laplacian_variance(b) < 0.5 * laplacian_variance(s)
    thr = (np.median([laplacian_variance(c) for c in sharp]) + np.median([laplacian_variance(c) for c in blurred])) / 2
    keep = blur_filter(np.concatenate([sharp, blurred]), thr)
    assert keep.tolist() == [True] * 4 + [False] * 4


def test_lab_kmeans_finds_purple_nucleus():
    rng = np.random.default_rng(1)
    mask = _disk(48, rng, r=10)
    img = _paint(mask, rng)
    img[:8, :8] = [230, 120, 160]  # an eosin-pink blob: a third colour cluster
    seg = lab_kmeans_nuclei(img, k=3, seed=0)
    iou = (seg & mask).sum() / (seg | mask).sum()
    assert iou > 0.9


def test_compactness_keeps_disks_over_fragments():
    rng = np.random.default_rng(2)
    disks = [_disk(40, rng) for _ in range(10)]
    elong = []
    for _ in range(10):
        m = np.zeros((40, 40), bool)
        y = int(rng.integers(17, 22))
        m[y:y + 2, 4:36] = True  # elongated fragment through the centre
        elong.append(m)
    empty = [np.zeros((40, 40), bool)]
    keep, values = compactness_filter(np.stack(disks + elong + empty), seed=0, return_values=True)
    assert keep[:10].all() and not keep[10:].any()
    assert np.isinf(values[-1])
    # from RGB crops (segmented by CIELab K-means first)
    crops = np.stack([_paint(m, rng) for m in disks[:5] + elong[:5]])
    assert compactness_filter(crops, seed=0).tolist() == [True] * 5 + [False] * 5
    # a homogeneous set is not split in half
    assert compactness_filter(np.stack(disks), seed=0).all()


def test_reduction_table():
    t = reduction_table({"level_one": 200, "level_two": 150, "level_three": 50})
    assert list(t.columns) == ["level", "n", "fraction"]
    assert t["n"].tolist() == [200, 150, 50]
    assert np.allclose(t["fraction"], [1.0, 0.75, 0.25])
    assert reduction_table({}).empty


# -- grading network ------------------------------------------------------------------------------
def test_bad_grades_raise(tmp_path):
    crops = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(CellstageError, match=r"outside 1..6: 0 \(x1\), 7 \(x2\)"):
        train_grader(crops, np.array([1, 0, 7, 7]), tmp_path, epochs=1)


def test_grader_separates_synthetic(tmp_path):
    crops, grades = synthetic_graded()
    res = train_grader(crops, grades, tmp_path / "g", epochs=4, batch_size=32, lr=1e-3, seed=0, progress=False)
    assert res["val"]["accuracy"] >= 0.8, res["val"]
    assert res["n_per_grade"][5] == 40 and res["n_per_grade"][6] == 40
    assert res["config"]["loss_weights"] == {"useful": 3.0, "unsuitable": 1.0}
    for name in ("grader.safetensors", "grader.model.json", "grader.json"):
        assert (tmp_path / "g" / name).is_file()
    meta = json.loads((tmp_path / "g" / "grader.model.json").read_text())
    assert meta["backbone"] == "resnet18" and meta["img_size"] == 32
    # the model is a module-level LightningModule: reloaded from the files, it reproduces the validation
    # confusion matrix (rows: true useful/unsuitable) that training reported
    from cellstage.reduce.grader import GraderModule, load_grader

    net, _ = load_grader(tmp_path / "g")
    assert type(net) is GraderModule and not net.training
    cm = np.array(res["val"]["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == res["val"]["n_val"]

    # grade a crop source written per the contract
    import zarr

    z = tmp_path / "s_40x.zarr"
    g = zarr.open_group(str(z), mode="w")
    g.create_array("images", data=crops, chunks=(64, 32, 32, 3))
    g.create_array("masked", data=crops, chunks=(64, 32, 32, 3))
    g.create_array("masks", data=np.zeros(crops.shape[:3], bool), chunks=(64, 32, 32))
    idx = pd.DataFrame({"row": np.arange(len(crops)), "cell_id": np.arange(len(crops)) + 1, "slide": "s_40x",
                        "label_idx": -1, "distance_norm": 0.0})
    idx.to_parquet(tmp_path / "s_40x.parquet")
    out = grade_crops(tmp_path / "g", [(str(z), str(tmp_path / "s_40x.parquet"))])
    assert list(out.columns) == ["slide", "cell_id", "p_unsuitable", "keep"]
    useful = grades <= 4
    assert (out["keep"].to_numpy() == useful).mean() >= 0.8


# -- resume after a kill ----------------------------------------------------------------------------
KILL = dict(epochs=4, batch_size=8, lr=1e-3, seed=0, progress=False, accelerator="cpu")


def test_grader_killed_after_epoch_1_resumes_to_identical_weights(tmp_path, monkeypatch):
    """SIGKILL in epoch 2 (checkpoints of epochs 0 and 1 on disk), rerun: same as never killed."""
    import signal

    from killed_run import assert_same_tensors, kill_mid_epoch
    from safetensors.torch import load_file

    crops, grades = synthetic_graded(n_per=6)  # 14 training crops: 2 steps per epoch
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    k = kill_mid_epoch("cellstage.reduce.grader:train_grader", [], {"out_dir": killed, **KILL},
                       arrays={"crops": crops, "grades": grades}, pause_epoch=2, workdir=tmp_path / "child",
                       threads=torch.get_num_threads())
    assert k["returncode"] == -signal.SIGKILL and k["paused"]["epochs_done_on_disk"] == 2
    assert (killed / "checkpoints" / "last.ckpt").is_file() and not (killed / "grader.json").exists()

    a = train_grader(crops, grades, killed, **KILL)
    b = train_grader(crops, grades, straight, **KILL)
    assert a["resumed_from_epoch"] == 2 and b["resumed_from_epoch"] is None
    assert_same_tensors(load_file(killed / "grader.safetensors"), load_file(straight / "grader.safetensors"))
    assert a["history"] == b["history"] and [h["epoch"] for h in a["history"]] == [1, 2, 3, 4]
    assert a["val"] == b["val"]
    assert not (killed / "checkpoints").exists()


def test_grader_ignores_a_checkpoint_written_with_other_arguments(tmp_path, caplog):
    crops, grades = synthetic_graded(n_per=6)
    ck = tmp_path / "ck"
    train_grader(crops, grades, tmp_path / "g1", epochs=1, batch_size=8, progress=False, checkpoint_dir=ck)
    assert not ck.exists()  # removed after training
    ck.mkdir()
    (ck / "last.ckpt").write_bytes(b"would fail to load")
    (ck / "last.json").write_text(json.dumps({"hash": "0" * 16, "epochs_done": 1}))
    with caplog.at_level("WARNING", logger="cellstage.train"):
        res = train_grader(crops, grades, tmp_path / "g2", epochs=1, batch_size=8, progress=False,
                           checkpoint_dir=ck)
    assert res["resumed_from_epoch"] is None and len(res["history"]) == 1
    assert "written with other arguments" in caplog.text
