"""Pathology augmentation and the evaluation transform, by part.

- :mod:`.multicrop`: DINOv2-style multi-crop (:class:`MultiCropConfig`, :class:`MultiCropAugment`,
  :func:`collate_multicrop`, :class:`MultiCropPhotometric` for the photometric part on the GPU);
- :mod:`.single_view`: one augmented view per image (MAE): :class:`SingleViewConfig`, :class:`SingleViewAugment`;
- :mod:`.geometric`: crop boxes, resized crops with flips and rotations (per sample, uint8);
- :mod:`.photometric`: HED, colour jitter, blur, solarisation, normalisation (batched);
- :mod:`.stain`: stain normalisation as a transform;
- :mod:`.eval`: the single-view evaluation transform.
"""

from ssl_path.data.images import IMAGENET_MEAN, IMAGENET_STD, as_rgb_tensor
from ssl_path.data.transforms.eval import EvalTransform, eval_transform
from ssl_path.data.transforms.geometric import crop_resize_orient, sample_crop_boxes
from ssl_path.data.transforms.multicrop import (
    MultiCropAugment,
    MultiCropConfig,
    MultiCropPhotometric,
    collate_multicrop,
    key_entropy,
)
from ssl_path.data.transforms.photometric import (
    PhotometricParams,
    apply_photometric,
    colour_affine,
    colour_jitter_matrices,
    gaussian_blur,
    hed_jitter,
    hed_jitter_matrices,
    sample_photometric,
    solarize,
)
from ssl_path.data.transforms.single_view import SingleViewAugment, SingleViewConfig
from ssl_path.data.transforms.stain import StainNormalize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "MultiCropAugment",
    "MultiCropConfig",
    "MultiCropPhotometric",
    "PhotometricParams",
    "SingleViewAugment",
    "SingleViewConfig",
    "StainNormalize",
    "apply_photometric",
    "as_rgb_tensor",
    "collate_multicrop",
    "colour_affine",
    "colour_jitter_matrices",
    "crop_resize_orient",
    "eval_transform",
    "gaussian_blur",
    "hed_jitter",
    "hed_jitter_matrices",
    "key_entropy",
    "sample_crop_boxes",
    "sample_photometric",
    "solarize",
]
