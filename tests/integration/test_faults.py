"""Fault injection (issue 15 item 5): bad slides, annotations, slide sheets and configs.

One case table (:data:`CASES`), four categories. Every case is checked for
  (1) a non-zero exit of the run / a failed stage job, or (outcome ``warn``) a finished stage that
      reports the exclusion or repair in its log;
  (2) a message that names the culprit (file name, slide id, column or config key) and the problem;
  (3) no finished-looking output of the failed stage (hidden ``.<name>.*.tmp`` partials are listed,
      not counted as finished);
  (4) per-slide faults: the good slides of the same batch finish their stage under ``--keep-going``;
      start-up faults (sheet, config): nothing under ``results/`` is written.

How it runs (real Snakefile, real stage code, tiny synthetic files in a temporary directory):
  * slides: ONE ``snakemake --keep-going`` run over the ``convert`` targets of every bad slide plus
    three good ones (one of them 12-bit, which must be rescaled, not shifted);
  * annotations: ONE ``--keep-going`` run with ``segmentation.method: classical`` (no model to
    train) whose targets are the earliest stage reading each file: ``segment`` (tubules),
    ``cells`` (points), ``train_grader`` (grades);
  * sheet and config: one real ``snakemake`` start per case (a convert target, no ``-n``, so a fault
    the start-up misses shows as a run that goes ahead), two at a time.

Cases (category / name: the fault -> what the message must name):

slide (rule convert; log results/logs/convert/<slide>.log must name the file)
  truncated        pyramidal TIFF cut in half                     -> "truncated"
  png_as_svs       PNG named .svs                                 -> "png image", "unsupported format"
  text_as_ndpi     text file named .ndpi                          -> "text file", "unsupported format"
  empty_file       0-byte .svs                                    -> "empty"
  gzip_as_tiff     gzip archive named .tiff                       -> "unsupported format"
  no_mpp           TIFF without resolution, no sheet mpp          -> "no pixel size", "mpp"
  bad_tile         one JPEG tile overwritten with noise           -> "corrupt"
  zero_level       pyramid level 1 with ImageWidth 0              -> "zero size"
  four_samples     4 separate sample planes (not RGB)             -> "4 samples per pixel"
  five_samples     5 separate sample planes                       -> "5 samples per pixel"
  ome_5_channels   5-channel fluorescence OME-TIFF                -> "5 channels"
  float_range      float samples up to 1000                       -> "float samples up to 1000"
  u16_openslide    16-bit samples with sheet backend openslide    -> "16-bit samples", "backend"
  directory_path   sheet path is a folder (read as a zarr)        -> "not a readable zarr group"
  (good: good_a, good_b, twelve_bit: 12-bit in uint16 must come out white, not near black)

annotation (rules segment / cells / train_grader)
  tubules_empty         no features                          -> "no polygons in the ROI"
  tubules_points_only   only Point features                  -> "no polygons", "Point"
  tubules_tissue_only   only a "Tissue" outline              -> "annotations.region_classes", "Tissue"
  tubules_outside       tubule beyond the image              -> "outside the image"
  tubules_not_json      an HTML page, not JSON               -> "not valid GeoJSON"
  tubules_degenerate    zero-area (collinear) polygon        -> "cannot be repaired"
  tubules_tissue_extra  Tissue outline beside a tubule       -> warn: "not used as regions", "Tissue"
  tubules_bowtie        self-intersecting polygon            -> warn: "invalid polygon", "Self-intersection"
  tubules_multipart     two-part MultiPolygon                -> warn: "multi-part", "2 parts"
  points_outside        annotated points beyond the image    -> warn: "outside the slide", listed in points.csv
  points_unknown_class  class "Spermatid X" not in classes   -> "Spermatid X", "point 1"
  points_no_label_col   points CSV without a label column    -> "missing column 'label'"
  points_non_numeric    points CSV with x = "abc"            -> "non-numeric"
  points_nan            points CSV with an empty y           -> "non-finite"
  grades_all_outside    every graded point beyond the slide  -> "all 2 graded points", "outside the image"

sheet (start-up, workflow/rules/common.smk)
  missing_required_column   no `patient` column              -> "missing required column", "patient"
  misspelled_optional       `grade` for `grades`             -> "unknown column 'grade'", "did you mean 'grades'"
  unknown_column            extra `notes` column             -> "unknown column 'notes'"
  duplicate_slide           a slide id twice                 -> "duplicates", slide id
  unknown_scan              scan 60x not in config scans     -> "60x", "scans"
  missing_slide_file        path to nowhere                  -> "files not found", file name
  missing_tubules_file      tubules to nowhere               -> "files not found", file name
  negative_mpp              mpp -0.5                         -> "mpp"
  non_numeric_mpp           mpp "half"                       -> "mpp", "half", slide id
  bad_split                 split "training"                 -> "training", "split"
  bad_slide_id              slide id "bad id/1"              -> "bad id/1"
  bad_backend               backend "vips"                   -> "vips", "backend"
  reference_without_tubules reference scan row, no tubules   -> "tubules", slide id
  section_without_reference only a 20x row for a section     -> "reference_scan", section id
  split_leak                one patient in train and test    -> "pat_a"

config (start-up: schema workflow/schemas/config.schema.yaml + cellstage.config.check_config)
  seed_negative, seed_too_large, seed_not_integer, diameter_zero, static_not_in_classes,
  reference_scan_unknown, one_class, duplicate_classes, crop_size_too_small, method_unknown,
  metric_unknown, init_unknown, unknown_key, grading_threshold, region_classes_empty,
  pipeline_unknown, sheet_not_found,
  backbone_unknown, grading_backbone_unknown (checked against timm at start-up)
                            -> the key path (and value) in the message
  yaml_syntax               -> the file, "not valid YAML", the line and column (checked before
                               snakemake's `configfile:`, whose own message names neither)
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MPP = 0.5
SHEET_COLUMNS = ["slide", "section", "scan", "patient", "split", "path", "mpp", "tubules", "points", "masks", "grades"]


@dataclass(frozen=True)
class Case:
    name: str
    category: str  # slide | annotation | sheet | config
    make: Callable  # builds the fault; signature per category (see the makers below)
    expect: tuple[str, ...]  # words the message must contain (case-insensitive)
    outcome: str = "fail"  # fail: the run/job fails; warn: the stage finishes and reports it
    stage: str = ""  # annotation cases: segment | cells | grader
    gap: str | None = None  # not handled today: xfail(strict=True) with this reason
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- synthetic files
def _tissue(h=700, w=900, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, np.uint8)
    img[80 : h - 80, 60 : w - 60] = rng.integers(70, 200, (h - 160, w - 120, 3), dtype=np.uint8)
    return img


def _pyramid(path: Path, img: np.ndarray, *, resolution=True, compression="jpeg", tile=256) -> Path:
    import cv2

    levels = [img]
    while max(levels[-1].shape[:2]) > 256:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    with tifffile.TiffWriter(path) as tw:
        for k, lv in enumerate(levels):
            kw = {}
            if resolution:
                res = 1e4 / (MPP * 2**k)
                kw = dict(resolution=(res, res), resolutionunit="CENTIMETER")
            tw.write(
                lv,
                photometric="rgb",
                tile=(tile, tile),
                compression=compression,
                subfiletype=0 if k == 0 else 1,
                metadata=None,
                software=False,
                **kw,
            )
    return path


def _flat_tiff(path: Path, data: np.ndarray, **kw) -> Path:
    kw.setdefault("tile", (64, 64))
    tifffile.imwrite(path, data, resolution=(1e4 / MPP,) * 2, resolutionunit="CENTIMETER", **kw)
    return path


# slide makers: make(d) -> (path, sheet overrides)
def _truncated(d):
    full = _pyramid(d / "full.part.tiff", _tissue(seed=7)).read_bytes()
    (d / "truncated.tiff").write_bytes(full[: len(full) // 2])
    (d / "full.part.tiff").unlink()
    return d / "truncated.tiff", {}


def _png_as_svs(d):
    import cv2

    ok, png = cv2.imencode(".png", _tissue(200, 300))
    assert ok
    (d / "photo.svs").write_bytes(png.tobytes())
    return d / "photo.svs", {}


def _text_as_ndpi(d):
    (d / "notes.ndpi").write_text("scanner export log\nslide 17: failed\n")
    return d / "notes.ndpi", {}


def _empty_file(d):
    (d / "empty.svs").write_bytes(b"")
    return d / "empty.svs", {}


def _gzip_as_tiff(d):
    data = _pyramid(d / "inner.part.tiff", _tissue(seed=8)).read_bytes()
    (d / "inner.part.tiff").unlink()
    (d / "download.tiff").write_bytes(gzip.compress(data))
    return d / "download.tiff", {}


def _no_mpp(d):
    return _pyramid(d / "nores.tiff", _tissue(seed=3), resolution=False), {"mpp": ""}


def _bad_tile(d):
    p = _pyramid(d / "badtile.tiff", _tissue(seed=4))
    with tifffile.TiffFile(p) as tf:
        page = tf.pages[0]
        k = -(-page.imagewidth // page.tilewidth)  # tile (row 1, col 0): not the tile open_slide probes
        off, cnt = int(page.dataoffsets[k]), int(page.databytecounts[k])
    data = bytearray(p.read_bytes())
    rng = np.random.default_rng(0)
    data[off + cnt // 4 : off + cnt] = rng.integers(0, 256, cnt - cnt // 4, dtype=np.uint8).tobytes()
    p.write_bytes(bytes(data))
    return p, {}


def _zero_level(d):
    p = _pyramid(d / "zerolevel.tiff", _tissue(seed=5))
    with tifffile.TiffFile(p) as tf:
        tag = tf.pages[1].tags["ImageWidth"]
        off, fmt = tag.valueoffset, ("<H" if int(tag.dtype) == 3 else "<I")
    data = bytearray(p.read_bytes())
    struct.pack_into(fmt, data, off, 0)
    p.write_bytes(bytes(data))
    return p, {}


def _samples(n):
    def make(d):
        p = _flat_tiff(
            d / f"planes{n}.tiff",
            np.full((n, 128, 128), 100, np.uint8),
            photometric="minisblack",
            planarconfig="separate",
        )
        return p, {}

    return make


def _ome_5_channels(d):
    p = d / "fluo5.ome.tiff"
    tifffile.imwrite(
        p,
        np.full((5, 128, 128), 7, np.uint16),
        ome=True,
        photometric="minisblack",
        tile=(64, 64),
        metadata={
            "axes": "CYX",
            "PhysicalSizeX": MPP,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": MPP,
            "PhysicalSizeYUnit": "µm",
        },
    )
    return p, {}


def _float_range(d):
    return _flat_tiff(d / "float1000.tiff", np.full((128, 128, 3), 1000.0, np.float32), photometric="rgb"), {}


def _u16_openslide(d):
    p = _flat_tiff(d / "u16.tiff", np.full((128, 128, 3), 4095, np.uint16), photometric="rgb")
    return p, {"backend": "openslide"}


def _directory_path(d):
    (d / "folder.tiff").mkdir()
    return d / "folder.tiff", {}


def _twelve_bit(d):
    a = np.full((256, 256, 3), 4095, np.uint16)  # white in 12 bits
    a[128:] = 2048
    return _flat_tiff(d / "u12.tiff", a, photometric="rgb"), {}


GOOD_SLIDES = {
    "good_a": lambda d: (_pyramid(d / "good_a.tiff", _tissue(seed=0)), {}),
    "good_b": lambda d: (_pyramid(d / "good_b.tiff", _tissue(seed=1)), {}),
    "twelve_bit": _twelve_bit,
}

SLIDE_CASES = [
    Case("truncated", "slide", _truncated, ("truncated.tiff", "truncated")),
    Case("png_as_svs", "slide", _png_as_svs, ("photo.svs", "png image", "unsupported format")),
    Case("text_as_ndpi", "slide", _text_as_ndpi, ("notes.ndpi", "text file", "unsupported format")),
    Case("empty_file", "slide", _empty_file, ("empty.svs", "empty")),
    Case("gzip_as_tiff", "slide", _gzip_as_tiff, ("download.tiff", "unsupported format")),
    Case("no_mpp", "slide", _no_mpp, ("nores.tiff", "no pixel size", "mpp")),
    Case("bad_tile", "slide", _bad_tile, ("badtile.tiff", "corrupt")),
    Case("zero_level", "slide", _zero_level, ("zerolevel.tiff", "zero size")),
    Case("four_samples", "slide", _samples(4), ("planes4.tiff", "4 samples per pixel")),
    Case("five_samples", "slide", _samples(5), ("planes5.tiff", "5 samples per pixel")),
    Case("ome_5_channels", "slide", _ome_5_channels, ("fluo5.ome.tiff", "5 channels")),
    Case("float_range", "slide", _float_range, ("float1000.tiff", "float samples up to 1000")),
    Case("u16_openslide", "slide", _u16_openslide, ("u16.tiff", "16-bit samples", "backend")),
    Case("directory_path", "slide", _directory_path, ("folder.tiff", "not a readable zarr group")),
]


# --------------------------------------------------------------------------- annotation files
SLIDE_W, SLIDE_H = 800, 600  # the annotation batch's slides
TUBULE = [[[150, 150], [450, 150], [450, 420], [150, 420], [150, 150]]]


def _feature(geometry: dict, name: str | None = None, cls: str | None = None) -> dict:
    props: dict = {"objectType": "annotation"}
    if name is not None:
        props["name"] = name
    if cls is not None:
        props["classification"] = {"name": cls}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _geojson(path: Path, features: list) -> str:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return str(path)


def _poly(coords) -> dict:
    return {"type": "Polygon", "coordinates": coords}


def _point(x, y, cls) -> dict:
    return _feature({"type": "Point", "coordinates": [x, y]}, cls=cls)


def good_tubules(d: Path) -> str:
    return _geojson(d / "good.tubules.geojson", [_feature(_poly(TUBULE), "t0", "Tubule")])


def good_points(d: Path) -> str:
    return _geojson(d / "good.points.geojson", [_point(200, 200, "SC"), _point(300, 300, "P")])


def _tubules(features_fn):
    def make(d, name):
        return {"tubules": _geojson(d / f"{name}.tubules.geojson", features_fn())}

    return make


def _tubules_not_json(d, name):
    p = d / f"{name}.tubules.geojson"
    p.write_text("<html><body>QuPath export failed</body></html>\n")
    return {"tubules": str(p)}


def _points(features):
    def make(d, name):
        return {"tubules": good_tubules(d), "points": _geojson(d / f"{name}.points.geojson", features)}

    return make


def _points_csv(text):
    def make(d, name):
        p = d / f"{name}.points.csv"
        p.write_text(text)
        return {"tubules": good_tubules(d), "points": str(p)}

    return make


def _grades_outside(d, name):
    p = d / f"{name}.grades.csv"
    pd.DataFrame({"x": [5000.0, 6000.0], "y": [50.0, 60.0], "grade": [1, 6]}).to_csv(p, index=False)
    return {"tubules": good_tubules(d), "grades": str(p)}


TISSUE = [[[0, 0], [SLIDE_W - 1, 0], [SLIDE_W - 1, SLIDE_H - 1], [0, SLIDE_H - 1], [0, 0]]]
BOWTIE = [[[150, 150], [400, 400], [400, 150], [150, 400], [150, 150]]]
MULTI = {
    "type": "MultiPolygon",
    "coordinates": [TUBULE, [[[500, 150], [650, 150], [650, 300], [500, 300], [500, 150]]]],
}

ANNOTATION_CASES = [
    Case(
        "tubules_empty",
        "annotation",
        _tubules(lambda: []),
        ("tubules_empty.tubules.geojson", "no polygons in the ROI"),
        stage="segment",
    ),
    Case(
        "tubules_points_only",
        "annotation",
        _tubules(lambda: [_point(200, 200, "Tubule")]),
        ("tubules_points_only.tubules.geojson", "no polygons", "Point"),
        stage="segment",
    ),
    Case(
        "tubules_tissue_only",
        "annotation",
        _tubules(lambda: [_feature(_poly(TISSUE), "tissue", "Tissue")]),
        ("tubules_tissue_only.tubules.geojson", "annotations.region_classes", "Tissue"),
        stage="segment",
    ),
    Case(
        "tubules_outside",
        "annotation",
        _tubules(
            lambda: [_feature(_poly([[[600, 400], [1200, 400], [1200, 900], [600, 900], [600, 400]]]), "far", "Tubule")]
        ),
        ("tubules_outside.tubules.geojson", "outside the image", "far"),
        stage="segment",
    ),
    Case(
        "tubules_not_json",
        "annotation",
        _tubules_not_json,
        ("tubules_not_json.tubules.geojson", "not valid GeoJSON"),
        stage="segment",
    ),
    Case(
        "tubules_degenerate",
        "annotation",
        _tubules(lambda: [_feature(_poly([[[100, 100], [200, 200], [300, 300], [100, 100]]]), "flat", "Tubule")]),
        ("tubules_degenerate.tubules.geojson", "'flat'", "cannot be repaired"),
        stage="segment",
    ),
    Case(
        "tubules_tissue_extra",
        "annotation",
        _tubules(lambda: [_feature(_poly(TISSUE), "tissue", "Tissue"), _feature(_poly(TUBULE), "t0", "Tubule")]),
        ("tubules_tissue_extra.tubules.geojson", "not used as regions", "'tissue' (Tissue)"),
        outcome="warn",
        stage="segment",
    ),
    Case(
        "tubules_bowtie",
        "annotation",
        _tubules(lambda: [_feature(_poly(BOWTIE), "bt", "Tubule")]),
        ("tubules_bowtie.tubules.geojson", "'bt'", "invalid polygon", "Self-intersection"),
        outcome="warn",
        stage="segment",
    ),
    Case(
        "tubules_multipart",
        "annotation",
        _tubules(lambda: [_feature(MULTI, "mp", "Tubule")]),
        ("tubules_multipart.tubules.geojson", "multi-part", "'mp' (2 parts)"),
        outcome="warn",
        stage="segment",
    ),
    Case(
        "points_outside",
        "annotation",
        _points([_point(200, 200, "SC"), _point(5000, 20, "P"), _point(-3, 40, "SC")]),
        ("points_outside.points.geojson", "outside the slide", "5000.0, 20.0"),
        outcome="warn",
        stage="cells",
    ),
    Case(
        "points_unknown_class",
        "annotation",
        _points([_point(200, 200, "SC"), _point(300, 300, "Spermatid X")]),
        ("points_unknown_class.points.geojson", "Spermatid X", "point 1"),
        stage="cells",
    ),
    Case(
        "points_no_label_col",
        "annotation",
        _points_csv("x,y\n200,200\n"),
        ("points_no_label_col.points.csv", "missing column 'label'"),
        stage="cells",
    ),
    Case(
        "points_non_numeric",
        "annotation",
        _points_csv("x,y,label\nabc,200,SC\n"),
        ("points_non_numeric.points.csv", "non-numeric"),
        stage="cells",
    ),
    Case(
        "points_nan",
        "annotation",
        _points_csv("x,y,label\n200,,SC\n"),
        ("points_nan.points.csv", "non-finite"),
        stage="cells",
    ),
    Case(
        "grades_all_outside",
        "annotation",
        _grades_outside,
        ("grades_all_outside.grades.csv", "all 2 graded points", "outside the image"),
        stage="grader",
    ),
]
GOOD_ANNOTATED = ["ann_good_a", "ann_good_b"]


# --------------------------------------------------------------------------- sheet faults
# make(sheet: DataFrame, d: Path) -> DataFrame (the base has good_a (train, pat_a) and good_b (test, pat_b))
def _drop(col):
    return lambda s, d: s.drop(columns=[col])


def _rename(old, new):
    return lambda s, d: s.rename(columns={old: new})


def _set(row, col, value):
    def make(s, d):
        s = s.copy()
        s.loc[row, col] = value
        return s

    return make


def _dup_slide(s, d):
    extra = s.iloc[[1]].copy()
    extra["slide"] = "good_a"
    extra["section"] = "sec_c"
    return pd.concat([s, extra], ignore_index=True)


def _add_20x_only(s, d):
    extra = s.iloc[[1]].copy()
    extra["slide"], extra["section"], extra["scan"], extra["tubules"] = "lonely_20x", "sec_lonely", "20x", ""
    return pd.concat([s, extra], ignore_index=True)


def _notes(s, d):
    s = s.copy()
    s["notes"] = "ok"
    return s


SHEET_CASES = [
    Case("missing_required_column", "sheet", _drop("patient"), ("slides.tsv", "missing required column", "patient")),
    Case(
        "misspelled_optional",
        "sheet",
        _rename("grades", "grade"),
        ("slides.tsv", "unknown column 'grade'", "did you mean 'grades'"),
    ),
    Case("unknown_column", "sheet", _notes, ("slides.tsv", "unknown column 'notes'")),
    Case("duplicate_slide", "sheet", _dup_slide, ("slides.tsv", "duplicates", "good_a")),
    Case("unknown_scan", "sheet", _set(1, "scan", "60x"), ("slides.tsv", "60x", "scans")),
    Case(
        "missing_slide_file",
        "sheet",
        lambda s, d: _set(1, "path", str(d / "gone.svs"))(s, d),
        ("files not found", "good_b", "gone.svs"),
    ),
    Case(
        "missing_tubules_file",
        "sheet",
        lambda s, d: _set(0, "tubules", str(d / "gone.geojson"))(s, d),
        ("files not found", "good_a", "gone.geojson"),
    ),
    Case("negative_mpp", "sheet", _set(0, "mpp", "-0.5"), ("mpp", "-0.5")),
    Case(
        "non_numeric_mpp",
        "sheet",
        _set(0, "mpp", "half"),
        ("mpp", "half", "good_a"),
    ),
    Case("bad_split", "sheet", _set(0, "split", "training"), ("split", "training")),
    Case("bad_slide_id", "sheet", _set(0, "slide", "bad id/1"), ("bad id/1",)),
    Case("bad_backend", "sheet", lambda s, d: _set(0, "backend", "vips")(s.assign(backend=""), d), ("backend", "vips")),
    Case("reference_without_tubules", "sheet", _set(1, "tubules", ""), ("slides.tsv", "good_b", "tubules")),
    Case("section_without_reference", "sheet", _add_20x_only, ("slides.tsv", "sec_lonely", "reference_scan")),
    Case("split_leak", "sheet", _set(1, "patient", "pat_a"), ("pat_a",)),
]


# --------------------------------------------------------------------------- config faults
# make(config: dict, d: Path) -> dict (dumped as YAML) or str (written as is)
def _cfg(path: str, value):
    keys = path.split(".")

    def make(c, d):
        node = c
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        return c

    return make


def _unknown_key(c, d):
    c["segmentation"]["epoch"] = 5  # misspelled `epochs`
    return c


def _yaml_syntax(c, d):
    return yaml.safe_dump(c, sort_keys=False) + "seed: [0\n"


CONFIG_CASES = [
    Case("seed_negative", "config", _cfg("seed", -1), ("seed", "-1")),
    Case("seed_too_large", "config", _cfg("seed", 2**32), ("seed", str(2**32))),
    Case("seed_not_integer", "config", _cfg("seed", "zero"), ("seed", "zero")),
    Case("diameter_zero", "config", _cfg("segmentation.diameter", 0), ("diameter", "0")),
    Case("static_not_in_classes", "config", _cfg("static_classes", ["PMC", "Sertoli"]), ("static_classes", "Sertoli")),
    Case("reference_scan_unknown", "config", _cfg("reference_scan", "60x"), ("reference_scan", "60x")),
    Case("one_class", "config", _cfg("classes", ["PMC"]), ("classes", "PMC")),
    Case("duplicate_classes", "config", _cfg("classes", ["PMC", "SC", "SC", "P"]), ("classes", "non-unique")),
    Case(
        "crop_size_too_small",
        "config",
        _cfg("scans", {"40x": {"crop_size": 4}, "20x": {"crop_size": 40}}),
        ("crop_size", "4"),
    ),
    Case("method_unknown", "config", _cfg("segmentation.method", "stardist"), ("method", "stardist")),
    Case("metric_unknown", "config", _cfg("report.metric", "f1"), ("metric", "f1")),
    Case("init_unknown", "config", _cfg("finetune.grid.init", ["scratch", "byol"]), ("init", "byol")),
    Case("unknown_key", "config", _unknown_key, ("segmentation", "epoch")),
    Case("grading_threshold", "config", _cfg("grading.threshold", 1.5), ("threshold", "1.5")),
    Case("region_classes_empty", "config", _cfg("annotations.region_classes", []), ("region_classes",)),
    Case("pipeline_unknown", "config", _cfg("pipelines", ["testis", "lung"]), ("pipelines", "lung")),
    Case(
        "yaml_syntax",
        "config",
        _yaml_syntax,
        ("config.yaml", "not valid YAML", "while parsing a flow sequence at line"),
    ),
    Case(
        "sheet_not_found",
        "config",
        lambda c, d: _cfg("samples", str(d / "nowhere.tsv"))(c, d),
        ("samples", "nowhere.tsv", "not found"),
    ),
    Case(
        "backbone_unknown",
        "config",
        _cfg("finetune.grid.backbone", ["resnet_18"]),
        ("finetune.grid.backbone", "resnet_18", "is not a timm model", "did you mean 'resnet18'"),
    ),
    Case(
        "grading_backbone_unknown",
        "config",
        _cfg("grading.backbone", "resnet_18"),
        ("backbone", "resnet_18"),
    ),
]

CASES = SLIDE_CASES + ANNOTATION_CASES + SHEET_CASES + CONFIG_CASES


def _params(cases):
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.gap)] if c.gap else []) for c in cases
    ]


# --------------------------------------------------------------------------- running snakemake
def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def _base_config(sheet: Path, **over) -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["samples"] = str(sheet)
    config["annotators"] = {"sheet": None}
    for k, v in over.items():
        config[k] = {**config.get(k, {}), **v} if isinstance(v, dict) else v
    return config


def _write_sheet(sheet: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.to_csv(path, sep="\t", index=False)
    return path


def _run_batch(work: Path, sheet: pd.DataFrame, overrides: dict, targets: list[str]) -> subprocess.CompletedProcess:
    """Write the batch's sheet and config (config/config.yaml + ``overrides``) under ``work`` and
    run snakemake --keep-going on ``targets``."""
    _write_sheet(sheet, work / "config/slides.tsv")
    config = _base_config(work / "config/slides.tsv", **overrides)
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return _snakemake(work, "--keep-going", *targets)


def _row(slide, path, *, section=None, scan="40x", patient=None, split="train", mpp=MPP, **files) -> dict:
    row = {
        "slide": slide,
        "section": section or f"sec_{slide}",
        "scan": scan,
        "patient": patient or f"pat_{slide}",
        "split": split,
        "path": str(path),
        "mpp": "" if mpp in ("", None) else str(mpp),
    }
    return row | {c: files.get(c, "") for c in ("tubules", "points", "masks", "grades")}


def _partials(d: Path) -> list[str]:
    """Hidden temporaries (``.<name>.<owner>.tmp``) left anywhere under ``d``."""
    return sorted(str(p.relative_to(d)) for p in d.rglob(".*.tmp")) if d.exists() else []


def _has(text: str, words) -> list[str]:
    low = text.lower()
    return [w for w in words if w.lower() not in low]


# --------------------------------------------------------------------------- slide batch
@pytest.fixture(scope="module")
def slide_batch(tmp_path_factory):
    work = tmp_path_factory.mktemp("fault_slides")
    d = work / "slides"
    d.mkdir()
    tubules = good_tubules(work)  # reference scans need one; convert never reads it
    rows = []
    for i, (name, make) in enumerate([*GOOD_SLIDES.items(), *((c.name, c.make) for c in SLIDE_CASES)]):
        path, over = make(d)
        rows.append(_row(name, path, split="test" if i == 0 else "train", tubules=tubules) | over)
    sheet = pd.DataFrame(rows)
    if "backend" not in sheet:
        sheet["backend"] = ""
    sheet["backend"] = sheet["backend"].fillna("")
    return work, _run_batch(work, sheet, {}, [f"results/slides/{s}.ome.zarr" for s in sheet["slide"]])


@pytest.mark.slow
@pytest.mark.parametrize("case", _params(SLIDE_CASES))
def test_bad_slide(slide_batch, case):
    work, proc = slide_batch
    out = proc.stdout + proc.stderr
    # (1) the run fails, and snakemake names the failed job's slide
    assert proc.returncode != 0, out[-3000:]
    assert f"results/slides/{case.name}.ome.zarr" in out, out[-3000:]
    # (2) the job log names the file and the problem
    log = work / f"results/logs/convert/{case.name}.log"
    assert log.exists(), f"no log for {case.name}"
    text = log.read_text()
    assert not _has(text, case.expect), (case.name, _has(text, case.expect), text[-2000:])
    assert "CellstageError" in text, text[-2000:]
    # (3) no finished-looking store, no half-written one
    assert not (work / f"results/slides/{case.name}.ome.zarr").exists()
    left = [p for p in _partials(work / "results/slides") if case.name in p]
    assert not left, left
    # (4) the good slides of the same batch finished
    _good_slides_finished(work)


def _good_slides_finished(work: Path):
    from cellstage.io import ZarrSlide

    for name in ("good_a", "good_b"):
        with ZarrSlide(work / f"results/slides/{name}.ome.zarr") as s:
            assert s.dimensions == (900, 700) and s.mpp == pytest.approx(MPP)


@pytest.mark.slow
def test_twelve_bit_slide_is_rescaled_not_shifted(slide_batch):
    """12-bit samples in uint16 (issue 15: "shifted by 8 bits comes out nearly black") are converted
    with 4095 as white, beside the bad slides."""
    from cellstage.io import ZarrSlide

    work, _ = slide_batch
    with ZarrSlide(work / "results/slides/twelve_bit.ome.zarr") as s:
        r = s.read_region(0, 0, 256, 256)
    assert r[0, 0].tolist() == [255, 255, 255] and r[200, 0].tolist() == [128, 128, 128]


@pytest.mark.slow
def test_slide_batch_leaves_only_finished_stores(slide_batch):
    work, _ = slide_batch
    left = sorted(p.name for p in (work / "results/slides").iterdir())
    assert left == sorted(f"{n}.ome.zarr" for n in GOOD_SLIDES), left


@pytest.mark.slow
def test_rerun_after_failures_redoes_only_bad(slide_batch):
    work, _ = slide_batch
    names = [*GOOD_SLIDES, *(c.name for c in SLIDE_CASES)]
    proc = _snakemake(work, "-n", *[f"results/slides/{s}.ome.zarr" for s in names])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for c in SLIDE_CASES:
        assert f"output: results/slides/{c.name}.ome.zarr" in out, out[-3000:]
    for name in GOOD_SLIDES:
        assert f"output: results/slides/{name}.ome.zarr" not in out, out[-3000:]


# --------------------------------------------------------------------------- annotation batch
STAGE_OUTPUT = {
    "segment": "results/segmentation/{}.zarr",
    "cells": "results/cells/{}.parquet",
    "grader": "results/grader",
}
STAGE_LOG = {
    "segment": "results/logs/segment/{}.log",
    "cells": "results/logs/cells/{}.log",
    "grader": "results/logs/train_grader.log",
}


@pytest.fixture(scope="module")
def annotation_batch(tmp_path_factory):
    work = tmp_path_factory.mktemp("fault_annotations")
    d = work / "annotations"
    d.mkdir()
    slide = _pyramid(work / "slide.tiff", _tissue(SLIDE_H, SLIDE_W, seed=11))  # one file, a sheet row per case
    rows, targets = [], []
    for i, name in enumerate(GOOD_ANNOTATED):
        rows.append(
            _row(name, slide, split="test" if i == 0 else "train", tubules=good_tubules(d), points=good_points(d))
        )
        targets.append(STAGE_OUTPUT["cells"].format(name))
    for c in ANNOTATION_CASES:
        rows.append(_row(c.name, slide, **c.make(d, c.name)))
        targets.append(STAGE_OUTPUT[c.stage].format(c.name))
    overrides = {"segmentation": {"method": "classical"}, "grading": {"epochs": 1, "batch_size": 2}}
    return work, _run_batch(work, pd.DataFrame(rows), overrides, list(dict.fromkeys(targets)))


@pytest.mark.slow
@pytest.mark.parametrize("case", _params(ANNOTATION_CASES))
def test_bad_annotation(annotation_batch, case):
    work, proc = annotation_batch
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]  # the batch as a whole has failing jobs
    target = work / STAGE_OUTPUT[case.stage].format(case.name)
    log = work / STAGE_LOG[case.stage].format(case.name)
    assert log.exists(), (case.name, out[-3000:])
    text = log.read_text()
    # (2) the log names the file and the problem
    assert not _has(text, case.expect), (case.name, _has(text, case.expect), text[-2000:])
    if case.outcome == "fail":
        # (1) the job failed, (3) its output does not exist, nor anything downstream of it
        last = [ln for ln in text.splitlines() if ln and not ln.startswith(" ")][-1]  # the exception line
        assert case.expect[0] in last, (last, text[-2000:])
        assert STAGE_OUTPUT[case.stage].format(case.name) in out, out[-3000:]
        assert not target.exists(), target
        if case.stage == "segment":
            assert not (work / STAGE_OUTPUT["cells"].format(case.name)).exists()
        left = [p for p in _partials(work / "results") if case.name in p or case.stage == "grader" and "grader" in p]
        assert not left, left
    else:
        # (1) reported, not fatal: the stage finished and its log warns
        assert target.exists(), (case.name, text[-2000:])
        assert "WARNING" in text.upper(), text[-2000:]
        if case.name == "points_outside":  # the excluded points are listed in the points table
            pts = pd.read_csv(work / f"results/cells/{case.name}.points.csv")
            assert (pts["status"] == "outside").sum() == 2, pts
    # (4) the good slides of the batch finished their cell tables
    for name in GOOD_ANNOTATED:
        assert (work / STAGE_OUTPUT["cells"].format(name)).is_file(), (name, out[-3000:])


# --------------------------------------------------------------------------- start-up faults (sheet, config)
@pytest.fixture(scope="module")
def startup_runs(tmp_path_factory):
    """One real snakemake start per sheet/config case (targets: the two good slides' stores), two at a time."""
    base = tmp_path_factory.mktemp("fault_startup")
    d = base / "files"
    d.mkdir()
    tub = good_tubules(d)
    sheet = pd.DataFrame(
        [
            _row("good_a", _pyramid(d / "good_a.tiff", _tissue(seed=0)), section="sec_a", patient="pat_a", tubules=tub),
            _row(
                "good_b",
                _pyramid(d / "good_b.tiff", _tissue(seed=1)),
                section="sec_b",
                patient="pat_b",
                split="test",
                tubules=tub,
            ),
        ]
    )
    targets = ["results/slides/good_a.ome.zarr", "results/slides/good_b.ome.zarr"]

    def prepare(case: Case) -> Path:
        work = base / case.name
        sheet_path = work / "config/slides.tsv"
        s = case.make(sheet.copy(), d) if case.category == "sheet" else sheet
        _write_sheet(s, sheet_path)
        config = _base_config(sheet_path)
        if case.category == "config":
            config = case.make(config, d)
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        (work / "config/config.yaml").write_text(text)
        return work

    cases = SHEET_CASES + CONFIG_CASES
    works = [prepare(c) for c in cases]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda w: _snakemake(w, *targets), works))
    return {c.name: (w, p) for c, w, p in zip(cases, works, procs)}


