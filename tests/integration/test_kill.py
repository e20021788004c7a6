"""Kill harness (issue 15 items 5 and 7): SIGKILL at random points of a reduced tiny-preset run.

A reference run goes through uninterrupted. A second, fresh run in another directory is killed
at ``CELLSTAGE_KILL_POINTS`` random points in time (default 3 here, 10 under ``make test-kill``;
seeded by ``CELLSTAGE_KILL_SEED``, default 0), alternately

- ``stage``: one running rule process (a child of snakemake running a ``workflow/scripts/*.py``,
  found through /proc) gets SIGKILL, as the OOM killer or a preempted cluster job would; snakemake
  notices the failed job, lets the other running jobs finish and exits non-zero;
- ``snakemake``: snakemake's whole process group (snakemake and every job it runs) gets SIGKILL,
  as a killed login session or an expired allocation would.

After each kill snakemake is started again the way an operator would: ``--unlock`` first when
snakemake itself was killed (its lock stays behind), then ``--rerun-incomplete`` (jobs that were
running when snakemake died are marked incomplete and are refused otherwise). The next kill point
falls in that rerun; after the last one a rerun must finish the workflow without an error.

Asserted:
- every report table (``results/report/**/*.csv``) is byte-identical to the reference run's
  (:data:`VOLATILE_COLUMNS`, columns dropped first where a table holds times or paths: none at
  present); the Markdown tables too, with their provenance line's commit and inputs digest masked
  (:data:`MD_VOLATILE`); JSON outputs without their volatile keys (:data:`VOLATILE_JSON_KEYS`);
- every other output under ``results/`` (not logs or benchmarks, which hold times): tables hold
  the same values, JSON the same content less volatile keys, weights the same tensors, Zarr
  stores the same chunk bytes and attributes (less the source slide's absolute path);
- no ``*.tmp*`` is left anywhere under ``results/`` after the final rerun (nor by the reference);
- every kill happened (the killed process is gone) and snakemake reported the failure. What was
  killed, when and in which job is written to ``kills.json`` in the test's temporary directory
  and printed (``-s`` or ``-rA``).

Kill points are drawn on the reference run's timeline (:func:`kill_plan`): one at random in each
of ``k`` equal slices, each as the job running then and how far into it; the killed run kills
that job at that share of its run (or, when it finished already, the job running next).

The reference-vs-killed comparison is also the end-to-end determinism test (item 7): two fresh
runs on one machine; with ``CELLSTAGE_KILL_POINTS=0`` it is exactly two uninterrupted runs.
Durations are printed, never asserted (issue 15 item 6).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_workflow import TINY_OVERRIDES, _merge

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

KILL_POINTS = int(os.environ.get("CELLSTAGE_KILL_POINTS", "3"))
KILL_SEED = int(os.environ.get("CELLSTAGE_KILL_SEED", "0"))

# Three sections (two train, one test) at the tiny size, each at 40x and 20x; classical
# segmentation (no Cellpose training); 2 folds x {scratch, simclr} on the 40x scan, cross-entropy
# only. Two epochs where a checkpoint can be resumed (grader, pretraining, fine-tuning), so a kill
# between epochs exercises resuming.
KILL_SECTIONS = (("sec01", "pat01", "train"), ("sec02", "pat02", "train"), ("sec03", "pat03", "test"))
KILL_OVERRIDES = _merge(
    TINY_OVERRIDES,
    {
        "segmentation": {"method": "classical"},
        "grading": {"epochs": 2},
        # no unlabelled slide in the reduced sheet: pretrain on the train slides' crops
        "pretrain": {"epochs": 2, "batch_size": 64, "pool": "unlabelled+train"},
        "finetune": {
            "n_folds": 2,
            "recipes": {"baseline": {"epochs": 2}, "pretrained": {"epochs": 2, "hold_until_epoch": 1}},
            "batch_size": 64,
            "grid": {
                "scan": ["40x"],
                "background": [True],
                "backbone": ["resnet18"],
                "init": ["scratch", "simclr"],
                "distance": [False],
                "loss": ["ce"],
            },
        },
    },
)

# Columns of report tables that may differ between two correct runs (times, absolute paths): none
# at present (no report CSV holds a time or a path).
VOLATILE_COLUMNS: dict[str, set[str]] = {}
# Keys (at any depth) of JSON outputs that may differ between two correct runs: run times, the host,
# the checkout's commit (another commit may land between the two runs), and the digest of the
# report's inputs (it covers JSON files that hold run times). In maps of file checksums
# ("inputs", "outputs") the checksums of JSON and Markdown files are ignored for the same reason
# (the files themselves are compared without their volatile keys / provenance line).
VOLATILE_JSON_KEYS = {
    "seconds",
    "fit_seconds",
    "wall_s",
    "duration_s",
    "created",
    "timestamp",
    "platform",
    "host",
    "hostname",
    "pid",
    "git",
    "inputs_digest",
    "seconds_per_epoch",
    "mp_per_s",
    "epochs_this_run",  # with resumed_from_epoch: what a resumed training had left to do
    "resumed_from_epoch",  # says that a killed training resumed (the weights must still be the same)
    "resumed",  # metrics.json of a fine-tuning fold: whether it resumed (its metrics must still be equal)
    "source_path",  # the converted slide's absolute path (OME-Zarr attributes)
}
CHECKSUM_MAPS = {"inputs", "outputs"}
# The Markdown tables' provenance line: its commit and inputs digest are masked (as above).
MD_VOLATILE = re.compile(r"(git|inputs) `[^`]*`")
SKIP_DIRS = ("results/logs", "results/benchmarks")


# --- processes, from /proc (psutil is not in the environment) ------------------------------------
def _ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(pid: int) -> list[int]:
    parent = _ppid_map()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = sorted(c for c, pp in parent.items() if pp == p)
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


_SCRIPT = re.compile(r"/\.snakemake/scripts/tmp[^/.]+\.(?P<script>\w+)\.py$")


def _stage_processes(snake_pid: int) -> list[tuple[int, str]]:
    """(pid, script) of every running rule script under snakemake (``.snakemake/scripts/tmpXXX.<script>.py``)."""
    found = []
    for pid in _descendants(snake_pid):
        for arg in _cmdline(pid):
            m = _SCRIPT.search(arg)
            if m and _alive(pid):
                found.append((pid, m["script"]))
                break
    return found


# --- snakemake's log: which jobs ran when -----------------------------------------------------
_EVENT = re.compile(
    r"^\[(?P<when>\w{3} \w{3} +\d+ [\d:]+ \d{4})\]\n"
    r"(?:(?:local)?rule (?P<rule>\w+):\n(?P<body>(?:    .*\n)+)|Finished jobid: (?P<done>\d+))",
    re.M,
)


def _jobs(log: str) -> dict[str, dict]:
    """jobid -> {rule, wildcards, output, key, start, end} (epoch seconds; end None while running),
    from snakemake's log so far."""
    jobs: dict[str, dict] = {}
    for m in _EVENT.finditer(log):
        when = time.mktime(time.strptime(" ".join(m["when"].split()), "%a %b %d %H:%M:%S %Y"))
        if m["rule"]:
            f = dict(re.findall(r"^    (\w+): (.*)$", m["body"], re.M))
            if "jobid" in f and m["rule"] != "all":
                key = f"{m['rule']}[{f.get('wildcards', '')}]"
                jobs[f["jobid"]] = {
                    "rule": m["rule"],
                    "wildcards": f.get("wildcards", ""),
                    "key": key,
                    "output": f.get("output", ""),
                    "start": when,
                    "end": None,
                }
        elif m["done"] in jobs:
            jobs[m["done"]]["end"] = when
    return jobs


