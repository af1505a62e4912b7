import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer cache for the whole test session, never the user's ~/.cache."""
    env = os.environ.get("TORCHTITAN_TEST_CACHE")
    path = Path(env) if env else tmp_path_factory.mktemp("cache")
    path.mkdir(parents=True, exist_ok=True)
    return path
