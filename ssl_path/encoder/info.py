"""What downstream code needs to know about an encoder, and the spatial maps dense heads read."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import timm
import torch
from torch import nn

from ssl_path.core.errors import UserError

DENSE_FEATURE_LEVELS = 4


@dataclass(frozen=True)
class EncoderInfo:
    """What downstream code needs to know about an encoder, whatever its source."""

    ref: str
    architecture: str
    embed_dim: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]
    num_blocks: int
    num_prefix_tokens: int
    dense_blocks: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def patch_size(vit: nn.Module) -> int:
    """The patch side of a timm ViT (timm stores an int or a pair)."""
    patch = vit.patch_embed.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def check_input_size(model: nn.Module, size: int, ref: str = "") -> None:
    """Refuse an image side a ViT cannot cut into whole patches (timm would assert deep in the forward)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "dynamic_img_pad", False):
        return
    patch = patch_size(model)
    if size % patch:
        raise UserError(f"input size {size} is not a multiple of the patch size {patch} of {ref or 'the encoder'}")


def encoder_info(model: nn.Module, ref: str = "") -> EncoderInfo:
    """Describe a timm model: dims, patching and normalisation from its ``pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    num_blocks, stride = _blocks_and_stride(model)
    return EncoderInfo(
        ref=ref,
        architecture=cfg.get("architecture") or type(model).__name__,
        embed_dim=int(getattr(model, "embed_dim", None) or model.num_features),
        patch_size=stride,
        mean=tuple(float(v) for v in cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)),
        input_size=tuple(int(v) for v in cfg.get("input_size", (3, 224, 224))),
        num_blocks=num_blocks,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        dense_blocks=default_dense_blocks(num_blocks),
    )


def default_dense_blocks(num_blocks: int, levels: int = DENSE_FEATURE_LEVELS) -> tuple[int, ...]:
    """Evenly spaced blocks ending at the last one, as ViTDet and UNETR tap a plain ViT.

    12 blocks -> (2, 5, 8, 11); 24 -> (5, 11, 17, 23).
    """
    levels = min(levels, num_blocks)
    step = num_blocks / levels
    return tuple(round(step * (i + 1)) - 1 for i in range(levels))


def feature_maps(
    model: nn.Module, images: torch.Tensor, blocks: Sequence[int], norm: bool = True
) -> list[torch.Tensor]:
    """Outputs of the chosen blocks as spatial maps, one ``[B, C, H/p, W/p]`` tensor per block.

    Prefix tokens (class, registers) are dropped; ``norm`` applies the encoder's final norm to
    each map, which keeps the scales of early and late blocks comparable for a dense head.
    Images whose size differs from the training size need a model built with ``dynamic_img_size``.
    """
    if not hasattr(model, "forward_intermediates"):
        raise UserError(f"{type(model).__name__} has no forward_intermediates; it cannot feed a dense head")
    return model.forward_intermediates(  # [B, C, H/p, W/p] each
        images, indices=list(blocks), norm=norm, output_fmt="NCHW", intermediates_only=True
    )


def _blocks_and_stride(model: nn.Module) -> tuple[int, int]:
    """Number of blocks and output stride: patch size for a ViT, last reduction for a CNN."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return len(model.blocks), patch_size(model)
    feature_info = getattr(model, "feature_info", None) or []
    if feature_info:
        return len(feature_info), int(feature_info[-1]["reduction"])
    raise UserError(f"{type(model).__name__} exposes neither ViT blocks nor timm feature_info")
