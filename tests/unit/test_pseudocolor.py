"""Seed 001 pseudo-colourising masked cells: padded masking (patch, band, mean ratio), the colormap
target, the Adam/plateau schedule, training lowers the loss, and a pretrain run whose backbone loads
into fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_finetune import make_crop_source

from cellstage.ssl import pseudocolor as pc
from cellstage.utils import CellstageError


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_patch_and_band_follow_seed_001_scaled_to_the_crop():
    """12 px patches with ¼-patch bands at 384 px; scaled down, at least 4 px so the band is 1 px."""
    assert pc.mask_geometry(384) == (12, 3)
    assert pc.mask_geometry(80) == pc.mask_geometry(40) == (4, 1)
    assert pc.mask_geometry(224) == (7, 2)
    assert pc.mask_geometry(80, patch=8, padding=0.5) == (8, 4)


@pytest.mark.parametrize("size", [80, 384])
def test_padded_mask_masks_whole_patches_never_bands_and_a_third_on_average(size):
    patch, band = pc.mask_geometry(size)
    period = patch + band
    torch.manual_seed(0)
    masks = pc.padded_mask(400, size, size, patch, band, 0.5)
    assert masks.shape == (400, size, size) and masks.dtype == torch.bool
    pos = torch.arange(size)
    in_patch = (pos % period) >= band
    assert not masks[:, ~in_patch, :].any() and not masks[:, :, ~in_patch].any()  # bands stay visible
    # every patch is masked as a whole or not at all (one U{0,1} draw per patch)
    n = size // period
    blocks = masks[:, : n * period, : n * period].reshape(400, n, period, n, period)[:, :, band:, :, band:]
    assert torch.equal(blocks.amin(dim=(2, 4)), blocks.amax(dim=(2, 4)))
    assert blocks.amax(dim=(2, 4)).float().mean().item() == pytest.approx(0.5, abs=0.01)  # p = 0.5
    ratio = masks.float().mean().item()
    assert ratio == pytest.approx(pc.expected_mask_ratio(size, size, patch, band, 0.5), abs=0.005)
    assert ratio == pytest.approx(1 / 3, abs=0.02)  # seed 001: "the overall mean masking ratio becomes 33.3%"


def test_authors_code_geometry_and_no_masking_are_settings():
    """mask_padding 0.5 = cell-centroid-former's padded_masking.py (¼ on every side): 22%;
    mask_prob 0 = Table 1's rows without masking."""
    assert pc.expected_mask_ratio(384, 384, *pc.mask_geometry(384, padding=0.5), 0.5) == pytest.approx(0.215, abs=0.001)
    assert not pc.padded_mask(8, 80, 80, 4, 1, 0.0).any()


@pytest.mark.parametrize("name", pc.COLORMAPS)
def test_target_of_a_uniform_crop_is_the_colormap_colour_of_its_intensity(name):
    from matplotlib import colormaps

    rgb = torch.tensor([100, 140, 60], dtype=torch.float32) / 255  # luminance 0.299 R + 0.587 G + 0.114 B
    v = float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    crop = rgb.view(1, 3, 1, 1).expand(2, 3, 16, 16)
    target = pc.pseudocolor(pc.luminance(crop), pc.colormap_lut(name))
    expected = torch.tensor(colormaps[name](v)[:3], dtype=torch.float32).view(1, 3, 1, 1).expand_as(target)
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-6)
    # the extremes: black and white crops take the first and last colours
    ends = pc.pseudocolor(torch.tensor([[[0.0, 1.0]]]), pc.colormap_lut(name))[0, :, 0].T
    torch.testing.assert_close(ends, torch.tensor(colormaps[name]([0.0, 1.0])[:, :3], dtype=torch.float32))


def test_module_input_is_the_masked_grey_crop_and_target_its_colours():
    from matplotlib import colormaps

    model = pc.PseudoColor("resnet18", 40, colormap="viridis")
    crop = torch.full((3, 3, 40, 40), 0.6)
    torch.manual_seed(1)
    x, target, mask = model.inputs_and_targets(crop)
    grey = x * model.input_std + model.input_mean  # undo the ImageNet normalisation
    assert torch.allclose(grey[:, 0], grey[:, 2], atol=1e-6)  # grey on 3 channels
    assert torch.allclose(grey[:, 0][mask], torch.tensor(0.0), atol=1e-6)  # masked: zero
    assert torch.allclose(grey[:, 0][~mask], torch.tensor(0.6), atol=1e-6)
    assert 0.2 < mask.float().mean() < 0.45
    torch.testing.assert_close(
        target[:, :, 0, 0], torch.tensor([colormaps["viridis"](0.6)[:3]] * 3, dtype=torch.float32), rtol=0, atol=1e-6
    )
    assert torch.equal(target[:, :, 5, 5], target[:, :, 0, 0])  # the target ignores the mask


