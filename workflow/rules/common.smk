# Validation of config and sheet, derived lists, wildcard constraints and input functions.
import re
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

# the checkout's package (as workflow/scripts/_src_path.py does for the rule scripts)
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from cellstage.config import (
    check_config,
    check_sheet_columns,
    is_cross_scan,
    mil_dir,
    mil_experiments,
    parse_slide_labels,
    partner_scan,
)
from cellstage.determinism import apply_pins
from cellstage.report.annotators import read_annotator_sheet
from cellstage.train.grid import check_backbone
from cellstage.train.grid import experiments as grid_experiments
from cellstage.training.folds import check_split_leaks

validate(config, schema="../schemas/config.schema.yaml")
# Before any job starts: the thread count and instruction set every job inherits, the same on
# every node (issue 15 item 7, cellstage.determinism; docs/hpc.md "Determinism across machines").
# A SLURM job re-parses this file on its node, which re-applies them (and checks the node's CPU).
DETERMINISM_PINS = apply_pins(config["determinism"])
check_config(config, "config")  # cross-key checks (static_classes within classes, reference_scan a scan)
check_backbone(config["grading"]["backbone"], "grading")  # a typo fails here, not late in train_grader


def _check_testis_rows(sheet, path):
    ref = sheet[sheet["scan"] == config["reference_scan"]]
    missing_ref = sorted(set(sheet["section"]) - set(ref["section"]))
    if missing_ref:
        raise ValueError(f"{path}: sections {missing_ref} have no '{config['reference_scan']}' (reference_scan) row")
    if ref["section"].duplicated().any():
        raise ValueError(f"{path}: a section has more than one reference-scan row")
    check_split_leaks(sheet, path)  # no test patient or section also in train
    no_rois = sorted(ref.loc[ref["tubules"].isna(), "slide"])
    if no_rois:
        raise ValueError(f"{path}: reference slides {no_rois} need a 'tubules' GeoJSON")


def _load_sheet(path):
    if not Path(path).is_file():
        raise ValueError(f"config 'samples': slide sheet {path} not found")
    sheet = pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    sheet = check_sheet_columns(sheet, path)  # unknown/misspelled columns refused; absent optional ones added
    for col in ("mpp",):
        if col in sheet:
            values = pd.to_numeric(sheet[col].replace("", None), errors="coerce")
            bad = values.isna() & (sheet[col] != "")
            if bad.any():
                got = [f"{s}: {v!r}" for s, v in zip(sheet.loc[bad, "slide"], sheet.loc[bad, col])]
                raise ValueError(f"{path}: column {col!r} must be a number (µm/px), got {got}")
            sheet[col] = values
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
    # rows with slide-level `labels` are the AML pipeline's smears (seed 003); the others the testis
    # pipeline's sections, whose checks (reference scan, tubules, split leaks) apply to them alone
    _check_testis_rows(sheet[sheet["labels"].isna()], path)
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


SHEET = _load_sheet(config["samples"])  # every row: the slides rule convert converts
# the AML pipeline's slides (seed 003): rows with `labels`, parsed against config aml.tasks
AML_LABELS = parse_slide_labels(SHEET[SHEET["labels"].notna()], config["aml"]["tasks"], config["samples"])
AML_SLIDES = list(AML_LABELS)
slides = SHEET[SHEET["labels"].isna()]  # the testis pipeline's slides (seed 000)
PIPELINES = config["pipelines"]
REF_SCAN = config["reference_scan"]
SLIDES = list(slides.index)
REF_SLIDES = list(slides.index[slides["scan"] == REF_SCAN])
# every non-reference scan of a section is registered to the section's reference scan on its own
MOV_SLIDES = list(slides.index[slides["scan"] != REF_SCAN])
# Nucleus masks of test slides never train the segmenter (they stay available for evaluation).
MASK_SLIDES = list(slides.index[slides["masks"].notna() & (slides["split"] != "test")])
GRADE_SLIDES = list(slides.index[slides["grades"].notna()])
# Slides read by Bio-Formats (sheet backend `bioformats`) are converted by rule convert_bioformats
# in its own numpy<2 + Java environment; every other slide by rule convert.
BIOFORMATS_SLIDES = [s for s in SHEET.index if SHEET.loc[s].get("backend") == "bioformats"]
GPU = config["gpus_per_job"]
# data-parallel devices per training job (train_grader, pretrain, finetune): config devices_per_job,
# used only with GPUs (gpus_per_job > 0); those rules ask for gpus_per_job x devices_per_job GPUs
TRAIN_DEVICES = config["devices_per_job"] if GPU > 0 else 1


