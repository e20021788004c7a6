"""Benchmark fixtures: synthetic slides, cells and label stores, built once per session.

Only collected by ``make bench`` (``pytest tests/benchmarks -s``); ``make test`` uses the
``testpaths`` of pyproject.toml (tests/unit, tests/integration). The data lives under pytest's
temporary directory and the large files are removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import _bench  # noqa: E402

# sizes (px per side): the peak-RSS pair is 20k² vs 60k² (3.6 gigapixels, 360k nuclei; ~4 min of
# conversion and ~1.5 min of crop extraction on 2 cores, ~25 GB of scratch disk).
THROUGHPUT_SIZE = int(os.environ.get("BENCH_THROUGHPUT", 10000))
SMALL = int(os.environ.get("BENCH_SMALL", 20000))
BIG = int(os.environ.get("BENCH_BIG", 60000))
CELLS_PER_MP = float(os.environ.get("BENCH_CELLS_PER_MP", 100))  # 40k nuclei on 20k x 20k
MPP = 0.25


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    usage = shutil.disk_usage(d)
    need = 30e9 * (BIG / 60000) ** 2
    if usage.free < need:
        pytest.skip(f"benchmarks need ~{need / 1e9:.0f} GB free in {d}, have {usage.free / 1e9:.0f} GB")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class SlideSet:
    def __init__(self, root: Path, size: int, n_cells: int, seed: int = 0):
        self.size = size
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.slide = root / f"synth_{size}.tiff"
        self.info = _bench.write_synthetic_slide(self.slide, size, mpp=MPP, seed=seed)
        print(f"\n[bench] wrote {self.slide.name}: {self.info}")
        self.cx, self.cy = _bench.synthetic_cells(size, n_cells, seed=seed)
        self.cells = root / f"cells_{size}.parquet"
        _bench.write_cells_table(self.cells, self.cx, self.cy)
        self.labels = root / f"labels_{size}.zarr"
        _bench.write_label_store(self.labels, size, self.cx, self.cy, mpp=MPP)
        self.n_cells = n_cells


def _n_cells(size: int) -> int:
    return int(CELLS_PER_MP * size * size / 1e6)


@pytest.fixture(scope="session")
def small_set(bench_dir):
    return SlideSet(bench_dir / "small", SMALL, _n_cells(SMALL), seed=1)


@pytest.fixture(scope="session")
def big_set(bench_dir):
    return SlideSet(bench_dir / "big", BIG, _n_cells(BIG), seed=2)


@pytest.fixture(scope="session")
def throughput_slide(bench_dir):
    p = bench_dir / f"synth_{THROUGHPUT_SIZE}.tiff"
    _bench.write_synthetic_slide(p, THROUGHPUT_SIZE, mpp=MPP, seed=3)
    return p
