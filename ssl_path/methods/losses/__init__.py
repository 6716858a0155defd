"""Self-distillation losses of DINO / iBOT / DINOv2, one per module, plus teacher-side centring."""

from __future__ import annotations

from ssl_path.methods.losses.centering import SoftmaxCentering, sinkhorn_knopp
from ssl_path.methods.losses.dino_clstoken_loss import dino_clstoken_loss
from ssl_path.methods.losses.ibot_patch_loss import ibot_patch_loss
from ssl_path.methods.losses.koleo_loss import koleo_loss

__all__ = [
    "SoftmaxCentering",
    "sinkhorn_knopp",
    "dino_clstoken_loss",
    "ibot_patch_loss",
    "koleo_loss",
]
