"""Annotation round trip (cellstage.report.roundtrip): export the most uncertain cells, let a
simulated annotator label them, import the labels back; the next run redoes only what they change.

The predictions are real: the cell tables come from the pipeline's own ``cell_table`` on the tiny
demo's nucleus masks and point annotations, and each of 3 folds fits a scikit-learn logistic
regression on the train slides' labelled cells (morphology + mean colour of the nucleus box read
from the slide) and predicts its held-out fold and the test slide, written with the columns of
``run_fold``'s predictions.parquet. (A CNN fold by ``run_fold`` would need crops of a segmented,
converted slide: minutes, not seconds, on 2 cores.) The annotator is the demo's ground truth
(``truth/<section>.json``: true class of every annotated point, whose labels carry 10 % noise).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from typer.testing import CliRunner

from cellstage.cells.morphology import cell_table
from cellstage.cli import app
from cellstage.io.annotations import read_points, read_polygons
from cellstage.report.roundtrip import export_uncertain, history_path, import_labels, reference_slides, uncertainty
from cellstage.taxonomy import DEFAULT_CLASSES
from cellstage.utils import CellstageError

REPO = Path(__file__).resolve().parents[2]
CLASSES = list(DEFAULT_CLASSES)
N_FOLDS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A workdir with the tiny demo, the reference slides' cell tables and 3 folds' predictions."""
    from cellstage.demo import generate

    root = tmp_path_factory.mktemp("roundtrip")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        generate(Path("resources/demo"), preset="tiny", seed=0)
    finally:
        os.chdir(cwd)
    sheet = pd.read_csv(root / "resources/demo/slides.tsv", sep="\t", dtype=str, keep_default_na=False)
    feats = {}
    for row in sheet[(sheet["scan"] == "40x") & (sheet["points"] != "")].itertuples():
        labels = tifffile.imread(root / row.masks)
        image = tifffile.imread(root / row.path)
        table, matched = cell_table(labels, read_polygons(root / row.tubules), mpp=float(row.mpp), slide=row.slide,
                                    points=read_points(root / row.points), match_radius_px=10, with_points=True)
        (root / "results/cells").mkdir(parents=True, exist_ok=True)
        table.to_parquet(root / f"results/cells/{row.slide}.parquet", index=False)
        matched.to_csv(root / f"results/cells/{row.slide}.points.csv", index=False)
        lab = table[table["label"] != ""].reset_index(drop=True)
        colour = np.array([image[max(int(r.bbox_y0), 0):int(r.bbox_y1) + 1, max(int(r.bbox_x0), 0):int(r.bbox_x1) + 1]
                           .reshape(-1, 3).mean(0) for r in lab.itertuples()])
        X = np.column_stack([colour, np.log1p(lab["area_px"]), lab["compactness"].fillna(0),
                             lab["distance_norm"].fillna(-0.5)])
        feats[row.slide] = (lab, X, row.split)
    _write_folds(root / "results/finetune/40x/bg/logreg/scratch/nodist", feats)
    return root


def _write_folds(exp_dir: Path, feats: dict) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = [(s, lab, X) for s, (lab, X, split) in feats.items() if split == "train"]
    test = [(s, lab, X) for s, (lab, X, split) in feats.items() if split == "test"]
    Xtr = np.vstack([X for _, _, X in train])
    ytr = np.concatenate([[CLASSES.index(c) for c in lab["label"]] for _, lab, _ in train])
    meta_tr = pd.concat([lab.assign(slide=s) for s, lab, _ in train], ignore_index=True)
    fold_of = np.random.default_rng(0).permutation(len(ytr)) % N_FOLDS
    for fold in range(N_FOLDS):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(Xtr[fold_of != fold], ytr[fold_of != fold])
        frames = []
        for split, parts in (("val", [("", meta_tr[fold_of == fold], Xtr[fold_of == fold])]),
                             ("test", [(s, lab.assign(slide=s), X) for s, lab, X in test])):
            for _, meta, X in parts:
                p = np.zeros((len(X), len(CLASSES)))
                p[:, model.classes_] = model.predict_proba(X)
                y = np.array([CLASSES.index(c) for c in meta["label"]])
                df = pd.DataFrame({"split": split, "fold": fold, "cell_id": meta["cell_id"].to_numpy(),
                                   "slide": meta["slide"].to_numpy(), "row": np.arange(len(meta)),
                                   "label_idx": y, "label": meta["label"].to_numpy(), "pred": p.argmax(1),
                                   "pred_label": [CLASSES[i] for i in p.argmax(1)]})
                for c, name in enumerate(CLASSES):
                    df[f"prob_{name}"] = p[:, c].astype(np.float32)
                frames.append(df)
        (exp_dir / f"fold{fold}").mkdir(parents=True, exist_ok=True)
        pd.concat(frames, ignore_index=True).to_parquet(exp_dir / f"fold{fold}/predictions.parquet", index=False)


