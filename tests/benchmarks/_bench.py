"""Benchmark helpers: result JSON (atomic), synthetic slides, cells and label stores.

Every result is one JSON file ``results/bench/{name}.json`` (repository root) with exactly the
keys ``name, value, unit, anchor, anchor_value, ratio, goal_op, goal_ratio``;
``ratio = value / anchor_value`` and the goal holds when ``ratio <goal_op> goal_ratio``.
"""

from __future__ import annotations

import json
import math
import operator
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "results" / "bench"
KEYS = ("name", "value", "unit", "anchor", "anchor_value", "ratio", "goal_op", "goal_ratio")
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def write_result(name: str, value: float, unit: str, anchor: str, anchor_value: float,
                 goal_op: str, goal_ratio: float) -> dict:
    """Write ``results/bench/{name}.json`` atomically (temp file + rename); returns the record."""
    if goal_op not in OPS:
        raise ValueError(f"goal_op must be one of {list(OPS)}, got {goal_op!r}")
    value, anchor_value = float(value), float(anchor_value)
    ratio = value / anchor_value if anchor_value else math.inf
    rec = {
        "name": name,
        "value": round(value, 4),
        "unit": unit,
        "anchor": anchor,
        "anchor_value": round(anchor_value, 4),
        "ratio": round(ratio, 4),
        "goal_op": goal_op,
        "goal_ratio": float(goal_ratio),
    }
    assert tuple(rec) == KEYS
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".json.tmp", dir=BENCH_DIR)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(rec, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, BENCH_DIR / f"{name}.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    holds = goal_holds(rec)
    print(f"\n[bench] {name}: {value:.4g} {unit} vs {anchor} {anchor_value:.4g} -> ratio {ratio:.3f} "
          f"(goal ratio {goal_op} {goal_ratio}: {'holds' if holds else 'FAILS'})")
    return rec


def goal_holds(rec: dict) -> bool:
    return bool(OPS[rec["goal_op"]](rec["ratio"], rec["goal_ratio"]))


def median(xs) -> float:
    return float(statistics.median(xs))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


# --------------------------------------------------------------------------- synthetic slide
def _tissue_bank(n: int, tile: int, seed: int) -> list[np.ndarray]:
    """``n`` different H&E-like RGB tiles: pink stroma texture, purple nuclei, pixel noise.

    Content is random enough that JPEG cannot shrink it to nothing (~0.5-1 bit/px at q85,
    like real H&E tiles)."""
    import cv2

    rng = np.random.default_rng(seed)
    bank = []
    yy, xx = np.mgrid[0:tile, 0:tile]
    for _ in range(n):
        low = rng.normal(0, 1, (tile // 16, tile // 16, 3)).astype(np.float32)
        low = cv2.resize(low, (tile, tile), interpolation=cv2.INTER_CUBIC)
        img = np.empty((tile, tile, 3), np.float32)
        img[...] = (232, 170, 205)  # eosin pink
        img += low * (10, 18, 12)
        fib = np.sin((xx * rng.uniform(0.02, 0.08) + yy * rng.uniform(0.02, 0.08))
                     + rng.uniform(0, 6.3))[..., None].astype(np.float32)
        img += fib * (6, 14, 8)
        for _ in range(int(rng.integers(40, 90))):  # nuclei: dark purple ellipses
            c = (int(rng.integers(0, tile)), int(rng.integers(0, tile)))
            ax = (int(rng.integers(5, 11)), int(rng.integers(4, 9)))
            col = tuple(float(v) for v in rng.normal((95, 60, 150), 12))
            cv2.ellipse(img, c, ax, float(rng.uniform(0, 180)), 0, 360, col, -1)
        img += rng.normal(0, 5, img.shape).astype(np.float32)
        bank.append(np.clip(img, 0, 255).astype(np.uint8))
    return bank


def _encoded_bank(bank: list[np.ndarray], tile: int, quality: int) -> list[bytes]:
    """JPEG bytes of each bank tile exactly as tifffile stores them (photometric RGB)."""
    import tifffile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "bank.tiff"
        stack = np.concatenate(bank, axis=0)  # (n*tile, tile, 3): one tile per row of tiles
        tifffile.imwrite(p, stack, photometric="rgb", tile=(tile, tile), compression="jpeg",
                         compressionargs={"level": quality}, metadata=None, software=False)
        out = []
        with tifffile.TiffFile(p) as tf, open(p, "rb") as fh:
            page = tf.pages[0]
            assert page.jpegtables is None, "expected self-contained JPEG tiles"
            for off, cnt in zip(page.dataoffsets, page.databytecounts):
                fh.seek(off)
                out.append(fh.read(cnt))
    return out


def write_synthetic_slide(path, size: int, *, mpp: float = 0.25, tile: int = 512, quality: int = 85,
                          n_bank: int = 24, seed: int = 0, min_level: int = 512) -> dict:
    """A ``size``×``size`` pyramidal JPEG-tiled RGB TIFF (levels ×2 down to ``min_level``),
    X/YResolution in px/cm (OpenSlide generic-tiff reports ``openslide.mpp-x``).

    Written tile by tile from a generator of pre-encoded JPEG tiles (a bank of ``n_bank``
    different H&E-like tiles picked pseudo-randomly per position), so memory stays at one bank
    and a 60k×60k slide is mostly disk I/O. Returns {path, size, levels, bytes, seconds}."""
    import tifffile

    t0 = time.perf_counter()
    path = Path(path)
    enc = _encoded_bank(_tissue_bank(n_bank, tile, seed), tile, quality)
    sizes = [size]
    while sizes[-1] // 2 >= min_level:
        sizes.append(sizes[-1] // 2)

    def tiles(n_across: int, n_down: int, level: int):
        rng = np.random.default_rng(seed * 1000 + level)
        picks = rng.integers(0, len(enc), n_across * n_down)
        for k in picks:
            yield enc[int(k)]

    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for lv, s in enumerate(sizes):
            n = -(-s // tile)
            res = 1e4 / (mpp * 2**lv)
            tw.write(tiles(n, n, lv), shape=(s, s, 3), dtype=np.uint8, photometric="rgb",
                     tile=(tile, tile), compression="jpeg", resolution=(res, res),
                     resolutionunit="CENTIMETER", subfiletype=0 if lv == 0 else 1,
                     metadata=None, software=False)
    os.replace(tmp, path)
    return {"path": str(path), "size": size, "levels": sizes, "bytes": path.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- cells + labels
def synthetic_cells(size: int, n: int, *, seed: int = 0, margin: int = 40, radius: int = 6):
    """``n`` nucleus centroids inside the slide (uniform; at least ``2*radius+1`` px apart on a
    jittered grid, so their discs never overlap). Returns (cx, cy) float arrays."""
    rng = np.random.default_rng(seed)
    step = 2 * radius + 2
    nx = (size - 2 * margin) // step
    total = nx * nx
    if n > total:
        raise ValueError(f"{n} cells do not fit a {size}² slide at step {step}")
    pick = rng.choice(total, n, replace=False)
    gy, gx = np.divmod(pick, nx)
    jit = step - 2 * radius - 1
    cx = margin + gx * step + radius + rng.integers(0, jit + 1, n) + rng.uniform(-0.4, 0.4, n)
    cy = margin + gy * step + radius + rng.integers(0, jit + 1, n) + rng.uniform(-0.4, 0.4, n)
    return cx, cy


def write_cells_table(path, cx, cy, slide: str = "bench") -> None:
    import pandas as pd

    n = len(cx)
    pd.DataFrame({
        "cell_id": np.arange(1, n + 1, dtype=np.int64),
        "slide": slide,
        "centroid_x": cx,
        "centroid_y": cy,
        "label": "",
        "distance_to_wall_um": np.zeros(n),
        "distance_norm": np.zeros(n),
    }).to_parquet(path, index=False)


def write_label_store(path, size: int, cx, cy, *, radius: int = 6, chunk: int = 512, mpp: float = 0.25) -> None:
    """Label store (``cellstage.io.labels.create_labels``) with a disc of ``radius`` per
    cell (id = row + 1), written one band of chunk rows at a time (empty chunks are not stored)."""
    from cellstage.io.labels import create_labels

    arr = create_labels(path, (size, size), mpp=mpp, slide="bench", chunk=chunk)
    ix = np.floor(np.asarray(cx) + 0.5).astype(np.int64)
    iy = np.floor(np.asarray(cy) + 0.5).astype(np.int64)
    order = np.argsort(iy, kind="stable")
    iy_s = iy[order]
    dy, dx = np.mgrid[-radius: radius + 1, -radius: radius + 1]
    disc = dy**2 + dx**2 <= radius**2
    oy, ox = dy[disc], dx[disc]
    for y0 in range(0, size, chunk):
        h = min(chunk, size - y0)
        a, b = np.searchsorted(iy_s, [y0 - radius, y0 + h + radius])
        sel = order[a:b]
        if not len(sel):
            continue
        r2 = 2 * radius  # band margin: cells up to `radius` outside reach another `radius`
        band = np.zeros((h + 2 * r2, size + 2 * r2), np.uint32)
        py = (iy[sel] - y0 + r2)[:, None] + oy[None, :]
        px = (ix[sel] + r2)[:, None] + ox[None, :]
        band[py.ravel(), px.ravel()] = np.repeat((sel + 1).astype(np.uint32), len(oy))
        arr[y0: y0 + h, :] = band[r2: r2 + h, r2: r2 + size]


def rss_child_main(argv: list[str]) -> None:
    """Entry of the peak-RSS child: convert a slide, then extract crops of its cells."""
    from cellstage.crops.extract import extract_crops
    from cellstage.io.omezarr import convert_to_omezarr

    slide, out_zarr, labels, cells, crops_zarr, crops_index = argv
    t0 = time.perf_counter()
    conv = convert_to_omezarr(slide, out_zarr)
    t1 = time.perf_counter()
    crops = extract_crops(out_zarr, labels, cells, crops_zarr, crops_index, size=80,
                          meta={"slide": "bench"}, classes=[])
    t2 = time.perf_counter()
    # VmHWM: this process's own peak RSS. (ru_maxrss of a child seen through wait4 is useless
    # here: Linux carries the forking parent's high-water mark across exec.)
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": round(hwm_kb / 1024, 1), "convert_s": round(t1 - t0, 2),
                      "crops_s": round(t2 - t1, 2), "convert_mp_s": conv["megapixels_per_s"],
                      "crops_per_s": crops["crops_per_s"]}))


if __name__ == "__main__":  # python _bench.py rss SLIDE OUT_ZARR LABELS CELLS CROPS_ZARR CROPS_INDEX
    import sys

    if sys.argv[1] == "rss":
        rss_child_main(sys.argv[2:])
