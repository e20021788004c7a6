import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests run on 2 cores; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
