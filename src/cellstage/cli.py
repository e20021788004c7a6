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
    import yaml

    if not path.is_file():
        raise CellstageError(f"config file not found: {path}")
    return yaml.safe_load(path.read_text()) or {}


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
def convert(slide: Path, out: Path, backend: Optional[str] = None, mpp: Optional[float] = None, tile: int = 512):
    """Slide -> OME-Zarr multiscale (streamed tile by tile)."""
    from . import stages

    _run(stages.convert, slide, out, backend=backend, mpp=mpp, tile=tile)


@app.command("train-segmenter")
def train_segmenter(
    out_model: Path,
    slides: Annotated[list[Path], typer.Option("--slide", help="converted slide (.ome.zarr); repeat")],
    masks: Annotated[list[Path], typer.Option("--masks", help="nucleus label TIFF per slide; repeat")],
    config: ConfigOpt = Path("config/config.yaml"),
):
    """Train the Cellpose segmenter on nucleus masks."""
    from . import stages

    cfg = _config(config)
    _run(stages.train_segmenter, slides, masks, out_model, seg=cfg.get("segmentation", {}), seed=cfg.get("seed", 0))


@app.command()
def segment(slide: Path, tubules: Path, out_labels: Path, model: Optional[Path] = None,
            config: ConfigOpt = Path("config/config.yaml")):
    """Tiled nucleus segmentation inside the tubules -> label store."""
    from . import stages

    _run(stages.segment, slide, tubules, str(model) if model else None, out_labels,
         seg=_config(config).get("segmentation", {}))


@app.command()
def cells(labels: Path, slide: Path, tubules: Path, out: Path, points: Optional[Path] = None,
          config: ConfigOpt = Path("config/config.yaml")):
    """Cell table (morphology, distance to the tubule wall, annotated class)."""
    from . import stages

    cfg = _config(config)
    _run(lambda: {"cells": len(stages.cells(labels, slide, tubules, points, out, slide_id=slide.name.split(".")[0],
                                             classes=cfg["classes"]))})


@app.command()
def register(ref: Path, mov: Path, out_json: Path, out_png: Path, config: ConfigOpt = Path("config/config.yaml")):
    """ORB + Hamming + RANSAC homography between two scans of a section, with QC overlay."""
    from . import stages

    _run(stages.register, ref, mov, out_json, out_png, reg=_config(config).get("registration", {}))


@app.command()
def crops(slide: Path, labels: Path, cells_table: Path, out_zarr: Path, out_index: Path, size: int = 80,
          section: str = "", scan: str = "", patient: str = "", split: str = "unlabelled",
          config: ConfigOpt = Path("config/config.yaml")):
    """Crops around every nucleus (with and without background) into Zarr + index."""
    from . import stages

    meta = dict(section=section, scan=scan, patient=patient, split=split)
    _run(stages.extract_crops, slide, labels, cells_table, out_zarr, out_index, size=size, meta=meta,
         classes=_config(config)["classes"])


@app.command("train-grader")
def train_grader(
    out_dir: Path,
    slides: Annotated[list[Path], typer.Option("--slide", help="converted slide (.ome.zarr); repeat")],
    grades: Annotated[list[Path], typer.Option("--grades", help="CSV x,y,grade per slide; repeat")],
    size: int = 80,
    config: ConfigOpt = Path("config/config.yaml"),
):
    """Train the grading network (seed 003) on expert quality grades."""
    from . import stages

    cfg = _config(config)
    _run(stages.train_grader, slides, grades, out_dir, grading=cfg.get("grading", {}), size=size,
         seed=cfg.get("seed", 0))


@app.command()
def grade(model_dir: Path, crops_zarr: Path, crops_index: Path, out: Path, threshold: float = 0.5):
    """Apply the grading network to a slide's crops -> keep-list."""
    from . import stages

    _run(lambda: {"kept": int(stages.grade(model_dir, crops_zarr, crops_index, out, threshold=threshold)["keep"].sum())})


@app.command()
def pretrain(
    run: str = typer.Argument(..., help="{method}-{backbone}-{scan}, e.g. simclr-resnet18-40x"),
    out_dir: Path = typer.Argument(...),
    zarr: Annotated[list[Path], typer.Option("--zarr", help="crops zarr; repeat")] = (),
    index: Annotated[list[Path], typer.Option("--index", help="crops index parquet, same order; repeat")] = (),
    grading: Annotated[list[Path], typer.Option("--grading", help="grading keep-list parquet; repeat")] = (),
    config: ConfigOpt = Path("config/config.yaml"),
):
    """Self-supervised pretraining on unlabelled crops."""
    from . import stages

    cfg = _config(config)
    _run(stages.pretrain, run, list(zarr), list(index), list(grading), out_dir / "backbone.safetensors",
         pretrain=cfg.get("pretrain", {}), scans=cfg["scans"], seed=cfg.get("seed", 0))


@app.command()
def finetune(
    out_dir: Path,
    fold: int,
    train_zarr: Annotated[list[Path], typer.Option("--train-zarr")],
    train_index: Annotated[list[Path], typer.Option("--train-index")],
    test_zarr: Annotated[list[Path], typer.Option("--test-zarr")] = (),
    test_index: Annotated[list[Path], typer.Option("--test-index")] = (),
    scan: str = "40x",
    backbone: str = "resnet18",
    background: bool = True,
    distance: bool = False,
    pretrained: Optional[Path] = None,
    config: ConfigOpt = Path("config/config.yaml"),
):
    """One cross-validation fold: train on the other folds, evaluate on this fold and the test slides."""
    from . import stages

    cfg = _config(config)
    experiment = dict(scan=scan, backbone=backbone, background=background, distance=distance,
                      init="pretrained" if pretrained else "scratch")
    _run(stages.finetune, train=list(zip(train_zarr, train_index)), test=list(zip(test_zarr, test_index)),
         pretrained=str(pretrained) if pretrained else None, out_metrics=out_dir / "metrics.json", fold=fold,
         experiment=experiment, finetune=cfg.get("finetune", {}), scans=cfg["scans"], classes=cfg["classes"],
         static_classes=cfg["static_classes"], seed=cfg.get("seed", 0))


def main() -> None:  # pragma: no cover
    try:
        app()
    except CellstageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
