"""Write a synthetic demo data set (slides, annotations, masks, grades, truth, sample sheet).

Layout under ``out_dir`` (see docs/contracts.md, "Demo data")::

    slides/{section}_{40x,20x}.tiff        pyramidal tiled JPEG TIFF, px/cm resolution
    annotations/{section}_40x.tubules.geojson
    annotations/{section}_40x.points.geojson   (labelled = train/test sections only)
    masks/{section}_40x.nuclei.tiff        uint32 labels, tiled 256, deflate
    grades/{section}_40x.grades.csv        x,y,grade  (train sections only)
    truth/{section}.json                   homography, true labels, ...
    slides.tsv
    annotators/{annotator}_r{round}_{scan}.csv, annotators.tsv   simulated annotator study
                                           (seed 000 §4.1; see cellstage.demo.annotators)

Grades: 1-4 are real nuclei (1 crisp ... 4 overlapping/blurred/faint), 5 = damaged cell
(fragment debris, which *is* in the nucleus masks, like a segmenter would find it, but not in
the points), 6 = no cell (empty lumen/stroma position, no mask).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from cellstage.taxonomy import DEFAULT_CLASSES, DEFAULT_STATIC

from .annotators import write_annotator_study
from .render import MPP_20X, MPP_40X, random_homography, render_scan_20x, render_section

SCANS = ("40x", "20x")
COLUMNS = ("slide", "section", "scan", "patient", "split", "path", "mpp", "tubules", "points",
           "masks", "grades")


@dataclass(frozen=True)
class DemoPreset:
    size: int = 1536  # 40x section side (px); the 20x scan is size // 2
    n_tubules: tuple = (3, 4)  # inclusive range per section
    tubule_radius: tuple = (260.0, 360.0)  # major half-axis range (40x px)
    nuclei_density: float = 5.0e-4  # nuclei per px² of epithelium
    n_interstitial: int = 24
    n_debris: int = 30
    n_empty: int = 40
    n_graded: int = 150  # graded positions per train section
    artefact_fraction: tuple = (0.28, 0.36)  # share of grades 5-6 among graded
    label_noise: float = 0.1  # dynamic labels moved to an adjacent stage
    p_transitional: float = 0.3
    # (section, patient, split)
    sections: tuple = (
        ("sec01", "pat01", "train"), ("sec02", "pat01", "train"),
        ("sec03", "pat02", "train"), ("sec04", "pat02", "train"),
        ("sec05", "pat03", "test"),
        ("sec06", "pat04", "unlabelled"), ("sec07", "pat04", "unlabelled"),
    )
    classes: tuple = DEFAULT_CLASSES
    static: tuple = DEFAULT_STATIC
    jpeg_quality: int = 90
    # simulated annotator study (seed 000 §4.1: 8 test cells per dynamic class, 3 annotators,
    # Annotator 1 twice); (name, noise in steps of the 11-label scale, rounds)
    annotators: tuple = (("A1", 0.6, 2), ("A2", 0.45, 1), ("A3", 1.0, 1))
    annotator_cells_per_class: int = 8
    annotator_ambiguity: float = 0.4  # per-cell offset shared by all annotators (in-between cells)
    annotator_noise_20x: float = 1.5  # noise factor on the blurrier 20x scan


PRESETS = {
    "demo": DemoPreset(),
    "tiny": DemoPreset(
        size=768, n_tubules=(2, 3), tubule_radius=(150.0, 195.0), nuclei_density=7.0e-4,
        n_interstitial=8, n_debris=10, n_empty=14, n_graded=50,
        sections=(("sec01", "pat01", "train"), ("sec02", "pat02", "train"),
                  ("sec03", "pat03", "test"), ("sec04", "pat04", "unlabelled"))),
}


# --------------------------------------------------------------------------------------------
# writers
def write_pyramid_tiff(path, img: np.ndarray, mpp: float, quality: int = 90,
                       min_size: int = 256) -> None:
    """Pyramidal tiled RGB TIFF (levels x2) that OpenSlide reads as generic tiled TIFF."""
    levels = [img]
    while max(levels[-1].shape[:2]) > min_size or len(levels) < 2:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (max(w // 2, 1), max(h // 2, 1)),
                                 interpolation=cv2.INTER_AREA))
    with tifffile.TiffWriter(path) as tw:
        for i, lvl in enumerate(levels):
            res = 1e4 / (mpp * 2 ** i)  # px per cm
            tw.write(np.ascontiguousarray(lvl), photometric="rgb", tile=(256, 256),
                     compression="jpeg", compressionargs={"level": int(quality)},
                     resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if i == 0 else 1, metadata=None, software=False)


def write_labels_tiff(path, labels: np.ndarray) -> None:
    tifffile.imwrite(path, labels.astype(np.uint32), tile=(256, 256), compression="zlib",
                     metadata=None, software=False)


def _feature(geom, props):
    return {"type": "Feature", "geometry": geom, "properties": props}


def tubules_geojson(polys) -> dict:
    feats = []
    for k, poly in enumerate(polys):
        ring = [[round(float(x), 2), round(float(y), 2)] for x, y in poly]
        ring.append(ring[0])
        feats.append(_feature({"type": "Polygon", "coordinates": [ring]},
                              {"objectType": "annotation", "name": f"tubule_{k}",
                               "classification": {"name": "Tubule"}}))
    return {"type": "FeatureCollection", "features": feats}


def points_geojson(points) -> dict:
    feats = [_feature({"type": "Point", "coordinates": [round(float(x), 2), round(float(y), 2)]},
                      {"objectType": "annotation", "classification": {"name": c}})
             for x, y, c in points]
    return {"type": "FeatureCollection", "features": feats}


def _dump(path, obj) -> None:
    Path(path).write_text(json.dumps(obj, separators=(",", ":")) + "\n")


def _relpath(p: Path) -> str:
    p = Path(p).absolute()
    cwd = Path.cwd().absolute()
    try:
        return str(p.relative_to(cwd))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------------------------
def _noisy_labels(rng, classes, static, labels, fraction):
    dyn = [c for c in classes if c not in static]
    out = list(labels)
    for i, c in enumerate(labels):
        if c in dyn and rng.random() < fraction:
            j = dyn.index(c)
            nb = [dyn[k] for k in (j - 1, j + 1) if 0 <= k < len(dyn)]
            out[i] = nb[int(rng.integers(len(nb)))]
    return out


def _grades(rng, sec, n_graded, artefact_fraction):
    real = [n for n in sec.nuclei if n.cls != "debris" and n.area > 0]
    debris = [n for n in sec.nuclei if n.cls == "debris"]
    frac = rng.uniform(*artefact_fraction)
    n_art = int(round(n_graded * frac))
    n5 = min(len(debris), int(round(n_art * 0.55)))
    n6 = min(len(sec.empty_spots), n_art - n5)
    n_real = min(len(real), n_graded - n5 - n6)
    rows = []
    for i in np.sort(rng.choice(len(real), n_real, replace=False)) if n_real else []:
        n = real[i]
        q = 2.5 * n.overlap + 1.0 * n.blurred + 0.7 * n.faint + 0.3 * (n.cls == "fibroblast")
        g = 1 if q < 0.04 else 2 if q < 0.2 else 3 if q < 0.55 else 4
        if rng.random() < 0.2:  # the expert is not a threshold
            g = int(np.clip(g + rng.choice([-1, 1]), 1, 4))
        rows.append((n.x, n.y, g))
    for i in np.sort(rng.choice(len(debris), n5, replace=False)) if n5 else []:
        rows.append((debris[i].x, debris[i].y, 5))
    for i in np.sort(rng.choice(len(sec.empty_spots), n6, replace=False)) if n6 else []:
        x, y = sec.empty_spots[i]
        rows.append((x, y, 6))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def generate_section(cfg: DemoPreset, section: str, split: str, seed_seq, out: Path) -> dict:
    """Render and write one section (both scans); return its sample-sheet rows and stats."""
    rng = np.random.default_rng(seed_seq)
    n_tub = int(rng.integers(cfg.n_tubules[0], cfg.n_tubules[1] + 1))
    stain40 = (float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.88, 1.12)))
    sec = render_section(rng, cfg.size, n_tub, tubule_radius=cfg.tubule_radius,
                         nuclei_density=cfg.nuclei_density, n_interstitial=cfg.n_interstitial,
                         n_debris=cfg.n_debris, n_empty=cfg.n_empty,
                         p_transitional=cfg.p_transitional, classes=cfg.classes,
                         static=cfg.static, stain=stain40)
    size20 = cfg.size // 2
    Hm = random_homography(rng, cfg.size, size20)
    stain20 = (stain40[0] * float(rng.uniform(0.8, 0.95)),
               stain40[1] * float(rng.uniform(1.05, 1.25)))
    img20 = render_scan_20x(sec, Hm, size20, rng, stain=stain20,
                            gamma=float(rng.uniform(0.95, 1.12)))

    labelled = split in ("train", "test")
    graded = split == "train"
    s40, s20 = f"{section}_40x", f"{section}_20x"
    paths = {
        "slide40": out / "slides" / f"{s40}.tiff",
        "slide20": out / "slides" / f"{s20}.tiff",
        "tubules": out / "annotations" / f"{s40}.tubules.geojson",
        "points": out / "annotations" / f"{s40}.points.geojson",
        "masks": out / "masks" / f"{s40}.nuclei.tiff",
        "grades": out / "grades" / f"{s40}.grades.csv",
        "truth": out / "truth" / f"{section}.json",
    }
    write_pyramid_tiff(paths["slide40"], sec.image, MPP_40X, cfg.jpeg_quality)
    write_pyramid_tiff(paths["slide20"], img20, MPP_20X, cfg.jpeg_quality)
    write_labels_tiff(paths["masks"], sec.labels)
    _dump(paths["tubules"], tubules_geojson(sec.tubules))

    ann = [n for n in sec.nuclei if n.tubule >= 0 and n.cls in cfg.classes]
    ann.sort(key=lambda n: n.id)
    true_labels = [n.cls for n in ann]
    noisy = _noisy_labels(rng, cfg.classes, cfg.static, true_labels, cfg.label_noise)
    jit = rng.uniform(-2.0, 2.0, (len(ann), 2))
    pts = [(n.x + j[0], n.y + j[1], c) for n, j, c in zip(ann, jit, noisy)]
    if labelled:
        _dump(paths["points"], points_geojson(pts))
    if graded:
        rows = _grades(rng, sec, cfg.n_graded, cfg.artefact_fraction)
        with open(paths["grades"], "w") as f:
            f.write("x,y,grade\n")
            for x, y, g in rows:
                f.write(f"{x:.1f},{y:.1f},{g}\n")
    truth = {
        "homography_40x_to_20x": [[float(v) for v in r] for r in Hm],
        "true_labels": true_labels,
        "annotated_labels": noisy,
        "points": [[round(float(x), 2), round(float(y), 2)] for x, y, _ in pts],
        "cell_ids": [int(n.id) for n in ann],
        "seed": None,  # filled by generate()
        "section": section,
        "split": split,
        "size_40x": cfg.size,
        "size_20x": size20,
        "mpp_40x": MPP_40X,
        "mpp_20x": MPP_20X,
        "n_nuclei_in_mask": int(len([n for n in sec.nuclei if n.area > 0])),
        "interstitial": [[round(n.x, 2), round(n.y, 2), n.cls] for n in sec.nuclei
                         if n.cls in ("leydig", "fibroblast")],
        "debris": [[round(n.x, 2), round(n.y, 2), int(n.id)] for n in sec.nuclei
                   if n.cls == "debris"],
        "grades_note": "1-4 real nuclei; 5 damaged-cell debris (in masks, not in points); "
                       "6 no cell (not in masks)",
    }
    rows = []
    for scan, key, mpp in (("40x", "slide40", MPP_40X), ("20x", "slide20", MPP_20X)):
        ref = scan == "40x"
        rows.append({
            "slide": f"{section}_{scan}", "section": section, "scan": scan,
            "split": split, "path": paths[key], "mpp": mpp,
            "tubules": paths["tubules"] if ref else "",
            "points": paths["points"] if ref and labelled else "",
            "masks": paths["masks"] if ref else "",
            "grades": paths["grades"] if ref and graded else "",
        })
    return {"rows": rows, "truth": truth, "truth_path": paths["truth"], "true_labels": true_labels}


def generate(out_dir, preset="demo", seed: int = 0, *, progress: bool = False,
             **overrides) -> Path:
    """Generate the demo data set into ``out_dir``; return the path of ``slides.tsv``.

    ``preset``: "demo", "tiny", a :class:`DemoPreset`, or a mapping
    ``{"preset": name, "seed": n, **fields}`` (a config section); ``overrides`` replace preset
    fields (e.g. ``size=1024, label_noise=0.0``). Same seed -> byte-identical files.
    """
    if isinstance(preset, Mapping):  # a config section: {"preset": name, **field overrides}
        preset = dict(preset)
        overrides = {**{k: v for k, v in preset.items() if k not in ("preset", "seed")},
                     **overrides}
        seed = int(preset.get("seed", seed))
        preset = preset.get("preset", "demo")
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown {preset!r}; expected one of {sorted(PRESETS)}")
        cfg = PRESETS[preset]
    elif isinstance(preset, DemoPreset):
        cfg = preset
    else:
        raise TypeError(f"preset: expected a name or DemoPreset, got {type(preset).__name__}")
    if overrides:
        cfg = dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in overrides.items()})
    out = Path(out_dir)
    for d in ("slides", "annotations", "masks", "grades", "truth"):
        (out / d).mkdir(parents=True, exist_ok=True)
    children = np.random.SeedSequence(int(seed)).spawn(len(cfg.sections))
    it = list(zip(cfg.sections, children))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="demo sections", unit="section")
    lines = ["\t".join(COLUMNS)]
    truths = []
    for (section, patient, split), ss in it:
        res = generate_section(cfg, section, split, ss, out)
        truth = res["truth"]
        truth["seed"] = int(seed)
        truth["patient"] = patient
        _dump(res["truth_path"], truth)
        truths.append(truth)
        for r in res["rows"]:
            r["patient"] = patient
            vals = []
            for c in COLUMNS:
                v = r[c]
                if isinstance(v, Path):
                    v = _relpath(v)
                vals.append(f"{v:g}" if isinstance(v, float) else str(v))
            lines.append("\t".join(vals))
    tsv = out / "slides.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    write_annotator_study(out, cfg, seed, truths)
    return tsv
