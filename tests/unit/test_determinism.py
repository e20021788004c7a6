"""Determinism pins (issue 15 item 7, "Determinism, measured"; :mod:`cellstage.determinism`).

Measured on this machine (AMD EPYC, AVX-512; torch 2.14.1 with MKL 2024.2 and oneDNN 3.12):
a conv net's training depends, bit for bit, on torch's thread count and on the instruction set
oneDNN's kernels use, and is identical run to run with both fixed. The tests check that the pins
do what they claim: with ``determinism.threads`` pinned, the thread count a rule asks for
(Snakemake's ``threads``, and the ``OMP_NUM_THREADS`` Snakemake exports for it) no longer
changes the bits; without it, it does; ``cpu_capability`` reaches torch through the environment
a job inherits. One child process per environment (torch reads the ISA variables when loaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellstage.determinism import THREADS_ENV, apply_pins, check_capability, pinned_threads, pins
from cellstage.utils import CellstageError

SRC = str(Path(__file__).resolve().parents[2] / "src")

# In the child: for each (pinned threads or None, threads the rule asks for), train a small conv
# net a few AdamW steps from the same seed through set_torch_threads; print the weights' hashes.
CHILD = r"""
import hashlib, json, os, sys
sys.path.insert(0, SRC)
import torch
from cellstage.utils import set_torch_threads

def train():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 3, 3, padding=1))
    x = torch.randn(8, 3, 32, 32)
    opt = torch.optim.AdamW(net.parameters(), lr=0.005)
    for _ in range(3):
        loss = ((net(x) - x) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    h = hashlib.sha256()
    for v in net.state_dict().values():
        h.update(v.numpy().tobytes())
    return h.hexdigest()

out = []
for pin, asked in json.loads(sys.argv[1]):
    if pin is None:
        os.environ.pop("CELLSTAGE_TORCH_THREADS", None)
    else:
        os.environ["CELLSTAGE_TORCH_THREADS"] = str(pin)
    set_torch_threads(asked)
    out.append({"pin": pin, "asked": asked, "threads": torch.get_num_threads(), "sha": train()})
print(json.dumps({"cap": torch.backends.cpu.get_cpu_capability(), "runs": out}))
""".replace("SRC", repr(SRC))


def _child(runs, env_pins: dict, omp: str) -> dict:
    """Run CHILD with the pins in its environment and OMP_NUM_THREADS as Snakemake would set it."""
    env = {k: v for k, v in os.environ.items()
           if k not in (THREADS_ENV, "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    env.update(env_pins, OMP_NUM_THREADS=omp)
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(runs)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_pins_from_config():
    assert pins(None) == {} == pins({}) == pins({"threads": None, "cpu_capability": None})
    got = pins({"threads": 3})
    assert got[THREADS_ENV] == "3" and got["OMP_NUM_THREADS"] == "3" and got["OPENBLAS_NUM_THREADS"] == "3"
    assert "ATEN_CPU_CAPABILITY" not in got
    if os.uname().machine == "x86_64":
        assert pins({"cpu_capability": "avx2"}) == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                                    "MKL_CBWR": "AVX2"}
    for bad in ({"threads": 0}, {"threads": True}, {"threads": "2"}, {"cpu_capability": "sse"},
                {"thread": 2}):
        with pytest.raises(CellstageError, match="determinism"):
            pins(bad)


def test_apply_pins_and_host_check():
    env = {"OMP_NUM_THREADS": "8"}
    assert apply_pins({"threads": 2}, env)[THREADS_ENV] == "2"
    assert env["OMP_NUM_THREADS"] == "2" and pinned_threads(env) == 2
    assert pinned_threads({}) is None
    with pytest.raises(CellstageError, match=THREADS_ENV):
        pinned_threads({THREADS_ENV: "two"})
    if os.uname().machine != "x86_64":
        pytest.skip("instruction-set pins are x86")
    check_capability("avx512", {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"})
    check_capability("default", set())
    with pytest.raises(CellstageError, match="lacks"):  # torch would die of an illegal instruction
        check_capability("avx512", {"avx2", "fma"})


@pytest.fixture(scope="module")
def default_isa() -> dict:
    """This machine's default kernels: unpinned asked 2, 1; pinned 1 asked 2, 1."""
    return _child([[None, 2], [None, 1], [1, 2], [1, 1]], {}, omp="2")


def test_pinned_threads_make_the_rules_thread_count_irrelevant(default_isa):
    """Pinned at 1: asked for 2 or 1, with OMP_NUM_THREADS 2 from Snakemake, the same bits (and
    equal to an unpinned 1-thread run). Unpinned, 2 threads give other bits than 1 (measured
    here: the conv weight gradients are reduced in per-thread chunks)."""
    r = default_isa["runs"]
    un2, un1, pin_asked2, pin_asked1 = r
    assert (un2["threads"], un1["threads"], pin_asked2["threads"], pin_asked1["threads"]) == (2, 1, 1, 1)
    assert pin_asked2["sha"] == pin_asked1["sha"] == un1["sha"]
    assert un2["sha"] != un1["sha"]


def test_cpu_capability_reaches_torch_in_a_child(default_isa):
    """The pins set in the environment a job inherits reach torch there (read when it loads): the
    job runs AVX2 kernels, on 1 pinned thread whatever OMP_NUM_THREADS says, and computes other
    bits than this machine's default kernels (AVX-512 here)."""
    from cellstage.determinism import cpu_flags

    if os.uname().machine != "x86_64" or not {"avx2", "fma"} <= (cpu_flags() or set()):
        pytest.skip("needs an x86 host with AVX2")
    env: dict[str, str] = {}
    apply_pins({"threads": 1, "cpu_capability": "avx2"}, env)
    got = _child([[1, 4]], env, omp="4")
    assert got["cap"] == "AVX2" and got["runs"][0]["threads"] == 1
    if "avx512f" in (cpu_flags() or set()):  # measured here: AVX-512 oneDNN kernels, other bits
        assert default_isa["cap"] == "AVX512"
        assert default_isa["runs"][3]["sha"] != got["runs"][0]["sha"]
