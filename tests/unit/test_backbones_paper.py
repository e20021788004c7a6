"""Every backbone of seed 000 (§4.2: ResNet-18/50/101, ViT-T/S/B) runs one short step of every
applicable pretraining method (§4.3: SimCLR and DINO on all six, MAE on the ViTs only) and of
fine-tuning from the pretrained weights, at the 20× crop size (40 px, ViT patch 4: 10×10 tokens)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_finetune import make_crop_source

from cellstage.ssl import METHODS, pretrain
from cellstage.ssl.settings import check_applicable, resolve_settings
from cellstage.training.backbones import create_backbone, feature_dim, load_weights
from cellstage.utils import CellstageError

# seed 000 §4.2 name -> (timm name, pooled feature width)
PAPER_BACKBONES = {
    "ResNet18": ("resnet18", 512),
    "ResNet50": ("resnet50", 2048),
    "ResNet101": ("resnet101", 2048),
    "ViT-T": ("vit_tiny_patch16_224", 192),
    "ViT-S": ("vit_small_patch16_224", 384),
    "ViT-B": ("vit_base_patch16_224", 768),
}
PAPER_METHODS = ("simclr", "dino", "mae")
ONE_STEP = dict(img_size=40, epochs=1, batch_size=2, max_crops=2, seed=0, accelerator="cpu", progress=False,
                checkpoint_every=0)
VIEWS = {"dino": {"n_local_views": 1}}  # two global views + one local (16 px: 4x4 patches)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Pool: 2 unlabelled crops; validation: 2 labelled; fine-tuning: 16 labelled (2 folds of 8), a test slide."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CPUs: one thread is steadier than two oversubscribed ones
    d = tmp_path_factory.mktemp("crops")
    pool = make_crop_source(d, "s9_20x", n_per_class=0, n_unlabelled=2, seed=3, split="unlabelled", patient="p9")
    train = make_crop_source(d, "s1_20x", n_per_class=2, n_unlabelled=0, seed=1)
    test = make_crop_source(d, "s2_20x", n_per_class=1, n_unlabelled=0, seed=2, split="test", patient="p2")
    val_index = d / "s1_20x.val.parquet"
    pd.read_parquet(train[1]).head(2).to_parquet(val_index, index=False)
    yield {"pool": pool, "val": (train[0], str(val_index)), "train": train, "test": test}
    torch.set_num_threads(threads)


def test_method_backbone_applicability_follows_the_paper():
    """MAE on ViTs only (a clear config error for a ResNet); SimCLR and DINO on all six."""
    for name, (timm_name, _) in PAPER_BACKBONES.items():
        for method in PAPER_METHODS:
            if method == "mae" and name.startswith("ResNet"):
                with pytest.raises(CellstageError, match=f"mae.*needs a Vision Transformer.*{timm_name}"):
                    check_applicable(method, timm_name)
                with pytest.raises(CellstageError, match="needs a Vision Transformer"):
                    resolve_settings(method, timm_name, epochs=1, batch_size=2)
            else:
                check_applicable(method, timm_name)
    assert [m for m in METHODS if METHODS[m].vit_only] == ["mae"]


@pytest.mark.parametrize("paper_name", list(PAPER_BACKBONES))
def test_backbone_pretrains_with_each_applicable_method_and_finetunes(tmp_path, sources, paper_name):
    from cellstage.train import run_fold

    timm_name, width = PAPER_BACKBONES[paper_name]
    model = create_backbone(timm_name, img_size=40)
    assert feature_dim(model) == width
    if timm_name.startswith("vit"):  # seed 000 §4.2: patch 4 at 40 px (20x), 8 at 80 px (40x): 100 tokens
        assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.num_patches == 100
        big = create_backbone(timm_name, img_size=80)
        assert big.patch_embed.patch_size == (8, 8) and big.patch_embed.num_patches == 100
        del big
    methods = [m for m in PAPER_METHODS if not (METHODS[m].vit_only and not timm_name.startswith("vit"))]
    assert len(methods) == (3 if timm_name.startswith("vit") else 2)
    for method in methods:
        out = tmp_path / method
        res = pretrain(method, timm_name, [sources["pool"]], out, val_sources=[sources["val"]],
                       transform_kwargs=VIEWS.get(method), **ONE_STEP)
        assert res["steps_per_epoch"] == 1 and res["n_val_crops"] == 2 and res["best_epoch"] == 1
        assert np.isfinite(res["final_loss"]) and np.isfinite(res["best_val_loss"])
        loaded = load_weights(create_backbone(timm_name, img_size=40), out / "backbone.safetensors")
        with torch.no_grad():
            feats = loaded.eval()(torch.rand(2, 3, 40, 40))
        assert feats.shape == (2, width) and torch.isfinite(feats).all()

    weights = tmp_path / "simclr" / "backbone.safetensors"
    m = run_fold([sources["train"]], [sources["test"]], tmp_path / "fold0", fold=0, n_folds=2, backbone=timm_name,
                 pretrained_path=weights, recipe={"name": "baseline", "epochs": 1}, batch_size=8, progress=False,
                 accelerator="cpu", checkpoint_every=0)
    assert m["config"]["pretrained_path"] == str(weights) and m["config"]["img_size"] == 40
    assert np.isfinite(m["val"]["top1"]) and np.isfinite(m["test"]["top1"])
