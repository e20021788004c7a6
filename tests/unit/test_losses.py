"""Ordinal-aware fine-tuning losses (issue 14 item 4): soft adjacent-stage labels and the
expected-ordinal-cost loss, their config checks, the grid axis and one fold trained with each."""

import json
import sys

import numpy as np
import pytest
import torch

from cellstage.taxonomy import Taxonomy
from cellstage.train.losses import LOSSES, check_loss, cost_matrix, soft_targets
from cellstage.utils import CellstageError

TAX = Taxonomy()  # PMC, SC static; Spg Ad .. esptd dynamic


def test_soft_targets_share_with_adjacent_dynamic_stages_only():
    t = soft_targets(TAX, 0.15)
    assert np.allclose(t.sum(1), 1.0)
    for c in TAX.static:  # static classes stay exact
        i = TAX.index(c)
        assert t[i, i] == 1.0 and t[i].sum() == 1.0
    spg, plz, p = TAX.index("Spg"), TAX.index("Pl-Z"), TAX.index("P")
    assert t[plz, spg] == pytest.approx(0.15) and t[plz, p] == pytest.approx(0.15)
    assert t[plz, plz] == pytest.approx(0.7)
    assert t[plz, TAX.index("rsptd")] == 0.0  # two stages away: nothing
    first, last = TAX.index("Spg Ad"), TAX.index("esptd")
    assert t[first, first] == pytest.approx(0.85) and t[last, last] == pytest.approx(0.85)  # one neighbour
    assert t[first, TAX.index("SC")] == 0.0  # a static class is never a dynamic stage's neighbour


def test_cost_matrix_grows_with_stage_distance():
    c = cost_matrix(TAX)
    assert np.allclose(np.diag(c), 0.0)
    spg_ad = TAX.index("Spg Ad")
    steps = [c[spg_ad, TAX.index(name)] for name in TAX.dynamic]
    assert steps == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert c[TAX.index("PMC"), TAX.index("SC")] == 1.0 and c[TAX.index("SC"), spg_ad] == 1.0
    assert np.allclose(c, c.T)


def test_stage_loss_values():
    from cellstage.train.classifier import StageLoss

    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 4, 6, 7])
    ce = StageLoss("ce", TAX)(logits, y)
    assert ce == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item())
    # with a zero share, soft labels are one-hot: plain cross-entropy
    assert StageLoss("soft", TAX, {"adjacent_share": 0.0})(logits, y) == pytest.approx(ce.item())
    assert StageLoss("ordinal", TAX, {"weight": 0.0})(logits, y) == pytest.approx(ce.item())
    # the ordinal term: an adjacent mistake costs less than a distant one
    ordinal = StageLoss("ordinal", TAX, {"weight": 1.0})
    y1 = torch.tensor([TAX.index("Pl-Z")])
    near = torch.full((1, 8), -10.0)
    near[0, TAX.index("P")] = 10.0
    far = torch.full((1, 8), -10.0)
    far[0, TAX.index("esptd")] = 10.0
    assert ordinal(far, y1) - ordinal(near, y1) == pytest.approx(0.6 - 0.2, abs=1e-3)  # CE equal, cost 0.6 vs 0.2


def test_loss_config_errors_name_the_key():
    assert check_loss("soft", None) == {"adjacent_share": 0.1}
    with pytest.raises(CellstageError, match="finetune.grid.loss.*'focal'"):
        check_loss("focal")
    with pytest.raises(CellstageError, match=r"finetune.losses.soft.*\['adjacent_shar'\]"):
        check_loss("soft", {"adjacent_shar": 0.2})
    with pytest.raises(CellstageError, match="finetune.losses.soft.adjacent_share"):
        check_loss("soft", {"adjacent_share": 0.6})
    with pytest.raises(CellstageError, match="finetune.losses.ordinal.weight"):
        check_loss("ordinal", {"weight": -1})


def test_the_loss_module_imports_no_torch():
    """The workflow checks the grid at start-up with it; torch would slow every snakemake call."""
    import subprocess

    code = "import sys, cellstage.train.grid, cellstage.train.losses; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _finetune_section(**grid):
    base = dict(scan=["40x"], background=[True], backbone=["resnet18"], init=["scratch"], distance=[False])
    return {"recipe": {"scratch": "baseline"}, "grid": {**base, **grid}, "losses": {}}


