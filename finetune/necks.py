"""Necks: a plain ViT's block outputs, all at stride ``patch``, turned into the multi-scale maps a dense
decoder wants.

:class:`UNetSkips` (UNETR, Hatamizadeh et al. 2022, arXiv 2103.10504; CellViT, Hörst et al. 2024,
arXiv 2306.15350): the block maps of :func:`ssl_path.encoder.feature_maps`, shallow to deep; the
deepest stays at stride ``patch``, each shallower one is brought ``2^k`` times finer by ``k``
transposed-conv steps, so a U-Net decoder finds a skip at strides ``patch``, ``patch/2``, ``patch/4``,
... Any input size the encoder accepts works: the maps are as large as the image's patch grid.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


def group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the most groups up to ``groups`` that divide ``channels``: unlike batch norm it
    keeps no running statistics, so it is the same at any batch size and on every DDP rank."""
    return nn.GroupNorm(next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0), channels)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 convolutions with group norm and ReLU: the U-Net's unit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        group_norm(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        group_norm(out_channels),
        nn.ReLU(inplace=True),
    )


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Twice finer: a 2x2 transposed convolution, then a 3x3 convolution."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        group_norm(out_channels),
        nn.ReLU(inplace=True),
    )


class UNetSkips(nn.Module):
    """``[B, embed_dim, h, w]`` maps, shallow to deep -> skips deep to shallow, the ``i``-th (from the
    deepest, ``i = 0``) ``[B, channels[i], h * 2^i, w * 2^i]``."""

    def __init__(self, embed_dim: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = tuple(channels)
        levels = []
        for i, width in enumerate(self.channels):
            steps: list[nn.Module] = [conv_block(embed_dim, width)] if i == 0 else []
            for k in range(i):
                steps.append(up_block(embed_dim if k == 0 else width, width))
            levels.append(nn.Sequential(*steps))
        self.levels = nn.ModuleList(levels)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        if len(maps) != len(self.levels):
            raise ValueError(f"UNetSkips takes {len(self.levels)} maps, got {len(maps)}")
        deep_first = list(maps)[::-1]
        return [level(m) for level, m in zip(self.levels, deep_first)]