def _running(log: Path) -> dict[str, dict]:
    """key -> job, for the jobs started and not finished."""
    return {j["key"]: j for j in _jobs(log.read_text(errors="replace")).values() if j["end"] is None}


def _finished(log: Path) -> set[str]:
    return {j["key"] for j in _jobs(log.read_text(errors="replace")).values() if j["end"] is not None}


def kill_plan(reference_log: str, k: int, seed: int) -> list[dict]:
    """``k`` points spread at random over the reference run's timeline (one uniform in each of
    ``k`` equal slices between the first job's start and the last job's end), each as the job
    running then (a random one of those running together) and how far into it (share of its
    duration); targets alternate, starting with a stage process. The killed run kills that job at
    that share of its run."""
    rng = random.Random(seed)
    jobs = [j for j in _jobs(reference_log).values() if j["end"] is not None]
    t0, t1 = min(j["start"] for j in jobs), max(j["end"] for j in jobs)
    plan = []
    for i in range(k):
        t = rng.uniform(t0 + i * (t1 - t0) / k, t0 + (i + 1) * (t1 - t0) / k)
        running = sorted((j for j in jobs if j["start"] <= t < max(j["end"], j["start"] + 1)), key=lambda j: j["key"])
        job = rng.choice(running) if running else min(jobs, key=lambda j: abs(j["start"] - t))
        share = min(max((t - job["start"]) / max(job["end"] - job["start"], 1.0), 0.0), 0.95)
        plan.append(
            {
                "point": i + 1,
                "reference_t_s": round(t - t0, 1),
                "job": job["key"],
                "share": round(share, 2),
                "job_reference_s": job["end"] - job["start"],
                "target": "stage" if i % 2 == 0 else "snakemake",
            }
        )
    return plan


