"""Stain augmentation (HED jitter) and per-slide Macenko normalisation (cellstage.training.stain)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cellstage.training.stain import (
    HEDJitter,
    SlideStainNormaliser,
    add_hed_jitter,
    default_reference,
    fit_macenko,
    hed_to_rgb,
    macenko_map,
    rgb_to_hed,
)
from cellstage.utils import CellstageError


def tissue_like(seed=0, size=32) -> np.ndarray:
    """uint8 (size, size, 3) crop of pinkish/purplish colours (no channel saturates)."""
    rng = np.random.default_rng(seed)
    base = np.array([180, 120, 170], float)
    img = base + rng.normal(0, 25, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    nucleus = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    img[nucleus] = np.array([90, 60, 140]) + rng.normal(0, 10, (int(nucleus.sum()), 3))
    return np.clip(img, 20, 235).astype(np.uint8)


# ------------------------------------------------------------------------- HED jitter
def test_hed_conversion_matches_skimage_and_inverts():
    from skimage.color import hed_from_rgb, rgb2hed, rgb_from_hed

    from cellstage.training.stain import HED_FROM_RGB, RGB_FROM_HED

    np.testing.assert_allclose(RGB_FROM_HED, rgb_from_hed, atol=1e-12)
    np.testing.assert_allclose(HED_FROM_RGB, hed_from_rgb, atol=1e-12)

    img = tissue_like()
    rgb = torch.from_numpy(img).double() / 255
    hed = rgb_to_hed(rgb)
    ref = rgb2hed(img)  # skimage clips negative concentrations at 0
    pos = (hed > 0).numpy()
    np.testing.assert_allclose(hed.numpy()[pos], ref[pos], atol=1e-9)
    np.testing.assert_allclose(hed_to_rgb(hed).numpy(), rgb.numpy(), atol=1e-9)


def test_hed_jitter_sigma_zero_is_identity_for_every_input_type():
    jit = HEDJitter(sigma=0.0, bias=0.0, p=1.0)
    img = tissue_like()
    out = jit(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.abs(out.astype(int) - img).max() <= 1  # uint8 rounding
    pil = jit(Image.fromarray(img))
    assert isinstance(pil, Image.Image) and np.abs(np.asarray(pil).astype(int) - img).max() <= 1
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    tout = jit(t)
    assert tout.dtype == torch.float32 and tout.shape == t.shape
    assert (tout - t).abs().max() < 1e-5
    u8 = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    assert (jit(u8).int() - u8.int()).abs().max() <= 1


def test_hed_jitter_changes_only_the_jittered_stain_channel():
    img = torch.from_numpy(tissue_like(1)).permute(2, 0, 1).double() / 255
    jit = HEDJitter(sigma=(0.3, 0.0, 0.0), bias=0.0, p=1.0)  # haematoxylin only
    torch.manual_seed(3)
    out = jit(img)
    hed_in = rgb_to_hed(img.permute(1, 2, 0))
    hed_out = rgb_to_hed(out.permute(1, 2, 0))
    assert not torch.allclose(out, img)
    # E and DAB untouched; H scaled by one factor (1 + alpha), |alpha| <= 0.3, for every pixel
    torch.testing.assert_close(hed_out[..., 1:], hed_in[..., 1:], atol=1e-9, rtol=0)
    ratio = hed_out[..., 0] / hed_in[..., 0]
    assert ratio.std() < 1e-9 and 0.7 <= float(ratio.mean()) <= 1.3 and abs(float(ratio.mean()) - 1) > 1e-4
    # a bias on E (more eosin: darker, nothing clips) shifts E by that constant, H and D untouched
    beta = torch.tensor([0.0, 0.04, 0.0], dtype=torch.float64)
    out_b = jit.jitter_hwc(img.permute(1, 2, 0), torch.zeros(3, dtype=torch.float64), beta)
    d = rgb_to_hed(out_b) - hed_in
    torch.testing.assert_close(d, beta.expand_as(d), atol=1e-9, rtol=0)


def test_hed_jitter_is_seeded_by_the_torch_rng():
    img = tissue_like(2)
    jit = HEDJitter(sigma=0.1, bias=0.05, p=1.0)
    torch.manual_seed(7)
    a = jit(img)
    torch.manual_seed(7)
    b = jit(img)
    torch.manual_seed(8)
    c = jit(img)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).max() > 0
    # p = 0 never changes the crop; config with p 0 builds no transform at all
    assert np.array_equal(HEDJitter(0.5, 0.5, p=0.0)(img), img)
    assert HEDJitter.from_config({"p": 0.0, "sigma": 0.05, "bias": 0.05}) is None
    assert HEDJitter.from_config({"p": 0.5, "sigma": 0.1, "bias": 0.0}).p == 0.5
    with pytest.raises(CellstageError, match="hed_jitter.sigma"):
        HEDJitter(sigma=(0.1, 0.2))


def test_hed_jitter_in_every_view_of_a_lightly_transform():
    from lightly.transforms import SimCLRTransform

    tf = add_hed_jitter(SimCLRTransform(input_size=32, cj_prob=0.0, random_gray_scale=0.0),
                        HEDJitter(0.05, 0.05))
    assert all("HEDJitter" in repr(v) for v in tf.transforms)
    views = tf(Image.fromarray(tissue_like()))
    assert len(views) == 2 and views[0].shape == (3, 32, 32)


# ---------------------------------------------------------------------------- Macenko
ROTATED = np.array([[0.65, 0.35], [0.70, 0.90], [0.29, 0.25]])  # other H and second-stain vectors


def synthetic_slide(stain_matrix, max_scale, n=24, size=32, seed=0):
    """Crops rendered from one set of stain concentrations with ``stain_matrix`` (Beer-Lambert)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    conc = np.empty((n, size, size, 2))
    for i in range(n):
        cy, cx = rng.uniform(8, size - 8, 2)
        nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(16, 49)
        # nucleus: mostly haematoxylin; around it: mostly the second stain; a little of the other
        conc[i, ..., 0] = np.where(nucleus, rng.uniform(0.8, 1.6), 0.0) + rng.gamma(1, 0.01, (size, size))
        conc[i, ..., 1] = np.where(nucleus, 0.0, rng.uniform(1.0, 1.8)) + rng.gamma(1, 0.01, (size, size))
    he = np.asarray(stain_matrix, float) / np.linalg.norm(stain_matrix, axis=0)
    img = 240 * np.exp(-(conc * np.asarray(max_scale)) @ he.T)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_source(tmp_path, name, images):
    import zarr

    z = tmp_path / f"{name}.zarr"
    g = zarr.open_group(str(z), mode="w")
    a = g.create_array("images", shape=images.shape, dtype=images.dtype, chunks=(16, *images.shape[1:]))
    a[:] = images
    idx = tmp_path / f"{name}.parquet"
    pd.DataFrame({"row": np.arange(len(images)), "slide": name}).to_parquet(idx)
    return str(z), str(idx)


