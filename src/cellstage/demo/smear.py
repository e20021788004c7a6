"""Synthetic bone-marrow smear whole-slide images for the AML data-reduction paper (seed 003).

Seed 003 (§2.1, §3.1) works on May-Grünwald-Giemsa stained bone-marrow smears of AML patients
with three slide-level labels (ELN2017 genetic risk, NPM1, FLT3). This module writes a small,
deterministic stand-in with the challenges the paper names: "empty, blurry or too dense areas"
(§2.1 Level One), "damaged cells or staining artefacts" (§2.1.3), and a per-slide label that only
a minority of cells shows ("not all cell selections might show the respective phenotype", §2.2).

Layout under ``out_dir``::

    slides/{slide}.tiff        pyramidal tiled JPEG TIFF (same writer as the testis demo), mpp set
    grades/{slide}.grades.csv  x,y,grade (seed 003 Table 1 scale) for the first patients' slides
    truth/{slide}.json         cells (centre, kind, traits), regions/clusters (rectangles), labels
    slides.tsv                 slide section scan patient split path mpp grades labels

Slide geometry (seed 003 §2.1.1, Fig. 1): a slide is a ``grid`` x ``grid`` (8 x 8) grid of square
tiles of ``tile`` px. The outer tiles are "mostly blank or consist of out of focus regions"; the
innermost 24 tiles (columns x in {2..5}, rows y in {1..6}) carry the smear. Every inner tile is
cut into ``patch`` x ``patch`` blocks (the Level One patch size) and each block is one region:

* ``sparse``  well-spread single blasts + erythrocytes (+ some damaged cells / stain artefacts),
* ``dense``   a cluster of many overlapping cells ("cell clutter, medullary nodule", §2.1.1),
* ``blurry``  sparse cells, Gaussian-blurred (out of focus; the Laplace-variance filter's target),
* ``empty``   background only.

Cell kinds in the truth: ``blast`` (normal blast), ``blast_trait`` (a blast with the NPM1 and/or
FLT3 trait; see ``traits``), ``erythrocyte`` (pink disc with a pale centre, no nucleus),
``damaged`` (fragmented nucleus, ragged smear: low compactness), ``artefact`` (irregular stain
blob or stain precipitate).

Slide labels (seed 003 §3.1), shared by all slides of a patient, string
``eln2017=<favorable|intermediate|adverse>;npm1=<wt|mut>;flt3=<wt|mut>``:

* NPM1: "NPM1 mutations show subtle morphological anomalies (i.e. blasts with cup shaped
  nuclei)" (§3.1). In a mutated slide a fraction ``npm1_trait_mut`` (0.25) of the blasts has a
  cup-shaped (invaginated) nucleus; wild-type slides have ``npm1_trait_wt`` (0.02) by chance.
* FLT3: "cannot be recognised in the WSIs by a clinician" (§3.1): a weaker trait, a finer, more
  granular chromatin texture on ``flt3_trait_mut`` (0.20) of the blasts (``flt3_trait_wt`` 0.03).
* ELN2017 from the two mutations, after ELN2017's NPM1/FLT3-ITD rows: NPM1 mut & FLT3 wt ->
  favorable; NPM1 wt & FLT3 mut -> adverse; otherwise (both mut, both wt) -> intermediate.

Patients' labels are balanced: NPM1 mut for ``n_patients // 2`` patients, FLT3 mut for about
half, crossed so that all three ELN2017 classes occur (10 patients: 3 favorable, 4 intermediate,
3 adverse).

Grades (seed 003 §2.1.3, Table 1: 1 valid cell ... 5 damaged, 6 no cell): 1-4 for blasts (1
isolated and crisp ... 4 overlapping/inside a dense cluster), 5 for damaged cells and stain
artefacts, 6 for positions with no nucleated cell (empty background or an erythrocyte).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..utils import CellstageError, atomic_path
from .generate import _relpath, write_pyramid_tiff
from .render import _smooth_noise

SMEAR_COLUMNS = ("slide", "section", "scan", "patient", "split", "path", "mpp", "grades", "labels")
REGION_KINDS = ("sparse", "dense", "blurry", "empty")
CELL_KINDS = ("blast", "blast_trait", "erythrocyte", "damaged", "artefact")


def _od(rgb) -> np.ndarray:
    """Optical density (Beer-Lambert) of a stain that shows ``rgb`` on white at unit amount."""
    return (-np.log(np.asarray(rgb, np.float64) / 255.0)).astype(np.float32)


# May-Grünwald-Giemsa-like colours (RGB of each component alone on white glass)
OD_BACKGROUND = _od((241, 237, 243))
OD_NUCLEUS = _od((112, 52, 138))  # purple / red-violet chromatin
OD_CYTOPLASM = _od((186, 150, 222))  # paler lilac-violet cytoplasm
OD_ERYTHROCYTE = _od((236, 170, 168))  # pink-salmon, no nucleus
OD_ARTEFACT = _od((92, 58, 128))  # dark violet stain deposit

# NPM1 cup (draw_blast): radius of the invagination and distance of its centre from the nucleus
# centre, as fractions of the nuclear radius; share of the cytoplasm's stain cleared inside it
CUP_RADIUS = (0.5, 0.65)
CUP_DEPTH = (0.6, 0.75)
CUP_CLEAR = 0.7


@dataclass(frozen=True)
class SmearPreset:
    """Sizes and rates of one synthetic smear data set (see module docstring)."""

    slides_per_patient: tuple = (2,) * 10  # one entry per patient
    tile: int = 384  # tile side (px); slide side = grid * tile
    grid: int = 8  # grid x grid tiles (seed 003 §2.1.1: 8 x 8)
    inner_cols: tuple = (2, 3, 4, 5)  # kept tile columns (seed 003 Fig. 1: x in {2..5})
    inner_rows: tuple = (1, 2, 3, 4, 5, 6)  # kept tile rows (y in {1..6})
    patch: int = 192  # Level One patch side; regions are patch-sized blocks of the inner tiles
    crop: int = 80  # Level Two/Three crop side (seed 003: 80 x 80)
    mpp: float = 0.5  # µm/px: a 28-40 px blast is 14-20 µm
    region_weights: tuple = (0.5, 0.15, 0.15, 0.2)  # sparse, dense, blurry, empty
    blasts_per_sparse: tuple = (3, 6)  # inclusive, per patch-sized sparse block
    erythrocytes_per_sparse: tuple = (2, 5)
    damaged_per_sparse: float = 0.35  # Poisson mean
    artefacts_per_sparse: float = 0.25
    dense_coverage: tuple = (1.8, 2.6)  # cell area / cluster area in a dense block
    blast_diameter: tuple = (28.0, 40.0)  # px
    erythrocyte_diameter: tuple = (17.0, 23.0)
    blur_sigma: tuple = (2.5, 4.0)  # px, blurry regions and out-of-focus outer tiles
    p_outer_cells: float = 0.3  # share of outer tiles with a few (mostly blurred) cells
    p_outer_blurred: float = 0.7
    npm1_trait_mut: float = 0.25  # share of blasts with a cup-shaped nucleus, NPM1 mut slides
    npm1_trait_wt: float = 0.02  # ... and by chance in wild-type slides
    flt3_trait_mut: float = 0.20  # share of blasts with fine granular chromatin, FLT3 mut
    flt3_trait_wt: float = 0.03
    graded_patients: int = 2  # the first patients' slides get a grades CSV
    n_graded: int = 160  # graded positions per graded slide (fewer if not enough candidates)
    graded_shares: tuple = (0.4, 0.25, 0.35)  # blasts (1-4), damaged/artefact (5), no cell (6)
    jpeg_quality: int = 90


SMEAR_PRESETS = {
    "smear": SmearPreset(),
    "smear-tiny": SmearPreset(
        slides_per_patient=(2, 2, 1, 2, 1, 1), tile=192, patch=96,
        blasts_per_sparse=(2, 3), erythrocytes_per_sparse=(1, 2), damaged_per_sparse=0.25,
        artefacts_per_sparse=0.2, n_graded=60, p_outer_cells=0.3),
}


# --------------------------------------------------------------------------------------------
# labels
def patient_labels(n_patients: int, rng: np.random.Generator) -> list[dict]:
    """Balanced NPM1/FLT3 labels crossed so that every ELN2017 class occurs (module docstring)."""
    m = n_patients // 2  # NPM1 mutated
    npm1 = [True] * m + [False] * (n_patients - m)
    flt3 = [i < m // 2 for i in range(m)] + [i < n_patients - m - (n_patients - m) // 2
                                               for i in range(n_patients - m)]
    order = rng.permutation(n_patients)
    out = []
    for i in order:
        out.append({"eln2017": eln2017(npm1[i], flt3[i]), "npm1": "mut" if npm1[i] else "wt",
                    "flt3": "mut" if flt3[i] else "wt"})
    return out


def eln2017(npm1_mut: bool, flt3_mut: bool) -> str:
    """ELN2017 risk from NPM1/FLT3 (ELN2017 rows: NPM1 mut without FLT3-ITD = favorable, FLT3-ITD
    without NPM1 mutation = adverse, NPM1 mut with FLT3-ITD or neither = intermediate)."""
    if npm1_mut and not flt3_mut:
        return "favorable"
    if flt3_mut and not npm1_mut:
        return "adverse"
    return "intermediate"


def label_string(labels: Mapping) -> str:
    return f"eln2017={labels['eln2017']};npm1={labels['npm1']};flt3={labels['flt3']}"


def parse_labels(text: str) -> dict:
    """``"eln2017=adverse;npm1=wt;flt3=mut"`` -> ``{"eln2017": "adverse", ...}``."""
    out = {}
    for part in str(text).split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise CellstageError(f"labels: {part!r} in {text!r} is not task=value "
                                 "(expected e.g. eln2017=favorable;npm1=mut;flt3=wt)")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------------------------
# drawing into an optical-density canvas (objects add OD: overlaps darken, as in a smear)
def _window(od, cx, cy, R):
    h, w = od.shape[:2]
    x0, y0 = int(np.floor(cx - R)), int(np.floor(cy - R))
    x1, y1 = int(np.ceil(cx + R)) + 1, int(np.ceil(cy + R)) + 1
    x0c, y0c, x1c, y1c = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1c <= x0c or y1c <= y0c:
        return None
    yy, xx = np.mgrid[y0c:y1c, x0c:x1c].astype(np.float32)
    return (slice(y0c, y1c), slice(x0c, x1c)), xx - np.float32(cx), yy - np.float32(cy)


def _soft_ellipse(rng, dx, dy, rx, ry, theta, wobble=0.04):
    """Anti-aliased ellipse alpha with a slightly irregular outline."""
    c, s = np.cos(theta), np.sin(theta)
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    ang = np.arctan2(v, u)
    irr = np.ones_like(u)
    for k in (2, 3, 5):
        irr += np.float32(rng.normal(0, wobble)) * np.cos(k * ang + np.float32(rng.uniform(0, 6.283)))
    r = np.hypot(u, v) / irr
    return np.clip(0.5 + (1.0 - r) * min(rx, ry), 0.0, 1.0)


def draw_blast(rng, od, cx, cy, d, stain, *, cup=False, fine=False, faint=False):
    """Blast: pale cytoplasm, large purple nucleus with 1-2 pale nucleoli.

    ``cup``: cup-shaped nucleus (NPM1 trait, seed 003 §3.1): a round invagination of radius
    :data:`CUP_RADIUS` (50-65 % of the nuclear radius), centred :data:`CUP_DEPTH` (60-75 %) of
    the nuclear radius off the nucleus centre, cut deep into the nucleus, with a pale clear zone
    (:data:`CUP_CLEAR` of the cytoplasm's stain removed): visible at 40 px (an 80 px crop
    downscaled). ``fine``: fine granular chromatin (FLT3
    trait; grain 0.8 px and amplitude 0.22 instead of 1.5 px and 0.14)."""
    R = d / 2.0
    win = _window(od, cx, cy, R + 3)
    if win is None:
        return
    sl, dx, dy = win
    th = rng.uniform(0, np.pi)
    cyto = _soft_ellipse(rng, dx, dy, R, R * rng.uniform(0.86, 1.0), th, 0.03)
    rn = R * rng.uniform(0.62, 0.76)
    off = R - rn
    oa = rng.uniform(0, 2 * np.pi)
    ox, oy = np.cos(oa) * off * rng.uniform(0.1, 0.7), np.sin(oa) * off * rng.uniform(0.1, 0.7)
    nuc = _soft_ellipse(rng, dx - ox, dy - oy, rn, rn * rng.uniform(0.85, 1.0),
                        rng.uniform(0, np.pi), 0.04)
    if cup:
        ia = rng.uniform(0, 2 * np.pi)
        ri = rn * rng.uniform(*CUP_RADIUS)
        dist = rn * rng.uniform(*CUP_DEPTH)
        ix, iy = ox + np.cos(ia) * dist, oy + np.sin(ia) * dist
        inv = np.clip(0.5 + ri - np.hypot(dx - ix, dy - iy), 0.0, 1.0)
        nuc = nuc * (1.0 - inv)
        cyto = cyto * (1.0 - CUP_CLEAR * inv)  # the pale clear zone inside the cup
    grain, amp = (0.8, 0.22) if fine else (1.5, 0.14)
    tex = cv2.GaussianBlur(rng.standard_normal(dx.shape).astype(np.float32), (0, 0), grain)
    tex /= tex.std() + 1e-6
    chrom = 1.0 + amp * tex
    for _ in range(int(rng.integers(1, 3))):  # nucleoli: pale dots
        na, nr = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.45) * rn
        nx, ny = ox + np.cos(na) * nr, oy + np.sin(na) * nr
        chrom -= 0.35 * np.exp(-((dx - nx) ** 2 + (dy - ny) ** 2) / (2 * (0.14 * rn) ** 2))
    k = 0.7 if faint else 1.0
    comp = (cyto[..., None] * (OD_CYTOPLASM * stain["cyto"] * k)
            + (nuc * chrom)[..., None] * (OD_NUCLEUS * stain["nuc"] * k))
    od[sl] += comp


def draw_erythrocyte(rng, od, cx, cy, d, stain):
    """Erythrocyte: pink disc, paler centre (central pallor), no nucleus."""
    R = d / 2.0
    win = _window(od, cx, cy, R + 2)
    if win is None:
        return
    sl, dx, dy = win
    disc = _soft_ellipse(rng, dx, dy, R, R * rng.uniform(0.88, 1.0), rng.uniform(0, np.pi), 0.02)
    r2 = (dx ** 2 + dy ** 2) / (R * R)
    conc = disc * (1.0 - 0.45 * np.exp(-r2 / (2 * 0.3 ** 2)))
    od[sl] += conc[..., None] * (OD_ERYTHROCYTE * stain["ery"])


def draw_damaged(rng, od, cx, cy, d, stain):
    """Damaged cell: nucleus broken into 3-7 fragments, ragged streak of cytoplasm."""
    R = d / 2.0 * 1.3
    win = _window(od, cx, cy, R + 4)
    if win is None:
        return
    sl, dx, dy = win
    ang = rng.uniform(0, np.pi)
    cyto = _soft_ellipse(rng, dx, dy, R, R * rng.uniform(0.3, 0.55), ang, 0.15)
    rag = _smooth_noise(rng, dx.shape, 3.0, octaves=2)
    cyto = cyto * np.clip(0.6 + 0.6 * rag, 0, 1)
    frag = np.zeros(dx.shape, np.float32)
    for _ in range(int(rng.integers(3, 8))):
        fa, fr = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.75) * R
        fx, fy = np.cos(fa) * fr, np.sin(fa) * fr
        rf = rng.uniform(2.0, 5.5)
        frag = np.maximum(frag, _soft_ellipse(rng, dx - fx, dy - fy, rf, rf * rng.uniform(0.5, 1.0),
                                              rng.uniform(0, np.pi), 0.2))
    comp = (cyto[..., None] * (OD_CYTOPLASM * stain["cyto"] * 0.9)
            + (frag * rng.uniform(0.9, 1.2))[..., None] * (OD_NUCLEUS * stain["nuc"]))
    od[sl] += comp


def draw_artefact(rng, od, cx, cy, d, stain):
    """Staining artefact: an irregular stain blob or a patch of stain precipitate dots."""
    R = d / 2.0
    win = _window(od, cx, cy, R + 3)
    if win is None:
        return
    sl, dx, dy = win
    r = np.hypot(dx, dy) / R
    if rng.random() < 0.6:  # irregular blob: thresholded smooth noise inside a disc envelope
        n = _smooth_noise(rng, dx.shape, max(R / 2.5, 2.0), octaves=2)
        blob = np.clip(1.5 * (n + 1.2 - 1.6 * r), 0, 1)
        conc = blob * rng.uniform(0.7, 1.3)
    else:  # precipitate: many tiny dark dots
        conc = np.zeros(dx.shape, np.float32)
        for _ in range(int(rng.integers(12, 30))):
            a, rr = rng.uniform(0, 2 * np.pi), R * np.sqrt(rng.uniform(0, 1))
            px, py = np.cos(a) * rr, np.sin(a) * rr
            conc = np.maximum(conc, np.clip(0.5 + rng.uniform(1.0, 2.2)
                                            - np.hypot(dx - px, dy - py), 0, 1))
        conc *= rng.uniform(1.0, 1.5)
    od[sl] += conc[..., None] * (OD_ARTEFACT * stain["nuc"])


# --------------------------------------------------------------------------------------------
# scene
def _place(rng, rect, radii, placed, min_gap, margin, tries=60):
    """Rejection-sample a centre in ``rect`` keeping ``min_gap(r, r2)`` to every placed circle."""
    x0, y0, x1, y1 = rect
    for r in radii:
        m = r + margin
        if x1 - x0 <= 2 * m or y1 - y0 <= 2 * m:
            continue
        for _ in range(tries):
            x, y = rng.uniform(x0 + m, x1 - m), rng.uniform(y0 + m, y1 - m)
            if all(np.hypot(x - px, y - py) >= min_gap(r, pr, pk) for px, py, pr, pk in placed):
                yield x, y, r
                break


def _slide_scene(rng, cfg: SmearPreset, labels: dict) -> dict:
    """Lay out regions and cells of one slide (no pixels yet)."""
    size = cfg.grid * cfg.tile
    npm1_p = cfg.npm1_trait_mut if labels["npm1"] == "mut" else cfg.npm1_trait_wt
    flt3_p = cfg.flt3_trait_mut if labels["flt3"] == "mut" else cfg.flt3_trait_wt
    regions, cells = [], []
    blur_rects = []

    def blast(x, y, d, region, **kw):
        cup, fine = bool(rng.random() < npm1_p), bool(rng.random() < flt3_p)
        traits = [t for t, on in (("npm1", cup), ("flt3", fine)) if on]
        cells.append({"x": x, "y": y, "d": d, "kind": "blast_trait" if traits else "blast",
                      "traits": traits, "region": region, **kw})

    def sparse(rect, region, n_bl, n_ery, n_dmg, n_art):
        placed = []
        dias = list(rng.uniform(*cfg.blast_diameter, n_bl))
        for x, y, r in _place(rng, rect, [d / 2 for d in dias], placed,
                              lambda r, pr, pk: r + pr + (4.0 if pk != "ery" else -0.25 * (r + pr)),
                              margin=2.0):
            placed.append((x, y, r, "blast"))
            blast(x, y, 2 * r, region, faint=bool(rng.random() < 0.1))
        for kind, n, dia in (("damaged", n_dmg, cfg.blast_diameter),
                             ("artefact", n_art, (0.6 * cfg.blast_diameter[0], cfg.blast_diameter[1]))):
            rr = [rng.uniform(*dia) / 2 * (1.3 if kind == "damaged" else 1.0) for _ in range(n)]
            for x, y, r in _place(rng, rect, rr, placed, lambda r, pr, pk: r + pr + 4.0, margin=2.0):
                placed.append((x, y, r, kind))
                cells.append({"x": x, "y": y, "d": 2 * r, "kind": kind, "traits": [], "region": region})
        er = [rng.uniform(*cfg.erythrocyte_diameter) / 2 for _ in range(n_ery)]
        for x, y, r in _place(rng, rect, er, placed,
                              lambda r, pr, pk: (0.75 if pk == "blast" else 1.0) * (r + pr) + 1.0,
                              margin=1.0):
            placed.append((x, y, r, "ery"))
            cells.append({"x": x, "y": y, "d": 2 * r, "kind": "erythrocyte", "traits": [],
                          "region": region})

    inner = {(c, r) for c in cfg.inner_cols for r in cfg.inner_rows}
    per = max(cfg.tile // cfg.patch, 1)
    w = np.asarray(cfg.region_weights, float)
    for ty in range(cfg.grid):
        for tx in range(cfg.grid):
            X0, Y0 = tx * cfg.tile, ty * cfg.tile
            if (tx, ty) not in inner:
                if rng.random() < cfg.p_outer_cells:
                    rect = (X0, Y0, X0 + cfg.tile, Y0 + cfg.tile)
                    blurred = bool(rng.random() < cfg.p_outer_blurred)
                    ri = len(regions)
                    regions.append({"kind": "blurry" if blurred else "sparse", "rect": list(rect),
                                    "tile": [tx, ty], "inner": False})
                    sparse(rect, ri, int(rng.integers(1, 4)), int(rng.integers(1, 4)), 0, 0)
                    if blurred:
                        blur_rects.append((rect, float(rng.uniform(*cfg.blur_sigma))))
                continue
            for by in range(per):
                for bx in range(per):
                    rect = (X0 + bx * cfg.patch, Y0 + by * cfg.patch,
                            X0 + (bx + 1) * cfg.patch, Y0 + (by + 1) * cfg.patch)
                    kind = REGION_KINDS[int(rng.choice(len(w), p=w / w.sum()))]
                    ri = len(regions)
                    regions.append({"kind": kind, "rect": list(rect), "tile": [tx, ty], "inner": True})
                    if kind in ("sparse", "blurry"):
                        sparse(rect, ri, int(rng.integers(cfg.blasts_per_sparse[0], cfg.blasts_per_sparse[1] + 1)),
                               int(rng.integers(cfg.erythrocytes_per_sparse[0],
                                                cfg.erythrocytes_per_sparse[1] + 1)),
                               int(rng.poisson(cfg.damaged_per_sparse)) if kind == "sparse" else 0,
                               int(rng.poisson(cfg.artefacts_per_sparse)) if kind == "sparse" else 0)
                        if kind == "blurry":
                            blur_rects.append((rect, float(rng.uniform(*cfg.blur_sigma))))
                    elif kind == "dense":
                        x0, y0, x1, y1 = rect
                        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                        ax, ay = (x1 - x0) * rng.uniform(0.36, 0.46), (y1 - y0) * rng.uniform(0.36, 0.46)
                        mean_area = np.pi * (np.mean(cfg.blast_diameter) / 2) ** 2
                        n = int(round(rng.uniform(*cfg.dense_coverage) * np.pi * ax * ay / mean_area))
                        for _ in range(max(n, 4)):
                            t, s = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
                            x, y = cx + ax * s * np.cos(t), cy + ay * s * np.sin(t)
                            is_blast = rng.random() < 0.7
                            d = float(rng.uniform(*(cfg.blast_diameter if is_blast else cfg.erythrocyte_diameter)))
                            # the cluster stays inside its block (regions do not bleed into each other)
                            x = float(np.clip(x, x0 + d / 2 + 1, x1 - d / 2 - 1))
                            y = float(np.clip(y, y0 + d / 2 + 1, y1 - d / 2 - 1))
                            if is_blast:
                                blast(x, y, d, ri, dense=True)
                            else:
                                cells.append({"x": x, "y": y, "d": d, "kind": "erythrocyte", "traits": [],
                                              "region": ri})
    for c in cells:
        c.setdefault("faint", False)
        c.setdefault("dense", False)
    return {"size": size, "regions": regions, "cells": cells, "blur_rects": blur_rects}


def _render(rng, cfg: SmearPreset, scene: dict) -> np.ndarray:
    """Pixels of a scene: background with slow illumination drift and darker corners, the cells
    in optical density, Gaussian blur on blurry regions, sensor noise."""
    size = scene["size"]
    stain = {"nuc": float(rng.uniform(0.88, 1.12)), "cyto": float(rng.uniform(0.85, 1.15)),
             "ery": float(rng.uniform(0.85, 1.15))}
    lo = max(size // 32, 8)
    drift = _smooth_noise(rng, (lo, lo), lo / 3, octaves=2)
    yy, xx = np.mgrid[0:lo, 0:lo].astype(np.float32) / (lo - 1)
    corner = np.float32(rng.uniform(0.5, 1.2)) * (np.hypot(xx - 0.5, yy - 0.5) / 0.7071) ** 4
    bgf = cv2.resize(1.0 + 0.25 * drift + corner, (size, size), interpolation=cv2.INTER_LINEAR)
    od = bgf[..., None] * OD_BACKGROUND[None, None, :]
    draw = {"erythrocyte": draw_erythrocyte, "damaged": draw_damaged, "artefact": draw_artefact}
    for c in scene["cells"]:
        if c["kind"] in ("blast", "blast_trait"):
            draw_blast(rng, od, c["x"], c["y"], c["d"], stain, cup="npm1" in c["traits"],
                       fine="flt3" in c["traits"], faint=c["faint"])
        else:
            draw[c["kind"]](rng, od, c["x"], c["y"], c["d"], stain)
    for (x0, y0, x1, y1), sigma in scene["blur_rects"]:
        od[y0:y1, x0:x1] = cv2.GaussianBlur(od[y0:y1, x0:x1], (0, 0), sigma,
                                            borderType=cv2.BORDER_REFLECT)
    img = np.exp(-od)
    img *= np.float32(255.0)
    img += rng.standard_normal((size, size), dtype=np.float32)[..., None] * np.float32(1.5)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# grades
def _grades(rng, cfg: SmearPreset, scene: dict) -> list[tuple[float, float, int]]:
    """Graded positions (seed 003 Table 1 scale) from the truth of one slide."""
    regions = scene["regions"]
    cells = scene["cells"]
    kept = [i for i, r in enumerate(regions) if r["inner"] and r["kind"] in ("sparse", "dense")]
    kept_set = set(kept)
    blasts = [c for c in cells if c["kind"] in ("blast", "blast_trait") and c["region"] in kept_set]
    bad = [c for c in cells if c["kind"] in ("damaged", "artefact") and c["region"] in kept_set]
    ery = [c for c in cells if c["kind"] == "erythrocyte" and c["region"] in kept_set
           and regions[c["region"]]["kind"] != "dense"]
    pts = np.array([[c["x"], c["y"]] for c in cells]) if cells else np.zeros((0, 2))
    rad = np.array([c["d"] / 2 for c in cells]) if cells else np.zeros(0)

    index = {id(c): i for i, c in enumerate(cells)}

    def blast_grade(c):
        if c["dense"]:
            g = 4
        else:
            dist = np.hypot(pts[:, 0] - c["x"], pts[:, 1] - c["y"]) - rad - c["d"] / 2
            dist[index[id(c)]] = np.inf  # not itself
            gap = float(dist.min())
            q = 0.5 * c["faint"] + (0.6 if gap < 0 else 0.3 if gap < 6 else 0.0)
            g = 1 if q < 0.1 else 2 if q < 0.35 else 3 if q < 0.7 else 4
        if rng.random() < 0.15:  # the expert is not a threshold
            g = int(np.clip(g + rng.choice([-1, 1]), 1, 4))
        return g

    n_bl, n_bad, _ = (int(round(cfg.n_graded * s)) for s in cfg.graded_shares)
    n_bl, n_bad = min(n_bl, len(blasts)), min(n_bad, len(bad))
    # graded crops come from Level Two, i.e. mostly from sparse patches: at most a fifth of the
    # graded blasts sit in dense clusters (grade 4)
    sparse_bl = [c for c in blasts if not c["dense"]]
    dense_bl = [c for c in blasts if c["dense"]]
    n_dense = min(len(dense_bl), n_bl // 5)
    n_sparse = min(len(sparse_bl), n_bl - n_dense)
    rows = [(c["x"], c["y"], blast_grade(c)) for pool, n in ((sparse_bl, n_sparse), (dense_bl, n_dense))
            for c in (pool[i] for i in np.sort(rng.choice(len(pool), n, replace=False)))]
    n_none = cfg.n_graded - len(rows) - n_bad
    rows += [(c["x"], c["y"], 5) for c in
             (bad[i] for i in np.sort(rng.choice(len(bad), n_bad, replace=False)))]
    # no cell: erythrocytes (a third) and background points far from every object
    n_ery = min(len(ery), n_none // 3)
    rows += [(c["x"], c["y"], 6) for c in (ery[i] for i in np.sort(rng.choice(len(ery), n_ery, replace=False)))]
    bg_regions = [regions[i]["rect"] for i in kept if regions[i]["kind"] == "sparse"]
    bg_regions += [r["rect"] for r in regions if r["inner"] and r["kind"] == "empty"]
    need, tries = n_none - n_ery, 0
    while need > 0 and bg_regions and tries < 50 * cfg.n_graded:
        tries += 1
        x0, y0, x1, y1 = bg_regions[int(rng.integers(len(bg_regions)))]
        x, y = rng.uniform(x0 + 4, x1 - 4), rng.uniform(y0 + 4, y1 - 4)
        if len(pts) and (np.hypot(pts[:, 0] - x, pts[:, 1] - y) - rad).min() < cfg.crop / 4:
            continue
        rows.append((x, y, 6))
        need -= 1
    return [rows[i] for i in rng.permutation(len(rows))]


# --------------------------------------------------------------------------------------------
def _resolve(preset, overrides) -> SmearPreset:
    if isinstance(preset, str):
        if preset not in SMEAR_PRESETS:
            raise CellstageError(f"preset: unknown smear preset {preset!r}; expected one of "
                                 f"{sorted(SMEAR_PRESETS)}")
        cfg = SMEAR_PRESETS[preset]
    elif isinstance(preset, SmearPreset):
        cfg = preset
    else:
        raise CellstageError(f"preset: expected a smear preset name or SmearPreset, got "
                             f"{type(preset).__name__}")
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(SmearPreset)}
        if unknown:
            raise CellstageError(f"smear preset: unknown field(s) {sorted(unknown)}")
        cfg = dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in overrides.items()})
    if cfg.tile % cfg.patch:
        raise CellstageError(f"smear preset: tile ({cfg.tile}) must be a multiple of patch ({cfg.patch})")
    return cfg


def _round_cell(c: dict) -> dict:
    out = {"x": round(float(c["x"]), 2), "y": round(float(c["y"]), 2), "d": round(float(c["d"]), 2),
           "kind": c["kind"], "traits": list(c["traits"]), "region": int(c["region"])}
    if c.get("faint"):
        out["faint"] = True
    return out


def generate_smear(out_dir, preset: str = "smear", seed: int = 0, progress: bool = False,
                   **overrides) -> Path:
    """Write the synthetic AML smear data set into ``out_dir``; return the path of ``slides.tsv``.

    ``preset``: a name in :data:`SMEAR_PRESETS` or a :class:`SmearPreset`; ``overrides`` replace
    preset fields. Same seed -> byte-identical files.
    """
    cfg = _resolve(preset, overrides)
    out = Path(out_dir)
    for d in ("slides", "grades", "truth"):
        (out / d).mkdir(parents=True, exist_ok=True)
    n_pat = len(cfg.slides_per_patient)
    ss_labels, *ss_slides = np.random.SeedSequence(int(seed)).spawn(1 + sum(cfg.slides_per_patient))
    pat_labels = patient_labels(n_pat, np.random.default_rng(ss_labels))
    jobs = []
    for p, n in enumerate(cfg.slides_per_patient):
        for k in range(n):
            jobs.append((f"aml{p + 1:02d}", f"aml{p + 1:02d}_s{k + 1}", p))
    it = list(zip(jobs, ss_slides))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="smear slides", unit="slide")
    lines = ["\t".join(SMEAR_COLUMNS)]
    size = cfg.grid * cfg.tile
    for (patient, slide, p), ss in it:
        rng = np.random.default_rng(ss)
        labels = pat_labels[p]
        scene = _slide_scene(rng, cfg, labels)
        img = _render(rng, cfg, scene)
        slide_path = out / "slides" / f"{slide}.tiff"
        with atomic_path(slide_path) as tmp:
            write_pyramid_tiff(tmp, img, cfg.mpp, cfg.jpeg_quality)
        grades_path = ""
        if p < cfg.graded_patients:
            rows = _grades(rng, cfg, scene)
            grades_path = out / "grades" / f"{slide}.grades.csv"
            with atomic_path(grades_path) as tmp:
                tmp.write_text("x,y,grade\n" + "".join(f"{x:.1f},{y:.1f},{g}\n" for x, y, g in rows))
        counts = {k: 0 for k in CELL_KINDS}
        for c in scene["cells"]:
            counts[c["kind"]] += 1
        inner_blasts = [c for c in scene["cells"] if c["kind"] in ("blast", "blast_trait")
                        and scene["regions"][c["region"]]["inner"]]
        truth = {
            "slide": slide, "patient": patient, "seed": int(seed), "labels": labels,
            "label_string": label_string(labels), "size": size, "tile": cfg.tile, "grid": cfg.grid,
            "inner_cols": list(cfg.inner_cols), "inner_rows": list(cfg.inner_rows),
            "patch": cfg.patch, "crop": cfg.crop, "mpp": cfg.mpp,
            "trait_rates": {
                "npm1": cfg.npm1_trait_mut if labels["npm1"] == "mut" else cfg.npm1_trait_wt,
                "flt3": cfg.flt3_trait_mut if labels["flt3"] == "mut" else cfg.flt3_trait_wt},
            "counts": counts,
            "inner_blasts": len(inner_blasts),
            "regions": scene["regions"],
            "clusters": [r["rect"] for r in scene["regions"] if r["kind"] == "dense"],
            "blurred": [[*rect, round(s, 3)] for rect, s in scene["blur_rects"]],
            "cells": [_round_cell(c) for c in scene["cells"]],
            "grades_note": "1-4 blasts (4 = overlapping / in a dense cluster); 5 damaged cell or "
                           "stain artefact; 6 no nucleated cell (background or erythrocyte)",
        }
        with atomic_path(out / "truth" / f"{slide}.json") as tmp:  # compact: ~1000 cells per slide
            tmp.write_text(json.dumps(truth, separators=(",", ":")) + "\n")
        vals = [slide, slide, "40x", patient, "train", _relpath(slide_path), f"{cfg.mpp:g}",
                _relpath(grades_path) if grades_path else "", label_string(labels)]
        lines.append("\t".join(vals))
    tsv = out / "slides.tsv"
    with atomic_path(tsv) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return tsv
