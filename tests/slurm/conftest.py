"""The launcher tests' real tiles, made once."""

from __future__ import annotations

from pathlib import Path

import pytest
from pretrain_helpers import make_tiles


@pytest.fixture(scope="session")
def tiles(tmp_path_factory) -> Path:
    return make_tiles(tmp_path_factory.mktemp("slurm_tiles") / "shards")
