"""The AML paper's (seed 003) tables and figure from stored outputs (rule ``aml_report``).

* Table 2 shape — :func:`cellstage.reduce.levels.aml_reduction_from_files`: per level and task the
  % of pixels removed against the original selection (the inner tiles) and the number of images;
* Tables 3–8 shapes — :func:`cellstage.mil.tables.cv_tables`: per (task, level, background) the
  per-fold training and validation loss and accuracy of every model, mean and std over the folds;
* Fig. 3 shape — validation accuracy of every fold by level (all backbones and background
  modalities), one panel per task;
* the out-of-fold summary (not in seed 003) — :func:`cellstage.mil.tables.out_of_fold_summary`:
  per model the validation slides of all folds pooled, slide accuracy and ROC AUC
  (``out_of_fold.csv``, and the end of ``cv_tables.md``);
* the slides each MIL run left out (fewer than ``aml.mil.min_instances`` crops, §3).

Every Markdown table starts with the provenance line (config hash, git commit, version, input
checksums), and ``provenance.json`` holds the details.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..exclusion import exclusion_table
from ..utils import atomic_path, write_json
from .provenance import markdown_block, report_provenance

log = logging.getLogger("cellstage.report")

LEVEL_NAMES = {"one": "Level One", "two": "Level Two", "three": "Level Three"}


def _flatten(tables: Mapping) -> pd.DataFrame:
    """One long table (task, level, background, fold, model, split, metric, value) of all CV tables."""
    rows = []
    for (task, level, bg), table in sorted(tables.items()):
        long = table.stack(list(range(table.columns.nlevels)), future_stack=True).rename("value").reset_index()
        long.insert(0, "background", bg)
        long.insert(0, "level", level)
        long.insert(0, "task", task)
        rows.append(long)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["task", "level", "background", "fold", "model", "split", "metric", "value"])


def accuracy_by_level_figure(metrics_paths: Sequence[str], out_png) -> pd.DataFrame:
    """Seed 003 Fig. 3 shape: validation accuracy per fold by level, one panel per task (boxes
    over all backbones, attention and background modalities, the points on top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for p in metrics_paths:
        m = json.loads(Path(p).read_text())
        c = m["config"]
        rows.append({"task": c["task"], "level": c["level"], "val_acc": float(m["final"]["val_acc"])})
    df = pd.DataFrame(rows, columns=["task", "level", "val_acc"])
    tasks = sorted(df["task"].unique()) or ["-"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        part = df[df["task"] == task]
        levels = [lv for lv in LEVEL_NAMES if lv in set(part["level"])]
        data = [part.loc[part["level"] == lv, "val_acc"].to_numpy() for lv in levels]
        if data:
            ax.boxplot(data, showfliers=False)
            for i, d in enumerate(data, start=1):
                ax.plot(np.full(len(d), i) + np.linspace(-0.12, 0.12, len(d)), d, "o", ms=3, alpha=0.6)
        ax.set_xticks(range(1, len(levels) + 1), [LEVEL_NAMES[lv] for lv in levels])
        ax.set_ylim(0, 1)
        ax.set_title(task)
        ax.set_ylabel("validation accuracy")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return df


def aml_report(inputs: Mapping, outputs: Mapping, *, labels: Mapping, tasks: Mapping, experiments: Sequence,
               n_folds: int, min_instances: int, crop_size: int, patch_size: int, config_hash: str,
               excluded: Sequence[Mapping] = ()) -> dict:
    """Write every output of rule ``aml_report`` (see the module docstring). ``excluded``: the
    records of slides left out upstream (:mod:`cellstage.exclusion`), written as ``excluded``."""
    from ..mil.tables import caption, cv_tables, out_of_fold_markdown, out_of_fold_summary, to_markdown
    from ..reduce.levels import aml_reduction_from_files, table2_layout

    metrics = list(inputs.get("metrics", []))
    files = [*metrics, *inputs.get("level1", []), *inputs.get("level2", []), *inputs.get("level3", [])]
    prov = report_provenance(config_hash, files, {"experiments": list(experiments), "n_folds": int(n_folds)})
    head = markdown_block(prov)

    reduction = aml_reduction_from_files(list(inputs.get("level1", [])), list(inputs.get("level2", [])),
                                         list(inputs.get("level3", [])), {k: dict(v) for k, v in labels.items()},
                                         list(tasks), int(min_instances), int(crop_size), int(patch_size))
    with atomic_path(outputs["reduction"]) as tmp:
        reduction.to_csv(tmp, index=False)
    wide = table2_layout(reduction) if len(reduction) else reduction
    with atomic_path(outputs["reduction_md"]) as tmp:
        tmp.write_text(head + "\n**Table 2 (seed 003 shape): data reduction per level and task** — "
                       "Reduction = % of the selected pixels removed.\n\n" + wide.to_markdown() + "\n")

    tables = cv_tables(metrics, int(n_folds))
    with atomic_path(outputs["cv_csv"]) as tmp:
        _flatten(tables).to_csv(tmp, index=False)
    md = [head]
    for key, table in sorted(tables.items()):
        md.append(to_markdown(table, caption(*key)))
    oof = out_of_fold_summary(metrics)
    md.append(out_of_fold_markdown(oof))
    if "out_of_fold" in outputs:
        with atomic_path(outputs["out_of_fold"]) as tmp:
            oof.to_csv(tmp, index=False)
    with atomic_path(outputs["cv_md"]) as tmp:
        tmp.write_text("\n".join(md) + "\n")

    accuracy_by_level_figure(metrics, outputs["levels"])

    skipped = []
    for p in metrics:
        m = json.loads(Path(p).read_text())
        c = m["config"]
        for s in m.get("skipped", []):
            skipped.append({"task": c["task"], "level": c["level"], "model": c.get("model"), "fold": c.get("fold"),
                            **s})
    skipped_df = pd.DataFrame(skipped, columns=["task", "level", "model", "fold", "slide", "n_instances", "split"])
    with atomic_path(outputs["skipped"]) as tmp:
        skipped_df.to_csv(tmp, index=False)
    if "excluded" in outputs:
        with atomic_path(outputs["excluded"]) as tmp:
            exclusion_table(excluded).to_csv(tmp, index=False)
    write_json(outputs["provenance"], prov)
    log.info("AML report: %d reduction rows, %d CV tables, %d skipped slide entries", len(reduction), len(tables),
             len(skipped_df))
    return {"reduction": reduction, "tables": tables}
