"""The backbone every method trains: a timm ViT built by name and keyword arguments, never a private copy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
from timm.layers import DropPath
from torch import nn

from ssl_path.errors import UserError

# Model kwargs that shape training only; the published encoder is built without them.
TRAINING_ONLY_KWARGS = ("drop_path_rate",)


@dataclass(frozen=True)
class ModelConfig:
    """A timm architecture and its keyword arguments (``img_size``, ``reg_tokens``, ``init_values``...)."""

    arch: str = "vit_small_patch16_224"
    kwargs: dict = field(default_factory=lambda: {"reg_tokens": 4, "init_values": 1.0e-5, "drop_path_rate": 0.3})
    drop_path_uniform: bool = True  # dinov2: the same drop-path rate in every block, not timm's linear ramp


def build_vit(model: ModelConfig) -> nn.Module:
    """The timm ViT of ``model`` (``num_classes=0``, ``dynamic_img_size`` so crops of any size fit)."""
    if not timm.is_model(model.arch):
        raise UserError(f"model.arch {model.arch!r} is not a timm architecture")
    try:
        vit = timm.create_model(model.arch, pretrained=False, num_classes=0, **encoder_kwargs(model, training=True))
    except TypeError as err:
        raise UserError(f"model.kwargs do not fit {model.arch}: {err}") from None
    if not (hasattr(vit, "blocks") and hasattr(vit, "patch_embed") and hasattr(vit, "_pos_embed")):
        raise UserError(f"model.arch {model.arch!r} is not a timm VisionTransformer")
    rate = float(model.kwargs.get("drop_path_rate", 0.0))
    if model.drop_path_uniform and rate > 0:
        for block in vit.blocks:
            block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)
    return vit


def encoder_kwargs(model: ModelConfig, training: bool = False) -> dict[str, Any]:
    """timm kwargs of the backbone; without ``training`` the ones the published encoder is built with."""
    kwargs = {"dynamic_img_size": True, **model.kwargs}
    if not training:
        for key in TRAINING_ONLY_KWARGS:
            kwargs.pop(key, None)
    return kwargs


def patch_size(vit: nn.Module) -> int:
    patch = vit.patch_embed.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)
