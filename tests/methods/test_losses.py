"""Self-distillation losses and teacher centring against hand-computed values and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_path.methods.losses import (
    SoftmaxCentering,
    dino_clstoken_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
)


def _softmax(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def _cross_entropy(target: list[float], logits: list[float], temperature: float) -> float:
    """-sum_k t_k log softmax(s / T)_k written out with plain floats."""
    log_norm = math.log(sum(math.exp(v / temperature) for v in logits))
    return -sum(t * (v / temperature - log_norm) for t, v in zip(target, logits))


# --- Sinkhorn-Knopp ---------------------------------------------------------------------------------


def _sinkhorn_reference(logits: np.ndarray, temperature: float, n_iterations: int) -> np.ndarray:
    """SwAV's algorithm in float64 numpy, written as plain matrix scalings."""
    q = np.exp(logits.astype(np.float64) / temperature).T  # [K, B]
    n_prototypes, n_samples = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(axis=1, keepdims=True) / n_prototypes
        q = q / q.sum(axis=0, keepdims=True) / n_samples
    return (q * n_samples).T


def test_sinkhorn_matches_reference() -> None:
    logits = np.array([[1.0, 0.5, -0.2, 0.0], [0.3, 2.0, 0.1, -1.0], [0.0, 0.0, 1.5, 0.7]])
    for n_iterations in (1, 3):
        got = sinkhorn_knopp(torch.tensor(logits), temperature=0.5, n_iterations=n_iterations)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), _sinkhorn_reference(logits, 0.5, n_iterations), rtol=1e-5)


def test_sinkhorn_one_iteration_by_hand() -> None:
    # B=2, K=2, temperature 1: Q = [[e^a, e^b], [e^c, e^d]] transposed. One iteration by hand: each
    # prototype's mass goes to 1/K, then each sample's to 1/B, then times B.
    a, b, c, d = 0.0, 1.0, 2.0, 0.5
    ea, eb, ec, ed = (math.exp(v) for v in (a, b, c, d))
    # Prototype 0 holds samples (ea, ec), prototype 1 holds (eb, ed); after the row step:
    p0 = (ea / (ea + ec), ec / (ea + ec))
    p1 = (eb / (eb + ed), ed / (eb + ed))
    sample0 = (p0[0] / (p0[0] + p1[0]), p1[0] / (p0[0] + p1[0]))
    sample1 = (p0[1] / (p0[1] + p1[1]), p1[1] / (p0[1] + p1[1]))
    got = sinkhorn_knopp(torch.tensor([[a, b], [c, d]]), temperature=1.0, n_iterations=1)
    np.testing.assert_allclose(got.numpy(), [sample0, sample1], rtol=1e-6)


def test_sinkhorn_equipartition_after_many_iterations() -> None:
    generator = torch.Generator().manual_seed(0)
    batch, prototypes = 12, 4
    logits = torch.randn(batch, prototypes, generator=generator) * 2
    probs = sinkhorn_knopp(logits, temperature=0.5, n_iterations=50)
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), np.ones(batch), rtol=1e-5)
    np.testing.assert_allclose(probs.sum(dim=0).numpy(), np.full(prototypes, batch / prototypes), rtol=1e-3)
    assert (probs >= 0).all()


def test_sinkhorn_n_samples_sets_the_global_count() -> None:
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    default = sinkhorn_knopp(logits, 0.3, n_iterations=4)
    explicit = sinkhorn_knopp(logits, 0.3, n_iterations=4, n_samples=torch.tensor(6))
    torch.testing.assert_close(default, explicit)
    # In one process the sample count only scales Q before the final rescaling: rows still sum to 1.
    scaled = sinkhorn_knopp(logits, 0.3, n_iterations=4, n_samples=12)
    torch.testing.assert_close(scaled, default)


