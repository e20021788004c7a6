"""The workflow config outside Snakemake: read, validate against the workflow's schema, fill defaults.

``workflow/schemas/config.schema.yaml`` is the one place defaults live. Snakemake fills them with
``snakemake.utils.validate``; the command-line tool does the same here (the FAQ recipe of
jsonschema that snakemake also uses: a ``properties`` validator that sets each missing key to its
``default`` before validating), so a stage run by hand sees exactly the values a rule would.
"""

from __future__ import annotations

import os
from pathlib import Path

from .utils import CellstageError

SCHEMA_RELPATH = Path("workflow") / "schemas" / "config.schema.yaml"


def schema_path() -> Path:
    """The workflow's config schema: in the repository this package lives in, else under the
    current directory (a workflow checkout)."""
    candidates = [Path(__file__).resolve().parents[2] / SCHEMA_RELPATH, Path.cwd() / SCHEMA_RELPATH]
    for c in candidates:
        if c.is_file():
            return c
    raise CellstageError(
        f"config schema not found (looked for {', '.join(map(str, candidates))}); run the command from the "
        "cellstage workflow directory"
    )


def _validator(schema: dict):
    from jsonschema import Draft202012Validator, validators

    props = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sub):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, subschema["default"])
        yield from props(validator, properties, instance, sub)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})(schema)


def validate_config(config: dict, where: str = "config") -> dict:
    """``config`` with every schema default filled in; an invalid value raises a
    :class:`CellstageError` naming the key path and what the schema expects."""
    import copy

    import yaml

    schema = yaml.safe_load(schema_path().read_text())
    data = copy.deepcopy(config)
    errors = sorted(_validator(schema).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors[:10]]
        raise CellstageError(f"{where}: invalid configuration:\n  " + "\n  ".join(lines))
    # a second pass fills defaults of objects that were themselves filled from a default
    _validator(schema).validate(data)
    check_config(data, where)
    return data


def check_config(config: dict, where: str = "config") -> None:
    """What a JSON schema cannot say: values of one key that must be values of another.
    Raises a :class:`CellstageError` naming the keys and the allowed values. Called by
    :func:`validate_config` and by the workflow at start-up (workflow/rules/common.smk)."""
    problems = []
    classes = list(config.get("classes") or [])
    unknown = [c for c in config.get("static_classes") or [] if c not in classes]
    if unknown:
        problems.append(f"static_classes: {unknown} are not in classes {classes}")
    scans = config.get("scans") or {}
    ref = config.get("reference_scan")
    if scans and ref is not None and ref not in scans:
        problems.append(f"reference_scan: {ref!r} is not a key of scans {sorted(scans)}")
    if problems:
        raise CellstageError(f"{where}: invalid configuration:\n  " + "\n  ".join(problems))


def load_config(path: str | os.PathLike) -> dict:
    """Read a workflow config YAML and validate it (defaults filled)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CellstageError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CellstageError(f"{path}: not valid YAML: {e}") from None
    return validate_config(data, where=str(path))


def check_yaml_syntax(path: str | os.PathLike) -> None:
    """Refuse a config file that is not YAML with its path, line and column (snakemake's own
    ``configfile:`` loader says only "Config file is not valid JSON or YAML"). A missing file is
    left to snakemake (a ``--configfile`` may stand in for it). Run before ``configfile:``
    (workflow/rules/preflight.smk)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return
    try:
        yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        def at(mark):
            return f"line {mark.line + 1}, column {mark.column + 1}"

        where = f" at {at(e.problem_mark)}" if e.problem_mark else ""
        context = f" ({e.context} at {at(e.context_mark)})" if e.context and e.context_mark else ""
        raise CellstageError(
            f"{path}: not valid YAML{where}: {e.problem}{context}. Fix the file (check brackets, quotes and "
            "indentation there)"
        ) from None
    except yaml.YAMLError as e:
        raise CellstageError(f"{path}: not valid YAML: {e}") from None


SHEET_SCHEMA_NAME = "slides.schema.yaml"


