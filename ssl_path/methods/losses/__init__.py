"""Pretraining losses, one per module: self-distillation of DINO / iBOT / DINOv2 with teacher-side
centring, and MAE's pixel reconstruction."""

from __future__ import annotations

from ssl_path.methods.losses.centering import SoftmaxCentering, sinkhorn_knopp
from ssl_path.methods.losses.dino_clstoken_loss import dino_clstoken_loss
from ssl_path.methods.losses.ibot_patch_loss import ibot_patch_loss
from ssl_path.methods.losses.koleo_loss import koleo_loss
from ssl_path.methods.losses.pixel_reconstruction_loss import normalized_patches, pixel_reconstruction_loss

__all__ = [
    "SoftmaxCentering",
    "sinkhorn_knopp",
    "dino_clstoken_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "normalized_patches",
    "pixel_reconstruction_loss",
]
