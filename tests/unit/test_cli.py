"""The command-line tool runs stages outside Snakemake and reports bad input clearly."""

from __future__ import annotations

from typer.testing import CliRunner

from cellstage.cli import app

runner = CliRunner()


def test_every_stage_has_a_command():
    out = runner.invoke(app, ["--help"]).output
    for command in ("convert", "train-segmenter", "segment", "cells", "register", "crops", "train-grader",
                    "grade", "pretrain", "finetune", "demo"):
        assert command in out


def test_info_on_a_text_file_exits_nonzero_naming_the_file(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 2
    assert "notes.svs" in result.output


def test_convert_then_info_round_trip(tmp_path):
    import numpy as np

    from cellstage.demo import write_pyramid_tiff

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(600, 700, 3), dtype=np.uint8)
    src = tmp_path / "s.tiff"
    write_pyramid_tiff(src, img, 0.25)
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "s.ome.zarr")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["info", str(tmp_path / "s.ome.zarr")])
    assert result.exit_code == 0, result.output
    assert '"mpp": 0.25' in result.output
