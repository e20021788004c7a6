"""Fine-tuning with cross-validation on tiny synthetic crop sources (CPU, ~1 min)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cellstage.taxonomy import Taxonomy

TAX = Taxonomy()
COLOURS = np.array(
    [
        [200, 60, 60],
        [60, 200, 60],
        [60, 60, 200],
        [200, 200, 60],
        [200, 60, 200],
        [60, 200, 200],
        [230, 140, 40],
        [120, 120, 120],
    ],
    dtype=float,
)


def make_crop_source(
    out: Path,
    slide: str,
    *,
    n_per_class: int = 12,
    size: int = 40,
    n_unlabelled: int = 4,
    seed: int = 0,
    split: str = "train",
    patient: str = "p1",
) -> tuple[str, str]:
    """Zarr group (images / masked / masks, chunks of 64 crops) + index parquet per contract.

    Class c is a disk of colour COLOURS[c] and radius growing with c on a noisy background;
    ``distance_norm`` grows with the class too (so the distance input is informative).
    """
    import zarr

    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.repeat(np.arange(8), n_per_class), np.full(n_unlabelled, -1)])
    n = len(labels)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), bool)
    for i, lab in enumerate(labels):
        c = lab if lab >= 0 else rng.integers(0, 8)
        r = size * (0.15 + 0.025 * c) + rng.normal(0, 0.5)
        cy, cx = size / 2 + rng.normal(0, 1, 2)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        bg = rng.normal(170, 25, (size, size, 3))
        fg = COLOURS[c] + rng.normal(0, 20, (size, size, 3))
        images[i] = np.clip(np.where(m[..., None], fg, bg), 0, 255).astype(np.uint8)
        masks[i] = m
    masked = images * masks[..., None]
    zpath = out / f"{slide}.zarr"
    g = zarr.open_group(str(zpath), mode="w")
    for name, arr in (("images", images), ("masked", masked), ("masks", masks)):
        a = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(64, *arr.shape[1:]))
        a[:] = arr
    dist = np.where(labels >= 0, labels / 8.0, 0.5) + rng.normal(0, 0.05, n)
    dist[::17] = np.nan  # missing distances become -0.5
    idx = pd.DataFrame(
        {
            "row": np.arange(n),
            "cell_id": rng.permutation(n) + 1,
            "slide": slide,
            "section": slide.rsplit("_", 1)[0],
            "scan": "40x" if size >= 80 else "20x",
            "patient": patient,
            "split": split,
            "label": [TAX.classes[c] if c >= 0 else "" for c in labels],
            "label_idx": labels.astype(np.int64),
            "centroid_x": rng.uniform(0, 1000, n),
            "centroid_y": rng.uniform(0, 1000, n),
            "distance_to_wall_um": np.nan_to_num(dist, nan=0.0) * 40,
            "distance_norm": dist,
        }
    )
    ipath = out / f"{slide}.parquet"
    idx.to_parquet(ipath, index=False)
    return str(zpath), str(ipath)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: one thread is faster under contention
    d = tmp_path_factory.mktemp("crops")
    train = [make_crop_source(d, "s1_20x", seed=1)]
    test = [make_crop_source(d, "s2_20x", n_per_class=4, seed=2, split="test", patient="p2")]
    yield train, test
    torch.set_num_threads(threads)


FAST = dict(n_folds=2, backbone="resnet18", recipe={"name": "baseline", "epochs": 2}, batch_size=32, progress=False,
            accelerator="cpu")


# ------------------------------------------------------------------ folds / data
def test_make_folds_stratified_and_order_independent(sources):
    from cellstage.train import make_folds
    from cellstage.training.data import load_index

    df = load_index(sources[0])
    f = make_folds(df, n_folds=3, seed=0)
    assert (f[df["label_idx"] < 0] == -1).all()
    lab = df["label_idx"] >= 0
    counts = pd.crosstab(df.loc[lab, "label_idx"], f[lab])
    assert (counts == 4).all().all()  # 12 per class -> 4 per fold
    shuffled = df.sample(frac=1, random_state=3)
    f2 = make_folds(shuffled, n_folds=3, seed=0)
    assert (pd.Series(f2, index=shuffled.index).sort_index().to_numpy() == f).all()
    assert not (make_folds(df, n_folds=3, seed=1) == f).all()


def test_make_folds_grouped():
    from cellstage.train import make_folds

    df = pd.DataFrame(
        {"label_idx": np.tile(np.arange(4), 30), "patient": np.repeat([f"p{i}" for i in range(6)], 20)}
    )
    f = make_folds(df, n_folds=3, seed=0, group_col="patient")
    assert df.assign(f=f).groupby("patient")["f"].nunique().max() == 1
    from cellstage.utils import CellstageError

    with pytest.raises(CellstageError, match="patient"):
        make_folds(df, n_folds=8, seed=0, group_col="patient")


def test_datamodule_splits_and_batches(sources):
    from cellstage.training.data import CropDataModule

    dm = CropDataModule(sources[0], sources[1], fold=1, n_folds=2, batch_size=16, variant="masked")
    dm.setup()
    assert len(dm.train_index) + len(dm.val_index) == 96  # unlabelled rows dropped
    assert set(dm.train_index["cell_id"]).isdisjoint(dm.val_index["cell_id"])
    assert len(dm.test_index) == 32
    x, d, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 40, 40) and x.dtype == torch.float32
    assert d.shape == (16,) and y.shape == (16,)
    assert len(dm.mean) == 3 and all(s > 0 for s in dm.std)
    # cached and lazy datasets give the same (un-augmented) items
    from cellstage.training.data import ZarrCropDataset

    lazy = ZarrCropDataset(dm.val_index, "masked", None)
    i = 5
    assert np.array_equal(lazy.image(i), dm.val_ds.image(i))


def test_transforms_shapes():
    from PIL import Image

    from cellstage.training.transforms import channel_stats, eval_transform, train_transform

    img = (np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8)
    mean, std = channel_stats(img[None])
    for tf in (train_transform(mean, std), eval_transform(mean, std)):
        x = tf(Image.fromarray(img))
        assert x.shape == (3, 80, 80) and x.dtype == torch.float32
    x = eval_transform(mean, std)(Image.fromarray(img))
    assert abs(float(x.mean())) < 1e-3  # normalised with its own statistics


def test_classifier_distance_head_and_augmentation():
    from cellstage.train.classifier import UNKNOWN_DISTANCE, CellClassifier

    m = CellClassifier("resnet18", n_classes=8, img_size=40, use_distance=True, distance_dropout_p=1.0)
    assert m.head.in_features == m.feat_dim + 1
    d = torch.rand(10)
    assert torch.all(m._augment_distance(d) == UNKNOWN_DISTANCE)
    m.eval()
    assert m(torch.rand(2, 3, 40, 40), torch.rand(2)).shape == (2, 8)
    assert CellClassifier("resnet18", img_size=40).head.in_features == m.feat_dim


# ---------------------------------------------------------------------- run_fold
def _check_metrics(m):
    for split in ("val", "test"):
        d = m[split]
        for k in ("top1", "top2", "adj1", "adj1_dyn"):
            assert d[k] is not None and math.isfinite(d[k]) and 0.0 <= d[k] <= 1.0, (split, k, d[k])
        assert d["adj1"] >= d["top1"] and d["top2"] >= d["top1"]


def test_run_fold_outputs_and_determinism(sources, tmp_path):
    from cellstage.train import aggregate_folds, run_fold
    from cellstage.utils import CellstageError

    train, test = sources
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name / "fold0"
        run_fold(train, test, out, fold=0, seed=7, **FAST)
        outs.append(out)
    a, b = (json.loads((o / "metrics.json").read_text()) for o in outs)
    _check_metrics(a)
    assert a["val"]["n"] == 48 and a["test"]["n"] == 32
    assert a["val"] == b["val"] and a["test"] == b["test"]
    assert a["epochs"] == 2 and 0 <= a["best_epoch"] <= 1
    assert a["config"]["backbone"] == "resnet18" and a["config"]["img_size"] == 40
    assert "cellstage_version" in a["provenance"]
    pa, pb = (pd.read_parquet(o / "predictions.parquet") for o in outs)
    pd.testing.assert_frame_equal(pa, pb)
    assert set(pa["split"]) == {"val", "test"} and len(pa) == 80
    probs = pa[[f"prob_{c}" for c in TAX.classes]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (probs.argmax(1) == pa["pred"]).all()
    h = pd.read_csv(outs[0] / "history.csv")
    assert list(h.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_top1", "lr", "backbone_lr",
                               "head_lr"]
    assert len(h) == 2 and h["val_loss"].notna().all()
    assert not (outs[0] / "checkpoints").exists()

    agg = aggregate_folds([(name, o / "metrics.json") for name, o in zip(("a", "b"), outs)])
    # two experiments ("a", "b") of one fold each: fold row, mean, std per experiment
    assert list(agg["experiment"]) == ["a"] * 3 + ["b"] * 3
    assert list(agg["fold"]) == ["0", "mean", "std"] * 2
    mean = agg[(agg["fold"] == "mean")].iloc[0]
    assert mean["val_top1"] == pytest.approx(a["val"]["top1"])
    assert mean["test_adj1_dyn"] == pytest.approx(a["test"]["adj1_dyn"])
    # names are given, never parsed from paths: a mapping {path: name} works too (and "-" in a name)
    by_path = aggregate_folds({outs[0] / "metrics.json": "20x-bg-vit_small-x", outs[1] / "metrics.json": "b"})
    assert list(by_path["experiment"]) == ["20x-bg-vit_small-x"] * 3 + ["b"] * 3
    with pytest.raises(CellstageError, match="experiment_name"):
        aggregate_folds([outs[0] / "metrics.json"])


def test_run_fold_pretrained_distance_masked(sources, tmp_path):
    from cellstage.train import run_fold
    from cellstage.training.backbones import create_backbone, save_weights

    bb = create_backbone("resnet18", img_size=40)
    for p in bb.parameters():
        torch.nn.init.normal_(p, 0, 0.01) if p.dim() > 1 else None
    w = tmp_path / "backbone.safetensors"
    save_weights(bb, w)
    m = run_fold(
        *sources, tmp_path / "fold1", fold=1, pretrained_path=w, use_distance=True, variant="masked", **FAST
    )
    _check_metrics(json.loads((tmp_path / "fold1" / "metrics.json").read_text()))
    assert m["config"]["use_distance"] and m["config"]["pretrained_path"] == str(w)


def test_pretrained_weights_are_loaded(tmp_path):
    from cellstage.train.classifier import CellClassifier
    from cellstage.training.backbones import create_backbone, save_weights

    bb = create_backbone("resnet18", img_size=40)
    with torch.no_grad():
        bb.conv1.weight.fill_(0.123)
    save_weights(bb, tmp_path / "w.safetensors")
    m = CellClassifier("resnet18", img_size=40, pretrained_path=str(tmp_path / "w.safetensors"))
    assert torch.all(m.backbone.conv1.weight == 0.123)


def test_bad_pretrained_path_is_a_clear_error(sources, tmp_path):
    from cellstage.train import run_fold
    from cellstage.train.classifier import CellClassifier
    from cellstage.training.backbones import create_backbone, save_weights
    from cellstage.utils import CellstageError

    with pytest.raises(CellstageError, match="does not exist"):
        run_fold(*sources, tmp_path / "x", fold=0, pretrained_path=tmp_path / "missing.safetensors", **FAST)
    assert not (tmp_path / "x" / "metrics.json").exists()
    other = tmp_path / "vit.safetensors"
    save_weights(create_backbone("vit_tiny_patch16_224", img_size=40), other)
    with pytest.raises(CellstageError, match="does not fit backbone 'resnet18'"):
        CellClassifier("resnet18", img_size=40, pretrained_path=str(other))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CellstageError, match="not a readable safetensors"):
        CellClassifier("resnet18", img_size=40, pretrained_path=str(junk))


def test_run_fold_input_errors(sources, tmp_path):
    from cellstage.train import run_fold
    from cellstage.utils import CellstageError

    with pytest.raises(CellstageError, match="img_size=80"):
        run_fold(*sources, tmp_path / "y", fold=0, img_size=80, **FAST)
    with pytest.raises(CellstageError, match="does not exist"):
        run_fold([("nope.zarr", "nope.parquet")], [], tmp_path / "z", fold=0, **FAST)


# ------------------------------------------------------------------- kill and resume
# 4 epochs, a plateau scheduler that reacts at once, threads fixed: the child and this process agree
KILL = dict(n_folds=2, backbone="resnet18", recipe={"name": "baseline", "epochs": 4, "plateau_patience": 0},
            batch_size=16, progress=False, accelerator="cpu", num_threads=1)


def test_finetune_killed_after_epoch_1_resumes_to_identical_weights(sources, tmp_path, monkeypatch):
    """SIGKILL in epoch 2 (checkpoints of epochs 0 and 1 on disk), rerun: same as never killed."""
    import signal

    from killed_run import assert_same_tensors, capture_final_states, kill_mid_epoch

    from cellstage.train import run_fold

    train, test = sources
    killed = tmp_path / "killed" / "fold0"
    k = kill_mid_epoch("cellstage.train.cv:run_fold", [train, test, killed], {"fold": 0, **KILL},
                       pause_epoch=2, workdir=tmp_path / "child", threads=torch.get_num_threads())
    assert k["returncode"] == -signal.SIGKILL
    assert k["paused"]["epochs_done_on_disk"] == 2
    assert (killed / "checkpoints" / "last.ckpt").is_file() and not (killed / "metrics.json").exists()

    final = capture_final_states(monkeypatch)
    resumed = run_fold(train, test, killed, fold=0, **KILL)
    straight = run_fold(train, test, tmp_path / "straight" / "fold0", fold=0, **KILL)
    assert resumed["resumed"] and resumed["resumed_from_epoch"] == 2 and not straight["resumed"]
    assert_same_tensors(final[0], final[1])  # last-epoch weights, heads and BatchNorm buffers
    for key in ("val", "test", "epochs", "best_epoch", "best_val_loss"):
        assert resumed[key] == straight[key], key
    h_resumed, h_straight = (pd.read_csv(d / "history.csv") for d in (killed, tmp_path / "straight" / "fold0"))
    pd.testing.assert_frame_equal(h_resumed, h_straight, check_exact=True)
    assert list(h_resumed["epoch"]) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "predictions.parquet"),
                                  pd.read_parquet(tmp_path / "straight" / "fold0" / "predictions.parquet"),
                                  check_exact=True)
    assert not (killed / "checkpoints").exists()


def test_finetune_ignores_a_checkpoint_written_with_other_arguments(sources, tmp_path, caplog):
    from cellstage.train import run_fold

    out = tmp_path / "fold0"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"would fail to load")
    (out / "checkpoints" / "last.json").write_text(json.dumps({"hash": "0" * 16, "epochs_done": 1}))
    with caplog.at_level("WARNING", logger="cellstage.train"):
        m = run_fold(*sources, out, fold=0, **{**FAST, "recipe": {"name": "baseline", "epochs": 1}})
    assert not m["resumed"] and m["epochs"] == 1
    assert "written with other arguments" in caplog.text
    assert not (out / "checkpoints").exists()