def _ref_slide_of(section):
    return slides.index[(slides["section"] == section) & (slides["scan"] == REF_SCAN)][0]


# --- experiments: the union of the cross products of config finetune.grids (or finetune.grid) --
# (cellstage.train.grid). Each field of an experiment is its own path part,
#   results/finetune/{scan}/{background}/{backbone}/{init}/{distance}/{loss}/fold{fold}/,
# and its display name `{scan}-{bg|nobg}-{backbone}-{init}-{dist|nodist}[-{loss}]` is only ever built in
# the package, never split back into its fields (a timm backbone name may contain '-' or '.').
def _experiments():
    return grid_experiments(config["finetune"], config["scans"])  # defaults filled by validate()


EXPERIMENTS = _experiments()
FOLDS = list(range(config["finetune"]["n_folds"]))
# (method, backbone, scan) of every self-supervised pretraining a fine-tuning starts from
NOT_PRETRAINED_HERE = ("scratch", "imagenet")  # inits that need no rule pretrain
PRETRAIN_RUNS = sorted(
    {(e["init"], e["backbone"], e["scan"]) for e in EXPERIMENTS.values() if e["init"] not in NOT_PRETRAINED_HERE}
)


def finetune_dir(exp):
    """Output folder of one experiment (the fold folders lie inside)."""
    return (
        f"results/finetune/{exp['scan']}/{'bg' if exp['background'] else 'nobg'}/{exp['backbone']}/"
        f"{exp['init']}/{'dist' if exp['distance'] else 'nodist'}/{exp['loss']}"
    )


def pretrain_method_settings(wildcards):
    """Param: the block config pretrain.methods.<method> with only this run's `backbones` entry
    (so editing another backbone's settings does not rerun this one); the package merges it
    (cellstage.ssl.settings.resolve_settings: backbone > method > pretrain.epochs/batch_size)."""
    block = dict(config["pretrain"]["methods"].get(wildcards.method, {}))
    own = (block.pop("backbones", None) or {}).get(wildcards.backbone)
    if own:
        block["backbones"] = {wildcards.backbone: own}
    return block


def pretrain_file(method, backbone, scan, name):
    """A file of one pretraining run (backbone.safetensors, history.csv, loss.png, pretrain.json)."""
    return f"results/pretrain/{method}/{backbone}/{scan}/{name}"


def _alt(names):
    return "|".join(map(re.escape, names)) if names else "(?!x)x"


# --- the AML pipeline (seed 003, aml.smk) ---------------------------------------------------
# MIL configurations (cellstage.config.mil_experiments), each in
#   results/aml/mil/{task}/{level}/{bg|nobg}/{backbone}/{attn|noattn}/fold{fold}/
AML_EXPERIMENTS = mil_experiments(config["aml"]["mil"]["grids"], config["aml"]["tasks"]) if "aml" in PIPELINES else []
AML_FOLDS = list(range(config["aml"]["mil"]["n_folds"]))
AML_GRADE_SLIDES = [s for s in AML_SLIDES if SHEET.loc[s, "grades"]]
if "aml" in PIPELINES:
    if not AML_SLIDES:
        raise ValueError(
            f"config pipelines has 'aml' but {config['samples']} has no row with `labels` (the AML pipeline's slides)"
        )
    if any(e["level"] == "three" for e in AML_EXPERIMENTS) and not AML_GRADE_SLIDES:
        raise ValueError(
            f"config aml.mil.grids trains on Level Three, whose grading network needs expert grades, but no "
            f"AML slide of {config['samples']} has a `grades` CSV (x, y, grade); add one or drop level three"
        )
if "testis" in PIPELINES and not SLIDES:
    raise ValueError(
        f"config pipelines has 'testis' but every row of {config['samples']} has `labels` (AML slides); "
        "set pipelines: [aml]"
    )


