"""The paper's table and figure shapes (seed 000 Table 1, A.5-A.7, Figs 4-7, confusion), built
from synthetic stored fine-tuning outputs, and their provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from cellstage.crops.store import CropStoreWriter, create_crop_arrays
from cellstage.report.embedding import mean_optical_density, read_embeddings, stain_intensity
from cellstage.report.paper import dataset_table, paper_markdown, paper_table
from cellstage.report.provenance import config_hash, markdown_block, report_provenance
from cellstage.report.tables import fold_table, summary_table

CLASSES = ["PMC", "SC", "Spg", "P"]
N_FOLDS = 2
N_TEST = 24


def _grid():
    """(scan, background, backbone, init, distance, recipe) of a small grid with every table's rows."""
    rows = []
    for scan in ("40x", "20x"):
        for bg in (True, False):
            for backbone in ("resnet18", "vit_tiny"):
                for init in ("scratch", "imagenet", "simclr"):
                    if init == "imagenet" and backbone != "resnet18":
                        continue
                    if init == "simclr" and not bg:
                        continue
                    for dist in (False, True):
                        rows.append((scan, bg, backbone, init, dist, "pretrained" if init == "simclr" else "baseline"))
    return rows


def write_crop_store(path: Path, n: int, size: int = 12, seed: int = 0) -> np.ndarray:
    """Crops whose nucleus (a centred square) gets darker with the row number; returns the images."""
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, 3), 230, np.uint8)
    masks = np.zeros((n, size, size), bool)
    masks[:, 3:9, 3:9] = True
    for i in range(n):
        images[i][masks[i]] = 200 - 6 * i
    images = np.clip(images.astype(int) + rng.integers(-2, 3, images.shape), 0, 255).astype(np.uint8)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    writer = CropStoreWriter(path, create_crop_arrays(root, n, size, shard=8))
    writer.add(images=images, masked=images * masks[..., None], masks=masks)
    writer.close()
    return images


def write_fold_outputs(root: Path, seed: int = 0) -> dict:
    """Experiments (as the workflow's report param) with metrics.json, predictions.parquet and
    embeddings.parquet per fold; configurations with background, a larger backbone... score
    higher so the best ones are known."""
    rng = np.random.default_rng(seed)
    experiments = {}
    labels = np.arange(N_TEST) % len(CLASSES)
    for n, (scan, bg, backbone, init, dist, recipe) in enumerate(_grid()):
        name = f"{scan}-{'bg' if bg else 'nobg'}-{backbone}-{init}-{'dist' if dist else 'nodist'}"
        quality = 0.3 + 0.1 * bg + 0.05 * (init != "scratch") + 0.02 * dist + 0.01 * (scan == "40x")
        spec = dict(scan=scan, background=bg, backbone=backbone, init=init, distance=dist, recipe=recipe,
                    metrics=[], predictions=[], embeddings=[])
        for k in range(N_FOLDS):
            d = root / f"e{n}" / f"f{k}"
            d.mkdir(parents=True)
            m = {s: {"top1": quality + 0.01 * k, "top2": quality + 0.2, "adj1": quality + 0.3,
                     "adj1_dyn": quality + 0.25, "n": N_TEST} for s in ("val", "test")}
            (d / "metrics.json").write_text(json.dumps({**m, "fold": k}))
            correct = rng.random(N_TEST) < quality
            pred = np.where(correct, labels, (labels + 1) % len(CLASSES))
            probs = np.full((N_TEST, len(CLASSES)), 0.1)
            probs[np.arange(N_TEST), pred] = 0.7
            df = pd.DataFrame({"split": "test", "fold": k, "cell_id": np.arange(N_TEST), "slide": f"test_{scan}",
                               "row": np.arange(N_TEST), "label_idx": labels})
            for c, cls in enumerate(CLASSES):
                df[f"prob_{cls}"] = probs[:, c]
            df.to_parquet(d / "predictions.parquet")
            emb = (np.eye(len(CLASSES))[labels] * 3 + rng.normal(0, 0.3, (N_TEST, len(CLASSES)))).astype(np.float32)
            pq.write_table(pa.table({
                "split": ["test"] * N_TEST, "fold": [k] * N_TEST, "cell_id": np.arange(N_TEST),
                "slide": [f"test_{scan}"] * N_TEST, "row": np.arange(N_TEST), "label_idx": labels,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]),
            }), d / "embeddings.parquet")
            for key in ("metrics", "predictions", "embeddings"):
                spec[key].append(str(d / (f"{key}.json" if key == "metrics" else f"{key}.parquet")))
        experiments[name] = spec
    return experiments


