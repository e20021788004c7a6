"""Stage entry point: the paper-shaped tables and figures, per-stage counts and QuPath export.

Reads the fold metrics, predictions and test embeddings, the crop indexes (and stores, for the
staining intensity), the per-slide stage outputs and the converted slides' pixel sizes; calls
:mod:`cellstage.report.tables`, :mod:`.paper`, :mod:`.figures`, :mod:`.embedding`,
:mod:`.stages` and :mod:`.ensemble`; writes every output atomically. ``experiments`` comes from the
workflow (name -> configuration + its fold files): nothing is parsed back out of paths. Nothing is
trained: the whole report is rebuilt from stored outputs (``make tables``).

Outputs (keys of ``outputs``; seed 000 shapes):

* ``csv``, ``md``, ``folds``, ``summary``: every configuration, mean ± std over folds (with its
  init and recipe), the fold rows, and the best configuration's numbers;
* ``table1_csv``/``table1_md``: Table 1 (cells per class and split, per scan);
* ``a5_*``, ``a6_*``, ``a7_*`` (``_csv``/``_md``): Tables A.5 (scratch), A.6 (ImageNet), A.7
  (with background; SSL and baseline recipes side by side);
* ``probes_csv``/``probes_md``: kNN and linear probes of every pretraining run's frozen backbone
  beside a random-init one (inputs ``probes``: the runs' ``probe.json``; :mod:`.probes`);
* ``losses_csv``/``losses_md``: ordinal-aware against plain training on the same folds, for every
  configuration trained with several losses (:mod:`.losses`; the paper tables keep ``ce`` rows);
* ``fig4``, ``fig6``, ``boxplot`` (Fig. 7), ``umap`` (Fig. 5), ``confusion`` (best configuration,
  fold ensemble), ``confusion_scans`` + ``confusion_csv`` (best configuration of every scan);
* ``stages``, ``geojson``; ``provenance``: provenance.json (config hash, git commit, package
  version, sha256 of every input and of every table written). Every Markdown table starts with
  the provenance line (:func:`cellstage.report.provenance.markdown_block`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..exclusion import exclusion_table
from ..io.slides import ZarrSlide
from ..metrics import confusion
from ..utils import atomic_path, file_sha256, write_json
from .embedding import panel_data
from .ensemble import export_qupath, fold_ensemble
from .figures import confusion_figure, confusion_grid, fig4_boxplots, fig6_boxplots, metric_boxplots, umap_figure
from .losses import loss_markdown, loss_table
from .paper import PAPER_TABLES, dataset_markdown, dataset_table, paper_markdown, paper_table
from .probes import probe_markdown, probe_table
from .provenance import config_hash as _config_hash
from .provenance import markdown_block, report_provenance
from .stages import stage_table
from .tables import METRICS, best_experiment, fold_table, markdown_table, summary_table

log = logging.getLogger("cellstage.report")


def _as_list(x) -> list:
    if not x:
        return []
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)


def _write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _write_csv(path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def _fold_files(spec: Mapping, key: str) -> list[Path]:
    """A configuration's per-fold ``key`` files (given, or beside each metrics.json)."""
    if spec.get(key):
        return [Path(p) for p in spec[key]]
    return [Path(p).with_name(f"{key}.parquet") for p in spec["metrics"]]


def _umap_panels(summary: pd.DataFrame, experiments: Mapping, metric: str, crop_stores, classes, seed: int):
    """Fig. 5 panels: per init (grid order), its best configuration with background (by val
    ``metric``), embeddings of that configuration's first fold."""
    panels = []
    cand = summary[summary["background"].astype(bool)] if "background" in summary else summary
    for init in dict.fromkeys(cand.get("init", pd.Series(dtype=str))):
        sub = cand[cand["init"] == init]
        best = best_experiment(sub.reset_index(drop=True), metric=metric, split="val")
        path = _fold_files(experiments[best], "embeddings")[0]
        log.info("UMAP: %s (%s)", best, path)
        panels.append((f"{best} fold 0", panel_data(path, crop_stores, classes, seed=seed)))
    return panels


