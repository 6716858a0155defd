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


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022, arXiv 2203.16527, section 3): the last block's
    map alone, at stride 16, made 4x and 2x finer by transposed convolutions, kept, and pooled 2x; each
    level then a 1x1 and a 3x3 convolution with layer norm to ``channels``; and one more level max-pooled
    from the coarsest. Out: ``{"p2": stride 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}``.

    An encoder whose patch is not 16 (DINOv2's 14) is first resampled onto the stride-16 grid, so the
    strides are powers of two as torchvision's anchor generator and RoI pooling assume; the resampling
    keeps token centres where they are in the image (``align_corners=False`` at scale ``patch / 16``).
    """

    names = ("p2", "p3", "p4", "p5", "p6")
    strides = (4, 8, 16, 32, 64)

    def __init__(self, embed_dim: int, patch_size: int, channels: int = 256) -> None:
        super().__init__()
        from timm.layers import LayerNorm2d

        self.patch_size, self.out_channels = patch_size, channels
        half, quarter = embed_dim // 2, embed_dim // 4
        self.resample = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(embed_dim, half, 2, stride=2),
                    LayerNorm2d(half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, stride=2),
                ),
                nn.ConvTranspose2d(embed_dim, half, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, stride=2),
            ]
        )
        widths = (quarter, half, embed_dim, embed_dim)
        self.output = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, channels, 1, bias=False),
                LayerNorm2d(channels),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                LayerNorm2d(channels),
            )
            for width in widths
        )

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        if self.patch_size != 16:
            tokens = nn.functional.interpolate(
                tokens, scale_factor=self.patch_size / 16, mode="bilinear", recompute_scale_factor=False
            )
        levels = [out(resample(tokens)) for resample, out in zip(self.resample, self.output)]
        levels.append(nn.functional.max_pool2d(levels[-1], kernel_size=1, stride=2))
        return dict(zip(self.names, levels))
