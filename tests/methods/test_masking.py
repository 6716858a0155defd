"""Block-wise iBOT/BEiT masking: counts, ratios, determinism, block shape, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ssl_path.core.errors import UserError
from ssl_path.methods.masking import batch_masks, block_mask

GRID = (14, 14)
N_CELLS = GRID[0] * GRID[1]


def test_block_mask_never_exceeds_target_and_gets_close() -> None:
    rng = np.random.default_rng(0)
    shortfalls = []
    for n_masked in [0, 1, 3, 5, 19, 40, 77, 98, 150, N_CELLS]:
        for _ in range(10):
            mask = block_mask(rng, GRID, n_masked)
            assert mask.shape == GRID and mask.dtype == bool
            assert mask.sum() <= n_masked
            shortfalls.append((n_masked - mask.sum()) / max(n_masked, 1))
    assert not block_mask(rng, GRID, 0).any()
    # BEiT accepts a short count when no rectangle fits the remainder, but on average it is small.
    assert np.mean(shortfalls) < 0.1


def test_block_mask_is_made_of_blocks() -> None:
    rng = np.random.default_rng(1)
    for n_masked in [8, 20, 50, 90]:
        for _ in range(5):
            mask = block_mask(rng, GRID, n_masked)
            _, n_components = ndimage.label(mask)
            assert 0 < n_components < mask.sum()


@pytest.mark.parametrize("aspect, shape", [((1.0, 1.0), (4, 4)), ((4.0, 4.0), (8, 2)), ((0.25, 0.25), (2, 8))])
def test_block_mask_single_block_shape(aspect: tuple[float, float], shape: tuple[int, int]) -> None:
    # Area fixed at 16 and a fixed aspect (rows / columns): one rectangle of exactly that shape.
    mask = block_mask(np.random.default_rng(8), GRID, 16, min_block=16, aspect=aspect)
    rows, cols = np.nonzero(mask)
    assert mask.sum() == 16
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == shape


def test_block_mask_respects_max_block() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        mask = block_mask(rng, GRID, 60, min_block=4, max_block=6)
        labels, n_components = ndimage.label(mask)
        # Touching blocks merge, but with at most ~6 (+ rounding) cells per block, 60 cells need many.
        assert n_components >= 3


def test_batch_masks_fraction_counts_and_ratios() -> None:
    rng = np.random.default_rng(3)
    n_images, probability, ratio_range = 10, 0.5, (0.1, 0.5)
    ratios = []
    for _ in range(40):
        masks = batch_masks(rng, n_images, GRID, ratio_range, probability)
        assert masks.shape == (n_images, N_CELLS) and masks.dtype == bool
        counts = masks.sum(axis=1)
        assert (counts > 0).sum() == int(n_images * probability)
        assert counts.max() <= int(N_CELLS * ratio_range[1])
        ratios.extend(counts[counts > 0] / N_CELLS)
        # Stratified ratios: the i-th smallest count stays within the i-th slice's upper edge.
        edges = np.linspace(*ratio_range, int(n_images * probability) + 1)
        assert (np.sort(counts[counts > 0]) <= (N_CELLS * edges[1:]).astype(int)).all()
    assert ratio_range[0] <= np.mean(ratios) <= ratio_range[1]
    # Stratified draws cover the range: some ratios in the lowest and some in the highest slice.
    assert min(ratios) < 0.15 and max(ratios) > 0.4


def test_batch_masks_fraction_rounds_down_and_order_is_shuffled() -> None:
    rng = np.random.default_rng(4)
    masked_positions = set()
    for _ in range(30):
        masks = batch_masks(rng, 7, GRID, probability=0.3)
        masked = np.flatnonzero(masks.any(axis=1))
        assert len(masked) == int(7 * 0.3)  # 2 of 7
        masked_positions.update(masked.tolist())
    assert len(masked_positions) > 2  # not always the first images
    assert not batch_masks(rng, 5, GRID, probability=0.0).any()
    assert batch_masks(rng, 0, GRID).shape == (0, N_CELLS)


def test_batch_masks_same_seed_same_masks() -> None:
    first = batch_masks(np.random.default_rng(5), 8, GRID)
    second = batch_masks(np.random.default_rng(5), 8, GRID)
    other = batch_masks(np.random.default_rng(6), 8, GRID)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio_range": (0.5, 0.1)},
        {"ratio_range": (-0.1, 0.5)},
        {"ratio_range": (0.1, 1.5)},
        {"probability": 1.5},
        {"probability": -0.1},
        {"grid": (0, 14)},
        {"n_images": -1},
    ],
)
def test_batch_masks_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"n_images": 4, "grid": GRID} | kwargs
    with pytest.raises(UserError):
        batch_masks(np.random.default_rng(0), **args)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_masked": -1},
        {"n_masked": N_CELLS + 1},
        {"min_block": 0},
        {"max_block": 2},
        {"aspect": (2.0, 0.5)},
        {"max_attempts": 0},
    ],
)
def test_block_mask_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"grid": GRID, "n_masked": 10} | kwargs
    with pytest.raises(UserError):
        block_mask(np.random.default_rng(0), **args)