# --- runs -------------------------------------------------------------------------------------
def _cmd(work: Path, *args: str) -> list[str]:
    return [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "2", *args]


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")


def _start(work: Path, logfile: Path, *args: str) -> subprocess.Popen:
    """snakemake in its own process group (killing the group must not hit pytest)."""
    fh = open(logfile, "w")  # noqa: SIM115 (closed by _finish)
    proc = subprocess.Popen(
        _cmd(work, *args), cwd=work, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.logfh = fh  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, timeout: float | None = None) -> int:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        proc.logfh.close()  # type: ignore[attr-defined]
    return rc


def _prepare(work: Path) -> None:
    from cellstage.demo import PRESETS, generate

    preset = dataclasses.replace(PRESETS["tiny"], sections=KILL_SECTIONS)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        sheet = generate(Path("resources/demo"), preset=preset, seed=0)
    finally:
        os.chdir(cwd)
    config = _merge(yaml.safe_load((REPO / "config/config.yaml").read_text()), KILL_OVERRIDES)
    config["samples"] = str(sheet)
    (work / "config").mkdir()
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:]


def _uninterrupted(work: Path, logs: Path) -> float:
    t0 = time.time()
    log = logs / "reference.log"
    rc = _finish(_start(work, log))
    assert rc == 0, f"reference run failed ({rc}):\n{_tail(log)}"
    return time.time() - t0


def _job_pid(proc: subprocess.Popen, job: dict) -> int | None:
    """The pid of the rule script running ``job`` (its snakemake script names the job's outputs)."""
    first = job["output"].split(",")[0].strip()
    for pid, _ in _stage_processes(proc.pid):
        for arg in _cmdline(pid):
            if _SCRIPT.search(arg):
                try:
                    if first and first in Path(arg).read_text(errors="replace"):
                        return pid
                except OSError:
                    pass
    return None


def _wait_for_point(proc: subprocess.Popen, log: Path, point: dict, done: set[str]) -> tuple[dict | None, str]:
    """Wait in the running attempt until ``point`` is reached: its job has run for its share of its
    reference duration. When the job finished already (in an earlier attempt, or before the share
    elapsed), the point falls on whichever job runs next. Returns (job, how) or (None, why)."""
    key, seen = point["job"], None
    while proc.poll() is None:
        running = _running(log)
        if key in running:
            seen = seen or time.time()
            if time.time() - seen >= point["share"] * point["job_reference_s"]:
                return running[key], "planned job"
        elif (seen or key in done or key in _finished(log)) and running:
            return sorted(running.values(), key=lambda j: j["start"])[-1], "next running job (planned one done)"
        time.sleep(0.1)
    return None, "snakemake exited first"


