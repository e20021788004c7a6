"""Small shared helpers: atomic outputs, seeding, provenance, logging to a file."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import __version__

log = logging.getLogger("cellstage")


class CellstageError(RuntimeError):
    """A user-facing error: the message names the file/field and what to fix."""


# a temporary folder of another host older than this is a leftover of a killed job
STALE_TEMP_S = 3600.0
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname().split(".")[0]) or "host"
_ATOMIC_TEMP = re.compile(r"(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[^.]*")


def temp_owner() -> str:
    """``<host>-<pid>-``: the start of a temporary's owner tag (a random part follows), so that
    :func:`clean_stale_temporaries` can tell a live writer's temporary from a killed one's."""
    return f"{_HOST}-{os.getpid()}-"


def _process_alive_since(pid: int, created: float) -> bool:
    """Whether process ``pid`` of this host runs and was started no later than ``created`` (a
    reused pid that started after the temp folder was made is not its owner; Linux /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        pass
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return True  # cannot tell: keep it
    return boot + ticks / os.sysconf("SC_CLK_TCK") <= created + 1.0


def clean_stale_temporaries(final: str | os.PathLike, *, hidden: bool = True) -> list[Path]:
    """Remove the temporaries that killed jobs left beside ``final``: the ``.<name>.<owner>.tmp``
    folders of :func:`atomic_path` (``hidden``) or the ``<name>.<owner>.tmp`` files of the
    checkpoint writer (:func:`cellstage.training.resume.temp_name`); returns them. A SIGKILL skips
    ``atomic_path``'s clean-up, and the rerun of
    the job is the first to know the folder is garbage (issue 15: partial ``.tmp`` stores were left
    behind and never cleaned).

    Kept: the temporaries of a live process of this host that is older than them (another copy
    of the job writing now) and, since other hosts' processes cannot be checked, other hosts'
    folders younger than :data:`STALE_TEMP_S`.
    """
    final = Path(final)
    removed = []
    now = time.time()
    prefix = f".{final.name}." if hidden else f"{final.name}."
    for p in final.parent.glob(glob.escape(prefix) + "*.tmp"):
        m = _ATOMIC_TEMP.fullmatch(p.name[len(prefix) : -len(".tmp")])
        try:
            created = p.stat().st_mtime
            mine = m and m["host"] == _HOST and int(m["pid"]) != os.getpid()
            if mine and _process_alive_since(int(m["pid"]), created):
                continue
            if m and m["host"] != _HOST and now - created < STALE_TEMP_S:
                continue
        except FileNotFoundError:
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        log.info("removed %s (left by a killed job)", p)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool | None = None):
    """Yield a temporary sibling path; rename it onto ``final`` only if the block succeeds.

    A killed or failing job therefore never leaves an output that looks finished. The temporary
    folder ``.<name>.<host>-<pid>-<random>.tmp`` names its owner, so the next writer of ``final``
    removes what a killed one left (:func:`clean_stale_temporaries`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{temp_owner()}", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def canonical_safetensors(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted, in place.

    safetensors 0.8 writes the ``metadata`` map in the iteration order of a Rust ``HashMap``,
    which is seeded per process: two saves of the same tensors and metadata (two runs, or a killed
    run and its rerun) differ in bytes, and so do the checksums that provenance and content-keyed
    resume take of them (issue 15 item 7; measured: 4 saves in 4 processes, 4 different files).
    The sorted header has the same length (same content), so the tensor offsets stay valid.
    """
    import struct

    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        meta = header.get("__metadata__")
        if not meta or len(meta) < 2:
            return
        rest = {k: v for k, v in header.items() if k != "__metadata__"}
        header = {"__metadata__": dict(sorted(meta.items())), **rest}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) > n:  # cannot happen for the same content; leave the file as written
            return
        fh.seek(8)
        fh.write(raw + b" " * (n - len(raw)))


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


#: the pinned torch thread count's variable (config ``determinism.threads``; cellstage.determinism)
THREADS_ENV = "CELLSTAGE_TORCH_THREADS"


