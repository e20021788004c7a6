"""Seed 004 CTFM (issue 12 item 4): a 20x context field and the 40x crops of the cells inside it, two
backbones, a masked jigsaw fusion; trained through ``pretrain`` like every registered method."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from test_finetune import make_crop_source
from test_ssl import write_crop_source

from cellstage.crops.extract import gather_windows, window_origin
from cellstage.ssl import METHODS, pretrain
from cellstage.ssl.crossscan import pair_rows
from cellstage.ssl.ctfm import CTFM, ContextTargetDataset, make_transform, masked_jigsaw
from cellstage.training.backbones import create_backbone, load_weights
from cellstage.training.data import ZarrCropDataset, load_index
from cellstage.utils import CellstageError

SIZE_40X, SIZE_20X = 40, 20  # test crops: the same field of view at both scans (80/40 px in the config)
GRID = [(60 + 30 * i, 60 + 30 * j) for j in range(4) for i in range(4)]  # 40x centres, 30 px apart
ISOLATED = (400, 400)  # a cell with no neighbour inside its field
TINY = "test_resnet"  # timm's 0.4 M-parameter test ResNet (96 features, 4 stages): seed 004's settings, fast


@pytest.fixture(autouse=True, scope="module")
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cut(image: np.ndarray, xs, ys, size: int) -> np.ndarray:
    """Crops of ``image`` at centres (xs, ys) by the crop stage's window rule, white outside."""
    pad = size
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    return gather_windows(padded, window_origin(ys, size) + pad, window_origin(xs, size) + pad, size)


def _write_scan(d, slide: str, slide_image: np.ndarray, centres: np.ndarray, size: int) -> tuple[str, str]:
    """A crop source (test_ssl.write_crop_source) whose crops are windows of ``slide_image`` at
    ``centres`` (level-0 px of this scan); every other cell labelled on a train slide."""
    zpath, ipath = write_crop_source(d, n=len(centres), size=size, slide=slide)
    crops = _cut(slide_image, centres[:, 0], centres[:, 1], size)
    zarr.open_group(zpath, mode="r+")["images"][:] = crops
    index = pd.read_parquet(ipath)
    index["centroid_x"], index["centroid_y"] = centres[:, 0], centres[:, 1]
    index["split"] = "train"
    index["label_idx"] = np.where(np.arange(len(index)) % 2 == 0, np.arange(len(index)) % 8, -1)
    index.to_parquet(ipath)
    return zpath, ipath


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two sections whose cells sit at the same positions (a field must not mix them), each scanned
    at 20x (a random slide) and 40x (the same slide, twice the pixels); crops cut from the slides."""
    d = tmp_path_factory.mktemp("ctfm")
    rng = np.random.default_rng(0)
    centres_40x = np.array([*GRID, ISOLATED], dtype=float)
    out = {"40x": [], "20x": [], "slides_20x": {}}
    for section in ("s1", "s2"):
        slide_20x = rng.integers(0, 230, (260, 260, 3), dtype=np.uint8)
        slide_40x = slide_20x.repeat(2, axis=0).repeat(2, axis=1)
        out["40x"].append(_write_scan(d, f"{section}_40x", slide_40x, centres_40x, SIZE_40X))
        out["20x"].append(_write_scan(d, f"{section}_20x", slide_20x, centres_40x / 2, SIZE_20X))
        out["slides_20x"][section] = slide_20x
    return out


def _dataset(scans, own="40x", variant="images", **kw) -> ContextTargetDataset:
    partner = "20x" if own == "40x" else "40x"
    own_idx, partner_idx = load_index(scans[own]), load_index(scans[partner])
    rows, pos = pair_rows(own_idx, partner_idx)
    return ContextTargetDataset(ZarrCropDataset(rows, variant), ZarrCropDataset(partner_idx, variant), pos,
                                make_transform(SIZE_40X), **kw)


@pytest.mark.parametrize("own", ["40x", "20x"])
def test_field_holds_the_nearest_cells_of_the_same_section_inside_its_extent(scans, own):
    ds = _dataset(scans, own=own)  # the run's scan may be either: roles follow the crop size
    assert ds.target_size == SIZE_40X and ds.context_size == SIZE_20X and ds.field_px == 2 * SIZE_20X
    half = 2 * SIZE_40X / 2  # the field (2 crop edges) around the anchor, in 40x px
    target = ds.target.index
    for i in range(len(ds)):
        cells = ds.targets[i]
        anchor = target.iloc[ds.anchor_target[i]]
        found = target.iloc[cells]
        assert len(cells) == 4 and cells[0] == ds.anchor_target[i]  # the anchor is its own nearest cell
        assert (found["section"] == anchor["section"]).all()  # never the other section's cell at the same spot
        offsets = found[["centroid_x", "centroid_y"]].to_numpy() - anchor[["centroid_x", "centroid_y"]].to_numpy(float)
        assert (np.abs(offsets) <= half).all()
        dist = np.hypot(*offsets.T)
        assert (np.diff(dist) >= 0).all()  # nearest first
    # an interior grid cell has 8 neighbours in its field: 4 distinct targets; the isolated cell only itself
    interior = next(i for i in range(len(ds)) if tuple(target.iloc[ds.anchor_target[i]][["centroid_x", "centroid_y"]])
                    == GRID[5])
    assert len(set(ds.targets[interior])) == 4
    isolated = next(i for i in range(len(ds)) if target.iloc[ds.anchor_target[i]]["centroid_x"] == ISOLATED[0])
    assert list(ds.targets[isolated]) == [ds.anchor_target[isolated]] * 4  # padded by repetition


def test_context_field_is_the_20x_slide_wherever_a_crop_covers_it(scans):
    ds = _dataset(scans)
    slide = np.pad(scans["slides_20x"]["s2"], ((100, 100), (100, 100), (0, 0)), constant_values=255)

    def anchor_and_truth(centre_40x):
        i = next(i for i in range(len(ds)) if tuple(ds.own.index.loc[i, ["centroid_x", "centroid_y"]]) == centre_40x
                 and ds.own.index.loc[i, "section"] == "s2")
        x0, y0 = window_origin(np.array(centre_40x) / 2, 2 * SIZE_20X) + 100
        return i, slide[y0: y0 + 2 * SIZE_20X, x0: x0 + 2 * SIZE_20X]

    inner, truth = anchor_and_truth(GRID[5])  # 20x crops every 15 px around it: the field is covered
    context, targets = ds.field(inner)
    assert context.shape == (2 * SIZE_20X, 2 * SIZE_20X, 3) and targets.shape == (4, SIZE_40X, SIZE_40X, 3)
    assert np.array_equal(context, truth)  # the 20x slide itself, twice the crop's field
    assert np.array_equal(targets[0], ds.target.image(ds.anchor_target[inner]))
    corner, truth = anchor_and_truth(GRID[0])  # no cell up and left of it: that strip is white
    context = ds.field(corner)[0]
    white = (context == 255).all(axis=2)
    assert np.array_equal(context[~white], truth[~white]) and white[:10].all() and white[:, :10].all()
    assert not white[10:, 10:].any()
    views, _, _ = ds[inner]
    assert [tuple(v.shape) for v in views] == [(3, 40, 40)] * 2 + [(4, 3, 40, 40)] * 2
    masked = _dataset(scans, variant="masked").field(inner)[0]
    assert masked.shape == context.shape and masked.max() > 0  # nuclei combined on black


def test_masked_jigsaw_masks_half_the_targets_and_shuffles_them_with_the_seed():
    targets = torch.randn(256, 4, 8)
    out, perm, mask = masked_jigsaw(targets, 0.5, generator=torch.Generator().manual_seed(3))
    assert (mask.sum(dim=1) == 2).all()  # seed 004 §IV-B: masking ratio 0.5
    assert (perm.sort(dim=1).values == torch.arange(4)).all()  # a permutation per sample
    assert (perm != torch.arange(4)).any(dim=1).float().mean() > 0.9  # 23 of 24 orders move something
    expected = torch.gather(targets, 1, perm[..., None].expand_as(targets))
    assert torch.equal(out[~mask], expected[~mask]) and (out[mask] == 0).all()
    again = masked_jigsaw(targets, 0.5, generator=torch.Generator().manual_seed(3))
    other = masked_jigsaw(targets, 0.5, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip((out, perm, mask), again))
    assert not torch.equal(perm, other[1])


def test_two_backbones_share_no_parameters_and_either_is_exported():
    model = CTFM("resnet18", 40)
    ctx, tgt = model.backbones["context"], model.backbones["target"]
    ptrs = {p.data_ptr() for p in ctx.parameters()}
    assert ptrs.isdisjoint(p.data_ptr() for p in tgt.parameters())
    context_model = CTFM("resnet18", 40, export="context")
    assert model.export_backbone() is tgt and context_model.export_backbone() is context_model.backbones["context"]
    heads = model.heads_state()
    assert not any(k.startswith("backbones.target.") for k in heads) and any(k.startswith("backbones.context.")
                                                                              for k in heads)
    # seed 004 Eq. 8 with DSL: a projector and a predictor per task and stage (12 for ResNet-18)
    assert sum(len(model.projectors[t]) for t in ("context", "target", "fusion")) == 12
    fusion_in = [next(m for m in p.modules() if isinstance(m, torch.nn.Linear)).in_features
                 for p in model.projectors["fusion"]]
    assert fusion_in == [5 * d for d in (64, 128, 256, 512)]  # context + 4 targets, concatenated
    batch = ([torch.rand(2, 3, 40, 40), torch.rand(2, 3, 40, 40), torch.rand(2, 4, 3, 40, 40),
              torch.rand(2, 4, 3, 40, 40)], torch.zeros(2), torch.zeros(2))
    loss, n = model.ssl_loss(batch)
    loss.backward()
    assert n == 2 and torch.isfinite(loss)
    assert ctx.conv1.weight.grad.abs().sum() > 0 and tgt.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(CellstageError, match="export"):
        CTFM("resnet18", 40, export="both")


@pytest.mark.parametrize("export", ["target", "context"])
def test_ctfm_pretrains_and_exports_the_chosen_backbone(tmp_path, scans, export):
    from safetensors.torch import load_file

    assert METHODS["ctfm"].cross_scan
    res = pretrain("ctfm", TINY, scans["40x"], tmp_path / export, img_size=40, epochs=2, batch_size=4,
                   max_crops=8, seed=0, progress=False, accelerator="cpu", partner_sources=scans["20x"],
                   val_sources=scans["40x"][:1], method_kwargs={"export": export}, checkpoint_every=0)
    hist = pd.read_csv(tmp_path / export / "history.csv")
    assert res["steps_per_epoch"] == 2 and res["monitor"] == "val_loss" and res["n_val_crops"] == 9
    assert np.isfinite(hist[["loss", "val_loss"]].to_numpy()).all() and len(hist) == 2
    weights = tmp_path / export / "backbone.safetensors"
    exported = load_weights(create_backbone(TINY, img_size=40), weights).state_dict()
    heads = load_file(str(tmp_path / export / "heads.safetensors"))
    other = "context" if export == "target" else "target"
    assert not any(k.startswith(f"backbones.{export}.") for k in heads)
    kept = {k.removeprefix(f"backbones.{other}."): v for k, v in heads.items() if k.startswith(f"backbones.{other}.")}
    assert kept.keys() == exported.keys()
    assert any(not torch.equal(kept[k], exported[k]) for k in kept if kept[k].is_floating_point())
    with pytest.raises(CellstageError, match="no partner crops"):
        pretrain("ctfm", TINY, scans["40x"], tmp_path / "x", img_size=40, epochs=1, progress=False)


def test_exported_target_backbone_fine_tunes(tmp_path, scans):
    from cellstage.train import run_fold

    out = tmp_path / "pretrain"
    pretrain("ctfm", TINY, scans["20x"], out, img_size=40, epochs=1, batch_size=4, max_crops=4, seed=0,
             progress=False, accelerator="cpu", partner_sources=scans["40x"], checkpoint_every=0)
    # (the run's own scan is the 20x one here: the roles follow the crop size)
    train = [make_crop_source(tmp_path, "s9_40x", n_per_class=2, seed=1)]
    test = [make_crop_source(tmp_path, "s8_40x", n_per_class=1, n_unlabelled=0, seed=2, split="test", patient="p2")]
    m = run_fold(train, test, tmp_path / "fold0", fold=0, n_folds=2, backbone=TINY,
                 pretrained_path=out / "backbone.safetensors", recipe={"name": "baseline", "epochs": 1},
                 batch_size=32, progress=False, accelerator="cpu", checkpoint_every=0)
    assert m["config"]["pretrained_path"] == str(out / "backbone.safetensors")
    assert np.isfinite(m["val"]["top1"]) and np.isfinite(m["test"]["top1"])


def test_crops_of_equal_size_cannot_tell_context_from_target(scans):
    own_idx = load_index(scans["40x"])
    rows, pos = pair_rows(own_idx, own_idx)
    with pytest.raises(CellstageError, match="crops of both scans are 40 px"):
        ContextTargetDataset(ZarrCropDataset(rows), ZarrCropDataset(own_idx), pos, make_transform(40))


def test_same_seed_same_weights(tmp_path, scans):
    """Views, jigsaws and initial weights all come from the run's seed: two CPU runs agree bit for bit."""
    runs = []
    for name in ("a", "b"):
        pretrain("ctfm", TINY, scans["40x"], tmp_path / name, img_size=40, epochs=1, batch_size=4, max_crops=8,
                 seed=5, progress=False, accelerator="cpu", partner_sources=scans["20x"], checkpoint_every=0)
        runs.append((tmp_path / name / "backbone.safetensors").read_bytes())
    assert runs[0] == runs[1]
