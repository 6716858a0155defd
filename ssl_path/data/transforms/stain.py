"""Stain normalisation as a transform on uint8 [3, H, W] tensors (the numpy methods: :mod:`ssl_path.data.stain`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ssl_path.data.images import ImageLike, as_rgb_tensor
from ssl_path.data.stain import make_normalizer


class StainNormalize:
    """Stain-normalise a uint8 [3, H, W] image against a reference image (see :mod:`ssl_path.data.stain`)."""

    def __init__(self, method: str, reference: ImageLike, strength: float = 1.0) -> None:
        ref = as_rgb_tensor(reference).permute(1, 2, 0).numpy()  # [H, W, 3]
        self.method, self.strength = method, strength
        self._normalize = make_normalizer(method, np.ascontiguousarray(ref), strength)

    def __call__(self, image: Tensor) -> Tensor:
        out = self._normalize(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))  # [H, W, 3]
        return torch.from_numpy(out).permute(2, 0, 1)

    def __repr__(self) -> str:
        return f"StainNormalize(method={self.method!r}, strength={self.strength})"