def aml_grader_inputs(wildcards):
    return {
        "slides": expand("results/slides/{slide}.ome.zarr", slide=AML_GRADE_SLIDES),
        "grades": [SHEET.loc[s, "grades"] for s in AML_GRADE_SLIDES],
    }


def _aml_task_slides(task):
    return [s for s in AML_SLIDES if task in AML_LABELS[s]]


def aml_level_files(slide_ids, level):
    """The per-slide files one level's instances are read from."""
    if level == "one":
        return {
            "zarr": expand("results/aml/level1/{s}.zarr", s=slide_ids),
            "index": expand("results/aml/level1/{s}.parquet", s=slide_ids),
        }
    files = {
        "zarr": expand("results/aml/level2/{s}.zarr", s=slide_ids),
        "index": expand("results/aml/level2/{s}.parquet", s=slide_ids),
    }
    if level == "three":
        files["grading"] = expand("results/aml/level3/{s}.parquet", s=slide_ids)
    return files


def aml_mil_inputs(wildcards):
    return aml_level_files(_aml_task_slides(wildcards.task), wildcards.level)


def aml_task_labels(wildcards):
    """Param: slide -> class of the task, for the slides labelled for it (in sheet order)."""
    return {s: AML_LABELS[s][wildcards.task] for s in _aml_task_slides(wildcards.task)}


def aml_task_patients(wildcards):
    return {s: SHEET.loc[s, "patient"] for s in _aml_task_slides(wildcards.task)}


def aml_task_classes(wildcards):
    return list(config["aml"]["tasks"][wildcards.task])


def aml_fold_files(exp, name):
    return [f"{mil_dir(exp)}/fold{fold}/{name}" for fold in AML_FOLDS]


def aml_report_inputs(wildcards):
    levels = {e["level"] for e in AML_EXPERIMENTS}
    inputs = {
        "metrics": [p for e in AML_EXPERIMENTS for p in aml_fold_files(e, "metrics.json")],
        "level1": expand("results/aml/level1/{s}.parquet", s=AML_SLIDES),
        "level2": expand("results/aml/level2/{s}.parquet", s=AML_SLIDES),
    }
    if "three" in levels:
        inputs["level3"] = expand("results/aml/level3/{s}.parquet", s=AML_SLIDES)
    return inputs


def aml_outputs():
    """Rule all's targets of the AML pipeline: its report's tables and figure."""
    if "aml" not in PIPELINES:
        return []
    return list(rules.aml_report.output)


wildcard_constraints:
    aml_slide=_alt(AML_SLIDES),
    task=_alt(sorted(config["aml"]["tasks"])),
    level="one|two|three",
    mil_backbone=_alt(sorted({e["backbone"] for e in AML_EXPERIMENTS})),
    attention="attn|noattn",
    slide=_alt(list(SHEET.index)),
    ref_slide=_alt(REF_SLIDES),
    mov_slide=_alt(MOV_SLIDES),
    scan=_alt(config["scans"]),
    background="bg|nobg",
    backbone=_alt(sorted({e["backbone"] for e in EXPERIMENTS.values()})),
    init=_alt(sorted({e["init"] for e in EXPERIMENTS.values()})),
    method=_alt(sorted({run[0] for run in PRETRAIN_RUNS})),
    distance="dist|nodist",
    loss=_alt(sorted({e["loss"] for e in EXPERIMENTS.values()})),
    fold=r"\d+",


# --- input functions --------------------------------------------------------------------------
def slide_file(wildcards):
    return SHEET.loc[wildcards.slide, "path"]


def tubules_of(wildcards):
    return slides.loc[wildcards.ref_slide, "tubules"]


def points_of(wildcards):
    p = slides.loc[wildcards.ref_slide, "points"]
    return [p] if p else []


def _segmenter_trained():
    return config["segmentation"]["method"] != "classical" and config["segmentation"]["train"]


