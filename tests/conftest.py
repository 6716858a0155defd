"""Shared fixtures: the real data in ../shared/data and the project's own sample in data/sample, read-only.

Without ../shared (a fresh clone on its own) the tests that need it skip, each with one line naming
the folder; the rest run. CI has it beside the clone, so nothing skips there for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub; huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSL_PATH_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE_DATA = REPO / "data" / "sample"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data at {SHARED_DATA} (set SSL_PATH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA
