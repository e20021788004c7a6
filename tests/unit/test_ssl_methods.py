"""SSL methods of seeds 002 (autoencoder) and 004 (SimSiam, dense SimSiam): each pretrains one step
on tiny crops (ResNet-18 and a tiny ViT), exports a backbone that loads into ``create_backbone`` and
differs from its initial weights, and fine-tunes from it (``run_fold`` with ``pretrained_path``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_finetune import make_crop_source

from cellstage.ssl import METHODS, pretrain
from cellstage.training.backbones import create_backbone, load_weights

VIT = "vit_tiny_patch16_224"
NEW_METHODS = ("autoencoder", "simsiam", "dense_simsiam")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("crops")
    train = [make_crop_source(d, "s1_20x", n_per_class=2, seed=1)]
    test = [make_crop_source(d, "s2_20x", n_per_class=1, n_unlabelled=0, seed=2, split="test", patient="p2")]
    yield train, test
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_method_pretrains_one_step_on_a_vit_exports_and_finetunes(tmp_path, sources, method):
    """ResNet-18 is covered for every registered method by test_ssl.py; here a tiny ViT, one step."""
    from cellstage.train import run_fold
    from cellstage.training.resume import seed_all

    train, test = sources
    out = tmp_path / "pretrain"
    res = pretrain(method, VIT, train, out, img_size=40, epochs=1, batch_size=4, max_crops=4, seed=0,
                   accelerator="cpu", progress=False)
    assert res["steps_per_epoch"] == 1 and np.isfinite(res["final_loss"])
    weights = out / "backbone.safetensors"
    trained = load_weights(create_backbone(VIT, img_size=40), weights).state_dict()
    seed_all(0)  # pretrain's initial weights: the module made right after seeding
    init = METHODS[method].module(VIT, 40).export_backbone().state_dict()
    assert init.keys() == trained.keys()
    assert any(not torch.equal(init[k], trained[k]) for k in init if init[k].is_floating_point())

    m = run_fold(train, test, tmp_path / "fold0", fold=0, n_folds=2, backbone=VIT, pretrained_path=weights,
                 recipe={"name": "baseline", "epochs": 1}, batch_size=32, progress=False, accelerator="cpu",
                 checkpoint_every=0)
    assert m["config"]["pretrained_path"] == str(weights)
    assert np.isfinite(m["val"]["top1"]) and np.isfinite(m["test"]["top1"])


def test_dense_simsiam_heads_follow_seed_004():
    """A projector (3 layers, hidden = output = stage width) and a predictor (2 layers, hidden a
    quarter) per ResNet-18 stage layer1..layer4; plain SimSiam has one pair on the pooled output."""
    dense = METHODS["dense_simsiam"].module("resnet18", 40)
    assert dense.stage_weights == [0.1, 0.4, 0.7, 1.0]
    widths = [64, 128, 256, 512]
    for proj, pred, d in zip(dense.projectors, dense.predictors, widths):
        linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
        assert [(lin.in_features, lin.out_features) for lin in linears] == [(d, d)] * 3
        linears = [m for m in pred.modules() if isinstance(m, torch.nn.Linear)]
        assert [(lin.in_features, lin.out_features) for lin in linears] == [(d, d // 4), (d // 4, d)]
    plain = METHODS["simsiam"].module("resnet18", 40)
    assert plain.stage_weights == [1.0] and len(plain.projectors) == 1


@pytest.mark.parametrize("weights", [None, [0.0, 0.5, 2.0, 3.0]])
def test_dense_simsiam_loss_is_the_weighted_sum_of_four_stage_losses(monkeypatch, weights):
    """Seed 004 Eq. 7: L_DSL = sum_i w_i L^{s^i}, w the configured stage weights (default 0.1/0.4/0.7/1.0)."""
    from cellstage.ssl.simsiam import DenseSimSiam

    kw = {} if weights is None else {"stage_weights": weights}
    model = DenseSimSiam("resnet18", 40, **kw)
    seen = []

    def fake_stage_loss(self, i, k1, k2):
        seen.append((i, k1.shape[1]))
        return torch.tensor(10.0 ** i)

    monkeypatch.setattr(DenseSimSiam, "stage_loss", fake_stage_loss)
    monkeypatch.setattr(DenseSimSiam, "_record", lambda self, loss, n: None)
    x = torch.rand(2, 3, 40, 40)
    loss = model.training_step(((x, x.flip(-1)), None, None), 0)
    w = weights or [0.1, 0.4, 0.7, 1.0]
    assert seen == [(0, 64), (1, 128), (2, 256), (3, 512)]
    assert float(loss) == pytest.approx(sum(wi * 10.0**i for i, wi in enumerate(w)))


def test_autoencoder_lr_steps_at_milestones_and_resumes_bit_identically(tmp_path, sources, stop_in_epoch):
    """Seed 002: ×0.1 at the milestone epochs (here after epoch 1 instead of 110 and 160); the
    MultiStepLR lives in the checkpoint, so a run stopped in epoch 2 and resumed equals 2 epochs
    straight (one step of 4 crops per epoch)."""
    train, _ = sources
    kw = dict(img_size=40, batch_size=4, max_crops=4, seed=0, accelerator="cpu", progress=False,
              method_kwargs={"lr_milestones": [1]})
    stop_in_epoch(lambda: pretrain("autoencoder", "resnet18", train, tmp_path / "resumed", epochs=2, **kw), 1)
    a = pretrain("autoencoder", "resnet18", train, tmp_path / "resumed", epochs=2, **kw)
    b = pretrain("autoencoder", "resnet18", train, tmp_path / "straight", epochs=2, **kw)
    assert a["resumed_from_epoch"] == 1 and b["resumed_from_epoch"] is None
    ha, hb = pd.read_csv(tmp_path / "resumed" / "history.csv"), pd.read_csv(tmp_path / "straight" / "history.csv")
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    assert ha["lr"].tolist() == pytest.approx([1e-4, 1e-5])
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / name / "backbone.safetensors") for name in ("resumed", "straight"))
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    assert json.loads((tmp_path / "straight" / "pretrain.json").read_text())["config"]["lr"] == 1e-4


def test_stage_passes_method_settings_from_config(tmp_path, sources, monkeypatch):
    """``pretrain.methods.<method>``: lr and batch_size go to pretrain(), the rest to the module."""
    import sys

    from cellstage.ssl.stage import pretrain as stage_pretrain

    pre = sys.modules["cellstage.ssl.pretrain"]  # the package attribute is the function
    calls = {}
    monkeypatch.setattr(pre, "pretrain", lambda *a, **k: calls.update(k) or {})
    (zarr, index), = sources[0]
    stage_pretrain([zarr], [index], [], tmp_path, method="dense_simsiam", backbone="resnet18", img_size=40,
                   variant="images", epochs=1, batch_size=128, max_crops=None, seed=0, threads=None, devices=1,
                   method_settings={"lr": 0.002, "batch_size": 32, "stage_weights": [0.1, 0.4, 0.7, 1.0]})
    assert calls["lr"] == 0.002 and calls["batch_size"] == 32
    assert calls["method_kwargs"] == {"stage_weights": [0.1, 0.4, 0.7, 1.0]}
