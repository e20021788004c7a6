import math

import numpy as np
import pytest
from sklearn.metrics import top_k_accuracy_score

from cellstage.metrics import (
    adjacent_k_accuracy,
    adjacent_k_dynamic_accuracy,
    compute_metrics,
    confusion,
    top_k_accuracy,
)
from cellstage.taxonomy import Taxonomy

TAX = Taxonomy()  # PMC, SC, Spg Ad, Spg, Pl-Z, P, rsptd, esptd; static PMC, SC
IDX = {c: i for i, c in enumerate(TAX.classes)}


def _pairs(*pairs):
    y = np.array([IDX[t] for t, _ in pairs])
    p = np.array([IDX[q] for _, q in pairs])
    return y, p


@pytest.mark.parametrize(
    "true,pred,ok",
    [
        ("Spg Ad", "Spg", True),  # dynamic neighbours
        ("esptd", "rsptd", True),  # end of the sequence, predecessor
        ("P", "rsptd", True),  # successor
        ("P", "esptd", False),  # two steps away
        ("P", "Pl-Z", True),
        ("PMC", "PMC", True),  # static exact
        ("SC", "SC", True),
        ("PMC", "Spg Ad", False),  # static true, "adjacent" dynamic prediction
        ("SC", "esptd", False),
        ("PMC", "SC", False),  # static classes are not adjacent to each other
        ("Spg Ad", "SC", False),  # dynamic true, static prediction
        ("Spg Ad", "PMC", False),
        ("Spg", "Spg", True),
    ],
)
def test_adjacent_single_cases(true, pred, ok):
    y, p = _pairs((true, pred))
    assert adjacent_k_accuracy(y, p, TAX, k=1) == float(ok)
    dyn = adjacent_k_dynamic_accuracy(y, p, TAX, k=1)
    if true in TAX.static:
        assert math.isnan(dyn)  # no dynamic sample to evaluate
    else:
        assert dyn == float(ok)


def test_adjacent_hand_computed_mix():
    y, p = _pairs(
        ("PMC", "PMC"),  # ok, static
        ("PMC", "Spg Ad"),  # wrong, static
        ("SC", "PMC"),  # wrong, static
        ("Spg Ad", "Spg"),  # ok adj, dyn
        ("esptd", "rsptd"),  # ok adj, dyn
        ("P", "esptd"),  # wrong, dyn
        ("P", "P"),  # ok, dyn
        ("Pl-Z", "SC"),  # wrong, dyn
    )
    assert adjacent_k_accuracy(y, p, TAX) == pytest.approx(4 / 8)
    assert adjacent_k_dynamic_accuracy(y, p, TAX) == pytest.approx(3 / 5)
    # k=2 lets P -> esptd count; k=0 is exact match
    assert adjacent_k_accuracy(y, p, TAX, k=2) == pytest.approx(5 / 8)
    assert adjacent_k_accuracy(y, p, TAX, k=0) == pytest.approx(2 / 8)


def test_adjacent_on_custom_taxonomy():
    tax = Taxonomy(classes=("a", "s", "b", "c"), static=("s",))
    # dynamic sequence a, b, c (s is skipped): a -> b is adjacent although indices differ by 2
    assert adjacent_k_accuracy([0], [2], tax) == 1.0
    assert adjacent_k_accuracy([0], [3], tax) == 0.0
    assert adjacent_k_accuracy([0], [1], tax) == 0.0


def test_top_k_hand_computed():
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.2, 0.3, 0.5],
            [0.1, 0.6, 0.3],
            [0.4, 0.35, 0.25],
        ]
    )
    y = np.array([0, 1, 2, 2])
    assert top_k_accuracy(y, probs, 1) == pytest.approx(1 / 4)
    assert top_k_accuracy(y, probs, 2) == pytest.approx(3 / 4)
    assert top_k_accuracy(y, probs, 3) == 1.0
    assert math.isnan(top_k_accuracy(np.zeros(0, int), np.zeros((0, 3)), 1))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_matches_sklearn(k, seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 8
    probs = rng.dirichlet(np.ones(c), size=n)
    y = rng.integers(0, c, size=n)
    y[:5] = 7  # labels=range(c) matters when a class is missing
    ref = top_k_accuracy_score(y, probs, k=k, labels=np.arange(c))
    assert top_k_accuracy(y, probs, k) == pytest.approx(ref)


def test_compute_metrics_keys_and_relations():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(8), size=200)
    y = rng.integers(0, 8, size=200)
    m = compute_metrics(y, probs, TAX)
    assert set(m) >= {"top1", "top2", "adj1", "adj1_dyn", "n"}
    assert m["n"] == 200
    assert m["top1"] <= m["top2"] and m["top1"] <= m["adj1"]
    assert m["top1"] == pytest.approx(top_k_accuracy_score(y, probs, k=1, labels=np.arange(8)))
    pred = probs.argmax(1)
    assert m["adj1"] == adjacent_k_accuracy(y, pred, TAX)
    assert m["adj1_dyn"] == adjacent_k_dynamic_accuracy(y, pred, TAX)


def test_compute_metrics_perfect_and_static_only():
    y = np.arange(8)
    m = compute_metrics(y, np.eye(8), TAX)
    assert m["top1"] == m["top2"] == m["adj1"] == m["adj1_dyn"] == 1.0
    m = compute_metrics(np.array([0, 1]), np.eye(8)[[0, 2]], TAX)
    assert m["top1"] == 0.5 and m["adj1"] == 0.5 and math.isnan(m["adj1_dyn"])


def test_confusion():
    c = confusion([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert c.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert c.sum() == 6
    with pytest.raises(ValueError):
        confusion([3], [0], 3)


def test_bad_inputs():
    with pytest.raises(ValueError):
        top_k_accuracy([0, 1], np.ones((3, 8)), 1)
    with pytest.raises(ValueError):
        adjacent_k_accuracy([0, 8], [0, 0], TAX)
    with pytest.raises(ValueError):
        compute_metrics([0], np.ones((1, 5)), TAX)