@pytest.fixture
def experiments(tmp_path):
    return write_fold_outputs(tmp_path / "finetune")


@pytest.fixture
def summary(experiments):
    return summary_table(fold_table(experiments))


def test_table1_counts_labelled_cells_per_class_split_and_scan():
    train = pd.DataFrame({"scan": "40x", "split": "train", "label_idx": [0, 0, 1, 3, -1, -1, -1]})
    test = pd.DataFrame({"scan": "40x", "split": "test", "label_idx": [2, 2, 1]})
    unl = pd.DataFrame({"scan": "40x", "split": "unlabelled", "label_idx": [-1] * 5})
    t20 = pd.DataFrame({"scan": "20x", "split": "train", "label_idx": [0, 3]})
    table = dataset_table([test, unl, train, t20], CLASSES)
    assert list(table.columns) == ["scan", "split", *CLASSES, "all labelled", "unlabelled"]
    assert list(zip(table["scan"], table["split"])) == [
        ("20x", "train/val"), ("40x", "train/val"), ("40x", "test"), ("40x", "unlabelled")]
    row = table.iloc[1]
    assert [row[c] for c in CLASSES] == [2, 1, 0, 1] and row["all labelled"] == 4 and row["unlabelled"] == 3
    assert table.iloc[3]["all labelled"] == 0 and table.iloc[3]["unlabelled"] == 5


def test_table1_rejects_a_label_outside_the_classes():
    with pytest.raises(ValueError, match="label_idx 7"):
        dataset_table([pd.DataFrame({"scan": "40x", "split": "train", "label_idx": [7]})], CLASSES)


def test_tables_a5_a6_hold_scratch_and_imagenet_configurations_only(summary):
    a5, a6 = paper_table(summary, "A5"), paper_table(summary, "A6")
    assert set(a5["init"]) == {"scratch"} and set(a6["init"]) == {"imagenet"}
    assert len(a5) == 2 * 2 * 2 * 2 and len(a6) == 2 * 2 * 2  # scan x bg x backbone x distance
    assert list(a5.columns[:6]) == ["scan", "background", "distance", "backbone", "init", "recipe"]
    assert set(a5["recipe"]) == {"baseline"}
    assert a5[["scan", "background", "distance", "backbone"]].apply(tuple, axis=1).is_monotonic_increasing


def test_table_a7_puts_baseline_and_pretrained_recipes_side_by_side_with_background_only(summary):
    a7 = paper_table(summary, "A7")
    assert a7["background"].all() and set(a7["recipe"]) == {"baseline", "pretrained"}
    block = a7[(a7["scan"] == "40x") & (a7["backbone"] == "resnet18") & (~a7["distance"])]
    assert list(block["init"]) == ["imagenet", "scratch", "simclr"]
    assert list(block["recipe"]) == ["baseline", "baseline", "pretrained"]
    md = paper_markdown(a7, ["scan", "backbone", "distance", "recipe", "init"], title="A.7", header="> prov\n")
    assert "| Scan | Backbone | Distance | Recipe | Init | folds | val Top-1 |" in md
    simclr = block[block["init"] == "simclr"].iloc[0]
    mean, std = 100 * simclr["val_top1_mean"], 100 * simclr["val_top1_std"]
    assert f"| 40x | resnet18 | no | pretrained | simclr | 2 | {mean:.1f} ± {std:.1f} |" in md


