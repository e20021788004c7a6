"""Simulated annotator study for the demo (seed 000 §4.1, Tables 2-3).

Like the paper ("we selected eight cells from each class of the test dataset and had them labelled
by three different annotators in their respective 20× SZP and 40× EFI versions"), up to
``annotator_cells_per_class`` cells of every dynamic class are drawn from the test sections and
labelled by the preset's simulated annotators on both scans, on the 11-label scale of six stages
and five intermediates (:func:`cellstage.metrics.intermediate_scale`).

A label is the true position on that scale (stage ``s`` sits at ``2 s``) plus a per-cell
ambiguity shared by every annotator (cells that look in-between), plus the annotator's own
Gaussian noise (its ``noise``, times ``annotator_noise_20x`` on the blurrier 20× scan), rounded to
the nearest label and clipped to the sequence. An annotator with two rounds labels the same cells
again with fresh noise. Output, beside the rest of the demo::

    annotators/{annotator}_r{round}_{scan}.csv   cell,section,x,y,label   (x, y: that scan's level-0 px)
    annotators.tsv                               annotator, round, scan, labels (relative to its folder)

The draws come from their own seed stream, so the demo's other files do not change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellstage.metrics import intermediate_scale
from cellstage.taxonomy import Taxonomy

SHEET_COLUMNS = ("annotator", "round", "scan", "labels")
_STREAM = 0xA77  # entropy word that separates this stream from the sections' streams


def simulate_labels(rng, positions, noise: float, n_positions: int) -> np.ndarray:
    """Noisy integer positions on the intermediate scale: ``round(positions + N(0, noise))``, clipped."""
    pos = np.asarray(positions, dtype=float) + rng.normal(0.0, noise, len(positions))
    return np.clip(np.rint(pos), 0, n_positions - 1).astype(np.int64)


def _pick_cells(rng, truths, dynamic, per_class):
    """(section, cell id, x40, y40, stage, homography) of up to ``per_class`` cells of each stage."""
    pool = [(t["section"], cid, x, y, dynamic.index(c), t["homography_40x_to_20x"])
            for t in truths if t["split"] == "test"
            for cid, (x, y), c in zip(t["cell_ids"], t["points"], t["true_labels"]) if c in dynamic]
    chosen = []
    for stage in range(len(dynamic)):
        idx = [i for i, p in enumerate(pool) if p[4] == stage]
        take = min(per_class, len(idx))
        if take:
            chosen += [pool[i] for i in sorted(rng.choice(idx, take, replace=False))]
    return chosen


def _xy(scan, x, y, hm):
    if scan == "40x":
        return x, y
    v = np.asarray(hm, dtype=float) @ np.array([x, y, 1.0])
    return float(v[0] / v[2]), float(v[1] / v[2])


def write_annotator_study(out: Path, cfg, seed: int, truths: list[dict]) -> Path | None:
    """Write the simulated labels files and ``annotators.tsv``; None when there is nothing to label."""
    if not cfg.annotators:
        return None
    scale = intermediate_scale(Taxonomy(classes=tuple(cfg.classes), static=tuple(cfg.static)))
    dyn_scale = scale.dynamic  # 11 labels: stage, intermediate, stage, ...
    dynamic = Taxonomy(classes=tuple(cfg.classes), static=tuple(cfg.static)).dynamic
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM]))
    cells = _pick_cells(rng, truths, dynamic, cfg.annotator_cells_per_class)
    if not cells:
        return None
    truth_pos = 2 * np.array([c[4] for c in cells], dtype=float)
    ambiguity = rng.normal(0.0, cfg.annotator_ambiguity, len(cells))
    (out / "annotators").mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(SHEET_COLUMNS)]
    for scan in ("40x", "20x"):
        factor = cfg.annotator_noise_20x if scan == "20x" else 1.0
        for name, noise, n_rounds in cfg.annotators:
            for rnd in range(1, int(n_rounds) + 1):
                pos = simulate_labels(rng, truth_pos + ambiguity, float(noise) * factor, len(dyn_scale))
                rel = f"annotators/{name}_r{rnd}_{scan}.csv"
                rows = ["cell,section,x,y,label"]
                for (section, cid, x, y, _, hm), p in zip(cells, pos):
                    sx, sy = _xy(scan, x, y, hm)
                    rows.append(f"{section}_{cid},{section},{sx:.2f},{sy:.2f},{dyn_scale[p]}")
                (out / rel).write_text("\n".join(rows) + "\n")
                lines.append("\t".join([name, str(rnd), scan, rel]))
    sheet = out / "annotators.tsv"
    sheet.write_text("\n".join(lines) + "\n")
    return sheet