def test_grid_loss_axis_names_and_defaults():
    from cellstage.train.grid import experiments

    plain = experiments(_finetune_section(), ["40x"])
    assert list(plain) == ["40x-bg-resnet18-scratch-nodist"] and plain["40x-bg-resnet18-scratch-nodist"]["loss"] == "ce"
    both = experiments(_finetune_section(loss=["ce", "soft", "ordinal"]), ["40x"])
    assert list(both) == ["40x-bg-resnet18-scratch-nodist", "40x-bg-resnet18-scratch-nodist-soft",
                          "40x-bg-resnet18-scratch-nodist-ordinal"]
    assert [e["loss"] for e in both.values()] == list(LOSSES)
    with pytest.raises(CellstageError, match=r"finetune.grid.loss.*'hinge'"):
        experiments(_finetune_section(loss=["hinge"]), ["40x"])
    bad = _finetune_section(loss=["soft"])
    bad["losses"] = {"soft": {"adjacent_share": 0.9}}
    with pytest.raises(CellstageError, match="adjacent_share"):
        experiments(bad, ["40x"])


@pytest.mark.parametrize("loss", ["soft", "ordinal"])
def test_run_fold_trains_with_an_ordinal_loss_on_the_same_folds(tmp_path, loss):
    from test_finetune import FAST, make_crop_source

    from cellstage.train import run_fold

    torch.set_num_threads(1)
    train = [make_crop_source(tmp_path, "s1_20x", n_per_class=6, seed=1)]
    test = [make_crop_source(tmp_path, "s2_20x", n_per_class=2, seed=2, split="test", patient="p2")]
    fast = {**FAST, "recipe": {"name": "baseline", "epochs": 1}}
    ce = run_fold(train, test, tmp_path / "ce", fold=0, **fast)
    other = run_fold(train, test, tmp_path / loss, fold=0, loss=loss, **fast)
    m = json.loads((tmp_path / loss / "metrics.json").read_text())
    assert m["config"]["loss"] == loss and m["config"]["loss_settings"] == check_loss(loss)
    assert ce["config"]["loss"] == "ce"
    assert ce["val"]["n"] == other["val"]["n"] == 24  # the same validation fold (half of 48 cells)
    import pandas as pd

    a, b = (pd.read_parquet(tmp_path / d / "predictions.parquet") for d in ("ce", loss))
    assert a[["split", "cell_id", "slide"]].equals(b[["split", "cell_id", "slide"]])  # the same cells
    probs = b[[f"prob_{c}" for c in TAX.classes]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert not np.allclose(a[[f"prob_{c}" for c in TAX.classes]].to_numpy(), probs)  # another objective
    assert np.isfinite(pd.read_csv(tmp_path / loss / "history.csv")["val_loss"]).all()


def _folds(rows):
    import pandas as pd

    out = []
    for exp, loss, top1s in rows:
        for fold, top1 in enumerate(top1s):
            for split in ("val", "test"):
                out.append(dict(experiment=exp, fold=fold, split=split, scan="40x", background=True,
                                backbone="resnet18", init=exp.split("-")[3], distance=False, loss=loss,
                                recipe="baseline", top1=top1, top2=top1, adj1=min(1.0, top1 + 0.2),
                                adj1_dyn=top1, n=10))
    return pd.DataFrame(out)


def test_loss_table_compares_losses_of_one_configuration():
    from cellstage.report.losses import loss_markdown, loss_table
    from cellstage.report.paper import paper_table
    from cellstage.report.tables import summary_table

    summary = summary_table(_folds([
        ("40x-bg-resnet18-scratch-nodist", "ce", [0.5, 0.6]),
        ("40x-bg-resnet18-scratch-nodist-soft", "soft", [0.6, 0.7]),
        ("40x-bg-resnet18-simclr-nodist", "ce", [0.4, 0.4]),  # one loss only: not in the table
    ]))
    table = loss_table(summary)
    assert list(table["loss"]) == ["ce", "soft"]
    assert table.loc[1, "d_val_top1"] == pytest.approx(0.1) and table.loc[0, "d_val_top1"] == pytest.approx(0.0)
    md = loss_markdown(table)
    assert "| 40x-bg-resnet18-scratch-nodist | soft | 2 | 65.0 ± 7.1 (+10.0)" in md
    # the paper's tables keep the cross-entropy rows only
    a5 = paper_table(summary, "A5")
    assert list(a5["loss"]) == ["ce"]
    assert "No configuration is trained with more than one loss" in loss_markdown(loss_table(summary.iloc[[2]]))
