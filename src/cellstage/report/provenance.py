"""Provenance of the report's tables: config hash, git commit, package version, input checksums.

Every table the report writes carries a short provenance block (Markdown) and the full record is
``provenance.json`` beside it: what a reviewer needs to tell whether two tables came from the same
configuration, code and fold outputs (ARCHITECTURE.md: "Record config, package version and input
checksums next to every result table").
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..utils import file_sha256, provenance

__all__ = ["config_hash", "git_commit", "input_checksums", "markdown_block", "report_provenance"]


def config_hash(config: Mapping) -> str:
    """sha256 (first 16 hex digits) of the config as canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit(where: str | Path | None = None) -> dict:
    """``{"commit": <HEAD sha or None>, "dirty": <tracked files changed or None>}`` of the
    repository holding ``where`` (default: this package's source); None where git or the
    repository is absent (an installed package)."""
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(status.strip())}


def input_checksums(paths: Iterable[str | Path]) -> dict[str, str]:
    """sha256 of every input file (directories such as Zarr stores are listed as ``"directory"``)."""
    out = {}
    for p in sorted({str(p) for p in paths}):
        path = Path(p)
        if path.is_file():
            out[p] = file_sha256(path)
        elif path.is_dir():
            out[p] = "directory"
        else:
            raise FileNotFoundError(f"report input {p} does not exist")
    return out


def combined_digest(checksums: Mapping[str, str]) -> str:
    """One sha256 (16 hex digits) over all (path, checksum) pairs: equal iff the inputs are."""
    h = hashlib.sha256()
    for path, digest in sorted(checksums.items()):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def report_provenance(config_digest: str, inputs: Iterable[str | Path], settings: Mapping | None = None) -> dict:
    """The record written to ``provenance.json``: :func:`cellstage.utils.provenance` (package,
    python, platform, torch versions) + config hash, git commit and the inputs' checksums."""
    checks = input_checksums(inputs)
    return {
        **provenance(),
        "config_hash": config_digest,
        "git": git_commit(),
        "settings": dict(settings or {}),
        "inputs_digest": combined_digest(checks),
        "inputs": checks,
    }


def markdown_block(prov: Mapping) -> str:
    """The provenance line every Markdown table starts with (details in provenance.json)."""
    git = prov.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    n_files = sum(1 for v in prov.get("inputs", {}).values() if v != "directory")
    return (f"> Provenance: config `{prov.get('config_hash')}` · git `{commit}` · "
            f"cellstage {prov.get('cellstage_version')} · inputs `{prov.get('inputs_digest')}` "
            f"({n_files} files, sha256 each in provenance.json)\n")