def test_empty_paper_table_says_so(summary):
    md = paper_markdown(paper_table(summary[summary["init"] == "simclr"], "A6"), ["scan"], title="A.6")
    assert "No configuration of this kind" in md


def test_mean_optical_density_is_taken_over_the_nucleus_mask():
    images = np.full((2, 4, 4, 3), 255, np.uint8)
    images[1, :2] = 25  # dark upper half
    masks = np.zeros((2, 4, 4), bool)
    masks[1, :2] = True
    od = mean_optical_density(images, masks)
    assert od[0] == pytest.approx(0.0)  # white, empty mask: whole crop
    assert od[1] == pytest.approx(-np.log10(26 / 256))
    assert mean_optical_density(images)[1] == pytest.approx(-np.log10(26 / 256) / 2)


def test_stain_intensity_reads_the_crops_by_slide_and_row(tmp_path):
    write_crop_store(tmp_path / "s.zarr", 10)
    cells = pd.DataFrame({"slide": ["s", "s", "s"], "row": [9, 0, 5]})
    od = stain_intensity(cells, {"s": tmp_path / "s.zarr"})
    assert od[0] > od[2] > od[1]  # darker nucleus with the row number
    with pytest.raises(ValueError, match="no crop store for slide 'x'"):
        stain_intensity(pd.DataFrame({"slide": ["x"], "row": [0]}), {})


def test_embeddings_parquet_reads_back_as_cells_and_an_array(experiments):
    cells, emb = read_embeddings(next(iter(experiments.values()))["embeddings"][0])
    assert emb.shape == (N_TEST, len(CLASSES)) and emb.dtype == np.float32
    assert list(cells.columns) == ["split", "fold", "cell_id", "slide", "row", "label_idx"]


def test_provenance_records_config_hash_commit_version_and_input_checksums(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("1")
    b.write_text("2")
    assert config_hash({"x": 1, "y": [1, 2]}) == config_hash({"y": [1, 2], "x": 1}) != config_hash({"x": 2})
    prov = report_provenance("abc", [a, b, tmp_path])
    assert prov["inputs"][str(a)] == hashlib.sha256(b"1").hexdigest()
    assert prov["inputs"][str(tmp_path)] == "directory"
    assert prov["config_hash"] == "abc" and "cellstage_version" in prov and "commit" in prov["git"]
    b.write_text("3")
    assert report_provenance("abc", [a, b])["inputs_digest"] != prov["inputs_digest"]
    assert markdown_block(prov).startswith("> Provenance: config `abc`")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        report_provenance("abc", [tmp_path / "missing.json"])


def test_git_commit_is_the_checkout_head_and_none_outside_a_repository(tmp_path):
    import subprocess

    from cellstage.report.provenance import git_commit

    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert git_commit()["commit"] == (head or None)
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}


def test_run_fold_stores_the_test_embeddings_beside_the_predictions(tmp_path):
    import torch
    from test_finetune import make_crop_source

    from cellstage.train import run_fold

    torch.set_num_threads(1)
    train = [make_crop_source(tmp_path, "s1_20x", n_per_class=3, size=32, seed=1)]
    test = [make_crop_source(tmp_path, "s2_20x", n_per_class=2, size=32, seed=2, split="test", patient="p2")]
    out = tmp_path / "fold0"
    run_fold(train, test, out, fold=0, n_folds=2, backbone="resnet18", recipe={"name": "baseline", "epochs": 1},
             batch_size=16, progress=False, accelerator="cpu", checkpoint_every=0)
    cells, emb = read_embeddings(out / "embeddings.parquet")
    preds = pd.read_parquet(out / "predictions.parquet")
    test_preds = preds[preds["split"] == "test"].reset_index(drop=True)
    assert emb.shape == (len(test_preds), 512) and np.isfinite(emb).all()  # resnet18's pooled features
    pd.testing.assert_frame_equal(cells[["cell_id", "slide", "row", "label_idx"]],
                                  test_preds[["cell_id", "slide", "row", "label_idx"]], check_dtype=False)
    assert emb.std(axis=0).max() > 0  # not a constant embedding


