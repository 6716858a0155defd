"""The backbone every method trains: a timm ViT built by name and keyword arguments, never a private
copy, and :class:`MaskedViT`, the one place that walks a timm ViT's tokens itself (to replace
masked patches by a mask token, as iBOT does, or to keep a subset of patches, as MAE does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.layers import DropPath
from torch import Tensor, nn

from ssl_path.core.errors import ConfigError, UserError
from ssl_path.encoder.state import encoder_state, published_kwargs


@dataclass(frozen=True)
class ModelConfig:
    """A timm architecture and its keyword arguments (``img_size``, ``reg_tokens``, ``init_values``...)."""

    arch: str = "vit_small_patch16_224"
    kwargs: dict = field(default_factory=lambda: {"reg_tokens": 4, "init_values": 1.0e-5, "drop_path_rate": 0.3})
    drop_path_uniform: bool = True  # dinov2: the same drop-path rate in every block, not timm's linear ramp

    def __post_init__(self) -> None:
        # A name lookup, so a typo fails with the config rather than after the run dir is made.
        if not timm.is_model(self.arch):
            raise ConfigError(f"arch {self.arch!r} is not a timm architecture (see timm.list_models())")


def build_vit(model: ModelConfig) -> nn.Module:
    """The timm ViT of ``model`` (``num_classes=0``, ``dynamic_img_size`` so crops of any size fit)."""
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
    return kwargs if training else published_kwargs(kwargs)


def published_encoder(
    vit: nn.Module,
    model: ModelConfig,
    model_state: dict[str, Tensor] | None,
    prefix: str,
    input_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> dict[str, Any]:
    """The encoder entry of ``vit``: its weights from ``model_state`` (a method's whole state dict,
    the keys under ``prefix``) or from ``vit`` itself, with the resolution and normalisation it learned at."""
    weights = (
        None if model_state is None else {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    )
    state = encoder_state(vit, model.arch, encoder_kwargs(model), state_dict=weights)
    state["pretrained_cfg"]["input_size"] = (3, input_size, input_size)  # whatever timm's default
    state["pretrained_cfg"]["mean"], state["pretrained_cfg"]["std"] = mean, std
    return state


class MaskedViT(nn.Module):
    """A timm ViT whose patch tokens can be masked (replaced by a learned token before the position
    embedding; iBOT) or subsampled (only ``keep`` patches, chosen after the position embedding; MAE).

    ``mask_token=False`` leaves out the mask token for a method that only subsamples: a parameter
    that never gets a gradient would stall DDP.
    """

    def __init__(self, vit: nn.Module, mask_token: bool = True) -> None:
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim)) if mask_token else None

    def forward(self, images: Tensor, masks: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (prefix tokens [B, prefix, D]: the class token first, then registers; patch tokens [B, P or K, D]).

        ``masks``: bool [B, P], True where a patch is replaced by the mask token.
        ``keep``: long [B, K], the patch indices to keep (the other patches are dropped).
        One ``forward``, no other entry point: FSDP gathers a module's shards around its forward only.
        """
        vit = self.vit
        x = vit.patch_embed(images)  # [B, H, W, D] with dynamic_img_size, else [B, P, D]
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this MaskedViT was built without a mask token")
            x = torch.where(masks.view(*x.shape[:-1], 1), self.mask_token.to(x.dtype), x)
        x = vit._pos_embed(x)  # [B, prefix + P, D]
        prefix = vit.num_prefix_tokens
        if keep is not None:
            patches = torch.gather(x[:, prefix:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, D]
            x = torch.cat([x[:, :prefix], patches], dim=1)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        return x[:, :prefix], x[:, prefix:]