@pytest.mark.slow
@pytest.mark.parametrize("case", _params(SHEET_CASES + CONFIG_CASES))
def test_bad_sheet_or_config(startup_runs, case):
    work, proc = startup_runs[case.name]
    out = proc.stdout + proc.stderr
    # (1) refused at start-up
    assert proc.returncode != 0, out[-3000:]
    # (2) the message names the culprit
    assert not _has(out, case.expect), (case.name, _has(out, case.expect), out[-3000:])
    # (3) + (4) nothing was run: no results/ at all
    assert not (work / "results").exists(), sorted(str(p) for p in (work / "results").rglob("*"))[:20]


def test_case_table_covers_the_issue():
    """≥ 30 bad inputs across the four categories, names unique."""
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 30
    assert {c.category for c in CASES} == {"slide", "annotation", "sheet", "config"}


# --------------------------------------------------------------------------- unit level (no snakemake)
@pytest.mark.parametrize("case", [c for c in SLIDE_CASES if c.name != "directory_path"], ids=lambda c: c.name)
def test_convert_names_file_and_problem(case, tmp_path):
    """The converter itself (what rule convert runs) on each bad slide file."""
    from cellstage.io import convert_to_omezarr
    from cellstage.utils import CellstageError

    path, over = case.make(tmp_path)
    out = tmp_path / f"{case.name}.ome.zarr"
    with pytest.raises(CellstageError) as ei:
        convert_to_omezarr(path, out, mpp=None, backend=over.get("backend") or None)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert not _has(msg, case.expect), (_has(msg, case.expect), msg)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")], list(tmp_path.iterdir())


@pytest.mark.parametrize("backend", ["openslide", "tiffslide", "tifffile"])
def test_zero_size_level_every_backend(tmp_path, backend):
    from cellstage.io import open_slide
    from cellstage.utils import CellstageError

    path, _ = _zero_level(tmp_path)
    with pytest.raises(CellstageError, match="zero size"):
        open_slide(path, backend=backend)
