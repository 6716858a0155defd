"""Where the test data lies, and the sample slide's regions: plain names any test module can import
(``from sample_helpers import`` cannot be relied on: pytest loads every conftest.py as the one module
"conftest", so a later one, tests/slurm's, takes this folder's place)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSL_PATH_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE_DATA = REPO / "data" / "sample"
# OpenSlide's CMU-1-Small-Region: one level of 2220 x 2967 px at 0.499 µm/px, Aperio JPEG.
SAMPLE_SLIDE = SAMPLE_DATA / "slide" / "CMU-1-Small-Region.svs"


def sample_slide_region(x: int, y: int, size: int | tuple[int, int]) -> np.ndarray:
    """The sample slide's level-0 region at (x, y), ``size`` px square or (width, height): uint8 RGB,
    C-contiguous and read-only (numpy's view of the PIL image)."""
    import openslide

    width, height = (size, size) if isinstance(size, int) else size
    with openslide.OpenSlide(SAMPLE_SLIDE) as slide:
        return np.asarray(slide.read_region((x, y), 0, (width, height)).convert("RGB"))
