"""Stage entry points of seed 003's MIL cross-validation: folds per task, one fold's training.

Every argument is the validated config value; nothing here holds a default.

``train_mil_fold`` writes, atomically, into ``out_dir``:

* ``metrics.json`` — ``history`` (per epoch: epoch, train_loss, train_acc [bag level], val_loss,
  val_acc [slide level], lr), ``final`` (the last epoch's four values: one row of Tables 3–8),
  ``val_predictions`` (per validation slide: label, prediction, class probabilities, bags),
  ``skipped`` (slides with fewer than ``min_instances`` instances, with their counts and split),
  ``n_train_slides``, ``n_val_slides``, ``n_train_bags_per_epoch``, ``n_val_bags``,
  ``class_fractions`` (train/val per class, slide level), ``seconds``, ``fit_seconds``,
  ``seconds_per_epoch``, ``resumed_from_epoch``, ``config`` (task, level, background, backbone,
  attention, model name of the paper, fold, every training argument) and ``provenance``;
* ``predictions.parquet`` — slide, label, pred, n_instances, n_bags, p_<class> per class.

The resume checkpoint lives next to ``out_dir`` (``<out_dir>.checkpoints/``, removed at the
end): rerunning with the same arguments and input content continues from the last finished
epoch, bit-identically on CPU (:func:`cellstage.training.fit.fit_resumable`; tested in
tests/unit/test_mil.py::test_killed_fold_resumes_to_the_same_history_and_predictions).

Cost (2 shared CPU cores, load 3–4.5): one training bag of 32 crops at 80 px takes ~0.36–1.6 s
with resnet18, ~1.5–6.7 s with resnet18_mod (stride-1 stem), ~0.5–3.3 s with inception_v3;
``img_size=40`` makes resnet18 ~0.15 s per bag.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import CellstageError, atomic_path, provenance, set_torch_threads, write_json
from .folds import assign_patient_folds, fold_summary  # noqa: F401  (stage entry point re-exported)

log = logging.getLogger("cellstage.mil")

LEVELS = ("one", "two", "three")


def slide_instances(level: str, background: bool, slide: str, zarr_path, table_path, grades_path=None) -> dict:
    """The instances entry of one slide from the Level One/Two/Three outputs.

    * Level One: parquet (slide, patch, kept, store_index): rows ``kept`` → zarr rows
      ``store_index`` of ``patches``; without background the ``masks`` array blanks the rest;
    * Level Two: parquet (slide, crop, kept): rows ``kept`` → zarr rows ``crop`` of ``bg``/``nobg``;
    * Level Three: Level Two's rows that the grader's parquet (slide, crop, keep) also keeps.
    """
    if level not in LEVELS:
        raise CellstageError(f"mil: level {level!r} is not one of {list(LEVELS)}")
    table = pd.read_parquet(table_path)
    need = {"one": {"kept", "store_index"}, "two": {"kept", "crop"}, "three": {"kept", "crop"}}[level]
    if need - set(table.columns):
        raise CellstageError(f"{table_path}: missing column(s) {sorted(need - set(table.columns))} for Level {level}")
    table = table[table["kept"].astype(bool)]
    if level == "one":
        return {"slide": slide, "zarr": str(zarr_path), "array": "patches",
                "indices": table["store_index"].to_numpy(np.int64), "mask": None if background else "masks"}
    if level == "three":
        if grades_path is None:
            raise CellstageError(f"mil: Level Three of slide {slide} needs the grader's parquet (slide, crop, keep)")
        grades = pd.read_parquet(grades_path)
        if {"crop", "keep"} - set(grades.columns):
            raise CellstageError(f"{grades_path}: expected columns crop, keep (the grader's output)")
        table = table[table["crop"].isin(grades.loc[grades["keep"].astype(bool), "crop"])]
    return {"slide": slide, "zarr": str(zarr_path), "array": "bg" if background else "nobg",
            "indices": table["crop"].to_numpy(np.int64), "mask": None}


def _crop_px(si) -> int:
    import zarr

    try:
        shape = zarr.open_group(si.zarr_path, mode="r")[si.array].shape
    except (FileNotFoundError, KeyError) as e:
        raise CellstageError(f"{si.zarr_path}: no array {si.array!r} ({e})") from None
    if len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
        raise CellstageError(f"{si.zarr_path}/{si.array}: expected (N, P, P, 3) images, got {shape}")
    return int(shape[1])


def train_mil_fold(
    instances: Sequence[Mapping],
    labels: Mapping[str, str],
    classes: Sequence[str],
    folds: Mapping[str, int],
    fold: int,
    out_dir: str | os.PathLike,
    *,
    task: str,
    level: str,
    background: bool,
    backbone: str,
    attention: bool,
    bag_size: int,
    max_bags_per_slide: int | None,
    min_instances: int,
    epochs: int,
    lr: float,
    batch_size: int,
    img_size: int | None,
    seed: int,
    threads: int | None,
    devices: int,
    precise_bn_batches: int = 0,
    attention_pooling: str = "mean",
) -> dict:
    """Train one fold of the MIL cross-validation (validation = slides of fold ``fold``, training =
    the other folds' slides; slides with fold -1, no label or < ``min_instances`` instances are
    left out). ``instances``: per slide ``{"slide", "zarr", "array", "indices"[, "mask"]}``
    (:func:`slide_instances`). ``bag_size`` 1 = single-instance training (Level One). Returns the
    ``metrics.json`` dict (module docstring)."""
    from torch.utils.data import DataLoader

    from ..training.callbacks import History
    from ..training.fit import fit_resumable
    from ..training.resume import loader_generator, resolve_deterministic, seed_all
    from .bags import BagDataset, BagPlan, BagSampler, SlideInstances, split_by_min_instances
    from .models import input_size, paper_name
    from .train import MILModule

    t0 = time.perf_counter()
    if level not in LEVELS:
        raise CellstageError(f"mil: level {level!r} is not one of {list(LEVELS)}")
    class_idx = {c: i for i, c in enumerate(classes)}
    slides = [SlideInstances.from_dict(d) for d in instances]
    names = pd.Series([s.slide for s in slides])
    if names.duplicated().any():
        raise CellstageError(f"mil: slides listed twice in the instances: {sorted(set(names[names.duplicated()]))[:5]}")
    usable = []
    for s in slides:
        lab = labels.get(s.slide)
        if lab is None or int(folds.get(s.slide, -1)) < 0:
            continue
        if lab not in class_idx:
            raise CellstageError(f"mil: slide {s.slide} has label {lab!r}, not one of {list(classes)}")
        usable.append(s)
    kept, skipped = split_by_min_instances(usable, min_instances)
    for row in skipped:
        row["split"] = "val" if int(folds[row["slide"]]) == int(fold) else "train"
    train = [s for s in kept if int(folds[s.slide]) != int(fold)]
    val = [s for s in kept if int(folds[s.slide]) == int(fold)]
    if not train or not val:
        raise CellstageError(
            f"mil: fold {fold} of task {task!r} has {len(train)} training and {len(val)} validation slides with >= "
            f"{min_instances} instances ({len(skipped)} skipped); need both (check the folds and mil.min_instances)")
    crop_px = _crop_px(train[0])
    size = input_size(backbone, crop_px, img_size)
    y_train = [class_idx[labels[s.slide]] for s in train]
    y_val = [class_idx[labels[s.slide]] for s in val]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_torch_threads(threads)
    seed_all(seed)
    module = MILModule(backbone, len(classes), bool(attention), size if size != crop_px else None, float(lr),
                       int(precise_bn_batches), str(attention_pooling))
    train_plan = BagPlan([s.n for s in train], bag_size, max_bags_per_slide, seed)
    val_plan = BagPlan([s.n for s in val], bag_size, max_bags_per_slide, seed)
    train_loader = DataLoader(BagDataset(train, y_train), batch_size=int(batch_size),
                              sampler=BagSampler(train_plan, train=True), num_workers=0,
                              generator=loader_generator(seed))
    val_loader = DataLoader(BagDataset(val, y_val), batch_size=int(batch_size),
                            sampler=BagSampler(val_plan, train=False), num_workers=0,
                            generator=loader_generator(seed + 1))
    config = {"task": task, "level": level, "background": bool(background), "backbone": backbone,
              "attention": bool(attention), "model": paper_name(backbone, attention), "fold": int(fold),
              "classes": list(classes), "bag_size": int(bag_size), "max_bags_per_slide": max_bags_per_slide,
              "min_instances": int(min_instances), "epochs": int(epochs), "lr": float(lr),
              "batch_size": int(batch_size), "img_size": img_size, "input_px": int(size), "crop_px": crop_px,
              "seed": int(seed), "devices": int(devices), "precise_bn_batches": int(precise_bn_batches),
              "attention_pooling": str(attention_pooling)}
    h = hashlib.sha256()
    for s in (*train, *val):
        h.update(f"{s.slide}|{s.array}|{s.mask}|{labels[s.slide]}|{folds[s.slide]}|".encode())
        h.update(np.ascontiguousarray(s.indices).tobytes())
    resume_config = {**config, "instances": h.hexdigest()[:16]}
    history = History()
    fit = fit_resumable(
        module, train_loader=train_loader, val_loader=val_loader,
        ckpt_path_last=out_dir.with_name(out_dir.name + ".checkpoints") / "last.ckpt",
        resume_config=resume_config, inputs=sorted({s.zarr_path for s in (*train, *val)}), epochs=int(epochs),
        seed=seed, accelerator="auto", devices=devices, deterministic=resolve_deterministic(None, "auto"),
        callbacks=[history], progress=False, checkpoint_every=1, default_root_dir=out_dir,
        what=f"mil {task}/{level}/{backbone}/fold{fold}",
    )
    if not fit.is_global_zero:
        return {}  # DDP: rank 0 writes the files
    saved = module.val_slide_probs or {}
    if int(devices) == 1 and sorted(saved) == list(range(len(val))):
        probs = [saved[i] for i in range(len(val))]
    else:  # DDP ranks each validated a part of the slides: redo on rank 0
        probs = _slide_probabilities(module, val_loader, fit.device)
    n_val_bags = pd.Series([s for s, _ in val_plan.bags(-1, shuffle=False)]).value_counts()
    pred_rows = []
    for i, s in enumerate(val):
        p = np.asarray(probs[i], dtype=np.float64)
        pred_rows.append({"slide": s.slide, "label": labels[s.slide], "pred": classes[int(p.argmax())],
                          "n_instances": s.n, "n_bags": int(n_val_bags.get(i, 0)),
                          **{f"p_{c}": float(p[j]) for j, c in enumerate(classes)}})
    hist = [{"epoch": r["epoch"], "train_loss": r["train_loss"], "train_acc": r["train_acc"],
             "val_loss": r["val_loss"], "val_acc": r["val_top1"], "lr": r["lr"]} for r in history.rows]
    final = {k: hist[-1][k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")} if hist else {}
    if hist:  # the slide-level numbers of the predictions written (identical on one device)
        y = np.array([class_idx[r["label"]] for r in pred_rows])
        pm = np.array([[r[f"p_{c}"] for c in classes] for r in pred_rows])
        final["val_loss"] = float(-np.log(np.clip(pm[np.arange(len(y)), y], 1e-7, None)).mean())
        final["val_acc"] = float((pm.argmax(1) == y).mean())
    train_labels = [labels[s.slide] for s in train]
    result = {
        "history": hist,
        "final": final,
        "val_predictions": pred_rows,
        "skipped": skipped,
        "n_train_slides": len(train),
        "n_val_slides": len(val),
        "n_train_bags_per_epoch": len(train_plan),
        "n_val_bags": len(val_plan),
        "class_fractions": {
            "train": {c: train_labels.count(c) / len(train) for c in classes},
            "val": {c: [r["label"] for r in pred_rows].count(c) / len(val) for c in classes},
        },
        "seconds": round(time.perf_counter() - t0, 3),
        "fit_seconds": round(fit.fit_seconds, 3),
        "seconds_per_epoch": round(fit.fit_seconds / max(1, int(epochs) - int(fit.resumed_from or 0)), 3),
        "resumed_from_epoch": fit.resumed_from,
        "config": config,
        "provenance": provenance(config),
    }
    with atomic_path(out_dir / "predictions.parquet") as tmp:
        pd.DataFrame(pred_rows).to_parquet(tmp, index=False)
    write_json(out_dir / "metrics.json", result)
    fit.remove_checkpoint(remove_dir=True)
    return result


def _slide_probabilities(module, loader, device) -> list[list[float]]:
    """Mean bag probabilities per slide position over ``loader`` (eval mode, no gradients)."""
    import torch

    net = module.to(device).eval()
    acc: dict[int, list] = {}
    with torch.no_grad():
        for x, s, _ in loader:
            p = torch.softmax(net(x.to(device)), 1).cpu()
            for pi, si in zip(p, s.tolist()):
                acc.setdefault(int(si), []).append(pi)
    return [torch.stack(acc[k]).mean(0).tolist() for k in sorted(acc)]


def balance_classes(classes: Sequence[str]) -> list[str]:
    """The classes whose patient counts the folds equalise (seed 003 §3): both of a binary task;
    for ELN2017-like ordered 3-class tasks the first and last ("the main focus on the classes
    favorable and adverse", the intermediate class being underrepresented)."""
    classes = list(classes)
    return classes if len(classes) <= 2 else [classes[0], classes[-1]]


def mil_fold_from_files(files: Mapping[str, Sequence[str]], labels: Mapping[str, str],
                        patients: Mapping[str, str], classes: Sequence[str], fold: int, out_dir, *,
                        task: str, level: str, background: bool, backbone: str, attention: bool,
                        settings: Mapping, seed: int, threads: int | None, devices: int) -> dict:
    """Rule ``aml_mil``: one fold from the per-slide Level files (``files``: ``zarr``, ``index``
    and for Level Three ``grading``, in the order of ``labels``), the patient-wise folds of the
    task (:func:`cellstage.mil.folds.assign_patient_folds`) and config ``aml.mil`` (``settings``)."""
    slides = list(labels)
    grading = files.get("grading") or [None] * len(slides)
    instances = [
        slide_instances(level, background, s, z, t, g)
        for s, z, t, g in zip(slides, files["zarr"], files["index"], grading)
    ]
    rows = [{"slide": s, "patient": patients[s], task: labels[s]} for s in slides]
    folds = assign_patient_folds(rows, task, classes, int(settings["n_folds"]), seed, balance_classes(classes))
    single = level == "one"  # seed 003 §3: Level One patches are single instances
    return train_mil_fold(
        instances, labels, classes, folds, fold, out_dir,
        task=task, level=level, background=background, backbone=backbone, attention=attention,
        bag_size=1 if single else int(settings["bag_size"]),
        max_bags_per_slide=settings["max_patches_per_slide"] if single else settings["max_bags_per_slide"],
        min_instances=1 if single else int(settings["min_instances"]),
        epochs=int(settings["epochs"][level]), lr=float(settings["lr"]),
        batch_size=int(settings["patch_batch_size"] if single else settings["batch_size"]),
        img_size=settings["img_size"],
        seed=seed, threads=threads, devices=devices,
        precise_bn_batches=int(settings["precise_bn_batches"]), attention_pooling=settings["attention_pooling"],
    )
