"""Command-line tool: one command per stage, so every stage also runs outside Snakemake.

Options that are configuration (segmentation, registration, training settings) are read from the
workflow's config file (``--config``, default ``config/config.yaml``) so a stage run by hand is the
same as the rule's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .utils import CellstageError, setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
ConfigOpt = Annotated[Path, typer.Option("--config", help="workflow config (YAML)")]


def _config(path: Path) -> dict:
    """The workflow config, validated with every default of the schema filled in (as Snakemake does)."""
    from .config import load_config

    try:
        return load_config(path)
    except CellstageError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None


def _run(fn, *args, **kwargs):
    setup_logging(None)
    try:
        result = fn(*args, **kwargs)
    except (CellstageError, FileNotFoundError, ValueError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    if isinstance(result, dict):
        typer.echo(json.dumps(result, indent=2, default=str))
    return result


@app.command()
def version():
    """Print the package version."""
    typer.echo(__version__)


@app.command()
def demo(
    out_dir: Path = typer.Argument(Path("resources/demo")),
    preset: str = typer.Option("demo", help="demo or tiny"),
    seed: int = 0,
):
    """Generate the synthetic demo slides, annotations, masks and grades."""
    from .demo import generate

    _run(lambda: {"slides_tsv": str(generate(out_dir, preset=preset, seed=seed))})


@app.command()
def info(slide: Path, backend: Optional[str] = None, mpp: Optional[float] = None):
    """Show a slide's size, levels, pixel size and backend."""
    from .io import open_slide

    def _info():
        with open_slide(slide, backend=backend, mpp=mpp) as s:
            return {"path": str(slide), "backend": s.backend, "dimensions": s.dimensions, "mpp": s.mpp,
                    "level_count": s.level_count, "level_dimensions": s.level_dimensions,
                    "magnification": s.magnification}

    _run(_info)


@app.command()
def convert(slide: Path, out: Path, backend: Optional[str] = None, mpp: Optional[float] = None,
            tile: Annotated[Optional[int], typer.Option(help="chunk edge in px; default: the config's")] = None,
            config: ConfigOpt = Path("config/config.yaml")):
    """Slide -> OME-Zarr multiscale (streamed tile by tile)."""
    from .io import stage

    _run(stage.convert, slide, out, backend=backend, mpp=mpp, tile=tile or _config(config)["convert"]["tile"])


@app.command("train-segmenter")
def train_segmenter(
    out_model: Path,
    slides: Annotated[list[Path], typer.Option("--slide", help="converted slide (.ome.zarr); repeat")],
    masks: Annotated[list[Path], typer.Option("--masks", help="nucleus label TIFF per slide; repeat")],
    config: ConfigOpt = Path("config/config.yaml"),
    threads: int = 2,
):
    """Train the Cellpose segmenter on nucleus masks."""
    from .segment import stage

    cfg = _config(config)
    seg = cfg["segmentation"]
    _run(stage.train_segmenter, slides, masks, out_model, f"{out_model}.ap.csv", pretrained=seg["pretrained"],
         diameter=seg["diameter"],
         epochs=seg["epochs"], learning_rate=seg["learning_rate"], batch_size=seg["batch_size"], bsize=seg["bsize"],
         diam_mean=seg["diam_mean"], nimg_per_epoch=seg["nimg_per_epoch"], eval_tiles=seg["eval_tiles"],
         seed=cfg["seed"], threads=threads)


@app.command()
def segment(slide: Path, tubules: Path, out_labels: Path, model: Optional[Path] = None,
            config: ConfigOpt = Path("config/config.yaml"), threads: int = 2):
    """Tiled nucleus segmentation inside the tubules -> label store."""
    from .segment import stage

    cfg = _config(config)
    seg = cfg["segmentation"]
    _run(stage.segment, slide, tubules, str(model) if model else None, out_labels, method=seg["method"],
         tile=seg["tile"], overlap=seg["overlap"], diameter=seg["diameter"], threads=threads,
         region_classes=cfg["annotations"]["region_classes"])


@app.command()
def cells(labels: Path, slide: Path, tubules: Path, out: Path, points: Optional[Path] = None,
          config: ConfigOpt = Path("config/config.yaml")):
    """Cell table (morphology, distance to the tubule wall, annotated class; a row for every annotated
    point that matched no nucleus); with points, the per-point list is written beside it
    (``<out stem>.points.csv``) and the segmentation QC is logged."""
    from .cells import stage

    cfg = _config(config)
    seg = cfg["segmentation"]
    _run(lambda: {"cells": len(stage.cells(labels, slide, tubules, points, out, slide_id=slide.name.split(".")[0],
                                            classes=cfg["classes"], match_radius_px=seg["match_radius_px"],
                                            out_points=out.with_name(f"{out.stem}.points.csv") if points else None,
                                            min_points_on_nuclei=seg["min_points_on_nuclei"],
                                            region_classes=cfg["annotations"]["region_classes"]))})


