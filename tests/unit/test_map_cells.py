"""register.stage.map_cells: cells, labels, tubules and points of the reference scan on the other scan;
what maps outside that slide is listed, never clipped, and a failed registration maps nothing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from shapely.geometry import Polygon

from cellstage.io import convert_to_omezarr, read_points, read_polygons, write_points_geojson, write_polygons_geojson
from cellstage.io.labels import create_labels
from cellstage.register.mapping import OUTSIDE_COLUMNS, map_cell_table, map_points_report, outside_report
from cellstage.register.stage import map_cells

# 40x reference (400x400 px, 0.25 um/px) -> 20x target (150x150 px, 0.5 um/px): halve, shift by -20
H = [[0.5, 0.0, -20.0], [0.0, 0.5, -20.0], [0.0, 0.0, 1.0]]


def _pair(tmp_path, ok=True):
    img = np.full((150, 150, 3), 230, np.uint8)
    tifffile.imwrite(tmp_path / "mov.tif", img, photometric="rgb", tile=(64, 64),
                     resolution=(1e4 / 0.5,) * 2, resolutionunit="CENTIMETER")
    convert_to_omezarr(tmp_path / "mov.tif", tmp_path / "mov.ome.zarr", tile=64, min_level_size=64)
    labels = create_labels(tmp_path / "ref_labels.zarr", (400, 400), mpp=0.25, slide="ref")
    lab = np.zeros((400, 400), np.uint32)
    cells = pd.DataFrame({"cell_id": [1, 2, 3], "slide": "ref", "centroid_x": [100.0, 300.0, 390.0],
                          "centroid_y": [100.0, 200.0, 390.0], "label": ["SC", "P", "esptd"]})
    for cid, x, y in zip(cells["cell_id"], cells["centroid_x"], cells["centroid_y"]):
        lab[int(y) - 4: int(y) + 5, int(x) - 4: int(x) + 5] = cid
    labels[:] = lab
    (tmp_path / "reg.json").write_text(json.dumps({"H": H if ok else None, "ok": ok,
                                                   "message": "" if ok else "too few inliers (3 < 30)"}))
    write_points_geojson(pd.DataFrame({"x": [100.0, 395.0], "y": [100.0, 20.0], "label": ["SC", "P"]}),
                         tmp_path / "points.geojson")
    write_polygons_geojson([("t_in", Polygon([(60, 60), (200, 60), (200, 200), (60, 200)])),
                            ("t_edge", Polygon([(250, 250), (399, 250), (399, 399), (250, 399)]))],
                           tmp_path / "tubules.geojson", classification="Tubule")
    cells.to_parquet(tmp_path / "ref_cells.parquet")


def _run(tmp_path):
    return map_cells(
        tmp_path / "reg.json", tmp_path / "ref_cells.parquet", tmp_path / "ref_labels.zarr",
        tmp_path / "mov.ome.zarr", tmp_path / "out.parquet", tmp_path / "out_labels.zarr", slide_id="mov",
        tubules=tmp_path / "tubules.geojson", points=tmp_path / "points.geojson",
        out_tubules=tmp_path / "out.tubules.geojson", out_points=tmp_path / "out.points.geojson",
        out_outside=tmp_path / "out.outside.csv")


def test_cells_points_and_tubules_outside_the_target_are_listed_not_clipped(tmp_path):
    _pair(tmp_path)
    _run(tmp_path)
    cells = pd.read_parquet(tmp_path / "out.parquet")
    # cell 3 maps to (175, 175): outside the 150x150 target, so it gets no row (and no crop) there
    assert cells["cell_id"].tolist() == [1, 2]
    assert np.allclose(cells[["centroid_x", "centroid_y"]].to_numpy(), [[30, 30], [130, 80]])
    out = pd.read_csv(tmp_path / "out.outside.csv")
    assert sorted(zip(out["kind"], out["id"].astype(str))) == [("cell", "3"), ("point", "1"), ("tubule", "t_edge")]
    cell3 = out[out["kind"] == "cell"].iloc[0]
    assert (cell3["source_x"], cell3["mapped_x"], cell3["label"]) == (390.0, 175.0, "esptd")  # not clipped
    pts = read_points(tmp_path / "out.points.geojson")
    assert pts[["x", "y"]].to_numpy().tolist() == [[30.0, 30.0], [177.5, -10.0]]  # every point, as mapped
    tub = dict(read_polygons(tmp_path / "out.tubules.geojson"))
    assert tub["t_in"].bounds == (10.0, 10.0, 80.0, 80.0)
    labels = np.asarray(zarr.open_group(str(tmp_path / "out_labels.zarr"), mode="r")["labels"][:])
    assert labels.shape == (150, 150) and set(np.unique(labels)) == {0, 1, 2}
    assert labels[30, 30] == 1 and labels[80, 130] == 2


def test_a_pair_that_failed_registration_maps_nothing(tmp_path):
    _pair(tmp_path, ok=False)
    _run(tmp_path)
    assert len(pd.read_parquet(tmp_path / "out.parquet")) == 0
    assert len(read_points(tmp_path / "out.points.geojson")) == 0
    assert len(pd.read_csv(tmp_path / "out.outside.csv")) == 0
    labels = zarr.open_group(str(tmp_path / "out_labels.zarr"), mode="r")
    assert not np.asarray(labels["labels"][:]).any() and labels["labels"].attrs["registration_ok"] is False


def test_outside_report_lists_what_left_the_frame_with_source_and_mapped_coordinates():
    """register.mapping.outside_report on its own: one row per cell / point / tubule off the
    target slide, never clipped; an empty report still has its columns."""
    cells = pd.DataFrame({"cell_id": [7, 8], "centroid_x": [100.0, 390.0], "centroid_y": [100.0, 390.0],
                          "label": ["SC", ""]})
    pts = pd.DataFrame({"x": [100.0, 395.0], "y": [100.0, 20.0], "label": ["SC", "P"]})
    tubules = [("t_in", Polygon([(10, 10), (80, 10), (80, 80)])),
               ("t_edge", Polygon([(100, 100), (180, 100), (180, 180)]))]
    rep = outside_report((150, 150), cells=(cells, map_cell_table(cells, H, 0.5, (150, 150))),
                         points=(pts, map_points_report(pts, H, (150, 150))[0]), tubules=tubules)
    assert list(rep.columns) == OUTSIDE_COLUMNS
    assert rep[["kind", "id", "label"]].values.tolist() == [["cell", "8", ""], ["point", "1", "P"],
                                                            ["tubule", "t_edge", "Tubule"]]
    assert rep.iloc[0][["source_x", "mapped_x", "mapped_y"]].tolist() == [390.0, 175.0, 175.0]
    assert rep.iloc[1][["source_x", "source_y", "mapped_x", "mapped_y"]].tolist() == [395.0, 20.0, 177.5, -10.0]
    assert rep.iloc[2]["mapped_x"] == pytest.approx(460 / 3) and np.isnan(rep.iloc[2]["source_x"])
    empty = outside_report((150, 150))
    assert list(empty.columns) == OUTSIDE_COLUMNS and len(empty) == 0
