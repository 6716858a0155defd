"""The geometric part of augmentation, per sample on uint8: random resized crop boxes, and crops
resized with flips and 90-degree rotations (tissue has no preferred orientation).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def sample_crop_boxes(
    rng: np.random.Generator,
    height: int,
    width: int,
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> np.ndarray:
    """``n`` random-resized-crop boxes ``[n, 4]`` as (top, left, h, w), drawn as in Szegedy et al. 2015.

    Each box takes the first of ``attempts`` (area fraction, log aspect) draws that fits in the image;
    a box with no fitting draw falls back to the largest centred crop within ``ratio``.
    """
    area = height * width
    target = area * rng.uniform(scale[0], scale[1], (n, attempts))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, attempts)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    h, w, ok = h[rows, first], w[rows, first], fits[rows, first]
    # Fallback: whole image, trimmed to the nearest aspect ratio in range.
    in_ratio = width / height
    fb_w = width if in_ratio <= ratio[1] else int(round(height * ratio[1]))
    fb_h = height if in_ratio >= ratio[0] else int(round(width / ratio[0]))
    fb_w, fb_h = min(fb_w, width), min(fb_h, height)
    h, w = np.where(ok, h, fb_h), np.where(ok, w, fb_w)
    pos = rng.random((n, 2))
    top = np.where(ok, np.floor(pos[:, 0] * (height - h + 1)), (height - h) // 2).astype(np.int64)
    left = np.where(ok, np.floor(pos[:, 1] * (width - w + 1)), (width - w) // 2).astype(np.int64)
    return np.stack([top, left, h, w], axis=1)


def crop_resize_orient(
    image: Tensor,
    boxes: np.ndarray,
    size: int,
    hflip: np.ndarray,
    vflip: np.ndarray,
    rot90: np.ndarray,
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
) -> Tensor:
    """Crop each box of a uint8 [3, H, W] image, resize to ``size``, flip and rotate: uint8 [n, 3, size, size]."""
    out = torch.empty((len(boxes), 3, size, size), dtype=torch.uint8)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=interpolation, antialias=True)
        dims = [d for d, flip in ((2, hflip[i]), (1, vflip[i])) if flip]
        if dims:
            crop = crop.flip(dims)
        if rot90[i]:
            crop = crop.rot90(int(rot90[i]), (1, 2))
        out[i].copy_(crop)
    return out
