"""Frozen-backbone probes (cellstage.ssl.probe) and their report table (cellstage.report.probes)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cellstage.report.probes import VALUE_COLUMNS, probe_markdown, probe_table
from cellstage.ssl import pretrain
from cellstage.ssl.probe import probe, probe_features, probe_folds, run_probe
from cellstage.taxonomy import Taxonomy
from cellstage.utils import CellstageError

torch.set_num_threads(2)

TAXONOMY = Taxonomy()
LABELS = (0, 2, 4, 6)  # PMC (static) and three dynamic stages two steps apart
SECTIONS = ("sec01", "sec02", "sec03", "sec04")
BACKBONE = "test_resnet"  # timm's tiny ResNet (96 features): seconds on 2 cores


def write_labelled_section(tmp_path, section: str, n_per_class: int = 6, size: int = 40, seed: int = 0):
    """One train slide's crops (zarr + index per docs/contracts.md): ``n_per_class`` labelled cells of
    each class in LABELS, the nucleus's radius and grey level set by its class (plus noise)."""
    import zarr

    rng = np.random.default_rng([seed, SECTIONS.index(section)])
    labels = np.repeat(LABELS, n_per_class)
    n = len(labels)
    yy, xx = np.mgrid[:size, :size]
    images = np.full((n, size, size, 3), 230, np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i, label in enumerate(labels):
        step = LABELS.index(label)
        cy, cx = size / 2 + rng.normal(0, 1.5, 2)
        r = size * (0.12 + 0.05 * step)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        images[i][masks[i]] = (60 + 35 * step, 40 + 20 * step, 150 - 25 * step)
        images[i] = np.clip(images[i] + rng.normal(0, 6, images[i].shape), 0, 255).astype(np.uint8)
    slide = f"{section}_40x"
    zpath = tmp_path / f"{slide}.zarr"
    g = zarr.open_group(str(zpath), mode="w")
    g.create_array("images", data=images, chunks=(64, size, size, 3))
    g.create_array("masked", data=(images * masks[..., None]).astype(np.uint8), chunks=(64, size, size, 3))
    g.create_array("masks", data=masks, chunks=(64, size, size))
    index = pd.DataFrame(
        {
            "row": np.arange(n),
            "cell_id": np.arange(1, n + 1),
            "slide": slide,
            "section": section,
            "scan": "40x",
            "patient": "p1" if section in SECTIONS[:2] else "p2",
            "split": "train",
            "label": [TAXONOMY.classes[c] for c in labels],
            "label_idx": labels,
            "distance_norm": rng.uniform(0, 1, n),
        }
    )
    ipath = tmp_path / f"{slide}.parquet"
    index.to_parquet(ipath)
    return str(zpath), str(ipath)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    return [write_labelled_section(root, s) for s in SECTIONS]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sources):
    """A real SimCLR run (1 step of 8 crops) of timm's tiny ``test_resnet``, exported as the workflow's."""
    out = tmp_path_factory.mktemp("pretrain") / "simclr" / BACKBONE / "40x"
    pretrain("simclr", BACKBONE, sources, out, img_size=40, epochs=1, batch_size=8, max_crops=8, progress=False, seed=0)
    return out


@pytest.fixture(scope="module")
def probed(run_dir, sources):
    return run_probe(run_dir, sources, taxonomy=TAXONOMY, n_folds=5, group_by="section", k=20, seed=0)


