"""Shared fixtures: the real data in ../shared/data and the project's own sample in data/sample, read-only.

Without ../shared (a fresh clone on its own) the tests that need it skip, each with one line naming
the folder; the rest run. CI has it beside the clone, so nothing skips there for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sample_helpers import SAMPLE_DATA, SAMPLE_SLIDE, SHARED_DATA, sample_slide_region

# Tests never reach a hub; huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data at {SHARED_DATA} (set SSL_PATH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    return SAMPLE_SLIDE


# Level-0 (x, y) origins of the sample slide's crops. They overlap: the 1000 px squares whose every
# 256 px tile is mostly tissue all lie in one part of the slide.
SLIDE_CROP_ORIGINS = ((700, 1900), (800, 1900), (700, 1800))


@pytest.fixture(scope="session")
def slide_crops(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three 1000 x 1000 PNG crops of the sample slide's tissue, ``CMU-1_x<x>_y<y>.png``, alone in their folder.

    Real H&E images of MoNuSeg's size from data/sample, for the tests that tile "some real images".
    Every 256 px tile of them is tissue under any threshold the tiler's filter may pick: more than half
    its pixels have an HSV saturation above SATURATION_CEILING, the highest one.
    """
    import numpy as np
    from PIL import Image

    from ssl_path.tiling.tissue import SATURATION_CEILING

    folder = tmp_path_factory.mktemp("slide_crops")
    OFFSETS = sorted({*range(0, 1000 - 256, 64), 1000 - 256})  # the last tile flush with the edge too
    crops = []
    for x, y in SLIDE_CROP_ORIGINS:
        crop = Image.fromarray(sample_slide_region(x, y, 1000))
        stained = np.asarray(crop.convert("HSV"))[..., 1] > 255 * SATURATION_CEILING
        least = min(stained[i : i + 256, j : j + 256].mean() for i in OFFSETS for j in OFFSETS)
        assert least > 0.5, f"a 256 px tile of the crop at {(x, y)} is only {least:.0%} tissue"
        crops.append(folder / f"CMU-1_x{x}_y{y}.png")
        crop.save(crops[-1])
    return crops