@app.command()
def register(ref: Path, mov: Path, out_json: Path, out_png: Path, config: ConfigOpt = Path("config/config.yaml")):
    """ORB + Hamming + RANSAC homography between two scans of a section, with QC overlay."""
    from .register import stage

    reg = _config(config)["registration"]
    _run(stage.register, ref, mov, out_json, out_png, n_features=reg["n_features"],
         ransac_threshold=reg["ransac_threshold"], min_inliers=reg["min_inliers"],
         min_inlier_ratio=reg["min_inlier_ratio"], coarse_max_side=reg["coarse_max_side"])


@app.command()
def crops(slide: Path, labels: Path, cells_table: Path, out_zarr: Path, out_index: Path, size: int = 80,
          section: str = "", scan: str = "", patient: str = "", split: str = "unlabelled",
          config: ConfigOpt = Path("config/config.yaml")):
    """Crops around every nucleus (with and without background) into Zarr + index."""
    from .crops import stage

    meta = dict(slide=slide.name.split(".")[0], section=section, scan=scan, patient=patient, split=split)
    _run(stage.extract_crops, slide, labels, cells_table, out_zarr, out_index, size=size, meta=meta,
         classes=_config(config)["classes"])


@app.command("train-grader")
def train_grader(
    out_dir: Path,
    slides: Annotated[list[Path], typer.Option("--slide", help="converted slide (.ome.zarr); repeat")],
    grades: Annotated[list[Path], typer.Option("--grades", help="CSV x,y,grade per slide; repeat")],
    size: int = 80,
    config: ConfigOpt = Path("config/config.yaml"),
    threads: int = 2,
):
    """Train the grading network (seed 003) on expert quality grades."""
    from .reduce import stage

    cfg = _config(config)
    g = cfg["grading"]
    _run(stage.train_grader, slides, grades, out_dir, backbone=g["backbone"], epochs=g["epochs"],
         batch_size=g["batch_size"], loss_weights=g["loss_weights"], size=size, seed=cfg["seed"], threads=threads,
         devices=1)


@app.command()
def grade(model_dir: Path, crops_zarr: Path, crops_index: Path, out: Path,
          config: ConfigOpt = Path("config/config.yaml"), threads: int = 2):
    """Apply the grading network to a slide's crops -> keep-list."""
    from .reduce import stage

    thr = _config(config)["grading"]["threshold"]
    _run(lambda: {"kept": int(stage.grade(model_dir, crops_zarr, crops_index, out, threshold=thr,
                                          threads=threads)["keep"].sum())})


@app.command()
def pretrain(
    out_dir: Path,
    method: Annotated[str, typer.Option(help="SSL method, e.g. simclr")],
    backbone: Annotated[str, typer.Option(help="timm model name, e.g. resnet18")],
    scan: Annotated[str, typer.Option(help="scan whose crop size to use, a key of config 'scans'")],
    zarr: Annotated[list[Path], typer.Option("--zarr", help="crops zarr; repeat")] = (),
    index: Annotated[list[Path], typer.Option("--index", help="crops index parquet, same order; repeat")] = (),
    grading: Annotated[list[Path], typer.Option("--grading", help="grading keep-list parquet; repeat")] = (),
    val_zarr: Annotated[list[Path], typer.Option("--val-zarr", help="train slides' crops zarr (validation)")] = (),
    val_index: Annotated[list[Path], typer.Option("--val-index", help="their index parquet, same order; repeat")] = (),
    config: ConfigOpt = Path("config/config.yaml"),
    threads: int = 2,
):
    """Self-supervised pretraining on the pool (config pretrain.pool), validated on the labelled train crops."""
    from .ssl import stage

    cfg = _config(config)
    if scan not in cfg["scans"]:
        raise CellstageError(f"--scan {scan!r} is not a key of config 'scans' ({sorted(cfg['scans'])})")
    p = cfg["pretrain"]
    _run(stage.pretrain, list(zarr), list(index), list(grading), out_dir, method=method, backbone=backbone,
         img_size=cfg["scans"][scan]["crop_size"], variant=p["variant"], epochs=p["epochs"],
         batch_size=p["batch_size"], max_crops=p["max_crops"], seed=cfg["seed"], threads=threads, devices=1,
         method_settings=p["methods"].get(method), pool=p["pool"], val_zarr_paths=list(val_zarr),
         val_index_paths=list(val_index))


