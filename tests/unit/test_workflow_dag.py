"""The workflow's DAG, built by Snakemake itself on the tiny demo sheet (dry runs only, ~1 min).

* An edit of one config value reruns only the rules that use it (rules get single values as params,
  never whole sections): ``report.metric`` reruns only ``report``; a recipe's epochs
  (``finetune.recipes.<recipe>.epochs``) rerun the folds of the inits that use that recipe and the
  report, nothing upstream.
* Registration runs once per moving slide, so a section with a third scan registers each of them.
* Each wildcard field is its own path part, so a timm backbone name with ``-`` and ``.`` works.

A "finished" workflow is made without running anything: every output and benchmark of the dry run
is created empty (directory() outputs as folders), then ``snakemake --touch --forceall`` marks every
job done, which records the same per-output metadata (params, code, input) a real run records.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def snakemake(workdir: Path, *args: str) -> str:
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1", *args]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def job_counts(dry_run_stdout: str) -> Counter:
    """{rule: jobs} from the first 'Job stats' table of a dry run (empty when nothing is to be done)."""
    counts: Counter = Counter()
    lines = dry_run_stdout.splitlines()
    if "Job stats:" not in lines:
        assert "Nothing to be done" in dry_run_stdout, dry_run_stdout[-2000:]
        return counts
    for line in lines[lines.index("Job stats:") + 3 :]:
        name, _, n = line.partition(" ")
        if name == "total" or not n.strip():
            break
        counts[name] = int(n)
    return counts


def job_files(dry_run_stdout: str, rule: str, field: str = "output") -> list[str]:
    """The `field` (output, input, benchmark) paths of every job of `rule` in a dry run."""
    out = []
    for block in re.split(r"\n(?=rule |localrule )", dry_run_stdout):
        if re.match(rf"(local)?rule {re.escape(rule)}:", block):
            m = re.search(rf"^    {field}: (.*)$", block, re.M)
            out += m.group(1).split(", ") if m else []
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The tiny demo slides and their sheet (resources/demo/slides.tsv, paths relative to a workdir)."""
    root = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [sys.executable, "-m", "cellstage.demo", "resources/demo", "--preset", "tiny", "--seed", "0"],
        cwd=root,
        check=True,
        capture_output=True,
    )
    return root / "resources"


def base_config() -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["samples"] = "resources/demo/slides.tsv"
    return config


def workdir(tmp_path: Path, demo: Path, config: dict, name: str = "work") -> Path:
    work = tmp_path / name
    (work / "config").mkdir(parents=True)
    (work / "resources").symlink_to(demo)
    write_config(work, config)
    return work


def write_config(work: Path, config: dict) -> None:
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def finish(work: Path) -> None:
    """Mark the whole workflow done as if it had run (see the module docstring)."""
    directory_outputs = []
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        for pattern in re.findall(r'directory\(\s*"([^"]+)"', smk.read_text()):
            directory_outputs.append(re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(pattern)) + "$"))
    out = snakemake(work, "-n")
    paths = [p for line in re.findall(r"^    (?:output|benchmark): (.*)$", out, re.M) for p in line.split(", ")]
    assert paths
    for p in paths:
        target = work / p
        if any(d.match(p) for d in directory_outputs):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    snakemake(work, "--touch", "--forceall")
    assert job_counts(snakemake(work, "-n")) == Counter()


def test_an_edit_reruns_only_the_rules_that_use_it(tmp_path, demo):
    config = base_config()
    work = workdir(tmp_path, demo, config)
    finish(work)

    edited = copy.deepcopy(config)
    edited["report"]["metric"] = "adj1" if config["report"]["metric"] != "adj1" else "top1"
    write_config(work, edited)
    assert job_counts(snakemake(work, "-n")) == Counter({"report": 1, "all": 1})

    grid = config["finetune"]["grid"]
    for recipe in ("baseline", "pretrained"):
        edited = copy.deepcopy(config)
        edited["finetune"]["recipes"][recipe]["epochs"] += 1
        write_config(work, edited)
        counts = job_counts(snakemake(work, "-n"))
        n_experiments = sum(config["finetune"]["recipe"][init] == recipe for init in grid["init"])
        for key, values in grid.items():
            n_experiments *= 1 if key == "init" else len(values)
        assert n_experiments > 0  # the demo grid mixes both recipes
        assert counts == Counter({"finetune": n_experiments * config["finetune"]["n_folds"], "report": 1, "all": 1})


