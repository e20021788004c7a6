"""Per-slide counts through the pipeline: nuclei, labelled cells, crops, grading, registration."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..cells import segmentation_qc


def _paths(x) -> list[Path]:
    if not x:
        return []
    return [Path(x)] if isinstance(x, (str, Path)) else [Path(p) for p in x]


def _columns(path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(path).names


def stage_table(inputs: Mapping, *, min_points_on_nuclei: float | None = None) -> pd.DataFrame:
    """One row per slide: nuclei, labelled nuclei, crops from annotated points that matched no
    nucleus (``crop_from_point``), crops, crops kept by the grader, and for every registered
    (non-reference) scan the slide it was registered to, the registration quality and what mapped
    outside it.

    Reference slides with point annotations (``points``: results/cells/{slide}.points.csv) also
    get ``annotated_points``, ``matched_to_nucleus``, ``outside_slide`` and the segmentation QC
    figure ``points_on_nuclei`` (matched / in-slide points); with ``min_points_on_nuclei`` a
    ``segmentation_qc`` column holds the warning and advice where the figure is below it.
    """
    rows = {}
    for p in _paths(inputs.get("cells")):
        names = set(_columns(p))
        t = pd.read_parquet(p, columns=["label"] + (["anchor"] if "anchor" in names else []))
        at_point = (t["anchor"] == "point") if "anchor" in t else pd.Series(False, index=t.index)
        rows[p.stem] = {"slide": p.stem, "nuclei": int((~at_point).sum()),
                        "labelled": int(((t["label"] != "") & ~at_point).sum()), "crop_from_point": int(at_point.sum())}
    for p in _paths(inputs.get("points")):  # results/cells/{slide}.points.csv
        slide = p.name.removesuffix(".points.csv")
        t = pd.read_csv(p, usecols=["status"])
        st = t["status"].value_counts()
        inside = int(len(t) - st.get("outside", 0))
        frac = st.get("nucleus", 0) / inside if inside else None
        row = rows.setdefault(slide, {"slide": slide})
        row.update(annotated_points=len(t), matched_to_nucleus=int(st.get("nucleus", 0)),
                   outside_slide=int(st.get("outside", 0)), points_on_nuclei=None if frac is None else round(frac, 4))
        if min_points_on_nuclei is not None:
            row["segmentation_qc"] = segmentation_qc(frac, min_points_on_nuclei) or "ok"
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
    cols = ["slide", "section", "scan", "split", "nuclei", "labelled", "annotated_points", "matched_to_nucleus",
            "crop_from_point", "outside_slide", "points_on_nuclei", "segmentation_qc", "crops", "kept_by_grader",
            "registered_to", "registration_ok", "inliers", "rmse_um", "registration_message", "mapped_outside"]
    return table[[c for c in cols if c in table]].sort_values("slide").reset_index(drop=True)
