"""Post-processing of a predicted binary mask, chosen on the validation split.

``PostProcess`` is a frozen, JSON-describable recipe applied to one boolean [H, W] mask, in this order:

1. ``fill_holes``: fill every hole enclosed by the foreground (``scipy.ndimage.binary_fill_holes``),
   first, so that an island inside a hole joins its host instead of counting as a component;
2. ``min_size``: drop connected components of fewer than ``min_size`` pixels (specks);
3. ``keep_largest``: keep the k largest connected components (ties: the first in raster order).

Components are 8-connected (``finetune.metrics.CONNECTIVITY``, the rule the instance metrics use).
Steps 2 and 3 share one ``skimage.measure.label`` and a ``np.bincount`` of component areas rather than
``skimage.morphology.remove_small_objects``, whose size keyword changed in scikit-image 0.26
(``min_size``, strictly smaller, deprecated for ``max_size``, smaller or equal) while the project
supports 0.24 onwards.

``choose`` tries ``CANDIDATES`` (identity first, then single steps, then combinations) and returns the
one of best mean Dice on the images it is given, ties to the earlier, simpler one. Give it validation
images only: the test split is never used for a choice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from skimage.measure import label

from finetune.metrics import CONNECTIVITY, pixel_scores

__all__ = ["PostProcess", "CANDIDATES", "choose"]


@dataclass(frozen=True)
class PostProcess:
    """Fill holes, drop components under ``min_size`` pixels, keep the ``keep_largest`` largest."""

    keep_largest: int | None = None
    fill_holes: bool = False
    min_size: int = 0

    def __post_init__(self) -> None:
        if self.keep_largest is not None and self.keep_largest < 1:
            raise ValueError(f"keep_largest must be None or >= 1, got {self.keep_largest}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.ndim != 2:
            raise ValueError(f"mask must be a boolean [H, W] array, got {mask.dtype} {mask.shape}")
        if self.fill_holes:
            mask = ndimage.binary_fill_holes(mask)
        if self.min_size <= 1 and self.keep_largest is None:
            return mask.copy()
        components = label(mask, connectivity=CONNECTIVITY)
        area = np.bincount(components.ravel())  # [1 + K], index 0 = background
        keep = area >= self.min_size
        keep[0] = False
        if self.keep_largest is not None:
            ids = np.flatnonzero(keep)
            ids = ids[np.argsort(-area[ids], kind="stable")][: self.keep_largest]
            keep = np.zeros_like(keep)
            keep[ids] = True
        return keep[components]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CANDIDATES: tuple[PostProcess, ...] = (
    PostProcess(),
    PostProcess(keep_largest=1),
    PostProcess(fill_holes=True),
    PostProcess(min_size=16),
    PostProcess(min_size=64),
    PostProcess(keep_largest=1, fill_holes=True),
    PostProcess(keep_largest=2),
    PostProcess(keep_largest=3),
    PostProcess(fill_holes=True, min_size=16),
    PostProcess(fill_holes=True, min_size=64),
)


def choose(
    masks: Sequence[np.ndarray], truths: Sequence[np.ndarray], candidates: Sequence[PostProcess] = CANDIDATES
) -> tuple[PostProcess, float]:
    """The candidate of best mean ``pixel_scores`` Dice over (validation) images, and that Dice.

    Ties go to the earlier candidate, so list the simpler ones first (``CANDIDATES`` starts with
    the identity).
    """
    if len(masks) != len(truths) or len(masks) == 0:
        raise ValueError(f"need as many masks as truths, at least one: {len(masks)}, {len(truths)}")
    if len(candidates) == 0:
        raise ValueError("no post-processing candidates to choose from")
    best, best_dice = candidates[0], -1.0
    for candidate in candidates:
        dice = float(np.mean([pixel_scores(candidate(m), t)["dice"] for m, t in zip(masks, truths)]))
        if dice > best_dice:
            best, best_dice = candidate, dice
    return best, best_dice
