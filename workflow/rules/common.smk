# Validation of config and sheet, derived lists, wildcard constraints and input functions.
import itertools
import re
from pathlib import Path

import pandas as pd
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")


def _load_sheet(path):
    if not Path(path).is_file():
        raise ValueError(f"config 'samples': slide sheet {path} not found")
    sheet = pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    for col in ("mpp",):
        if col in sheet:
            sheet[col] = pd.to_numeric(sheet[col].replace("", None), errors="raise")
    sheet = sheet.replace({"": None}).astype(object)
    sheet = sheet.where(pd.notna(sheet), None)
    validate(sheet, schema="../schemas/slides.schema.yaml")
    sheet = sheet.astype(object).where(pd.notna(sheet), None)  # validate() may turn None into NaN
    if sheet["slide"].duplicated().any():
        dup = sorted(sheet.loc[sheet["slide"].duplicated(), "slide"])
        raise ValueError(f"{path}: column 'slide' has duplicates: {dup}")
    unknown = sorted(set(sheet["scan"]) - set(config["scans"]))
    if unknown:
        raise ValueError(
            f"{path}: column 'scan' has values {unknown} that are not keys of config 'scans' "
            f"({sorted(config['scans'])})"
        )
    ref = sheet[sheet["scan"] == config["reference_scan"]]
    missing_ref = sorted(set(sheet["section"]) - set(ref["section"]))
    if missing_ref:
        raise ValueError(
            f"{path}: sections {missing_ref} have no '{config['reference_scan']}' (reference_scan) row"
        )
    if ref["section"].duplicated().any():
        raise ValueError(f"{path}: a section has more than one reference-scan row")
    no_rois = sorted(ref.loc[ref["tubules"].isna(), "slide"])
    if no_rois:
        raise ValueError(f"{path}: reference slides {no_rois} need a 'tubules' GeoJSON")
    missing_files = [
        f"{row.slide}: {col}={row[col]}"
        for _, row in sheet.iterrows()
        for col in ("path", "tubules", "points", "masks", "grades")
        if row.get(col) and not Path(row[col]).exists()
    ]
    if missing_files:
        raise ValueError(
            f"{path}: files not found ({len(missing_files)}): {missing_files[:5]}"
            + (" - for the demo run `make demo-data` first" if "demo" in str(missing_files) else "")
        )
    return sheet.set_index("slide", drop=False)


slides = _load_sheet(config["samples"])
REF_SCAN = config["reference_scan"]
SLIDES = list(slides.index)
REF_SLIDES = list(slides.index[slides["scan"] == REF_SCAN])
MOV_SLIDES = list(slides.index[slides["scan"] != REF_SCAN])
SECTIONS = sorted(set(slides["section"]))
PAIRS = sorted(set(slides.loc[MOV_SLIDES, "section"]))
# Nucleus masks of test slides never train the segmenter (they stay available for evaluation).
MASK_SLIDES = list(slides.index[slides["masks"].notna() & (slides["split"] != "test")])
GRADE_SLIDES = list(slides.index[slides["grades"].notna()])
# Slides read by Bio-Formats (sheet backend `bioformats`) are converted by rule convert_bioformats
# in its own numpy<2 + Java environment; every other slide by rule convert.
BIOFORMATS_SLIDES = [s for s in SLIDES if slides.loc[s].get("backend") == "bioformats"]
GPU = int(config.get("gpus_per_job", 0))


def _ref_slide_of(section):
    return slides.index[(slides["section"] == section) & (slides["scan"] == REF_SCAN)][0]


