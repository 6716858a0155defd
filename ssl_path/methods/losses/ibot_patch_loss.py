"""iBOT's patch-level self-distillation loss: masked image modelling with an online tokenizer.

iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", arXiv:2111.07832), as
used in DINOv2 (Oquab et al. 2023, arXiv:2304.07193): some patches of the student's global crops are
replaced by a mask token, and for each masked patch the student predicts the teacher's distribution
for that patch, which the teacher computed from the unmasked crop.

Normalisation follows DINOv2: a patch's cross-entropy is weighted by 1 / (masked patches in its
image), so every masked image counts once however much of it was masked, and the sum is divided by
the number of images including the unmasked ones, so the loss scale follows the masking probability.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ibot_patch_loss"]


def ibot_patch_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    masks: Tensor,
    student_temperature: float = 0.1,
) -> Tensor:
    """Per-image-weighted cross-entropy over masked patches; a float32 scalar.

    ``masks`` is bool [N, P] over the N global-crop images of the batch and their P patches.
    ``student_logits`` and ``teacher_probs`` are [M, K] for the M = ``masks.sum()`` masked patches in
    the order of ``x[masks]`` (image by image). With no masked patch the result is a zero that is still
    connected to ``student_logits``, so a backward pass works on every rank.
    """
    if masks.ndim != 2:
        raise ValueError(f"masks must be [N images, P patches], got shape {tuple(masks.shape)}")
    if student_logits.ndim != 2 or student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"expected student_logits and teacher_probs both [M, K], got shapes "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if student_temperature <= 0:
        raise ValueError(f"student_temperature must be > 0, got {student_temperature}")
    n_masked = student_logits.shape[0]
    if n_masked == 0:
        return student_logits.float().sum() * 0.0

    log_probs = torch.log_softmax(student_logits.float() / student_temperature, dim=-1)
    per_patch = -(teacher_probs.float() * log_probs).sum(dim=-1)  # [M]

    masked_per_image = masks.bool().sum(dim=1)  # [N]
    image_weight = 1.0 / masked_per_image.clamp_min(1).float()
    # Masked patches come image by image, so each image's weight repeats once per masked patch;
    # giving output_size (known from the logits) spares a device-to-host sync on the mask count.
    patch_weight = torch.repeat_interleave(image_weight, masked_per_image, output_size=n_masked)
    return (per_patch * patch_weight).sum() / masks.shape[0]