@app.command()
def finetune(
    out_dir: Path,
    fold: int,
    train_zarr: Annotated[list[Path], typer.Option("--train-zarr")],
    train_index: Annotated[list[Path], typer.Option("--train-index")],
    test_zarr: Annotated[list[Path], typer.Option("--test-zarr")] = (),
    test_index: Annotated[list[Path], typer.Option("--test-index")] = (),
    fold_index: Annotated[list[Path], typer.Option("--fold-index")] = (),
    scan: str = "40x",
    backbone: str = "resnet18",
    background: bool = True,
    distance: bool = False,
    init: str = "scratch",
    pretrained: Optional[Path] = None,
    config: ConfigOpt = Path("config/config.yaml"),
    threads: int = 1,
):
    """One cross-validation fold: train on the other folds, evaluate on this fold and the test slides.

    ``--init`` picks the recipe (config finetune.recipe); ``--pretrained`` is the SSL backbone, or
    for ``--init imagenet`` defaults to config finetune.imagenet_weights.<backbone>. ``--fold-index``:
    the reference scan's crop indexes of the train slides (folds over their cells, so a cell's
    crops of every scan share a fold; default: the train indexes themselves)."""
    from .train import stage

    cfg = _config(config)
    if scan not in cfg["scans"]:
        raise CellstageError(f"--scan {scan!r} is not a key of config 'scans' ({sorted(cfg['scans'])})")
    f = cfg["finetune"]
    if init not in f["recipe"]:
        raise CellstageError(f"--init {init!r}: config finetune.recipe has no recipe for it ({sorted(f['recipe'])})")
    if init == "imagenet" and pretrained is None:
        pretrained = f["imagenet_weights"].get(backbone)
        if not pretrained:
            raise CellstageError(f"--init imagenet: set config finetune.imagenet_weights.{backbone} or --pretrained")
    _run(stage.finetune, train_zarr=list(train_zarr), train_index=list(train_index), test_zarr=list(test_zarr),
         test_index=list(test_index), pretrained=str(pretrained) if pretrained else None, out_dir=out_dir,
         fold=fold, backbone=backbone, img_size=cfg["scans"][scan]["crop_size"], background=background,
         distance=distance, n_folds=f["n_folds"], init=init, recipe=f["recipe"][init],
         recipe_settings=f["recipes"][f["recipe"][init]], batch_size=f["batch_size"],
         group_by=f["group_by"], classes=cfg["classes"], static_classes=cfg["static_classes"], seed=cfg["seed"],
         threads=threads, devices=1, fold_index=[str(p) for p in fold_index] or None)


def _sheet(cfg: dict):
    import pandas as pd

    path = Path(cfg["samples"])
    if not path.is_file():
        raise CellstageError(f"config 'samples': slide sheet {path} not found")
    return pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)


@app.command("export-uncertain")
def export_uncertain(
    experiment: Annotated[Path, typer.Argument(help="results/finetune/<scan>/<bg>/<backbone>/<init>/<dist>/<loss>")],
    out_dir: Path,
    n: Annotated[int, typer.Option("--n", help="cells per slide")] = 50,
    measure: Annotated[str, typer.Option(help="entropy or margin of the fold ensemble")] = "entropy",
    split: Annotated[str, typer.Option(help="test (fold ensemble) or val (train slides, out of fold)")] = "test",
    cells_dir: Annotated[Path, typer.Option(help="folder of the cell tables")] = Path("results/cells"),
    config: ConfigOpt = Path("config/config.yaml"),
):
    """The N most uncertain cells per slide -> QuPath point annotations (<out_dir>/<reference slide>.geojson)."""
    from .report import roundtrip

    cfg = _config(config)
    folds = sorted(experiment.glob("fold*/predictions.parquet"))
    if not folds:
        typer.secho(f"error: {experiment}: no fold*/predictions.parquet (run the workflow first)", fg="red", err=True)
        raise typer.Exit(2)
    _run(lambda: roundtrip.export_uncertain(
        folds, out_dir, n=n, classes=cfg["classes"], cells_dir=cells_dir, measure=measure, split=split,
        ref_slide_of=roundtrip.reference_slides(_sheet(cfg), cfg["reference_scan"])))


@app.command("import-labels")
def import_labels(
    geojson: Path,
    slide: Annotated[str, typer.Option(help="reference slide id (sheet column slide) the points belong to")],
    annotator: Annotated[str, typer.Option(help="who labelled them (kept in the history)")],
    points: Annotated[Optional[Path], typer.Option(help="points file; default: the sheet's")] = None,
    tolerance: Annotated[float, typer.Option(help="px: a point this close to an existing one relabels it")] = 3.0,
    config: ConfigOpt = Path("config/config.yaml"),
):
    """Merge annotated points into the slide's points file (history in <points>.history.csv)."""
    from .report import roundtrip

    cfg = _config(config)

    def _import():
        target = points
        if target is None:
            sheet = _sheet(cfg)
            row = sheet[sheet["slide"] == slide]
            if row.empty:
                raise CellstageError(f"--slide {slide!r} is not in the sheet {cfg['samples']}")
            if not row["points"].iloc[0]:
                raise CellstageError(f"{cfg['samples']}: slide {slide} has no 'points' file; enter a path "
                                     f"(e.g. resources/{slide}.points.geojson) in that column or pass --points")
            target = Path(row["points"].iloc[0])
        return roundtrip.import_labels(geojson, target, classes=cfg["classes"], annotator=annotator,
                                       tolerance_px=tolerance)

    _run(_import)


def main() -> None:  # pragma: no cover
    try:
        app()
    except CellstageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