# --- experiments: the cross product of config finetune.grid --------------------------------
def _experiments():
    grid = config["finetune"]["grid"]  # every key filled from the schema defaults by validate()
    out = {}
    for scan, bg, backbone, init, dist in itertools.product(
        grid["scan"], grid["background"], grid["backbone"], grid["init"], grid["distance"]
    ):
        if scan not in config["scans"]:
            raise ValueError(f"config finetune.grid.scan: {scan!r} is not a key of config 'scans'")
        if init == "mae" and not backbone.startswith(("vit", "deit")):
            raise ValueError(f"config finetune.grid: init 'mae' needs a ViT backbone, not {backbone!r}")
        name = f"{scan}-{'bg' if bg else 'nobg'}-{backbone}-{init}-{'dist' if dist else 'nodist'}"
        out[name] = dict(scan=scan, background=bg, backbone=backbone, init=init, distance=dist)
    return out


EXPERIMENTS = _experiments()
PRETRAIN_RUNS = sorted(
    {f"{e['init']}-{e['backbone']}-{e['scan']}" for e in EXPERIMENTS.values() if e["init"] != "scratch"}
)
FOLDS = list(range(config["finetune"].get("n_folds", 5)))


def _alt(names):
    return "|".join(map(re.escape, names)) if names else "(?!x)x"


wildcard_constraints:
    slide=_alt(SLIDES),
    ref_slide=_alt(REF_SLIDES),
    mov_slide=_alt(MOV_SLIDES),
    section=_alt(SECTIONS),
    experiment=_alt(EXPERIMENTS),
    run=_alt(PRETRAIN_RUNS),
    fold=r"\d+",


# --- input functions --------------------------------------------------------------------------
def slide_file(wildcards):
    return slides.loc[wildcards.slide, "path"]


def tubules_of(wildcards):
    return slides.loc[wildcards.ref_slide, "tubules"]


def points_of(wildcards):
    p = slides.loc[wildcards.ref_slide, "points"]
    return [p] if p else []


def segmenter_inputs(wildcards):
    if not config["segmentation"].get("train", True) or config["segmentation"].get("method") == "classical":
        return {}
    return {
        "slides": expand("results/slides/{slide}.ome.zarr", slide=MASK_SLIDES),
        "masks": [slides.loc[s, "masks"] for s in MASK_SLIDES],
    }


def segmenter_model(wildcards=None):
    seg = config["segmentation"]
    if seg.get("method") == "classical":
        return []
    if seg.get("train", True):
        return ["results/segmenter/model"]
    if not seg.get("pretrained"):
        raise ValueError("config segmentation: train is false but no 'pretrained' model path is given")
    return [seg["pretrained"]]


def pair_inputs(wildcards):
    ref = _ref_slide_of(wildcards.section)
    mov = [s for s in MOV_SLIDES if slides.loc[s, "section"] == wildcards.section][0]
    return {"ref": f"results/slides/{ref}.ome.zarr", "mov": f"results/slides/{mov}.ome.zarr"}


def mapped_cells_inputs(wildcards):
    section = slides.loc[wildcards.mov_slide, "section"]
    ref = _ref_slide_of(section)
    inputs = {
        "registration": f"results/registration/{section}.json",
        "cells": f"results/cells/{ref}.parquet",
        "labels": f"results/segmentation/{ref}.zarr",
        "slide": f"results/slides/{wildcards.mov_slide}.ome.zarr",
        "tubules": slides.loc[ref, "tubules"],
    }
    if slides.loc[ref, "points"]:
        inputs["points"] = slides.loc[ref, "points"]
    return inputs


def slide_meta(wildcards):
    row = slides.loc[wildcards.slide]
    return dict(
        slide=wildcards.slide, section=row["section"], scan=row["scan"], patient=row["patient"], split=row["split"]
    )


def grader_inputs(wildcards):
    return {
        "slides": expand("results/slides/{slide}.ome.zarr", slide=GRADE_SLIDES),
        "grades": [slides.loc[s, "grades"] for s in GRADE_SLIDES],
    }


def _slides_where(scan, splits):
    return [s for s in SLIDES if slides.loc[s, "scan"] == scan and slides.loc[s, "split"] in splits]


def crops_of(slide_ids):
    return {
        "zarr": expand("results/crops/{slide}.zarr", slide=slide_ids),
        "index": expand("results/crops/{slide}.parquet", slide=slide_ids),
    }


