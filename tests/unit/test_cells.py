"""Tests for cellstage.cells: ROI geometry, wall distances, block-wise cell table, points."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point, Polygon, box
from skimage.draw import ellipse


def _circle(cx, cy, r, n=720):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return Polygon(np.c_[cx + r * np.cos(t), cy + r * np.sin(t)])


def test_circle_geometry_and_distance():
    from cellstage.cells import distance_to_wall, roi_geometry

    R = 100.0
    poly = _circle(300, 200, R)
    g = roi_geometry(poly)
    assert g["compactness"] == pytest.approx(1.0, abs=1e-3)
    assert g["min_bbox_width"] == pytest.approx(2 * R, rel=1e-3)
    assert g["norm_factor"] == pytest.approx(R, rel=1e-3)
    d = distance_to_wall(poly, [300, 300 + 60], [200, 200])
    assert d[0] == pytest.approx(R, rel=1e-3)
    assert d[1] == pytest.approx(R - 60, abs=0.1)
    assert d[0] / g["norm_factor"] == pytest.approx(1.0, rel=2e-3)


def test_square_and_rotated_rectangle_geometry():
    from cellstage.cells import distance_to_wall, roi_geometry

    s = 80.0
    g = roi_geometry(box(10, 20, 10 + s, 20 + s))
    assert g["compactness"] == pytest.approx(math.pi / 4)
    assert g["min_bbox_width"] == pytest.approx(s)
    assert g["norm_factor"] == pytest.approx(s / (math.pi / 2))
    assert distance_to_wall(box(10, 20, 10 + s, 20 + s), [50], [60])[0] == pytest.approx(s / 2)
    # rotated 30° rectangle 200 x 50: min bbox width is the short side, not the axis-aligned one
    from shapely import affinity

    rect = affinity.rotate(box(0, 0, 200, 50), 30, origin=(0, 0))
    assert roi_geometry(rect)["min_bbox_width"] == pytest.approx(50, rel=1e-6)


def _label_image(H=600, W=700, seed=0, n=120):
    rng = np.random.default_rng(seed)
    lab = np.zeros((H, W), np.uint32)
    k = 0
    for _ in range(n):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)  # may be cut by the image edge
        a, b = rng.uniform(8, 28), rng.uniform(8, 20)
        rr, cc = ellipse(cy, cx, a, b, shape=(H, W), rotation=rng.uniform(0, np.pi))
        free = lab[rr, cc] == 0
        if free.sum() < 20:
            continue
        k += 1
        lab[rr[free], cc[free]] = 1000 + 7 * k  # non-sequential ids
    return lab


def test_cell_table_columns_dtypes_and_blockwise_equals_whole():
    from skimage.measure import regionprops

    from cellstage.cells import COLUMNS, cell_table

    lab = _label_image()
    H, W = lab.shape
    rois = [("t1", box(0, 0, 350, H)), ("t2", box(350, 0, W, H))]
    whole = cell_table(lab, rois, mpp=0.17, slide="s1", block=10_000)
    small = cell_table(lab, rois, mpp=0.17, slide="s1", block=97)  # many objects cross blocks
    assert list(whole.columns) == list(COLUMNS)
    assert [str(t) for t in whole.dtypes] == list(COLUMNS.values())
    pd.testing.assert_frame_equal(whole, small)
    ref = {r.label: r for r in regionprops(lab.astype(np.int64))}
    assert set(whole.cell_id) == set(ref)
    for row in whole.itertuples():
        r = ref[row.cell_id]
        assert row.area_px == r.area
        assert row.perimeter_px == pytest.approx(r.perimeter)
        assert (row.centroid_y, row.centroid_x) == pytest.approx(r.centroid)
        assert (row.bbox_y0, row.bbox_x0, row.bbox_y1, row.bbox_x1) == r.bbox
        assert row.compactness == pytest.approx(4 * math.pi * r.area / r.perimeter**2)
        assert row.area_um2 == pytest.approx(r.area * 0.17**2)
        assert row.perimeter_um == pytest.approx(r.perimeter * 0.17)
        assert row.roi_id == ("t1" if row.centroid_x < 350 else "t2")
        poly = dict(rois)[row.roi_id]
        d = poly.exterior.distance(Point(row.centroid_x, row.centroid_y))
        assert row.distance_to_wall_px == pytest.approx(d)
        assert row.distance_to_wall_um == pytest.approx(d * 0.17)
    assert (whole.label == "").all() and (whole.slide == "s1").all()
    # the list: id, centroid, bbox, area, perimeter, compactness, ROI id, distance to the
    # wall and its normalisation; lengths/areas in µm as well as px
    for c in ("cell_id", "centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
              "area_px", "area_um2", "perimeter_px", "perimeter_um", "compactness", "roi_id",
              "distance_to_wall_px", "distance_to_wall_um", "distance_norm"):
        assert c in whole.columns, c


def test_cell_table_on_zarr_and_roi_filter(tmp_path):
    import zarr

    from cellstage.cells import cell_table

    lab = _label_image(seed=1)
    z = zarr.create_array(tmp_path / "l.zarr", shape=lab.shape, chunks=(128, 128), dtype="uint32")
    z[:] = lab
    circ = _circle(350, 300, 200)
    df = cell_table(z, [("c", circ)], mpp=0.5, slide="s", block=256)
    ref = cell_table(lab, None, mpp=0.5, slide="s")
    assert (ref.roi_id == "").all() and ref.distance_norm.isna().all()
    inside = [circ.contains(Point(x, y)) for x, y in zip(ref.centroid_x, ref.centroid_y)]
    assert len(df) == sum(inside) > 10
    assert df.distance_norm.between(0, 1.0001).all()
    kept = cell_table(lab, [("c", circ)], mpp=0.5, slide="s", keep_outside=True)
    assert len(kept) == len(ref) and (kept.roi_id == "").sum() == len(ref) - len(df)


def test_point_assignment():
    from cellstage.cells import cell_table

    lab = np.zeros((200, 200), np.uint32)
    lab[20:40, 20:40] = 5
    lab[100:130, 100:120] = 9
    lab[150:170, 30:50] = 11
    pts = pd.DataFrame({
        "x": [30.2, 110.0, 112.0, 60.0, 52.0, 190.0],
        "y": [29.7, 115.0, 118.0, 10.0, 160.0, 190.0],
        "label": ["A", "B", "C", "D", "E", "F"],
    })
    # A on 5 (label lookup); B on 9; C also on 9 -> multiple; D far -> unmatched;
    # E next to 11 (centroid (39.5, 159.5), 12.5 px away) -> nearest within radius 15; F unmatched
    # every point reaches a row: C, D and F are anchored at the point itself, cell_id -(index + 1)
    df = cell_table(lab, None, mpp=0.25, slide="s", points=pts, match_radius_px=15)
    got = dict(zip(df.cell_id, df.label))
    assert got == {5: "A", 9: "B", 11: "E", -3: "C", -4: "D", -6: "F"}
    assert dict(zip(df.cell_id, df.anchor)) == {5: "nucleus", 9: "nucleus", 11: "nucleus",
                                                -3: "point", -4: "point", -6: "point"}
    d = df.set_index("cell_id").loc[-4]
    assert (d.centroid_x, d.centroid_y, d.bbox_x0, d.bbox_y0, d.bbox_x1, d.area_px) == (60.0, 10.0, 60, 10, 61, 0)
    c = df.attrs["point_matching"]
    assert {k: c[k] for k in ("points", "matched", "unmatched", "multiple", "by_label", "by_nearest")} == {
        "points": 6, "matched": 3, "unmatched": 2, "multiple": 1, "by_label": 2, "by_nearest": 1}
    assert (c["outside"], c["point_anchored"]) == (0, 3)
    assert c["on_nucleus_fraction"] == pytest.approx(3 / 6)
    df2 = cell_table(lab, None, mpp=0.25, slide="s", points=pts)  # default radius 10 px
    assert dict(zip(df2.cell_id, df2.label))[11] == ""