def report(inputs: Mapping, outputs: Mapping, *, experiments: Mapping[str, Mapping], classes: Sequence[str],
           metric: str, config_hash: str | None = None, config: Mapping | None = None, seed: int = 0,
           min_points_on_nuclei: float | None = None, excluded: Sequence[Mapping] = ()) -> dict:
    """Paper-shaped tables, figures, per-stage counts and QuPath GeoJSON of the classified test cells.

    The best configuration is chosen by its mean validation ``metric`` over folds; its fold models'
    test probabilities are averaged per cell (fold ensemble) for the confusion matrix and the
    GeoJSON; the same is done per scan for the per-scan confusion matrices. ``config_hash``
    identifies the configuration in the provenance record (or is computed from ``config``).
    Outputs other than ``csv``, ``md``, ``folds``, ``summary``, ``boxplot``, ``confusion``,
    ``stages`` and ``geojson`` are written only when their key is given. Slides whose share of annotated points
    on a segmented nucleus is below ``min_points_on_nuclei`` are flagged in the stage table and
    warned about in the log and the Markdown, with advice. ``excluded``: the records of the slides
    left out upstream with ``require_all_slides: false`` (:mod:`cellstage.exclusion`), written as
    ``excluded`` (CSV) and listed in the Markdown with their errors.
    """
    classes = list(classes)
    if config_hash is None:
        config_hash = _config_hash(config or {})
    file_inputs = [p for key in inputs for p in _as_list(inputs[key])]
    prov = report_provenance(config_hash, file_inputs, settings={"metric": metric, "seed": seed, "classes": classes})
    header = markdown_block(prov)

    folds = fold_table(experiments)
    summary = summary_table(folds)
    best = best_experiment(summary, metric=metric, split="val")
    _write_csv(outputs["folds"], folds)
    _write_csv(outputs["csv"], summary)

    # Table 1 and Tables A.5-A.7
    indexes = [pd.read_parquet(p, columns=["scan", "split", "label_idx"]) for p in _as_list(inputs.get("crops"))
               if "table1_csv" in outputs]
    if "table1_csv" in outputs:
        table1 = dataset_table(indexes, classes)
        _write_csv(outputs["table1_csv"], table1)
        _write_text(outputs["table1_md"], dataset_markdown(table1, header=header))
    for which, (title, _, keys) in PAPER_TABLES.items():
        key = which.lower()
        if f"{key}_csv" not in outputs:
            continue
        table = paper_table(summary, which)
        _write_csv(outputs[f"{key}_csv"], table)
        _write_text(outputs[f"{key}_md"], paper_markdown(table, keys, title=title, best=best, header=header))

    # frozen-backbone probes of the pretraining runs (issue 12 item 7)
    if "probes_csv" in outputs:
        probes = probe_table(_as_list(inputs.get("probes")))
        _write_csv(outputs["probes_csv"], probes)
        _write_text(outputs["probes_md"], probe_markdown(probes, header=header))

    # ordinal-aware losses against cross-entropy (issue 14 item 4)
    if "losses_csv" in outputs:
        losses = loss_table(summary)
        _write_csv(outputs["losses_csv"], losses)
        _write_text(outputs["losses_md"], loss_markdown(losses, header=header))

    # Figures 4, 6, 7 (Figs 4 and 6 are the paper's, trained with cross-entropy)
    chance = 1.0 / len(classes)
    metric_boxplots(folds, outputs["boxplot"], chance=chance)
    paper_folds = folds[folds["loss"] == "ce"] if "loss" in folds.columns else folds
    if "fig4" in outputs:
        fig4_boxplots(paper_folds, outputs["fig4"])
    if "fig6" in outputs:
        fig6_boxplots(paper_folds, outputs["fig6"])

    # confusion: best configuration overall and per scan (fold ensembles of the test predictions)
    ensemble = fold_ensemble(_fold_files(experiments[best], "predictions"))
    cm = confusion_figure(ensemble["label_idx"], ensemble["pred"], classes, outputs["confusion"],
                          title=f"{best}: test, fold ensemble")
    per_scan, cm_rows = [], []
    for scan in dict.fromkeys(summary["scan"]) if "scan" in summary else []:
        best_scan = best_experiment(summary[summary["scan"] == scan].reset_index(drop=True), metric=metric, split="val")
        ens = fold_ensemble(_fold_files(experiments[best_scan], "predictions"))
        cm_scan = confusion(ens["label_idx"], ens["pred"], len(classes))
        per_scan.append((f"{scan}: {best_scan}", cm_scan))
        cm_rows += [{"scan": scan, "experiment": best_scan, "annotated": classes[i], "predicted": classes[j],
                     "count": int(cm_scan[i, j])} for i in range(len(classes)) for j in range(len(classes))]
    if "confusion_scans" in outputs:
        confusion_grid(per_scan, classes, outputs["confusion_scans"])
        _write_csv(outputs["confusion_csv"], pd.DataFrame(cm_rows, columns=["scan", "experiment", "annotated",
                                                                            "predicted", "count"]))

    # Figure 5: UMAP of the test embeddings
    if "umap" in outputs:
        crop_stores = {Path(p).name.removesuffix(".zarr"): p for p in _as_list(inputs.get("crop_zarr"))}
        umap_figure(_umap_panels(summary, experiments, metric, crop_stores, classes, seed), classes, outputs["umap"])

    stages = stage_table(inputs, min_points_on_nuclei=min_points_on_nuclei)
    qc = stages.get("segmentation_qc", pd.Series(dtype=object))
    qc_warnings = [f"{slide}: {msg}" for slide, msg in zip(stages["slide"], qc)
                   if isinstance(msg, str) and msg not in ("", "ok")]
    for w in qc_warnings:
        log.warning("segmentation QC %s", w)
    _write_csv(outputs["stages"], stages)
    gone = exclusion_table(excluded)
    if "excluded" in outputs:
        _write_csv(outputs["excluded"], gone)

    slides = {Path(p).name.removesuffix(".ome.zarr"): p for p in _as_list(inputs["slides"])}
    cell_tables = {Path(p).stem: p for p in _as_list(inputs["cells"])}
    needed = set(ensemble["slide"].astype(str))
    export_qupath(ensemble, cell_tables, {s: ZarrSlide(slides[s]).mpp for s in needed}, classes, outputs["geojson"])

    best_row = summary.set_index("experiment").loc[best]
    result = {
        "best_experiment": best,
        "selected_by": f"val {metric}",
        "chance_top1": chance,
        "test": {m: float(best_row[f"test_{m}_mean"]) for m in METRICS},
        "val": {m: float(best_row[f"val_{m}_mean"]) for m in METRICS},
        "test_ensemble_top1": float((ensemble["pred"] == ensemble["label_idx"]).mean()) if len(ensemble) else None,
        "confusion_test_ensemble": cm.tolist(),
        "n_configurations": int(len(summary)),
        "n_folds": int(folds["fold"].nunique()),
        "excluded_slides": list(gone["slide"]),
        "provenance": {k: prov[k] for k in ("cellstage_version", "config_hash", "git", "inputs_digest")},
    }
    md = [
        "# Cross-validation results",
        "",
        header,
        f"{result['n_configurations']} configurations x {result['n_folds']} folds; mean ± std over folds in %. "
        f"Best configuration by validation {metric}: **{best}** (chance Top-1 = {100 * chance:.1f} %).",
        "",
        markdown_table(summary, best=best),
        "## Pipeline stages",
        "",
        stages.to_markdown(index=False),
        "",
        *([f"**Segmentation QC warning** - {w}" for w in qc_warnings] + [""] if qc_warnings else []),
        *(["## Excluded slides", "",
           f"{len(gone)} slide(s) failed and were left out of every table (require_all_slides: false):", "",
           gone.to_markdown(index=False), ""] if len(gone) else []),
    ]
    _write_text(outputs["md"], "\n".join(md))
    write_json(outputs["summary"], result)
    if "provenance" in outputs:
        written = [k for k in outputs if k not in ("provenance", "geojson") and Path(outputs[k]).is_file()]
        write_json(outputs["provenance"], {**prov, "outputs": {str(outputs[k]): file_sha256(outputs[k])
                                                               for k in written}})
    log.info("report: best %s test %s", best, result["test"])
    return result
