"""Cross-validation folds per cell across scans, grouping, and the sheet's test/train separation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_workflow_dag import demo  # noqa: F401  (the tiny demo sheet fixture)

from cellstage.training.folds import check_split_leaks, make_folds
from cellstage.utils import CellstageError

REPO = Path(__file__).resolve().parents[2]


def two_scans(seed: int = 0, n_sections: int = 10, per_section: int = 30):
    """Crop indexes of the same labelled cells on two scans of every section.

    The 20x index has other slide ids, another row order, one labelled cell missing (mapped outside
    its slide) and rows of its own (row positions differ). Patients hold two sections each.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sections):
        ids = rng.choice(np.arange(1, 10_000), per_section, replace=False)
        for cid in ids:
            rows.append({"section": f"sec{s:02d}", "cell_id": int(cid), "patient": f"pat{s // 2}",
                         "label_idx": int(rng.integers(-1, 8))})  # -1: unlabelled cells too
    cells = pd.DataFrame(rows)
    idx40 = cells.assign(slide=cells["section"] + "_40x", scan="40x")
    idx40["row"] = np.arange(len(idx40))
    labelled = np.flatnonzero(cells["label_idx"] >= 0)
    dropped = int(labelled[7])
    idx20 = cells.drop(index=dropped).sample(frac=1, random_state=seed).reset_index(drop=True)
    idx20 = idx20.assign(slide=idx20["section"] + "_scanB", scan="20x", row=np.arange(len(idx20)))
    return idx40, idx20, cells.loc[dropped]


def folds_by_cell(index: pd.DataFrame, folds: np.ndarray) -> pd.Series:
    return pd.Series(folds, index=pd.MultiIndex.from_frame(index[["section", "cell_id"]])).sort_index()


@pytest.mark.parametrize("group", [None, "patient", "section", "slide"])
def test_a_cells_crops_of_both_scans_share_a_fold(group):
    idx40, idx20, dropped = two_scans()
    f40 = folds_by_cell(idx40, make_folds(idx40, 5, seed=0, group_col=group))
    f20 = folds_by_cell(idx20, make_folds(idx20, 5, seed=0, group_col=group, reference=idx40))
    assert len(f20) == len(f40) - 1
    assert (f20 == f40.loc[f20.index]).all()
    assert (dropped["section"], dropped["cell_id"]) not in f20.index
    labelled = idx40.set_index(["section", "cell_id"])["label_idx"].sort_index() >= 0
    assert (f40[~labelled] == -1).all() and set(f40[labelled]) == set(range(5))
    if group is not None:  # slide groups a section's scans together: the same as section
        key = "section" if group == "slide" else group
        per_group = idx40.assign(f=make_folds(idx40, 5, seed=0, group_col=group))
        assert per_group[per_group["f"] >= 0].groupby(key)["f"].nunique().max() == 1


def test_folds_do_not_depend_on_row_order_or_slide_ids_and_follow_the_seed():
    idx40, _, _ = two_scans(seed=1)
    f = make_folds(idx40, 5, seed=0)
    other = idx40.assign(slide=idx40["section"] + "_elsewhere").sample(frac=1, random_state=5)
    g = pd.Series(make_folds(other, 5, seed=0), index=other.index).sort_index().to_numpy()
    assert (g == f).all()
    assert not (make_folds(idx40, 5, seed=1) == f).all()
    # stratified: every class is spread over the folds as evenly as StratifiedKFold can
    lab = idx40["label_idx"] >= 0
    counts = pd.crosstab(idx40.loc[lab, "label_idx"], f[lab])
    assert (counts.max(axis=1) - counts.min(axis=1)).max() <= 1


def test_the_20x_index_alone_would_split_differently_so_the_reference_is_needed():
    idx40, idx20, _ = two_scans(seed=2)
    # the 20x index alone lacks a cell, so its own split differs somewhere: the reference is needed
    alone = folds_by_cell(idx20, make_folds(idx20, 5, seed=0))
    f40 = folds_by_cell(idx40, make_folds(idx40, 5, seed=0))
    assert not (alone == f40.loc[alone.index]).all()


def test_a_crop_whose_cell_is_not_in_the_reference_is_an_error():
    idx40, idx20, _ = two_scans()
    extra = idx20.iloc[[0]].assign(cell_id=123_456, label_idx=3)
    with pytest.raises(CellstageError, match="not labelled cells of the fold reference"):
        make_folds(pd.concat([idx20, extra]), 5, reference=idx40)
    clash = pd.concat([idx40, idx40.iloc[[np.flatnonzero(idx40["label_idx"] >= 0)[0]]].assign(label_idx=9)])
    with pytest.raises(CellstageError, match="different labels"):
        make_folds(idx20, 5, reference=clash)