def _report_run(tmp_path):
    """Synthetic stored outputs of a finished run (fold outputs, crop indexes and stores, cell
    tables, converted test slides) and the report's output paths."""
    from cellstage.demo.generate import write_pyramid_tiff
    from cellstage.io.omezarr import convert_to_omezarr

    experiments = write_fold_outputs(tmp_path / "finetune")
    inputs = {"metrics": [], "predictions": [], "embeddings": [], "crops": [], "crop_zarr": [], "cells": [],
              "slides": []}
    for spec in experiments.values():
        for key in ("metrics", "predictions", "embeddings"):
            inputs[key] += spec[key]
    labels = np.arange(N_TEST) % len(CLASSES)
    for scan, mpp in (("40x", 0.17), ("20x", 0.34)):
        slide = f"test_{scan}"
        write_crop_store(tmp_path / f"{slide}.zarr", N_TEST)
        pd.DataFrame({"row": np.arange(N_TEST), "cell_id": np.arange(N_TEST), "slide": slide, "section": "s",
                      "scan": scan, "split": "test", "label_idx": labels}).to_parquet(tmp_path / f"{slide}.parquet")
        pd.DataFrame({"cell_id": np.arange(N_TEST), "centroid_x": 10.0 + labels, "centroid_y": 20.0,
                      "label": [CLASSES[i] for i in labels]}).to_parquet(tmp_path / f"cells_{slide}.parquet")
        tiff = tmp_path / f"{slide}.tiff"
        write_pyramid_tiff(tiff, np.full((256, 256, 3), 200, np.uint8), mpp)
        convert_to_omezarr(tiff, tmp_path / f"{slide}.ome.zarr", tile=128)
        inputs["crops"].append(str(tmp_path / f"{slide}.parquet"))
        inputs["crop_zarr"].append(str(tmp_path / f"{slide}.zarr"))
        inputs["slides"].append(str(tmp_path / f"{slide}.ome.zarr"))
    # cell tables are named by slide (results/cells/{slide}.parquet)
    for slide in ("test_40x", "test_20x"):
        (tmp_path / "cells").mkdir(exist_ok=True)
        (tmp_path / f"cells_{slide}.parquet").rename(tmp_path / "cells" / f"{slide}.parquet")
        inputs["cells"].append(str(tmp_path / "cells" / f"{slide}.parquet"))
    out = tmp_path / "report"
    names = {"csv": "cv_results.csv", "md": "cv_results.md", "folds": "cv_folds.csv", "summary": "summary.json",
             "table1_csv": "table1.csv", "table1_md": "table1.md", "a5_csv": "a5.csv", "a5_md": "a5.md",
             "a6_csv": "a6.csv", "a6_md": "a6.md", "a7_csv": "a7.csv", "a7_md": "a7.md", "fig4": "fig4.png",
             "umap": "fig5.png", "fig6": "fig6.png", "boxplot": "fig7.png", "confusion": "cm.png",
             "confusion_scans": "cm_scans.png", "confusion_csv": "cm_scans.csv", "stages": "stages.csv",
             "geojson": "qupath", "provenance": "provenance.json"}
    return experiments, inputs, {k: str(out / v) for k, v in names.items()}


