"""Cross-validation folds over a crop index (seed 000 §4.2: k-fold CV of the labelled crops)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..utils import CellstageError


def make_folds(
    index_df: pd.DataFrame,
    n_folds: int = 5,
    seed: int = 0,
    group_col: str | None = None,
) -> np.ndarray:
    """Fold id (0..n_folds-1) per row; -1 for unlabelled rows (``label_idx < 0``).

    Stratified by ``label_idx`` (``StratifiedKFold``, shuffled with ``seed``); with
    ``group_col`` (e.g. "patient" or "slide") rows of one group stay in one fold
    (``StratifiedGroupKFold``). The assignment does not depend on the row order of
    ``index_df`` when it has ``slide`` and ``cell_id`` columns (rows are ordered by them first),
    so all configurations of an experiment share the same folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if "label_idx" not in index_df.columns:
        raise CellstageError("make_folds: index has no label_idx column")
    if n_folds < 2:
        raise CellstageError(f"n_folds must be >= 2, got {n_folds}")
    folds = np.full(len(index_df), -1, dtype=np.int64)
    labels = index_df["label_idx"].to_numpy()
    pos = np.flatnonzero(labels >= 0)
    if len(pos) < n_folds:
        raise CellstageError(f"make_folds: {len(pos)} labelled rows cannot fill {n_folds} folds")
    sub = index_df.iloc[pos]
    if {"slide", "cell_id"} <= set(sub.columns):
        order = np.lexsort((sub["cell_id"].to_numpy(), sub["slide"].astype(str).to_numpy()))
    else:
        order = np.arange(len(pos))
    y = labels[pos][order]
    X = np.zeros((len(y), 1))
    if group_col is None:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(X, y)
    else:
        if group_col not in index_df.columns:
            raise CellstageError(f"make_folds: group column {group_col!r} not in index")
        groups = sub[group_col].astype(str).to_numpy()[order]
        if len(np.unique(groups)) < n_folds:
            raise CellstageError(
                f"make_folds: {len(np.unique(groups))} distinct {group_col!r} values cannot fill "
                f"{n_folds} folds; use fewer folds or no grouping"
            )
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(X, y, groups)
    sorted_fold = np.empty(len(y), dtype=np.int64)
    for k, (_, test_idx) in enumerate(splits):
        sorted_fold[test_idx] = k
    folds[pos[order]] = sorted_fold
    return folds
