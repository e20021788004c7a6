"""One function per pipeline stage: read the stage's input files, call the algorithms, write the
stage's output files atomically. The Snakemake scripts and the command-line tool both call these,
so every stage also runs outside Snakemake. Nothing here imports snakemake.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .taxonomy import Taxonomy
from .utils import CellstageError, atomic_path, provenance, seed_everything, write_json

log = logging.getLogger("cellstage.stages")


def _threads(n: int | None) -> None:
    """Torch uses the cores the rule was given (Snakemake's `threads`), not every core of the node."""
    if n:
        import torch

        torch.set_num_threads(int(n))


# --- convert ---------------------------------------------------------------------------------
def convert(slide_path, out_path, *, backend=None, mpp=None, tile=512) -> dict:
    from .io.omezarr import convert_to_omezarr

    info = convert_to_omezarr(slide_path, out_path, backend=backend, mpp=mpp, tile=tile)
    log.info("converted %s -> %s: %s", slide_path, out_path, info)
    return info


# --- segmentation ------------------------------------------------------------------------------
def _read_level0(slide) -> np.ndarray:
    w, h = slide.dimensions
    return slide.read_region(0, 0, w, h, level=0)


def train_segmenter(slide_paths, mask_paths, out_model, *, seg: Mapping, seed: int = 0, threads: int = 2) -> dict:
    """Cellpose trained on whole training slides and their nucleus masks (tiled inside).

    Resumable: rerun after a kill, it continues from ``<out_model>.ckpt/`` (see
    :func:`cellstage.segment.train.fit_cellpose`).
    """
    import tifffile

    from .io.omezarr import ZarrSlide
    from .segment.train import train_segmenter as _train

    _threads(threads)
    images, masks = [], []
    for sp, mp in zip(slide_paths, mask_paths):
        slide = ZarrSlide(sp)
        mask = tifffile.imread(mp)
        if mask.shape[:2] != (slide.dimensions[1], slide.dimensions[0]):
            raise CellstageError(
                f"{mp}: mask shape {mask.shape[:2]} differs from slide {sp} level-0 shape "
                f"{(slide.dimensions[1], slide.dimensions[0])}"
            )
        # Training material is small (masks are per-slide label images of annotated regions).
        images.append(_read_level0(slide))
        masks.append(mask.astype(np.uint32))
    # config key -> train_segmenter argument; keys left out or null keep the function's default
    # (the schema's defaults are the same), except nimg_per_epoch / eval_tiles where null means
    # "all training tiles" / "all held-out tiles"
    kinds = {"epochs": int, "learning_rate": float, "batch_size": int, "bsize": int,
             "diam_mean": float}
    opts = {k: f(seg[k]) for k, f in kinds.items() if seg.get(k) is not None}
    for key, arg in (("nimg_per_epoch", "nimg_per_epoch"), ("eval_tiles", "max_eval_tiles")):
        if key in seg:
            opts[arg] = None if seg[key] is None else int(seg[key])
    result = _train(
        images,
        masks,
        out_model,
        pretrained=seg.get("pretrained"),
        diameter=seg.get("diameter"),
        seed=seed,
        **opts,
    )
    log.info("segmenter trained: %s", result)
    return result


def segment(slide_path, tubules_path, model_path, out_labels, *, seg: Mapping, threads: int = 2) -> dict:
    from .io.annotations import check_inside, read_polygons
    from .io.omezarr import ZarrSlide
    from .segment.tiling import create_labels, segment_slide

    slide = ZarrSlide(slide_path)
    rois = read_polygons(tubules_path)
    check_inside(rois, slide.dimensions, tubules_path)
    classical = (seg.get("method") or "cellpose") == "classical"
    if not classical:  # the classical fallback never loads torch (~0.8 GB of RSS for the CUDA build)
        _threads(threads)
    log.info("segmenting %s with %s", slide_path, "the classical fallback" if classical else f"Cellpose {model_path}")
    w, h = slide.dimensions
    with atomic_path(out_labels) as tmp:
        labels = create_labels(tmp, (h, w), mpp=slide.mpp, slide=Path(slide_path).name)
        stats = segment_slide(
            slide,
            rois,
            model_path,
            labels,
            tile=int(seg.get("tile") or 1024),
            overlap=int(seg.get("overlap") or 128),
            diameter=seg.get("diameter"),
            classical=classical,
        )
        labels.attrs["stats"] = json.loads(json.dumps(stats, default=float))
    log.info("segmentation: %s", stats)
    return stats


def cells(labels_path, slide_path, tubules_path, points_path, out_cells, *, geojson=None, slide_id: str,
          classes: Sequence[str], match_radius_px: float = 10) -> pd.DataFrame:
    from .cells import cell_table
    from .io.annotations import read_points, read_polygons, write_cells_geojson
    from .io.omezarr import ZarrSlide
    from .segment.tiling import open_labels

    slide = ZarrSlide(slide_path)
    rois = read_polygons(tubules_path)
    points = read_points(points_path) if points_path else None
    if points is not None:
        taxonomy = Taxonomy(tuple(classes))
        for i, name in enumerate(points["label"]):
            taxonomy.index(name, where=f"{points_path}: point {i} class")
    table = cell_table(
        open_labels(labels_path), rois, mpp=slide.mpp, slide=slide_id, points=points, match_radius_px=match_radius_px
    )
    with atomic_path(out_cells) as tmp:
        table.to_parquet(tmp, index=False)
    if geojson:
        write_cells_geojson(table, geojson, mpp=slide.mpp)
    n_lab = int((table["label"] != "").sum()) if "label" in table else 0
    log.info("%s: %d nuclei, %d labelled", slide_id, len(table), n_lab)
    return table


# --- registration ------------------------------------------------------------------------------
def register(ref_path, mov_path, out_json, out_png, *, reg: Mapping) -> dict:
    from .io.omezarr import ZarrSlide
    from .register.homography import register_pair
    from .register.qc import overlay_png

    ref, mov = ZarrSlide(ref_path), ZarrSlide(mov_path)
    result = register_pair(
        ref,
        mov,
        n_features=int(reg.get("n_features", 10000)),
        ransac_threshold=float(reg.get("ransac_threshold", 5.0)),
        min_inliers=int(reg.get("min_inliers", 30)),
        min_inlier_ratio=float(reg.get("min_inlier_ratio", 0.1)),
        coarse_max_side=int(reg.get("coarse_max_side", 2048)),
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
              tubules=None, points=None, out_tubules=None, out_points=None, out_outside=None):
    """Cells, labels and annotations of the reference scan mapped onto the other scan.

    A pair whose registration failed QC is excluded: its mapped table is empty (and the report lists
    the pair with the reason), never filled with labels on the wrong tissue. Nothing is clipped:
    a cell whose mapped centroid falls outside the target slide has no crop there (it is left out
    of ``out_cells``), and every such cell, point annotation or tubule is listed in
    ``out_outside`` (kind, id, label, source and mapped coordinates) and counted in the log.
    Mapped tubules and points are written as QuPath GeoJSON in the target slide's level-0 px.
    """
    from shapely.geometry import box

    from .io.annotations import read_points, read_polygons, write_points_geojson, write_polygons_geojson
    from .io.omezarr import ZarrSlide
    from .register.mapping import map_cell_table, map_points_report, map_polygons, warp_labels_zarr
    from .segment.tiling import create_labels, open_labels

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
    outside = []
    if ok:
        mapped = map_cell_table(table, H, mov.mpp, mov.dimensions)
        off = mapped[~mapped["inside"]]
        src = table.set_index("cell_id").loc[off["cell_id"]]
        outside.append(pd.DataFrame({
            "kind": "cell", "id": off["cell_id"].astype(str).to_numpy(),
            "label": off["label"].to_numpy() if "label" in off else "",
            "source_x": src["centroid_x"].to_numpy(), "source_y": src["centroid_y"].to_numpy(),
            "mapped_x": off["centroid_x"].to_numpy(), "mapped_y": off["centroid_y"].to_numpy()}))
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
        mp, off = map_points_report(pts, H, mov.dimensions) if ok else (pts.iloc[0:0], pts.iloc[0:0])
        write_points_geojson(mp, out_points)
        outside.append(pd.DataFrame({
            "kind": "point", "id": off.index.astype(str), "label": off["label"].to_numpy(),
            "source_x": pts.loc[off.index, "x"].to_numpy(), "source_y": pts.loc[off.index, "y"].to_numpy(),
            "mapped_x": off["x"].to_numpy(), "mapped_y": off["y"].to_numpy()}))
    if out_tubules:
        polys = map_polygons(read_polygons(tubules), H) if ok and tubules else []
        write_polygons_geojson(polys, out_tubules, classification="Tubule")
        frame = box(0, 0, w, h)
        off = [(rid, g) for rid, g in polys if not frame.covers(g)]
        outside.append(pd.DataFrame({
            "kind": "tubule", "id": [str(r) for r, _ in off], "label": "Tubule",
            "source_x": np.nan, "source_y": np.nan,
            "mapped_x": [g.centroid.x for _, g in off], "mapped_y": [g.centroid.y for _, g in off]}))
    if out_outside:
        cols = ["kind", "id", "label", "source_x", "source_y", "mapped_x", "mapped_y"]
        frames = [f for f in outside if len(f)]
        report_df = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
        with atomic_path(out_outside) as tmp:
            report_df.to_csv(tmp, index=False)
        counts = report_df["kind"].value_counts().to_dict()
        if counts:
            log.warning("%s: mapped outside the slide (%dx%d px), listed in %s: %s", slide_id, w, h,
                        out_outside, ", ".join(f"{v} {k}(s)" for k, v in sorted(counts.items())))
    with atomic_path(out_cells) as tmp:
        mapped.to_parquet(tmp, index=False)
    return mapped


# --- crops -------------------------------------------------------------------------------------
def extract_crops(slide_path, labels_path, cells_path, out_zarr, out_index, *, size: int, meta: Mapping,
                  classes: Sequence[str]) -> dict:
    from .crops import extract_crops as _extract

    info = _extract(slide_path, labels_path, cells_path, out_zarr, out_index, size=size, meta=dict(meta),
                    classes=list(classes))
    log.info("crops %s: %s", out_zarr, info)
    return info


# --- data reduction (seed 003) -------------------------------------------------------------------
def train_grader(slide_paths, grade_paths, out_dir, *, grading: Mapping, size: int, seed: int = 0,
                 threads: int | None = None, devices: int = 1) -> dict:
    """``devices`` > 1: data-parallel (DDP) training. The resume checkpoint lives next to
    ``out_dir`` (``<out_dir>.checkpoints/``), not in it: Snakemake deletes a failed job's
    ``directory()`` output as a whole."""
    from .crops import crops_at_points
    from .io.omezarr import ZarrSlide
    from .reduce.grader import train_grader as _train

    crops, grades = [], []
    for sp, gp in zip(slide_paths, grade_paths):
        table = pd.read_csv(gp)
        missing = {"x", "y", "grade"} - set(table.columns)
        if missing:
            raise CellstageError(f"{gp}: missing column(s) {sorted(missing)} (expected x, y, grade)")
        crops.append(crops_at_points(ZarrSlide(sp), table["x"].to_numpy(), table["y"].to_numpy(), size))
        grades.append(table["grade"].to_numpy())
    _threads(threads)
    return _train(
        np.concatenate(crops),
        np.concatenate(grades),
        out_dir,
        backbone=grading.get("backbone", "resnet18"),
        epochs=int(grading.get("epochs", 8)),
        batch_size=int(grading.get("batch_size", 64)),
        loss_weights=dict(grading.get("loss_weights", {"useful": 3.0, "unsuitable": 1.0})),
        seed=seed,
        devices=int(devices),
        checkpoint_dir=Path(out_dir).with_name(Path(out_dir).name + ".checkpoints"),
    )


def grade(model_dir, crops_zarr, crops_index, out_path, *, threshold: float = 0.5,
          threads: int | None = None) -> pd.DataFrame:
    from .reduce.grader import grade_crops

    _threads(threads)
    table = grade_crops(model_dir, [(crops_zarr, crops_index)], threshold=threshold)
    sections = pd.read_parquet(crops_index, columns=["slide", "section"]).drop_duplicates()
    table = table.merge(sections, on="slide", how="left")
    with atomic_path(out_path) as tmp:
        table.to_parquet(tmp, index=False)
    log.info("%s: kept %d of %d crops", crops_index, int(table["keep"].sum()), len(table))
    return table


# --- self-supervised pretraining ---------------------------------------------------------------
def _keep_lists(grading_paths, index_paths) -> pd.DataFrame | None:
    """Grading decisions (made on the reference scan) for every crop source, joined by section + cell id,
    so the other scan of a section keeps exactly the cells its reference scan kept."""
    if not grading_paths:
        return None
    grading = pd.concat([pd.read_parquet(p, columns=["section", "cell_id", "keep"]) for p in grading_paths])
    index = pd.concat([pd.read_parquet(p, columns=["slide", "section", "cell_id"]) for p in index_paths])
    keep = index.merge(grading, on=["section", "cell_id"], how="left")
    keep["keep"] = keep["keep"].fillna(True).astype(bool)  # sections without grading keep everything
    return keep[["slide", "cell_id", "keep"]]


def pretrain(run: str, zarr_paths, index_paths, grading_paths, out_weights, *, pretrain: Mapping,
             scans: Mapping, seed: int = 0, threads: int | None = None, devices: int = 1) -> dict:
    """``devices`` > 1: data-parallel (DDP) training; resumes from ``last.ckpt`` next to the weights."""
    from .ssl.pretrain import pretrain as _pretrain

    _threads(threads)
    method, backbone, scan = run.split("-", 2)
    keep = _keep_lists(grading_paths, index_paths)
    return _pretrain(
        method,
        backbone,
        list(zip(zarr_paths, index_paths)),
        Path(out_weights).parent,
        img_size=int(scans[scan]["crop_size"]),
        variant=pretrain.get("variant", "images"),
        epochs=int(pretrain.get("epochs", 10)),
        batch_size=int(pretrain.get("batch_size", 128)),
        seed=seed,
        max_crops=pretrain.get("max_crops"),
        keep=keep,
        devices=int(devices),
    )


# --- fine-tuning -------------------------------------------------------------------------------
def finetune(*, train, test, pretrained, out_metrics, fold: int, experiment: Mapping, finetune: Mapping,
             scans: Mapping, classes: Sequence[str], static_classes: Sequence[str], seed: int = 0,
             threads: int | None = None, devices: int = 1) -> dict:
    """``devices`` > 1: data-parallel (DDP) training; resumes from ``checkpoints/last.ckpt``."""
    from .train.cv import run_fold

    taxonomy = Taxonomy(tuple(classes), tuple(static_classes))
    return run_fold(
        list(train),
        list(test),
        Path(out_metrics).parent,
        fold=fold,
        n_folds=int(finetune.get("n_folds", 5)),
        taxonomy=taxonomy,
        backbone=experiment["backbone"],
        img_size=int(scans[experiment["scan"]]["crop_size"]),
        variant="images" if experiment["background"] else "masked",
        use_distance=bool(experiment["distance"]),
        pretrained_path=pretrained,
        epochs=int(finetune.get("epochs", 100)),
        batch_size=int(finetune.get("batch_size", 128)),
        lr=float(finetune.get("lr", 1e-3)),
        group_col=finetune.get("group_by"),
        seed=seed,
        num_threads=threads,
        devices=int(devices),
    )


# --- report ------------------------------------------------------------------------------------
def report(inputs: Mapping, outputs: Mapping, *, config: Mapping, experiments: Mapping) -> dict:
    """Paper-shaped tables, figures, per-stage counts and QuPath GeoJSON of the classified test cells."""
    from .io.annotations import write_cells_geojson
    from .report import best_experiment, fold_table, markdown_table, summary_table
    from .report.figures import confusion_figure, metric_boxplots
    from .report.stages import stage_table

    classes = list(config["classes"])
    metric = config.get("report", {}).get("metric", "top1")
    folds = fold_table(_as_list(inputs["metrics"]), experiments)
    summary = summary_table(folds)
    best = best_experiment(summary, metric=metric, split="val")

    with atomic_path(outputs["folds"]) as tmp:
        folds.to_csv(tmp, index=False)
    with atomic_path(outputs["csv"]) as tmp:
        summary.to_csv(tmp, index=False)
    chance = 1.0 / len(classes)
    metric_boxplots(folds, outputs["boxplot"], chance=chance)

    # best configuration on the test slides: fold models' class probabilities averaged per cell
    pred_paths = [Path(p).with_name("predictions.parquet") for p in _as_list(inputs["metrics"])
                  if Path(p).parent.parent.name == best]
    preds = pd.concat([pd.read_parquet(p) for p in pred_paths], ignore_index=True)
    test = preds[preds["split"] == "test"]
    prob_cols = [c for c in test.columns if c.startswith("prob_")]
    ensemble = test.groupby(["slide", "cell_id", "label_idx"], as_index=False)[prob_cols].mean()
    ensemble["pred"] = ensemble[prob_cols].to_numpy().argmax(axis=1)
    cm = confusion_figure(ensemble["label_idx"], ensemble["pred"], classes, outputs["confusion"],
                          title=f"{best}: test, fold ensemble")

    stages = stage_table(inputs)
    with atomic_path(outputs["stages"]) as tmp:
        stages.to_csv(tmp, index=False)

    with atomic_path(outputs["geojson"]) as tmp:
        tmp.mkdir()
        cell_tables = {Path(p).stem: p for p in _as_list(inputs["cells"])}
        for slide_id, group in ensemble.groupby("slide"):
            cells_df = pd.read_parquet(cell_tables[slide_id])
            merged = cells_df.merge(group, on="cell_id", how="inner", suffixes=("", "_pred"))
            merged["predicted"] = [classes[i] for i in merged["pred"]]
            merged["probability"] = merged[prob_cols].max(axis=1)
            mpp = float(cells_df["area_um2"].iloc[0] / cells_df["area_px"].iloc[0]) ** 0.5 if len(cells_df) else None
            write_cells_geojson(merged, tmp / f"{slide_id}.geojson", mpp=mpp, label_col="predicted",
                                prob_col="probability")

    best_row = summary.set_index("experiment").loc[best]
    result = {
        "best_experiment": best,
        "selected_by": f"val {metric}",
        "chance_top1": chance,
        "test": {m: float(best_row[f"test_{m}_mean"]) for m in ("top1", "top2", "adj1", "adj1_dyn")},
        "val": {m: float(best_row[f"val_{m}_mean"]) for m in ("top1", "top2", "adj1", "adj1_dyn")},
        "test_ensemble_top1": float((ensemble["pred"] == ensemble["label_idx"]).mean()) if len(ensemble) else None,
        "confusion_test_ensemble": cm.tolist(),
        "n_configurations": int(len(summary)),
        "n_folds": int(folds["fold"].nunique()),
        "provenance": provenance(config),
    }
    md = [
        "# Cross-validation results",
        "",
        f"{result['n_configurations']} configurations x {result['n_folds']} folds; mean ± std over folds in %. "
        f"Best configuration by validation {metric}: **{best}** (chance Top-1 = {100 * chance:.1f} %).",
        "",
        markdown_table(summary, best=best),
        "## Pipeline stages",
        "",
        stages.to_markdown(index=False),
        "",
    ]
    with atomic_path(outputs["md"]) as tmp:
        tmp.write_text("\n".join(md))
    write_json(outputs["summary"], result)
    log.info("report: best %s test %s", best, result["test"])
    return result


def _as_list(x) -> list:
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)