def test_sinkhorn_shift_invariant_and_finite_for_huge_logits() -> None:
    # Multiples of 1/4 keep 1e4 + x exact in float32, so the shifted input is the same problem.
    small = torch.tensor([[0.25, -0.5, 1.0], [1.5, 0.0, -0.75], [-0.25, 0.75, 0.5]])
    shifted = sinkhorn_knopp(small + 1e4, temperature=0.5)
    torch.testing.assert_close(shifted, sinkhorn_knopp(small, temperature=0.5))
    huge = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)) * 1e4
    probs = sinkhorn_knopp(huge, temperature=0.04)
    assert torch.isfinite(probs).all()
    assert ((probs >= 0) & (probs <= 1 + 1e-6)).all()


def test_sinkhorn_bfloat16_input_gives_float32() -> None:
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    probs = sinkhorn_knopp(logits.bfloat16(), temperature=0.1)
    assert probs.dtype == torch.float32
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), np.ones(8), rtol=1e-5)


def test_sinkhorn_has_no_gradient() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    assert not sinkhorn_knopp(logits, 0.1).requires_grad


# --- SoftmaxCentering -------------------------------------------------------------------------------


def test_softmax_centering_forward_then_ema_update() -> None:
    centering = SoftmaxCentering(dim=3, momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # batch mean [2, 3, 4]
    probs = centering(logits, temperature=0.5)
    np.testing.assert_allclose(probs.numpy(), [_softmax([1, 2, 3], 0.5), _softmax([3, 4, 5], 0.5)], rtol=1e-6)
    assert torch.count_nonzero(centering.center) == 0  # forward leaves the centre alone

    centering.update(logits)
    np.testing.assert_allclose(centering.center.numpy(), [[0.2, 0.3, 0.4]], rtol=1e-6)
    centering.update(torch.tensor([[0.0, 10.0, -10.0]]))
    np.testing.assert_allclose(centering.center.numpy(), [[0.18, 1.27, -0.64]], rtol=1e-6)

    centred = centering(torch.tensor([[0.0, 0.0, 0.0]]), temperature=1.0)
    np.testing.assert_allclose(centred.numpy(), [_softmax([-0.18, -1.27, 0.64], 1.0)], rtol=1e-6)


def test_softmax_centering_float32_and_buffer() -> None:
    centering = SoftmaxCentering(dim=4)
    assert "center" in dict(centering.named_buffers())
    probs = centering(torch.randn(3, 4).bfloat16(), temperature=0.04)
    assert probs.dtype == torch.float32
    centering.update(torch.randn(2, 5, 4).bfloat16())  # [T, B, K] rows are flattened
    assert centering.center.dtype == torch.float32 and torch.isfinite(centering.center).all()


# --- DINO class-token loss --------------------------------------------------------------------------


def test_dino_loss_skips_same_view_pairs() -> None:
    # 2 global + 1 local student crops, 2 teacher crops, B=2, K=3: pairs (0,1), (1,0), (2,0), (2,1).
    temperature = 0.5
    student = [
        [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]],
        [[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]],
        [[0.3, -0.2, 0.9], [2.0, 1.0, 0.0]],
    ]
    teacher = [
        [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
        [[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]],
    ]
    pairs = [(0, 1), (1, 0), (2, 0), (2, 1)]
    expected = sum(_cross_entropy(teacher[t][b], student[s][b], temperature) for s, t in pairs for b in range(2)) / (
        len(pairs) * 2
    )
    got = dino_clstoken_loss(torch.tensor(student), torch.tensor(teacher), student_temperature=temperature)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Counting the same-view pairs too would give a different value: the exclusion matters here.
    with_same = expected * 8 + sum(
        _cross_entropy(teacher[v][b], student[v][b], temperature) for v in range(2) for b in range(2)
    )
    assert got.item() != pytest.approx(with_same / 12, rel=1e-3)


def test_dino_loss_n_global_zero_keeps_every_pair() -> None:
    student = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    teacher = torch.softmax(torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(5)), dim=-1)
    expected = (
        sum(_cross_entropy(teacher[0, b].tolist(), student[s, b].tolist(), 0.1) for s in range(2) for b in range(3)) / 6
    )
    got = dino_clstoken_loss(student, teacher, n_global=0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_gradient_and_low_precision() -> None:
    student = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(6)).bfloat16().requires_grad_()
    teacher = torch.softmax(torch.randn(2, 2, 8), dim=-1)
    loss = dino_clstoken_loss(student, teacher, student_temperature=0.01)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(student.grad.float()).all()


