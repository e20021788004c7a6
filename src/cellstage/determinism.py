"""Pins of what makes the same commit, config and seed compute different numbers on different CPUs
(issue 15 item 7, "Determinism, measured").

Same machine, same thread count: every training here is bit-for-bit repeatable (tested in
``tests/integration/test_kill.py`` and below). Across machines the demo segmenter's AP@0.5 was
0.825 on one and 0.800 on another. What differs between two CPU machines, measured on one AMD
EPYC (AVX-512; torch 2.14.1, whose BLAS is MKL 2024.2 and whose convolutions are oneDNN 3.12,
OpenMP backend) by simulating the other machine in separate processes, the variables set before
``import torch`` (scripts and figures: docs/hpc.md, "Determinism across machines"):

* **torch's intra-op thread count** (= the cores Snakemake grants a rule, ``threads:``, unless
  pinned). The forward pass of Cellpose's CPnet (6.6 M parameters, 4 crops of 64²) gives the
  same bits with 1, 2, 3 or 4 threads, but convolution weight gradients are reduced over the
  batch in per-thread chunks: after 5 AdamW steps the weights differ in their bits between 1, 2,
  3 and 4 threads (final loss 0.011495 / 0.010910 / 0.011221 / 0.011146: AdamW amplifies
  last-bit differences within a few steps); resnet18 alike. The demo segmenter (``make demo``'s
  recipe, seed 0, 480 steps, 49 held-out tiles): epoch 1 (learning rate 0) identical, losses
  differ from epoch 2, and AP@0.5 is 0.753 (326 TP / 18 FP / 89 FN) with 1 thread vs 0.791
  (344 / 20 / 71) with 2 (the same counts as recorded for 1- and 2-thread models on
  2026-12-02): the thread count alone makes a spread the size of the 0.800 vs 0.825 seen
  between machines.
* **the instruction set oneDNN's convolution kernels are generated for** (``ONEDNN_MAX_CPU_ISA``;
  AVX-512 vs AVX2 is the usual difference between nodes of two hardware generations): already
  the first forward pass differs in its last bits (CPnet loss 0x1.58bff0p-3 vs 0x1.58bfeep-3;
  with AVX2 kernels even 1 vs 2 threads differ there), and the trained weights differ. Demo
  segmenter with 1 thread and ``cpu_capability: avx2``: epoch-1 loss already differs, AP@0.5
  0.791 vs 0.753 (344 / 20 / 71: the 2-thread model's counts by chance, its weights and its
  AP@0.5 with edge nuclei, 0.590 vs 0.584, differ).
* **ATen's own vectorised kernels** (``ATEN_CPU_CAPABILITY``): AVX2 vs AVX-512 left CPnet's bits
  unchanged but changed resnet18's; ``default`` (no SIMD) changed both.
* **MKL's code path** (``MKL_CBWR``): ``COMPATIBLE`` changed both nets (the first forward pass
  too); ``AVX2`` and ``AVX512`` gave this machine's default bits. MKL chooses its path by CPU
  vendor and model (on this AMD CPU its default gives the same bits as those two), so an Intel
  node may take another one.
* ``torch.use_deterministic_algorithms(True)`` changed nothing on CPU (same bits with 1 and with
  2 threads as without it): it does not remove the thread-count dependence.
* run to run on one machine with the same settings: identical (also with 2 threads).

What can be pinned, from the config section ``determinism`` (both default null = not pinned,
the behaviour before this module):

``threads``
    a fixed torch intra-op thread count, used whatever number of cores Snakemake grants a rule
    (a rule given 2 cores on one node and 8 on another then computes the same numbers). Set as
    ``CELLSTAGE_TORCH_THREADS``, which :func:`cellstage.utils.set_torch_threads` honours over the
    rule's ``threads``, and as ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/
    ``OPENCV_FOR_THREADS_NUM`` for everything else. (Snakemake overwrites the OMP/MKL/OpenBLAS
    variables of every ``shell:`` and ``script:`` job with the rule's ``threads``; hence the
    variable of our own, which it leaves alone.) Costs speed where a rule could use more cores.
``cpu_capability``
    ``"avx2"``, ``"avx512"`` or ``"default"`` (no SIMD, ~3.5x slower): caps
    ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` at that instruction set and sets MKL's code
    path (``MKL_CBWR``) to it, so a cluster of AVX-512 and AVX2 nodes runs
    the same kernels on both (pin the smallest set every node has: usually ``avx2``). Both
    variables are read once, when torch is loaded: the workflow sets them in ``os.environ`` at
    parse time (``workflow/rules/common.smk``), before any job starts, and jobs inherit them
    (SLURM jobs re-parse the Snakefile on the node, where :func:`apply_pins` checks the node has
    the instruction set: torch's dispatcher takes ``ATEN_CPU_CAPABILITY=avx512`` without
    checking the CPU, and a node without AVX-512 would die of an illegal instruction).

Not pinned by this module, because they cannot be or are pinned elsewhere: the CPU model beyond
its instruction set (oneDNN also sizes its blockings by the caches, so two AVX2 CPUs may still
differ: not measurable here, with one CPU model),
the library versions (a different torch/oneDNN/MKL build computes different bits:
``cellstage.utils.provenance`` records torch's), GPUs (cuDNN algorithm choice, atomics: the
training loops' ``deterministic`` setting, :mod:`cellstage.training.fit`), data-loader worker
seeding (already per-seed generators: :func:`cellstage.training.resume.loader_generator`; note
that the number of loader workers changes the result) and the global seeds (``seed``).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping, MutableMapping

from .utils import THREADS_ENV, CellstageError, pinned_threads  # noqa: F401  (re-exported)

log = logging.getLogger("cellstage")

#: thread-count variables of the other libraries a job may load (OpenMP, MKL, OpenBLAS, OpenCV)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENCV_FOR_THREADS_NUM")
#: cpu_capability -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR, /proc/cpuinfo flags the host needs)
CAPABILITIES = {
    "default": ("default", "SSE41", "COMPATIBLE", ()),
    "avx2": ("avx2", "AVX2", "AVX2", ("avx2", "fma")),
    "avx512": ("avx512", "AVX512_CORE", "AVX512", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
}
ISA_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def pins(section: Mapping | None) -> dict[str, str]:
    """The environment variables that pin what ``section`` (the config's ``determinism``) asks for.

    ``{"threads": None|int >= 1, "cpu_capability": None|"default"|"avx2"|"avx512"}``; a missing
    key or None pins nothing (``{}`` for an empty or None section). Raises CellstageError on
    any other value, naming the key.
    """
    section = dict(section or {})
    unknown = sorted(set(section) - {"threads", "cpu_capability"})
    if unknown:
        raise CellstageError(f"config determinism: unknown keys {unknown}; expected threads, cpu_capability")
    out: dict[str, str] = {}
    threads = section.get("threads")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise CellstageError(f"config determinism.threads: expected null or an integer >= 1, got {threads!r}")
        out[THREADS_ENV] = str(threads)
        out.update(dict.fromkeys(THREAD_VARS, str(threads)))
    cap = section.get("cpu_capability")
    if cap is not None:
        if cap not in CAPABILITIES:
            raise CellstageError(f"config determinism.cpu_capability: expected null or one of "
                                 f"{sorted(CAPABILITIES)}, got {cap!r}")
        aten, onednn, mkl, _ = CAPABILITIES[cap]
        out["ATEN_CPU_CAPABILITY"] = aten
        if _is_x86():  # oneDNN's and MKL's names are x86 instruction sets
            out["ONEDNN_MAX_CPU_ISA"] = onednn
            out["MKL_CBWR"] = mkl
    return out


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_flags() -> set[str] | None:
    """This host's CPU feature flags (Linux ``/proc/cpuinfo``), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def check_capability(cap: str | None, flags: set[str] | None = None) -> None:
    """Raise CellstageError when this host cannot run the pinned instruction set ``cap``
    (``flags``: the host's CPU flags, default :func:`cpu_flags`; unknown flags: no check)."""
    if cap is None or cap == "default":
        return
    if not _is_x86():
        raise CellstageError(f"config determinism.cpu_capability {cap!r} is an x86 instruction set but this "
                             f"host is {platform.machine()}; use 'default' or null")
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return
    missing = [f for f in CAPABILITIES[cap][3] if f not in flags]
    if missing:
        raise CellstageError(f"config determinism.cpu_capability {cap!r}: this host ({platform.node()}) lacks "
                             f"{missing}; pin the smallest instruction set every node has (e.g. 'avx2') "
                             "or null")


def apply_pins(section: Mapping | None, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :func:`pins` of ``section`` in ``environ`` (default ``os.environ``, which the jobs inherit);
    returns what was set. Pins overwrite what the environment had (the config decides).

    Checks that this host has the pinned instruction set (:func:`check_capability`). Only
    processes started afterwards follow an instruction-set pin (torch reads the variables when it
    loads); when this process has torch loaded already, that is logged as a warning.
    """
    env = os.environ if environ is None else environ
    section = dict(section or {})
    out = pins(section)
    check_capability(section.get("cpu_capability"))
    if env is os.environ and "torch" in sys.modules and any(
            os.environ.get(k) != v for k, v in out.items() if k in ISA_VARS):
        log.warning("determinism.cpu_capability pinned after torch was imported in this process: "
                    "it applies to the processes started from now on, not to this one")
    env.update(out)
    return out