def pretrain_inputs(wildcards):
    method, backbone, scan = wildcards.run.split("-", 2)
    ids = _slides_where(scan, ("unlabelled", "train"))
    inputs = crops_of(ids)
    if config["grading"].get("enabled", True) and GRADE_SLIDES:
        sections = {slides.loc[s, "section"] for s in ids}
        inputs["grading"] = [f"results/grading/{_ref_slide_of(sec)}.parquet" for sec in sorted(sections)]
    return inputs


def finetune_inputs(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    inputs = {
        "train": crops_of(_slides_where(exp["scan"], ("train",))),
        "test": crops_of(_slides_where(exp["scan"], ("test",))),
    }
    flat = {
        "train_zarr": inputs["train"]["zarr"],
        "train_index": inputs["train"]["index"],
        "test_zarr": inputs["test"]["zarr"],
        "test_index": inputs["test"]["index"],
    }
    if exp["init"] != "scratch":
        flat["pretrained"] = f"results/pretrain/{exp['init']}-{exp['backbone']}-{exp['scan']}/backbone.safetensors"
    return flat


def fold_metrics(wildcards=None):
    return expand(
        "results/finetune/{experiment}/fold{fold}/metrics.json", experiment=list(EXPERIMENTS), fold=FOLDS
    )


def final_outputs():
    return [
        "results/report/cv_results.md",
        "results/report/cv_results.csv",
        "results/report/summary.json",
        "results/report/cv_boxplot.png",
    ]


def sheet_value(column):
    """Input function: the sheet's value of `column` for the {slide} wildcard (None if empty)."""

    def get(wildcards):
        value = slides.loc[wildcards.slide].get(column)
        return None if value is None or value == "" else value

    return get


def scaled(base):
    """Resource function: `base` times the attempt, so a retry after a memory/walltime kill gets more."""

    def get(wildcards, attempt):
        return int(base * attempt)

    return get


def crop_size_of(wildcards):
    return config["scans"][slides.loc[wildcards.slide, "scan"]]["crop_size"]


def graded_ref_slides():
    """Reference slides whose crops the grading network filters (when grading is enabled)."""
    if not (config["grading"].get("enabled", True) and GRADE_SLIDES):
        return []
    return REF_SLIDES


def experiment_params(wildcards):
    return dict(EXPERIMENTS[wildcards.experiment], name=wildcards.experiment)


def report_inputs(wildcards):
    inputs = {
        "metrics": fold_metrics(),
        "registration": expand("results/registration/{section}.json", section=PAIRS),
        "cells": expand("results/cells/{slide}.parquet", slide=SLIDES),
        "crops": expand("results/crops/{slide}.parquet", slide=SLIDES),
        "pretrain": expand("results/pretrain/{run}/history.csv", run=PRETRAIN_RUNS),
        "grading": expand("results/grading/{slide}.parquet", slide=graded_ref_slides()),
        "outside": expand("results/annotations/{mov_slide}.outside.csv", mov_slide=MOV_SLIDES),
    }
    if segmenter_model() == ["results/segmenter/model"]:
        inputs["segmenter"] = "results/segmenter/model.json"
    if graded_ref_slides():
        inputs["grader"] = "results/grader"
    return inputs


# Only the settings a rule uses are its params, so changing e.g. the inference tile size does not
# retrain the segmenter.
_SEG_TRAIN_KEYS = ("pretrained", "epochs", "learning_rate", "diameter", "nimg_per_epoch", "batch_size",
                   "bsize", "diam_mean", "eval_tiles")
_SEG_INFER_KEYS = ("method", "tile", "overlap", "diameter")


def segmenter_training_params():
    return {k: config["segmentation"].get(k) for k in _SEG_TRAIN_KEYS}


def segmenter_inference_params():
    return {k: config["segmentation"].get(k) for k in _SEG_INFER_KEYS}
