"""Label agreement between two annotators on the intermediate-label scale of seed 000 §4.1.

Seed 000 §4.1 ("Analysis of Annotation Process"): besides the six dynamic classes the annotators
could use *intermediate* labels "when they believed a cell was between two stages, resulting in a
total of 11 label options". :func:`intermediate_scale` builds that scale from a
:class:`~cellstage.taxonomy.Taxonomy`: between each pair of consecutive dynamic classes
(``Spg Ad``, ``Spg``) sits one intermediate label (``Spg Ad/Spg``), so the developmental sequence
becomes ``Spg Ad, Spg Ad/Spg, Spg, Spg/Pl-Z, Pl-Z, ..., rsptd/esptd, esptd`` (6 + 5 = 11 steps).
Static classes (PMC, SC) stay as they are.

Scoring (Tables 2 and 3 of seed 000), read from the paper's text: "Top-1 Acc, the previously
described Adjacent-1 Dynamic (Adj.-1 Dyn.) Acc (which includes the classes immediately before and
after the correct class), and an extended Adjacent-2 Dynamic (Adj.-2 Dyn.) Acc (which includes two
classes before and after), similar to the previous Adjacent-1 Dynamic Acc on six classes due to
the introduction of intermediate labels". So the Adjacent-k rule of §3.2
(:func:`~cellstage.metrics.accuracy.adjacent_k_dynamic_accuracy`) is applied unchanged, with the
steps counted on the 11-label scale:

* an intermediate label is one step from *either* neighbouring stage: ``Spg/Pl-Z`` agrees with
  ``Spg`` and with ``Pl-Z`` under Adj-1 Dyn;
* two different stages next to each other (``Spg`` vs ``Pl-Z``) or two consecutive intermediates
  are two steps apart: they agree under Adj-2 Dyn only, which is therefore exactly Adjacent-1
  Dynamic on the six classes ("similar to ... on six classes");
* Top-1 is exact agreement (Adjacent-0): an intermediate never equals a stage;
* static classes must match exactly, and the Dynamic metrics count only cells whose reference
  label (the first of the two label vectors) is dynamic or intermediate.

The metrics are symmetric when both annotators use only dynamic/intermediate labels (the paper's
48 cells: eight of each dynamic class).
"""

from __future__ import annotations

import numpy as np

from ..taxonomy import Taxonomy
from .accuracy import adjacent_k_accuracy, adjacent_k_dynamic_accuracy

DEFAULT_SEPARATOR = "/"
AGREEMENT_METRICS = ("top1", "adj1_dyn", "adj2_dyn")
AGREEMENT_NAMES = {"top1": "Top-1", "adj1_dyn": "Adj-1 Dyn", "adj2_dyn": "Adj-2 Dyn"}


def intermediate_label(a: str, b: str, separator: str = DEFAULT_SEPARATOR) -> str:
    """Name of the intermediate label between consecutive dynamic classes ``a`` and ``b``."""
    return f"{a}{separator}{b}"


def intermediate_scale(taxonomy: Taxonomy, separator: str = DEFAULT_SEPARATOR) -> Taxonomy:
    """The taxonomy with one intermediate label inserted after every dynamic class but the last.

    Seed 000 §4.1: 6 dynamic classes + 5 intermediates = 11 labels (13 with PMC and SC). The
    result is an ordinary :class:`Taxonomy`, so every metric of :mod:`cellstage.metrics` works on it;
    its ``stage()`` positions are 0..10 with the intermediates on the odd positions.
    """
    if not separator:
        raise ValueError("separator of intermediate labels must not be empty")
    dyn = taxonomy.dynamic
    nxt = dict(zip(dyn[:-1], dyn[1:]))
    classes: list[str] = []
    for c in taxonomy.classes:
        classes.append(c)
        if c in nxt:
            classes.append(intermediate_label(c, nxt[c], separator))
    clash = sorted({c for c in classes if classes.count(c) > 1})
    if clash:
        raise ValueError(f"intermediate labels clash with class names: {clash}; "
                         f"choose another separator than {separator!r}")
    return Taxonomy(classes=tuple(classes), static=taxonomy.static)


def label_agreement(labels_a, labels_b, scale: Taxonomy) -> dict:
    """Agreement of two label vectors (class indices of ``scale``), seed 000 Tables 2-3.

    Returns ``{"top1", "adj1_dyn", "adj2_dyn", "n", "n_dyn"}`` as fractions in [0, 1] (NaN when
    undefined). ``labels_a`` is the reference: the Dynamic metrics count the cells whose label in
    ``labels_a`` is dynamic (a stage or an intermediate of ``scale``).
    """
    a = np.asarray(labels_a, dtype=np.int64)
    b = np.asarray(labels_b, dtype=np.int64)
    top1 = adjacent_k_accuracy(a, b, scale, 0)  # Adjacent-0 is exact agreement (labels validated here)
    stage = np.asarray(scale.stage(), dtype=np.int64)
    return {
        "top1": top1,
        "adj1_dyn": adjacent_k_dynamic_accuracy(a, b, scale, 1),
        "adj2_dyn": adjacent_k_dynamic_accuracy(a, b, scale, 2),
        "n": int(a.size),
        "n_dyn": int((stage[a] >= 0).sum()),
    }