def test_report_writes_every_paper_table_and_figure_with_provenance(tmp_path):
    from cellstage.report.stage import report

    experiments, inputs, outputs = _report_run(tmp_path)
    result = report(inputs, outputs, experiments=experiments, classes=CLASSES, metric="top1", config_hash="c0ffee",
                    seed=0)
    for key, path in outputs.items():
        assert Path(path).exists(), key
    # the best configuration: with background, distance, a non-scratch init, 40x (see write_fold_outputs)
    assert result["best_experiment"].startswith("40x-bg-") and result["best_experiment"].endswith("-dist")
    prov = json.loads(Path(outputs["provenance"]).read_text())
    assert prov["config_hash"] == "c0ffee" and "commit" in prov["git"] and prov["cellstage_version"]
    assert prov["inputs"][inputs["predictions"][0]] == hashlib.sha256(Path(inputs["predictions"][0]).read_bytes()
                                                                      ).hexdigest()
    for key in ("csv", "table1_csv", "a5_csv", "a6_csv", "a7_csv", "fig4", "umap", "fig6"):
        assert prov["outputs"][outputs[key]] == hashlib.sha256(Path(outputs[key]).read_bytes()).hexdigest()
    for key in ("md", "table1_md", "a5_md", "a6_md", "a7_md"):
        assert "> Provenance: config `c0ffee`" in Path(outputs[key]).read_text(), key
    table1 = pd.read_csv(outputs["table1_csv"])
    assert table1[CLASSES].sum(axis=1).tolist() == [N_TEST, N_TEST]
    a7 = pd.read_csv(outputs["a7_csv"])
    assert set(a7["recipe"]) == {"baseline", "pretrained"} and a7["background"].all()
    assert "| Configuration | init | recipe | val Top-1 |" in Path(outputs["md"]).read_text()
    cms = pd.read_csv(outputs["confusion_csv"])
    assert set(cms["scan"]) == {"40x", "20x"}
    assert cms.groupby("scan")["count"].sum().tolist() == [N_TEST, N_TEST]  # every test cell once (fold ensemble)
    best20 = cms.loc[cms["scan"] == "20x", "experiment"].iloc[0]
    assert best20.startswith("20x-bg-") and best20.endswith("-dist")
    from PIL import Image

    for key in ("fig4", "umap", "fig6", "boxplot", "confusion_scans"):
        with Image.open(outputs[key]) as im:
            assert im.format == "PNG" and min(im.size) > 200, key


def test_registration_overlay_png_is_capped_and_small(tmp_path):
    from PIL import Image
    from slide_doubles import FakeSlide  # tests/ is on sys.path (tests/conftest.py)

    from cellstage.register.homography import RegistrationResult
    from cellstage.register.qc import OVERLAY_MAX_PNG_SIDE, overlay_png, save_capped_png

    rng = np.random.default_rng(0)
    img = (rng.random((1500, 2000, 3)) * 255).astype(np.uint8)  # noise: the worst case for PNG size
    ref, mov = FakeSlide(img, 0.17), FakeSlide(img, 0.17)
    res = RegistrationResult(H=np.eye(3), n_matches=10, n_inliers=9, rmse_px=0.5, rmse_um=0.1, scale=1.0,
                             rotation_deg=0.0, ok=True)
    overlay_png(ref, mov, res, tmp_path / "reg.png", max_side=1600)
    with Image.open(tmp_path / "reg.png") as im:
        assert max(im.size) == OVERLAY_MAX_PNG_SIDE and im.mode == "P"
    assert (tmp_path / "reg.png").stat().st_size < 500_000  # noise (worst case) at 640 px, 64-colour palette
    save_capped_png(img, tmp_path / "small.png", max_side=300)
    with Image.open(tmp_path / "small.png") as im:
        assert im.size == (300, 225)  # aspect ratio kept
    save_capped_png(img[:100, :120], tmp_path / "tiny.png", max_side=300)
    with Image.open(tmp_path / "tiny.png") as im:
        assert im.size == (120, 100)  # never upscaled


def test_report_writes_only_the_outputs_asked_for(tmp_path):
    """A caller that asks for the base outputs only (e.g. one stage run by hand) gets those, and
    the config's hash is computed when only the config is given."""
    from cellstage.report.stage import report

    experiments, inputs, outputs = _report_run(tmp_path)
    base = {k: outputs[k] for k in ("csv", "md", "folds", "summary", "boxplot", "confusion", "stages", "geojson")}
    result = report(inputs, base, experiments=experiments, classes=CLASSES, metric="top1", config={"seed": 1})
    assert sorted(p.name for p in Path(outputs["csv"]).parent.iterdir()) == sorted(Path(p).name for p in base.values())
    assert result["provenance"]["config_hash"] == config_hash({"seed": 1})
