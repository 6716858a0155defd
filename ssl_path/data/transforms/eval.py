"""The single-view evaluation transform of probes and inference: resize, centre crop, normalise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ssl_path.core.errors import UserError
from ssl_path.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageLike, as_rgb_tensor
from ssl_path.data.transforms.stain import StainNormalize


@dataclass(frozen=True)
class EvalTransform:
    """Single view for probes and inference: resize the short side, centre crop, normalise -> float [3, S, S].

    ``crop_pct`` = 1 (default) keeps the whole tile: in pathology the border of a tile holds as much
    tissue as its centre, unlike ImageNet photos (timm's 0.875).
    """

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    stain: StainNormalize | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.input_size < 1 or not 0.0 < self.crop_pct <= 1.0:
            raise UserError(
                f"eval transform needs input_size >= 1 and crop_pct in (0, 1], got {self.input_size}, {self.crop_pct}"
            )

    def __call__(self, image: ImageLike) -> Tensor:
        img = as_rgb_tensor(image)
        if self.stain is not None:
            img = self.stain(img)
        resize = int(round(self.input_size / self.crop_pct))
        img = TF.resize(img, [resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        img = TF.center_crop(img, [self.input_size, self.input_size])  # [3, S, S] uint8
        return TF.normalize(img.float().div_(255.0), list(self.mean), list(self.std))


def eval_transform(
    input_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 1.0,
    stain: StainNormalize | None = None,
) -> EvalTransform:
    """The evaluation transform: image -> normalised float [3, input_size, input_size]; see :class:`EvalTransform`."""
    return EvalTransform(input_size, tuple(mean), tuple(std), crop_pct, stain=stain)
