"""SSL pretraining protocol of seed 000 §4.3: validation loss on the labelled train crops, the
best-validation-loss epoch exported, the unlabelled pool, per-method/per-backbone settings, and
the MAE reconstruction figure (Fig. A.2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_finetune import make_crop_source

from cellstage.ssl import METHODS, pretrain
from cellstage.ssl.settings import resolve_from_config, resolve_settings
from cellstage.utils import CellstageError

REPO = Path(__file__).resolve().parents[2]
VIT = "vit_tiny_patch16_224"
FAST = dict(img_size=40, batch_size=4, seed=0, accelerator="cpu", progress=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A train slide (8 labelled + 4 unlabelled cells) and an unlabelled slide (8 cells)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CPUs: one thread is steadier than two oversubscribed ones
    d = tmp_path_factory.mktemp("crops")
    train = make_crop_source(d, "s1_40x", n_per_class=1, n_unlabelled=4, seed=1)
    unlab = make_crop_source(d, "s9_40x", n_per_class=0, n_unlabelled=8, seed=3, split="unlabelled", patient="p9")
    yield {"train": train, "unlabelled": unlab}
    torch.set_num_threads(threads)


# --- settings: backbone > method > pretrain.* ------------------------------------------------
def test_backbone_settings_override_method_settings_which_override_pretrain():
    block = {"lr": 2e-3, "temperature": 0.2, "views": {"min_scale": 0.3, "cj_strength": 0.4},
             "backbones": {"resnet50": {"batch_size": 64, "temperature": 0.1, "views": {"min_scale": 0.5}},
                           "resnet18": {"epochs": 7}}}
    r50 = resolve_settings("simclr", "resnet50", epochs=200, batch_size=128, method_settings=block)
    assert (r50.epochs, r50.batch_size, r50.lr) == (200, 64, 2e-3)
    assert r50.method_kwargs == {"temperature": 0.1}
    assert r50.transform_kwargs == {"min_scale": 0.5, "cj_strength": 0.4}
    r18 = resolve_settings("simclr", "resnet18", epochs=200, batch_size=128, method_settings=block)
    assert (r18.epochs, r18.batch_size, r18.method_kwargs) == (7, 128, {"temperature": 0.2})
    plain = resolve_settings("dino", "resnet18", epochs=3, batch_size=16, method_settings=None)
    assert (plain.epochs, plain.batch_size, plain.lr, plain.method_kwargs) == (3, 16, None, {})


def test_unknown_setting_and_vit_only_method_give_config_errors():
    with pytest.raises(CellstageError, match=r"pretrain\.methods\.mae\.backbones\.vit_small_patch16_224.*mask_ration"):
        resolve_settings("mae", "vit_small_patch16_224", epochs=1, batch_size=4,
                         method_settings={"backbones": {"vit_small_patch16_224": {"mask_ration": 0.5}}})
    with pytest.raises(CellstageError, match=r"pretrain\.methods\.simsiam.*lr_patience"):  # Adam, no plateau
        resolve_settings("simsiam", "resnet18", epochs=1, batch_size=4, method_settings={"lr_patience": 3})
    with pytest.raises(CellstageError, match="needs a Vision Transformer"):
        resolve_settings("mae", "resnet101", epochs=1, batch_size=4)
    with pytest.raises(CellstageError, match="unknown method"):
        resolve_settings("byol", "resnet18", epochs=1, batch_size=4)


def test_schema_defaults_are_seed_000_values():
    """validate() fills the schema defaults: seed 000 §4.3 lr 1e-3 / 1.5e-4, ×0.25 patience 10,
    200 epochs, pool unlabelled; the demo config only shortens the epochs."""
    from snakemake.utils import validate

    schema = str(REPO / "workflow/schemas/config.schema.yaml")
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    validate(config, schema=schema)
    pre = config["pretrain"]
    assert pre["pool"] == "unlabelled" and pre["epochs"] == 3
    mae = resolve_from_config(pre, "mae", "vit_base_patch16_224")
    assert mae.lr == 1.5e-4 and mae.method_kwargs["mask_ratio"] == 0.75 and mae.method_kwargs["lr_factor"] == 0.25
    assert mae.method_kwargs["lr_patience"] == 10 and mae.epochs == 3
    dino = resolve_from_config(pre, "dino", "resnet50")
    assert dino.lr == 1e-3 and dino.transform_kwargs == {"n_local_views": 6}
    bare = {k: v for k, v in yaml.safe_load((REPO / "config/config.yaml").read_text()).items() if k != "pretrain"}
    validate(bare, schema=schema)
    assert bare["pretrain"]["epochs"] == 200 and bare["pretrain"]["pool"] == "unlabelled"
    for method in METHODS:  # every schema default is a key the method accepts
        resolve_from_config(bare["pretrain"], method, VIT)


# --- pool and validation crops ------------------------------------------------------------
@pytest.mark.parametrize("pool,n_pool,n_overlap", [("unlabelled", 8, 0), ("unlabelled+train", 20, 8)])
def test_pool_keeps_labelled_cells_out_unless_asked(tmp_path, sources, pool, n_pool, n_overlap):
    res = pretrain("simclr", "resnet18", [sources["unlabelled"], sources["train"]], tmp_path / pool, epochs=1,
                   val_sources=[sources["train"]], pool=pool, max_crops=None, checkpoint_every=0, **FAST)
    assert res["n_crops"] == n_pool and res["n_val_crops"] == 8 and res["n_val_crops_in_pool"] == n_overlap
    assert res["monitor"] == "val_loss" and res["config"]["pool"] == pool


def test_pool_without_crops_is_an_error(tmp_path, sources):
    with pytest.raises(CellstageError, match="pool 'unlabelled'"):
        pretrain("simclr", "resnet18", [sources["train"]], tmp_path / "x", epochs=1, pool="unlabelled", **FAST)


# --- best validation epoch ------------------------------------------------------------------
def test_best_validation_epoch_is_exported_and_recorded(tmp_path, sources):
    """3 epochs; the exported backbone is the best-val-loss epoch's: equal to a 'best_epoch'-epoch
    run's final weights; history.csv has both losses; pretrain.json names the epoch."""
    kw = dict(val_sources=[sources["train"]], pool="unlabelled", **FAST)
    a = pretrain("simclr", "resnet18", [sources["unlabelled"]], tmp_path / "three", epochs=3, **kw)
    hist = pd.read_csv(tmp_path / "three" / "history.csv")
    assert list(hist.columns) == ["epoch", "loss", "val_loss", "lr"]
    assert hist["epoch"].tolist() == [1, 2, 3] and np.isfinite(hist[["loss", "val_loss"]].to_numpy()).all()
    best = int(hist["epoch"][hist["val_loss"].idxmin()])
    info = json.loads((tmp_path / "three" / "pretrain.json").read_text())
    assert info["best_epoch"] == a["best_epoch"] == best
    assert info["best_val_loss"] == pytest.approx(hist["val_loss"].min())
    b = pretrain("simclr", "resnet18", [sources["unlabelled"]], tmp_path / "best", epochs=best, **kw)
    assert b["best_epoch"] == best
    wa, wb = (load_file(tmp_path / name / "backbone.safetensors") for name in ("three", "best"))
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    # the validation loss of an epoch does not depend on how long the run is (fixed views)
    hb = pd.read_csv(tmp_path / "best" / "history.csv")
    pd.testing.assert_frame_equal(hb, hist.iloc[:best], check_exact=True)
    assert not (tmp_path / "three" / "last.ckpt").exists()  # a finished run keeps no checkpoint (issue 15)
    heads = load_file(tmp_path / "three" / "heads.safetensors")
    assert heads and all(k.startswith("projection_head.") for k in heads)


