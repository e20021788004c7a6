"""cellstage.exclusion (issue 15 item 4): markers written, read, propagated, dropped and refused.

The job object is a plain stand-in for the `snakemake` object a rule script receives (inputs,
outputs and log as path lists with names, wildcards, config); the whole path through snakemake is
tests/integration/test_workflow.py::test_failing_slides_are_excluded_and_listed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from cellstage.exclusion import (
    MARKER,
    drop_excluded,
    exclusion_table,
    find_markers,
    read_marker,
    run_slide_stage,
    summary_lines,
)
from cellstage.utils import CellstageError


class Paths(list):
    """A flat list of paths with names (the shape of snakemake's Namedlist)."""

    def __init__(self, **named):
        self._names = {}
        for k, v in named.items():
            v = [str(x) for x in v] if isinstance(v, list) else str(v)
            self._names[k] = v
            self.extend(v if isinstance(v, list) else [v])

    def __getattr__(self, name):
        try:
            return self._names[name]
        except KeyError:
            raise AttributeError(name) from None

    def items(self):
        return self._names.items()

    def values(self):
        return self._names.values()


def job(tmp, rule, inputs, outputs, strict=False, **wildcards):
    return SimpleNamespace(rule=rule, input=Paths(**inputs), output=Paths(**outputs),
                           log=[str(tmp / "logs" / f"{rule}.log")], wildcards=wildcards,
                           config={"require_all_slides": strict})


def boom():
    raise CellstageError("slides/s1.tiff: not a TIFF file (truncated?)")


def test_failure_writes_markers_and_downstream_propagates(tmp_path):
    res = tmp_path / "results"
    (tmp_path / "s1.tiff").write_bytes(b"x")
    conv = job(tmp_path, "convert", {"slide": tmp_path / "s1.tiff"}, {"zarr": res / "slides/s1.ome.zarr"}, slide="s1")
    run_slide_stage(conv, boom)  # degrades: no exception
    store = res / "slides/s1.ome.zarr"
    assert [p.name for p in store.iterdir()] == [MARKER]
    rec = read_marker(store)
    assert rec["slide"] == "s1" and rec["rule"] == "convert" and "not a TIFF" in rec["error"]

    ran = []
    crops = job(tmp_path, "extract_crops", {"slide": store},
                {"zarr": res / "crops/s1.zarr", "index": res / "crops/s1.parquet"}, slide="s1")
    run_slide_stage(crops, lambda: ran.append(1))
    assert ran == []  # a marker input: the stage does not run
    index = read_marker(res / "crops/s1.parquet")
    assert index["cause"]["rule"] == "convert" and "input excluded" in index["error"]
    with pytest.raises(ValueError, match="magic bytes"):
        pd.read_parquet(res / "crops/s1.parquet")  # never read as a table
    assert [r["slide"] for r in find_markers(res)] == ["s1"]
    assert "s1: rule convert" in "\n".join(summary_lines(find_markers(res)))


def test_strict_mode_fails_and_refuses_markers(tmp_path):
    res = tmp_path / "results"
    conv = job(tmp_path, "convert", {"slide": tmp_path / "s1.tiff"}, {"zarr": res / "slides/s1.ome.zarr"},
               strict=True, slide="s1")
    with pytest.raises(CellstageError, match="not a TIFF"):
        run_slide_stage(conv, boom)
    assert not (res / "slides/s1.ome.zarr").exists()
    conv.config["require_all_slides"] = False
    run_slide_stage(conv, boom)
    seg = job(tmp_path, "segment", {"slide": res / "slides/s1.ome.zarr"}, {"labels": res / "segmentation/s1.zarr"},
              strict=True, ref_slide="s1")
    with pytest.raises(CellstageError, match="require_all_slides: false"):
        run_slide_stage(seg, lambda: None)


def test_memory_error_is_not_an_exclusion(tmp_path):
    def oom():
        raise MemoryError

    conv = job(tmp_path, "convert", {"slide": tmp_path / "s1.tiff"}, {"zarr": tmp_path / "s1.ome.zarr"}, slide="s1")
    with pytest.raises(MemoryError):
        run_slide_stage(conv, oom)
    assert not (tmp_path / "s1.ome.zarr").exists()


def test_aggregator_drops_markers_and_paired_files(tmp_path):
    res = tmp_path / "results"
    for s in ("s1", "s2", "s3"):
        (res / "slides" / f"{s}.ome.zarr").mkdir(parents=True)
    run_slide_stage(job(tmp_path, "convert", {}, {"zarr": res / "slides/s2.ome.zarr"}, slide="s2"), boom)
    grades = [tmp_path / f"g{i}.csv" for i in (1, 2, 3)]
    agg = job(tmp_path, "train_grader",
              {"slides": [res / "slides" / f"{s}.ome.zarr" for s in ("s1", "s2", "s3")], "grades": grades}, {})
    inputs, excluded = drop_excluded(agg, pairs={"slides": "grades"})
    assert [Path(p).name for p in inputs.slides] == ["s1.ome.zarr", "s3.ome.zarr"]
    assert [Path(p).name for p in inputs["grades"]] == ["g1.csv", "g3.csv"]
    assert [r["slide"] for r in excluded] == ["s2"]
    table = exclusion_table(excluded)
    assert list(table["slide"]) == ["s2"] and table["failed_rule"].iat[0] == "convert"
    agg.config["require_all_slides"] = True
    with pytest.raises(CellstageError, match="slide s2"):
        drop_excluded(agg)
