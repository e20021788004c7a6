"""Puts this repository's `src/` first on `sys.path`, so a rule script imports the `cellstage`
of the checkout that runs the workflow, in whatever environment runs the script.

Every script in this folder imports it before `cellstage` (`import _src_path  # noqa: F401`).
Snakemake appends the script's folder to `sys.path` in the preamble it writes in front of a
`script:` (snakemake/script/__init__.py, `searchpaths.append(path.get_basedir()...)` for local
scripts), so this module is found under `--sdm conda`, in the project `.venv`, on SLURM and in a
container alike. The per-rule conda environments (`workflow/envs/*.yaml`) install only the
third-party packages: a relative path to the package in their `pip:` section would be resolved
from the conda prefix (`.snakemake/conda/`, or `--conda-prefix`), not from the yaml's folder,
and an environment shared between checkouts would run the code of whichever created it.
See docs/hpc.md ("Per-rule environments").
"""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)