def check_sheet_columns(sheet, path: str | os.PathLike):
    """The slide sheet ``sheet`` (a DataFrame read from ``path``) with every optional column of
    ``workflow/schemas/slides.schema.yaml`` present (an absent one is added empty, so a sheet
    without e.g. ``grades`` reads as "no grades" rather than raising a KeyError).

    A column the schema does not know (a typo such as ``grade`` for ``grades``, which would
    otherwise switch a stage off without a word) or a missing required column raises a
    :class:`CellstageError` naming the sheet, the column and the closest valid name.
    Called by the workflow at start-up (workflow/rules/common.smk).
    """
    import difflib

    import yaml

    schema = yaml.safe_load((schema_path().parent / SHEET_SCHEMA_NAME).read_text())
    valid = list(schema["properties"])
    required = list(schema.get("required", []))
    sheet = sheet.rename(columns=lambda c: str(c).strip())
    problems = []
    for col in sheet.columns:
        if col in valid:
            continue
        by_case = [v for v in valid if v.lower() == col.lower()]
        close = by_case or difflib.get_close_matches(col, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "remove it or fix its name"
        problems.append(f"unknown column {col!r}: {hint}")
    dup = sorted({c for c in sheet.columns if list(sheet.columns).count(c) > 1})
    problems += [f"column {c!r} appears more than once" for c in dup]
    missing = [c for c in required if c not in sheet.columns]
    if missing:
        problems.append(f"missing required column(s) {missing}")
    if problems:
        raise CellstageError(
            f"{path}: invalid slide sheet header:\n  "
            + "\n  ".join(problems)
            + f"\n  (the tab-separated columns are {valid}, defined in workflow/schemas/{SHEET_SCHEMA_NAME}; "
            f"required: {required})"
        )
    for col in valid:
        if col not in sheet.columns:
            sheet[col] = ""
    return sheet


# --- cross-scan pretraining (cellstage.ssl.crossscan): `init: simclr_xscan` is SimCLR with one view
# per scan of a cell. Here (torch-free) because the workflow resolves the partner scan at start-up.
CROSS_SCAN_SUFFIX = "_xscan"
TWO_SCAN_METHODS = ("ctfm",)


def is_cross_scan(method: str) -> bool:
    """True for a pretraining method that needs both scans' crops: the cross-scan ones
    (``simclr_xscan``, ``dino_xscan``, ...) and ``ctfm`` (seed 004's two-resolution fusion)."""
    return str(method).endswith(CROSS_SCAN_SUFFIX) or str(method) in TWO_SCAN_METHODS


def partner_scan(scan: str, scans, partners) -> str:
    """The scan whose crops of the same cells pair with ``scan``'s in a cross-scan method: config
    ``pretrain.partner_scan.<scan>``, else the other scan when config ``scans`` has exactly two."""
    scans = list(scans)
    chosen = (partners or {}).get(scan)
    if chosen is None:
        others = [s for s in scans if s != scan]
        if len(others) != 1:
            example = others[0] if others else "..."
            raise CellstageError(
                f"config pretrain.partner_scan.{scan}: a cross-scan method needs the partner scan of {scan!r} "
                f"(config scans has {scans}; set e.g. pretrain.partner_scan: {{{scan}: {example}}})"
            )
        return others[0]
    if chosen not in scans or chosen == scan:
        raise CellstageError(
            f"config pretrain.partner_scan.{scan}: {chosen!r} must be another key of config scans {scans}"
        )
    return chosen


# --- the AML pipeline (seed 003; docs/aml.md). Torch-free: the workflow calls these at start-up.
AML_LEVELS = ("one", "two", "three")


def parse_labels(value: str, tasks: dict, where: str) -> dict[str, str]:
    """``task=class;task=class`` of the sheet's ``labels`` column as a dict. An unknown task, a
    class outside ``tasks[task]`` or a task given twice raises a :class:`CellstageError` naming
    ``where`` (sheet and slide) and the allowed values.

    >>> parse_labels("npm1=mut;flt3=wt", {"npm1": ["wt", "mut"], "flt3": ["wt", "mut"]}, "s")
    {'npm1': 'mut', 'flt3': 'wt'}
    """
    out: dict[str, str] = {}
    for part in str(value).split(";"):
        part = part.strip()
        if not part:
            continue
        task, sep, cls = (p.strip() for p in part.partition("="))
        if not sep or not task or not cls:
            raise CellstageError(f"{where}: column 'labels': {part!r} is not task=class (e.g. npm1=mut)")
        if task not in tasks:
            raise CellstageError(
                f"{where}: column 'labels': unknown task {task!r}; config aml.tasks has {sorted(tasks)}"
            )
        if cls not in tasks[task]:
            raise CellstageError(
                f"{where}: column 'labels': class {cls!r} of task {task!r} is not one of {list(tasks[task])} "
                "(config aml.tasks)"
            )
        if task in out:
            raise CellstageError(f"{where}: column 'labels': task {task!r} given twice")
        out[task] = cls
    return out


def parse_slide_labels(rows, tasks: dict, path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """slide -> {task: class} for the sheet rows ``rows`` (DataFrame with slide, labels), each
    checked by :func:`parse_labels`; several problems are reported together."""
    out, problems = {}, []
    for slide, value in zip(rows["slide"], rows["labels"]):
        try:
            out[str(slide)] = parse_labels(value, tasks, f"{path}: slide {slide}")
        except CellstageError as e:
            problems.append(str(e))
    if problems:
        raise CellstageError("invalid slide labels:\n  " + "\n  ".join(problems))
    return out


def mil_experiments(grids: list[dict], tasks: dict) -> list[dict]:
    """The MIL configurations of config ``aml.mil.grids``: the union of each grid's cross product
    of task x level x background x backbone x attention, duplicates removed, in grid order.
    Level One is single-instance learning (seed 003 §3: "Level One crops already incorporate
    multiple cells these images were used in a single instance learning paradigm"), so
    (level one, attention) combinations are left out. An unknown task is an error."""
    import itertools

    seen, out = set(), []
    for k, grid in enumerate(grids):
        unknown = [t for t in grid["task"] if t not in tasks]
        if unknown:
            raise CellstageError(f"config aml.mil.grids[{k}].task: {unknown} not in aml.tasks {sorted(tasks)}")
        for task, level, bg, backbone, attn in itertools.product(
            grid["task"], grid["level"], grid["background"], grid["backbone"], grid["attention"]
        ):
            if level == "one" and attn:
                continue
            exp = {"task": task, "level": level, "background": bool(bg), "backbone": backbone, "attention": bool(attn)}
            key = tuple(exp.values())
            if key not in seen:
                seen.add(key)
                out.append(exp)
    return out


def mil_dir(exp: dict) -> str:
    """Output folder of one MIL configuration (its fold folders lie inside)."""
    return (
        f"results/aml/mil/{exp['task']}/{exp['level']}/{'bg' if exp['background'] else 'nobg'}/"
        f"{exp['backbone']}/{'attn' if exp['attention'] else 'noattn'}"
    )
