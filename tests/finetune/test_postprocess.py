"""finetune.postprocess: keep the k largest components, fill holes, drop specks, and the choice on
validation masks (best mean Dice, ties to the simpler candidate)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.postprocess import CANDIDATES, PostProcess, choose


def _blobs() -> np.ndarray:
    """Three separate components of 9, 4 and 1 pixels on a 12x12 mask."""
    mask = np.zeros((12, 12), bool)
    mask[0:3, 0:3] = True  # 9
    mask[6:8, 6:8] = True  # 4
    mask[11, 0] = True  # 1
    return mask


def _ring() -> np.ndarray:
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False
    return mask


def test_identity_returns_the_mask():
    assert np.array_equal(PostProcess()(_blobs()), _blobs())


def test_keeps_the_largest_k_components():
    blobs = _blobs()
    largest = np.zeros_like(blobs)
    largest[0:3, 0:3] = True
    assert np.array_equal(PostProcess(keep_largest=1)(blobs), largest)
    two = largest.copy()
    two[6:8, 6:8] = True
    assert np.array_equal(PostProcess(keep_largest=2)(blobs), two)
    assert np.array_equal(PostProcess(keep_largest=5)(blobs), blobs)
    assert not PostProcess(keep_largest=1)(np.zeros((4, 4), bool)).any()


def test_diagonal_pixels_are_one_component():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # one 8-connected component of 3
    mask[5, 3:5] = True  # 2
    assert PostProcess(keep_largest=1)(mask).sum() == 3


def test_fills_a_hole():
    ring = _ring()
    filled = PostProcess(fill_holes=True)(ring)
    assert filled[3, 3] and filled.sum() == 25
    assert not PostProcess()(ring)[3, 3]


def test_removes_a_speck_below_min_size():
    blobs = _blobs()
    assert PostProcess(min_size=2)(blobs).sum() == 9 + 4
    assert PostProcess(min_size=4)(blobs).sum() == 9 + 4  # "fewer than min_size pixels" go
    assert PostProcess(min_size=5)(blobs).sum() == 9
    assert not PostProcess(min_size=10)(blobs).any()


def test_candidates_and_to_dict():
    assert CANDIDATES[0] == PostProcess()
    assert len(CANDIDATES) <= 12 and len(set(CANDIDATES)) == len(CANDIDATES)
    recipe = PostProcess(keep_largest=1, fill_holes=True)
    assert recipe.to_dict() == {"keep_largest": 1, "fill_holes": True, "min_size": 0}
    assert PostProcess(**json.loads(json.dumps(recipe.to_dict()))) == recipe
    with pytest.raises(ValueError):
        PostProcess(keep_largest=0)
    with pytest.raises(ValueError):
        PostProcess()(_blobs().astype(np.float32))


def _two_squares_with_holes_and_a_speck() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((20, 20), bool)
    truth[1:7, 1:7] = truth[10:16, 10:16] = True  # two 36-pixel objects
    mask = truth.copy()
    mask[3, 3] = mask[12, 12] = False  # a hole in each
    mask[18, 1:3] = True  # a 2-pixel speck
    return mask, truth


def test_choose_picks_the_candidate_that_wins_on_the_truths():
    mask, truth = _two_squares_with_holes_and_a_speck()
    # fill holes + drop specks under 16 px recovers the truth; keeping only the largest loses a square,
    # min_size 64 loses both, the identity keeps the holes and the speck.
    best, dice = choose([mask, mask], [truth, truth])
    assert best == PostProcess(fill_holes=True, min_size=16)
    assert dice == pytest.approx(1.0)
    # against other truths (the mask itself) nothing beats the identity
    best, dice = choose([mask], [mask])
    assert (best, dice) == (PostProcess(), 1.0)


def test_choose_breaks_ties_towards_the_earlier_candidate():
    _, truth = _two_squares_with_holes_and_a_speck()
    simple, fancy = PostProcess(), PostProcess(min_size=16)  # both leave the truth unchanged
    assert choose([truth], [truth], [simple, fancy])[0] == simple
    assert choose([truth], [truth], [fancy, simple])[0] == fancy
    with pytest.raises(ValueError):
        choose([truth], [], [simple])