def test_probes_on_informative_features_beat_the_same_probes_on_noise():
    """Features built to separate the classes (a class centre plus small noise) are probed near
    perfectly; pure noise is near chance; both in [0, 1]."""
    rng = np.random.default_rng(0)
    labels = np.repeat(LABELS, 20)
    folds = np.tile(np.arange(4), len(labels) // 4)
    centres = rng.normal(0, 1, (TAXONOMY.n_classes, 32))
    informative = centres[labels] + rng.normal(0, 0.3, (len(labels), 32))
    noise = rng.normal(0, 1, (len(labels), 32))
    good = probe_features(informative, labels, folds, TAXONOMY, k=5, seed=0)
    bad = probe_features(noise, labels, folds, TAXONOMY, k=5, seed=0)
    for result in (good, bad):
        for p in ("knn", "linear"):
            assert len(result[p]["folds"]) == 4
            for m in ("top1", "adj1"):
                assert 0.0 <= result[p]["mean"][m] <= 1.0 and result[p]["std"][m] >= 0.0
            assert result[p]["mean"]["adj1"] >= result[p]["mean"]["top1"]  # Adjacent-1 counts exact hits too
    for p in ("knn", "linear"):
        assert good[p]["mean"]["top1"] >= 0.95
        assert bad[p]["mean"]["top1"] <= 0.5
        assert good[p]["mean"]["top1"] >= bad[p]["mean"]["top1"] + 0.4


def test_folds_are_grouped_by_section_and_shrink_to_the_groups():
    cells = pd.DataFrame(
        {
            "section": np.repeat(SECTIONS, 8),
            "cell_id": np.tile(np.arange(8), 4),
            "label_idx": np.tile(np.repeat([0, 2], 4), 4),
            "patient": np.repeat(["a", "a", "b", "b"], 8),
        }
    )
    folds, used = probe_folds(cells, 5, group_by="section", seed=0)
    assert used["n_folds"] == 4 and "4 section groups" in used["note"]
    assert all(len(set(folds[cells["section"] == s])) == 1 for s in SECTIONS)  # no section on both sides
    folds, used = probe_folds(cells, 5, group_by="patient", seed=0)
    assert used["n_folds"] == 2 and sorted(set(folds)) == [0, 1]
    folds, used = probe_folds(cells.assign(patient="a"), 5, group_by="patient", seed=0)
    assert used["group_by"] is None and used["n_folds"] == 5  # one group: folds over single cells, recorded


def test_probe_of_a_pretraining_run_writes_pretrained_and_random_metrics(run_dir, probed):
    info = json.loads((run_dir / "probe.json").read_text())
    assert info["method"] == "simclr" and info["backbone"] == BACKBONE and info["scan"] == "40x"
    assert info["n_cells"] == 4 * 6 * len(LABELS) and info["feature_dim"] == 96
    assert info["folds"] == {"n_folds": 4, "group_by": "section", "note": "4 section groups: 4 folds, not 5"}
    assert info["config"]["k"] == 20 and info["config"]["knn_metric"] == "cosine"
    for init in ("pretrained", "random"):
        for p in ("knn", "linear"):
            assert len(info[init][p]["folds"]) == 4
            for m in ("top1", "top2", "adj1", "adj1_dyn"):
                assert 0.0 <= info[init][p]["mean"][m] <= 1.0
            assert info["gain"][p]["top1"] == pytest.approx(
                info["pretrained"][p]["mean"]["top1"] - info["random"][p]["mean"]["top1"]
            )
    assert all(r["k"] == 20 and r["n_train"] == 72 for r in info["pretrained"]["knn"]["folds"])
    # class-coloured nuclei: even frozen features separate them far above chance (1/4)
    assert info["pretrained"]["linear"]["mean"]["top1"] > 0.5
    assert info["pretrained"] != info["random"]  # the exported weights were used


def test_probe_is_deterministic(tmp_path, run_dir, sources, probed):
    again = probe(
        run_dir,
        [s[0] for s in sources],
        [s[1] for s in sources],
        tmp_path / "probe.json",
        classes=list(TAXONOMY.classes),
        static_classes=list(TAXONOMY.static),
        n_folds=5,
        group_by="section",
        k=20,
        C=1.0,
        seed=0,
        threads=2,
    )
    for init in ("pretrained", "random"):
        assert again[init] == probed[init]


def test_missing_weights_name_the_file(tmp_path, run_dir, sources):
    broken = tmp_path / "run"
    broken.mkdir()
    shutil.copy(run_dir / "pretrain.json", broken / "pretrain.json")
    with pytest.raises(CellstageError, match=r"backbone\.safetensors does not exist"):
        run_probe(broken, sources, taxonomy=TAXONOMY)
    (broken / "backbone.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CellstageError, match=r"backbone\.safetensors is not a readable"):
        run_probe(broken, sources, taxonomy=TAXONOMY)


def test_report_table_has_one_row_per_run(tmp_path, run_dir, probed):
    other = json.loads((run_dir / "probe.json").read_text())
    other["method"] = "dino"
    (tmp_path / "dino.json").write_text(json.dumps(other))
    table = probe_table([run_dir / "probe.json", tmp_path / "dino.json"])
    assert table["method"].tolist() == ["dino", "simclr"]
    assert set(VALUE_COLUMNS) <= set(table.columns) and "random_knn_top1" in VALUE_COLUMNS
    row = table.set_index("method").loc["simclr"]
    assert row["linear_top1"] == probed["pretrained"]["linear"]["mean"]["top1"]
    assert row["random_knn_adj1"] == probed["random"]["knn"]["mean"]["adj1"]
    md = probe_markdown(table, header="> provenance\n")
    assert "> provenance" in md and "| random kNN Top-1 |" in md and md.count("| simclr |") == 1
    assert f"{100 * row['linear_top1']:.1f} ± " in md
    assert "No pretraining runs" in probe_markdown(probe_table([]))
    with pytest.raises(CellstageError, match="nowhere/probe.json does not exist"):
        probe_table([tmp_path / "nowhere/probe.json"])


def test_probe_normalises_stains_as_the_run_did(tmp_path, run_dir, sources):
    """A run pretrained with Macenko normalisation (pretrain.json config.augment) is probed on
    normalised crops; the reference slide's crops come as stain sources."""
    info = json.loads((run_dir / "pretrain.json").read_text())
    info["config"]["augment"] = {"macenko": True, "macenko_reference": "sec04_40x"}
    (tmp_path / "pretrain.json").write_text(json.dumps(info))
    shutil.copy(run_dir / "backbone.safetensors", tmp_path / "backbone.safetensors")
    res = run_probe(tmp_path, sources[:3], taxonomy=TAXONOMY, n_folds=3, stain_sources=sources[3:])
    assert res["config"]["macenko"] is True and res["n_cells"] == 3 * 6 * len(LABELS)
    assert all(0.0 <= res[i][p]["mean"]["top1"] <= 1.0 for i in ("pretrained", "random") for p in ("knn", "linear"))
    with pytest.raises(CellstageError, match="macenko_reference: slide 'sec04_40x' is not among"):
        run_probe(tmp_path, sources[:3], taxonomy=TAXONOMY, n_folds=3)
