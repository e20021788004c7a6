"""Annotator study of seed 000 §4.1 (Tables 2-3): 11-label scale, Adj-k Dyn, tables, bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellstage.demo import PRESETS, generate
from cellstage.demo.annotators import simulate_labels, write_annotator_study
from cellstage.metrics import (
    adjacent_k_dynamic_accuracy,
    intermediate_scale,
    label_agreement,
)
from cellstage.report.annotators import (
    TABLE2_COLUMNS,
    TABLE3_COLUMNS,
    annotator_study,
    read_annotator_sheet,
    run_annotator_study,
    table2_markdown,
)
from cellstage.taxonomy import Taxonomy
from cellstage.utils import CellstageError

TAX = Taxonomy()  # PMC, SC, Spg Ad, Spg, Pl-Z, P, rsptd, esptd; static PMC, SC
SCALE = intermediate_scale(TAX)
IDX = {c: i for i, c in enumerate(SCALE.classes)}
SCANS = ["40x", "20x"]


def _idx(names):
    return np.array([IDX[n] for n in names])


def test_scale_has_six_stages_and_five_intermediates():
    assert SCALE.dynamic == ("Spg Ad", "Spg Ad/Spg", "Spg", "Spg/Pl-Z", "Pl-Z", "Pl-Z/P", "P", "P/rsptd",
                             "rsptd", "rsptd/esptd", "esptd")
    assert SCALE.static == ("PMC", "SC")
    assert SCALE.n_classes == 13
    assert intermediate_scale(TAX, " | ").dynamic[1] == "Spg Ad | Spg"
    with pytest.raises(ValueError, match="separator"):
        intermediate_scale(TAX, "")


@pytest.mark.parametrize(
    "a, b, top1, adj1, adj2",
    [
        ("Spg", "Spg", 1, 1, 1),
        ("Spg", "Spg/Pl-Z", 0, 1, 1),  # an intermediate is one step from either neighbour
        ("Pl-Z", "Spg/Pl-Z", 0, 1, 1),
        ("Spg/Pl-Z", "Spg", 0, 1, 1),
        ("Spg", "Pl-Z", 0, 0, 1),  # neighbouring stages: two steps, Adj-2 Dyn only
        ("Spg Ad/Spg", "Spg/Pl-Z", 0, 0, 1),  # consecutive intermediates
        ("Spg", "Pl-Z/P", 0, 0, 0),  # three steps
        ("Spg Ad", "P", 0, 0, 0),
        ("esptd", "rsptd/esptd", 0, 1, 1),  # end of the sequence
        ("esptd", "rsptd", 0, 0, 1),
    ],
)
def test_intermediate_labels_are_scored_by_steps_on_the_eleven_label_scale(a, b, top1, adj1, adj2):
    m = label_agreement(_idx([a]), _idx([b]), SCALE)
    assert (m["top1"], m["adj1_dyn"], m["adj2_dyn"]) == (top1, adj1, adj2)


def test_static_classes_must_match_exactly_and_dynamic_metrics_skip_them():
    a = _idx(["PMC", "SC", "PMC", "Spg", "Spg", "P"])
    b = _idx(["PMC", "PMC", "Spg Ad", "SC", "Spg/Pl-Z", "P"])
    m = label_agreement(a, b, SCALE)
    assert m["n"] == 6 and m["n_dyn"] == 3  # reference (a) labels Spg, Spg, P are dynamic
    assert m["top1"] == pytest.approx(2 / 6)  # PMC=PMC, P=P
    # Spg vs SC: a dynamic cell labelled static is a miss even for Adj-2; Spg vs Spg/Pl-Z hits
    assert m["adj1_dyn"] == pytest.approx(2 / 3)
    assert m["adj2_dyn"] == pytest.approx(2 / 3)
    static_only = label_agreement(_idx(["PMC", "SC"]), _idx(["PMC", "PMC"]), SCALE)
    assert static_only["top1"] == 0.5 and np.isnan(static_only["adj1_dyn"]) and static_only["n_dyn"] == 0


def test_adj2_dyn_on_eleven_labels_is_adj1_dyn_on_the_six_classes():
    """Seed 000: Adj-2 Dyn is 'similar to the previous Adjacent-1 Dynamic Acc on six classes'."""
    rng = np.random.default_rng(0)
    dyn = list(TAX.dynamic)
    a6 = rng.integers(0, 6, 300)
    b6 = np.clip(a6 + rng.integers(-3, 4, 300), 0, 5)
    to8 = {c: i for i, c in enumerate(TAX.classes)}
    m = label_agreement(_idx([dyn[i] for i in a6]), _idx([dyn[i] for i in b6]), SCALE)
    ref = adjacent_k_dynamic_accuracy([to8[dyn[i]] for i in a6], [to8[dyn[i]] for i in b6], TAX, 1)
    assert m["adj2_dyn"] == pytest.approx(ref)
    assert m["adj1_dyn"] == pytest.approx(m["top1"])  # no intermediates: one step is never a stage
    assert 0 < m["top1"] < m["adj2_dyn"] < 1


# --- tables -------------------------------------------------------------------------------------
def _truths(n_per_class: int, seed: int = 0) -> list[dict]:
    """One test section whose cells cover every dynamic class ``n_per_class`` times."""
    dyn = list(TAX.dynamic)
    labels = [c for c in dyn for _ in range(n_per_class)]
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1000, (len(labels), 2)).round(2).tolist()
    hm = [[0.5, 0.0, 3.0], [0.0, 0.5, -2.0], [0.0, 0.0, 1.0]]
    return [{"section": "s1", "split": "test", "cell_ids": list(range(1, len(labels) + 1)), "points": pts,
             "true_labels": labels, "homography_40x_to_20x": hm},
            {"section": "s2", "split": "train", "cell_ids": [1], "points": [[1.0, 1.0]],
             "true_labels": ["Spg"], "homography_40x_to_20x": hm}]


def _study(tmp_path, **preset):
    cfg = dataclasses.replace(PRESETS["tiny"], **preset)
    sheet = write_annotator_study(tmp_path, cfg, 0, _truths(preset.get("annotator_cells_per_class", 8)))
    return sheet, annotator_study(read_annotator_sheet(sheet, SCANS), TAX, SCANS, "40x")


def test_tables_have_the_paper_shapes(tmp_path):
    sheet, (t2, t3) = _study(tmp_path)
    rows = pd.read_csv(sheet, sep="\t")
    assert len(rows) == 2 * 4  # A1 twice, A2, A3 on both scans
    assert tuple(t2.columns) == TABLE2_COLUMNS and tuple(t3.columns) == TABLE3_COLUMNS
    for scan in SCANS:
        s = t2[t2["scan"] == scan]
        assert list(s["kind"]) == ["intra", "inter", "inter", "inter", "inter_mean"]
        pairs = s[s["kind"] != "inter_mean"]
        assert list(zip(pairs["annotator_a"], pairs["annotator_b"])) == [("A1", "A1"), ("A1", "A2"),
                                                                         ("A1", "A3"), ("A2", "A3")]
        assert list(pairs["round_b"]) == [2, 1, 1, 1] and (pairs["n"] == 48).all()
        mean = s[s["kind"] == "inter_mean"].iloc[0]
        assert mean["adj2_dyn"] == pytest.approx(pairs[pairs["kind"] == "inter"]["adj2_dyn"].mean())
    assert list(t3["annotator"]) == ["A1", "A2", "A3"]
    assert (t3["scan_a"] == "40x").all() and (t3["scan_b"] == "20x").all() and (t3["n"] == 48).all()
    for t in (t2, t3):
        vals = t[["top1", "adj1_dyn", "adj2_dyn"]].to_numpy()
        assert ((vals >= 0) & (vals <= 1)).all()
        assert (t["top1"] <= t["adj1_dyn"]).all() and (t["adj1_dyn"] <= t["adj2_dyn"]).all()
    md = table2_markdown(t2, ["A1", "A2", "A3"]).splitlines()
    table = [line for line in md if line.startswith("|")]
    assert table[0].split("|")[3:-1] == [f" {s} {a} " for s in SCANS for a in ("A1", "A2", "A3")]
    assert len(table) == 2 + 2 * 3  # header, rule, rows of A1 and A2 (A3 has no cell right of its diagonal)
    a2_top1 = table[5].split("|")[1:-1]
    # A2's row: nothing below the diagonal, "–" on it (A2 labelled once)
    assert a2_top1[0].strip() == "A2" and a2_top1[2].strip() == "" and a2_top1[3].strip() == "–"


def test_perfect_agreement_gives_100(tmp_path):
    sheet, (t2, t3) = _study(tmp_path, annotators=(("A1", 0.0, 2), ("A2", 0.0, 1)), annotator_ambiguity=0.0)
    for t in (t2, t3):
        assert (t[["top1", "adj1_dyn", "adj2_dyn"]] == 1.0).all().all()
    out = {k: tmp_path / "out" / f"{k}.txt" for k in ("table2_csv", "table2_md", "table3_csv", "table3_md")}
    run_annotator_study(sheet, out, classes=TAX.classes, static_classes=TAX.static, scans=SCANS,
                        reference_scan="40x")
    assert "| A1 | Top-1 | 100.0 | 100.0 | 100.0 | 100.0 |" in out["table2_md"].read_text()
    assert "| A2 | 40x vs 20x | 100.0 | 100.0 | 100.0 | 48 |" in out["table3_md"].read_text()
    assert pd.read_csv(out["table2_csv"])["top1"].eq(1.0).all()


def test_noisier_annotator_agrees_less():
    rng = np.random.default_rng(1)
    truth = 2 * rng.integers(0, 6, 2000)
    agree = {noise: label_agreement(truth + 2, simulate_labels(rng, truth, noise, 11) + 2, SCALE)
             for noise in (0.0, 0.5, 1.5)}  # + 2: dynamic positions start after PMC, SC
    assert agree[0.0]["top1"] == 1.0
    for m in ("top1", "adj1_dyn", "adj2_dyn"):
        assert agree[0.0][m] >= agree[0.5][m] > agree[1.5][m]


def test_noisier_simulated_annotator_agrees_less_with_the_truth_in_the_study(tmp_path):
    _, (t2, t3) = _study(tmp_path, annotators=(("T", 0.0, 1), ("low", 0.4, 1), ("high", 1.5, 1)),
                         annotator_ambiguity=0.0, annotator_cells_per_class=40)
    for scan in SCANS:
        s = t2[(t2["scan"] == scan) & (t2["annotator_a"] == "T")].set_index("annotator_b")
        for m in ("top1", "adj1_dyn", "adj2_dyn"):
            assert s.loc["low", m] > s.loc["high", m], (scan, m, s)
    t3 = t3.set_index("annotator")
    assert t3.loc["T", "top1"] == 1.0 and t3.loc["low", "top1"] > t3.loc["high", "top1"]


def test_demo_writes_the_study_without_changing_its_other_files(tmp_path, monkeypatch):
    for run, extra in (("with", {}), ("without", {"annotators": ()})):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)  # the same relative paths in both slides.tsv
        generate("demo", "tiny", seed=0, **extra)
    a, b = ({p.relative_to(tmp_path / run / "demo") for p in (tmp_path / run / "demo").rglob("*") if p.is_file()}
            for run in ("with", "without"))
    added = a - b
    assert b < a and {p.parts[0] for p in added} == {"annotators", "annotators.tsv"} and len(added) == 9
    for rel in b:
        assert (tmp_path / "with/demo" / rel).read_bytes() == (tmp_path / "without/demo" / rel).read_bytes(), rel
    monkeypatch.chdir(tmp_path / "with/demo")
    t2, t3 = annotator_study(read_annotator_sheet("annotators.tsv", SCANS), TAX, SCANS, "40x")
    assert set(t2["scan"]) == set(SCANS) and len(t3) == 3
    first = pd.read_csv("annotators/A1_r1_40x.csv")
    assert list(first.columns) == ["cell", "section", "x", "y", "label"] and first["cell"].is_unique
    assert set(first["label"]) <= set(SCALE.dynamic)


# --- bad input ------------------------------------------------------------------------------------
def _write_sheet(tmp_path, text: str) -> Path:
    (tmp_path / "a.csv").write_text("cell,label\nc1,Spg\nc2,Spg/Pl-Z\n")
    sheet = tmp_path / "annotators.tsv"
    sheet.write_text(text)
    return sheet


def test_misspelled_sheet_column_names_the_file_and_the_column(tmp_path):
    sheet = _write_sheet(tmp_path, "anotator\tround\tscan\tlabels\nA1\t1\t40x\ta.csv\n")
    with pytest.raises(CellstageError, match=r"annotators\.tsv: missing column\(s\) \['annotator'\]"):
        read_annotator_sheet(sheet, SCANS)


@pytest.mark.parametrize(
    "row, match",
    [
        ("A1\tone\t40x\ta.csv", r"row 2: field 'round': 'one' is not an integer"),
        ("A1\t0\t40x\ta.csv", r"row 2: field 'round': 0 is below the minimum 1"),
        ("A 1\t1\t40x\ta.csv", r"row 2: field 'annotator': 'A 1' does not match"),
        ("A1\t1\t10x\ta.csv", r"field 'scan' has values \['10x'\]"),
        ("A1\t1\t40x\tmissing.csv", r"field 'labels': file\(s\) not found .*row 2: .*missing\.csv"),
    ],
)
def test_bad_sheet_row_names_the_file_row_and_field(tmp_path, row, match):
    sheet = _write_sheet(tmp_path, f"annotator\tround\tscan\tlabels\n{row}\n")
    with pytest.raises(CellstageError, match=match) as e:
        read_annotator_sheet(sheet, SCANS)
    assert str(sheet) in str(e.value)


def test_missing_sheet_and_duplicate_rows_are_errors(tmp_path):
    with pytest.raises(CellstageError, match="annotator sheet not found"):
        read_annotator_sheet(tmp_path / "nope.tsv", SCANS)
    sheet = _write_sheet(tmp_path, "annotator\tround\tscan\tlabels\nA1\t1\t40x\ta.csv\nA1\t1\t40x\ta.csv\n")
    with pytest.raises(CellstageError, match=r"rows \[2, 3\] repeat the same \(annotator, round, scan\)"):
        read_annotator_sheet(sheet, SCANS)


def test_unknown_label_names_the_file_the_field_and_the_value(tmp_path):
    sheet = _write_sheet(tmp_path, "annotator\tround\tscan\tlabels\nA1\t1\t40x\ta.csv\nA2\t1\t40x\tb.csv\n")
    (tmp_path / "b.csv").write_text("cell,label\nc1,Spg\nc2,Spg-Pl-Z\n")
    with pytest.raises(CellstageError, match=r"b\.csv: column 'label': unknown label\(s\) 'Spg-Pl-Z' \(row 3\)"):
        annotator_study(read_annotator_sheet(sheet, SCANS), TAX, SCANS, "40x")
    (tmp_path / "b.csv").write_text("cell,lable\nc1,Spg\n")
    with pytest.raises(CellstageError, match=r"b\.csv: missing column\(s\) \['label'\]"):
        annotator_study(read_annotator_sheet(sheet, SCANS), TAX, SCANS, "40x")
    (tmp_path / "b.csv").write_text("cell,label\nx1,Spg\n")
    with pytest.raises(CellstageError, match="no cell id in common"):
        annotator_study(read_annotator_sheet(sheet, SCANS), TAX, SCANS, "40x")


def test_sheet_schema_matches_what_the_workflow_validates(tmp_path):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(Path(__file__).resolve().parents[2] / "workflow/schemas/annotators.schema.yaml")
    good = pd.DataFrame({"annotator": ["A1"], "round": [1], "scan": ["40x"], "labels": ["a.csv"]})
    validate(good, schema)
    with pytest.raises(WorkflowError, match="annotator"):
        validate(good.rename(columns={"annotator": "anotator"}), schema)