def _copy(tiny: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(tiny, work)
    return work


def _sheet(work: Path) -> pd.DataFrame:
    return pd.read_csv(work / "resources/demo/slides.tsv", sep="\t", dtype=str, keep_default_na=False)


def _annotate_with_truth(src: Path, dst: Path, truth: dict) -> list[str]:
    """The simulated expert: each exported point gets the true class of the annotated point it lies on."""
    fc = json.loads(src.read_text())
    xy = np.array(truth["points"], dtype=float)
    true = []
    for f in fc["features"]:
        x, y = f["geometry"]["coordinates"]
        k = int(np.hypot(xy[:, 0] - x, xy[:, 1] - y).argmin())
        assert np.hypot(*(xy[k] - (x, y))) < 0.01  # a labelled cell is exported at its own point
        f["properties"]["classification"] = {"name": truth["true_labels"][k]}
        true.append(truth["true_labels"][k])
    dst.write_text(json.dumps(fc))
    return true


def test_uncertainty_measures():
    p = np.array([[1.0, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]])
    ent = uncertainty(p, "entropy")
    np.testing.assert_allclose(ent[:3], [0.0, np.log(2), np.log(3)])
    np.testing.assert_allclose(uncertainty(p, "margin"), [0.0, 1.0, 1.0, 0.7])
    with pytest.raises(CellstageError, match="entropy"):
        uncertainty(p, "variance")


def test_round_trip_relabels_exactly_the_exported_cells(tiny, tmp_path):
    work = _copy(tiny, tmp_path)
    sheet = _sheet(work)
    folds = sorted((work / "results/finetune/40x/bg/logreg/scratch/nodist").glob("fold*/predictions.parquet"))
    n = 20
    written = export_uncertain(folds, work / "uncertain", n=n, classes=CLASSES, cells_dir=work / "results/cells",
                               ref_slide_of=reference_slides(sheet, "40x"))
    assert written == {"sec03_40x": n}  # the test slide only (split test)
    out = json.loads((work / "uncertain/sec03_40x.geojson").read_text())
    props = [f["properties"] for f in out["features"]]
    # unclassified (an unreviewed point must not relabel anything); the prediction is a property
    assert all(p["objectType"] == "annotation" and "classification" not in p and p["predicted"] in CLASSES
               for p in props)
    assert all(p["name"] == f"cell {p['cell_id']}: {p['predicted']} {p['probability']:.2f}" for p in props)
    unc = [p["uncertainty"] for p in props]
    assert unc == sorted(unc, reverse=True) and [p["rank"] for p in props] == list(range(1, n + 1))
    # ... and they are the most uncertain of the fold ensemble: nothing left out is more uncertain
    ens = pd.concat([pd.read_parquet(f) for f in folds]).query("split == 'test'")
    mean = ens.groupby("cell_id")[[f"prob_{c}" for c in CLASSES]].mean()
    all_unc = pd.Series(uncertainty(mean.to_numpy(), "entropy"), index=mean.index)
    exported = {p["cell_id"] for p in props}
    assert all_unc.drop(list(exported)).max() <= min(unc) + 1e-6
    np.testing.assert_allclose(all_unc[[p["cell_id"] for p in props]], unc, atol=1e-5)

    points_path = work / sheet.set_index("slide").loc["sec03_40x", "points"]
    before = read_points(points_path)
    truth = json.loads((work / "resources/demo/truth/sec03.json").read_text())
    labelled = work / "labelled.geojson"
    true = _annotate_with_truth(work / "uncertain/sec03_40x.geojson", labelled, truth)
    when = dt.datetime(2026, 12, 2, 11, 0, tzinfo=dt.UTC)
    counts = import_labels(labelled, points_path, classes=CLASSES, annotator="sim-expert", now=when)

    after = read_points(points_path)
    assert len(after) == len(before) and counts["added"] == 0
    np.testing.assert_array_equal(after[["x", "y"]], before[["x", "y"]])
    xy = before[["x", "y"]].to_numpy()
    ex = np.array([f["geometry"]["coordinates"] for f in out["features"]])
    touched = {int(np.hypot(*(xy - e).T).argmin()) for e in ex}
    changed = set(np.flatnonzero(after["label"].to_numpy() != before["label"].to_numpy()).tolist())
    assert changed <= touched  # only exported cells change ...
    expected = {k for k in touched if truth["true_labels"][k] != before["label"][k]}
    assert changed == expected and len(changed) > 0  # ... exactly those whose label was wrong
    assert counts["relabelled"] == len(changed) and counts["unchanged"] == n - len(changed)
    assert all(after["label"][k] == truth["true_labels"][k] for k in touched)
    noisy = sum(a != b for a, b in zip(truth["true_labels"], truth["annotated_labels"]))
    print(f"round trip: {len(changed)} of {noisy} label errors among the {n} most uncertain of {len(before)} cells;"
          f" predicted class = true class for {sum(p['predicted'] == t for p, t in zip(props, true))}")

    hist = pd.read_csv(history_path(points_path), dtype=str, keep_default_na=False)
    assert len(hist) == len(changed)
    assert set(hist["point"].astype(int)) == changed and set(hist["action"]) == {"relabel"}
    assert set(hist["annotator"]) == {"sim-expert"} and set(hist["time"]) == {"2026-12-02T11:00:00+00:00"}
    for r in hist.itertuples():
        k = int(r.point)
        assert r.previous_label == before["label"][k] and r.new_label == truth["true_labels"][k]
        assert float(r.x) == pytest.approx(before["x"][k]) and r.cell_id != ""

    # a second import of the same file changes nothing, not even the file's time
    stat = points_path.stat().st_mtime_ns
    again = import_labels(labelled, points_path, classes=CLASSES, annotator="sim-expert")
    assert again["relabelled"] == again["added"] == 0 and again["unchanged"] == n
    assert points_path.stat().st_mtime_ns == stat
    assert len(pd.read_csv(history_path(points_path))) == len(changed)


def test_new_points_are_appended_and_bad_classes_refused(tmp_path):
    pts = tmp_path / "s.points.geojson"
    pts.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10.0, 10.0]},
         "properties": {"objectType": "annotation", "classification": {"name": "SC"}, "name": "keep me"}}]}))
    new = tmp_path / "new.geojson"
    new.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [11.0, 10.5]},
         "properties": {"classification": {"name": "P"}, "cell_id": 7}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [50.0, 60.0]},
         "properties": {"classification": {"name": "Spg"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [90.0, 90.0]}, "properties": {}},
    ]}))
    counts = import_labels(new, pts, classes=CLASSES, annotator="A")
    assert (counts["relabelled"], counts["added"], counts["unchanged"]) == (1, 1, 0)
    after = read_points(pts)
    assert after["label"].tolist() == ["P", "Spg"] and after[["x", "y"]].to_numpy().tolist() == [[10, 10], [50, 60]]
    assert json.loads(pts.read_text())["features"][0]["properties"]["name"] == "keep me"  # other properties kept
    hist = pd.read_csv(history_path(pts), keep_default_na=False)
    assert hist[["action", "previous_label", "new_label", "cell_id"]].astype(str).values.tolist() == [
        ["relabel", "SC", "P", "7"], ["add", "", "Spg", ""]]
    # CSV points files work the same way
    csv = tmp_path / "s.points.csv"
    csv.write_text("x,y,label,note\n10,10,SC,a\n")
    assert import_labels(new, csv, classes=CLASSES, annotator="A")["added"] == 1
    assert pd.read_csv(csv, keep_default_na=False).values.tolist() == [[10, 10, "P", "a"], [50, 60, "Spg", ""]]

    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]},
                                "properties": {"classification": {"name": "Spermatid"}}}]))
    with pytest.raises(CellstageError, match=r"bad.geojson.*feature 0.*'Spermatid'.*allowed classes.*'PMC'"):
        import_labels(bad, pts, classes=CLASSES, annotator="A")


