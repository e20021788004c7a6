"""cellstage.crops: single-cell crops from a converted slide + label image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from cellstage.crops import INDEX_COLUMNS, crops_at_points, extract_crops
from cellstage.io import ZarrSlide, convert_to_omezarr, open_slide
from cellstage.utils import CellstageError

H, W = 300, 400
NUCLEUS = (10, 200, 30)
META = {"slide": "s1_40x", "section": "s1", "scan": "40x", "patient": "p1", "split": "train"}
CLASSES = ["A", "B", "C"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (H, W, 3), dtype=np.uint8)
    lab = np.zeros((H, W), np.uint32)
    # cell 1 at the top-left corner (3, 5): a 5x5 nucleus with a distinct centre pixel
    lab[3:8, 1:6] = 1
    img[5, 3] = NUCLEUS
    # cells 2 and 3 touch each other
    lab[100:110, 100:110] = 2
    lab[100:110, 110:120] = 3
    # cell 4 at the bottom-right edge, cell 5 in the middle
    lab[290:300, 390:400] = 4
    lab[150:160, 200:212] = 5
    with tifffile.TiffWriter(d / "s.tif") as tw:
        tw.write(img, tile=(128, 128), photometric="rgb", compression="zlib",
                 resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    convert_to_omezarr(d / "s.tif", d / "s.ome.zarr", tile=128, min_level_size=64)
    g = zarr.open_group(str(d / "seg.zarr"), mode="w", zarr_format=3)
    g.create_array("labels", data=lab, chunks=(128, 128))
    cells = pd.DataFrame({
        "cell_id": [1, 2, 3, 4, 5],
        "slide": META["slide"],
        "centroid_x": [3.0, 104.5, 114.5, 394.5, 205.5],
        "centroid_y": [5.0, 104.5, 104.5, 294.5, 154.5],
        "label": ["A", "C", "", None, "B"],
        "distance_to_wall_um": [1.0, 2.0, 3.0, 4.0, 5.0],
        "distance_norm": [0.1, 0.2, 0.3, 0.4, 0.5],
    })
    cells.to_parquet(d / "cells.parquet")
    return d, img, lab, cells


def _run(d, size=16, name="out", cells="cells.parquet", **kw):
    return extract_crops(d / "s.ome.zarr", d / "seg.zarr", d / cells, d / f"{name}.zarr", d / f"{name}.parquet",
                         size=size, meta=META, classes=CLASSES, **kw)


def _by_cell(d, name="out"):
    idx = pd.read_parquet(d / f"{name}.parquet")
    z = zarr.open_group(str(d / f"{name}.zarr"), mode="r")
    return idx.set_index("cell_id"), z


def test_crop_at_slide_edge_is_padded_not_shifted(data):
    d, img, lab, _ = data
    _run(d, size=16)
    idx, z = _by_cell(d)
    crop = np.asarray(z["images"][int(idx.loc[1, "row"])])
    # window [3-8, 3+8) x [5-8, 5+8): 5 columns and 3 rows lie outside -> white
    assert (crop[:3] == 255).all() and (crop[:, :5] == 255).all()
    assert np.array_equal(crop[3:, 5:], img[:13, :11])
    assert tuple(crop[8, 8]) == NUCLEUS  # nucleus centre pixel at the crop centre
    # bottom-right edge: cell 4 at (394.5 -> 395, 294.5 -> 295)
    crop4 = np.asarray(z["images"][int(idx.loc[4, "row"])])
    assert np.array_equal(crop4[:13, :13], img[287:, 387:])
    assert (crop4[13:] == 255).all() and (crop4[:, 13:] == 255).all()
    mask4 = np.asarray(z["masks"][int(idx.loc[4, "row"])])
    assert not mask4[13:].any() and not mask4[:, 13:].any()


def test_masking_keeps_only_own_pixels(data):
    d, img, lab, _ = data
    size = 32
    _run(d, size=size, name="m")
    idx, z = _by_cell(d, "m")
    for cid in (2, 3, 5):
        r = int(idx.loc[cid, "row"])
        cx = int(np.floor(idx.loc[cid, "centroid_x"] + 0.5)) - size // 2
        cy = int(np.floor(idx.loc[cid, "centroid_y"] + 0.5)) - size // 2
        ref_img = img[cy: cy + size, cx: cx + size]
        ref_mask = lab[cy: cy + size, cx: cx + size] == cid
        image = np.asarray(z["images"][r])
        mask = np.asarray(z["masks"][r])
        masked = np.asarray(z["masked"][r])
        assert np.array_equal(image, ref_img)
        assert np.array_equal(mask, ref_mask) and mask.sum() == (lab == cid).sum()
        assert np.array_equal(masked[mask], ref_img[mask])
        assert (masked[~mask] == 0).all()
    # neighbour 3 is visible in 2's image but not in 2's masked crop
    r2 = int(idx.loc[2, "row"])
    m2 = np.asarray(z["masks"][r2])
    assert not m2[:, 26:].any()


def test_index_columns_and_label_idx(data):
    d, *_ = data
    info = _run(d, size=16, name="i")
    assert info["n"] == 5
    idx = pd.read_parquet(d / "i.parquet")
    assert list(idx.columns) == INDEX_COLUMNS
    assert idx["row"].tolist() == list(range(5))
    assert sorted(idx["cell_id"]) == [1, 2, 3, 4, 5]
    by = idx.set_index("cell_id")
    assert by["label"].to_dict() == {1: "A", 2: "C", 3: "", 4: "", 5: "B"}
    assert by["label_idx"].to_dict() == {1: 0, 2: 2, 3: -1, 4: -1, 5: 1}
    assert (idx["slide"] == "s1_40x").all() and (idx["split"] == "train").all() and (idx["patient"] == "p1").all()
    assert by.loc[5, "distance_norm"] == 0.5 and by.loc[4, "centroid_x"] == 394.5
    assert idx["label_idx"].dtype == np.int64


def test_index_streamed_in_row_groups_equals_one_piece(data, monkeypatch):
    """The index parquet is written as the crops are (row groups of INDEX_ROWS rows, so no
    per-nucleus table is held at the end): several row groups give the same table as one."""
    import pyarrow.parquet as pq

    from cellstage.crops import extract

    d, *_ = data
    _run(d, size=16, name="one", block=64)
    monkeypatch.setattr(extract, "INDEX_ROWS", 2)
    _run(d, size=16, name="many", block=64)
    assert pq.ParquetFile(d / "one.parquet").num_row_groups == 1
    assert pq.ParquetFile(d / "many.parquet").num_row_groups > 1
    pd.testing.assert_frame_equal(pd.read_parquet(d / "one.parquet"), pd.read_parquet(d / "many.parquet"))


def test_unknown_label_error_leaves_no_output(data):
    d, *_ = data
    cells = pd.read_parquet(d / "cells.parquet")
    cells.loc[1, "label"] = "Zygote"
    cells.to_parquet(d / "bad_cells.parquet")
    with pytest.raises(CellstageError, match=r"bad_cells.parquet.*Zygote"):
        _run(d, name="bad", cells="bad_cells.parquet")
    assert not (d / "bad.zarr").exists() and not (d / "bad.parquet").exists()


def test_output_layout_and_chunks(data):
    d, *_ = data
    # many cells -> several chunks and several write batches
    rng = np.random.default_rng(1)
    n = 300
    cells = pd.DataFrame({"cell_id": rng.integers(1, 6, n), "centroid_x": rng.uniform(-5, W + 5, n),
                          "centroid_y": rng.uniform(-5, H + 5, n), "label": ""})
    cells.to_parquet(d / "many.parquet")
    _run(d, size=20, name="many", cells="many.parquet", batch=64, block=128)
    root = zarr.open_group(str(d / "many.zarr"), mode="r")
    assert root.metadata.zarr_format == 3
    # one crop per inner chunk, all crops of this small store in one shard, lz4 inside
    for name, shape, dtype in [("images", (n, 20, 20, 3), np.uint8), ("masked", (n, 20, 20, 3), np.uint8),
                               ("masks", (n, 20, 20), np.bool_)]:
        a = root[name]
        assert a.shape == shape and a.dtype == dtype
        assert a.chunks == (1, *shape[1:]) and a.shards == shape
        inner = a.metadata.codecs[0].to_dict()["configuration"]["codecs"]
        assert inner[-1]["name"] == "blosc" and inner[-1]["configuration"]["cname"] == "lz4"
    assert root.attrs["cellstage"]["size"] == 20
    idx = pd.read_parquet(d / "many.parquet")
    # each row's image equals a direct padded read at its centroid
    with ZarrSlide(d / "s.ome.zarr") as zs:
        imgs = np.asarray(root["images"][:])
        ref = crops_at_points(zs, idx["centroid_x"], idx["centroid_y"], 20)
        assert np.array_equal(imgs, ref)
    for r in (0, 150, n - 1):
        x0 = int(np.floor(idx.loc[r, "centroid_x"] + 0.5)) - 10
        y0 = int(np.floor(idx.loc[r, "centroid_y"] + 0.5)) - 10
        with ZarrSlide(d / "s.ome.zarr") as zs:
            assert np.array_equal(imgs[r], zs.read_region(x0, y0, 20, 20))


def test_crops_at_points_same_on_tiff_and_zarr(data):
    d, img, *_ = data
    xs = np.array([3.0, 399.4, 200.0, -3.0, 50.5])
    ys = np.array([5.0, 0.0, 150.0, 10.0, 299.6])
    with open_slide(d / "s.tif") as s, ZarrSlide(d / "s.ome.zarr") as z:
        a = crops_at_points(s, xs, ys, 12)
        b = crops_at_points(z, xs, ys, 12)
    assert a.shape == (5, 12, 12, 3) and np.array_equal(a, b)
    assert tuple(a[0, 6, 6]) == NUCLEUS
    assert np.array_equal(a[2], img[144:156, 194:206])
    assert crops_at_points(z, [], [], 12).shape == (0, 12, 12, 3)


def test_empty_cell_table(data):
    d, *_ = data
    pd.DataFrame({"cell_id": pd.Series([], dtype=int), "centroid_x": pd.Series([], dtype=float),
                  "centroid_y": pd.Series([], dtype=float), "label": pd.Series([], dtype=str)}
                 ).to_parquet(d / "empty.parquet")
    info = _run(d, name="e", cells="empty.parquet")
    assert info["n"] == 0
    assert zarr.open_group(str(d / "e.zarr"), mode="r")["images"].shape == (0, 16, 16, 3)
    assert len(pd.read_parquet(d / "e.parquet")) == 0
