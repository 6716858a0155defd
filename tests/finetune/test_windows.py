"""finetune.windows: window origins and cores, merging per-window detections (an object cut by a window
border is kept once, where NMS alone keeps it twice), and MIDOG-style guided crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from finetune.windows import core_bounds, guided_crop, merge_windows, window_starts, windows

WINDOW, OVERLAP = 256, 64
# Two windows along x on a 256 x 448 image: starts 0 and 192, overlap [192, 256), cores split at 224.
ROW = (256, 448)
ROW_ORIGINS = [(0, 0), (0, 192)]


def _found(boxes, scores=None, labels=None, **extra) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    return {
        "boxes": boxes,
        "scores": torch.tensor(scores if scores is not None else [0.9] * n, dtype=torch.float32),
        "labels": torch.tensor(labels if labels is not None else [1] * n, dtype=torch.int64),
        **extra,
    }


def _nms_alone(detections, origins) -> torch.Tensor:
    """The same inputs merged by shifting and class-wise NMS only, no core rule."""
    boxes = torch.cat([d["boxes"] + torch.tensor([x0, y0, x0, y0]) for d, (y0, x0) in zip(detections, origins)])
    scores = torch.cat([d["scores"] for d in detections])
    labels = torch.cat([d["labels"] for d in detections])
    return boxes[batched_nms(boxes, scores, labels, 0.5)]


@pytest.mark.parametrize(
    "length, window, overlap, expected",
    [
        (256, 256, 64, [0]),  # exactly one window
        (100, 256, 64, [0]),  # smaller than a window: one, padded by the caller
        (640, 256, 64, [0, 192, 384]),  # exact multiple: 384 + 256 = 640 is already flush
        (700, 256, 64, [0, 192, 384, 444]),  # remainder: the last window is moved back to be flush
        (257, 256, 0, [0, 1]),
    ],
)
def test_window_starts(length, window, overlap, expected):
    starts = window_starts(length, window, overlap)
    assert starts == expected
    assert starts[-1] + window == max(length, window)


@pytest.mark.parametrize("overlap", [256, 300, -1])
def test_window_starts_refuses_an_overlap_outside_0_to_window(overlap):
    with pytest.raises(ValueError):
        window_starts(1000, 256, overlap)


def test_windows_are_row_major_origins():
    assert windows(300, 448, WINDOW, OVERLAP) == [(0, 0), (0, 192), (44, 0), (44, 192)]


@pytest.mark.parametrize("length", [100, 256, 448, 640, 700, 1000, 4099])
def test_cores_tile_the_axis_exactly(length):
    starts = window_starts(length, WINDOW, OVERLAP)
    cores = core_bounds(starts, WINDOW, length)
    assert len(cores) == len(starts)
    assert cores[0][0] == 0 and cores[-1][1] == length
    for (_, hi), (lo, _) in zip(cores, cores[1:]):
        assert hi == lo  # half-open: no gap, no overlap
    for start, (lo, hi) in zip(starts, cores):
        assert start <= lo < hi <= start + WINDOW  # a window owns only what it sees


def test_core_bounds_refuses_windows_with_a_gap():
    with pytest.raises(ValueError):
        core_bounds([0, 300], WINDOW, 556)


def test_an_object_cut_by_a_window_border_is_kept_once():
    # Object at x [245, 295]: the left window sees its left 11 px against its right border, the right
    # window (origin x 192) sees it whole at [53, 103]. The cut box has IoU 0.22 with the whole one.
    detections = [_found([245, 100, 256, 150], [0.95]), _found([53, 100, 103, 150], [0.8])]
    merged = merge_windows(detections, ROW_ORIGINS, ROW, WINDOW)
    assert merged["boxes"].tolist() == [[245.0, 100.0, 295.0, 150.0]]
    assert merged["window"].tolist() == [1]
    assert len(_nms_alone(detections, ROW_ORIGINS)) == 2  # the core rule is what removes the cut copy


def test_an_object_where_four_windows_meet_is_kept_once():
    image, origins = (448, 448), windows(448, 448, WINDOW, OVERLAP)
    assert origins == [(0, 0), (0, 192), (192, 0), (192, 192)]
    # Object at [245, 295] on both axes: each window sees it cut by its own borders.
    detections = [
        _found([245, 245, 256, 256], [0.9]),  # (0, 0): the corner only
        _found([53, 245, 103, 256], [0.9]),  # (0, 192): cut in y
        _found([245, 53, 256, 103], [0.9]),  # (192, 0): cut in x
        _found([53, 53, 103, 103], [0.7]),  # (192, 192): whole
    ]
    merged = merge_windows(detections, origins, image, WINDOW)
    assert merged["boxes"].tolist() == [[245.0, 245.0, 295.0, 295.0]]
    assert merged["window"].tolist() == [3]
    assert len(_nms_alone(detections, origins)) == 4


def test_two_close_objects_in_the_overlap_both_survive():
    # A at x [200, 230] and B at x [220, 250] lie wholly in the overlap: both windows see both.
    a, b = [200, 100, 230, 130], [220, 100, 250, 130]
    shifted = [[x - 192 if i % 2 == 0 else x for i, x in enumerate(box)] for box in (a, b)]
    detections = [_found([a, b], [0.9, 0.8]), _found(shifted, [0.85, 0.75])]
    merged = merge_windows(detections, ROW_ORIGINS, ROW, WINDOW)
    assert sorted(merged["boxes"].tolist()) == [a, b]
    assert merged["window"].tolist() == [0, 1]  # A's centre 215 is left of 224, B's 235 right of it


def test_nms_is_class_wise():
    boxes = [[10, 10, 60, 60], [12, 12, 62, 62]]  # IoU 0.85
    two_classes = merge_windows([_found(boxes, [0.9, 0.8], [1, 2])], [(0, 0)], (256, 256), WINDOW)
    assert two_classes["labels"].tolist() == [1, 2]
    one_class = merge_windows([_found(boxes, [0.9, 0.8], [1, 1])], [(0, 0)], (256, 256), WINDOW)
    assert one_class["scores"].tolist() == pytest.approx([0.9])


def test_extra_entries_follow_their_detections():
    # Each mask is filled with its detection's id; after dropping, NMS and sorting they must still match.
    def masks(ids):
        return np.asarray(ids, dtype=np.float32).reshape(-1, 1, 1, 1) * np.ones((1, 1, 8, 8), np.float32)

    detections = [
        _found(
            [[245, 100, 256, 150], [10, 10, 40, 40], [100, 100, 140, 140]], [0.95, 0.3, 0.6], masks=masks([1, 2, 3])
        ),
        _found([[53, 100, 103, 150], [150, 10, 200, 60]], [0.8, 0.5], masks=torch.from_numpy(masks([4, 5]))),
    ]
    merged = merge_windows(detections, ROW_ORIGINS, ROW, WINDOW)
    # id 1 is the cut copy of id 4 and is dropped; the others come sorted by score.
    assert merged["masks"][:, 0, 0, 0].tolist() == [4.0, 3.0, 5.0, 2.0]
    assert merged["scores"].tolist() == pytest.approx([0.8, 0.6, 0.5, 0.3])
    assert merged["window"].tolist() == [1, 0, 1, 0]
    assert merged["masks"].shape == (4, 1, 8, 8)


def test_boxes_are_clipped_to_a_padded_image():
    # A 100 x 100 image in one padded 256 window: a box reaching into the padding is clipped and kept,
    # a box wholly in the padding is dropped.
    detections = [_found([[70, 70, 120, 120], [150, 150, 200, 200]], [0.9, 0.8])]
    merged = merge_windows(detections, [(0, 0)], (100, 100), WINDOW)
    assert merged["boxes"].tolist() == [[70.0, 70.0, 100.0, 100.0]]


def test_no_detections_give_empty_outputs():
    merged = merge_windows([_found([]), _found([])], ROW_ORIGINS, ROW, WINDOW)
    assert merged["boxes"].shape == (0, 4) and len(merged["scores"]) == len(merged["window"]) == 0


def _share_containing(p: float, n: int = 4000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    centres, wanted = np.array([[500.5, 300.5], [900.0, 900.0]]), np.array([True, False])
    hits = 0
    for _ in range(n):
        y0, x0 = guided_crop(rng, (1000, 1000), 256, centres, wanted, p)
        hits += x0 <= 500.5 < x0 + 256 and y0 <= 300.5 < y0 + 256
    return hits / n


def _chance(centre: float, length: int = 1000, crop: int = 256) -> float:
    """Probability that a uniform crop origin in [0, length - crop] covers ``centre`` along one axis."""
    origins = np.arange(length - crop + 1)
    return float(np.mean((origins <= centre) & (centre < origins + crop)))


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_guided_crop_contains_the_wanted_object_p_plus_chance(p):
    chance = _chance(500.5) * _chance(300.5)
    expected = p + (1 - p) * chance
    share = _share_containing(p)
    assert abs(share - expected) < 3 * np.sqrt(expected * (1 - expected) / 4000)


def test_guided_crop_with_p_1_always_contains_the_object():
    assert _share_containing(1.0, n=500) == 1.0


def test_guided_crops_lie_inside_the_image():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [999.9, 599.9], [3.0, 590.0]])
    for _ in range(2000):
        y0, x0 = guided_crop(rng, (600, 1000), 256, centres, np.ones(3, bool), 0.7)
        assert 0 <= y0 <= 600 - 256 and 0 <= x0 <= 1000 - 256


def test_guided_crop_of_an_image_smaller_than_the_crop_is_at_the_origin():
    rng = np.random.default_rng(2)
    for p in (0.0, 1.0):
        assert guided_crop(rng, (100, 200), 256, np.array([[50.0, 50.0]]), np.array([True]), p) == (0, 0)


def test_guided_crop_without_wanted_objects_is_uniform():
    rng = np.random.default_rng(3)
    origins = [guided_crop(rng, (1000, 1000), 256, np.zeros((0, 2)), np.zeros(0, bool), 1.0) for _ in range(2000)]
    xs = np.array([x0 for _, x0 in origins])
    assert xs.min() < 50 and xs.max() > 1000 - 256 - 50  # spread over the whole range, not stuck
