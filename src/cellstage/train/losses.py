"""Fine-tuning losses that know the developmental order (config ``finetune.grid.loss``).

Seed 000 §4.1 (Tables 2-3) finds that annotators disagree mostly between *adjacent* stages
(Annotator 1's intra-variability: Top-1 50-60.4 %, far higher Adjacent-1 Dynamic), and its
conclusion (§6) says that "inter- and intra-variability can be accounted for when classifying
into potentially ambiguous cell stage labels, e.g. by metrics such as the Adjacency-1 Accuracy".
The paper trains with plain cross-entropy; these losses carry the same idea into training
(beyond the paper):

* ``ce`` — cross-entropy on the one-hot label (seed 000 §4.2-4.3; the default).
* ``soft`` — cross-entropy against soft labels: a dynamic class gives each *adjacent* dynamic
  stage ``adjacent_share`` of the target mass (one neighbour at either end of the sequence) and
  keeps the rest; static classes (``static_classes``, e.g. PMC, SC) stay exact one-hot, since
  they have no neighbours in the developmental order.
* ``ordinal`` — cross-entropy plus ``weight`` × the expected ordinal cost of the prediction,
  ``sum_j p_j C[y, j]``, where ``C`` is the stage distance ``|s_y - s_j| / (n_dynamic - 1)``
  between dynamic classes and 1 between a static class and any other class. A mistake two
  stages away costs twice a mistake to the next stage; the softmax output (and so Top-2 and
  the fold ensemble) is unchanged in kind.

All three keep the classifier a softmax over the configured classes, so every metric, the
report and the annotation round trip read their predictions the same way. This module holds the
names, settings and matrices and imports no torch (the workflow checks the config with it at
start-up); the classifier's loss module is :class:`cellstage.train.classifier.StageLoss`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..taxonomy import Taxonomy
from ..utils import CellstageError

__all__ = ["DEFAULT_SETTINGS", "LOSSES", "check_loss", "cost_matrix", "soft_targets"]

LOSSES = ("ce", "soft", "ordinal")
# the settings of each loss (config finetune.losses.<loss>), with their defaults
DEFAULT_SETTINGS: dict[str, dict] = {"ce": {}, "soft": {"adjacent_share": 0.1}, "ordinal": {"weight": 1.0}}


def check_loss(name: str, settings: Mapping | None = None, *, where: str = "finetune.losses") -> dict:
    """The full settings of loss ``name`` (defaults filled); a :class:`CellstageError` naming the
    config key for an unknown loss, an unknown setting or a value out of range."""
    if name not in LOSSES:
        raise CellstageError(f"config finetune.grid.loss: unknown loss {name!r}; choose one of {list(LOSSES)}")
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS[name]))
    if unknown:
        raise CellstageError(
            f"config {where}.{name}: unknown setting(s) {unknown}; {name!r} takes {sorted(DEFAULT_SETTINGS[name])}"
        )
    out = {**DEFAULT_SETTINGS[name], **settings}
    if name == "soft" and not 0.0 <= float(out["adjacent_share"]) < 0.5:
        raise CellstageError(
            f"config {where}.soft.adjacent_share: {out['adjacent_share']} must be in [0, 0.5) "
            "(each of two neighbours gets this share; the true stage must keep the most)"
        )
    if name == "ordinal" and not float(out["weight"]) >= 0.0:
        raise CellstageError(f"config {where}.ordinal.weight: {out['weight']} must be >= 0")
    return {k: float(v) for k, v in out.items()}


def soft_targets(taxonomy: Taxonomy, adjacent_share: float) -> np.ndarray:
    """Row ``y``: the target distribution of a cell labelled ``y`` (rows sum to 1).

    >>> t = soft_targets(Taxonomy(("S", "a", "b", "c"), ("S",)), 0.1)
    >>> t.tolist()[0], [round(v, 2) for v in t[2].tolist()]
    ([1.0, 0.0, 0.0, 0.0], [0.0, 0.1, 0.8, 0.1])
    """
    n = taxonomy.n_classes
    targets = np.eye(n, dtype=np.float64)
    dynamic = [taxonomy.index(c) for c in taxonomy.dynamic]
    for pos, i in enumerate(dynamic):
        neighbours = [dynamic[q] for q in (pos - 1, pos + 1) if 0 <= q < len(dynamic)]
        for j in neighbours:
            targets[i, j] = adjacent_share
        targets[i, i] = 1.0 - adjacent_share * len(neighbours)
    return targets


def cost_matrix(taxonomy: Taxonomy) -> np.ndarray:
    """``C[y, j]``: the cost of predicting ``j`` for a cell of class ``y`` (0 on the diagonal;
    stage distance / (n_dynamic - 1) between dynamic classes; 1 wherever a static class is involved)."""
    stage = taxonomy.stage()
    n, span = taxonomy.n_classes, max(len(taxonomy.dynamic) - 1, 1)
    cost = np.ones((n, n))
    for y in range(n):
        for j in range(n):
            if y == j:
                cost[y, j] = 0.0
            elif stage[y] >= 0 and stage[j] >= 0:
                cost[y, j] = abs(stage[y] - stage[j]) / span
    return cost
