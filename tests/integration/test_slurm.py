"""The workflow on a real single-node SLURM cluster (`make test-slurm`, i.e. `pytest -m slurm`).

The module fixture starts munge, slurmctld and slurmd with `.ci/slurm/start-cluster.sh` (which
installs Debian's packages when missing) and stops exactly those daemons afterwards with
`.ci/slurm/stop-cluster.sh`. It needs root; without root, or when the cluster cannot be started,
the tests are skipped with the reason. Plain `pytest` / `make test` skips them too (they take
minutes and start daemons): select them with `-m slurm`.

Every run goes through the repository's profile (`profiles/slurm`, which `--profile slurm` finds
from the repository root through the `slurm` link), with only the first status check brought
forward for short CI jobs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from test_workflow import TINY_OVERRIDES, _merge

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROFILE = REPO / "profiles" / "slurm"
START = REPO / ".ci" / "slurm" / "start-cluster.sh"
STOP = REPO / ".ci" / "slurm" / "stop-cluster.sh"
FIRST_CHECK_S = "5"  # slurm-init-seconds-before-status-checks for short CI jobs

# The reduced demo under SLURM: three sections (two train, one test) at the tiny size, classical
# segmentation (no Cellpose training), one epoch each, 2 folds x {scratch, simclr} on the 40x scan.
SLURM_OVERRIDES = _merge(
    TINY_OVERRIDES,
    {
        "segmentation": {"method": "classical"},
        "grading": {"epochs": 1},
        # the reduced sheet has no unlabelled slide: pretrain on the train slides' crops
        "pretrain": {"epochs": 1, "batch_size": 64, "pool": "unlabelled+train"},
        "finetune": {
            "n_folds": 2,
            "recipes": {"baseline": {"epochs": 1}, "pretrained": {"epochs": 1}},
            "batch_size": 64,
            "grid": {"scan": ["40x"], "background": [True], "backbone": ["resnet18"],
                     "init": ["scratch", "simclr"], "distance": [False]},
        },
    },
)
SLURM_SECTIONS = (("sec01", "pat01", "train"), ("sec02", "pat02", "train"), ("sec03", "pat03", "test"))


# --- profile: found by name from the repository root (no cluster needed) ------------------------
def test_profile_found_by_name_from_repo_root(monkeypatch):
    from snakemake.cli import get_profile_dir

    monkeypatch.chdir(REPO)
    found = get_profile_dir("slurm")
    assert found is not None, "`snakemake --profile slurm` would not find the profile from the repo root"
    assert Path(found[1]).resolve() == (PROFILE / "config.yaml").resolve()
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"  # sacct needs slurmdbd
    assert "slurm_account" not in profile.get("default-resources", {})  # site setting: commented


# --- the cluster ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(request):
    if "slurm" not in (request.config.option.markexpr or ""):
        pytest.skip("SLURM tests start daemons and take minutes: run `make test-slurm` (pytest -m slurm)")
    if os.geteuid() != 0:
        pytest.skip("needs root: start-cluster.sh installs Debian's SLURM packages and starts the daemons")
    t0 = time.time()
    try:
        proc = subprocess.run([str(START)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        subprocess.run([str(STOP)], capture_output=True, text=True, timeout=120)
        pytest.skip("SLURM cluster did not start within 600 s")
    if proc.returncode != 0:
        subprocess.run([str(STOP)], capture_output=True, text=True, timeout=120)
        pytest.skip(f"SLURM cluster could not be started:\n{proc.stderr[-2000:]}")
    print(f"cluster started in {time.time() - t0:.1f} s: {proc.stderr.strip().splitlines()[-1]}")
    try:
        yield
    finally:
        stop = subprocess.run([str(STOP)], capture_output=True, text=True, timeout=120)
        print(stop.stderr)
        assert stop.returncode == 0, stop.stderr


def _cmd(workdir: Path, *args: str, snakefile: Path | None = None) -> list[str]:
    cmd = [str(BIN / "snakemake"), "--profile", str(PROFILE),
           "--slurm-init-seconds-before-status-checks", FIRST_CHECK_S, "-d", str(workdir)]
    if snakefile is not None:
        cmd += ["-s", str(snakefile)]
    return cmd + list(args)


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")


def _run(workdir: Path, *args: str, snakefile: Path | None = None, timeout: float = 600):
    cmd = _cmd(workdir, *args, snakefile=snakefile)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(
            f"{' '.join(cmd)} still running after {timeout} s:\n{out[-3000:]}\n{err[-6000:]}") from None
    return proc, time.time() - t0


def _submissions(log: str, rule: str) -> int:
    """How many SLURM jobs snakemake submitted for `rule` (from its log lines)."""
    return len(re.findall(rf"submitted with SLURM jobid \d+ \(log: [^)]*/rule_{rule}/", log))


TOY = textwrap.dedent(
    r"""
    rule all:
        input: "flaky.txt", "doomed.txt"

    rule first:
        output: "first.txt"
        resources: mem_mb=100, runtime=5
        shell: "echo job=${{SLURM_JOB_ID:-none}} > {output}"

    # fails on attempt 1, succeeds on attempt 2 (mem_mb scales with the attempt, like the rules)
    rule flaky:
        input: "first.txt"
        output: "flaky.txt"
        resources: mem_mb=lambda wc, attempt: 100 * attempt, runtime=5
        shell:
            "if [ {resources.mem_mb} -lt 200 ]; then echo 'attempt 1 fails' >&2; exit 3; fi; "
            "echo mem_mb={resources.mem_mb} job=${{SLURM_JOB_ID:-none}} > {output}"

    rule doomed:
        input: "first.txt"
        output: "doomed.txt"
        resources: mem_mb=100, runtime=5
        shell: "echo 'always fails' >&2; exit 7"

    rule sleeper:
        output: "slept.txt"
        resources: mem_mb=100, runtime=10
        shell: "sleep 600; touch {output}"
    """
)


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "Snakefile").write_text(TOY)
    return tmp_path


@pytest.mark.slurm
def test_failed_job_is_reported_and_retried(cluster, toy):
    proc, seconds = _run(toy, "--retries", "1", "--keep-going", timeout=400)
    log = proc.stdout + proc.stderr
    print(f"toy workflow with a retried and a failing job: {seconds:.0f} s")
    assert proc.returncode != 0, "a failing job must fail the run"
    # SLURM ran the jobs (the job id is set inside them)
    assert re.fullmatch(r"job=\d+\n", (toy / "first.txt").read_text())
    # flaky: failed once, retried with doubled mem_mb, then succeeded
    assert re.fullmatch(r"mem_mb=200 job=\d+\n", (toy / "flaky.txt").read_text())
    assert _submissions(log, "flaky") == 2, log[-4000:]
    # doomed: reported failed on both attempts
    assert not (toy / "doomed.txt").exists()
    assert _submissions(log, "doomed") == 2, log[-4000:]
    assert "Error in rule doomed" in log, log[-4000:]
    assert re.search(r"SLURM-job '\d+' failed", log), log[-4000:]


@pytest.mark.slurm
def test_scancelled_job_is_noticed(cluster, toy):
    cmd = _cmd(toy, "--retries", "0", "slept.txt")
    proc = subprocess.Popen(cmd, cwd=toy, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        jobid, deadline = None, time.time() + 120
        while jobid is None and time.time() < deadline:
            out = subprocess.run(["squeue", "-h", "-o", "%i %T %Z"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                jid, state, wd = line.split(maxsplit=2)
                if Path(wd) == toy and state == "RUNNING":
                    jobid = jid
            time.sleep(1)
        assert jobid is not None, "the sleeper job never ran"
        subprocess.run(["scancel", jobid], check=True)
        t0 = time.time()
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail("snakemake did not notice the scancelled job within 180 s")
        noticed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"scancel noticed after {noticed:.0f} s")
    assert proc.returncode != 0
    assert "Error in rule sleeper" in out, out[-4000:]
    assert jobid in out


# --- the reduced demo workflow through the profile -----------------------------------------------
@pytest.fixture(scope="module")
def slurm_demo(cluster, tmp_path_factory):
    from cellstage.demo import PRESETS, generate

    work = tmp_path_factory.mktemp("slurm_demo")
    preset = dataclasses.replace(PRESETS["tiny"], sections=SLURM_SECTIONS)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        sheet = generate(Path("resources/demo"), preset=preset, seed=0)
    finally:
        os.chdir(cwd)
    config = _merge(yaml.safe_load((REPO / "config/config.yaml").read_text()), SLURM_OVERRIDES)
    config["samples"] = str(sheet)
    (work / "config").mkdir()
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc, seconds = _run(work, snakefile=REPO / "Snakefile", timeout=1500)
    return work, seconds, proc


@pytest.mark.slurm
def test_reduced_demo_completes_under_slurm(slurm_demo):
    work, seconds, proc = slurm_demo
    log = proc.stdout + proc.stderr
    print(f"reduced demo workflow under SLURM: {seconds:.0f} s")
    assert proc.returncode == 0, log[-8000:]
    for name in ("cv_results.md", "cv_results.csv", "summary.json", "cv_boxplot.png"):
        assert (work / "results/report" / name).stat().st_size > 0, name
    submitted = len(re.findall(r"submitted with SLURM jobid", log))
    assert submitted >= 10, f"only {submitted} SLURM jobs:\n{log[-4000:]}"
    assert "localrule report:" in log  # the report is a localrule: it runs beside snakemake
    for rule in ("convert", "segment", "extract_crops", "pretrain", "finetune"):
        assert any((work / "results/benchmarks" / rule).rglob("*.tsv")), rule