def segmenter_inputs(wildcards):
    if not _segmenter_trained():
        return {}
    inputs = {
        "slides": expand("results/slides/{slide}.ome.zarr", slide=MASK_SLIDES),
        "masks": [slides.loc[s, "masks"] for s in MASK_SLIDES],
    }
    start = config["segmentation"]["pretrained"]
    if start and Path(start).is_file():  # a starting model by path: a new file retrains
        inputs["pretrained"] = start
    return inputs


def segmenter_model(wildcards=None):
    seg = config["segmentation"]
    if seg["method"] == "classical":
        return []
    if seg["train"]:
        return ["results/segmenter/model"]
    if not seg["pretrained"]:
        raise ValueError("config segmentation: train is false but no 'pretrained' model path is given")
    return [seg["pretrained"]]


def registration_inputs(wildcards):
    """The section's reference scan and this moving slide."""
    ref = _ref_slide_of(slides.loc[wildcards.mov_slide, "section"])
    return {"ref": f"results/slides/{ref}.ome.zarr", "mov": f"results/slides/{wildcards.mov_slide}.ome.zarr"}


def mapped_cells_inputs(wildcards):
    """The reference scan's cells, labels and annotations, and this moving slide's own registration."""
    ref = _ref_slide_of(slides.loc[wildcards.mov_slide, "section"])
    inputs = {
        "registration": f"results/registration/{wildcards.mov_slide}.json",
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


def graded_ref_slides():
    """Reference slides whose crops the grading network filters (when grading is enabled)."""
    if not (config["grading"]["enabled"] and GRADE_SLIDES):
        return []
    return REF_SLIDES


# config pretrain.pool -> sheet splits whose crops pretrain (cellstage.ssl.pretrain.POOLS): the
# labelled cross-validation cells (split train) are only in `unlabelled+train`
PRETRAIN_POOL_SPLITS = {"unlabelled": ("unlabelled",), "unlabelled+train": ("unlabelled", "train")}


def pretrain_inputs(wildcards):
    """The pool's crops (zarr, index), the validation crops (val_zarr, val_index: the train slides,
    whose labelled cells are the SSL validation set, seed 000 §4.3) and the pool's gradings."""
    ids = _slides_where(wildcards.scan, PRETRAIN_POOL_SPLITS[config["pretrain"]["pool"]])
    if not ids:
        raise ValueError(
            f"config pretrain.pool {config['pretrain']['pool']!r}: no slide of scan {wildcards.scan} "
            f"in the sheet has split {PRETRAIN_POOL_SPLITS[config['pretrain']['pool']]}"
        )
    inputs = crops_of(ids)
    val_ids = _slides_where(wildcards.scan, ("train",))
    val = crops_of(val_ids)
    inputs["val_zarr"], inputs["val_index"] = val["zarr"], val["index"]
    if is_cross_scan(wildcards.method):
        # the same sections' crops on the partner scan (cellstage.ssl.crossscan: one view per scan of a cell)
        other = partner_scan(wildcards.scan, config["scans"], config["pretrain"]["partner_scan"])
        sections = {slides.loc[s, "section"] for s in [*ids, *val_ids]}
        partner = crops_of(list(slides.index[(slides["scan"] == other) & slides["section"].isin(sections)]))
        inputs["partner_zarr"], inputs["partner_index"] = partner["zarr"], partner["index"]
    if graded_ref_slides():
        sections = {slides.loc[s, "section"] for s in ids}
        inputs["grading"] = [f"results/grading/{_ref_slide_of(sec)}.parquet" for sec in sorted(sections)]
    return inputs


def mae_reconstruction_inputs(wildcards):
    """The MAE run's exported weights and summary, and the validation crops it shows."""
    run = {
        name: pretrain_file("mae", wildcards.backbone, wildcards.scan, f"{name}.{ext}")
        for name, ext in (("backbone", "safetensors"), ("heads", "safetensors"), ("pretrain", "json"))
    }
    val = crops_of(_slides_where(wildcards.scan, ("train",)))
    return {**run, "val_zarr": val["zarr"], "val_index": val["index"]}


def probe_inputs(wildcards):
    """The run's exported backbone and summary, and the labelled crops it is probed on: the train
    slides of its scan (pretraining's validation crops, seed 000 §4.3; rule probe)."""
    val = crops_of(_slides_where(wildcards.scan, ("train",)))
    return {
        "weights": pretrain_file(wildcards.method, wildcards.backbone, wildcards.scan, "backbone.safetensors"),
        "summary": pretrain_file(wildcards.method, wildcards.backbone, wildcards.scan, "pretrain.json"),
        "val_zarr": val["zarr"],
        "val_index": val["index"],
        # the Macenko reference slide (pretrain.augment), fitted as pretraining fitted it
        **stain_reference_crops(),
    }


def stain_reference_crops():
    """{stain_zarr, stain_index} of config pretrain.augment.macenko_reference when Macenko is on, else {}."""
    augment = config["pretrain"]["augment"]
    if not (augment.get("macenko") and augment.get("macenko_reference")):
        return {}
    ref = crops_of([augment["macenko_reference"]])
    return {"stain_zarr": ref["zarr"], "stain_index": ref["index"]}


def probe_files():
    """probe.json of every pretraining run (the report's SSL probe table)."""
    return [pretrain_file(*run, "probe.json") for run in PRETRAIN_RUNS]


def finetune_inputs(wildcards):
    train = crops_of(_slides_where(wildcards.scan, ("train",)))
    test = crops_of(_slides_where(wildcards.scan, ("test",)))
    inputs = {
        "train_zarr": train["zarr"],
        "train_index": train["index"],
        "test_zarr": test["zarr"],
        "test_index": test["index"],
        # the reference scan's crop indexes of the train slides: folds are made over their cells,
        # so a cell's crops of every scan share one fold (cellstage.training.folds.make_folds)
        "fold_index": crops_of(_slides_where(REF_SCAN, ("train",)))["index"],
    }
    if wildcards.init == "imagenet":
        inputs["pretrained"] = config["finetune"]["imagenet_weights"][wildcards.backbone]
    elif wildcards.init != "scratch":
        inputs["pretrained"] = pretrain_file(wildcards.init, wildcards.backbone, wildcards.scan, "backbone.safetensors")
    return inputs


def recipe_name(wildcards):
    """Param: the recipe (baseline, pretrained) of the {init} wildcard (config finetune.recipe)."""
    return config["finetune"]["recipe"][wildcards.init]


def recipe_settings(wildcards):
    """Param: that recipe's numbers (config finetune.recipes.<recipe>), nothing else."""
    return dict(config["finetune"]["recipes"][recipe_name(wildcards)])


def loss_settings(wildcards):
    """Param: the settings of the {loss} wildcard (config finetune.losses.<loss>, defaults filled)."""
    from cellstage.train.losses import check_loss

    return check_loss(wildcards.loss, config["finetune"].get("losses", {}).get(wildcards.loss))


def fold_files(exp, name):
    """`name` (metrics.json, predictions.parquet, history.csv) of every fold of one experiment."""
    return [f"{finetune_dir(exp)}/fold{fold}/{name}" for fold in FOLDS]


def report_experiments():
    """Report param: experiment name -> its grid fields and its folds' metrics, predictions, embeddings."""
    return {
        name: dict(
            exp,
            metrics=fold_files(exp, "metrics.json"),
            predictions=fold_files(exp, "predictions.parquet"),
            embeddings=fold_files(exp, "embeddings.parquet"),
        )
        for name, exp in EXPERIMENTS.items()
    }


def report_config_hash():
    """Report param: hash of the whole config (its provenance; the report reruns when it changes)."""
    from cellstage.report.provenance import config_hash

    return config_hash(config)


# --- annotator study (seed 000 §4.1, annotators.smk), only with config annotators.sheet -------
def annotator_study_inputs(wildcards):
    """The annotator sheet, validated (annotators.schema.yaml, cellstage.report.annotators) when the
    study is wanted, and every labels file it lists (a relative path is relative to the sheet's folder)."""
    path = Path(config["annotators"]["sheet"])
    if not path.is_file():
        demo = " - for the demo run `make demo-data` first" if "demo" in str(path) else ""
        raise ValueError(f"config annotators.sheet: {path} not found{demo}")
    sheet = read_annotator_sheet(path, list(config["scans"]))
    return {"sheet": str(path), "labels": list(sheet["labels_path"])}


def final_outputs():
    """Rule all's targets: the report of each pipeline of config `pipelines`."""
    if "testis" not in PIPELINES:
        return aml_outputs()
    annotators = list(rules.annotator_study.output) if config["annotators"]["sheet"] else []
    return (
        [
            "results/report/cv_results.md",
            "results/report/cv_results.csv",
            "results/report/summary.json",
            "results/report/cv_boxplot.png",
        ]
        + annotators
        + mae_reconstruction_files()
        + aml_outputs()
    )


def mae_reconstruction_files():
    """Seed 000 Fig. A.2: the reconstruction figure of every MAE pretraining run."""
    return [pretrain_file(*run, "reconstructions.png") for run in PRETRAIN_RUNS if run[0] == "mae"]


def sheet_value(column):
    """Param function: the sheet's value of `column` for the {slide} wildcard (None if empty)."""

    def get(wildcards):
        value = SHEET.loc[wildcards.slide].get(column)
        return None if value is None or value == "" else value

    return get


def mpp_option(wildcards):
    """`--mpp <sheet mpp>` for the command line of rule convert_bioformats, or nothing."""
    mpp = SHEET.loc[wildcards.slide, "mpp"]
    return f"--mpp {mpp}" if mpp else ""


def scaled(base):
    """Resource function: `base` times the attempt, so a retry after a memory/walltime kill gets more."""

    def get(wildcards, attempt):
        return int(base * attempt)

    return get


def crop_size_of(wildcards):
    """Crop edge (px) of the {slide}'s scan."""
    return config["scans"][slides.loc[wildcards.slide, "scan"]]["crop_size"]


def crop_size_of_scan(wildcards):
    """Crop edge (px) of the {scan} wildcard: the image size a backbone trains on."""
    return config["scans"][wildcards.scan]["crop_size"]


def with_background(wildcards):
    return wildcards.background == "bg"


def with_distance(wildcards):
    return wildcards.distance == "dist"


def _test_slides():
    """Test slides of the scans fine-tuned on (their crops are the embeddings' crops)."""
    scans = {exp["scan"] for exp in EXPERIMENTS.values()}
    return [s for s in SLIDES if slides.loc[s, "split"] == "test" and slides.loc[s, "scan"] in scans]


def report_inputs(wildcards):
    inputs = {
        "metrics": [p for exp in EXPERIMENTS.values() for p in fold_files(exp, "metrics.json")],
        # read beside each metrics.json for the fold ensemble of the best configuration
        "predictions": [p for exp in EXPERIMENTS.values() for p in fold_files(exp, "predictions.parquet")],
        # test-crop embeddings (UMAP) and the crop stores they are read from (staining intensity)
        "embeddings": [p for exp in EXPERIMENTS.values() for p in fold_files(exp, "embeddings.parquet")],
        "crop_zarr": expand("results/crops/{slide}.zarr", slide=_test_slides()),
        # pixel sizes of the slides whose classified cells are exported as GeoJSON
        "slides": expand("results/slides/{slide}.ome.zarr", slide=SLIDES),
        "registration": expand("results/registration/{mov_slide}.json", mov_slide=MOV_SLIDES),
        "cells": expand("results/cells/{slide}.parquet", slide=SLIDES),
        "points": expand("results/cells/{ref_slide}.points.csv", ref_slide=REF_SLIDES),
        "crops": expand("results/crops/{slide}.parquet", slide=SLIDES),
        "pretrain": [pretrain_file(*run, "history.csv") for run in PRETRAIN_RUNS],
        "grading": expand("results/grading/{slide}.parquet", slide=graded_ref_slides()),
        "outside": expand("results/annotations/{mov_slide}.outside.csv", mov_slide=MOV_SLIDES),
    }
    if _segmenter_trained():
        inputs["segmenter"] = "results/segmenter/model.json"
    if graded_ref_slides():
        inputs["grader"] = "results/grader"
    return inputs


def report_exclusions():
    """onsuccess: list the slides excluded with require_all_slides: false (cellstage.exclusion)."""
    from cellstage.exclusion import find_markers, summary_lines

    for line in summary_lines(find_markers("results")):
        print(line, file=sys.stderr)