def _kill(proc: subprocess.Popen, log: Path, point: dict, done: set[str]) -> dict:
    """SIGKILL at ``point`` in the running attempt ``proc``; returns what was killed."""
    rec = dict(point)
    job, how = _wait_for_point(proc, log, point, done)
    rec["hit"] = how
    if job is None:
        rec["outcome"] = f"not killed: {how}"
        return rec
    rec.update(killed_job=job["key"], running_jobs=sorted(_running(log)))
    if point["target"] == "stage":
        pid = None
        deadline = time.time() + 30
        while pid is None and proc.poll() is None and time.time() < deadline:
            pid = _job_pid(proc, job)
            time.sleep(0.05)
        if pid is None:
            rec["outcome"] = "not killed: no process of the job found"
            return rec
        rec.update(pid=pid, script=next(f"workflow/scripts/{s}.py" for p, s in _stage_processes(proc.pid) if p == pid))
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        rec["outcome"] = "killed" if not _alive(pid) else "still alive 10 s after SIGKILL"
        return rec
    family = _descendants(proc.pid)
    rec.update(pid=proc.pid, stage_processes=[f"{p}:{s}" for p, s in _stage_processes(proc.pid)])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(p) for p in family) and time.time() < deadline:
        time.sleep(0.05)
    survivors = [p for p in family if _alive(p)]
    for p in survivors:  # outside the group (a job that called setsid): an expired allocation kills these too
        os.kill(p, signal.SIGKILL)
    rec["outside_group"] = survivors
    rec["outcome"] = "killed" if not _alive(proc.pid) else "still alive after SIGKILL"
    return rec


def _killed_run(work: Path, logs: Path, plan: list[dict]) -> tuple[list[dict], float]:
    """The fresh run killed at every point of ``plan``, each in its own attempt, then a final rerun;
    returns the kill records and the total wall time."""
    kills: list[dict] = []
    done: set[str] = set()
    t_start = time.time()
    need_unlock = False
    for i in range(len(plan) + 1):
        if need_unlock:  # snakemake was killed: its lock on the working directory stays behind
            rc = _finish(_start(work, logs / f"attempt{i}.unlock.log", "--unlock"))
            assert rc == 0, _tail(logs / f"attempt{i}.unlock.log")
        log = logs / f"attempt{i}.log"
        t_attempt = time.time()
        proc = _start(work, log, *(("--rerun-incomplete",) if i else ()))
        if i == len(plan):  # the final rerun: must finish the workflow
            rc = _finish(proc)
            assert rc == 0, f"final rerun after {len(plan)} kills failed ({rc}):\n{_tail(log)}"
            break
        rec = _kill(proc, log, plan[i], done)
        rec["attempt_log"] = log.name
        rec["after_s"] = round(time.time() - t_attempt, 1)
        rec["run_elapsed_s"] = round(time.time() - t_start, 1)
        rc = _finish(proc)
        rec["snakemake_exit"] = rc
        done |= _finished(log)
        need_unlock = plan[i]["target"] == "snakemake"
        kills.append(rec)
        (logs / "kills.partial.json").write_text(json.dumps(kills, indent=2) + "\n")  # kept if a rerun fails
        print(f"kill {rec['point']}/{len(plan)}: {json.dumps(rec)}", flush=True)
    return kills, time.time() - t_start


# --- comparison -------------------------------------------------------------------------------
def _strip_json(obj):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in VOLATILE_JSON_KEYS:
                continue
            if k in CHECKSUM_MAPS and isinstance(v, dict):
                v = {f: h for f, h in v.items() if not str(f).endswith((".json", ".md"))}
            out[k] = _strip_json(v)
        return out
    if isinstance(obj, list):
        return [_strip_json(v) for v in obj]
    return obj


