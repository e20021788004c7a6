"""Synthetic PAS-stained testis sections (scene model + rendering).

The scene is kept as two stain-concentration maps (haematoxylin ``H`` and PAS magenta ``M``)
plus a tissue map at 40x level-0 resolution (0.17 µm/px). The 40x image is the Beer-Lambert
composite of those maps; the 20x scan is rendered from the *same* maps warped through a known
homography, defocused and with a different stain intensity (:func:`render_scan_20x`).

Low-level API (used by tests of other modules)::

    sec = render_section(rng_or_seed, size=1536, n_tubules=3)
    sec.image    # (size, size, 3) uint8 RGB, 40x level 0
    sec.labels   # (size, size) uint32 nucleus labels (0 = background), later-drawn wins
    sec.tubules  # list of (N, 2) float arrays, outer wall polygons (x, y), N <= 200
    sec.points   # list of (x, y, class_name) for every nucleus inside a tubule (true class)

Everything random comes from one ``numpy.random.Generator`` so a seed fixes the scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from cellstage.taxonomy import DEFAULT_CLASSES, DEFAULT_STATIC

MPP_40X = 0.17
MPP_20X = 0.34

# Optical densities (per unit concentration) of the two stains, RGB order.
OD_BASE = -np.log(np.array([235.0, 220.0, 225.0]) / 255.0)  # glass / empty lumen, light pink
OD_H = np.array([0.86, 1.00, 0.40])  # haematoxylin: blue-purple
OD_M = np.array([0.18, 0.76, 0.34])  # PAS: magenta

# Per-class nucleus appearance: (mean, sd). a = major half-axis (px at 40x), ratio = b/a,
# dens = haematoxylin concentration, tex = chromatin texture amplitude, tsig = texture grain
# (px), rim = chromatin at the nuclear envelope, nucl = nucleolus dot, vac = pale vacuole,
# speck = coarse chromatin speckles, thread = thread-like chromatin, depth = position from the
# wall (0) to the lumen edge (1) as a fraction of the epithelium thickness.
_P = {
    "PMC": dict(a=(20.0, 2.5), ratio=(0.30, 0.05), dens=(1.10, 0.14), tex=(0.10, 0.03),
                tsig=(1.5, 0.2), rim=(0.0, 0.0), nucl=(0.0, 0.0), vac=(0.0, 0.0),
                speck=(0.0, 0.0), thread=(0.0, 0.0), depth=(0.0, 0.0)),
    "SC": dict(a=(15.5, 1.8), ratio=(0.66, 0.09), dens=(0.52, 0.09), tex=(0.10, 0.03),
               tsig=(1.0, 0.2), rim=(0.25, 0.08), nucl=(0.85, 0.25), vac=(0.0, 0.0),
               speck=(0.05, 0.05), thread=(0.0, 0.0), depth=(0.12, 0.07)),
    "Spg Ad": dict(a=(12.8, 1.2), ratio=(0.82, 0.07), dens=(1.15, 0.13), tex=(0.07, 0.03),
                   tsig=(1.0, 0.2), rim=(0.10, 0.05), nucl=(0.0, 0.0), vac=(0.85, 0.25),
                   speck=(0.05, 0.05), thread=(0.0, 0.0), depth=(0.05, 0.04)),
    "Spg": dict(a=(12.8, 1.3), ratio=(0.87, 0.06), dens=(0.80, 0.12), tex=(0.18, 0.05),
                tsig=(1.2, 0.2), rim=(0.35, 0.10), nucl=(0.15, 0.15), vac=(0.15, 0.15),
                speck=(0.30, 0.15), thread=(0.05, 0.05), depth=(0.08, 0.05)),
    "Pl-Z": dict(a=(13.8, 1.4), ratio=(0.89, 0.05), dens=(0.88, 0.12), tex=(0.25, 0.06),
                 tsig=(1.5, 0.2), rim=(0.20, 0.08), nucl=(0.0, 0.0), vac=(0.0, 0.0),
                 speck=(0.90, 0.25), thread=(0.35, 0.15), depth=(0.28, 0.09)),
    "P": dict(a=(18.5, 2.0), ratio=(0.90, 0.05), dens=(0.80, 0.12), tex=(0.20, 0.05),
              tsig=(1.5, 0.2), rim=(0.15, 0.06), nucl=(0.0, 0.0), vac=(0.0, 0.0),
              speck=(0.45, 0.20), thread=(1.0, 0.25), depth=(0.48, 0.12)),
    "rsptd": dict(a=(10.6, 0.9), ratio=(0.92, 0.05), dens=(0.55, 0.09), tex=(0.08, 0.03),
                  tsig=(1.0, 0.2), rim=(0.20, 0.08), nucl=(0.45, 0.25), vac=(0.0, 0.0),
                  speck=(0.05, 0.05), thread=(0.0, 0.0), depth=(0.72, 0.10)),
    "esptd": dict(a=(12.0, 1.2), ratio=(0.42, 0.06), dens=(1.30, 0.13), tex=(0.05, 0.02),
                  tsig=(1.0, 0.2), rim=(0.0, 0.0), nucl=(0.0, 0.0), vac=(0.0, 0.0),
                  speck=(0.0, 0.0), thread=(0.0, 0.0), depth=(0.88, 0.10)),
}
_INTERSTITIAL = {
    "leydig": dict(a=(10.5, 1.0), ratio=(0.85, 0.07), dens=(0.70, 0.10), tex=(0.10, 0.03),
                   tsig=(1.0, 0.2), rim=(0.20, 0.08), nucl=(0.50, 0.20), vac=(0.0, 0.0),
                   speck=(0.10, 0.05), thread=(0.0, 0.0), depth=(0.0, 0.0)),
    "fibroblast": dict(a=(16.0, 2.0), ratio=(0.30, 0.05), dens=(1.05, 0.12), tex=(0.08, 0.03),
                       tsig=(1.2, 0.2), rim=(0.0, 0.0), nucl=(0.0, 0.0), vac=(0.0, 0.0),
                       speck=(0.0, 0.0), thread=(0.0, 0.0), depth=(0.0, 0.0)),
}
# Relative frequencies (seed 000, Table 1, train/val).
_FREQ = {"PMC": 355, "SC": 616, "Spg Ad": 231, "Spg": 459, "Pl-Z": 826, "P": 1097,
         "rsptd": 665, "esptd": 951}
_ORIENT = {"PMC": "tangential", "SC": "radial", "esptd": "radial", "fibroblast": "random"}


@dataclass
class Nucleus:
    id: int
    x: float
    y: float
    cls: str  # true class, or "leydig"/"fibroblast" (interstitial), or "debris"
    tubule: int  # index of the tubule, -1 outside
    a: float = 0.0
    b: float = 0.0
    area: int = 0
    overlap: float = 0.0  # fraction of its area shared with other nuclei
    blurred: bool = False
    faint: bool = False


@dataclass
class Section:
    """A rendered 40x section (see module docstring)."""

    image: np.ndarray
    labels: np.ndarray
    tubules: list
    points: list
    nuclei: list = field(default_factory=list)  # all Nucleus objects (incl. interstitial, debris)
    empty_spots: list = field(default_factory=list)  # (x, y) with no cell (grade 6 candidates)
    H: np.ndarray | None = None  # haematoxylin concentration map
    M: np.ndarray | None = None  # PAS concentration map
    tissue: np.ndarray | None = None  # tissue map in [0, 1]


# --------------------------------------------------------------------------------------------
# helpers
def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _smooth_noise(rng, shape, scale, octaves=3):
    """Zero-mean, unit-std value noise with features of about ``scale`` px."""
    h, w = shape
    out = np.zeros(shape, np.float32)
    amp, total = 1.0, 0.0
    for k in range(octaves):
        s = max(scale / (2 ** k), 2.0)
        gh, gw = int(np.ceil(h / s)) + 3, int(np.ceil(w / s)) + 3
        g = rng.standard_normal((gh, gw)).astype(np.float32)
        up = cv2.resize(g, (int(gw * s), int(gh * s)), interpolation=cv2.INTER_CUBIC)
        out += amp * up[:h, :w]
        total += amp ** 2
        amp *= 0.5
    out /= np.sqrt(total)
    return out


def _tubule_polygon(rng, cx, cy, r_major, aspect, n=180):
    theta = rng.uniform(0, np.pi)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones_like(t)
    for k in range(2, 7):
        r += rng.normal(0, 0.045 / (k - 1) ** 0.7) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    ex = r_major * r * np.cos(t)
    ey = r_major * aspect * r * np.sin(t)
    x = cx + ex * np.cos(theta) - ey * np.sin(theta)
    y = cy + ex * np.sin(theta) + ey * np.cos(theta)
    return np.stack([x, y], 1)


def _sample_params(rng, table, cls, mix_cls=None, t=0.0):
    p = table[cls]
    q = table[mix_cls] if mix_cls is not None else None
    out = {}
    for k, (m, s) in p.items():
        if q is not None:
            m = (1 - t) * m + t * q[k][0]
            s = (1 - t) * s + t * q[k][1]
        out[k] = float(rng.normal(m, s)) if s > 0 else float(m)
    out["a"] = max(out["a"], 6.0)
    out["ratio"] = float(np.clip(out["ratio"], 0.22, 1.0))
    out["dens"] = max(out["dens"], 0.2)
    for k in ("tex", "rim", "nucl", "vac", "speck", "thread"):
        out[k] = max(out[k], 0.0)
    out["tsig"] = max(out["tsig"], 0.6)
    return out


def _draw_nucleus(rng, H, M, labels, nuc: Nucleus, p, theta):
    """Render one nucleus into H/M (alpha over) and labels (later wins), on a local patch."""
    a = p["a"]
    b = a * p["ratio"]
    nuc.a, nuc.b = a, b
    R = int(np.ceil(a * 1.15)) + 4
    pad = 4 if nuc.blurred else 0
    hgt, wid = labels.shape
    x0, y0 = int(np.floor(nuc.x)) - R - pad, int(np.floor(nuc.y)) - R - pad
    x1, y1 = int(np.floor(nuc.x)) + R + pad + 1, int(np.floor(nuc.y)) + R + pad + 1
    x0c, y0c, x1c, y1c = max(x0, 0), max(y0, 0), min(x1, wid), min(y1, hgt)
    if x1c <= x0c or y1c <= y0c:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - nuc.x, yy - nuc.y
    c, s = np.cos(theta), np.sin(theta)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    ang = np.arctan2(v, u)
    irr = np.ones_like(u)
    for k in (2, 3, 4):
        irr += rng.normal(0, 0.035) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    r = np.hypot(u, v) / irr
    edge = (1.0 - r) * b  # ~ px inside the boundary
    alpha = np.clip(0.5 + edge, 0.0, 1.0)

    shape = u.shape
    tex = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), p["tsig"])
    tex /= tex.std() + 1e-6
    d = p["dens"] * (1.0 + p["tex"] * tex)
    if p["rim"] > 0:
        d += p["rim"] * p["dens"] * np.exp(-((np.maximum(edge, 0) / 1.6) ** 2))
    if p["vac"] > 0.05:
        ph = rng.uniform(0, 2 * np.pi)
        off = 0.35 * b
        vx, vy = nuc.x + off * np.cos(ph), nuc.y + off * np.sin(ph)
        sig = 0.30 * b
        d *= 1.0 - np.clip(0.7 * p["vac"], 0, 0.85) * np.exp(
            -((xx - vx) ** 2 + (yy - vy) ** 2) / (2 * sig ** 2))
    if p["speck"] > 0.05:
        n = int(rng.poisson(14 * p["speck"] * (a / 13.0) ** 2))
        if n:
            sp = np.zeros(shape, np.float32)
            rr = np.sqrt(rng.uniform(0, 0.8, n))
            ph = rng.uniform(0, 2 * np.pi, n)
            px = (nuc.x - x0) + rr * (a * np.cos(ph) * c - b * np.sin(ph) * s)
            py = (nuc.y - y0) + rr * (a * np.cos(ph) * s + b * np.sin(ph) * c)
            ix = np.clip(px.astype(int), 0, shape[1] - 1)
            iy = np.clip(py.astype(int), 0, shape[0] - 1)
            np.add.at(sp, (iy, ix), 1.0)
            sp = cv2.GaussianBlur(sp, (0, 0), 1.1) * (2 * np.pi * 1.1 ** 2)
            d += 0.55 * min(p["speck"], 1.3) * sp
    if p["thread"] > 0.05:
        th = np.zeros(shape, np.uint8)
        k = int(round(p["thread"] * rng.integers(4, 8)))
        for _ in range(k):
            n_seg = 6
            ph = rng.uniform(0, 2 * np.pi)
            rr = np.sqrt(rng.uniform(0, 0.6))
            px, py = rr * np.cos(ph), rr * np.sin(ph)  # unit-disc coords
            heading = rng.uniform(0, 2 * np.pi)
            pts = []
            for _j in range(n_seg):
                ex, ey = px * a, py * b
                pts.append([(nuc.x - x0) + ex * c - ey * s, (nuc.y - y0) + ex * s + ey * c])
                heading += rng.normal(0, 0.6)
                px += 0.16 * np.cos(heading)
                py += 0.16 * np.sin(heading)
                if px * px + py * py > 0.85:
                    break
            if len(pts) > 1:
                cv2.polylines(th, [np.round(np.array(pts) * 4).astype(np.int32)], False, 255,
                              thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_AA, shift=2)
        d += 0.5 * min(p["thread"], 1.3) * cv2.GaussianBlur(th.astype(np.float32) / 255.0,
                                                            (0, 0), 0.7)
    if p["nucl"] > 0.05:
        ph = rng.uniform(0, 2 * np.pi)
        off = rng.uniform(0, 0.25) * b
        nx_, ny_ = nuc.x + off * np.cos(ph), nuc.y + off * np.sin(ph)
        sig = rng.uniform(1.6, 2.4)
        d += min(p["nucl"], 1.4) * 0.9 * np.exp(
            -((xx - nx_) ** 2 + (yy - ny_) ** 2) / (2 * sig ** 2))
    if nuc.faint:
        d *= 0.62
    mask = alpha >= 0.5
    if nuc.blurred:
        sig = rng.uniform(1.5, 2.6)
        da = cv2.GaussianBlur(d * alpha, (0, 0), sig)
        alpha = cv2.GaussianBlur(alpha, (0, 0), sig)
        d = da / np.maximum(alpha, 1e-3)

    sl = (slice(y0c - y0, y1c - y0), slice(x0c - x0, x1c - x0))
    al, dl, ml = alpha[sl], d[sl], mask[sl]
    Hp = H[y0c:y1c, x0c:x1c]
    Mp = M[y0c:y1c, x0c:x1c]
    Lp = labels[y0c:y1c, x0c:x1c]
    Hp *= 1.0 - al
    Hp += dl * al
    Mp *= 1.0 - 0.6 * al
    prev = Lp[ml]
    nuc.overlap = float(np.count_nonzero(prev))  # px of older nuclei this one covers
    Lp[ml] = nuc.id
    nuc.area = int(np.count_nonzero(mask))


def _draw_debris(rng, H, M, labels, nuc: Nucleus):
    """Damaged cell: fragmented, smeared nucleus debris (in the label image, not annotated)."""
    R = 22
    x0, y0 = int(nuc.x) - R, int(nuc.y) - R
    hgt, wid = labels.shape
    if x0 < 0 or y0 < 0 or x0 + 2 * R + 1 > wid or y0 + 2 * R + 1 > hgt:
        return
    sz = 2 * R + 1
    frag = np.zeros((sz, sz), np.float32)
    n = int(rng.integers(3, 9))
    spread = rng.uniform(4, 9)
    for _ in range(n):
        fx, fy = R + rng.normal(0, spread), R + rng.normal(0, spread)
        ax = (max(2, int(rng.uniform(2.0, 6.5))), max(1, int(rng.uniform(1.5, 4.5))))
        cv2.ellipse(frag, (int(np.clip(fx, 3, sz - 4)), int(np.clip(fy, 3, sz - 4))), ax,
                    float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.9, 1.5)), -1,
                    lineType=cv2.LINE_AA)
    # smear: an elongated faint streak
    smear = np.zeros((sz, sz), np.float32)
    ang = rng.uniform(0, 180)
    cv2.ellipse(smear, (R, R), (int(rng.uniform(10, 18)), int(rng.uniform(3, 7))), ang, 0, 360,
                1.0, -1)
    smear = cv2.GaussianBlur(smear, (0, 0), 3.0) * rng.uniform(0.35, 0.7)
    frag = cv2.GaussianBlur(frag, (0, 0), 0.8)
    dens = np.maximum(frag, smear)
    alpha = np.clip(dens / 0.35, 0, 1)
    Hp = H[y0:y0 + sz, x0:x0 + sz]
    Mp = M[y0:y0 + sz, x0:x0 + sz]
    Hp *= 1 - alpha
    Hp += dens * alpha
    Mp += 0.25 * smear
    m = cv2.morphologyEx((dens > 0.3).astype(np.uint8), cv2.MORPH_CLOSE,
                         cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))).astype(bool)
    Lp = labels[y0:y0 + sz, x0:x0 + sz]
    Lp[m] = nuc.id
    nuc.area = int(m.sum())
    nuc.a = nuc.b = float(np.sqrt(max(nuc.area, 1) / np.pi))


def compose_rgb(H, M, rng, h_scale=1.0, m_scale=1.0, od_h=OD_H, od_m=OD_M,
                gamma=1.0, noise=1.5):
    """Beer-Lambert composite of the stain maps -> uint8 RGB."""
    od = (OD_BASE[None, None, :].astype(np.float32)
          + (H * h_scale)[..., None] * od_h.astype(np.float32)[None, None, :]
          + (M * m_scale)[..., None] * od_m.astype(np.float32)[None, None, :])
    img = np.exp(-od)
    if gamma != 1.0:
        img = img ** np.float32(gamma)
    img = img * np.float32(255.0)
    if noise > 0:
        img += rng.standard_normal(img.shape[:2], dtype=np.float32)[..., None] * np.float32(noise)
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise * 0.5)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
def render_section(rng_or_seed, size: int = 1536, n_tubules: int = 3, *,
                   tubule_radius=(230.0, 330.0), nuclei_density: float = 5.5e-4,
                   n_interstitial: int = 24, n_debris: int = 30, n_empty: int = 40,
                   p_transitional: float = 0.3, p_blurred: float = 0.07, p_faint: float = 0.07,
                   classes=DEFAULT_CLASSES, static=DEFAULT_STATIC,
                   stain=(1.0, 1.0)) -> Section:
    """Render one synthetic 40x section of ``size`` x ``size`` px with ``n_tubules`` tubules.

    ``nuclei_density`` is nuclei per px² of seminiferous epithelium; ``n_debris`` damaged-cell
    artefacts (drawn, in ``labels``, not in ``points``); ``n_empty`` positions without a cell;
    ``stain`` = (haematoxylin, PAS) intensity factors of this section.
    """
    rng = _as_rng(rng_or_seed)
    classes = tuple(classes)
    for c in classes:
        if c not in _P:
            raise ValueError(f"demo generator has no appearance model for class {c!r}")
    dynamic = [c for c in classes if c not in static]
    S = int(size)
    H = np.zeros((S, S), np.float32)
    M = np.zeros((S, S), np.float32)
    labels = np.zeros((S, S), np.uint32)

    # ---- tubules: non-overlapping perturbed ellipses, inside the image with margin
    margin = max(24, S // 40)
    gap = 28.0
    polys, shapes = [], []
    from shapely.geometry import Polygon

    scale = 1.0
    tries = 0
    while len(polys) < n_tubules:
        tries += 1
        if tries % 200 == 0:
            scale *= 0.9  # crowded: shrink the remaining tubules
        if tries > 4000:
            break
        rmaj = rng.uniform(*tubule_radius) * scale
        aspect = rng.uniform(0.62, 1.0)
        cx = rng.uniform(margin + rmaj, S - margin - rmaj) if S - 2 * (margin + rmaj) > 0 else S / 2
        cy = rng.uniform(margin + rmaj, S - margin - rmaj) if S - 2 * (margin + rmaj) > 0 else S / 2
        poly = _tubule_polygon(rng, cx, cy, rmaj, aspect)
        if poly.min() < margin or poly.max() > S - margin:
            continue
        sp = Polygon(poly)
        if not sp.is_valid or any(sp.distance(o) < gap for o in shapes):
            continue
        polys.append(poly)
        shapes.append(sp)

    # ---- background tissue: stroma with fibrous texture; a glass region along an edge
    tissue_field = _smooth_noise(rng, (S, S), S / 3.0, octaves=2)
    edge_dir = rng.integers(0, 4)
    ramp = np.linspace(1.0, -1.0, S, dtype=np.float32)
    ramp = ramp[None, :] if edge_dir % 2 == 0 else ramp[:, None]
    if edge_dir >= 2:
        ramp = -ramp
    tissue = (tissue_field * 0.8 + 2.5 * ramp + 1.8) > 0
    tub_mask = np.zeros((S, S), np.uint8)
    for k, poly in enumerate(polys):
        cv2.fillPoly(tub_mask, [np.round(poly * 16).astype(np.int32)], k + 1, shift=4)
    near = cv2.dilate((tub_mask > 0).astype(np.uint8),
                      cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (121, 121)))
    tissue = (tissue | (near > 0)).astype(np.float32)
    tissue = cv2.GaussianBlur(tissue, (0, 0), 2.0)

    fib = cv2.GaussianBlur(rng.standard_normal((S, S)).astype(np.float32), (0, 0), 1.2)
    k_aniso = (cv2.getGaussianKernel(31, 6.0) @ cv2.getGaussianKernel(31, 1.0).T).astype(np.float32)
    rot = cv2.getRotationMatrix2D((15, 15), float(rng.uniform(0, 180)), 1.0)
    k_aniso = cv2.warpAffine(k_aniso, rot, (31, 31))
    fib = cv2.filter2D(fib, -1, k_aniso / k_aniso.sum())
    fib /= fib.std() + 1e-6
    low = _smooth_noise(rng, (S, S), 120.0)
    M[:] = (0.42 + 0.10 * low + 0.08 * fib) * tissue
    H[:] = np.clip(0.05 + 0.03 * low, 0, None) * tissue
    # retraction clefts: pale gaps in stroma
    cleft = _smooth_noise(rng, (S, S), 60.0, octaves=2)
    M *= np.clip(1.0 - 1.6 * np.clip(cleft - 1.7, 0, None), 0.15, 1.0)

    # ---- per tubule: wall band, epithelium, lumen
    fine = cv2.GaussianBlur(rng.standard_normal((S, S)).astype(np.float32), (0, 0), 2.0)
    fine /= fine.std() + 1e-6
    tub_info = []
    for k, poly in enumerate(polys):
        inside = (tub_mask == k + 1).astype(np.uint8)
        x, y, w, h = cv2.boundingRect(inside)
        pad = 2
        x, y = max(x - pad, 0), max(y - pad, 0)
        w, h = min(w + 2 * pad, S - x), min(h + 2 * pad, S - y)
        sub = inside[y:y + h, x:x + w]
        dist = cv2.distanceTransform(sub, cv2.DIST_L2, 5)
        maxd = float(dist.max())
        wall = rng.uniform(9.0, 14.0)
        lumen_frac = rng.uniform(0.22, 0.34)
        lum_d = maxd * (1 - lumen_frac) + 8 * _smooth_noise(rng, dist.shape, 40.0, 1)
        ins = sub > 0
        Ms = M[y:y + h, x:x + w]
        Hs = H[y:y + h, x:x + w]
        fs = fine[y:y + h, x:x + w]
        # halo of lamina propria just outside the wall (slightly denser)
        outside = cv2.distanceTransform(1 - sub, cv2.DIST_L2, 5)
        halo = (~ins) & (outside < 10)
        Ms[halo] += 0.22 * np.exp(-outside[halo] / 5.0)
        epi = ins & (dist > wall)
        Ms[epi] = (0.30 + 0.07 * fs[epi])
        Hs[epi] = 0.07 + 0.02 * fs[epi]
        wl = ins & (dist <= wall)
        prof = 1.0 - np.abs(dist[wl] / wall - 0.5) * 0.7
        Ms[wl] = (1.05 + 0.15 * fs[wl]) * prof + 0.2
        lum = ins & (dist > lum_d)
        soft = np.clip((dist[lum] - lum_d[lum]) / 6.0, 0, 1)
        Ms[lum] = Ms[lum] * (1 - soft) + (0.06 + 0.03 * fs[lum]) * soft
        Hs[lum] = Hs[lum] * (1 - soft) + 0.02 * soft
        # sorted distance samples for placement (stride 2)
        yy, xx = np.nonzero(ins[::2, ::2])
        dd = dist[::2, ::2][yy, xx]
        order = np.argsort(dd, kind="stable")
        epi_area = float(np.count_nonzero(epi & (dist <= lum_d)))
        tub_info.append(dict(x=x, y=y, dist=dist, maxd=maxd, wall=wall,
                             lum=float(maxd * (1 - lumen_frac)), dd=dd[order],
                             px=(xx[order] * 2 + x).astype(np.float32),
                             py=(yy[order] * 2 + y).astype(np.float32),
                             centre=np.asarray(poly).mean(0), epi_area=epi_area))

    # ---- nuclei inside tubules
    nuclei: list[Nucleus] = []
    plan = []  # (nucleus, params, theta)
    placed_xy = np.zeros((0, 2), np.float32)
    placed_r = np.zeros((0,), np.float32)
    freqs = np.array([_FREQ[c] for c in classes], float)
    freqs /= freqs.sum()
    next_id = 1

    def _free(x, y, r, fac=0.86):
        if len(placed_r) == 0:
            return True
        d2 = (placed_xy[:, 0] - x) ** 2 + (placed_xy[:, 1] - y) ** 2
        return bool(np.all(d2 >= (fac * (placed_r + r)) ** 2))

    for k, ti in enumerate(tub_info):
        n = int(rng.poisson(nuclei_density * ti["epi_area"]))
        cls_idx = rng.choice(len(classes), size=n, p=freqs)
        params = []
        for ci in cls_idx:
            cls = classes[ci]
            mix, t = None, 0.0
            if cls in dynamic and rng.random() < p_transitional:
                j = dynamic.index(cls)
                nb = [dynamic[i] for i in (j - 1, j + 1) if 0 <= i < len(dynamic)]
                mix = nb[int(rng.integers(len(nb)))]
                t = rng.uniform(0.15, 0.5)
            params.append((cls, _sample_params(rng, _P, cls, mix, t)))
        params.sort(key=lambda cp: -cp[1]["a"] * np.sqrt(cp[1]["ratio"]))  # big ones first
        for cls, p in params:
            a = p["a"]
            b = a * p["ratio"]
            rad = np.sqrt(a * b)
            ok = False
            for _attempt in range(25):
                if cls == "PMC":
                    target = rng.uniform(0.35, 0.85) * ti["wall"]
                else:
                    f = float(np.clip(p["depth"], -0.02, 1.06))
                    lo = ti["wall"] + 0.8 * b
                    target = lo + f * max(ti["lum"] - lo, 1.0)
                i0 = np.searchsorted(ti["dd"], target - 1.5)
                i1 = np.searchsorted(ti["dd"], target + 1.5)
                if i1 <= i0:
                    continue
                i = int(rng.integers(i0, i1))
                x = float(ti["px"][i] + rng.uniform(-1, 1))
                y = float(ti["py"][i] + rng.uniform(-1, 1))
                if _free(x, y, rad if cls != "PMC" else b * 1.6):
                    ok = True
                    break
            if not ok:
                continue
            rdir = np.arctan2(y - ti["centre"][1], x - ti["centre"][0])
            o = _ORIENT.get(cls, "random")
            if o == "tangential":
                theta = rdir + np.pi / 2 + rng.normal(0, 0.12)
            elif o == "radial":
                theta = rdir + rng.normal(0, 0.35)
            else:
                theta = rng.uniform(0, np.pi)
            nuc = Nucleus(id=0, x=x, y=y, cls=cls, tubule=k,
                          blurred=bool(rng.random() < p_blurred),
                          faint=bool(rng.random() < p_faint))
            plan.append((nuc, p, theta))
            placed_xy = np.vstack([placed_xy, [[x, y]]]).astype(np.float32)
            placed_r = np.append(placed_r, np.float32(rad if cls != "PMC" else b * 1.6))

    # ---- interstitial nuclei (Leydig cells, fibroblasts) in stroma; not annotated
    stroma_ok = cv2.distanceTransform((tub_mask == 0).astype(np.uint8), cv2.DIST_L2, 3) > 30
    stroma_ok &= tissue > 0.95
    sy, sx = np.nonzero(stroma_ok[::4, ::4])
    inter_plan = []
    if len(sx):
        for _ in range(int(n_interstitial)):
            kind = "leydig" if rng.random() < 0.6 else "fibroblast"
            p = _sample_params(rng, _INTERSTITIAL, kind)
            rad = np.sqrt(p["a"] * p["a"] * p["ratio"])
            for _attempt in range(20):
                i = int(rng.integers(len(sx)))
                x, y = float(sx[i] * 4 + rng.uniform(0, 4)), float(sy[i] * 4 + rng.uniform(0, 4))
                if (p["a"] + 4 < x < S - p["a"] - 4 and p["a"] + 4 < y < S - p["a"] - 4
                        and _free(x, y, rad, 1.0)):
                    nuc = Nucleus(id=0, x=x, y=y, cls=kind, tubule=-1)
                    inter_plan.append((nuc, p, rng.uniform(0, np.pi)))
                    placed_xy = np.vstack([placed_xy, [[x, y]]]).astype(np.float32)
                    placed_r = np.append(placed_r, np.float32(rad))
                    if kind == "leydig":  # eosinophilic (PAS-pink) cytoplasm around the nucleus
                        cv2.ellipse(M, (int(x), int(y)), (int(p["a"] * 2.0), int(p["a"] * 1.6)),
                                    float(rng.uniform(0, 180)), 0, 360, 0.75, -1,
                                    lineType=cv2.LINE_AA)
                    break

    # ---- draw: random order, later drawn wins in overlaps
    allplan = plan + inter_plan
    order = rng.permutation(len(allplan))
    for j in order:
        nuc, p, theta = allplan[j]
        nuc.id = next_id
        next_id += 1
        _draw_nucleus(rng, H, M, labels, nuc, p, theta)
        nuclei.append(nuc)

    # ---- damaged-cell debris (grade 5): in tubules (epithelium/lumen) and stroma
    debris = []
    all_in = [(ti["px"], ti["py"], ti["dd"], ti["wall"]) for ti in tub_info]
    for _ in range(int(n_debris)):
        for _attempt in range(30):
            if all_in and rng.random() < 0.9:
                px, py, dd, wall = all_in[int(rng.integers(len(all_in)))]
                i = int(rng.integers(np.searchsorted(dd, wall + 12), len(dd)))
                x, y = float(px[i]), float(py[i])
            elif len(sx):
                i = int(rng.integers(len(sx)))
                x, y = float(sx[i] * 4), float(sy[i] * 4)
            else:
                continue
            if 24 < x < S - 24 and 24 < y < S - 24 and _free(x, y, 16.0, 1.0):
                nuc = Nucleus(id=next_id, x=x, y=y, cls="debris", tubule=-1)
                next_id += 1
                _draw_debris(rng, H, M, labels, nuc)
                if nuc.area > 0:
                    nuclei.append(nuc)
                    debris.append(nuc)
                    placed_xy = np.vstack([placed_xy, [[x, y]]]).astype(np.float32)
                    placed_r = np.append(placed_r, np.float32(16.0))
                break
    for nuc in debris:
        nuc.tubule = int(tub_mask[int(nuc.y), int(nuc.x)]) - 1

    # ---- overlap fractions: covered by later nuclei + covering older ones
    ids = np.array([n.id for n in nuclei], np.int64)
    counts = np.bincount(labels.ravel(), minlength=next_id)
    for n in nuclei:
        if n.cls == "debris" or n.area == 0:
            continue
        visible = counts[n.id]
        n.overlap = float(np.clip(((n.area - visible) + n.overlap) / n.area, 0, 1))
    del ids

    # ---- empty spots (grade 6): lumen or stroma, no nucleus around
    empty = []
    free_mask = cv2.dilate((labels > 0).astype(np.uint8),
                           cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (41, 41))) == 0
    free_mask &= tissue > 0.5
    free_mask[:40, :] = False
    free_mask[-40:, :] = False
    free_mask[:, :40] = False
    free_mask[:, -40:] = False
    ey, ex = np.nonzero(free_mask[::4, ::4])
    if len(ex):
        pick = rng.choice(len(ex), size=min(int(n_empty), len(ex)), replace=False)
        for i in np.sort(pick):
            empty.append((float(ex[i] * 4), float(ey[i] * 4)))

    image = compose_rgb(H, M, rng, h_scale=stain[0], m_scale=stain[1])
    points = [(n.x, n.y, n.cls) for n in nuclei if n.tubule >= 0 and n.cls in _P]
    return Section(image=image, labels=labels, tubules=[np.asarray(p) for p in polys],
                   points=points, nuclei=nuclei, empty_spots=empty, H=H, M=M, tissue=tissue)


# --------------------------------------------------------------------------------------------
def random_homography(rng, size40: int, size20: int, max_rot_deg=3.0, max_shift=40.0,
                      max_persp=2e-6) -> np.ndarray:
    """40x level-0 -> 20x level-0 homography: scale 0.5, small rotation/shift/perspective."""
    rng = _as_rng(rng)
    th = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg))
    s = 0.5 * rng.uniform(0.995, 1.005)
    c40 = np.array([[1, 0, -size40 / 2], [0, 1, -size40 / 2], [0, 0, 1]], float)
    A = np.array([[s * np.cos(th), -s * np.sin(th), 0], [s * np.sin(th), s * np.cos(th), 0],
                  [0, 0, 1]], float)
    t = rng.uniform(-max_shift, max_shift, 2)
    c20 = np.array([[1, 0, size20 / 2 + t[0]], [0, 1, size20 / 2 + t[1]], [0, 0, 1]], float)
    P = np.array([[1, 0, 0], [0, 1, 0], rng.uniform(-max_persp, max_persp, 3) * [1, 1, 0]],
                 float)
    P[2, 2] = 1.0
    Hm = c20 @ A @ c40 @ P
    return Hm / Hm[2, 2]


def render_scan_20x(sec: Section, Hm: np.ndarray, size20: int, rng, *, blur_sigma=1.5,
                    stain=(0.88, 1.15), gamma=1.05, noise=2.0) -> np.ndarray:
    """Render the 20x SZP scan of ``sec`` through homography ``Hm`` (40x -> 20x level 0)."""
    rng = _as_rng(rng)
    out = []
    for arr in (sec.H, sec.M):
        a = cv2.GaussianBlur(arr, (0, 0), 0.9)  # anti-alias before the 2x downscale
        w = cv2.warpPerspective(a, Hm, (size20, size20), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out.append(cv2.GaussianBlur(w, (0, 0), blur_sigma))  # defocus (single z-plane)
    Hw, Mw = out
    od_h = OD_H + np.array([0.10, -0.06, 0.02])  # slightly redder haematoxylin
    return compose_rgb(Hw, Mw, rng, h_scale=stain[0], m_scale=stain[1], od_h=od_h,
                       gamma=gamma, noise=noise)
