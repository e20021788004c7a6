"""Point-anchored crops (every annotated point inside the slide reaches a crop) and the
segmentation QC of the stage table (issue 14, items 1 and 2)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from shapely.geometry import box
from skimage.draw import disk

from cellstage.cells.stage import cells as cells_stage
from cellstage.crops.stage import extract_crops
from cellstage.io import convert_to_omezarr
from cellstage.io.annotations import write_points_geojson, write_polygons_geojson
from cellstage.report.stages import stage_table
from cellstage.segment.classical import segment_at_point

CLASSES = ["PMC", "SC", "Spg Ad", "Spg", "Pl-Z", "P", "rsptd", "esptd"]
BACKGROUND = (236, 205, 222)  # eosin-pink
NUCLEUS = (70, 50, 130)  # haematoxylin-purple


def _paint(shape, centres, r=9):
    img = np.empty(shape + (3,), np.uint8)
    img[:] = BACKGROUND
    for cy, cx in centres:
        img[disk((cy, cx), r, shape=shape)] = NUCLEUS
    return img


def test_point_prompt_takes_the_nucleus_under_or_next_to_the_point():
    img = _paint((80, 80), [(40, 40), (12, 66)])
    truth = np.zeros((80, 80), bool)
    truth[disk((40, 40), 9, shape=(80, 80))] = True
    on = segment_at_point(img, 41.3, 38.8, min_diameter=12)
    assert (on & truth).sum() / (on | truth).sum() > 0.85
    beside = segment_at_point(img, 40, 51.5, min_diameter=12)  # 2.5 px right of the rim
    assert np.array_equal(beside, on)
    assert not segment_at_point(_paint((80, 80), [(12, 66)]), 20, 20, min_diameter=12).any()


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    """Three nuclei; the label image has only the first two (the segmentation missed the third)."""
    d = tmp_path_factory.mktemp("points")
    H, W = 200, 240
    centres = [(50, 60), (120, 150), (150, 60)]
    img = _paint((H, W), centres)
    lab = np.zeros((H, W), np.uint32)
    for k, c in enumerate(centres[:2], start=1):
        lab[disk(c, 9, shape=(H, W))] = k
    with tifffile.TiffWriter(d / "s.tif") as tw:
        tw.write(img, tile=(128, 128), photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25),
                 resolutionunit="CENTIMETER")
    convert_to_omezarr(d / "s.tif", d / "s.ome.zarr", tile=128, min_level_size=64)
    g = zarr.open_group(str(d / "seg.zarr"), mode="w", zarr_format=3)
    g.create_array("labels", data=lab, chunks=(128, 128))
    write_polygons_geojson([("t1", box(0, 0, W, H))], d / "tubules.geojson", classification="Tubule")
    points = pd.DataFrame({
        "x": [60.0, 150.0, 61.0, 200.0, 150.0, -30.0],
        "y": [50.0, 120.0, 150.0, 30.0, 122.0, 100.0],
        # on nucleus 1; on 2; on the missed one; on no nucleus; on 2 again; outside the slide
        "label": ["SC", "Spg", "P", "PMC", "esptd", "rsptd"],
    })
    write_points_geojson(points, d / "points.geojson")
    return d, centres


def test_every_point_inside_the_slide_reaches_a_crop(constructed, caplog):
    d, centres = constructed
    with caplog.at_level(logging.WARNING, logger="cellstage.cells"):
        table = cells_stage(d / "seg.zarr", d / "s.ome.zarr", d / "tubules.geojson", d / "points.geojson",
                            d / "s.parquet", out_points=d / "s.points.csv", slide_id="s", classes=CLASSES,
                            match_radius_px=10, min_points_on_nuclei=0.9)
    # the point outside the slide is listed (file and point named), never cropped
    assert any("points.geojson" in r.getMessage() and "point 5 (-30.0, 100.0) rsptd" in r.getMessage()
               for r in caplog.records)
    assert any("segmentation QC" in r.getMessage() and "fine-tune" in r.getMessage() for r in caplog.records)
    listed = pd.read_csv(d / "s.points.csv")
    assert list(listed["status"]) == ["nucleus", "nucleus", "point", "point", "point", "outside"]
    assert list(listed["cell_id"]) == [1, 2, -3, -4, -5, -1]
    assert list(table["anchor"]) == ["nucleus", "nucleus", "point", "point", "point"]

    info = extract_crops(d / "s.ome.zarr", d / "seg.zarr", d / "s.parquet", d / "crops" / "s.zarr",
                         d / "crops" / "s.parquet", size=40, meta={"slide": "s"}, classes=CLASSES)
    idx = pd.read_parquet(d / "crops" / "s.parquet").set_index("cell_id")
    assert info["n"] == 5 and info["point_anchored"] == 3
    assert dict(idx["label"]) == {1: "SC", 2: "Spg", -3: "P", -4: "PMC", -5: "esptd"}
    assert dict(idx["mask_source"]) == {1: "segmentation", 2: "segmentation", -3: "point_prompt", -4: "none",
                                        -5: "point_prompt"}
    z = zarr.open_group(str(d / "crops" / "s.zarr"), mode="r")
    # the missed nucleus: crop centred on the point, its mask prompted by the point
    row = int(idx.loc[-3, "row"])
    mask, masked = np.asarray(z["masks"][row]), np.asarray(z["masked"][row])
    truth = np.zeros((40, 40), bool)
    truth[disk((20, 19), 9, shape=(40, 40))] = True  # nucleus (150, 60) in the window around (150, 61)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.85
    assert (masked[~mask] == 0).all() and np.array_equal(masked[mask], np.asarray(z["images"][row])[mask])
    assert not np.asarray(z["masks"][int(idx.loc[-4, "row"])]).any()  # nothing near: empty, flagged "none"

    stages = stage_table({"cells": [d / "s.parquet"], "points": [d / "s.points.csv"],
                          "crops": [d / "crops" / "s.parquet"]}, min_points_on_nuclei=0.9)
    row = stages.iloc[0]
    assert (row.annotated_points, row.matched_to_nucleus, row.crop_from_point, row.outside_slide) == (6, 2, 3, 1)
    assert (row.nuclei, row.labelled, row.crops) == (2, 2, 5)
    assert row.points_on_nuclei == pytest.approx(2 / 5)
    assert "fine-tune" in row.segmentation_qc and "diameter" in row.segmentation_qc


def test_stage_table_flags_only_slides_below_the_threshold(tmp_path):
    for slide, n_on in (("good", 19), ("poor", 17)):
        pd.DataFrame({"label": ["SC"] * 20, "anchor": ["nucleus"] * n_on + ["point"] * (20 - n_on)}).to_parquet(
            tmp_path / f"{slide}.parquet")
        pd.DataFrame({"status": ["nucleus"] * n_on + ["point"] * (20 - n_on)}).to_csv(
            tmp_path / f"{slide}.points.csv", index=False)
    t = stage_table({"cells": [tmp_path / "good.parquet", tmp_path / "poor.parquet"],
                     "points": [tmp_path / "good.points.csv", tmp_path / "poor.points.csv"]},
                    min_points_on_nuclei=0.9).set_index("slide")
    assert t.loc["good", "segmentation_qc"] == "ok"
    assert t.loc["poor", "segmentation_qc"].startswith("only 85% of the annotated points")
    assert list(t["crop_from_point"]) == [1, 3]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The tiny demo preset's labelled reference slides, segmented with the classical segmenter."""
    from cellstage.demo import generate
    from cellstage.io.stage import convert
    from cellstage.segment.stage import segment

    d = tmp_path_factory.mktemp("tiny")
    sheet = pd.read_csv(generate(d / "demo", preset="tiny", seed=0), sep="\t", dtype=str, keep_default_na=False)
    out = {}
    for r in sheet[(sheet["scan"] == "40x") & (sheet["points"] != "")].itertuples():
        z, lab = d / f"{r.slide}.ome.zarr", d / f"{r.slide}.seg.zarr"
        convert(r.path, z, backend=None, mpp=float(r.mpp), tile=512)
        segment(z, r.tubules, None, lab, method="classical", tile=1024, overlap=128, diameter=None, threads=1)
        cells_stage(lab, z, r.tubules, r.points, d / f"{r.slide}.parquet",
                    out_points=d / f"{r.slide}.points.csv", slide_id=r.slide, classes=CLASSES, match_radius_px=10)
        extract_crops(z, lab, d / f"{r.slide}.parquet", d / "crops" / f"{r.slide}.zarr",
                      d / "crops" / f"{r.slide}.parquet", size=80, meta={"slide": r.slide, "scan": "40x"},
                      classes=CLASSES)
        out[r.slide] = d
    return out