def _report_differences(ref: Path, run: Path) -> list[str]:
    """Report tables that differ (bytes; volatile columns dropped first)."""
    diffs = []
    rep_a, rep_b = ref / "results/report", run / "results/report"
    names = sorted(
        {p.relative_to(rep_a) for p in rep_a.rglob("*") if p.suffix in (".csv", ".md", ".json")}
        | {p.relative_to(rep_b) for p in rep_b.rglob("*") if p.suffix in (".csv", ".md", ".json")}
    )
    for name in names:
        a, b = rep_a / name, rep_b / name
        if not (a.is_file() and b.is_file()):
            diffs.append(f"{name}: only in {'reference' if a.is_file() else 'killed run'}")
            continue
        if a.suffix == ".json":
            ja, jb = _strip_json(json.loads(a.read_text())), _strip_json(json.loads(b.read_text()))
            if ja != jb:
                diffs.append(f"{name}: JSON differs (volatile keys {sorted(VOLATILE_JSON_KEYS)} ignored)")
            continue
        drop = VOLATILE_COLUMNS.get(str(name))
        if drop:
            ta, tb = pd.read_csv(a).drop(columns=list(drop)), pd.read_csv(b).drop(columns=list(drop))
            if not ta.equals(tb):
                diffs.append(f"{name}: values differ ({sorted(drop)} dropped)")
        elif a.suffix == ".md":
            if MD_VOLATILE.sub(r"\1 `-`", a.read_text()) != MD_VOLATILE.sub(r"\1 `-`", b.read_text()):
                diffs.append(f"{name}: differs (commit and inputs digest of the provenance line masked)")
        elif a.read_bytes() != b.read_bytes():
            diffs.append(f"{name}: bytes differ")
    return diffs


def _read_table(p: Path) -> pd.DataFrame:
    return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)


def _outputs(work: Path) -> list[Path]:
    """The outputs compared besides the report: tables, JSON, weights and Zarr stores (as a whole)."""
    found = []
    for p in sorted((work / "results").rglob("*")):
        rel = p.relative_to(work)
        if str(rel).startswith((*SKIP_DIRS, "results/report")) or ".zarr/" in str(rel):
            continue
        if p.suffix in (".parquet", ".csv", ".json", ".safetensors") or (p.suffix == ".zarr" and p.is_dir()):
            found.append(rel)
    return found