def test_macenko_maps_a_restained_slide_closer_to_the_reference(tmp_path):
    reference = default_reference()
    ref_imgs = synthetic_slide(reference.stain_matrix, (1.0, 1.0))
    restained = synthetic_slide(ROTATED, (1.3, 0.8))  # same tissue, other stains and intensities
    sources = [write_source(tmp_path, "ref", ref_imgs), write_source(tmp_path, "other", restained)]

    norm = SlideStainNormaliser.from_sources(sources, reference_slide="ref")
    out = norm(restained, "other")
    before = np.abs(restained.astype(float) - ref_imgs).mean()
    after = np.abs(out.astype(float) - ref_imgs).mean()
    print(f"mean |RGB - reference|: before {before:.1f}, after {after:.1f}")
    assert after < 0.1 * before
    # the fitted stain vectors of the re-stained slide are the ones it was rendered with
    fit = norm.fits["other"]
    cos = np.abs((fit.stain_matrix / np.linalg.norm(fit.stain_matrix, axis=0)).T
                 @ (ROTATED / np.linalg.norm(ROTATED, axis=0)))
    assert cos[0, 0] > 0.98 and cos[1, 1] > 0.98
    # the reference slide maps (nearly) onto itself
    assert np.abs(norm(ref_imgs, "ref").astype(float) - ref_imgs).mean() < 3
    # record is JSON-serialisable; the built-in reference works too; unknown reference is an error
    json.dumps(norm.to_dict())
    built_in = SlideStainNormaliser.from_sources(sources)
    assert built_in.reference_name == "torchstain-default"
    # both slides mapped to the built-in target look alike (the target itself is neither of them)
    same = np.abs(built_in(restained, "other").astype(float) - built_in(ref_imgs, "ref")).mean()
    assert same < 0.1 * before
    with pytest.raises(CellstageError, match="macenko_reference"):
        SlideStainNormaliser.from_sources(sources, reference_slide="nope")
    # the config form every trainer uses
    from cellstage.training.stain import stain_options

    jitter, by_config = stain_options({"hed_jitter": {"p": 0.2, "sigma": 0.1, "bias": 0.0}, "macenko": True,
                                       "macenko_reference": "ref"}, sources)
    assert jitter.p == 0.2 and by_config.to_dict() == norm.to_dict()
    assert stain_options({}, sources) == (None, None)
    with pytest.raises(CellstageError, match="unknown keys"):
        stain_options({"macenko_ref": "ref"}, sources)


