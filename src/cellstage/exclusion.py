"""Degrade, don't block (issue 15 item 4): a slide that fails is excluded downstream, not fatal.

With config ``require_all_slides: true`` (the default) a failing per-slide stage fails its job with
a non-zero exit, as before, and the report waits for every slide. With ``require_all_slides:
false`` the per-slide stages (convert, segment, cells, register, map_cells, extract_crops, grade,
AML Levels One to Three) instead:

* write an **exclusion marker** at each of their outputs: a directory output becomes a folder that
  holds only ``cellstage-excluded.json`` (no ``.zattrs``/``zarr.json``: no reader takes it for a
  store), a file output holds the JSON record ``{"cellstage_excluded": {...}}`` (a parquet, CSV or
  PNG reader fails on it loudly, never reads it as data);
* give the record the slide, the rule, the error and the log, and the **cause**: the first stage
  that failed for this slide (a 20x scan whose reference scan did not convert is excluded "via"
  the reference's error);
* exit 0, so ``snakemake`` goes on; a stage whose input is a marker writes markers in turn
  without running.

Aggregating stages (segmenter and grader training, pretraining, probes, fine-tuning, the reports)
call :func:`drop_excluded`: marker inputs (and the user files paired with them, e.g. a slide's
grade sheet) are dropped, and the records are returned, so the report lists each excluded slide
with its error (``results/report/excluded.csv``; :func:`exclusion_table`). The Snakefile's
``onsuccess`` prints the same list. Fixing the slide (a newer file, or ``--forcerun``) reruns it:
a marker is an ordinary output to snakemake.

With ``require_all_slides: true`` a marker left by an earlier degrading run is refused with the
record's error and what to do, so a run that must cover every slide never silently skips one.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .utils import CellstageError, redirect_output

log = logging.getLogger("cellstage.exclusion")

MARKER = "cellstage-excluded.json"
KEY = "cellstage_excluded"
_MAGIC = b'{"' + KEY.encode() + b'"'
COLUMNS = ["slide", "failed_rule", "failed_slide", "error", "log"]


def _paths(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def read_marker(path: str | Path) -> dict | None:
    """The exclusion record at ``path`` (a marker folder or file), or None for a real output."""
    p = Path(path)
    try:
        if p.is_dir():
            m = p / MARKER
            return json.loads(m.read_text())[KEY] if m.is_file() else None
        if p.is_file():
            with open(p, "rb") as fh:
                if fh.read(len(_MAGIC)) != _MAGIC:
                    return None
            return json.loads(p.read_text())[KEY]
    except (OSError, ValueError, KeyError):
        return None
    return None


def write_markers(outputs: Iterable[str], record: Mapping) -> None:
    """Replace every output path by a marker carrying ``record``: a folder for a ``.zarr`` (every
    per-slide ``directory()`` output of the workflow is a Zarr store), a file otherwise."""
    body = '{"' + KEY + '": ' + json.dumps(dict(record), indent=2) + "}\n"  # starts with _MAGIC
    for path in outputs:
        p = Path(path)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".zarr":
            p.mkdir()
            (p / MARKER).write_text(body)
        else:
            p.write_text(body)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + " ..."


def _slide_of(snakemake) -> str:
    w = snakemake.wildcards
    for key in ("slide", "ref_slide", "mov_slide", "aml_slide"):
        value = w.get(key) if hasattr(w, "get") else getattr(w, key, None)
        if value:
            return str(value)
    raise CellstageError(f"rule {snakemake.rule}: no slide wildcard to exclude by")


def require_all(snakemake) -> bool:
    return bool(snakemake.config.get("require_all_slides", True))


def _record(snakemake, slide: str, error: str, cause: Mapping | None) -> dict:
    """A marker's record; ``cause`` None: this stage is the first failure of the slide."""
    record = {"slide": slide, "rule": snakemake.rule, "error": error, "log": str(snakemake.log[0])}
    record["cause"] = dict(cause) if cause is not None else dict(record)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return record


def run_slide_stage(snakemake, body: Callable[[], object]) -> None:
    """Run one per-slide stage (``body``) with its log; degrade to exclusion markers when allowed.

    ``require_all_slides: true``: a failure propagates (non-zero exit), and a marker among the
    inputs is refused with its cause. ``false``: a marker input, or any failure of ``body`` other
    than MemoryError (a retry with more memory is the fix there), writes markers at every output and
    returns normally."""
    strict = require_all(snakemake)
    outputs = [str(p) for p in snakemake.output]
    slide = _slide_of(snakemake)
    with redirect_output(snakemake.log[0]):
        for path in map(str, snakemake.input):
            cause = read_marker(path)
            if cause is None:
                continue
            cause = cause.get("cause", cause)
            if strict:
                raise CellstageError(
                    f"{path}: slide {cause['slide']} was excluded by an earlier run with "
                    f"require_all_slides: false (rule {cause['rule']}: {cause['error']}). Fix that "
                    f"input and rerun with --forcerun {cause['rule']}, or set require_all_slides: false"
                )
            record = _record(snakemake, slide, f"input excluded: {path}", cause)
            write_markers(outputs, record)
            log.warning(
                "slide %s excluded: its input %s is excluded (slide %s, rule %s: %s)",
                slide,
                path,
                cause["slide"],
                cause["rule"],
                cause["error"],
            )
            return
        if strict:
            body()
            return
        try:
            body()
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (every failure of one slide excludes that slide)
            log.error(
                "slide %s excluded (require_all_slides: false): %s\n%s", slide, _first_line(exc), traceback.format_exc()
            )
            record = _record(snakemake, slide, _first_line(exc), None)
            write_markers(outputs, record)