def test_unknown_colormap_is_refused_naming_the_config_key():
    with pytest.raises(CellstageError, match=r"pretrain\.methods\.pseudocolor\.colormap.*'jet'.*nipy_spectral"):
        pc.PseudoColor("resnet18", 40, colormap="jet")
    with pytest.raises(CellstageError, match=r"pretrain\.methods\.pseudocolor\.mask_prob"):
        pc.PseudoColor("resnet18", 40, mask_prob=1.5)


def test_adam_1e4_plateau_x0_1_down_to_1e6():
    """Seed 001 §4.2: Adam 1e-4, ×0.1 on plateaus, minimum 1e-6."""
    model = pc.PseudoColor("resnet18", 40, lr_patience=0)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["weight_decay"] == 0
    lrs = []
    for _ in range(4):
        model.lr_schedule.step(1.0)  # a flat monitored loss
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-4, 1e-5, 1e-6, 1e-6])


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    yy, xx = np.mgrid[:40, :40]
    disc = torch.tensor(((yy - 20) ** 2 + (xx - 20) ** 2 < 100).astype(np.float32))
    crops = (0.85 - 0.55 * disc).expand(2, 3, 40, 40).clone()  # dark nucleus on a pale background
    model = pc.PseudoColor("resnet18", 40, decoder_blocks=0, min_decoder_width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss():
        torch.manual_seed(7)  # the same masks at every evaluation
        return model.ssl_loss(([crops], None, None))[0]

    model.train()
    first = loss()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        last = loss()
    assert last.item() < 0.5 * first.item(), (first.item(), last.item())


def test_encoder_decoder_on_a_vision_transformer():
    """Any timm backbone: a ViT's last block as a feature map, decoded to the crop size."""
    model = pc.PseudoColor("vit_tiny_patch16_224", 40, decoder_blocks=0)
    with torch.no_grad():
        out = model(model.inputs_and_targets(torch.rand(2, 3, 40, 40))[0])
    assert out.shape == (2, 3, 40, 40)


def test_pretrain_exports_a_backbone_that_loads_for_fine_tuning(tmp_path):
    from cellstage.ssl import METHODS, pretrain
    from cellstage.train.classifier import load_pretrained
    from cellstage.training.backbones import create_backbone
    from cellstage.training.resume import seed_all

    source = make_crop_source(tmp_path, "s1_40x", n_per_class=1, n_unlabelled=4, seed=1)
    out = tmp_path / "pretrain"
    res = pretrain(
        "pseudocolor",
        "resnet18",
        [source],
        out,
        img_size=40,
        epochs=1,
        batch_size=4,
        max_crops=4,
        val_sources=[source],
        seed=0,
        accelerator="cpu",
        progress=False,
        method_kwargs={"colormap": "rainbow"},
        transform_kwargs={"degrees": 30.0},
    )
    assert res["steps_per_epoch"] == 1 and res["monitor"] == "val_loss" and res["best_epoch"] == 1
    hist = pd.read_csv(out / "history.csv")
    assert np.isfinite(hist["loss"]).all() and np.isfinite(hist["val_loss"]).all()
    assert hist["lr"].tolist() == pytest.approx([1e-4])
    info = json.loads((out / "pretrain.json").read_text())
    assert info["config"]["hparams"]["colormap"] == "rainbow" and info["config"]["lr"] == 1e-4

    backbone = create_backbone("resnet18", img_size=40)
    load_pretrained(backbone, out / "backbone.safetensors", "resnet18")  # strict, as fine-tuning loads it
    seed_all(0)  # pretrain's initial weights: the module made right after seeding
    init = METHODS["pseudocolor"].module("resnet18", 40).export_backbone().state_dict()
    trained = backbone.state_dict()
    assert init.keys() == trained.keys()
    assert any(not torch.equal(init[k], trained[k]) for k in init if init[k].is_floating_point())
    with torch.no_grad():
        assert backbone.eval()(torch.rand(2, 3, 40, 40)).shape == (2, 512)
