"""The command-line tool runs stages outside Snakemake, with the config's validated values, and
reports bad input clearly."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from cellstage.cli import app

runner = CliRunner()

STAGE_COMMANDS = ("convert", "train-segmenter", "segment", "cells", "register", "crops", "train-grader", "grade",
                  "pretrain", "finetune", "demo", "info")


@pytest.mark.parametrize("command", STAGE_COMMANDS)
def test_every_stage_command_parses_its_options(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and command in result.output.splitlines()[1]


def test_info_on_a_text_file_exits_nonzero_naming_the_file(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 2
    assert "notes.svs" in result.output


def _tiff(tmp_path):
    import numpy as np

    from cellstage.demo import write_pyramid_tiff

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(600, 700, 3), dtype=np.uint8)
    src = tmp_path / "s.tiff"
    write_pyramid_tiff(src, img, 0.25)
    return src, img


def test_convert_then_info_round_trip(tmp_path):
    src, img = _tiff(tmp_path)
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "s.ome.zarr"), "--tile", "256"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["info", str(tmp_path / "s.ome.zarr")])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["mpp"] == 0.25 and info["dimensions"] == [img.shape[1], img.shape[0]]


def test_convert_takes_the_tile_from_the_config_schema_default(tmp_path):
    import zarr

    src, _ = _tiff(tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"samples": "x.tsv", "classes": ["a", "b"], "static_classes": [],
                                   "scans": {"40x": {"crop_size": 80}}, "reference_scan": "40x"}))
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "s.ome.zarr"), "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert zarr.open_group(str(tmp_path / "s.ome.zarr"))["s0"].chunks[-1] == 512  # schema default convert.tile


def test_a_bad_config_value_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"samples": "x.tsv", "classes": ["a", "b"], "static_classes": [],
                                   "scans": {"40x": {"crop_size": 80}}, "reference_scan": "40x",
                                   "registration": {"ransac_threshold": -1}}))
    result = runner.invoke(app, ["register", "a.zarr", "b.zarr", "o.json", "o.png", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "registration.ransac_threshold" in result.output and str(cfg) in result.output