def test_macenko_keeps_masked_background_black_and_rejects_blank_slides():
    imgs = synthetic_slide(ROTATED, (1.0, 1.0), n=4)
    fit = fit_macenko(imgs)
    masked = imgs.copy()
    masked[:, :8] = 0
    out = macenko_map(masked, fit, default_reference())
    assert (out[:, :8] == 0).all() and out[:, 8:].max() > 0
    np.testing.assert_array_equal(fit_macenko(masked).stain_matrix.round(2), fit.stain_matrix.round(2))
    with pytest.raises(CellstageError, match="Macenko fit failed"):
        fit_macenko(np.full((2, 8, 8, 3), 250, np.uint8))


# ----------------------------------------------------------------- fine-tuning fold
def test_datamodule_normalises_per_slide_and_run_fold_trains_with_both_options(tmp_path):
    from test_finetune import make_crop_source

    from cellstage.train import run_fold
    from cellstage.training.data import CropDataModule

    train = [make_crop_source(tmp_path, "s1_20x", n_per_class=4, size=32, seed=1)]
    test = [make_crop_source(tmp_path, "s2_20x", n_per_class=2, size=32, seed=2, split="test", patient="p2")]
    augment = {"hed_jitter": {"p": 0.5, "sigma": 0.05, "bias": 0.05}, "macenko": True,
               "macenko_reference": "s1_20x"}

    dm = CropDataModule(train, test, fold=0, n_folds=2, batch_size=8, hed_jitter=augment["hed_jitter"],
                        macenko=True, macenko_reference="s1_20x")
    dm.setup("fit")
    raw = CropDataModule(train, test, fold=0, n_folds=2, batch_size=8)
    raw.setup("fit")
    norm = dm.stain
    assert sorted(norm.fits) == ["s1_20x", "s2_20x"]
    i = 0
    expected = norm(raw.test_ds.image(i), "s2_20x")
    np.testing.assert_array_equal(dm.test_ds.image(i), expected)
    assert not np.array_equal(dm.test_ds.image(i), raw.test_ds.image(i))
    assert "HEDJitter" in repr(dm.train_ds.transform) and "HEDJitter" not in repr(dm.val_ds.transform)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [run_fold(train, test, tmp_path / name, fold=0, n_folds=2, backbone="resnet18",
                         recipe={"name": "baseline", "epochs": 1}, batch_size=16, progress=False,
                         accelerator="cpu", augment=augment) for name in ("fold0", "again")]
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "fold0" / "metrics.json").read_text())
    assert saved["config"]["augment"] == augment
    assert saved["stain"]["reference"] == "s1_20x" and set(saved["stain"]["slides"]) == {"s1_20x", "s2_20x"}
    assert saved["normalisation"]["mean"] == pytest.approx(dm.mean)
    m = runs[0]
    assert m["test"]["n"] == len(dm.test_index)
    # same seed, same augmentation draws: identical predictions
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "fold0" / "predictions.parquet"),
                                  pd.read_parquet(tmp_path / "again" / "predictions.parquet"))