def test_cli_export_and_import(tiny, tmp_path):
    work = _copy(tiny, tmp_path)
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["samples"] = "resources/demo/slides.tsv"
    (work / "config").mkdir()
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        res = runner.invoke(app, ["export-uncertain", "results/finetune/40x/bg/logreg/scratch/nodist", "out",
                                  "--n", "5", "--measure", "margin"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output) == {"sec03_40x": 5}
        res = runner.invoke(app, ["import-labels", "out/sec03_40x.geojson", "--slide", "sec03_40x",
                                  "--annotator", "model"])
        assert res.exit_code == 0, res.output
        # exported unclassified: importing it unreviewed changes nothing
        assert json.loads(res.output)["relabelled"] + json.loads(res.output)["unchanged"] == 0
        fc = json.loads(Path("out/sec03_40x.geojson").read_text())
        for f in fc["features"]:  # the annotator accepts every prediction
            f["properties"]["classification"] = {"name": f["properties"]["predicted"]}
        Path("out/reviewed.geojson").write_text(json.dumps(fc))
        res = runner.invoke(app, ["import-labels", "out/reviewed.geojson", "--slide", "sec03_40x",
                                  "--annotator", "model"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["relabelled"] + json.loads(res.output)["unchanged"] == 5
        res = runner.invoke(app, ["import-labels", "out/sec03_40x.geojson", "--slide", "sec04_40x",
                                  "--annotator", "model"])
        assert res.exit_code == 2 and "no 'points' file" in res.output
    finally:
        os.chdir(cwd)


def _dag_helpers():
    spec = importlib.util.spec_from_file_location("_dag", REPO / "tests/unit/test_workflow_dag.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_next_run_redoes_only_what_the_new_labels_change(tmp_path):
    dag = _dag_helpers()
    subprocess.run([sys.executable, "-m", "cellstage.demo", "resources/demo", "--preset", "tiny", "--seed", "0"],
                   cwd=tmp_path, check=True, capture_output=True)
    work = dag.workdir(tmp_path, tmp_path / "resources", dag.base_config())
    dag.finish(work)
    points = tmp_path / "resources/demo/annotations/sec03_40x.points.geojson"
    first = read_points(points).iloc[0]
    other = next(c for c in CLASSES if c != first["label"])
    fix = tmp_path / "fix.geojson"
    fix.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [first.x, first.y]},
                                "properties": {"classification": {"name": other}}}]))
    assert import_labels(fix, points, classes=CLASSES, annotator="A")["relabelled"] == 1

    out = dag.snakemake(work, "-n")
    counts = dag.job_counts(out)
    for rule in ("convert", "segment", "register", "train_segmenter", "train_grader", "pretrain"):
        assert counts[rule] == 0, counts
    assert dag.job_files(out, "cells") == ["results/cells/sec03_40x.parquet", "results/cells/sec03_40x.geojson",
                                           "results/cells/sec03_40x.points.csv"]
    crops = sorted(p for p in dag.job_files(out, "extract_crops") if p.endswith(".parquet"))
    assert crops == ["results/crops/sec03_20x.parquet", "results/crops/sec03_40x.parquet"]
    assert counts["map_cells"] == 1 and counts["finetune"] > 0 and counts["report"] == 1, counts
    print(f"after one relabel: {dict(counts)}")
