"""finetune.metrics: pixel Dice/IoU and their empty cases, GlaS object F1/Dice/Hausdorff and AJI on
hand-computed examples, and the same metrics on a real MoNuSeg mask."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from finetune.metrics import (
    aji,
    aji_plus,
    instance_metrics,
    instances,
    object_scores,
    pixel_scores,
    segmentation_metrics,
)


def _box(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int], value=True) -> np.ndarray:
    out = np.zeros(shape, dtype=bool if value is True else np.int32)
    out[rows[0] : rows[1], cols[0] : cols[1]] = value
    return out


SQUARE = _box((10, 10), (2, 6), (2, 6))  # 16 pixels

# ----------------------------------------------------------------------------- pixels


def test_empty_truth_and_empty_prediction_score_one_and_a_false_alarm_zero():
    empty = np.zeros((8, 8), bool)
    assert pixel_scores(empty, empty) == {"dice": 1.0, "iou": 1.0}
    assert pixel_scores(SQUARE, np.zeros_like(SQUARE)) == {"dice": 0.0, "iou": 0.0}
    assert pixel_scores(np.zeros_like(SQUARE), SQUARE) == {"dice": 0.0, "iou": 0.0}


def test_a_wrong_mask_never_scores_dice_one():
    wrong = _box((10, 10), (6, 10), (6, 10))
    for pred in (wrong, np.zeros_like(SQUARE), ~SQUARE, np.ones_like(SQUARE), SQUARE[::-1, ::-1] | SQUARE):
        assert pixel_scores(pred, SQUARE)["dice"] < 1.0
    assert pixel_scores(wrong, SQUARE)["dice"] == 0.0
    assert pixel_scores(SQUARE.astype(np.uint8), SQUARE) == {"dice": 1.0, "iou": 1.0}


@pytest.mark.parametrize(
    "shift, dice, iou",
    [
        ((0, 1), 24 / 32, 12 / 20),  # 4x3 = 12 shared: Dice 2*12 / (16+16), IoU 12 / (32-12)
        ((0, 2), 16 / 32, 8 / 24),  # 4x2 = 8 shared
        ((1, 1), 18 / 32, 9 / 23),  # 3x3 = 9 shared
    ],
)
def test_shifted_square_dice_and_iou(shift, dice, iou):
    scores = pixel_scores(np.roll(SQUARE, shift, axis=(0, 1)), SQUARE)
    # exactly the fractions: a results file says 0.6, not float32's 0.6000000238418579
    assert scores == {"dice": dice, "iou": iou}


def test_segmentation_metrics_mean_and_pooled_over_images_of_two_sizes():
    # image 1 (10x10): tumour shifted by one column (Dice 0.75, IoU 0.6), stroma absent and not predicted (1).
    # image 2 (6x8): a 4-pixel tumour missed (0), a 4-pixel stroma found exactly (1).
    small = _box((6, 8), (0, 2), (0, 2))
    preds = [np.stack([np.roll(SQUARE, 1, axis=1), np.zeros_like(SQUARE)]), np.stack([np.zeros_like(small), small])]
    truths = [np.stack([SQUARE, np.zeros_like(SQUARE)]), np.stack([small, small])]
    out = segmentation_metrics(preds, truths, ["tumour", "stroma"])
    assert out["tumour"]["dice"] == pytest.approx((0.75 + 0.0) / 2)
    assert out["tumour"]["iou"] == pytest.approx((0.6 + 0.0) / 2)
    assert out["tumour"]["dice_pooled"] == pytest.approx(2 * 12 / (16 + 16 + 0 + 4))
    assert out["stroma"] == {"dice": 1.0, "iou": 1.0, "dice_pooled": 1.0, "n": 2}
    with pytest.raises(ValueError):
        segmentation_metrics(preds, [truths[0], truths[1][:, :4]], ["tumour", "stroma"])
    with pytest.raises(ValueError):
        segmentation_metrics(preds, truths, ["tumour"])
    with pytest.raises(ValueError):
        pixel_scores(SQUARE.astype(np.float32), SQUARE)  # probabilities are not a mask


# ----------------------------------------------------------------------------- objects


def test_instances_are_8_connected():
    diagonal = np.eye(3, dtype=bool)
    apart = np.array([[1, 0, 1]], dtype=bool)
    assert instances(diagonal).max() == 1
    assert instances(apart).tolist() == [[1, 0, 2]]
    assert instances(diagonal).dtype == np.int32


def test_empty_cases_of_the_object_metrics():
    empty = np.zeros((10, 10), np.int32)
    one = SQUARE.astype(np.int32)
    both = object_scores(empty, empty)
    assert (both["object_f1"], both["object_dice"], both["object_hausdorff"]) == (1.0, 1.0, None)
    assert (both["object_precision"], both["object_recall"]) == (1.0, 1.0)
    missed = object_scores(empty, one)
    assert (missed["object_f1"], missed["object_dice"], missed["object_hausdorff"]) == (0.0, 0.0, None)
    assert (missed["object_precision"], missed["object_recall"]) == (None, 0.0)
    false_alarm = object_scores(one, empty)
    assert (false_alarm["object_precision"], false_alarm["object_recall"]) == (0.0, None)
    assert aji(empty, empty) == aji_plus(empty, empty) == 1.0
    assert aji(empty, one) == aji(one, empty) == 0.0
    json.dumps([both, missed, false_alarm], allow_nan=False)


def test_one_perfect_object_with_another_label():
    scores = object_scores(SQUARE * 7, SQUARE.astype(np.int32))
    assert (scores["object_f1"], scores["object_dice"], scores["object_hausdorff"]) == (1.0, 1.0, 0.0)
    assert aji(SQUARE * 7, SQUARE.astype(np.int32)) == 1.0


def test_shifted_square_objects():
    truth = SQUARE.astype(np.int32)
    by_one = object_scores(np.roll(truth, 1, axis=1), truth)
    # covers 12/16 > 50 % of the GT object: a true positive; Dice 0.75; every pixel within 1 of the other.
    assert by_one["object_f1"] == 1.0
    assert by_one["object_dice"] == pytest.approx(0.75)
    assert by_one["object_hausdorff"] == pytest.approx(1.0)
    assert aji(np.roll(truth, 1, axis=1), truth) == pytest.approx(12 / 20)
    by_two = object_scores(np.roll(truth, 2, axis=1), truth)
    # covers exactly 8/16 = 50 %, not more: one false positive and one false negative.
    assert (by_two["tp"], by_two["object_f1"]) == (0, 0.0)
    assert by_two["object_dice"] == pytest.approx(0.5)
    assert by_two["object_hausdorff"] == pytest.approx(2.0)
    diagonal = object_scores(np.roll(truth, (1, 1), axis=(0, 1)), truth)
    assert diagonal["object_hausdorff"] == pytest.approx(math.sqrt(2))


def test_two_touching_objects_merged_into_one_prediction():
    # GT: A = rows 0-3 x cols 0-3 (label 1) and B = rows 0-3 x cols 4-7 (label 2), 16 px each, touching.
    # Prediction: one object S = A ∪ B, 32 px.
    # F1: S overlaps A and B equally (tie -> A), covers 100 % of A: 1 TP; 1 prediction, 2 GT -> 2*1/(1+2).
    # Dice: S-side 1 * D(S, A) = 2*16/(32+16) = 2/3; GT side 0.5 * 2/3 + 0.5 * 2/3 = 2/3 -> 2/3.
    # Hausdorff: H(S, A) = H(S, B) = 4 (column 7 to column 3) on both sides -> 4.
    # AJI (the paper, HoVer-Net get_fast_aji): S is the best match of both: (16 + 16) / (32 + 32) = 0.5.
    # AJI+ (one-to-one): S pairs with A only, B adds its 16 px to the union: 16 / (32 + 16) = 1/3.
    truth = np.zeros((4, 8), np.int32)
    truth[:, :4], truth[:, 4:] = 1, 2
    pred = instances(truth > 0)
    assert pred.max() == 1
    scores = object_scores(pred, truth)
    assert scores["object_f1"] == pytest.approx(2 / 3)
    assert (scores["object_precision"], scores["object_recall"]) == (1.0, 0.5)
    assert scores["object_dice"] == pytest.approx(2 / 3)
    assert scores["object_hausdorff"] == pytest.approx(4.0)
    assert aji(pred, truth) == pytest.approx(0.5)
    assert aji_plus(pred, truth) == pytest.approx(1 / 3)


def _glas_example() -> tuple[np.ndarray, np.ndarray]:
    """Two GT and two predicted objects of different sizes on a 20x40 image, (row, col) pixels:

    G1 = rows 0-9 x cols 0-9 (100 px), G2 = rows 12-15 x cols 0-4 (20 px);
    S1 = rows 0-9 x cols 0-7 (80 px, inside G1), S2 = rows 0-1 x cols 30-31 (4 px, touches no GT).
    """
    truth = _box((20, 40), (0, 10), (0, 10), 1) + _box((20, 40), (12, 16), (0, 5), 2)
    pred = _box((20, 40), (0, 10), (0, 8), 1) + _box((20, 40), (0, 2), (30, 32), 2)
    return pred, truth


def test_glas_object_dice_and_hausdorff_weight_objects_by_area():
    pred, truth = _glas_example()
    scores = object_scores(pred, truth)
    # F1: S1 covers 80 % of G1 (TP), S2 is a FP, G2 a FN: P = R = F1 = 1/2.
    assert (scores["tp"], scores["object_f1"], scores["object_precision"]) == (1, 0.5, 0.5)
    # Dice: D(G1, S1) = 2*80/180 = 8/9; S2 and G2 have no partner (0).
    # prediction side 80/84 * 8/9, GT side 100/120 * 8/9 -> (160/189 + 140/189) / 2 = 50/63.
    assert scores["object_dice"] == pytest.approx(50 / 63)
    # Hausdorff: H(G1, S1) = 2 (column 9 to column 7).
    # S2 has no overlap: nearest GT by Hausdorff is G1 (√964: G1's (9, 0) to S2's (1, 30)),
    #   not G2 (√1096: G2's (15, 0) to S2's (1, 30)).
    # G2 has no overlap: nearest prediction is S1 (√153: S1's (0, 7) to G2's (12, 4)), not S2 (√1096).
    pred_side = (80 * 2 + 4 * math.sqrt(964)) / 84
    truth_side = (100 * 2 + 20 * math.sqrt(153)) / 120
    assert scores["object_hausdorff"] == pytest.approx((pred_side + truth_side) / 2)


def test_aji_with_an_unmatched_prediction_and_an_unmatched_truth():
    # G1 ~ S1: intersection 80, union 100; G2 overlaps nothing: +20 to the union; S2 unused: +4.
    pred, truth = _glas_example()
    assert aji(pred, truth) == pytest.approx(80 / (100 + 20 + 4))
    assert aji_plus(pred, truth) == pytest.approx(80 / 124)


def test_instance_metrics_average_where_defined_and_pool_aji():
    # image 1: the square shifted by one column (F1 1, Dice 0.75, Hausdorff 1, AJI 12/20);
    # image 2: nothing to find, nothing found (F1 1, Dice 1, Hausdorff undefined, AJI 1).
    truth = SQUARE.astype(np.int32)
    empty = np.zeros((5, 7), np.int32)
    out = instance_metrics([np.roll(truth, 1, axis=1), empty], [truth, empty])
    assert out["object_f1"] == 1.0
    assert out["object_dice"] == pytest.approx((0.75 + 1.0) / 2)
    assert (out["object_hausdorff"], out["n_hausdorff"]) == (pytest.approx(1.0), 1)
    assert out["aji"] == pytest.approx((0.6 + 1.0) / 2)
    assert out["aji_pooled"] == pytest.approx(12 / 20)
    assert (out["object_f1_pooled"], out["object_dice_pooled"]) == (1.0, pytest.approx(0.75))
    assert out["object_hausdorff_pooled"] == pytest.approx(1.0)
    assert out["n"] == 2
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError):
        instance_metrics([truth], [truth[:, :5]])
    with pytest.raises(ValueError):
        object_scores(SQUARE, truth)  # a boolean mask is not an instance map


def test_pooled_object_scores_weight_objects_across_images():
    # GlaS defines its scores over all objects of the test set. Image A is the GlaS example above
    # (TP 1 of 2 + 2 objects; area-weighted Dice sums 80 * 8/9 over 84 px predicted, 100 * 8/9 over
    # 120 px GT); image B the square shifted by one column (TP 1 of 1 + 1; Dice 0.75 over 16 + 16 px).
    pred_a, truth_a = _glas_example()
    truth_b = SQUARE.astype(np.int32)
    out = instance_metrics([pred_a, np.roll(truth_b, 1, axis=1)], [truth_a, truth_b])
    assert out["object_f1"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["object_f1_pooled"] == pytest.approx(2 * 2 / 6)
    pred_side = (80 * 8 / 9 + 16 * 0.75) / (84 + 16)
    truth_side = (100 * 8 / 9 + 16 * 0.75) / (120 + 16)
    assert out["object_dice_pooled"] == pytest.approx((pred_side + truth_side) / 2)
    assert out["object_dice"] == pytest.approx((50 / 63 + 0.75) / 2)


def test_real_monuseg_mask(shared_data):
    mask = np.asarray(Image.open(next((shared_data / "monuseg_kumar_norm" / "GroundTruthInside").glob("*.png")))) > 0
    truth = instances(mask)
    assert 100 < truth.max() < 2000
    # the same nuclei under shuffled labels: perfect on every metric
    order = np.random.default_rng(0).permutation(int(truth.max())) + 1
    relabelled = np.concatenate([[0], order]).astype(np.int32)[truth]
    same = instance_metrics([relabelled], [truth])
    assert (same["object_f1"], same["object_dice"], same["object_hausdorff"], same["aji"]) == (1.0, 1.0, 0.0, 1.0)
    # the nuclei moved by 3 pixels: every score worse, none perfect
    moved = instance_metrics([np.roll(truth, 3, axis=1)], [truth])
    assert moved["object_dice"] < 0.9 and moved["aji"] < 0.8 and moved["object_hausdorff"] >= 3.0
