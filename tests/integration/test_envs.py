"""Each per-rule environment (workflow/envs/*.yaml) runs what its rules run.

A rule run with ``snakemake --sdm conda`` gets a conda environment built from its yaml, holding
only the yaml's packages; ``cellstage`` itself comes from the repository's ``src/``
(workflow/scripts/_src_path.py, docs/hpc.md "Per-rule environments"). Here every yaml's pip part
is built as a plain venv twin (``make setup-env-twins``: ``.venv-envs/<env>``; the bioformats
twin is ``.venv-bioformats`` from ``make setup-bioformats``), and in it

* every rule script of that environment is started the way Snakemake starts it (the script's
  folder appended to ``sys.path``, nothing else of the repository), up to its first use of the
  ``snakemake`` object: all module-level imports of every rule;
* one real code path of the environment runs on a tiny slide (io: convert + register; seg:
  classical and Cellpose segmentation + cell table; ml: grader training and grading, SSL
  pretraining, one fine-tuning fold; report: the report stage on two experiments),

so a module missing from an environment fails here, not on a cluster. Without a twin the tests
skip with the command that builds it; under CI (``CI=true``) they fail instead.

Snakemake's own preamble appends the *launching* process's ``sys.path`` too
(``snakemake.common.get_snakemake_searchpaths``), so under ``--sdm conda`` started from the
project ``.venv`` a package missing from an environment can be found silently in ``.venv``; with
Snakemake installed on its own (the usual cluster set-up) it fails. The twins see neither.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ENV_DIR = REPO / "workflow/envs"
SCRIPTS = REPO / "workflow/scripts"
ENVS = sorted(p.stem for p in ENV_DIR.glob("*.yaml"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(spec: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[]", spec.strip(), maxsplit=1)[0])


def env_pins(env: str) -> dict[str, str]:
    """{normalised name: version} of the env's pip section (``name==version`` lines)."""
    spec = yaml.safe_load((ENV_DIR / f"{env}.yaml").read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_norm(p.split("==")[0]): p.split("==", 1)[1].split("#")[0].strip() for p in pip}


def rule_table() -> dict[str, tuple[str, Path | None]]:
    """{rule: (env, script or None for a shell rule)} from workflow/rules/*.smk."""
    out = {}
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule |checkpoint )", smk.read_text()):
            m = re.match(r"(?:rule|checkpoint) (\w+):", block)
            if not m:
                continue
            env = re.search(r'\n    conda:\s*\n\s*"\.\./envs/(\w+)\.yaml"', block)
            script = re.search(r'\n    script:\s*\n\s*"\.\./scripts/([\w.]+)"', block)
            out[m.group(1)] = (env.group(1) if env else None, SCRIPTS / script.group(1) if script else None)
    return out


def twin_python(env: str) -> Path:
    venv = REPO / ".venv-bioformats" if env == "bioformats" else REPO / ".venv-envs" / env
    make = "make setup-bioformats" if env == "bioformats" else "make setup-env-twins"
    marker, spec = venv / ".installed", ENV_DIR / f"{env}.yaml"
    problem = None
    if not marker.exists():
        problem = f"the twin of {spec.name} ({venv.name}) is not built"
    elif marker.stat().st_mtime < spec.stat().st_mtime:
        problem = f"the twin of {spec.name} ({venv}) is older than the yaml"
    if problem:
        msg = f"{problem}: run `{make}` (`make test` builds it before the tests)"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return venv / "bin/python"