def pinned_threads(environ=None) -> int | None:
    """The pinned torch thread count (``CELLSTAGE_TORCH_THREADS``), None when not pinned."""
    v = (os.environ if environ is None else environ).get(THREADS_ENV, "").strip()
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise CellstageError(f"{THREADS_ENV}={v!r}: expected an integer >= 1 (config determinism.threads)")
    return n


def set_torch_threads(n: int | None) -> None:
    """Torch uses the cores the rule was given (Snakemake's ``threads``), not every core of the node.

    On shared CPUs an oversubscribed thread count is several times slower than one thread. torch is
    imported only when a count is given, so stages that never train do not pay its import.

    A pinned count wins over ``n``: ``CELLSTAGE_TORCH_THREADS`` (config ``determinism.threads``, set
    by :func:`cellstage.determinism.apply_pins` when the workflow is parsed and inherited by every
    job) is used whatever ``n`` is, so a rule granted 2 cores on one node and 8 on another computes
    the same bits (the thread count changes how convolution weight gradients are reduced: issue 15
    item 7). When pinned, the BLAS/OpenMP pools that threadpoolctl finds in this process (numpy's
    OpenBLAS among them: Snakemake sets ``OMP/MKL/OPENBLAS_NUM_THREADS`` of every job to the rule's
    ``threads``) are capped at the same count, and OpenCV's if it is loaded.
    """
    pinned = pinned_threads()
    n = pinned or n
    if n:
        import torch

        torch.set_num_threads(int(n))
    if pinned:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=pinned)
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            pass
        if "cv2" in sys.modules:
            sys.modules["cv2"].setNumThreads(pinned)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            while b := fh.read(chunk):
                h.update(b)
    return h.hexdigest()


def provenance(config: dict | None = None, inputs: list | None = None) -> dict:
    """What made a result: package version, python, platform, config, input checksums."""
    prov = {
        "cellstage_version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    try:
        import torch

        prov["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    if config is not None:
        prov["config"] = config
    if inputs:
        prov["inputs"] = {str(p): file_sha256(p) for p in inputs if Path(p).exists()}
    return prov


def setup_logging(logfile: str | os.PathLike | None = None, level=logging.INFO) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


@contextlib.contextmanager
def redirect_output(logfile: str | os.PathLike):
    """Send this process's stdout/stderr (Python and C level) and logging to ``logfile``.

    A Snakemake script's first act: every line a library prints ends up in the rule's log.
    Exceptions are logged with their traceback before they propagate (non-zero exit).
    """
    logfile = Path(logfile)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(logfile, "a", buffering=1) as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        setup_logging(None)
        try:
            yield
        except BaseException:
            log.exception("failed")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


_LIBC_TRIM = None


def release_free_memory() -> None:
    """Hand memory freed inside glibc's heaps back to the OS (``malloc_trim(0)``; no-op elsewhere).

    Streaming loops that allocate and free tens of MB per step from several threads (one glibc
    arena each) otherwise leave the freed pages resident, and RSS creeps with the number of steps
    — i.e. with slide size. Called every 8 blocks of crop extraction it cost no time measurable
    above run-to-run noise (~10 %) on a 60k² slide; every block cost ~25 %.
    """
    global _LIBC_TRIM
    if _LIBC_TRIM is None:
        _LIBC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _LIBC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
                _LIBC_TRIM.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                _LIBC_TRIM = False
    if _LIBC_TRIM:
        _LIBC_TRIM(0)


def save_capped_png(rgb: np.ndarray, path: str | os.PathLike, max_side: int = 512,
                    colors: int = 32) -> None:
    """Write an (H, W, 3|4) uint8 image as PNG with its longest side at most ``max_side`` px
    (area-averaged downscale), quantised to a ``colors``-colour palette and optimised; atomic.
    Here (not in :mod:`cellstage.register.qc`, whose registration overlays use it) so the report
    environment, which has no OpenCV, can use it too."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if colors:
        # octree keeps small, distinct colours (a red FAILED title) that median cut merges away
        img = img.quantize(colors=colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
