"""Annotator study of seed 000 §4.1: inter- and intra-observer variability (Tables 2 and 3).

The paper had 48 test cells (eight of each of the six dynamic classes) labelled by three
annotators on the 20× SZP and the 40× EFI crops, on a scale of 11 labels (six stages + five
intermediates, see :mod:`cellstage.metrics.agreement` for how an intermediate is scored).
Annotator 1 labelled everything twice.

* **Table 2** (per scan): the intra-observer agreement of the annotator who labelled twice
  (round 1 vs round 2, the diagonal) and the inter-observer agreement of every pair of annotators
  (above the diagonal). Paper values, 20× SZP / 40× EFI, in %: A1 intra Top-1 45.8 / 66.6,
  Adj-1 Dyn 93.7 / 95.8, Adj-2 Dyn 97.9 / 100; A1-A2 Top-1 56.2 / 64.5; A1-A3 64.5 / 52.0;
  A2-A3 50.0 / 50.0. "The average Adjacent-2 Acc for the 20× SZP data is 88.1%, while for the
  40× EFI dataset, it is 94.4%" - the mean over the three inter-observer pairs (93.7, 87.5, 83.3
  and 93.7, 95.8, 93.7), written here as the ``inter_mean`` row.
* **Table 3** (per annotator): intra-observer agreement of one annotator across scan qualities
  (their labels of the same cells on the reference scan vs another scan). Paper, in %: A1 Top-1
  60.4, Adj-1 Dyn 93.7, Adj-2 Dyn 100; A2 58.3 / 79.1 / 89.5; A3 50.0 / 89.5 / 93.7.

Inputs: a tab-separated sheet (``workflow/schemas/annotators.schema.yaml``: ``annotator``,
``round``, ``scan``, ``labels``), one row per labels file; each labels file is a CSV (``.tsv``:
tab-separated) with columns ``cell`` and ``label``. Cells are matched across files by the shared
cell id, not by position: the paper's annotators labelled the *same crops* ("We ensured that
exactly the same cell images were labelled separately by each annotator"), so a crop id is what
the files share, and it also links a cell's 20× and 40× crops, which a position cannot without
the registration. A comparison uses the cells both files contain (its ``n``); two files without
a common cell are an error.

Which labels enter which comparison: the inter-observer cells and Table 3 use each annotator's
first round; the intra-observer cell compares the first round with each later round (the
Markdown shows the second). The first file of a pair (row annotator, first round, reference scan)
is the reference whose dynamic labels the Dynamic metrics count.

CSV values are fractions in [0, 1] (like ``cv_results.csv``); the Markdown shows percent with one
decimal, as the paper does.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import schema_path
from ..metrics import AGREEMENT_METRICS, AGREEMENT_NAMES, intermediate_scale, label_agreement
from ..metrics.agreement import DEFAULT_SEPARATOR
from ..taxonomy import Taxonomy
from ..utils import CellstageError, atomic_path, provenance, write_json

log = logging.getLogger(__name__)

SCHEMA_NAME = "annotators.schema.yaml"
TABLE2_COLUMNS = ("scan", "kind", "annotator_a", "round_a", "annotator_b", "round_b", "n", "n_dyn",
                  *AGREEMENT_METRICS)
TABLE3_COLUMNS = ("annotator", "round", "scan_a", "scan_b", "n", "n_dyn", *AGREEMENT_METRICS)
_INT_COLUMNS = ("round_a", "round_b", "round", "n", "n_dyn")


def _schema() -> dict:
    import yaml

    return yaml.safe_load((schema_path().parent / SCHEMA_NAME).read_text())


# --- reading ----------------------------------------------------------------------------------
def _check_row(schema: dict, row: pd.Series, where: str) -> int:
    """Check one sheet row against the schema's ``pattern``/``minLength``/``minimum`` (the rule
    environments carry no jsonschema; Snakemake validates the same schema when it builds the DAG);
    return its round."""
    for field, spec in schema["properties"].items():
        value = row.get(field, "")
        if value == "" and field not in schema["required"]:
            continue
        if spec.get("type") == "integer":
            try:
                value = int(value)
            except ValueError:
                raise CellstageError(f"{where}: field {field!r}: {value!r} is not an integer") from None
            if value < spec.get("minimum", value):
                raise CellstageError(f"{where}: field {field!r}: {value} is below the minimum {spec['minimum']}")
            continue
        if len(value) < spec.get("minLength", 0) or value == "":
            raise CellstageError(f"{where}: field {field!r} is empty ({spec['description']})")
        if "pattern" in spec and not re.match(spec["pattern"], value):
            raise CellstageError(f"{where}: field {field!r}: {value!r} does not match {spec['pattern']} "
                                 f"({spec['description']})")
    return int(row["round"])


def read_annotator_sheet(path: str | os.PathLike, scans: Sequence[str] | None = None) -> pd.DataFrame:
    """The validated sheet with a ``labels_path`` column (``labels`` resolved against the sheet's
    folder). Errors name the sheet, the row (line number) and the field."""
    path = Path(path)
    if not path.is_file():
        raise CellstageError(f"{path}: annotator sheet not found (config annotators.sheet)")
    schema = _schema()
    sheet = pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    sheet.columns = [str(c).strip() for c in sheet.columns]
    missing = [c for c in schema["required"] if c not in sheet.columns]
    if missing:
        raise CellstageError(
            f"{path}: missing column(s) {missing} (found {list(sheet.columns)}); the annotator sheet "
            f"needs the tab-separated columns {schema['required']} ({SCHEMA_NAME})"
        )
    if sheet.empty:
        raise CellstageError(f"{path}: the annotator sheet has no rows")
    rounds = [_check_row(schema, row, f"{path}: row {i + 2}") for i, row in sheet.iterrows()]  # line 1 = header
    sheet["round"] = rounds
    if scans is not None:
        unknown = sorted(set(sheet["scan"]) - set(scans))
        if unknown:
            raise CellstageError(
                f"{path}: field 'scan' has values {unknown} that are not keys of config 'scans' ({list(scans)})"
            )
    dup = sheet.duplicated(["annotator", "round", "scan"], keep=False)
    if dup.any():
        rows = [i + 2 for i in sheet.index[dup]]
        raise CellstageError(f"{path}: rows {rows} repeat the same (annotator, round, scan)")
    sheet["labels_path"] = [str(path.parent / p) if not Path(p).is_absolute() else p for p in sheet["labels"]]
    absent = [(i + 2, p) for i, p in zip(sheet.index, sheet["labels_path"]) if not Path(p).is_file()]
    if absent:
        raise CellstageError(
            f"{path}: field 'labels': file(s) not found (relative paths are relative to the sheet's folder): "
            + ", ".join(f"row {r}: {p}" for r, p in absent[:5])
        )
    return sheet


def read_labels(path: str | os.PathLike, scale: Taxonomy) -> pd.Series:
    """One labels file: class indices of ``scale`` indexed by cell id (str), in file order."""
    path = Path(path)
    if not path.is_file():
        raise CellstageError(f"{path}: labels file not found")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, comment="#")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CellstageError(f"{path}: cannot read labels table ({type(e).__name__}: {e})") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("cell", "label") if c not in table.columns]
    if missing:
        raise CellstageError(f"{path}: missing column(s) {missing} (found {list(table.columns)}); "
                             "a labels file needs columns 'cell' and 'label'")
    cells = table["cell"].str.strip()
    if (cells == "").any():
        rows = [i + 2 for i in table.index[cells == ""]]
        raise CellstageError(f"{path}: column 'cell' is empty in row(s) {rows[:5]}")
    if cells.duplicated().any():
        raise CellstageError(f"{path}: column 'cell' repeats ids {sorted(set(cells[cells.duplicated()]))[:5]}")
    index = {c: i for i, c in enumerate(scale.classes)}
    labels = table["label"].str.strip()
    bad = [(i + 2, v) for i, v in zip(table.index, labels) if v not in index]
    if bad:
        raise CellstageError(
            f"{path}: column 'label': unknown label(s) "
            + ", ".join(f"{v!r} (row {r})" for r, v in bad[:5])
            + f"; expected one of {list(scale.classes)}"
        )
    return pd.Series([index[v] for v in labels], index=pd.Index(cells, name="cell"), name=str(path))


# --- the study --------------------------------------------------------------------------------
def _compare(labels: Mapping, key_a: tuple, key_b: tuple, scale: Taxonomy, files: Mapping) -> dict:
    a, b = labels[key_a], labels[key_b]
    common = a.index[a.index.isin(b.index)]
    if len(common) == 0:
        raise CellstageError(f"{files[key_a]} and {files[key_b]}: no cell id in common (column 'cell'); "
                             "the files of one study must label the same cells")
    dropped = len(a) + len(b) - 2 * len(common)
    if dropped:
        log.warning("%s vs %s: %d cell(s) labelled in only one of the two files are left out",
                    files[key_a], files[key_b], dropped)
    return label_agreement(a.loc[common].to_numpy(), b.loc[common].to_numpy(), scale)


def _frame(rows: list[dict], columns: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    for c in _INT_COLUMNS:
        if c in df:
            df[c] = df[c].astype("Int64")
    return df


def annotator_study(
    sheet: pd.DataFrame,
    taxonomy: Taxonomy,
    scans: Sequence[str],
    reference_scan: str,
    separator: str = DEFAULT_SEPARATOR,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long-form Table 2 (``TABLE2_COLUMNS``) and Table 3 (``TABLE3_COLUMNS``) of a validated sheet."""
    scale = intermediate_scale(taxonomy, separator)
    files = {(r.annotator, int(r.round), r.scan): r.labels_path for r in sheet.itertuples()}
    labels = {key: read_labels(p, scale) for key, p in files.items()}
    annotators = list(dict.fromkeys(sheet["annotator"]))
    present = [s for s in scans if s in set(sheet["scan"])] + sorted(set(sheet["scan"]) - set(scans))

    def rounds(annotator, scan):
        return sorted(r for a, r, s in files if a == annotator and s == scan)

    t2: list[dict] = []
    for scan in present:
        inter = []
        for i, a in enumerate(annotators):
            ra = rounds(a, scan)
            if not ra:
                continue
            for later in ra[1:]:
                m = _compare(labels, (a, ra[0], scan), (a, later, scan), scale, files)
                t2.append(dict(scan=scan, kind="intra", annotator_a=a, round_a=ra[0], annotator_b=a,
                               round_b=later, **m))
            for b in annotators[i + 1:]:
                rb = rounds(b, scan)
                if rb:
                    m = _compare(labels, (a, ra[0], scan), (b, rb[0], scan), scale, files)
                    inter.append(m)
                    t2.append(dict(scan=scan, kind="inter", annotator_a=a, round_a=ra[0], annotator_b=b,
                                   round_b=rb[0], **m))
        if inter:
            t2.append(dict(scan=scan, kind="inter_mean",
                           **{k: float(np.mean([m[k] for m in inter])) for k in AGREEMENT_METRICS}))

    ref = reference_scan if reference_scan in present else present[0]
    t3: list[dict] = []
    for a in annotators:
        for other in present:
            if other == ref:
                continue
            common = sorted(set(rounds(a, ref)) & set(rounds(a, other)))
            if common:
                m = _compare(labels, (a, common[0], ref), (a, common[0], other), scale, files)
                t3.append(dict(annotator=a, round=common[0], scan_a=ref, scan_b=other, **m))
    return _frame(t2, TABLE2_COLUMNS), _frame(t3, TABLE3_COLUMNS)