def run_twin(name: str, code: str, cwd: Path, *, as_rule: bool = True, timeout: int = 900) -> str:
    """Run ``code`` with the twin's python; ``as_rule``: as Snakemake runs a rule script (the script
    folder appended to sys.path, then ``import _src_path``, what every rule script does first)."""
    preamble = f"import sys; sys.path.append({str(SCRIPTS)!r}); import _src_path\n" if as_rule else ""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="2", MPLBACKEND="Agg")
    proc = subprocess.run([str(twin_python(name)), "-c", preamble + textwrap.dedent(code)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"in the twin of {name}.yaml:\n{out[-6000:]}"
    return proc.stdout


# ----------------------------------------------------------------------------- without twins


def test_every_rule_has_an_env_and_every_env_a_twin_target():
    rules = rule_table()
    assert rules, "no rules parsed from workflow/rules/*.smk"
    missing = sorted(r for r, (env, _) in rules.items() if env not in ENVS)
    assert not missing, f"rules without an env of workflow/envs/: {missing}"
    makefile = (REPO / "Makefile").read_text()
    twins = re.search(r"^ENV_TWINS := (.*)$", makefile, re.M).group(1).split()
    assert sorted(twins + ["bioformats"]) == ENVS, f"Makefile ENV_TWINS {twins} + bioformats != envs {ENVS}"


@pytest.mark.parametrize("env", ENVS)
def test_env_pins_exactly_the_base_plus_its_extra(env):
    """workflow/envs/<env>.yaml pins exactly pyproject's `dependencies` + extra `<env>` (by name):
    installing `cellstage[<env>]` with pip gives the same environment as the conda yaml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(_req_name(d) == "snakemake" for d in project["dependencies"]), \
        "snakemake is a runtime dependency again: it belongs to the `workflow` extra"
    declared = {_req_name(d) for d in project["dependencies"]}
    declared |= {_req_name(d) for d in project["optional-dependencies"][env]}
    pinned = set(env_pins(env))
    assert pinned == declared, (f"{env}.yaml pins but pyproject does not declare: {sorted(pinned - declared)}; "
                                f"pyproject declares but {env}.yaml does not pin: {sorted(declared - pinned)}")


def test_rule_scripts_put_src_on_the_path_before_importing_cellstage():
    for script in sorted(SCRIPTS.glob("*.py")):
        if script.name == "_src_path.py":
            continue
        lines = [ln for ln in script.read_text().splitlines() if re.match(r"(import|from) \w", ln)]
        first = next((i for i, ln in enumerate(lines) if re.match(r"(import|from) cellstage\b", ln)), None)
        assert first is not None and any(ln.split("#")[0].strip() == "import _src_path" for ln in lines[:first]), (
            f"{script.relative_to(REPO)}: `import _src_path  # noqa: F401` must come before the first "
            f"cellstage import (under --sdm conda the environment has no cellstage; docs/hpc.md)")


# ------------------------------------------------------------------------------- in the twins


@pytest.mark.parametrize("env", ENVS)
def test_twin_holds_the_env_pins_and_no_cellstage(env, tmp_path):
    out = run_twin(env, """
        import importlib.metadata as md, json, sys
        dists = {d.metadata["Name"]: d.version for d in md.distributions()}
        print(json.dumps(dists))
    """, tmp_path, as_rule=False)
    installed = {_norm(k): v for k, v in json.loads(out.splitlines()[-1]).items()}
    wrong = {n: (v, installed.get(n)) for n, v in env_pins(env).items() if installed.get(n) != v}
    assert not wrong, f"twin of {env}.yaml differs (pin, installed): {wrong}; rebuild it: `make setup-env-twins`"
    if env != "bioformats":  # .venv-bioformats also serves config bioformats_python, with cellstage
        assert "cellstage" not in installed, f"the {env} twin has cellstage installed: it would hide the src/ path"


@pytest.mark.parametrize("env", ENVS)
def test_every_rule_script_of_the_env_imports_in_it(env, tmp_path):
    rules = {r: s for r, (e, s) in rule_table().items() if e == env}
    scripts = sorted({str(s) for s in rules.values() if s is not None})
    if scripts:
        out = run_twin(env, f"""
            import runpy
            class Reached(Exception):
                pass
            class Snakemake:  # stands in for the object of Snakemake's preamble: stop at first use
                def __getattr__(self, name):
                    raise Reached(name)
            for script in {scripts!r}:
                try:
                    runpy.run_path(script, init_globals={{"snakemake": Snakemake()}}, run_name="__main__")
                except Reached:
                    print("imported", script)
                else:
                    raise SystemExit(script + " never used the snakemake object")
        """, tmp_path)
        assert out.count("imported ") == len(scripts), out
    for rule in sorted(r for r, s in rules.items() if s is None):  # shell rules: convert_bioformats
        assert rule == "convert_bioformats", f"shell rule {rule}: teach this test its command"
        # the rule's command: PYTHONPATH=<repo>/src python -m cellstage.cli convert ... --backend bioformats
        # (a real conversion through it: tests/unit/test_bioformats.py)
        env_vars = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env_vars["PYTHONPATH"] = str(REPO / "src")
        proc = subprocess.run([str(twin_python(env)), "-m", "cellstage.cli", "convert", "--help"], cwd=tmp_path,
                              env=env_vars, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "--backend" in proc.stdout, proc.stdout + proc.stderr
        run_twin(env, "from cellstage.io.slides import bioformats as b; assert b.bioformats_available()", tmp_path)


# one real code path per environment, on a tiny slide made here in the project venv

MPP = 0.5
CLASSES = ["A", "B"]
META = {"slide": "s1", "section": "sec1", "scan": "40x", "patient": "p1", "split": "train"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real 512x512 IHC image as a tiled TIFF, its OME-Zarr (and one of its 256x256 corner), a
    tubule, a label image with 12 nuclei, their cell table and crops: the inputs of every
    environment's code path, made in the project venv."""
    import skimage.data
    import tifffile
    import zarr

    from cellstage.crops.stage import extract_crops
    from cellstage.io.stage import convert

    d = tmp_path_factory.mktemp("envs")
    img = skimage.data.immunohistochemistry()
    tifffile.imwrite(d / "s1.tif", img, tile=(256, 256), photometric="rgb", compression="zlib")
    convert(d / "s1.tif", d / "s1.ome.zarr", backend=None, mpp=MPP, tile=256)
    tifffile.imwrite(d / "small.tif", img[:256, :256], photometric="rgb")  # one Cellpose tile (~9 s on 2 cores)
    convert(d / "small.tif", d / "small.ome.zarr", backend=None, mpp=MPP, tile=256)
    for name, side in (("tubules", 512), ("small_tubules", 256)):
        ring = [[8, 8], [side - 8, 8], [side - 8, side - 8], [8, side - 8], [8, 8]]
        (d / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [{
            "type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": "Tubule"}},
            "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    lab = np.zeros(img.shape[:2], np.uint32)
    rows = []
    for i in range(12):
        y, x = 60 + 35 * i, 40 + 36 * i
        lab[y - 5:y + 5, x - 5:x + 5] = i + 1
        rows.append({"cell_id": i + 1, "slide": META["slide"], "centroid_x": float(x) - 0.5,
                     "centroid_y": float(y) - 0.5, "label": CLASSES[i % 2], "distance_to_wall_um": float(i),
                     "distance_norm": i / 12})
    g = zarr.open_group(str(d / "seg.zarr"), mode="w", zarr_format=3)
    g.create_array("labels", data=lab, chunks=(256, 256))
    pd.DataFrame(rows).to_parquet(d / "cells.parquet")
    extract_crops(d / "s1.ome.zarr", d / "seg.zarr", d / "cells.parquet", d / "crops.zarr", d / "crops.parquet",
                  size=32, meta=META, classes=CLASSES)
    pd.DataFrame({"x": [r["centroid_x"] for r in rows], "y": [r["centroid_y"] for r in rows],
                  "grade": [1, 6] * 6}).to_csv(d / "grades.csv", index=False)
    return d


def test_io_env_converts_and_registers(tiny, tmp_path):
    run_twin("io", f"""
        from cellstage.io.stage import convert
        from cellstage.register.stage import register
        d, t = {str(tiny)!r}, {str(tmp_path)!r}
        info = convert(d + "/s1.tif", t + "/s1.ome.zarr", backend=None, mpp={MPP}, tile=256)
        res = register(t + "/s1.ome.zarr", d + "/s1.ome.zarr", t + "/reg.json", t + "/reg.png", n_features=2000,
                       ransac_threshold=5.0, min_inliers=10, min_inlier_ratio=0.2, coarse_max_side=512)
        print(info, res)
    """, tmp_path)
    from cellstage.io.slides import ZarrSlide

    with ZarrSlide(tmp_path / "s1.ome.zarr") as a, ZarrSlide(tiny / "s1.ome.zarr") as b:
        assert np.array_equal(a.read_region(0, 0, 512, 512), b.read_region(0, 0, 512, 512))
    assert (tmp_path / "reg.png").stat().st_size > 0 and json.loads((tmp_path / "reg.json").read_text())


def test_seg_env_segments_and_builds_the_cell_table(tiny, tmp_path):
    run_twin("seg", f"""
        from cellpose import models
        from cellstage.cells.stage import cells
        from cellstage.segment.stage import segment
        d, t = {str(tiny)!r}, {str(tmp_path)!r}
        segment(d + "/s1.ome.zarr", d + "/tubules.geojson", None, t + "/classical.zarr", method="classical",
                tile=256, overlap=32, diameter=None, threads=1)
        table = cells(t + "/classical.zarr", d + "/s1.ome.zarr", d + "/tubules.geojson", None, t + "/cells.parquet",
                      slide_id="s1", classes={CLASSES!r}, match_radius_px=10.0)
        # the Cellpose path with an untrained net (no weights can be downloaded): the imports and the
        # tiled inference run, the masks do not matter
        models.CellposeModel(gpu=False, pretrained_model=False).net.save_model(t + "/cp_model")
        segment(d + "/small.ome.zarr", d + "/small_tubules.geojson", t + "/cp_model", t + "/cellpose.zarr",
                method="cellpose", tile=256, overlap=32, diameter=17.0, threads=1)
        print("nuclei", len(table))
    """, tmp_path)
    assert pd.read_parquet(tmp_path / "cells.parquet").shape[0] > 0


def test_ml_env_trains_grades_pretrains_and_finetunes(tiny, tmp_path):
    run_twin("ml", f"""
        from cellstage.reduce.stage import grade, train_grader
        from cellstage.ssl.stage import pretrain
        from cellstage.train.stage import finetune
        d, t = {str(tiny)!r}, {str(tmp_path)!r}
        train_grader([d + "/s1.ome.zarr"], [d + "/grades.csv"], t + "/grader", backbone="resnet18", epochs=1,
                     batch_size=8, loss_weights={{"useful": 3.0, "unsuitable": 1.0}}, size=32, seed=0, threads=1,
                     devices=1)
        grade(t + "/grader", d + "/crops.zarr", d + "/crops.parquet", t + "/grading.parquet", threshold=0.5,
              threads=1)
        pretrain([d + "/crops.zarr"], [d + "/crops.parquet"], [t + "/grading.parquet"], t + "/pretrain",
                 method="simclr", backbone="resnet18", img_size=32, variant="images", epochs=1, batch_size=4,
                 max_crops=None, seed=0, threads=1, devices=1)
        crops = dict(train_zarr=[d + "/crops.zarr"], train_index=[d + "/crops.parquet"], test_zarr=[d + "/crops.zarr"],
                     test_index=[d + "/crops.parquet"])
        finetune(**crops, pretrained=t + "/pretrain/backbone.safetensors", out_dir=t + "/finetune", fold=0,
                 backbone="resnet18", img_size=32, background=True, distance=False, n_folds=2, init="simclr",
                 recipe="pretrained", recipe_settings={{"epochs": 2}}, batch_size=4, group_by=None,
                 classes={CLASSES!r}, static_classes=[], seed=0, threads=1, devices=1)
    """, tmp_path)
    assert (tmp_path / "pretrain/backbone.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "finetune/metrics.json").read_text())
    assert len(pd.read_parquet(tmp_path / "grading.parquet")) == 12


def test_report_env_writes_the_report(tiny, tmp_path):
    rng = np.random.default_rng(0)
    experiments = {}
    for i, init in enumerate(("random", "simclr")):
        metrics = []
        for fold in range(2):
            f = tmp_path / f"run{i}" / f"fold{fold}"
            f.mkdir(parents=True)
            prob_a = rng.random(12)
            pd.DataFrame({"split": "test", "slide": "s1", "cell_id": np.arange(1, 13), "label_idx": [0, 1] * 6,
                          "prob_A": prob_a, "prob_B": 1 - prob_a}).to_parquet(f / "predictions.parquet")
            m = {s: {"top1": 0.5 + i / 10 + fold / 100, "top2": 0.9, "adj1": 0.8, "adj1_dyn": 0.8, "n": 12}
                 for s in ("val", "test")}
            (f / "metrics.json").write_text(json.dumps({**m, "fold": fold}))
            metrics.append(str(f / "metrics.json"))
        experiments[f"40x-bg-resnet18-{init}-nodist"] = {"scan": "40x", "background": "bg", "backbone": "resnet18",
                                                         "init": init, "distance": "nodist", "metrics": metrics}
    (tmp_path / "s1.parquet").write_bytes((tiny / "cells.parquet").read_bytes())  # cell tables are named by slide
    out = tmp_path / "report"
    outputs = {k: str(out / v) for k, v in {
        "folds": "folds.csv", "csv": "summary.csv", "boxplot": "boxplot.png", "confusion": "confusion.png",
        "stages": "stages.csv", "geojson": "qupath", "md": "report.md", "summary": "summary.json"}.items()}
    inputs = {"slides": [str(tiny / "s1.ome.zarr")], "cells": [str(tmp_path / "s1.parquet")],
              "crops": [str(tiny / "crops.parquet")]}
    run_twin("report", f"""
        import os
        from cellstage.report.stage import report
        os.makedirs({str(out)!r}, exist_ok=True)
        report({inputs!r}, {outputs!r}, experiments={experiments!r}, classes={CLASSES!r}, metric="top1",
               config={{}})
    """, tmp_path)
    missing = sorted(p for p in outputs.values() if not Path(p).exists())
    assert not missing, missing
    assert json.loads((out / "summary.json").read_text())["best_experiment"] == "40x-bg-resnet18-simclr-nodist"