def _zarr_differences(a: Path, b: Path, rel: Path) -> list[str]:
    """Chunks byte for byte; metadata (zarr.json) as JSON without volatile keys."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return [f"{rel}: Zarr stores hold different files"]
    for f in files:
        if f.name == "zarr.json":
            same = _strip_json(json.loads((a / f).read_text())) == _strip_json(json.loads((b / f).read_text()))
        else:
            same = (a / f).read_bytes() == (b / f).read_bytes()
        if not same:
            return [f"{rel}: {f} differs"]
    return []


def _weights_differences(a: Path, b: Path, rel: Path) -> list[str]:
    """Called when the bytes differ: which tensors or metadata do."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
            return [f"{rel}: weights hold different tensors or metadata"]
        bad = [k for k in fa.keys() if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
    if bad:
        return [f"{rel}: {len(bad)} tensors differ, e.g. {bad[:3]}"]
    # same weights, other bytes: the header's layout (cellstage.utils.canonical_safetensors), which
    # would change every checksum taken of the file
    return [f"{rel}: the same tensors and metadata in different bytes"]


def _output_differences(ref: Path, run: Path) -> list[str]:
    """Every other output under results/ (not logs or benchmarks, which hold times): the same
    values (tables), the same content less volatile keys (JSON), the same bytes (weights, Zarr)."""
    diffs = []
    for rel in _outputs(ref):
        a, b = ref / rel, run / rel
        if not b.exists():
            diffs.append(f"{rel}: missing in the killed run")
        elif a.is_dir():
            diffs += _zarr_differences(a, b, rel)
        elif a.read_bytes() == b.read_bytes():
            continue
        elif a.suffix == ".json":
            if _strip_json(json.loads(a.read_text())) != _strip_json(json.loads(b.read_text())):
                diffs.append(f"{rel}: JSON differs")
        elif a.suffix == ".safetensors":
            diffs += _weights_differences(a, b, rel)
        else:
            try:
                pd.testing.assert_frame_equal(_read_table(a), _read_table(b), check_exact=True)
            except AssertionError as e:
                diffs.append(f"{rel}: values differ: {' '.join(str(e).split())[:300]}")
    return diffs


def _leftovers(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in (work / "results").rglob("*.tmp*"))


# --- the test ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    ref, run, logs = base / "reference", base / "killed", base / "logs"
    for d in (ref, run, logs):
        d.mkdir()
    t0 = time.time()
    _prepare(ref)
    _prepare(run)
    prep_s = time.time() - t0
    reference_s = _uninterrupted(ref, logs)
    plan = kill_plan((logs / "reference.log").read_text(), KILL_POINTS, KILL_SEED)
    kills, killed_s = _killed_run(run, logs, plan)
    record = {
        "kill_points": KILL_POINTS,
        "seed": KILL_SEED,
        "demo_data_s": round(prep_s, 1),
        "reference_s": round(reference_s, 1),
        "killed_run_s": round(killed_s, 1),
        "kills": kills,
    }
    (base / "kills.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nkill harness ({base / 'kills.json'}):\n{json.dumps(record, indent=2)}", flush=True)
    return ref, run, record


@pytest.mark.kill
@pytest.mark.slow
def test_kills_leave_the_same_tables_and_no_temporaries(kill_runs):
    ref, run, record = kill_runs
    not_killed = [k for k in record["kills"] if k["outcome"] != "killed"]
    assert not not_killed, f"kill points that did not happen: {not_killed}"
    for k in record["kills"]:
        assert k["snakemake_exit"] != 0, f"snakemake reported success after kill {k}"
        if k["target"] == "snakemake":
            assert not k["outside_group"], f"job processes outside snakemake's process group: {k}"
    assert _leftovers(run) == [], "temporaries left under results/ after the final rerun"
    assert _leftovers(ref) == [], "temporaries left under results/ by the uninterrupted run"
    # determinism (issue 15 item 7) and kill safety (item 5): the same tables
    diffs = _report_differences(ref, run)
    assert not diffs, "report differs from the uninterrupted run:\n" + "\n".join(diffs)
    diffs = _output_differences(ref, run)
    assert not diffs, "intermediate outputs differ from the uninterrupted run:\n" + "\n".join(diffs)
    # nothing left to do after the last rerun
    rerun = subprocess.run(_cmd(run, "-n"), cwd=run, env=_env(), capture_output=True, text=True)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr, rerun.stdout[-3000:] + rerun.stderr[-3000:]


# --- the clean-up a rerun does: a killed writer's temporary folder is removed --------------------
_WRITER = """
import sys, time
from cellstage.utils import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.mkdir()
    (tmp / "part").write_text("half")
    print("writing", flush=True)
    time.sleep(600)
"""


def _writer(final: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    return proc


@pytest.mark.kill
def test_rerun_removes_what_a_killed_writer_left(tmp_path):
    from cellstage.utils import _HOST, atomic_path

    final = tmp_path / "x.zarr"
    killed, live = _writer(final), _writer(final)
    killed.kill()
    killed.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(n.startswith(".x.zarr.") and n.endswith(".tmp") for n in left), left
    try:
        with atomic_path(final) as tmp:  # the rerun of the job
            tmp.write_text("done")
        others = sorted(p.name for p in tmp_path.iterdir() if p.name != "x.zarr")
        # the killed writer's folder is gone; the live writer's (another copy of the job) is kept
        assert len(others) == 1 and f".{_HOST}-{live.pid}-" in others[0], (others, killed.pid, live.pid)
        assert final.read_text() == "done"
    finally:
        live.kill()
        live.wait()
    with atomic_path(final) as tmp:  # once the other writer is dead too, its folder goes as well
        tmp.write_text("again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zarr"]


@pytest.mark.kill
def test_weights_files_are_byte_identical_for_identical_weights(tmp_path):
    """safetensors writes its metadata map in a random order; canonical_safetensors sorts it, so
    the same weights give the same bytes (and checksums) in every run."""
    import torch
    from safetensors.torch import load_file, save_file

    from cellstage.utils import canonical_safetensors

    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([3])}
    meta = {"method": "simclr", "backbone": "resnet18", "epoch": "1", "img_size": "80", "note": "µm"}
    blobs = set()
    for i in range(6):
        path = tmp_path / f"w{i}.safetensors"
        save_file(state, str(path), metadata=meta)
        canonical_safetensors(path)
        blobs.add(path.read_bytes())
        loaded = load_file(str(path))
        assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["n"], state["n"])
    assert len(blobs) == 1
