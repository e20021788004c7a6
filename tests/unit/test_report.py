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
    """Experiments with their fold metric files, in folders whose names say nothing (the report
    must take names from the mapping, not from paths)."""
    out = {}
    for i, (e, base) in enumerate(zip(EXPERIMENTS, (0.5, 0.6))):
        paths = []
        for k in range(3):
            p = tmp_path / f"run{i}" / f"f{k}" / "metrics.json"
            p.parent.mkdir(parents=True)
            m = {s: {"top1": base + 0.01 * k, "top2": base + 0.2, "adj1": base + 0.25, "adj1_dyn": base + 0.3, "n": 10}
                 for s in ("val", "test")}
            p.write_text(json.dumps({**m, "fold": k}))
            paths.append(p)
        out[e] = {**EXPERIMENTS[e], "metrics": paths}
    return out


def test_summary_is_mean_and_std_over_folds(metric_files):
    folds = fold_table(metric_files)
    assert len(folds) == 2 * 3 * 2
    summary = summary_table(folds).set_index("experiment")
    row = summary.loc["40x-bg-resnet18-scratch-nodist"]
    assert row["val_top1_mean"] == pytest.approx(0.51)
    assert row["val_top1_std"] == pytest.approx(np.std([0.50, 0.51, 0.52], ddof=1))
    assert row["n_folds"] == 3
    assert row["init"] == "scratch"


def test_best_experiment_is_chosen_on_validation(metric_files):
    summary = summary_table(fold_table(metric_files))
    assert best_experiment(summary, "top1", "val") == "40x-bg-resnet18-simclr-nodist"


def test_markdown_table_shows_percentages(metric_files):
    summary = summary_table(fold_table(metric_files))
    md = markdown_table(summary, best="40x-bg-resnet18-simclr-nodist")
    assert "| Configuration | init | val Top-1 |" in md  # init (and recipe, when given) beside the name
    assert "61.0 ± 1.0" in md and "**(best)**" in md


def test_missing_split_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "x" / "fold0" / "metrics.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"val": {"top1": 1}, "fold": 0}))
    with pytest.raises(ValueError, match="metrics.json"):
        fold_table({"x": {"metrics": [p]}})


def test_backbone_names_with_dashes_stay_whole(metric_files):
    name = "40x-bg-vit_small_patch8-in21k-scratch-nodist"
    exps = {name: {**metric_files["40x-bg-resnet18-scratch-nodist"], "backbone": "vit_small_patch8-in21k"}}
    folds = fold_table(exps)
    assert set(folds["experiment"]) == {name} and set(folds["backbone"]) == {"vit_small_patch8-in21k"}
    assert sorted(set(folds["fold"])) == [0, 1, 2]


def test_fold_ensemble_averages_probabilities_and_exports_qupath(tmp_path):
    import pandas as pd

    from cellstage.report.ensemble import export_qupath, fold_ensemble

    paths = []
    for k, p_a in enumerate((0.9, 0.2)):  # fold 0 says class a, fold 1 says class b: mean 0.55 -> a
        df = pd.DataFrame({"split": ["test", "val"], "slide": ["s1", "s1"], "cell_id": [7, 8], "label_idx": [0, 1],
                           "prob_a": [p_a, 0.5], "prob_b": [1 - p_a, 0.5]})
        paths.append(tmp_path / f"p{k}.parquet")
        df.to_parquet(paths[-1])
    ens = fold_ensemble(paths)
    assert len(ens) == 1 and ens["prob_a"].iloc[0] == pytest.approx(0.55) and ens["pred"].iloc[0] == 0
    cells = pd.DataFrame({"cell_id": [7, 9], "centroid_x": [10.0, 20.0], "centroid_y": [5.0, 6.0]})
    cells.to_parquet(tmp_path / "s1.parquet")
    n = export_qupath(ens, {"s1": tmp_path / "s1.parquet"}, {"s1": 0.25}, ["a", "b"], tmp_path / "qupath")
    assert n == {"s1": 1}
    feature = json.loads((tmp_path / "qupath" / "s1.geojson").read_text())["features"][0]
    assert feature["properties"]["classification"]["name"] == "a"
    assert feature["geometry"]["coordinates"] == [10.0, 5.0]


def test_figures_are_written(metric_files, tmp_path):
    folds = fold_table(metric_files)
    metric_boxplots(folds, tmp_path / "box.png", chance=1 / 8)
    cm = confusion_figure([0, 1, 1, 2], [0, 1, 2, 2], ["a", "b", "c"], tmp_path / "cm.png")
    assert (tmp_path / "box.png").stat().st_size > 1000
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
