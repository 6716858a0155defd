"""Optimiser parameter groups for ViT pretraining: layer-wise lr decay, patch-embedding lr, no decay on norms.

Groups are built from parameter names alone (timm's ViT naming), so the loop needs nothing from the
method but its trainable parameters. As in dinov2 (``get_params_groups_with_decay``):

- layer id: 0 for the patch embedding, position embedding and prefix/mask tokens, ``i + 1`` for
  ``blocks.i``, and ``num_blocks + 1`` for everything after the trunk (final norm, heads);
  lr multiplier ``layerwise_decay ** (num_blocks + 1 - layer_id)``;
- the patch embedding's multiplier is further scaled by ``patch_embed_lr_mult``;
- biases, norms and layer-scale gammas have no weight decay (by name, and every 1-D parameter, so a
  head's ``nn.Sequential``-numbered batch norms too);
- ``tag(name)`` splits groups further for a task's own rules (DINOv2 freezes its heads' last layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")


@dataclass(frozen=True)
class ParamRule:
    lr_multiplier: float
    wd_multiplier: float


def num_trunk_blocks(names: Iterable[str]) -> int:
    ids = [int(m.group(1)) for name in names if (m := _BLOCK.search(name))]
    return max(ids) + 1 if ids else 0


def param_rule(name: str, num_blocks: int, layerwise_decay: float, patch_embed_lr_mult: float) -> ParamRule:
    match = _BLOCK.search(name)
    if match:
        layer = int(match.group(1)) + 1
    elif any(part in name for part in _EMBED):
        layer = 0
    else:
        layer = num_blocks + 1
    lr = layerwise_decay ** (num_blocks + 1 - layer)
    if "patch_embed" in name:
        lr *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
    return ParamRule(lr, 0.0 if no_decay else 1.0)


def param_groups(
    module: nn.Module,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    tag: Callable[[str], str] = lambda name: "",
) -> list[dict[str, Any]]:
    """One optimiser group per distinct (rule, tag) over ``module``'s trainable parameters."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    num_blocks = num_trunk_blocks(n for n, _ in named)
    groups: dict[tuple[ParamRule, str], dict[str, Any]] = {}
    for name, param in named:
        rule = param_rule(name, num_blocks, layerwise_decay, patch_embed_lr_mult)
        if param.ndim <= 1:  # every bias, norm scale and layer-scale gamma, however its module is named
            rule = ParamRule(rule.lr_multiplier, 0.0)
        group = groups.setdefault(
            (rule, tag(name)),
            {
                "params": [],
                "names": [],
                "lr_multiplier": rule.lr_multiplier,
                "wd_multiplier": rule.wd_multiplier,
                "tag": tag(name),
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())
