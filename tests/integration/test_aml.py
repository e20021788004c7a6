"""The AML pipeline (seed 003) end to end on the tiny smear demo, in a temporary directory:
convert -> Level One -> Level Two -> grader -> Level Three -> MIL folds -> aml_report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_workflow import snakemake  # the same runner as the testis workflow test

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "pipelines": ["aml"],
    "grading": {"epochs": 1, "batch_size": 32},
    "aml": {
        "level_one": {"patch_size": 96, "blur_threshold": 50, "min_contrast": 8.0, "min_cell_area": 30,
                      "max_cell_area": 1200, "min_cells": 1, "max_cells": 20},
        "level_two": {"crop_size": 80},
        "mil": {"n_folds": 2, "bag_size": 8, "min_instances": 20, "max_bags_per_slide": 1,
                "max_patches_per_slide": 4, "batch_size": 2, "patch_batch_size": 8, "img_size": 32,
                "epochs": {"one": 1, "two": 1, "three": 1},
                # every level, and attention, in 3 configurations x 2 folds (CI budget: 2 MIL jobs fewer
                # than every level without attention plus Level Three with it)
                "grids": [{"task": ["npm1"], "level": ["one", "three"], "background": [False],
                           "backbone": ["resnet18"], "attention": [False]},
                          {"task": ["npm1"], "level": ["two"], "background": [False],
                           "backbone": ["resnet18"], "attention": [True]}]},
    },
}


@pytest.fixture(scope="module")
def aml_run(tmp_path_factory):
    from cellstage.demo.smear import generate_smear

    work = tmp_path_factory.mktemp("aml")
    sheet = generate_smear(work / "resources/smear", preset="smear-tiny", seed=0)
    config = dict(TINY, samples=str(sheet))
    (work / "config").mkdir()
    (work / "config/config.yaml").write_text((REPO / "config/config.yaml").read_text())
    (work / "aml.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(work, "--configfile", str(work / "aml.yaml"))
    return work


@pytest.mark.slow
def test_aml_pipeline_runs_every_level_the_mil_grid_and_the_report(aml_run):
    work = aml_run
    slides = pd.read_csv(work / "resources/smear/slides.tsv", sep="\t")
    l1 = pd.concat(pd.read_parquet(work / f"results/aml/level1/{s}.parquet") for s in slides["slide"])
    # every Level One reason occurs on the smear: blur, clutter (too large) and kept patches
    assert l1["kept"].any() and (l1["reason"] == "blur").any() and (l1["reason"] == "cell_too_large").any()
    red = pd.read_csv(work / "results/aml/report/reduction.csv")
    assert set(red["level"]) == {"Level One", "Level Two", "Level Three"}
    assert red["reduction_pct"].between(0, 100).all()
    three = red[(red["level"] == "Level Three") & (red["task"] == "npm1")]
    two = red[(red["level"] == "Level Two") & (red["task"] == "npm1")]
    assert int(three["n_images"].iat[0]) <= int(two["n_images"].iat[0])  # the grader only removes

    cv = pd.read_csv(work / "results/aml/report/cv_tables.csv")
    assert set(cv["level"]) == {"one", "two", "three"}
    folds = cv[cv["fold"].isin(["0", "1"])]
    assert folds["value"].notna().all() and len(folds) > 0
    md = (work / "results/aml/report/cv_tables.md").read_text()
    assert md.startswith("> Provenance: config")
    assert all(f"Level {n}" in md for n in ("One", "Two", "Three"))
    for metrics in (work / "results/aml/mil").rglob("metrics.json"):
        m = json.loads(metrics.read_text())
        assert m["history"] and 0 <= m["final"]["val_acc"] <= 1
    oof = pd.read_csv(work / "results/aml/report/out_of_fold.csv")
    assert sorted(oof["level"]) == ["one", "three", "two"] and (oof["folds"] == 2).all()
    assert oof["accuracy"].between(0, 1).all() and oof["auc"].dropna().between(0, 1).all()
    assert "Out-of-fold slide predictions" in md
    assert (work / "results/aml/report/accuracy_by_level.png").stat().st_size > 5000
    prov = json.loads((work / "results/aml/report/provenance.json").read_text())
    assert prov["config_hash"] and prov["inputs"]
    # nothing of the testis pipeline ran
    assert not (work / "results/finetune").exists()


@pytest.mark.slow
def test_aml_rerun_is_a_no_op_and_a_bad_label_is_named(aml_run, tmp_path):
    work = aml_run
    out = snakemake(work, "--configfile", str(work / "aml.yaml"), "-n")
    assert "Nothing to be done" in out.stdout + out.stderr
    sheet = pd.read_csv(work / "resources/smear/slides.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet.loc[0, "labels"] = sheet.loc[0, "labels"].replace("npm1=", "npm1=maybe_")
    bad = tmp_path / "bad.tsv"
    sheet.to_csv(bad, sep="\t", index=False)
    proc = snakemake(work, "--configfile", str(work / "aml.yaml"), "--config", f"samples={bad}", "-n", check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert sheet.loc[0, "slide"] in err and "labels" in err and "npm1" in err
