"""Bad inputs are refused or reported, each message naming the culprit (issue 15, item 3):
annotations (points and graded points outside the slide, non-region polygon classes, multi-part
and bow-tie polygons, ROI files without polygons), slide-sheet columns (misspelled, unknown,
missing) and pixel formats (12-bit in uint16, float 0-1, float out of range, more than 3 channels).
Every case builds its own tiny file in tmp_path."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellstage.config import check_sheet_columns
from cellstage.io import convert_to_omezarr
from cellstage.io.annotations import check_inside, drop_outside, read_polygons, read_regions
from cellstage.io.slides import open_slide
from cellstage.io.slides.base import _to_rgb
from cellstage.utils import CellstageError

REGION_CLASSES = ["Tubule", ""]  # the schema default of annotations.region_classes
SQUARE = [[[10, 10], [60, 10], [60, 60], [10, 60], [10, 10]]]
BOWTIE = [[[0, 0], [40, 40], [40, 0], [0, 40], [0, 0]]]  # self-intersecting: two triangles


def _feature(geometry: dict, name: str | None = None, cls: str | None = None) -> dict:
    props: dict = {"objectType": "annotation"}
    if name is not None:
        props["name"] = name
    if cls is not None:
        props["classification"] = {"name": cls}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _geojson(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _poly(coords):
    return {"type": "Polygon", "coordinates": coords}


# --------------------------------------------------------------------------- annotations
def test_points_outside_the_slide_are_named_with_their_coordinates():
    pts = pd.DataFrame({"x": [5.0, -3.0, 150.0], "y": [5.0, 7.0, 20.0], "label": ["SC", "P", "P"]})
    with pytest.raises(CellstageError) as e:
        check_inside(pts, (100, 80), "sec01.points.geojson")
    msg = str(e.value)
    assert "sec01.points.geojson" in msg and "2 points" in msg
    assert "1 (-3, 7)" in msg and "2 (150, 20)" in msg and "100x80" in msg


def test_graded_points_outside_are_excluded_with_a_warning_naming_point_and_slide(caplog):
    grades = pd.DataFrame({"x": [10.0, 500.0, 20.0], "y": [10.0, 10.0, -1.0], "grade": [1, 2, 3]})
    with caplog.at_level(logging.WARNING, logger="cellstage.io"):
        kept = drop_outside(grades, (100, 100), "g.csv", slide="sec01_40x", what="graded points")
    assert kept["grade"].tolist() == [1]
    msg = caplog.text
    assert "g.csv (slide sec01_40x)" in msg and "2 graded points" in msg
    assert "1 (500, 10)" in msg and "2 (20, -1)" in msg


def test_graded_points_all_outside_are_an_error_naming_the_file():
    grades = pd.DataFrame({"x": [500.0, 600.0], "y": [10.0, 10.0], "grade": [1, 2]})
    with pytest.raises(CellstageError, match=r"g\.csv \(slide s1\): all 2 graded points .*outside the image"):
        drop_outside(grades, (100, 100), "g.csv", slide="s1", what="graded points")


def test_graded_points_without_numeric_xy_are_an_error_naming_the_row():
    grades = pd.DataFrame({"x": [1.0, np.nan], "y": [1.0, 2.0], "grade": [1, 2]})
    with pytest.raises(CellstageError, match=r"g\.csv: graded points with missing/non-finite x or y in row\(s\) \[3\]"):
        drop_outside(grades, (100, 100), "g.csv", what="graded points")


def test_train_grader_refuses_a_grades_file_whose_points_all_lie_outside(tmp_path):
    from cellstage.reduce.stage import train_grader

    tifffile.imwrite(
        tmp_path / "s.tif",
        np.full((128, 128, 3), 200, np.uint8),
        photometric="rgb",
        tile=(64, 64),
        resolution=(1e4 / 0.5,) * 2,
        resolutionunit="CENTIMETER",
    )
    convert_to_omezarr(tmp_path / "s.tif", tmp_path / "s.ome.zarr", tile=64, min_level_size=64)
    pd.DataFrame({"x": [1000.0, 2000.0], "y": [5.0, 5.0], "grade": [1, 6]}).to_csv(
        tmp_path / "s.grades.csv", index=False
    )
    with pytest.raises(CellstageError, match=r"s\.grades\.csv \(slide s\.ome\.zarr\): all 2 graded points"):
        train_grader(
            [tmp_path / "s.ome.zarr"],
            [tmp_path / "s.grades.csv"],
            tmp_path / "grader",
            backbone="resnet18",
            epochs=1,
            batch_size=2,
            loss_weights={"useful": 1.0, "unsuitable": 1.0},
            size=32,
            seed=0,
            threads=1,
            devices=1,
        )
    assert not (tmp_path / "grader").exists()


def test_a_tissue_outline_is_not_a_region(tmp_path, caplog):
    p = _geojson(
        tmp_path / "s.tubules.geojson",
        [
            _feature(_poly([[[0, 0], [500, 0], [500, 500], [0, 500], [0, 0]]]), "tissue", "Tissue"),
            _feature(_poly(SQUARE), "t1", "Tubule"),
            _feature(_poly(SQUARE), "t2"),  # unclassified
        ],
    )
    assert len(read_polygons(p)) == 3  # the unfiltered reader sees all three
    with caplog.at_level(logging.WARNING, logger="cellstage.io"):
        got = read_regions(p, classes=REGION_CLASSES)
    assert [r for r, _ in got] == ["t1", "t2"]
    assert "s.tubules.geojson" in caplog.text and "'tissue' (Tissue)" in caplog.text
    assert "annotations.region_classes" in caplog.text


def test_a_tubules_file_with_no_region_class_is_an_error_naming_classes_and_key(tmp_path):
    p = _geojson(tmp_path / "s.tubules.geojson", [_feature(_poly(SQUARE), "tissue", "Tissue")])
    with pytest.raises(CellstageError) as e:
        read_regions(p, classes=["Tubule"])
    msg = str(e.value)
    assert "s.tubules.geojson" in msg and "['Tissue']" in msg and "annotations.region_classes" in msg


@pytest.mark.parametrize(
    "features",
    [[], [_feature({"type": "Point", "coordinates": [3, 4]}, "p", "Tubule")]],
    ids=["no-features", "points-only"],
)
def test_a_tubules_file_without_polygons_is_an_error_naming_the_file(tmp_path, features):
    p = _geojson(tmp_path / "empty.tubules.geojson", features)
    with pytest.raises(CellstageError, match=r"empty\.tubules\.geojson: no polygons in the ROI"):
        read_regions(p, classes=REGION_CLASSES)


def test_multi_part_polygons_keep_every_part_with_a_warning(tmp_path, caplog):
    mp = {
        "type": "MultiPolygon",
        "coordinates": [SQUARE, [[[100, 100], [120, 100], [120, 120], [100, 120], [100, 100]]]],
    }
    p = _geojson(tmp_path / "mp.geojson", [_feature(mp, "t1", "Tubule")])
    with caplog.at_level(logging.WARNING, logger="cellstage.io"):
        got = dict(read_regions(p, classes=REGION_CLASSES))
    assert sorted(got) == ["t1_0", "t1_1"] and sorted(g.area for g in got.values()) == [400, 2500]
    assert "mp.geojson" in caplog.text and "'t1' (2 parts)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cellstage.io"):  # the "largest" reader no longer drops silently
        assert [r for r, _ in read_polygons(p)] == ["t1"]
    assert "'t1' (index 0) has 2 parts; only the largest" in caplog.text


def test_a_bow_tie_polygon_is_repaired_with_a_warning_or_refused(tmp_path, caplog):
    p = _geojson(tmp_path / "bowtie.geojson", [_feature(_poly(BOWTIE), "bt", "Tubule")])
    with caplog.at_level(logging.WARNING, logger="cellstage.io"):
        got = dict(read_regions(p, classes=REGION_CLASSES))
    assert sorted(got) == ["bt_0", "bt_1"] and all(g.is_valid for g in got.values())
    assert sum(g.area for g in got.values()) == pytest.approx(800)  # both triangles kept
    assert "bowtie.geojson: feature 'bt' (index 0) is an invalid polygon (Self-intersection" in caplog.text
    with pytest.raises(CellstageError, match=r"bowtie\.geojson: feature 'bt' \(index 0\) is an invalid polygon"):
        read_polygons(p, repair=False)


def test_the_segment_stage_refuses_a_tubules_file_with_only_a_tissue_outline(tmp_path):
    from cellstage.segment.stage import segment

    tifffile.imwrite(
        tmp_path / "s.tif",
        np.full((128, 128, 3), 200, np.uint8),
        photometric="rgb",
        tile=(64, 64),
        resolution=(1e4 / 0.5,) * 2,
        resolutionunit="CENTIMETER",
    )
    convert_to_omezarr(tmp_path / "s.tif", tmp_path / "s.ome.zarr", tile=64, min_level_size=64)
    tub = _geojson(tmp_path / "s.tubules.geojson", [_feature(_poly(SQUARE), "tissue", "Tissue")])
    with pytest.raises(CellstageError, match=r"s\.tubules\.geojson: none of the 1 polygon.*region_classes"):
        segment(
            tmp_path / "s.ome.zarr",
            tub,
            None,
            tmp_path / "labels.zarr",
            method="classical",
            tile=128,
            overlap=16,
            diameter=None,
            threads=1,
            region_classes=REGION_CLASSES,
        )
    assert not (tmp_path / "labels.zarr").exists()


# --------------------------------------------------------------------------- slide sheet
def _sheet(columns: list[str]) -> pd.DataFrame:
    row = {"slide": "s1", "section": "sec1", "scan": "40x", "patient": "p1", "split": "train", "path": "s1.tiff"}
    return pd.DataFrame([{c: row.get(c, "") for c in columns}], dtype=str)


REQUIRED = ["slide", "section", "scan", "patient", "split", "path"]


@pytest.mark.parametrize(
    "bad, suggestion", [("grade", "grades"), ("Tubules", "tubules"), ("point", "points"), ("mask", "masks")]
)
def test_a_misspelled_sheet_column_is_an_error_naming_it_and_the_closest_name(bad, suggestion):
    with pytest.raises(CellstageError) as e:
        check_sheet_columns(_sheet([*REQUIRED, bad]), "config/slides.tsv")
    msg = str(e.value)
    assert msg.startswith("config/slides.tsv: invalid slide sheet header")
    assert f"unknown column {bad!r}: did you mean {suggestion!r}?" in msg


def test_an_unknown_sheet_column_is_an_error():
    with pytest.raises(CellstageError, match=r"(?s)slides\.tsv: .*unknown column 'notes': remove it or fix its name"):
        check_sheet_columns(_sheet([*REQUIRED, "notes"]), "slides.tsv")


def test_a_missing_required_sheet_column_is_an_error_naming_it():
    with pytest.raises(CellstageError, match=r"(?s)slides\.tsv: .*missing required column\(s\) \['patient'\]"):
        check_sheet_columns(_sheet([c for c in REQUIRED if c != "patient"]), "slides.tsv")


def test_missing_optional_sheet_columns_are_added_empty_not_a_key_error(tmp_path):
    path = tmp_path / "slides.tsv"
    _sheet(REQUIRED).to_csv(path, sep="\t", index=False)
    sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    out = check_sheet_columns(sheet, path)
    for col in ("mpp", "backend", "tubules", "points", "masks", "grades"):
        assert out[col].tolist() == [""]
    assert out["slide"].tolist() == ["s1"]


# --------------------------------------------------------------------------- pixel formats
def _tiff(path, data, **kw):
    kw.setdefault("tile", (64, 64))
    tifffile.imwrite(path, data, resolution=(1e4 / 0.5,) * 2, resolutionunit="CENTIMETER", **kw)
    return path


def test_12_bit_samples_in_uint16_are_scaled_by_4095_not_shifted(tmp_path):
    a = np.zeros((128, 128, 3), np.uint16)
    a[:64] = 4095  # white in 12 bits
    a[64:] = 2048
    p = _tiff(tmp_path / "u12.tif", a, photometric="rgb")
    with open_slide(p) as s:  # default backend choice: not OpenSlide, which keeps the high byte only
        r = s.read_region(0, 0, 128, 128)
        assert s.backend != "openslide" and s.metadata["cellstage.bit_depth"] == 12
    assert r[0, 0].tolist() == [255, 255, 255] and r[100, 0].tolist() == [128, 128, 128]


def test_full_range_16_bit_samples_are_scaled_by_65535(tmp_path):
    a = np.full((128, 128, 3), 65535, np.uint16)
    a[64:] = 32768
    with open_slide(_tiff(tmp_path / "u16.tif", a, photometric="rgb"), backend="tifffile") as s:
        r = s.read_region(0, 0, 128, 128)
        assert s.metadata["cellstage.bit_depth"] == 16
    assert r[0, 0, 0] == 255 and r[100, 0, 0] == 128


def test_openslide_asked_for_16_bit_samples_is_refused_naming_the_backend_field(tmp_path):
    p = _tiff(tmp_path / "u16.tif", np.full((128, 128, 3), 4095, np.uint16), photometric="rgb")
    with pytest.raises(CellstageError, match=r"u16\.tif: 16-bit samples, which OpenSlide.*`backend`"):
        open_slide(p, backend="openslide")


def test_float_samples_in_0_1_are_scaled_not_clipped(tmp_path):
    a = np.full((128, 128, 3), 0.5, np.float32)
    a[:64] = 1.0
    with open_slide(_tiff(tmp_path / "f.tif", a, photometric="rgb")) as s:
        r = s.read_region(0, 0, 128, 128)
    assert r[0, 0].tolist() == [255, 255, 255] and r[100, 0].tolist() == [128, 128, 128]


def test_float_samples_beyond_0_255_are_refused_naming_the_file(tmp_path):
    p = _tiff(tmp_path / "big.tif", np.full((128, 128, 3), 1000.0, np.float32), photometric="rgb")
    with pytest.raises(CellstageError, match=r"big\.tif: float samples up to 1000"):
        open_slide(p, backend="tifffile")


@pytest.mark.parametrize("n", [4, 5])
def test_more_than_3_sample_channels_are_refused_naming_the_file(tmp_path, n):
    data = np.full((n, 128, 128), 100, np.uint8)
    p = _tiff(tmp_path / f"c{n}.tif", data, photometric="minisblack", planarconfig="separate")
    for backend in (None, "tifffile", "openslide"):
        with pytest.raises(CellstageError, match=rf"c{n}\.tif: {n} samples per pixel.*export the slide as RGB"):
            open_slide(p, backend=backend)


def test_rgba_with_a_declared_alpha_is_still_read(tmp_path):
    a = np.full((128, 128, 4), 255, np.uint8)
    a[..., :3] = 90
    with open_slide(_tiff(tmp_path / "rgba.tif", a, photometric="rgb")) as s:
        assert s.read_region(0, 0, 4, 4)[0, 0].tolist() == [90, 90, 90]


def test_a_multichannel_ome_tiff_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "cyx5.ome.tiff"
    tifffile.imwrite(
        p,
        np.full((5, 128, 128), 7, np.uint16),
        ome=True,
        photometric="minisblack",
        tile=(64, 64),
        metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"},
    )
    for backend in (None, "tifffile"):
        with pytest.raises(CellstageError, match=r"cyx5\.ome\.tiff: 5 channels.*export the slide as RGB"):
            open_slide(p, backend=backend)


def test_more_than_4_channels_reaching_the_converter_are_refused():
    with pytest.raises(CellstageError, match=r"x\.svs: 6 channels"):
        _to_rgb(np.zeros((2, 2, 6), np.uint8), path="x.svs")
