"""Per-slide counts through the pipeline: nuclei, labelled cells, crops, grading, registration."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd


def _paths(x) -> list[Path]:
    if not x:
        return []
    return [Path(x)] if isinstance(x, (str, Path)) else [Path(p) for p in x]


def stage_table(inputs: Mapping) -> pd.DataFrame:
    """One row per slide: nuclei, labelled nuclei, crops, crops kept by the grader, and for every
    registered (non-reference) scan the slide it was registered to, the registration quality and
    what mapped outside it."""
    rows = {}
    for p in _paths(inputs.get("cells")):
        t = pd.read_parquet(p, columns=["label"])
        rows[p.stem] = {"slide": p.stem, "nuclei": len(t), "labelled": int((t["label"] != "").sum())}
    for p in _paths(inputs.get("crops")):
        t = pd.read_parquet(p, columns=["section", "scan", "split"])
        row = rows.setdefault(p.stem, {"slide": p.stem})
        row["crops"] = len(t)
        if len(t):
            row.update(section=t["section"].iloc[0], scan=t["scan"].iloc[0], split=t["split"].iloc[0])
    for p in _paths(inputs.get("grading")):
        t = pd.read_parquet(p, columns=["keep"])
        rows.setdefault(p.stem, {"slide": p.stem})["kept_by_grader"] = int(t["keep"].sum())
    for p in _paths(inputs.get("outside")):  # results/annotations/{slide}.outside.csv
        t = pd.read_csv(p, usecols=["kind"])
        row = rows.setdefault(p.name.removesuffix(".outside.csv"), {"slide": p.name.removesuffix(".outside.csv")})
        row["mapped_outside"] = ", ".join(f"{v} {k}s" for k, v in sorted(t["kind"].value_counts().items()))
    for p in _paths(inputs.get("registration")):  # results/registration/{moving slide}.json
        d = json.loads(p.read_text())
        rows.setdefault(p.stem, {"slide": p.stem}).update(
            registered_to=Path(d.get("ref", "")).name.removesuffix(".ome.zarr"), registration_ok=d.get("ok"),
            inliers=d.get("n_inliers"), rmse_um=d.get("rmse_um"), registration_message=d.get("message") or "")
    table = pd.DataFrame(list(rows.values()))
    cols = ["slide", "section", "scan", "split", "nuclei", "labelled", "crops", "kept_by_grader",
            "registered_to", "registration_ok", "inliers", "rmse_um", "registration_message", "mapped_outside"]
    return table[[c for c in cols if c in table]].sort_values("slide").reset_index(drop=True)