def test_dino_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        dino_clstoken_loss(torch.randn(3, 2, 4), torch.rand(2, 2, 5))
    with pytest.raises(ValueError):
        dino_clstoken_loss(torch.randn(1, 2, 4), torch.rand(1, 2, 4))  # no cross-view pair


# --- iBOT patch loss --------------------------------------------------------------------------------


def test_ibot_loss_weights_patches_per_image() -> None:
    # 3 images of 4 patches: image 0 has 1 masked patch, image 1 has 3, image 2 none.
    masks = torch.tensor([[False, True, False, False], [True, False, True, True], [False, False, False, False]])
    temperature = 0.2
    student = [[1.0, 0.0, 0.5], [0.0, 0.0, 1.0], [2.0, -1.0, 0.0], [0.5, 0.5, 0.5]]
    teacher = [[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25], [0.1, 0.7, 0.2]]
    ce = [_cross_entropy(t, s, temperature) for s, t in zip(student, teacher)]
    expected = (ce[0] / 1 + (ce[1] + ce[2] + ce[3]) / 3) / 3
    got = ibot_patch_loss(torch.tensor(student), torch.tensor(teacher), masks, student_temperature=temperature)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ibot_loss_without_masked_patches_is_connected_zero() -> None:
    student = torch.zeros(0, 5, requires_grad=True)
    loss = ibot_patch_loss(student, torch.zeros(0, 5), torch.zeros(2, 9, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.shape == (0, 5)


def test_ibot_loss_float32_for_bfloat16() -> None:
    masks = torch.tensor([[True, True], [False, True]])
    student = torch.randn(3, 6).bfloat16().requires_grad_()
    loss = ibot_patch_loss(student, torch.softmax(torch.randn(3, 6), -1).bfloat16(), masks, 0.05)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(student.grad.float()).all()


# --- KoLeo ------------------------------------------------------------------------------------------


def test_koleo_hand_value_three_points() -> None:
    # Unit vectors at 0, 60 and 150 degrees (scaled, to check the normalisation). Nearest neighbours:
    # 0 -> 60 (chord 1), 60 -> 0 (chord 1), 150 -> 60 (90 degrees apart, chord sqrt 2).
    angles = [0.0, 60.0, 150.0]
    scales = [1.0, 3.0, 0.5]
    points = [[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in zip(angles, scales)]
    expected = -(math.log(1.0) + math.log(1.0) + math.log(math.sqrt(2.0))) / 3
    assert koleo_loss(torch.tensor(points)).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_finite_with_duplicates_and_bfloat16() -> None:
    features = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    features[1] = features[0]
    features.requires_grad_()
    loss = koleo_loss(features)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(features.grad).all()

    pair = torch.randn(1, 16).repeat(2, 1).bfloat16().requires_grad_()  # B == 2, identical rows
    loss = koleo_loss(pair)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(pair.grad.float()).all()


def test_koleo_prefers_spread_features() -> None:
    spread = torch.eye(4)
    clumped = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.0, 0.0], [1.0, 0.0, 0.1, 0.0], [1.0, 0.0, 0.0, 0.1]])
    assert koleo_loss(spread).item() < koleo_loss(clumped).item()
    # Orthonormal rows: every nearest-neighbour distance is sqrt 2.
    assert koleo_loss(spread).item() == pytest.approx(-0.5 * math.log(2.0), abs=1e-6)


def test_koleo_single_row_is_connected_zero() -> None:
    features = torch.randn(1, 8, requires_grad=True)
    loss = koleo_loss(features)
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad is not None
