"""Bad slides in a batch: each fails with a log naming the file and the problem, the others
finish under ``--keep-going``, and no failed slide leaves a ``.ome.zarr`` that looks complete.

Runs only the ``convert`` targets of the real Snakefile on a tiny sheet in a temporary
directory (same pattern as test_workflow.py), plus unit-level checks of ``open_slide`` on the
same files (including a zero-size pyramid level).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MPP = 0.5

GOOD = ["good_a", "good_b"]
# slide id -> (file name, mpp in the sheet, words the log must contain (case-insensitive))
BAD = {
    "truncated": ("truncated.tiff", MPP, ["truncated"]),
    "png_as_svs": ("photo.svs", MPP, ["png image", "unsupported format"]),
    "text_as_ndpi": ("notes.ndpi", MPP, ["text file", "unsupported format"]),
    "no_mpp": ("nores.tiff", None, ["no pixel size", "mpp"]),
    "bad_tile": ("badtile.tiff", MPP, ["corrupt"]),
    "zero_level": ("zerolevel.tiff", MPP, ["zero size"]),
}


def _tissue(h=700, w=900, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, np.uint8)
    img[80: h - 80, 60: w - 60] = rng.integers(70, 200, (h - 160, w - 120, 3), dtype=np.uint8)
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
            tw.write(lv, photometric="rgb", tile=(tile, tile), compression=compression,
                     subfiletype=0 if k == 0 else 1, metadata=None, software=False, **kw)
    return path


def make_bad_slides(d: Path) -> dict[str, Path]:
    """All test slides in ``d``; returns slide id -> path."""
    import cv2

    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, name in enumerate(GOOD):
        paths[name] = _pyramid(d / f"{name}.tiff", _tissue(seed=i))
    # truncated: the second half of a good pyramid is missing
    full = _pyramid(d / "full.tmp.tiff", _tissue(seed=7)).read_bytes()
    (d / "truncated.tiff").write_bytes(full[: len(full) // 2])
    (d / "full.tmp.tiff").unlink()
    paths["truncated"] = d / "truncated.tiff"
    # wrong extension: a PNG named .svs
    ok, png = cv2.imencode(".png", _tissue(200, 300))
    assert ok
    (d / "photo.svs").write_bytes(png.tobytes())
    paths["png_as_svs"] = d / "photo.svs"
    # unsupported format: a text file named .ndpi
    (d / "notes.ndpi").write_text("scanner export log\nslide 17: failed\n")
    paths["text_as_ndpi"] = d / "notes.ndpi"
    # a valid pyramid without any resolution tags (and no mpp in the sheet)
    paths["no_mpp"] = _pyramid(d / "nores.tiff", _tissue(seed=3), resolution=False)
    # an unreadable tile: the second-row first tile's JPEG data overwritten with noise
    p = _pyramid(d / "badtile.tiff", _tissue(seed=4))
    with tifffile.TiffFile(p) as tf:
        page = tf.pages[0]
        n_across = -(-page.imagewidth // page.tilewidth)
        k = n_across  # tile (row 1, col 0): not the tile open_slide probes
        off, cnt = int(page.dataoffsets[k]), int(page.databytecounts[k])
    data = bytearray(p.read_bytes())
    rng = np.random.default_rng(0)
    data[off + cnt // 4: off + cnt] = rng.integers(0, 256, cnt - cnt // 4, dtype=np.uint8).tobytes()
    p.write_bytes(bytes(data))
    paths["bad_tile"] = p
    # zero-size level: ImageWidth of pyramid level 1 patched to 0
    p = _pyramid(d / "zerolevel.tiff", _tissue(seed=5))
    with tifffile.TiffFile(p) as tf:
        tag = tf.pages[1].tags["ImageWidth"]
        off, fmt = tag.valueoffset, ("<H" if int(tag.dtype) == 3 else "<I")
    data = bytearray(p.read_bytes())
    struct.pack_into(fmt, data, off, 0)
    p.write_bytes(bytes(data))
    paths["zero_level"] = p
    return paths


# --------------------------------------------------------------------------- unit level
@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_slides")
    return d, make_bad_slides(d)


@pytest.mark.parametrize("slide", sorted(BAD))
def test_open_or_convert_names_file_and_problem(bad_dir, slide, tmp_path):
    from cellstage.io import convert_to_omezarr
    from cellstage.utils import CellstageError

    _, paths = bad_dir
    path = paths[slide]
    out = tmp_path / f"{slide}.ome.zarr"
    with pytest.raises(CellstageError) as ei:
        convert_to_omezarr(path, out, mpp=None)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for word in BAD[slide][2]:
        assert word.lower() in msg.lower(), (word, msg)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")], list(tmp_path.iterdir())


@pytest.mark.parametrize("backend", ["openslide", "tiffslide", "tifffile"])
def test_zero_size_level_every_backend(bad_dir, backend):
    from cellstage.io import open_slide
    from cellstage.utils import CellstageError

    _, paths = bad_dir
    with pytest.raises(CellstageError, match="zero size"):
        open_slide(paths["zero_level"], backend=backend)


def test_good_slides_open(bad_dir):
    from cellstage.io import open_slide

    _, paths = bad_dir
    for name in GOOD:
        with open_slide(paths[name]) as s:
            assert s.dimensions == (900, 700) and s.mpp == pytest.approx(MPP)


# --------------------------------------------------------------------------- workflow level
def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad_batch")
    paths = make_bad_slides(work / "slides")
    tubules = work / "tubules.geojson"  # reference scans need one; convert never reads it
    tubules.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"objectType": "annotation", "name": "t0",
                                          "classification": {"name": "Tubule"}},
        "geometry": {"type": "Polygon", "coordinates": [[[100, 100], [300, 100], [300, 300], [100, 100]]]}}]}))
    rows = ["slide\tsection\tscan\tpatient\tsplit\tpath\tmpp\ttubules\tpoints\tmasks\tgrades"]
    mpps = {name: MPP for name in GOOD} | {k: v[1] for k, v in BAD.items()}
    for i, (slide, path) in enumerate(paths.items()):
        mpp = "" if mpps[slide] is None else str(mpps[slide])
        split = "test" if i == 0 else "train"
        rows.append(f"{slide}\tsec_{slide}\t40x\tpat{i}\t{split}\t{path}\t{mpp}\t{tubules}\t\t\t")
    (work / "config").mkdir()
    (work / "config/slides.tsv").write_text("\n".join(rows) + "\n")
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["samples"] = str(work / "config/slides.tsv")
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    targets = [f"results/slides/{s}.ome.zarr" for s in paths]
    proc = _snakemake(work, "--keep-going", *targets)
    return work, proc


@pytest.mark.slow
def test_keep_going_converts_good_and_reports_bad(batch):
    work, proc = batch
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    for name in GOOD:
        z = work / f"results/slides/{name}.ome.zarr"
        assert (z / "zarr.json").exists(), out[-3000:]
        from cellstage.io import ZarrSlide

        with ZarrSlide(z) as s:
            assert s.dimensions == (900, 700) and s.mpp == pytest.approx(MPP)
    for slide, (fname, _, words) in BAD.items():
        log = work / f"results/logs/convert/{slide}.log"
        assert log.exists(), f"no log for {slide}"
        text = log.read_text()
        assert fname in text, (slide, text[-2000:])
        for word in words:
            assert word.lower() in text.lower(), (slide, word, text[-2000:])
        assert "CellstageError" in text, (slide, text[-2000:])
        assert not (work / f"results/slides/{slide}.ome.zarr").exists(), slide
    # nothing half-written anywhere under results/slides: only the two finished stores
    left = sorted(p.name for p in (work / "results/slides").iterdir())
    assert left == sorted(f"{n}.ome.zarr" for n in GOOD), left
    # and snakemake names every failed job
    for slide in BAD:
        assert slide in out


@pytest.mark.slow
def test_rerun_after_failures_redoes_only_bad(batch):
    work, _ = batch
    proc = _snakemake(work, "-n", *[f"results/slides/{s}.ome.zarr" for s in GOOD + list(BAD)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # the good stores are up to date; only the bad ones are scheduled again
    for slide in BAD:
        assert f"output: results/slides/{slide}.ome.zarr" in out, out[-3000:]
    for name in GOOD:
        assert f"output: results/slides/{name}.ome.zarr" not in out, out[-3000:]