def test_the_datamodule_gives_20x_crops_the_folds_of_their_40x_cells(tmp_path):
    from test_finetune import make_crop_source

    from cellstage.training.data import CropDataModule

    zarr40, index40 = make_crop_source(tmp_path, "s1_40x", n_per_class=5, size=16)
    idx40 = pd.read_parquet(index40)
    keep = idx40.drop(index=int(np.flatnonzero(idx40["label_idx"] >= 0)[3]))  # mapped outside the 20x slide
    idx20 = keep.assign(slide="s1_20x", scan="20x").sample(frac=1, random_state=1)
    index20 = tmp_path / "s1_20x.parquet"
    idx20.to_parquet(index20, index=False)  # rows still point into the 40x zarr: only folds matter here

    def val_cells(index, reference=()):
        dm = CropDataModule([(zarr40, str(index))], fold=1, n_folds=3, fold_reference=reference,
                            batch_size=4, augment=False)
        dm.setup("fit")
        return set(dm.val_index["cell_id"]), set(dm.train_index["cell_id"])

    val40, train40 = val_cells(index40)
    val20, train20 = val_cells(index20, [index40])
    assert val20 <= val40 and train20 <= train40 and len(val40 - val20) + len(train40 - train20) == 1


def test_run_fold_refuses_a_missing_fold_reference_before_training(tmp_path):
    from test_finetune import make_crop_source

    from cellstage.train.cv import run_fold

    src = make_crop_source(tmp_path, "s1_20x", n_per_class=2, size=16)
    with pytest.raises(CellstageError, match="fold_reference: crop index .*s1_40x.parquet does not exist"):
        run_fold([src], [], tmp_path / "out", fold=0, n_folds=2, fold_reference=[tmp_path / "s1_40x.parquet"])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- sheet: test/train leaks
def sheet(rows) -> pd.DataFrame:
    return pd.DataFrame(
        [{"slide": f"{sec}_{scan}", "section": sec, "scan": scan, "patient": pat, "split": split}
         for sec, pat, split in rows for scan in ("40x", "20x")]
    )


def test_a_test_patient_in_train_is_an_error_naming_the_sheet_patient_and_slides():
    bad = sheet([("sec01", "pat01", "train"), ("sec02", "pat02", "train"), ("sec03", "pat01", "test")])
    with pytest.raises(CellstageError) as err:
        check_split_leaks(bad, "config/slides.tsv")
    msg = str(err.value)
    assert "config/slides.tsv" in msg and "patient 'pat01'" in msg
    assert "sec03_40x" in msg and "sec01_20x" in msg and "pat02" not in msg


def test_a_section_with_a_test_scan_and_a_train_scan_is_an_error():
    bad = sheet([("sec01", "pat01", "train"), ("sec02", "pat02", "test")])
    bad.loc[bad["slide"] == "sec02_20x", ["split", "patient"]] = ["train", "pat03"]
    with pytest.raises(CellstageError, match=r"section 'sec02' has test slides \['sec02_40x'\] and train slides"):
        check_split_leaks(bad, "s.tsv")


def test_the_demo_sheets_have_no_leak():
    from cellstage.demo.generate import PRESETS

    for preset in PRESETS.values():
        check_split_leaks(sheet(preset.sections), "demo")
    check_split_leaks(pd.read_csv(REPO / "config/slides.tsv", sep="\t", dtype=str), "config/slides.tsv")
    # unlabelled slides of a test patient are not a train/test leak
    check_split_leaks(sheet([("sec01", "pat01", "train"), ("sec02", "pat02", "test"),
                             ("sec03", "pat02", "unlabelled")]), "s.tsv")


def test_the_workflow_stops_at_start_up_on_a_leaky_sheet(tmp_path, demo):  # noqa: F811
    from test_workflow_dag import base_config, snakemake, workdir

    config = base_config()
    work = workdir(tmp_path, demo, config)
    snakemake(work, "-n")  # the tiny demo sheet passes
    leaky = pd.read_csv(work / config["samples"], sep="\t", dtype=str, keep_default_na=False)
    leaky.loc[leaky["split"] == "test", "patient"] = leaky.loc[leaky["split"] == "train", "patient"].iloc[0]
    leaky.to_csv(work / "config/leaky.tsv", sep="\t", index=False)
    leak = r"config/leaky.tsv: test data leak into training .*patient 'pat01' has test slides"
    with pytest.raises(AssertionError, match=leak):
        snakemake(work, "-n", "--config", "samples=config/leaky.tsv")

