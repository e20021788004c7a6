"""config/paper.yaml is seed 000's grid: 30 pretraining runs, 132 configurations x 5 folds = 660 jobs.

Dry runs only (Snakemake builds the DAG on the tiny demo sheet; ~10 s each). The derivation of the
numbers is docs/paper-grid.md.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_workflow_dag import REPO, base_config, demo, job_counts, job_files, snakemake  # noqa: F401

from cellstage.config import validate_config
from cellstage.train.grid import experiments
from cellstage.utils import CellstageError

PAPER = REPO / "config/paper.yaml"
WEIGHTS = ("resnet18", "resnet50", "resnet101")


def paper_workdir(tmp_path: Path, demo: Path, weights: bool = True) -> Path:  # noqa: F811
    """A workdir like the repository's: config/config.yaml (the demo's, on the tiny sheet) + resources."""
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    (work / "resources").mkdir()
    (work / "resources/demo").symlink_to(demo / "demo")
    (work / "config/config.yaml").write_text(yaml.safe_dump(base_config(), sort_keys=False))
    if weights:  # stand-ins: a dry run only checks that the configured files exist
        paper = yaml.safe_load(PAPER.read_text())
        for path in paper["finetune"]["imagenet_weights"].values():
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            (work / path).touch()
    return work


def test_paper_yaml_dry_run_lists_30_pretraining_runs_and_660_finetuning_jobs(tmp_path, demo):  # noqa: F811
    work = paper_workdir(tmp_path, demo)
    # as in the docs: the paper's config merged over the workflow's config/config.yaml
    out = snakemake(work, "-n", "--configfile", str(PAPER))
    counts = job_counts(out)
    assert counts["pretrain"] == 30
    assert counts["finetune"] == 660

    metrics = [p for p in job_files(out, "finetune") if p.endswith("/metrics.json")]
    configs = {tuple(p.split("/")[2:7]) for p in metrics}  # scan, bg, backbone, init, dist
    assert len(metrics) == 660 and len(configs) == 132
    per_config = Counter(tuple(p.split("/")[2:7]) for p in metrics)
    assert set(per_config.values()) == {5}
    by_init = Counter(c[3] for c in configs)
    assert by_init == {"scratch": 48, "imagenet": 24, "simclr": 24, "dino": 24, "mae": 12}
    assert {c[2] for c in configs if c[3] == "imagenet"} == set(WEIGHTS)
    assert {c[2] for c in configs if c[3] == "mae"} == {b for b in {c[2] for c in configs} if b.startswith("vit")}
    assert {c[1] for c in configs if c[3] in ("simclr", "dino", "mae")} == {"bg"}  # SSL: with background only
    assert {c[0] for c in configs} == {"40x", "20x"} and {c[4] for c in configs} == {"dist", "nodist"}

    runs = {tuple(p.split("/")[2:5]) for p in job_files(out, "pretrain") if p.endswith("backbone.safetensors")}
    assert len(runs) == 30  # (method, backbone, scan)
    assert Counter(r[0] for r in runs) == {"simclr": 12, "dino": 12, "mae": 6}


def test_paper_yaml_without_the_imagenet_files_stops_at_start_up_naming_the_key(tmp_path, demo):  # noqa: F811
    work = paper_workdir(tmp_path, demo, weights=False)
    missing = r"finetune.imagenet_weights.resnet18: resources/weights/\S+ does not exist"
    with pytest.raises(AssertionError, match=missing):
        snakemake(work, "-n", "--configfile", str(PAPER))


# ------------------------------------------------------------------ grids without Snakemake
def paper_finetune(tmp_path, monkeypatch) -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config.update(yaml.safe_load(PAPER.read_text()))
    config = validate_config(config)
    monkeypatch.chdir(tmp_path)
    for path in config["finetune"]["imagenet_weights"].values():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).touch()
    return config


def test_grids_are_a_union_of_cross_products_without_duplicates(tmp_path, monkeypatch):
    config = paper_finetune(tmp_path, monkeypatch)
    ft = config["finetune"]
    exps = experiments(ft, config["scans"])
    assert len(exps) == 132
    doubled = dict(ft, grids=ft["grids"] + [copy.deepcopy(ft["grids"][0])])
    assert list(experiments(doubled, config["scans"])) == list(exps)
    # grids replace grid; without grids, grid alone is the cross product
    only_grid = dict(ft, grids=[])
    grid = ft["grid"]
    n = len(grid["scan"]) * len(grid["background"]) * len(grid["backbone"]) * len(grid["init"]) * len(grid["distance"])
    assert len(experiments(only_grid, config["scans"])) == n
    with pytest.raises(CellstageError, match=r"finetune.grids\[0\]: init 'mae' needs a ViT backbone"):
        experiments(dict(ft, grids=[dict(ft["grids"][0], init=["mae"])]), config["scans"])


def test_paper_yaml_states_the_papers_recipe_numbers(tmp_path, monkeypatch):
    ft = paper_finetune(tmp_path, monkeypatch)["finetune"]
    assert ft["n_folds"] == 5 and ft["batch_size"] == 128
    assert ft["recipes"]["baseline"] == {"epochs": 100, "lr": 1e-3, "lr_vit_small_base": 1e-4}
    assert ft["recipes"]["pretrained"] == {"epochs": 30, "lr": 1e-4, "backbone_lr_start": 1e-6, "hold_until_epoch": 22}
