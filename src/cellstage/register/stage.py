"""Stage entry points of registration: register one moving scan to its section's reference scan,
and map the reference scan's cells, labels and annotations onto that moving scan.

Both work on one (reference, moving) pair of slides: a section with any number of scans runs
them once per non-reference scan, each with its own registration JSON. Each function only reads
the stage's inputs, calls the algorithms of :mod:`cellstage.register` and writes the outputs
atomically. Every keyword argument arrives validated from the workflow config (``registration``
section); the defaults live in the schema only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.annotations import read_points, read_regions, write_points_geojson, write_polygons_geojson
from ..io.labels import create_labels, open_labels
from ..io.slides import ZarrSlide
from ..utils import atomic_path, write_json
from .homography import register_pair
from .mapping import map_cell_table, map_points_report, map_polygons, outside_report, warp_labels_zarr
from .qc import overlay_png

log = logging.getLogger("cellstage.register")


def register(ref_path, mov_path, out_json, out_png, *, n_features: int, ransac_threshold: float,
             min_inliers: int, min_inlier_ratio: float, coarse_max_side: int) -> dict:
    """Homography ref level-0 px → mov level-0 px of one moving slide, its JSON and QC overlay.

    The JSON holds the :class:`~cellstage.register.homography.RegistrationResult` fields plus the
    two slide paths and pixel sizes. A pair that fails QC is written with ``ok`` false and the
    reason (never raised): :func:`map_cells` then maps nothing onto that slide.
    """
    ref, mov = ZarrSlide(ref_path), ZarrSlide(mov_path)
    result = register_pair(
        ref,
        mov,
        n_features=int(n_features),
        ransac_threshold=float(ransac_threshold),
        min_inliers=int(min_inliers),
        min_inlier_ratio=float(min_inlier_ratio),
        coarse_max_side=int(coarse_max_side),
        expected_scale=ref.mpp / mov.mpp,
    )
    data = result.to_dict()
    data.update(ref=str(ref_path), mov=str(mov_path), ref_mpp=ref.mpp, mov_mpp=mov.mpp)
    overlay_png(ref, mov, result, out_png)
    write_json(out_json, data)
    (log.info if result.ok else log.error)(
        "registration %s -> %s: ok=%s inliers=%s rmse=%.3f um %s",
        ref_path, mov_path, result.ok, result.n_inliers, result.rmse_um or float("nan"), result.message,
    )
    return data


def map_cells(registration_json, ref_cells, ref_labels, mov_slide_path, out_cells, out_labels, *, slide_id: str,
              tubules=None, points=None, out_tubules=None, out_points=None, out_outside=None,
              region_classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Cells, labels and annotations of the reference scan mapped onto the moving scan
    ``mov_slide_path`` through its own registration ``registration_json``.

    A pair whose registration failed QC is excluded: its mapped table is empty (and the report lists
    the pair with the reason), never filled with labels on the wrong tissue. Nothing is clipped:
    a cell whose mapped centroid falls outside the target slide has no crop there (it is left out
    of ``out_cells``), and every such cell, point annotation or tubule is listed in
    ``out_outside`` (kind, id, label, source and mapped coordinates; see
    :func:`cellstage.register.mapping.outside_report`) and counted in the log.
    Mapped tubules and points are written as QuPath GeoJSON in the target slide's level-0 px;
    ``region_classes`` (config ``annotations.region_classes``; None = every class) picks the tubules.
    """
    reg = json.loads(Path(registration_json).read_text())
    mov = ZarrSlide(mov_slide_path)
    w, h = mov.dimensions
    table = pd.read_parquet(ref_cells)
    H = np.asarray(reg["H"], dtype=float) if reg.get("H") is not None else None
    ok = bool(reg.get("ok")) and H is not None
    with atomic_path(out_labels) as tmp:
        labels = create_labels(tmp, (h, w), mpp=mov.mpp, slide=slide_id)
        if ok:
            warp_labels_zarr(open_labels(ref_labels), H, labels)
        labels.attrs["registration_ok"] = bool(reg.get("ok"))
    off_cells = off_points = off_tubules = None
    if ok:
        mapped = map_cell_table(table, H, mov.mpp, mov.dimensions)
        off_cells = (table, mapped)
        mapped = mapped[mapped["inside"]].drop(columns=["inside"])
    else:
        log.error(
            "%s: registration %s failed QC (%s); the pair is excluded downstream (no cells)",
            slide_id, registration_json, reg.get("message"),
        )
        mapped = table.iloc[0:0].copy()
    mapped["slide"] = slide_id
    if out_points:
        pts = read_points(points) if points else pd.DataFrame({"x": [], "y": [], "label": []})
        if ok:
            mp, _ = map_points_report(pts, H, mov.dimensions)
            off_points = (pts, mp)
        else:
            mp = pts.iloc[0:0]
        write_points_geojson(mp, out_points)
    if out_tubules:
        polys = map_polygons(read_regions(tubules, classes=region_classes), H) if ok and tubules else []
        write_polygons_geojson(polys, out_tubules, classification="Tubule")
        off_tubules = polys
    if out_outside:
        report_df = outside_report(mov.dimensions, cells=off_cells, points=off_points, tubules=off_tubules)
        with atomic_path(out_outside) as tmp:
            report_df.to_csv(tmp, index=False)
        counts = report_df["kind"].value_counts().to_dict()
        if counts:
            log.warning("%s: mapped outside the slide (%dx%d px), listed in %s: %s", slide_id, w, h,
                        out_outside, ", ".join(f"{v} {k}(s)" for k, v in sorted(counts.items())))
    with atomic_path(out_cells) as tmp:
        mapped.to_parquet(tmp, index=False)
    return mapped
