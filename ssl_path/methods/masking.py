"""Block-wise patch masking for masked image modelling (BEiT / iBOT / DINOv2).

Masking random rectangles of patches, rather than independent patches, keeps the task from being
solved by interpolating from immediate neighbours. :func:`block_mask` follows BEiT (Bao et al. 2022,
"BEiT: BERT Pre-Training of Image Transformers", arXiv:2106.08254, Algorithm 1): rectangles with a
random area and a log-uniform aspect ratio are dropped on the patch grid until the target count is
reached; a rectangle that would overshoot is rejected, so the count never exceeds the target and may
fall slightly short when no rectangle fits the remainder.

:func:`batch_masks` follows the iBOT (Zhou et al. 2022, arXiv:2111.07832) / DINOv2 (Oquab et al. 2023,
arXiv:2304.07193) collate step: a fixed fraction of the batch's images is masked, with mask ratios
stratified over the ratio range so each batch covers it evenly, and the rest are left unmasked.

All randomness comes from the ``numpy.random.Generator`` passed in, never from global state, so the
same seed gives the same masks in any process.

:func:`random_masking` is MAE's (He et al. 2022, arXiv:2111.06377): independent patches, the same
number per image, chosen by sorting per-patch noise; it works on tensors, on the accelerator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ssl_path.core.errors import UserError

__all__ = ["block_mask", "batch_masks", "random_masking"]


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    if len(grid) != 2 or any(int(side) != side or side < 1 for side in grid):
        raise UserError(f"mask grid must be two positive integers (patch rows, columns), got {grid}")
    return int(grid[0]), int(grid[1])


def _add_block(
    rng: np.random.Generator,
    mask: np.ndarray,
    budget: int,
    min_block: int,
    max_block: int,
    log_aspect: tuple[float, float],
    max_attempts: int,
) -> int:
    """Try up to ``max_attempts`` random rectangles; mark the first adding 1..budget new cells.

    Returns how many cells were newly masked (0 when every attempt failed).
    """
    height, width = mask.shape
    upper = min(budget, max_block)
    # Near the end the remainder can be smaller than min_block; allow smaller rectangles then so the
    # count can still get close to its target.
    lower = min(min_block, upper)
    for _ in range(max_attempts):
        area = rng.uniform(lower, upper)
        aspect = math.exp(rng.uniform(*log_aspect))
        rows = max(1, round(math.sqrt(area * aspect)))
        cols = max(1, round(math.sqrt(area / aspect)))
        if rows > height or cols > width:
            continue
        top = int(rng.integers(0, height - rows + 1))
        left = int(rng.integers(0, width - cols + 1))
        block = mask[top : top + rows, left : left + cols]
        added = rows * cols - int(block.sum())
        if 0 < added <= budget:
            block[...] = True  # a view into ``mask``
            return added
    return 0


def block_mask(
    rng: np.random.Generator,
    grid: tuple[int, int],
    n_masked: int,
    min_block: int = 4,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10,
) -> np.ndarray:
    """A bool [H, W] mask of at most ``n_masked`` patches made of random rectangles (BEiT).

    Each rectangle has an area uniform in [``min_block``, ``max_block``] (``max_block`` defaults to the
    patches still to mask) and an aspect ratio (rows / columns) log-uniform in ``aspect``. Placement
    stops at ``n_masked`` or once ``max_attempts`` rectangles in a row add nothing.
    """
    height, width = _check_grid(grid)
    n_cells = height * width
    if not 0 <= n_masked <= n_cells:
        raise UserError(f"n_masked must be in [0, {n_cells}] for a {height}x{width} grid, got {n_masked}")
    if min_block < 1:
        raise UserError(f"min_block must be >= 1, got {min_block}")
    if max_block is not None and max_block < min_block:
        raise UserError(f"max_block ({max_block}) must be >= min_block ({min_block})")
    if len(aspect) != 2 or not 0 < aspect[0] <= aspect[1]:
        raise UserError(f"aspect must be (low, high) with 0 < low <= high, got {aspect}")
    if max_attempts < 1:
        raise UserError(f"max_attempts must be >= 1, got {max_attempts}")

    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    largest = n_cells if max_block is None else max_block
    count = 0
    while count < n_masked:
        added = _add_block(rng, mask, n_masked - count, min_block, largest, log_aspect, max_attempts)
        if added == 0:
            break
        count += added
    return mask


def batch_masks(
    rng: np.random.Generator,
    n_images: int,
    grid: tuple[int, int],
    ratio_range: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
) -> np.ndarray:
    """Bool [n_images, H*W] patch masks for a batch's global crops (DINOv2 collate).

    ``int(n_images * probability)`` images are masked; image i of them gets a ratio uniform in the
    i-th of as many equal slices of ``ratio_range`` and ``int(H*W*ratio)`` target patches. The others
    get no mask, and the image order is shuffled.
    """
    if n_images < 0:
        raise UserError(f"n_images must be >= 0, got {n_images}")
    height, width = _check_grid(grid)
    if len(ratio_range) != 2 or not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
        raise UserError(f"mask ratio range must be (low, high) with 0 <= low <= high <= 1, got {ratio_range}")
    if not 0.0 <= probability <= 1.0:
        raise UserError(f"mask probability must be in [0, 1], got {probability}")

    n_cells = height * width
    n_masked_images = int(n_images * probability)
    # Stratifying the ratios (one draw per slice) makes every batch span the range, which lowers the
    # variance of the loss compared with independent draws.
    edges = np.linspace(ratio_range[0], ratio_range[1], n_masked_images + 1)
    masks = np.zeros((n_images, n_cells), dtype=bool)
    for i in range(n_masked_images):
        ratio = rng.uniform(edges[i], edges[i + 1])
        masks[i] = block_mask(rng, (height, width), int(n_cells * ratio)).reshape(-1)
    return masks[rng.permutation(n_images)]


def random_masking(noise: Tensor, n_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's masking from per-patch ``noise`` [B, P]: the ``n_keep`` patches of lowest noise stay.

    Returns ``keep`` long [B, n_keep] (the kept patch indices, in noise order), ``removed`` bool
    [B, P] (True where a patch was dropped) and ``restore`` long [B, P], which puts a sequence in
    noise order (kept patches first, then the removed ones) back into patch order:
    ``torch.gather(shuffled, 1, restore)``.
    """
    n_patches = noise.shape[1]
    if not 1 <= n_keep < n_patches:
        raise UserError(f"MAE must keep between 1 and {n_patches - 1} of {n_patches} patches, not {n_keep}")
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    removed = torch.ones_like(noise, dtype=torch.bool)
    removed[:, :n_keep] = False
    return shuffle[:, :n_keep], torch.gather(removed, 1, restore), restore
