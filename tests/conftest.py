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


# Level-0 (x, y) origins of the sample slide's crops. They overlap: the 1000 px squares whose every
# 256 px tile is mostly tissue all lie in one part of the slide.
SLIDE_CROP_ORIGINS = ((700, 1900), (800, 1900), (700, 1800))


@pytest.fixture(scope="session")
def slide_crops(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three 1000 x 1000 PNG crops of the sample slide's tissue, ``CMU-1_x<x>_y<y>.png``, alone in their folder.

    Real H&E images of MoNuSeg's size from data/sample, for the tests that tile "some real images".
    Every 256 px tile of them is tissue under any threshold the tiler's filter may pick: more than half
    its pixels have an HSV saturation above SATURATION_CEILING, the highest one.
    """
    import numpy as np
    import openslide

    from ssl_path.tiling.tissue import SATURATION_CEILING

    slide = openslide.OpenSlide(str(sample_data / "slide" / "CMU-1-Small-Region.svs"))
    folder = tmp_path_factory.mktemp("slide_crops")
    crops = []
    for x, y in SLIDE_CROP_ORIGINS:
        crop = slide.read_region((x, y), 0, (1000, 1000)).convert("RGB")
        stained = np.asarray(crop.convert("HSV"))[..., 1] > 255 * SATURATION_CEILING
        least = min(stained[i : i + 256, j : j + 256].mean() for i in range(0, 745, 64) for j in range(0, 745, 64))
        assert least > 0.5, f"a 256 px tile of the crop at {(x, y)} is only {least:.0%} tissue"
        crops.append(folder / f"CMU-1_x{x}_y{y}.png")
        crop.save(crops[-1])
    slide.close()
    return crops
