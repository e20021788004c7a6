"""Result tables: fold metrics -> mean ± std per configuration, best configuration, Markdown."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellstage.report import best_experiment, fold_table, markdown_table, summary_table
from cellstage.report.figures import confusion_figure, metric_boxplots

EXPERIMENTS = {
    "40x-bg-resnet18-scratch-nodist": {"scan": "40x", "init": "scratch"},
    "40x-bg-resnet18-simclr-nodist": {"scan": "40x", "init": "simclr"},
}


@pytest.fixture
def metric_files(tmp_path):
    paths = []
    for e, base in zip(EXPERIMENTS, (0.5, 0.6)):
        for k in range(3):
            p = tmp_path / e / f"fold{k}" / "metrics.json"
            p.parent.mkdir(parents=True)
            m = {s: {"top1": base + 0.01 * k, "top2": base + 0.2, "adj1": base + 0.25, "adj1_dyn": base + 0.3, "n": 10}
                 for s in ("val", "test")}
            p.write_text(json.dumps(m))
            paths.append(p)
    return paths


def test_summary_is_mean_and_std_over_folds(metric_files):
    folds = fold_table(metric_files, EXPERIMENTS)
    assert len(folds) == 2 * 3 * 2
    summary = summary_table(folds).set_index("experiment")
    row = summary.loc["40x-bg-resnet18-scratch-nodist"]
    assert row["val_top1_mean"] == pytest.approx(0.51)
    assert row["val_top1_std"] == pytest.approx(np.std([0.50, 0.51, 0.52], ddof=1))
    assert row["n_folds"] == 3
    assert row["init"] == "scratch"


def test_best_experiment_is_chosen_on_validation(metric_files):
    summary = summary_table(fold_table(metric_files, EXPERIMENTS))
    assert best_experiment(summary, "top1", "val") == "40x-bg-resnet18-simclr-nodist"


def test_markdown_table_shows_percentages(metric_files):
    summary = summary_table(fold_table(metric_files, EXPERIMENTS))
    md = markdown_table(summary, best="40x-bg-resnet18-simclr-nodist")
    assert "| Configuration | val Top-1 |" in md
    assert "61.0 ± 1.0" in md and "**(best)**" in md


def test_missing_split_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "x" / "fold0" / "metrics.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"val": {"top1": 1}}))
    with pytest.raises(ValueError, match="metrics.json"):
        fold_table([p], {})


def test_figures_are_written(metric_files, tmp_path):
    folds = fold_table(metric_files, EXPERIMENTS)
    metric_boxplots(folds, tmp_path / "box.png", chance=1 / 8)
    cm = confusion_figure([0, 1, 1, 2], [0, 1, 2, 2], ["a", "b", "c"], tmp_path / "cm.png")
    assert (tmp_path / "box.png").stat().st_size > 1000
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