def test_tiny_demo_classical_every_in_slide_point_reaches_a_crop(tiny_demo):
    assert len(tiny_demo) == 3
    for slide, d in tiny_demo.items():
        points = pd.read_csv(d / f"{slide}.points.csv")
        idx = pd.read_parquet(d / "crops" / f"{slide}.parquet")
        inside = points[points["status"] != "outside"]
        assert len(inside) == len(points) > 50  # the demo's points all lie on the slide
        # each in-slide point's crop exists, once, with the point's class
        got = idx.set_index("cell_id").loc[inside["cell_id"], "label"]
        assert list(got) == list(inside["label"]), slide
        assert idx["cell_id"].is_unique and int((idx["label"] != "").sum()) == len(inside)
        assert (idx.loc[idx["anchor"] == "point", "mask_source"] != "segmentation").all()
        assert (points["status"] == "point").sum() > 0  # the classical segmenter misses some
    stages = stage_table({"cells": [d / f"{s}.parquet" for s, d in tiny_demo.items()],
                          "points": [d / f"{s}.points.csv" for s, d in tiny_demo.items()],
                          "crops": [d / "crops" / f"{s}.parquet" for s, d in tiny_demo.items()]})
    assert (stages["matched_to_nucleus"] + stages["crop_from_point"] + stages["outside_slide"]
            == stages["annotated_points"]).all()
    assert (stages["crops"] == stages["nuclei"] + stages["crop_from_point"]).all()
