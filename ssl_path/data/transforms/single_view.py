"""One augmented view per image, for methods that reconstruct their input (MAE): random resized
crop, flips, 90-degree rotations and, optionally, a mild HED stain jitter, then normalisation.

MAE's recipe crops with scale 0.2 to 1 and flips horizontally, and nothing else: colour
augmentation hurt its reconstruction pretext (He et al. 2022, Table 4 and its appendix). Tissue has
no canonical orientation, so vertical flips and 90-degree rotations are added at no such cost; HED
jitter (Tellez et al. 2018) is off by default and there for users who want stain robustness.

Every random draw of a sample comes from a numpy ``Generator`` seeded from ``(seed, epoch, key)``,
as in :mod:`.multicrop`: workers, worker counts and batch composition do not change a sample's view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode

from ssl_path.core.errors import ConfigError
from ssl_path.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageLike, as_rgb_tensor
from ssl_path.data.transforms.geometric import crop_resize_orient, sample_crop_boxes
from ssl_path.data.transforms.multicrop import key_entropy
from ssl_path.data.transforms.photometric import hed_jitter, hed_jitter_matrices


@dataclass(frozen=True)
class SingleViewConfig:
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90: bool = True
    hed_sigma: float = 0.0  # 0 turns HED jitter off; 0.02 to 0.05 is mild
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ConfigError(f"view size must be >= 8 px, not {self.size}")
        for name, lo, hi in (("scale", 1e-4, 1.0), ("ratio", 1e-2, 1e2)):
            value = getattr(self, name)
            if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
                raise ConfigError(f"view {name} must be two increasing numbers in [{lo}, {hi}], not {list(value)}")
        for name in ("hflip_p", "vflip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"view {name} must be in [0, 1], not {getattr(self, name)}")
        if not 0.0 <= self.hed_sigma < 1.0:
            raise ConfigError(f"view hed_sigma must be in [0, 1), not {self.hed_sigma}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ConfigError(f"view interpolation must be bilinear or bicubic, not {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"view mean/std must be three numbers each, std > 0, not {self.mean}, {self.std}")


class SingleViewAugment:
    """``augment(image, key, epoch) -> float [3, size, size]``, normalised; see the module docstring."""

    def __init__(self, cfg: SingleViewConfig = SingleViewConfig(), seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed
        self.interpolation = InterpolationMode(cfg.interpolation)
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def __call__(self, image: ImageLike, key: int | str, epoch: int = 0) -> Tensor:
        cfg = self.cfg
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, key_entropy(key)]))
        img = as_rgb_tensor(image)
        box = sample_crop_boxes(rng, img.shape[1], img.shape[2], 1, cfg.scale, cfg.ratio)
        hflip, vflip = rng.random(1) < cfg.hflip_p, rng.random(1) < cfg.vflip_p
        rot = rng.integers(0, 4, 1) if cfg.rot90 else np.zeros(1, dtype=np.int64)
        view = crop_resize_orient(img, box, cfg.size, hflip, vflip, rot, self.interpolation).float().div_(255.0)
        if cfg.hed_sigma > 0:
            s = cfg.hed_sigma
            matrix, bias = hed_jitter_matrices(rng.uniform(1 - s, 1 + s, (1, 3)), rng.uniform(-s, s, (1, 3)))
            view = hed_jitter(view, torch.from_numpy(matrix).float(), torch.from_numpy(bias).float()).clamp_(0, 1)
        return (view[0] - self.mean) / self.std

    def sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """A decoded shard sample -> ``{"image", "key", "index"}``, the stream ``index`` making each draw new."""
        index = sample.get("index", 0)
        return {"image": self(sample["image"], sample["key"], epoch=index), "key": sample["key"], "index": index}
