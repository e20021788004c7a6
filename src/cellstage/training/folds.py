"""Cross-validation folds over a crop index, and the sheet's train/test separation.

Seed 000 §4.2: "For all experiments, we employed a 5-fold cross-validation"; the train/validation
dataset (5,200 cells) is scanned twice (§3.1: 40× EFI and 20× SZP, annotations made on 40× and
mapped to 20× by homography), and the test dataset "contains 1,151 cells from a separate WSI".

Folds are made per *cell*, not per crop: a cell's identity is its section and its cell id on the
reference scan (``section``, ``cell_id`` of the crop index; a non-reference scan's cell table is the
reference table mapped through the registration, so its ``cell_id`` is the reference cell's). The
folds are computed on a *fold reference* — the reference scan's crop index, which holds every
cell (cells mapped outside another scan's slide are missing there) — and looked up for the rows of
the index being split. So a cell's 40× and 20× crops always fall into the same fold, whatever the
row order, slide ids or missing cells of the index passed.

Grouping (``group_col``): ``patient``, ``section``, or ``slide``. A slide is one scan of one
section, so grouping by slide is grouping by section: both keep all scans of a section in one
fold (the group key is the ``section`` column when the index has one).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..utils import CellstageError

__all__ = ["GROUP_COLUMNS", "KEY_COLUMNS", "check_split_leaks", "make_folds"]

KEY_COLUMNS = ("section", "cell_id")  # a cell's identity on the reference scan
GROUP_COLUMNS = ("patient", "section", "slide")  # config finetune.group_by


def _key_columns(df: pd.DataFrame) -> tuple[str, str] | None:
    if set(KEY_COLUMNS) <= set(df.columns) and not (df["section"].isna() | (df["section"] == "")).any():
        return KEY_COLUMNS
    if {"slide", "cell_id"} <= set(df.columns):  # an index without sections: one slide, one section
        return ("slide", "cell_id")
    return None


def _group_column(df: pd.DataFrame, group_col: str) -> str:
    """The column whose values are the groups (``slide`` -> ``section``: the section's scans together)."""
    if group_col == "slide" and _key_columns(df) == KEY_COLUMNS:
        return "section"
    if group_col not in df.columns:
        raise CellstageError(f"make_folds: group column {group_col!r} not in the crop index")
    return group_col


def _split(labels: np.ndarray, groups: np.ndarray | None, n_folds: int, seed: int, group_col: str | None):
    """Fold per position of ``labels`` (already in canonical order)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    X = np.zeros((len(labels), 1))
    if groups is None:
        splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X, labels)
    else:
        n_groups = len(np.unique(groups))
        if n_groups < n_folds:
            raise CellstageError(
                f"make_folds: {n_groups} distinct {group_col!r} values cannot fill "
                f"{n_folds} folds; use fewer folds or no grouping"
            )
        splits = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X, labels, groups)
    fold = np.empty(len(labels), dtype=np.int64)
    for k, (_, test_idx) in enumerate(splits):
        fold[test_idx] = k
    return fold


def make_folds(
    index_df: pd.DataFrame,
    n_folds: int = 5,
    seed: int = 0,
    group_col: str | None = None,
    reference: pd.DataFrame | None = None,
) -> np.ndarray:
    """Fold id (0..n_folds-1) per row of ``index_df``; -1 for unlabelled rows (``label_idx < 0``).

    Stratified by ``label_idx`` (``StratifiedKFold``, shuffled with ``seed``); with ``group_col``
    (patient, section or slide; see the module docstring) all cells of a group share a fold
    (``StratifiedGroupKFold``).

    The folds are made over the distinct labelled cells (``section``, ``cell_id``) of
    ``reference`` (default: ``index_df`` itself) in sorted order, so they depend neither on the
    row order nor on the slide ids of ``index_df``; pass the reference scan's crop index as
    ``reference`` to give a non-reference scan's crops the folds of their reference cells. A
    labelled row of ``index_df`` whose cell is not a labelled cell of ``reference`` is an error.
    An index without ``cell_id`` (a bare frame) is split in its row order.
    """
    if n_folds < 2:
        raise CellstageError(f"n_folds must be >= 2, got {n_folds}")
    if "label_idx" not in index_df.columns:
        raise CellstageError("make_folds: index has no label_idx column")
    folds = np.full(len(index_df), -1, dtype=np.int64)
    pos = np.flatnonzero(index_df["label_idx"].to_numpy() >= 0)
    key = _key_columns(index_df)
    if reference is None:
        reference = index_df
    elif "label_idx" not in reference.columns:
        raise CellstageError("make_folds: fold reference has no label_idx column")
    elif key is None or _key_columns(reference) != key:
        raise CellstageError(
            f"make_folds: a fold reference needs the cell identity columns {list(KEY_COLUMNS)} in both "
            f"the index and the reference (index has {sorted(index_df.columns)})"
        )

    ref = reference[reference["label_idx"].to_numpy() >= 0]
    if len(ref) < n_folds:
        raise CellstageError(f"make_folds: {len(ref)} labelled rows cannot fill {n_folds} folds")
    gcol = _group_column(ref, group_col) if group_col is not None else None

    if key is None:  # no cell identities: the rows themselves, in their order
        groups = ref[gcol].astype(str).to_numpy() if gcol else None
        folds[pos] = _split(ref["label_idx"].to_numpy(), groups, n_folds, seed, group_col)
        return folds

    # one row per distinct labelled cell of the reference, sorted by identity
    cols = [*key, "label_idx"] + ([gcol] if gcol and gcol not in key else [])
    cells = ref[cols].copy()
    cells[key[0]] = cells[key[0]].astype(str)
    cells[key[1]] = cells[key[1]].astype(np.int64)
    conflict = cells.groupby(list(key))["label_idx"].nunique()
    if (conflict > 1).any():
        bad = conflict[conflict > 1].index[:5].tolist()
        raise CellstageError(
            f"make_folds: cells {bad} ({key[0]}, {key[1]}) carry different labels in the fold reference"
        )
    cells = cells.drop_duplicates(list(key)).sort_values(list(key), kind="stable").reset_index(drop=True)
    groups = cells[gcol].astype(str).to_numpy() if gcol else None
    cells["fold"] = _split(cells["label_idx"].to_numpy(), groups, n_folds, seed, group_col)

    # look the fold up for every labelled row of the index
    rows = index_df.iloc[pos][list(key)].copy()
    rows[key[0]] = rows[key[0]].astype(str)
    rows[key[1]] = rows[key[1]].astype(np.int64)
    found = rows.merge(cells[[*key, "fold"]], on=list(key), how="left", validate="many_to_one")
    missing = found["fold"].isna().to_numpy()
    if missing.any():
        examples = found.loc[missing, list(key)].head(5).to_records(index=False).tolist()
        raise CellstageError(
            f"make_folds: {int(missing.sum())} labelled crops are not labelled cells of the fold reference "
            f"(e.g. ({key[0]}, {key[1]}) = {examples}); the reference must be the reference scan's crop "
            "index of the same train slides"
        )
    folds[pos] = found["fold"].to_numpy(np.int64)
    return folds


def check_split_leaks(sheet: pd.DataFrame, path: str = "slide sheet") -> None:
    """Raise if a patient or a section of the sheet has slides in both the ``test`` and ``train`` split.

    Seed 000 §3.1: the test set holds "1,151 cells from a separate WSI"; a test patient (or a test
    section scanned again for training) that also trains the models makes the test numbers
    optimistic. ``sheet``: the slide sheet (columns slide, section, patient, split); ``path``
    names it in the message.
    """
    missing = [c for c in ("slide", "section", "patient", "split") if c not in sheet.columns]
    if missing:
        raise CellstageError(f"{path}: sheet lacks columns {missing}")
    problems = []
    for col in ("patient", "section"):
        for value, rows in sheet.groupby(col, sort=True):
            splits: Mapping[str, list] = rows.groupby("split")["slide"].apply(list).to_dict()
            if "test" in splits and "train" in splits:
                problems.append(
                    f"{col} {value!r} has test slides {sorted(splits['test'])} and train slides "
                    f"{sorted(splits['train'])}"
                )
    if problems:
        raise CellstageError(
            f"{path}: test data leak into training (column 'split'): " + "; ".join(problems)
            + ". Give every slide of a test patient (and so of a test section) split 'test', or move the "
            "patient to train"
        )
