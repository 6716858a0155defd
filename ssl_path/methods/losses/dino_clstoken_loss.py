"""DINO's image-level self-distillation loss on the class token, across multi-crop views.

DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
arXiv:2104.14294), kept as-is in DINOv2 (Oquab et al. 2023, arXiv:2304.07193): the teacher sees only
the global crops, the student sees global and local crops, and every student view is trained to
predict the teacher's (centred, sharpened) distribution of every *other* view of the same image with
a cross-entropy. A student global crop is not matched to the teacher's copy of the same crop, which
would be trivial. With 2 global and 8 local crops that is 2 * 1 + 8 * 2 = 18 pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dino_clstoken_loss"]


def dino_clstoken_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    student_temperature: float = 0.1,
    n_global: int | None = None,
) -> Tensor:
    """Mean cross-entropy between teacher targets and student predictions over all cross-view pairs.

    ``student_logits`` is [S, B, K]: S student crops, the first ``n_global`` being the global crops in
    the teacher's order, then the local crops. ``teacher_probs`` is [T, B, K], the teacher's target
    distributions (e.g. from :class:`SoftmaxCentering` or :func:`sinkhorn_knopp`) for its T global
    crops. Pair (student s, teacher t) is skipped when ``s == t < n_global``; ``n_global`` defaults to
    T. Returns the float32 scalar mean over the batch and the remaining pairs.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(
            f"expected student_logits [S, B, K] and teacher_probs [T, B, K], got shapes "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_probs "
            f"{tuple(teacher_probs.shape)} disagree on [B, K]"
        )
    if student_temperature <= 0:
        raise ValueError(f"student_temperature must be > 0, got {student_temperature}")
    n_student, batch_size, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    n_global = n_teacher if n_global is None else n_global
    if not 0 <= n_global <= n_student:
        raise ValueError(f"n_global must be in [0, {n_student}] (student crops), got {n_global}")
    n_same_view = min(n_global, n_teacher)
    n_pairs = n_student * n_teacher - n_same_view
    if n_pairs < 1 or batch_size < 1:
        raise ValueError(f"no cross-view pairs: {n_student} student, {n_teacher} teacher crops, B={batch_size}")

    log_probs = torch.log_softmax(student_logits.float() / student_temperature, dim=-1)
    targets = teacher_probs.float()
    # Cross-entropy is linear in the target, so each student view can be scored once against the sum
    # of the teacher views it is paired with: O(S*B*K) instead of O(S*T*B*K). For a global view that
    # sum leaves its own teacher view out (elementwise, so no cancellation between large totals).
    all_views = targets.sum(dim=0)
    paired = (log_probs[n_same_view:] * all_views).sum()
    if n_same_view > 0:
        paired = paired + (log_probs[:n_same_view] * (all_views - targets[:n_same_view])).sum()
    return -paired / (n_pairs * batch_size)
