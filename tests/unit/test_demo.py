"""Synthetic demo data generator (cellstage.demo)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellstage.demo import PRESETS, generate, render_section
from cellstage.taxonomy import DEFAULT_CLASSES

COLUMNS = ["slide", "section", "scan", "patient", "split", "path", "mpp", "tubules", "points",
           "masks", "grades"]


def _read_tsv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "a"
    tsv = generate(out, "tiny", seed=0)
    header, rows = _read_tsv(tsv)
    return out, header, rows


def _files(root: Path):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _truth(out, section):
    return json.loads((out / "truth" / f"{section}.json").read_text())


def _polygons(path):
    from shapely.geometry import shape

    fc = json.loads(Path(path).read_text())
    assert fc["type"] == "FeatureCollection"
    polys = []
    for f in fc["features"]:
        assert f["type"] == "Feature"
        assert f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tubule"
        assert f["properties"]["name"].startswith("tubule_")
        assert len(f["geometry"]["coordinates"][0]) <= 201
        g = shape(f["geometry"])
        assert g.is_valid
        polys.append(g)
    return polys


def _points(path):
    fc = json.loads(Path(path).read_text())
    out = []
    for f in fc["features"]:
        assert f["geometry"]["type"] == "Point"
        assert f["properties"]["objectType"] == "annotation"
        x, y = f["geometry"]["coordinates"]
        out.append((x, y, f["properties"]["classification"]["name"]))
    return out


def test_sample_sheet_and_layout(tiny):
    out, header, rows = tiny
    assert header == COLUMNS
    cfg = PRESETS["tiny"]
    assert len(rows) == 2 * len(cfg.sections)
    splits = {r["section"]: r["split"] for r in rows}
    assert sorted(splits.values()) == ["test", "train", "train", "unlabelled"]
    for r in rows:
        assert r["slide"] == f"{r['section']}_{r['scan']}"
        assert Path(r["path"]).is_file()
        assert r["scan"] in ("40x", "20x")
        assert float(r["mpp"]) == pytest.approx(0.17 if r["scan"] == "40x" else 0.34)
        if r["scan"] == "20x":
            assert r["tubules"] == r["points"] == r["masks"] == r["grades"] == ""
            continue
        assert Path(r["tubules"]).is_file() and Path(r["masks"]).is_file()
        assert (r["points"] != "") == (r["split"] in ("train", "test"))
        assert (r["grades"] != "") == (r["split"] == "train")
        t = _truth(out, r["section"])
        assert np.asarray(t["homography_40x_to_20x"]).shape == (3, 3)
        assert t["seed"] == 0


def test_deterministic(tiny, tmp_path):
    out, _, _ = tiny
    b = tmp_path / "b"
    generate(b, "tiny", seed=0)
    fa, fb = _files(out), _files(b)
    assert fa == fb
    for rel in fa:
        da, db = (out / rel).read_bytes(), (b / rel).read_bytes()
        if rel.name == "slides.tsv":  # paths differ by the output dir only
            da = da.replace(str(out).encode(), b"")
            db = db.replace(str(b).encode(), b"")
        assert da == db, f"{rel} differs between two runs with the same seed"
    c = tmp_path / "c"
    generate(c, "tiny", seed=1)
    for rel in fa:
        if rel.suffix == ".tiff":
            assert (out / rel).read_bytes() != (c / rel).read_bytes(), rel


def test_openslide_opens_slides(tiny):
    import openslide
    import tiffslide

    _, _, rows = tiny
    for r in rows:
        mpp = 0.17 if r["scan"] == "40x" else 0.34
        with openslide.OpenSlide(r["path"]) as s:
            assert s.level_count >= 2
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-3)
            assert float(s.properties["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-3)
            w, h = s.dimensions
            assert s.level_dimensions[1] == (w // 2, h // 2)
            tile = np.asarray(s.read_region((w // 4, h // 4), 0, (64, 64)).convert("RGB"))
            assert tile.std() > 1
        t = tiffslide.TiffSlide(r["path"])
        assert float(t.properties["tiffslide.mpp-x"]) == pytest.approx(mpp, rel=1e-3)
        t.close()


def test_geojson_and_points_inside_tubules(tiny):
    from shapely.geometry import Point

    out, _, rows = tiny
    n = 0
    for r in rows:
        if r["scan"] != "40x":
            continue
        polys = _polygons(r["tubules"])
        assert 2 <= len(polys) <= 4
        for i, p in enumerate(polys):
            for q in polys[i + 1:]:
                assert not p.intersects(q)
        size = _truth(out, r["section"])["size_40x"]
        for p in polys:
            x0, y0, x1, y1 = p.bounds
            assert x0 > 0 and y0 > 0 and x1 < size and y1 < size
        if not r["points"]:
            continue
        pts = _points(r["points"])
        t = _truth(out, r["section"])
        assert len(pts) == len(t["true_labels"]) == len(t["points"])
        assert {c for *_, c in pts} <= set(DEFAULT_CLASSES)
        for x, y, _ in pts:
            assert any(p.contains(Point(x, y)) for p in polys)
        # label noise: some dynamic labels moved to an adjacent stage, static ones never
        ann = [c for *_, c in pts]
        changed = [(a, b) for a, b in zip(t["true_labels"], ann) if a != b]
        for a, b in changed:
            assert a not in ("PMC", "SC") and b not in ("PMC", "SC")
            assert abs(DEFAULT_CLASSES.index(a) - DEFAULT_CLASSES.index(b)) == 1
        n += len(pts)
    assert n > 100


def test_class_positions_follow_development(tiny):
    from shapely.geometry import Point

    out, _, rows = tiny
    dist = {c: [] for c in DEFAULT_CLASSES}
    for r in rows:
        if r["scan"] != "40x":
            continue
        polys = _polygons(r["tubules"])
        t = _truth(out, r["section"])
        for (x, y), c in zip(t["points"], t["true_labels"]):
            pt = Point(x, y)
            p = min(polys, key=lambda q: q.distance(pt))
            dist[c].append(p.exterior.distance(pt))
    m = {c: float(np.mean(v)) for c, v in dist.items() if v}
    assert m["PMC"] < min(m["SC"], m["Spg"]) < m["P"] < m["esptd"], m
    assert m["Pl-Z"] < m["P"] < m["rsptd"], m


def test_masks_under_points(tiny):
    out, _, rows = tiny
    for r in rows:
        if r["scan"] != "40x":
            continue
        with tifffile.TiffFile(r["masks"]) as tf:
            page = tf.pages[0]
            assert page.is_tiled and page.dtype == np.uint32
            labels = page.asarray()
        t = _truth(out, r["section"])
        assert labels.shape == (t["size_40x"],) * 2
        pts = np.round(np.asarray(t["points"])).astype(int)
        hit = labels[pts[:, 1], pts[:, 0]] > 0
        assert hit.mean() >= 0.95
        # interstitial nuclei are in the masks too, outside the points
        assert labels.max() >= len(pts)
        assert len(np.unique(labels)) - 1 > len(pts)


def test_homography_maps_nuclei_onto_20x(tiny):
    out, _, rows = tiny
    for r in rows:
        if r["scan"] != "20x":
            continue
        t = _truth(out, r["section"])
        Hm = np.asarray(t["homography_40x_to_20x"])
        im20 = tifffile.imread(r["path"], key=0)
        gray = cv2.cvtColor(im20, cv2.COLOR_RGB2GRAY).astype(float)
        pts = np.asarray(t["points"], float)

        def mean_at(H, pts=pts, gray=gray):
            q = cv2.perspectiveTransform(pts[None], H)[0]
            ok = (q[:, 0] >= 0) & (q[:, 1] >= 0) & (q[:, 0] < gray.shape[1] - 1) & (
                q[:, 1] < gray.shape[0] - 1)
            q = np.round(q[ok]).astype(int)
            return gray[q[:, 1], q[:, 0]].mean(), ok.mean()

        v_true, frac = mean_at(Hm)
        assert frac > 0.8
        shift = np.array([[1, 0, 9.0], [0, 1, -9.0], [0, 0, 1]])
        v_shift, _ = mean_at(shift @ Hm)
        assert v_true < np.median(gray) - 25
        assert v_true < v_shift - 10


def test_grades(tiny):
    out, _, rows = tiny
    for r in rows:
        if not r["grades"]:
            continue
        with open(r["grades"]) as f:
            g = list(csv.DictReader(f))
        assert list(g[0].keys()) == ["x", "y", "grade"]
        grades = np.array([int(x["grade"]) for x in g])
        assert set(grades) <= set(range(1, 7))
        assert (grades <= 4).any() and (grades >= 5).any()
        assert 0.2 < (grades >= 5).mean() < 0.5
        labels = tifffile.imread(r["masks"])
        xy = np.array([[float(x["x"]), float(x["y"])] for x in g]).round().astype(int)
        on = labels[xy[:, 1], xy[:, 0]] > 0
        assert on[grades == 6].sum() == 0  # no cell
        assert on[grades <= 4].mean() > 0.9


def test_render_section_api():
    sec = render_section(3, size=512, n_tubules=1, tubule_radius=(150, 180), n_debris=3,
                         n_interstitial=3, n_empty=5)
    assert sec.image.shape == (512, 512, 3) and sec.image.dtype == np.uint8
    assert sec.labels.shape == (512, 512) and sec.labels.dtype == np.uint32
    assert len(sec.tubules) == 1 and sec.tubules[0].shape[1] == 2
    assert len(sec.points) > 10
    x, y, c = sec.points[0]
    assert c in DEFAULT_CLASSES
    again = render_section(np.random.default_rng(3), size=512, n_tubules=1,
                           tubule_radius=(150, 180), n_debris=3, n_interstitial=3, n_empty=5)
    assert np.array_equal(sec.image, again.image)
    assert np.array_equal(sec.labels, again.labels)
    # background is light pink, nuclei are darker and bluer than their surroundings
    bg = sec.image[sec.labels == 0].mean(0)
    fg = sec.image[sec.labels > 0].mean(0)
    assert fg.sum() < bg.sum() - 100
    assert fg[2] > fg[1]