def test_resumed_run_with_validation_equals_straight_run(tmp_path, sources, stop_in_epoch):
    kw = dict(val_sources=[sources["train"]], pool="unlabelled", **FAST)
    stop_in_epoch(lambda: pretrain("simclr", "resnet18", [sources["unlabelled"]], tmp_path / "resumed", epochs=2,
                                   **kw), 1)
    a = pretrain("simclr", "resnet18", [sources["unlabelled"]], tmp_path / "resumed", epochs=2, **kw)
    b = pretrain("simclr", "resnet18", [sources["unlabelled"]], tmp_path / "straight", epochs=2, **kw)
    assert a["resumed_from_epoch"] == 1
    assert (a["best_epoch"], a["best_val_loss"]) == (b["best_epoch"], b["best_val_loss"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed" / "history.csv"),
                                  pd.read_csv(tmp_path / "straight" / "history.csv"), check_exact=True)
    wa, wb = (load_file(tmp_path / n / "backbone.safetensors") for n in ("resumed", "straight"))
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_plateau_follows_the_validation_loss(tmp_path, sources):
    """lr_patience 0: the rate is ×0.25 after every epoch whose validation loss is not a new minimum."""
    res = pretrain("simclr", "resnet18", [sources["unlabelled"]], tmp_path / "p", epochs=3,
                   val_sources=[sources["train"]], method_kwargs={"lr_patience": 0}, lr=0.05, checkpoint_every=0,
                   **FAST)
    hist = pd.read_csv(tmp_path / "p" / "history.csv")
    expected, lr, best = [], 0.05, np.inf
    for v in hist["val_loss"]:
        expected.append(lr)
        lr, best = (lr, v) if v < best else (lr * 0.25, best)
    assert hist["lr"].tolist() == pytest.approx(expected)
    assert res["monitor"] == "val_loss"


def test_dino_validation_does_not_move_the_teacher_centre():
    from cellstage.ssl.dino import DINO

    model = DINO("resnet18", 40)
    model.log = lambda *a, **k: None
    model.criterion.center.fill_(0.5)
    before = model.criterion.center.clone()
    x, local = torch.rand(2, 3, 40, 40), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        model.validation_step(([x, x.flip(-1), local], None, None), 0)
    assert torch.equal(model.criterion.center, before)


# --- stage entry point (what rule pretrain calls) ------------------------------------------
def test_stage_resolves_backbone_settings_and_validates_on_the_train_crops(tmp_path, sources):
    from cellstage.ssl.stage import pretrain as stage_pretrain

    (uz, ui), (tz, ti) = sources["unlabelled"], sources["train"]
    res = stage_pretrain([uz], [ui], [], tmp_path / "run", method="mae", backbone=VIT, img_size=40, variant="images",
                         epochs=5, batch_size=128, max_crops=None, seed=0, threads=None, devices=1, pool="unlabelled",
                         method_settings={"mask_ratio": 0.5, "decoder_dim": 32, "decoder_num_heads": 4,
                                          "backbones": {VIT: {"epochs": 1, "batch_size": 6, "mask_ratio": 0.6}},
                                          "views": {"min_scale": 0.5}},
                         val_zarr_paths=[tz], val_index_paths=[ti])
    cfg = res["config"]
    assert (res["epochs"], cfg["batch_size"], cfg["lr"]) == (1, 6, 1.5e-4)
    assert cfg["method_kwargs"] == {"mask_ratio": 0.6, "decoder_dim": 32, "decoder_num_heads": 4}
    assert cfg["transform_kwargs"] == {"min_scale": 0.5}
    assert res["n_crops"] == 8 and res["n_val_crops"] == 8 and res["monitor"] == "val_loss"


# --- MAE reconstructions (seed 000 Fig. A.2) -----------------------------------------------
def test_mae_reconstruction_keeps_visible_patches_and_masks_the_ratio():
    from lightly.models import utils

    from cellstage.ssl.mae import MAE

    torch.manual_seed(0)
    model = MAE(VIT, 40, mask_ratio=0.75, decoder_dim=32, decoder_num_heads=4).eval()
    x = torch.randn(2, 3, 40, 40)
    masked, recon = model.reconstruct(x)
    p_in, p_masked, p_recon = (utils.patchify(t, model.patch_size) for t in (x, masked, recon))
    blank = (p_masked == 0).all(dim=-1)  # (B, 100) masked patches
    assert blank.sum(dim=1).tolist() == [75, 75]
    assert torch.equal(p_masked[~blank], p_in[~blank]) and torch.equal(p_recon[~blank], p_in[~blank])
    assert not torch.allclose(p_recon[blank], p_in[blank])


def test_mae_reconstructions_figure_from_exported_weights(tmp_path, sources):
    """Rule mae_reconstructions: a fresh MAE with the run's exported backbone + heads (best epoch)
    draws input / masked / reconstruction of validation crops."""
    from PIL import Image

    from cellstage.ssl.stage import mae_reconstructions

    run = tmp_path / "mae"
    pretrain("mae", VIT, [sources["unlabelled"]], run, epochs=1, val_sources=[sources["train"]],
             method_kwargs={"decoder_dim": 32, "decoder_num_heads": 4}, checkpoint_every=0, **FAST)
    heads = load_file(run / "heads.safetensors")
    assert {k.split(".")[0] for k in heads} == {"decoder_embed", "decoder", "prediction_head"}
    (tz, ti) = sources["train"]
    out = tmp_path / "reconstructions.png"
    mae_reconstructions(run, [tz], [ti], out, n_crops=8, seed=0)
    w, h = Image.open(out).size
    assert w > h > 0  # 3 rows x 8 crops
    simclr = tmp_path / "simclr"
    pretrain("simclr", "resnet18", [sources["unlabelled"]], simclr, epochs=1, checkpoint_every=0, **FAST)
    with pytest.raises(CellstageError, match="not 'mae'"):
        mae_reconstructions(simclr, [tz], [ti], tmp_path / "x.png")


def test_stain_augmentation_reaches_every_view_and_is_recorded(tmp_path, sources):
    """pretrain.augment (issue 12 item 6): HED jitter in front of every view and per-slide Macenko
    normalisation of pool and validation crops change what is learnt, are recorded with the run,
    and the same seed gives the same weights."""
    kw = dict(val_sources=[sources["train"]], pool="unlabelled", epochs=1, checkpoint_every=0, **FAST)
    aug = {"hed_jitter": {"p": 1.0, "sigma": 0.2, "bias": 0.05}, "macenko": True, "macenko_reference": None}
    plain = pretrain("simclr", "resnet18", [sources["unlabelled"]], tmp_path / "plain", **kw)
    a = pretrain("simclr", "resnet18", [sources["unlabelled"]], tmp_path / "a", augment=aug, **kw)
    pretrain("simclr", "resnet18", [sources["unlabelled"]], tmp_path / "b", augment=aug, **kw)
    assert a["config"]["augment"] == aug and plain["config"]["augment"] == {}
    wp, wa, wb = (load_file(tmp_path / n / "backbone.safetensors") for n in ("plain", "a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wp[k]) for k in wa if wa[k].is_floating_point())
    assert a["best_val_loss"] != plain["best_val_loss"]