def test_every_moving_scan_of_a_section_registers_on_its_own(tmp_path, demo):
    sheet = (demo / "demo/slides.tsv").read_text().splitlines()
    header = sheet[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in sheet[1:] if line.strip()]
    first = rows[0]["section"]
    twenty = next(r for r in rows if r["section"] == first and r["scan"] == "20x")
    third = dict(twenty, slide=f"{first}_10x", scan="10x", mpp="0.68")  # any existing file: nothing is read
    rows.append(third)
    (tmp_path / "slides.tsv").write_text(
        "\n".join(["\t".join(header)] + ["\t".join(r.get(c, "") for c in header) for r in rows]) + "\n"
    )
    config = base_config()
    config["samples"] = str(tmp_path / "slides.tsv")
    config["scans"]["10x"] = {"crop_size": 20}
    config["pretrain"]["partner_scan"] = {"40x": "20x"}  # cross-scan SimCLR: three scans, name the partner
    work = workdir(tmp_path, demo, config)
    out = snakemake(work, "-n")

    moving = sorted(r["slide"] for r in rows if r["scan"] != config["reference_scan"])
    counts = job_counts(out)
    assert counts["register"] == len(moving) and counts["map_cells"] == len(moving)
    registered = sorted(p for p in job_files(out, "register") if p.endswith(".json"))
    assert registered == [f"results/registration/{s}.json" for s in moving]
    # each moving slide is mapped with its own registration
    for block in re.split(r"\n(?=rule )", out):
        if block.startswith("rule map_cells:"):
            slide = re.search(r"results/cells/(\S+)\.parquet", re.search(r"^    output: (.*)$", block, re.M)[1])[1]
            assert f"results/registration/{slide}.json" in block.split("output:")[0], block


def test_a_backbone_name_with_dashes_and_dots_is_its_own_path_part(tmp_path, demo):
    config = base_config()
    backbone = "vit_small_patch16_224.augreg-in21k"  # a timm name with a pretrained tag ("-" and ".")
    config["finetune"]["grid"].update(backbone=["resnet18", backbone], init=["scratch", "simclr"], loss=["ce"])
    work = workdir(tmp_path, demo, config)
    out = snakemake(work, "-n")

    counts = job_counts(out)
    assert counts["pretrain"] == 2  # simclr x (resnet18, the dashed name) on 40x
    weights = [p for p in job_files(out, "pretrain") if p.endswith("backbone.safetensors")]
    assert f"results/pretrain/simclr/{backbone}/40x/backbone.safetensors" in weights
    metrics = [p for p in job_files(out, "finetune") if p.endswith("metrics.json")]
    assert len(metrics) == counts["finetune"] == 4 * config["finetune"]["n_folds"]
    assert f"results/finetune/40x/bg/{backbone}/simclr/nodist/ce/fold0/metrics.json" in metrics
    assert f"results/finetune/40x/bg/{backbone}/scratch/nodist/ce/fold0/metrics.json" in metrics


def test_the_loss_axis_is_its_own_path_part_and_reaches_the_report(tmp_path, demo):
    config = base_config()
    config["finetune"]["grid"].update(init=["scratch"], loss=["ce", "soft", "ordinal"])
    config["finetune"]["losses"] = {"soft": {"adjacent_share": 0.2}}
    work = workdir(tmp_path, demo, config)
    out = snakemake(work, "-n", "-p")
    metrics = [p for p in job_files(out, "finetune") if p.endswith("metrics.json")]
    assert len(metrics) == 3 * config["finetune"]["n_folds"]
    for loss in ("ce", "soft", "ordinal"):
        assert f"results/finetune/40x/bg/resnet18/scratch/nodist/{loss}/fold0/metrics.json" in metrics
    assert "results/report/table_losses.md" in job_files(out, "report")
    config["finetune"]["losses"] = {"soft": {"adjacent_share": 0.7}}
    write_config(work, config)
    with pytest.raises(AssertionError, match="adjacent_share"):
        snakemake(work, "-n")


def test_imagenet_init_reads_the_configured_weights_and_needs_no_pretraining(tmp_path, demo):
    config = base_config()
    config["finetune"]["grid"].update(init=["scratch", "imagenet", "simclr"], loss=["ce"])
    work = workdir(tmp_path, demo, config)
    with pytest.raises(AssertionError, match="finetune.imagenet_weights.resnet18"):
        snakemake(work, "-n")

    weights = work / "resnet18.safetensors"
    weights.write_bytes(b"")  # only its path matters to the DAG
    config["finetune"]["imagenet_weights"] = {"resnet18": "resnet18.safetensors"}
    write_config(work, config)
    out = snakemake(work, "-n")
    counts = job_counts(out)
    assert counts["pretrain"] == 1  # simclr only
    assert counts["finetune"] == 3 * config["finetune"]["n_folds"]
    blocks = [b for b in re.split(r"\n(?=rule )", out) if b.startswith("rule finetune:")]
    imagenet = [b for b in blocks if "/resnet18/imagenet/" in b]
    assert len(imagenet) == config["finetune"]["n_folds"]
    assert all("resnet18.safetensors" in re.search(r"^    input: (.*)$", b, re.M)[1] for b in imagenet)
