"""Patient-wise cross-validation folds with near-uniform classes (seed 003 §3.1).

Seed 003 §3.1: "For training, we used a 5-fold cross-validation with patient-wise splits. Each
fold is therefore separated into an 80% training and a 20% validation subset. [...] Moreover,
for all cross-validation sets for the binary classifications the training and validation sets
were chosen to be close to uniform. For the ELN2017 categorisation, the intermediate class was
strongly underrepresented, which prevented balanced splits. Instead, we tried to balance this
dataset with the main focus on the classes favorable and adverse."

What we do, and what "close to uniform" means here:

1. one label per patient (all its labelled slides must agree); slides without a label for the
   task are left out;
2. ``balance``: the classes whose patient counts are equalised by leaving out randomly chosen
   (``seed``) patients of the larger ones — for a binary task both classes (so train and
   validation are ~50/50), for ELN2017 favourable and adverse (intermediate keeps all its
   patients). The left-out patients' slides get fold ``-1`` (used in no fold);
3. scikit-learn's ``StratifiedGroupKFold`` (shuffled with ``seed``) over the slides, grouped by
   patient: every patient's slides are in one fold, and the class fractions of each validation
   fold (and so of each training set) are as close to the overall ones as the group sizes allow.

:func:`fold_summary` reports the class fractions of training and validation per fold (the
stage writes them into ``metrics.json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..utils import CellstageError


def _label(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    s = str(value).strip()
    return s or None


def patient_labels(sheet_rows: Sequence[Mapping], task: str, classes: Sequence[str]) -> pd.DataFrame:
    """DataFrame(slide, patient, label) of the slides labelled for ``task`` (column of the sheet)."""
    rows = []
    for i, r in enumerate(sheet_rows):
        for key in ("slide", "patient"):
            if not _label(r.get(key)):
                raise CellstageError(f"slide sheet row {i}: empty {key!r} (every slide needs a slide id and patient)")
        if task not in r:
            raise CellstageError(f"slide sheet: no column {task!r} for the MIL task {task!r} (add it to the sheet)")
        lab = _label(r[task])
        if lab is None:
            continue
        if lab not in classes:
            raise CellstageError(f"slide sheet: slide {r['slide']!r} has {task}={lab!r}, not one of {list(classes)} "
                                 f"(fix the sheet or config mil.tasks.{task}.classes)")
        rows.append({"slide": str(r["slide"]), "patient": str(r["patient"]), "label": lab})
    df = pd.DataFrame(rows, columns=["slide", "patient", "label"])
    bad = df.groupby("patient")["label"].nunique()
    if (bad > 1).any():
        raise CellstageError(f"slide sheet: patient(s) {bad[bad > 1].index.tolist()[:5]} have slides with different "
                             f"{task} labels (a patient has one label)")
    return df.sort_values("slide", kind="stable").reset_index(drop=True)


def assign_patient_folds(sheet_rows: Sequence[Mapping], task: str, classes: Sequence[str], n_folds: int,
                         seed: int, balance: Sequence[str]) -> dict[str, int]:
    """Fold (0..n_folds-1) per labelled slide of ``task``; -1 for slides of patients left out to
    equalise the ``balance`` classes (module docstring). Deterministic with ``seed``."""
    from sklearn.model_selection import StratifiedGroupKFold

    if n_folds < 2:
        raise CellstageError(f"mil: n_folds must be >= 2, got {n_folds}")
    unknown = [c for c in balance if c not in classes]
    if unknown:
        raise CellstageError(f"mil: balance classes {unknown} are not classes of {task} ({list(classes)})")
    df = patient_labels(sheet_rows, task, classes)
    patients = df.drop_duplicates("patient")[["patient", "label"]].sort_values("patient").reset_index(drop=True)
    counts = patients["label"].value_counts()
    missing = [c for c in classes if counts.get(c, 0) == 0]
    if missing:
        raise CellstageError(f"mil: task {task!r} has no patient of class(es) {missing} "
                             f"(patients per class: {counts.to_dict()}); label more slides or drop the class")
    rng = np.random.default_rng(seed)
    drop: set[str] = set()
    if len(balance) >= 2:
        target = min(int(counts[c]) for c in balance)
        for c in balance:
            members = patients.loc[patients["label"] == c, "patient"].to_numpy()
            if len(members) > target:
                drop |= set(rng.choice(members, size=len(members) - target, replace=False).tolist())
    used = df[~df["patient"].isin(drop)].reset_index(drop=True)
    n_patients = used["patient"].nunique()
    if n_patients < n_folds:
        raise CellstageError(f"mil: task {task!r} has {n_patients} usable patients, fewer than n_folds={n_folds} "
                             "(patient-wise folds need at least one patient per fold); lower mil.n_folds")
    per_class = used.drop_duplicates("patient")["label"].value_counts()
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=int(seed))
    folds = {s: -1 for s in df.loc[df["patient"].isin(drop), "slide"]}
    y = used["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    import warnings

    with warnings.catch_warnings():  # a class with fewer patients than folds: sklearn warns and splits
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(splitter.split(np.zeros((len(used), 1)), y, used["patient"].to_numpy()))
    if per_class.min() < n_folds:
        import logging

        logging.getLogger("cellstage.mil").warning(
            "mil: task %s has classes with fewer patients than folds (%s): some validation folds lack them",
            task, per_class.to_dict())
    for k, (_, val_idx) in enumerate(splits):
        for i in val_idx:
            folds[used.at[int(i), "slide"]] = k
    return dict(sorted(folds.items()))


def fold_summary(folds: Mapping[str, int], labels: Mapping[str, str], classes: Sequence[str]) -> list[dict]:
    """Per fold: number of slides and class fractions of its training and validation slides."""
    df = pd.DataFrame({"slide": list(folds), "fold": list(folds.values())})
    df["label"] = df["slide"].map(labels)
    df = df[df["fold"] >= 0]
    out = []
    for k in sorted(df["fold"].unique()):
        row: dict = {"fold": int(k)}
        for name, part in (("train", df[df["fold"] != k]), ("val", df[df["fold"] == k])):
            row[f"n_{name}"] = int(len(part))
            row[f"{name}_fractions"] = {c: round(float((part["label"] == c).mean()), 4) if len(part) else 0.0
                                        for c in classes}
        out.append(row)
    return out