# --- Markdown ---------------------------------------------------------------------------------
def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def table2_markdown(t2: pd.DataFrame, annotators: Sequence[str] | None = None) -> str:
    """Seed 000 Table 2 shape: per scan a block of columns (one per annotator), per annotator a
    block of rows (one per metric); the diagonal is intra-observer (round 1 vs 2), the upper
    triangle inter-observer, then the mean over the inter-observer pairs."""
    pairs = t2[t2["kind"] != "inter_mean"]
    if annotators is None:
        annotators = list(dict.fromkeys([*pairs["annotator_a"], *pairs["annotator_b"]]))
    scans = list(dict.fromkeys(t2["scan"]))
    cell = {}
    for r in pairs.itertuples():
        key = (r.scan, r.annotator_a, r.annotator_b)
        if key not in cell:  # intra: the first later round (round 2) is the one shown
            cell[key] = r
    header = ["", ""] + [f"{s} {b}" for s in scans for b in annotators]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, a in enumerate(annotators):
        if not any((s, a, b) in cell for s in scans for b in annotators):
            continue
        for k, metric in enumerate(AGREEMENT_METRICS):
            row = [a if k == 0 else "", AGREEMENT_NAMES[metric]]
            for s in scans:
                for j, b in enumerate(annotators):
                    if j < i:
                        row.append("")
                    elif (s, a, b) in cell:
                        row.append(_pct(getattr(cell[(s, a, b)], metric)))
                    else:
                        row.append("–")
            lines.append("| " + " | ".join(row) + " |")
    means = t2[t2["kind"] == "inter_mean"]
    notes = [
        f"- mean inter-observer ({r.scan}): "
        + ", ".join(f"{AGREEMENT_NAMES[m]} {_pct(getattr(r, m))}" for m in AGREEMENT_METRICS)
        for r in means.itertuples()
    ]
    ns = sorted({int(n) for n in pairs["n"].dropna()})
    title = ("Table 2. Inter- and intra-observer variability (%), per scan: diagonal = the same annotator "
             "in two rounds, above = two annotators (first rounds). Cells per comparison: "
             + (", ".join(map(str, ns)) or "none") + ".")
    return "\n".join([title, "", *lines, "", *notes]) + "\n"


