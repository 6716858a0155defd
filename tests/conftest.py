"""Shared fixtures: the real sample data in ../shared/data, read-only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub; huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSL_PATH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (set SSL_PATH_SHARED_DATA)")
    return SHARED_DATA
