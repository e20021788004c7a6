"""Seed 003's Level One / Two / Three data reduction end to end on a constructed slide.

The slide (768² px, 4×4 grid, inner tiles rows 1-2 / cols 1-2 = 16 patches of 96 px) is painted
with purple "blasts" on a light background: a patch of well-spread blasts (kept), the same
blurred (blur), a dense overlapping cluster (cell_too_large), a lattice of 16 small cells
(too_many_cells), round cells plus a rod (kept at Level One; the rod is dropped by compactness
at Level Two), empty patches (too_few_cells), and blasts everywhere in the outer tiles (never
examined).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr

from cellstage.io import ZarrSlide, convert_to_omezarr
from cellstage.reduce import aml_stage
from cellstage.reduce.levels import aml_reduction_from_files, aml_reduction_table, table2_layout
from cellstage.utils import CellstageError

torch.set_num_threads(1)
BG = np.array([236, 226, 232])  # light background of a smear
BLAST = np.array([120, 60, 170])  # May-Grünwald-Giemsa purple
SIZE, P, CROP = 768, 96, 32
INNER = (192, 576)  # slide px of the inner tiles (rows/cols 1..2 of a 4x4 grid), both axes
L1 = dict(grid=(4, 4), keep_rows=(1, 2), keep_cols=(1, 2), patch_size=P, blur_threshold=30.0, kmeans_k=3,
          criterion="red", min_contrast=8.0, min_cells=2, max_cells=8, max_cell_area=400, min_cell_area=20,
          closing_radius=1, seed=0, slide="s")
L2 = dict(crop_size=CROP, min_separation=1.25, seed=0, slide="s")
# Level One patch origins (slide y, x) of the painted patches
SPREAD, BLURRED, DENSE, EMPTY = (192, 192), (192, 288), (192, 384), (192, 480)
LATTICE, WITH_ROD = (288, 192), (288, 288)
SPREAD_CELLS = [(9, 25), (60, 70), (30, 75)]  # patch px; the first lies 9 px from the patch's top edge


def paint_slide(path: Path) -> None:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    img = np.tile(BG, (SIZE, SIZE, 1)).astype(float)
    yy, xx = np.ogrid[:SIZE, :SIZE]

    def disc(cy, cx, r):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = BLAST

    for cy in range(30, SIZE, 48):  # outer tiles: blasts that Level One would keep if it looked there
        for cx in range(30, SIZE, 48):
            if not (INNER[0] - 12 <= cy < INNER[1] + 12 and INNER[0] - 12 <= cx < INNER[1] + 12):
                disc(cy, cx, 7)
    for y, x in (SPREAD, BLURRED):
        for a, b in SPREAD_CELLS:
            disc(y + a, x + b, 7)
    y, x = DENSE
    for a, b in rng.uniform(30, 66, (14, 2)):
        disc(y + a, x + b, 9)
    y, x = LATTICE
    for a in range(12, 90, 22):
        for b in range(12, 90, 22):
            disc(y + a, x + b, 4)
    y, x = WITH_ROD
    for a, b in [(18, 18), (18, 75), (75, 18), (75, 75)]:
        disc(y + a, x + b, 7)
    img[y + 46: y + 50, x + 33: x + 63] = BLAST  # a 4x30 px rod through the middle
    img += rng.normal(0, 3, img.shape)
    y, x = BLURRED
    img[y: y + P, x: x + P] = gaussian_filter(img[y: y + P, x: x + P], sigma=(3, 3, 0))
    tifffile.imwrite(path.with_suffix(".tif"), np.clip(img, 0, 255).astype(np.uint8), photometric="rgb",
                     tile=(128, 128), resolution=(1e4 / 0.25,) * 2, resolutionunit="CENTIMETER")
    convert_to_omezarr(path.with_suffix(".tif"), path, tile=128, min_level_size=64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("levels")
    paint_slide(d / "s.ome.zarr")
    t1 = aml_stage.level_one(d / "s.ome.zarr", d / "l1.zarr", d / "l1.parquet", **L1)
    t2 = aml_stage.level_two(d / "l1.zarr", d / "l1.parquet", d / "l2.zarr", d / "l2.parquet", **L2)
    return d, t1, t2


def _at(table, origin):
    row = table[(table["y"] == origin[0]) & (table["x"] == origin[1])]
    assert len(row) == 1, origin
    return row.iloc[0]


# -- Level One ------------------------------------------------------------------------------------
def test_blurred_dense_and_empty_patches_are_removed_and_spread_blasts_kept(run):
    d, t1, _ = run
    assert _at(t1, SPREAD)["kept"] and _at(t1, SPREAD)["reason"] == "" and _at(t1, SPREAD)["n_cells"] == 3
    blurred = _at(t1, BLURRED)
    assert blurred["reason"] == "blur" and blurred["n_cells"] == -1
    assert blurred["laplace_var"] < L1["blur_threshold"] < _at(t1, SPREAD)["laplace_var"]
    dense = _at(t1, DENSE)
    assert dense["reason"] == "cell_too_large" and dense["max_area"] > L1["max_cell_area"]
    lattice = _at(t1, LATTICE)
    assert lattice["reason"] == "too_many_cells" and lattice["n_cells"] == 16
    assert _at(t1, EMPTY)["reason"] == "too_few_cells" and _at(t1, EMPTY)["n_cells"] == 0
    rod = _at(t1, WITH_ROD)
    assert rod["kept"] and rod["n_cells"] == 5  # 4 round cells + the rod
    assert t1["kept"].sum() == 2
    assert (t1["reason"] == "too_few_cells").sum() == 11  # the unpainted inner patches
    assert set(t1.loc[t1["kept"], "store_index"]) == {0, 1} and (t1.loc[~t1["kept"], "store_index"] == -1).all()


def test_outer_tiles_are_never_examined(run):
    _, t1, _ = run
    assert len(t1) == 16 and t1["patch"].tolist() == list(range(16))
    assert t1["y"].between(INNER[0], INNER[1] - P).all() and t1["x"].between(INNER[0], INNER[1] - P).all()
    assert set(zip(t1["row"], t1["col"])) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert (t1["selection_px"] == (INNER[1] - INNER[0]) ** 2).all()


def test_level_one_store_holds_the_kept_patches_and_their_masks(run):
    import cv2

    d, t1, _ = run
    g = zarr.open_group(str(d / "l1.zarr"), mode="r")
    assert g["patches"].shape == (2, P, P, 3) and g["patches"].dtype == np.uint8
    assert g["masks"].shape == (2, P, P) and g["masks"].dtype == bool
    assert g.attrs["selection_px"] == 384 * 384 and g.attrs["patch_size"] == P
    slide = ZarrSlide(d / "s.ome.zarr")
    for r in t1[t1["kept"]].itertuples():
        patch, mask = g["patches"][r.store_index], g["masks"][r.store_index]
        assert np.array_equal(patch, slide.read_region(r.x, r.y, P, P))
        assert cv2.connectedComponents(mask.view(np.uint8), connectivity=8)[0] - 1 == r.n_cells
        assert (patch[mask].mean(0)[[0, 2]] < [180, 200]).all()  # mask pixels are the purple cells


def test_level_one_is_deterministic(run, tmp_path):
    d, t1, _ = run
    again = aml_stage.level_one(d / "s.ome.zarr", tmp_path / "l1.zarr", tmp_path / "l1.parquet", **L1)
    pd.testing.assert_frame_equal(again, t1)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "l1.parquet"), pd.read_parquet(d / "l1.parquet"))
    a, b = zarr.open_group(str(tmp_path / "l1.zarr"), mode="r"), zarr.open_group(str(d / "l1.zarr"), mode="r")
    for name in ("patches", "masks"):
        assert np.array_equal(a[name][:], b[name][:])


def test_a_tile_smaller_than_a_patch_is_an_error(run, tmp_path):
    d, _, _ = run
    with pytest.raises(CellstageError, match=r"smaller than patch_size 256.*lower patch_size"):
        aml_stage.level_one(d / "s.ome.zarr", tmp_path / "x.zarr", tmp_path / "x.parquet", **{**L1, "patch_size": 256})
    with pytest.raises(CellstageError, match=r"keep_rows=\(1, 4\).*inside grid 4x4"):
        aml_stage.level_one(d / "s.ome.zarr", tmp_path / "x.zarr", tmp_path / "x.parquet",
                            **{**L1, "keep_rows": (1, 4)})
    assert not list(tmp_path.iterdir())


def test_a_failure_mid_slide_leaves_no_output(run, tmp_path):
    d, _, _ = run
    broken = tmp_path / "s.ome.zarr"
    shutil.copytree(d / "s.ome.zarr", broken)
    chunk = broken / "s0" / "c" / "0" / "4" / "4"  # level 0, red plane, y/x 512..640: the last inner patch
    assert chunk.is_file()
    chunk.write_bytes(b"not a blosc chunk" * 10)
    out = tmp_path / "out"
    with pytest.raises(CellstageError, match="reading region"):
        aml_stage.level_one(broken, out / "l1.zarr", out / "l1.parquet", **L1)
    assert list(out.iterdir()) == []  # neither output nor a temporary
    # Level Two: a Level One store whose masks cannot be decoded
    l1 = tmp_path / "l1.zarr"
    shutil.copytree(d / "l1.zarr", l1)
    shard = next(p for p in (l1 / "masks").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = shard.read_bytes()
    shard.write_bytes(b"\xff" * 64 + raw[64:])  # the first mask's compressed bytes are garbage
    with pytest.raises(CellstageError, match=r"l1.zarr: kept patch 0 cannot be read"):
        aml_stage.level_two(l1, d / "l1.parquet", out / "l2.zarr", out / "l2.parquet", **L2)
    assert list(out.iterdir()) == []


# -- Level Two ------------------------------------------------------------------------------------
def test_compactness_drops_the_rod_and_keeps_round_cells(run):
    _, t1, t2 = run
    assert list(t2.columns) == ["slide", "crop", "patch", "y", "x", "y0", "x0", "area", "compactness", "kept"]
    assert len(t2) == 8 and t2["crop"].tolist() == list(range(8))  # 3 + 5 cells of the kept patches
    rod_patch = _at(t1, WITH_ROD)["patch"]
    rod = t2[(t2["patch"] == rod_patch) & (t2["area"] == 4 * 30)]
    assert len(rod) == 1 and not rod["kept"].iat[0]
    assert rod["y"].iat[0] == pytest.approx(WITH_ROD[0] + 47.5) and rod["x"].iat[0] == pytest.approx(WITH_ROD[1] + 47.5)
    round_cells = t2.drop(rod.index)
    assert round_cells["kept"].all() and (round_cells["compactness"] < rod["compactness"].iat[0] / 2).all()


def test_crops_are_cut_around_cells_shifted_inside_the_patch(run):
    d, t1, t2 = run
    g = zarr.open_group(str(d / "l2.zarr"), mode="r")
    for name in ("bg", "nobg"):
        assert g[name].shape == (8, CROP, CROP, 3) and g[name].dtype == np.uint8
    assert g["masks"].shape == (8, CROP, CROP) and g["masks"].dtype == bool
    slide = ZarrSlide(d / "s.ome.zarr")
    l1 = zarr.open_group(str(d / "l1.zarr"), mode="r")
    patches = t1.set_index("patch")
    for r in t2.itertuples():
        bg, nobg, cell = g["bg"][r.crop], g["nobg"][r.crop], g["masks"][r.crop]
        assert np.array_equal(bg, slide.read_region(r.x0, r.y0, CROP, CROP))
        assert 0 < cell.sum() <= r.area and cell[round(r.y - r.y0), round(r.x - r.x0)]  # the cell at its centroid
        p = patches.loc[r.patch]
        assert p["y"] <= r.y0 <= p["y"] + P - CROP and p["x"] <= r.x0 <= p["x"] + P - CROP
        pmask = l1["masks"][p["store_index"]][r.y0 - p["y"]: r.y0 - p["y"] + CROP, r.x0 - p["x"]: r.x0 - p["x"] + CROP]
        assert np.array_equal(nobg, np.where(pmask[..., None], bg, 0))  # background pixels are 0
    # the cell 9 px from its patch's top edge: its window is shifted down to the edge, not padded
    top = t2[np.isclose(t2["y"], SPREAD[0] + SPREAD_CELLS[0][0]) & np.isclose(t2["x"], SPREAD[1] + SPREAD_CELLS[0][1])]
    assert len(top) == 1 and top["y0"].iat[0] == SPREAD[0] and top["x0"].iat[0] == SPREAD[1] + 25 - CROP // 2


def test_level_two_is_deterministic(run, tmp_path):
    d, _, t2 = run
    again = aml_stage.level_two(d / "l1.zarr", d / "l1.parquet", tmp_path / "l2.zarr", tmp_path / "l2.parquet", **L2)
    pd.testing.assert_frame_equal(again, t2)
    a, b = zarr.open_group(str(tmp_path / "l2.zarr"), mode="r"), zarr.open_group(str(d / "l2.zarr"), mode="r")
    for name in ("bg", "nobg", "masks"):
        assert np.array_equal(a[name][:], b[name][:])


# -- Level Three ----------------------------------------------------------------------------------
def test_grader_grades_the_level_two_kept_crops(run, tmp_path):
    from cellstage.reduce import train_grader

    d, _, t2 = run
    crops = zarr.open_group(str(d / "l2.zarr"), mode="r")["bg"][:]
    train_grader(crops, np.array([1, 2, 3, 4, 5, 6, 1, 6]), tmp_path / "grader", backbone="resnet18", epochs=1,
                 batch_size=8, val_fraction=0.0, seed=0, progress=False)
    out = aml_stage.grade_level_two(tmp_path / "grader", d / "l2.zarr", d / "l2.parquet", tmp_path / "l3.parquet",
                                    threshold=0.5, threads=1)
    assert list(out.columns) == ["slide", "crop", "p_unsuitable", "keep"]
    assert out["crop"].tolist() == t2.loc[t2["kept"], "crop"].tolist()  # only Level Two's kept crops
    assert out["p_unsuitable"].between(0, 1).all()
    assert (out["keep"] == (out["p_unsuitable"] < 0.5)).all()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "l3.parquet"), out)
    none = aml_stage.grade_level_two(tmp_path / "grader", d / "l2.zarr", d / "l2.parquet", tmp_path / "n.parquet",
                                     threshold=0.0, threads=1)
    assert not none["keep"].any()
    np.testing.assert_allclose(none["p_unsuitable"], out["p_unsuitable"], rtol=1e-5)  # deterministic
    # a grader trained on other crop sizes is refused
    train_grader(crops[:, :24, :24], np.array([1, 2, 3, 4, 5, 6, 1, 6]), tmp_path / "g24", epochs=1, batch_size=8,
                 val_fraction=0.0, seed=0, progress=False)
    with pytest.raises(CellstageError, match=r"are 32x32 px but the grader .* trained on 24x24"):
        aml_stage.grade_level_two(tmp_path / "g24", d / "l2.zarr", d / "l2.parquet", tmp_path / "x.parquet",
                                  threshold=0.5, threads=1)
    assert not (tmp_path / "x.parquet").exists()


# -- Table 2 --------------------------------------------------------------------------------------
def test_reduction_table_by_hand(tmp_path):
    """3 slides, patch 10 px (100 px each), crop 2 px (4 px each), min_crops 5.

    A: selection 10,000 px, 30 patches, 50 crops, 20 graded useful; labels NPM1 + ELN2017
    B: selection 20,000 px, 10 patches,  4 crops,  4 useful;         label ELN2017 only
    C: selection  5,000 px, 20 patches, 10 crops,  3 useful;         label NPM1 only (ELN2017 None)
    """
    def write(name, **cols):
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame(cols).to_parquet(path)
        return path

    spec = {"A": (10_000, 30, 50, 20), "B": (20_000, 10, 4, 4), "C": (5_000, 20, 10, 3)}
    l1, l2, l3 = [], [], []
    for s, (sel, n1, n2, n3) in spec.items():
        l1.append(write(f"{s}1", slide=s, kept=[True] * n1 + [False] * 7, selection_px=sel))
        l2.append(write(f"{s}2", slide=s, kept=[True] * n2 + [False] * 3))
        l3.append(write(f"{s}3", slide=s, keep=[True] * n3 + [False] * 2))
    labels = {"A": {"NPM1": "mut", "ELN2017": "fav"}, "B": {"ELN2017": "adv"}, "C": {"NPM1": "wt", "ELN2017": None}}
    t = aml_reduction_from_files(l1, l2, l3, labels, ["NPM1", "ELN2017"], min_crops=5, crop_size=2, patch_size=10)
    got = t.set_index(["level", "task"])
    expect = {  # (n_slides, n_images, selection_px, image_px)
        ("Level One", "NPM1"): (2, 50, 15_000, 5_000),  # A + C
        ("Level Two", "NPM1"): (2, 60, 15_000, 240),
        ("Level Three", "NPM1"): (1, 20, 10_000, 80),  # C has 3 < 5 crops
        ("Level One", "ELN2017"): (2, 40, 30_000, 4_000),  # A + B
        ("Level Two", "ELN2017"): (1, 50, 10_000, 200),  # B has 4 < 5 crops
        ("Level Three", "ELN2017"): (1, 20, 10_000, 80),
    }
    for key, (n, imgs, sel, px) in expect.items():
        row = got.loc[key]
        assert (row["n_slides"], row["n_images"], row["selection_px"], row["image_px"]) == (n, imgs, sel, px), key
        assert row["reduction_pct"] == pytest.approx(100 * (1 - px / sel))
    assert got.loc[("Level Two", "NPM1"), "reduction_pct"] == pytest.approx(98.4)
    wide = table2_layout(t)
    assert wide.index.tolist() == ["Level One", "Level Two", "Level Three"]
    assert wide.loc["Level One", ("ELN2017", "Reduction")] == "86.7%"
    assert wide.loc["Level Three", ("NPM1", "#Images")] == 20
    # CSV through the stage entry point
    out = aml_stage.aml_reduction(l1, l2, l3, labels, tmp_path / "t2.csv", tasks=["NPM1", "ELN2017"], min_crops=5,
                                  crop_size=2, patch_size=10)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t2.csv"), out, check_dtype=False)
    # a Level Two slide without a Level One table cannot be placed against a selection
    with pytest.raises(CellstageError, match=r"B2.parquet: slide 'B' has no Level One table"):
        aml_reduction_from_files(l1[:1], l2[:2], [], labels, ["NPM1"], 5, 2, 10)
    with pytest.raises(CellstageError, match=r"task\(s\) \['FLT3'\]"):
        aml_reduction_table({}, pd.DataFrame({"NPM1": []}), ["FLT3"], 5)


def test_a_slide_without_cells_gives_empty_stores_that_level_two_accepts(tmp_path):
    rng = np.random.default_rng(1)
    img = np.clip(np.tile(BG, (256, 256, 1)) + rng.normal(0, 3, (256, 256, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "e.tif", img, photometric="rgb", tile=(64, 64), resolution=(1e4 / 0.25,) * 2,
                     resolutionunit="CENTIMETER")
    convert_to_omezarr(tmp_path / "e.tif", tmp_path / "e.ome.zarr", tile=64, min_level_size=64)
    kw = {**L1, "grid": (2, 2), "keep_rows": (0, 1), "keep_cols": (0, 1), "patch_size": 64, "slide": "e"}
    t1 = aml_stage.level_one(tmp_path / "e.ome.zarr", tmp_path / "e1.zarr", tmp_path / "e1.parquet", **kw)
    assert len(t1) == 16 and (t1["reason"] == "too_few_cells").all()  # noise alone is no cell (min_contrast)
    assert zarr.open_group(str(tmp_path / "e1.zarr"), mode="r")["patches"].shape == (0, 64, 64, 3)
    t2 = aml_stage.level_two(tmp_path / "e1.zarr", tmp_path / "e1.parquet", tmp_path / "e2.zarr",
                             tmp_path / "e2.parquet", **{**L2, "slide": "e"})
    assert t2.empty and list(t2.columns)[:3] == ["slide", "crop", "patch"]
    assert zarr.open_group(str(tmp_path / "e2.zarr"), mode="r")["bg"].shape == (0, CROP, CROP, 3)