def table3_markdown(t3: pd.DataFrame) -> str:
    """Seed 000 Table 3 shape: per annotator, agreement of their own labels across scan qualities."""
    header = ["Annotator", "Scans", *(AGREEMENT_NAMES[m] for m in AGREEMENT_METRICS), "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in t3.itertuples():
        vals = [_pct(getattr(r, m)) for m in AGREEMENT_METRICS]
        lines.append("| " + " | ".join([r.annotator, f"{r.scan_a} vs {r.scan_b}", *vals, str(r.n)]) + " |")
    title = "Table 3. Intra-observer variability across scan qualities (%), each annotator's first round."
    return "\n".join([title, "", *lines]) + "\n"


# --- stage entry point --------------------------------------------------------------------------
def _write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _write_csv(path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def run_annotator_study(
    sheet_path: str | os.PathLike,
    outputs: Mapping[str, str | os.PathLike],
    *,
    classes: Sequence[str],
    static_classes: Sequence[str],
    scans: Sequence[str],
    reference_scan: str,
    separator: str = DEFAULT_SEPARATOR,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the sheet and its labels files, write ``outputs`` (keys ``table2_csv``, ``table2_md``,
    ``table3_csv``, ``table3_md``, ``provenance``) and return the two long tables."""
    taxonomy = Taxonomy(classes=tuple(classes), static=tuple(static_classes))
    sheet = read_annotator_sheet(sheet_path, scans)
    log.info("annotator study: %d labels files, annotators %s", len(sheet), list(dict.fromkeys(sheet["annotator"])))
    t2, t3 = annotator_study(sheet, taxonomy, scans, reference_scan, separator)
    if t2.empty and t3.empty:
        log.warning("%s: nothing to compare (needs two annotators, two rounds or two scans)", sheet_path)
    annotators = list(dict.fromkeys(sheet["annotator"]))
    _write_csv(outputs["table2_csv"], t2)
    _write_text(outputs["table2_md"], table2_markdown(t2, annotators))
    _write_csv(outputs["table3_csv"], t3)
    _write_text(outputs["table3_md"], table3_markdown(t3))
    if "provenance" in outputs:
        settings = dict(classes=list(classes), static_classes=list(static_classes), scans=list(scans),
                        reference_scan=reference_scan, separator=separator)
        write_json(outputs["provenance"],
                   provenance(settings, [sheet_path, *sheet["labels_path"]]))
    return t2, t3