class Inputs(dict):
    """A job's inputs after :func:`drop_excluded`: name -> path or list of paths, by key or attribute."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def drop_excluded(snakemake, pairs: Mapping[str, str] | None = None) -> tuple[Inputs, list[dict]]:
    """The job's inputs without exclusion markers, and the records of the markers dropped.

    ``pairs``: input name -> the name of a list paired with it by position (a slide's user file,
    e.g. ``{"slides": "grades"}``): its entries at the dropped positions go too. With
    ``require_all_slides: true`` any marker is refused (:class:`CellstageError`, naming it)."""
    pairs = dict(pairs or {})
    kept: dict[str, object] = {}
    records: dict[tuple, dict] = {}
    dropped_pos: dict[str, set[int]] = {}
    for name, value in snakemake.input.items():
        if isinstance(value, (str, Path)):
            rec = read_marker(value)
            if rec is not None:
                records.setdefault((rec["slide"], rec["rule"]), rec)
                continue
            kept[name] = str(value)
            continue
        keep = []
        for i, path in enumerate(_paths(value)):
            rec = read_marker(path)
            if rec is None:
                keep.append(path)
            else:
                records.setdefault((rec["slide"], rec["rule"]), rec)
                dropped_pos.setdefault(name, set()).add(i)
        kept[name] = keep
    for name, partner in pairs.items():
        gone = dropped_pos.get(name, set())
        if gone and partner in kept:
            kept[partner] = [p for i, p in enumerate(_paths(kept[partner])) if i not in gone]
    out = sorted(records.values(), key=lambda r: (r["slide"], r["rule"]))
    if out and require_all(snakemake):
        r = out[0]
        cause = r.get("cause", r)
        raise CellstageError(
            f"{len(out)} input(s) of rule {snakemake.rule} are exclusion markers of an earlier run with "
            f"require_all_slides: false, e.g. slide {r['slide']} (rule {cause['rule']}: {cause['error']}). "
            f"Fix the slide and rerun with --forcerun {cause['rule']}, or set require_all_slides: false"
        )
    for r in out:
        cause = r.get("cause", r)
        log.warning("slide %s left out (excluded at rule %s: %s)", r["slide"], cause["rule"], cause["error"])
    return Inputs(kept), out


def exclusion_table(records: Iterable[Mapping]):
    """One row per excluded slide: the slide, the rule that failed first for it and on which slide
    (itself, or e.g. the reference scan a 20x scan is registered to), that error and its log. The
    report writes it as ``excluded.csv``."""
    import pandas as pd

    rows = {}
    for r in records:
        cause = r.get("cause", r)
        rows.setdefault(
            r["slide"],
            {
                "slide": r["slide"],
                "failed_rule": cause["rule"],
                "failed_slide": cause["slide"],
                "error": cause["error"],
                "log": cause.get("log", ""),
            },
        )
    return pd.DataFrame(list(rows.values()), columns=COLUMNS).sort_values("slide").reset_index(drop=True)


def find_markers(root: str | Path = "results") -> list[dict]:
    """Every exclusion record among the per-slide outputs under ``root``, one per slide (the
    Snakefile's ``onsuccess`` summary). Only the workflow's per-slide locations are looked at (Zarr
    folders and tables one or two levels down), never the chunks of a store."""
    root = Path(root)
    found: dict[str, dict] = {}
    candidates = [
        *root.glob("*/*.zarr"),
        *root.glob("*/*/*.zarr"),
        *root.glob("*/*.parquet"),
        *root.glob("*/*/*.parquet"),
        *root.glob("registration/*.json"),
    ]
    for p in sorted(candidates):
        rec = read_marker(p)
        if rec:
            found.setdefault(rec["slide"], rec)
    return [found[k] for k in sorted(found)]


def summary_lines(records: Iterable[Mapping]) -> list[str]:
    """Human lines for the end of a run: one per excluded slide, with the first error."""
    table = exclusion_table(records)
    if not len(table):
        return []
    lines = [
        f"cellstage: {len(table)} slide(s) excluded (require_all_slides: false); they are listed in "
        "results/report/excluded.csv. Fix the input and rerun with --forcerun <rule>:"
    ]
    for r in table.itertuples():
        via = "" if r.failed_slide == r.slide else f" (of {r.failed_slide})"
        lines.append(f"  {r.slide}: rule {r.failed_rule}{via} failed: {r.error}  [log: {r.log}]")
    return lines
