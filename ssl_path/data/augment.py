"""Pathology augmentation: DINOv2-style multi-crop in two parts, geometric (per sample) and photometric (batched).

Why two parts: the geometric part (decode, random resized crops, flips, 90-degree rotations) needs the
whole image and runs per sample on uint8; the photometric part (HED stain jitter, colour jitter,
grayscale, Gaussian blur, solarisation, normalisation) is pixel-wise arithmetic that is far cheaper as
batched tensor ops over all crops of one size at once. It can run in the DataLoader worker
(``MultiCropAugment(cfg)``, float crops out) or after collation on the accelerator
(``MultiCropAugment(cfg, photometric=False)`` -> uint8 crops + parameters, then
``MultiCropPhotometric(cfg)`` on the collated batch), with the same result either way.

Determinism: every random draw of a sample comes from a numpy ``Generator`` seeded from
``(cfg.seed, epoch, key)``; no global RNG state is read, so workers, worker counts and batch
composition do not change a sample's crops. All random parameters, photometric ones included, are
drawn per sample on the CPU, so where the photometric part runs does not change them either.

Photometric ops as fused affine maps (documented deviations from torchvision's ColorJitter):
brightness, contrast, saturation, hue and grayscale are each affine in RGB, so a crop's whole jitter
(in its random order) is one 3x3 matrix plus a term in the crop's mean colour, applied in one pass
and clamped to [0, 1] once at the end, where torchvision clamps after every op. Hue is a rotation in
the YIQ chroma plane, not an HSV hue shift (luma is kept; saturated colours shift slightly
differently). Each op alone, followed by the clamp, equals torchvision's for the same factor.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import default_collate
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ssl_path.data.stain import METHODS as STAIN_METHODS
from ssl_path.data.stain import make_normalizer
from ssl_path.errors import UserError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropConfig",
    "MultiCropAugment",
    "MultiCropPhotometric",
    "PhotometricParams",
    "StainNormalize",
    "EvalTransform",
    "eval_transform",
    "collate_multicrop",
    "as_rgb_tensor",
    "sample_crop_boxes",
    "crop_resize_orient",
    "sample_photometric",
    "colour_jitter_matrices",
    "hed_jitter_matrices",
    "hed_jitter",
    "colour_affine",
    "gaussian_blur",
    "solarize",
    "apply_photometric",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[bytes, bytearray, memoryview, Tensor, np.ndarray, Image.Image, str, Path]

# Luma weights of torchvision's rgb_to_grayscale (ITU-R 601), used by contrast, saturation and grayscale.
_LUMA = np.array([0.2989, 0.587, 0.114])
# RGB -> YIQ (NTSC 1953); hue jitter rotates the I/Q chroma plane and keeps Y.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
# Stain OD vectors of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001), rows normalised.
_RGB_FROM_HED = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_MIN_INTENSITY = 1.0 / 255.0  # darkest non-zero uint8 value: caps optical density at ln(255)
_JITTER_OPS = 4  # brightness, contrast, saturation, hue
_CPU_CHUNK_ELEMENTS = 2 * 3 * 224 * 224  # about 1.2 MB of float32: stays in a core's L2 cache


# ----------------------------------------------------------------------------- config


def _pair(value: Sequence[float], name: str, lo: float, hi: float) -> tuple[float, float]:
    if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
        raise UserError(f"multicrop {name} must be two increasing numbers in [{lo}, {hi}], got {tuple(value)}")
    return (float(value[0]), float(value[1]))


def _probs(value: Sequence[float], name: str) -> tuple[float, ...]:
    if len(value) == 0 or not all(0.0 <= p <= 1.0 for p in value):
        raise UserError(f"multicrop {name} must be one or more probabilities in [0, 1], got {tuple(value)}")
    return tuple(float(p) for p in value)


@dataclass(frozen=True)
class MultiCropConfig:
    """DINOv2 multi-crop recipe plus pathology ops (HED jitter, vertical flips, 90-degree rotations).

    ``global_blur_p`` / ``global_solarize_p`` hold one probability per global crop; global crop ``i``
    uses entry ``i % len``, so the DINOv2 asymmetry (crop 1 always blurred, crop 2 rarely blurred but
    sometimes solarised) carries over to any number of global crops.
    """

    n_global: int = 2
    n_local: int = 8
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90: bool = True  # tissue has no canonical orientation
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 9
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)
    local_solarize_p: float = 0.0
    hed_sigma: float = 0.05  # Tellez et al. 2018; 0 turns HED jitter off
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    stain_norm: str | None = None  # "macenko" | "reinhard": normalise each image before cropping
    stain_reference: str | None = None  # path of the reference image for stain_norm
    stain_strength: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_global < 1 or self.n_local < 0:
            raise UserError(f"multicrop needs n_global >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}")
        if self.global_size < 8 or self.local_size < 8:
            raise UserError(f"multicrop crop sizes must be >= 8 px, got {self.global_size}, {self.local_size}")
        object.__setattr__(self, "global_scale", _pair(self.global_scale, "global_scale", 1e-4, 1.0))
        object.__setattr__(self, "local_scale", _pair(self.local_scale, "local_scale", 1e-4, 1.0))
        object.__setattr__(self, "ratio", _pair(self.ratio, "ratio", 1e-2, 1e2))
        object.__setattr__(self, "blur_sigma", _pair(self.blur_sigma, "blur_sigma", 1e-3, 1e3))
        object.__setattr__(self, "global_blur_p", _probs(self.global_blur_p, "global_blur_p"))
        object.__setattr__(self, "global_solarize_p", _probs(self.global_solarize_p, "global_solarize_p"))
        probabilities = ("hflip_p", "vflip_p", "jitter_p", "grayscale_p", "local_blur_p", "local_solarize_p")
        for name in (*probabilities, "stain_strength"):
            _probs((getattr(self, name),), name)
        for name in ("brightness", "contrast", "saturation", "hed_sigma"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"multicrop {name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise UserError(f"multicrop hue must be in [0, 0.5], got {self.hue}")
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
            raise UserError(f"multicrop blur_kernel_size must be odd and positive, got {self.blur_kernel_size}")
        if self.blur_kernel_size // 2 >= min(self.global_size, self.local_size):
            raise UserError(f"multicrop blur_kernel_size {self.blur_kernel_size} is too large for the crop sizes")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise UserError(f"multicrop interpolation must be bilinear or bicubic, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(f"multicrop mean/std must be three numbers each, std > 0, got {self.mean}, {self.std}")
        if self.stain_norm is not None:
            if self.stain_norm not in STAIN_METHODS:
                raise UserError(f"multicrop stain_norm must be one of {STAIN_METHODS} or None, got {self.stain_norm!r}")
            if self.stain_reference is None:
                raise UserError("multicrop stain_norm needs stain_reference (path of a reference image)")


# ----------------------------------------------------------------------------- decoding, stain


def as_rgb_tensor(image: ImageLike) -> Tensor:
    """An image as uint8 [3, H, W]: from encoded bytes (JPEG, PNG, TIFF, BMP), a path, a PIL image,
    a uint8 [H, W, 3] array, or a uint8 [3, H, W] tensor (returned as is).

    Decodes with Pillow (libjpeg-turbo): about 0.1 ms per 256 px tile slower than
    ``torchvision.io.decode_jpeg``, which torchvision 0.29 deprecates, and it reads every format.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image not found: {path}")
        image = path.read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(image)) as img:
                image = _pil_to_array(img)
        except OSError as err:
            raise UserError(f"cannot decode image ({len(image)} bytes): {err}") from None
    if isinstance(image, Image.Image):
        image = _pil_to_array(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"expected a uint8 [H, W, 3] RGB array, got {image.dtype} {image.shape}")
        if not image.flags.writeable:
            image = image.copy()
        return torch.from_numpy(image).permute(2, 0, 1)  # channels-last view: torchvision's resize prefers it
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"expected a uint8 [3, H, W] RGB tensor, got {image.dtype} {tuple(image.shape)}")
        return image
    raise UserError(f"cannot read an image from {type(image).__name__}")


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3], writable, decoded and copied once."""
    return np.array(img if img.mode == "RGB" else img.convert("RGB"))


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


# ----------------------------------------------------------------------------- geometric part


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


# ----------------------------------------------------------------------------- photometric parameters


@dataclass
class PhotometricParams:
    """Per-crop photometric parameters, one row per crop (K rows), drawn on the CPU.

    Colour jitter and grayscale of crop k map a pixel ``x`` to
    ``colour[k] @ x + colour_from_mean[k] @ mean(crop k)`` (the mean term carries contrast);
    HED jitter maps optical density ``od`` to ``hed[k] @ od + hed_bias[k]``.
    """

    colour: Tensor  # [K, 3, 3]
    colour_from_mean: Tensor  # [K, 3, 3]
    blur_sigma: Tensor  # [K]; 0 means no blur
    solarize: Tensor  # [K] bool
    hed: Tensor | None = None  # [K, 3, 3]; None when HED jitter is off
    hed_bias: Tensor | None = None  # [K, 3]

    def __len__(self) -> int:
        return self.colour.shape[0]

    def __getitem__(self, rows: slice) -> PhotometricParams:
        return PhotometricParams(**{f.name: _maybe(getattr(self, f.name), lambda t: t[rows]) for f in fields(self)})

    def to(self, device: torch.device | str) -> PhotometricParams:
        return PhotometricParams(
            **{f.name: _maybe(getattr(self, f.name), lambda t: t.to(device)) for f in fields(self)}
        )

    @staticmethod
    def crop_major(samples: Sequence[PhotometricParams]) -> PhotometricParams:
        """Collate per-sample params ``[n, ...]`` into ``[n * B, ...]`` ordered crop-major, like the crops."""
        return PhotometricParams(
            **{f.name: _maybe(getattr(samples[0], f.name), lambda _: _crop_major([getattr(s, f.name) for s in samples]))
               for f in fields(PhotometricParams)}
        )


def _maybe(value: Tensor | None, fn: Callable[[Tensor], Tensor]) -> Tensor | None:
    return None if value is None else fn(value)


def _crop_major(per_sample: Sequence[Tensor]) -> Tensor:
    """B tensors ``[n, ...]`` -> ``[n * B, ...]`` with row ``i * B + b`` = crop i of sample b (dinov2's order).

    Stacked by ``default_collate``, which in a DataLoader worker writes straight into shared memory:
    the batch then reaches the main process without another copy.
    """
    rows = [sample[i] for i in range(per_sample[0].shape[0]) for sample in per_sample]
    if not rows:
        return per_sample[0].new_empty((0, *per_sample[0].shape[1:]))
    return default_collate(rows)


def colour_jitter_matrices(
    brightness: np.ndarray,
    contrast: np.ndarray,
    saturation: np.ndarray,
    hue: np.ndarray,
    order: np.ndarray,
    grayscale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Compose per-crop colour jitter into ``(colour, colour_from_mean)``, each ``[K, 3, 3]``.

    Factors are torchvision's (1 = identity for brightness/contrast/saturation, hue in turns);
    ``order`` ``[K, 4]`` is the permutation of (brightness, contrast, saturation, hue) applied;
    ``grayscale`` ``[K]`` bool replaces all channels by luma after the jitter. The result maps a pixel
    ``x`` of a crop with mean colour ``m`` to ``colour @ x + colour_from_mean @ m`` (before clamping).
    """
    k = len(brightness)
    eye = np.broadcast_to(np.eye(3), (k, 3, 3))
    to_luma = np.outer(np.ones(3), _LUMA)  # [3, 3]: every channel <- luma
    theta = 2.0 * np.pi * hue
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.zeros((k, 3, 3))
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, sin, -sin, cos
    op_linear = np.stack(
        [
            brightness[:, None, None] * eye,
            contrast[:, None, None] * eye,
            saturation[:, None, None] * eye + (1.0 - saturation)[:, None, None] * to_luma,
            _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ,
        ]
    )  # [4, K, 3, 3]
    rows = np.arange(k)
    colour, from_mean = np.array(eye), np.zeros((k, 3, 3))
    for step in range(_JITTER_OPS):
        op = order[:, step]
        linear = op_linear[op, rows]  # [K, 3, 3]
        # Contrast blends with the mean luma of the current image, which is to_luma @ (colour + from_mean) @ m.
        blend = np.where(op == 1, 1.0 - contrast, 0.0)[:, None, None] * (to_luma @ (colour + from_mean))
        colour, from_mean = linear @ colour, linear @ from_mean + blend
    gray = np.where(grayscale[:, None, None], to_luma, np.eye(3))
    return gray @ colour, gray @ from_mean


def hed_jitter_matrices(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HED stain jitter (Tellez et al. 2018) as an affine map of optical density: ``([K, 3, 3], [K, 3])``.

    Deconvolve OD into H, E, DAB concentrations, scale by ``alpha`` and shift by ``beta`` ``[K, 3]``,
    reconvolve: ``od' = (od @ HED_FROM_RGB * alpha + beta) @ RGB_FROM_HED``, transposed to act on columns.
    """
    matrix = (_HED_FROM_RGB[None] * alpha[:, None, :]) @ _RGB_FROM_HED  # [K, 3, 3], row-vector form
    return matrix.transpose(0, 2, 1), beta @ _RGB_FROM_HED


def sample_photometric(
    rng: np.random.Generator, cfg: MultiCropConfig, blur_p: np.ndarray, solarize_p: np.ndarray
) -> PhotometricParams:
    """Draw photometric parameters for K crops with blur and solarise probabilities ``blur_p``, ``solarize_p`` [K]."""
    k = len(blur_p)
    jitter = rng.random(k) < cfg.jitter_p

    def factor(strength: float) -> np.ndarray:
        return np.where(jitter, rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, k), 1.0)

    brightness, contrast, saturation = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
    hue = np.where(jitter, rng.uniform(-cfg.hue, cfg.hue, k), 0.0)
    order = rng.random((k, _JITTER_OPS)).argsort(axis=1)
    grayscale = rng.random(k) < cfg.grayscale_p
    colour, from_mean = colour_jitter_matrices(brightness, contrast, saturation, hue, order, grayscale)
    sigma = np.where(rng.random(k) < blur_p, rng.uniform(*cfg.blur_sigma, k), 0.0)
    params = PhotometricParams(
        colour=torch.from_numpy(colour.astype(np.float32)),
        colour_from_mean=torch.from_numpy(from_mean.astype(np.float32)),
        blur_sigma=torch.from_numpy(sigma.astype(np.float32)),
        solarize=torch.from_numpy(rng.random(k) < solarize_p),
    )
    if cfg.hed_sigma > 0:
        s = cfg.hed_sigma
        hed, bias = hed_jitter_matrices(rng.uniform(1.0 - s, 1.0 + s, (k, 3)), rng.uniform(-s, s, (k, 3)))
        params.hed = torch.from_numpy(hed.astype(np.float32))
        params.hed_bias = torch.from_numpy(bias.astype(np.float32))
    return params


# ----------------------------------------------------------------------------- photometric part (batched)


def hed_jitter(x: Tensor, matrix: Tensor, bias: Tensor) -> Tensor:
    """Affine map of optical density per crop: x [K, 3, H, W] in [0, 1], matrix [K, 3, 3], bias [K, 3]."""
    k, c, h, w = x.shape
    od = x.clamp_min(_MIN_INTENSITY).log_().neg_().view(k, c, h * w)  # [K, 3, HW]
    od = torch.baddbmm(bias.unsqueeze(-1), matrix, od)
    return od.neg_().exp_().view(k, c, h, w)


def colour_affine(x: Tensor, colour: Tensor, colour_from_mean: Tensor) -> Tensor:
    """Fused colour jitter + grayscale per crop, clamped to [0, 1]: x [K, 3, H, W], matrices [K, 3, 3]."""
    k, c, h, w = x.shape
    mean = x.mean(dim=(2, 3), keepdim=False).unsqueeze(-1)  # [K, 3, 1]
    out = torch.baddbmm(torch.bmm(colour_from_mean, mean), colour, x.reshape(k, c, h * w))  # [K, 3, HW]
    return out.clamp_(0.0, 1.0).view(k, c, h, w)


def _gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels [K, kernel_size] for per-crop ``sigma`` [K]."""
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float32)  # [S]
    weights = torch.exp(-0.5 * (offsets / sigma.float().unsqueeze(-1)) ** 2)
    return weights / weights.sum(dim=-1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with one sigma per crop (reflect padding): x [K, 3, H, W], sigma [K]."""
    k, c, h, w = x.shape
    half = kernel_size // 2
    kernels = _gaussian_kernels(sigma, kernel_size).to(x.dtype).repeat_interleave(c, dim=0)  # [K*3, S]
    y = nnf.pad(x.reshape(1, k * c, h, w), (half, half, half, half), mode="reflect")  # [1, K*3, H+2h, W+2h]
    if y.device.type == "cpu":  # oneDNN's depthwise convolution is 1.5-5x faster on channels-last input
        y = y.contiguous(memory_format=torch.channels_last)
    y = nnf.conv2d(y, kernels.view(k * c, 1, 1, kernel_size), groups=k * c)  # horizontal
    y = nnf.conv2d(y, kernels.view(k * c, 1, kernel_size, 1), groups=k * c)  # vertical
    return y.reshape(k, c, h, w)


def solarize(x: Tensor) -> Tensor:
    """Invert values at or above 0.5: min(x, 1 - x) for x in [0, 1]."""
    return torch.minimum(x, 1.0 - x)


def _where_rows(x: Tensor, rows: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` to the crops picked by the bool mask ``rows`` [K] only."""
    idx = rows.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    return x.index_copy_(0, idx, fn(x.index_select(0, idx)))


def apply_photometric(
    crops: Tensor,
    params: PhotometricParams,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    blur_kernel_size: int = 9,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """HED jitter -> colour jitter + grayscale -> blur -> solarise -> normalise, batched over crops.

    ``crops`` uint8 [K, 3, H, W] (or float in [0, 1]) on any device; ``params`` has K rows and is moved
    to that device. Computes in float32 and returns normalised ``dtype`` [K, 3, H, W]. Every op acts on
    each crop alone, so the result for a crop does not depend on which others share the batch.
    """
    if len(params) != crops.shape[0]:
        raise ValueError(f"{crops.shape[0]} crops but {len(params)} rows of photometric parameters")
    params = params.to(crops.device)
    mean_t = torch.tensor(mean, device=crops.device, dtype=torch.float32).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(std, device=crops.device, dtype=torch.float32).view(1, 3, 1, 1)
    k, _, h, w = crops.shape
    # On a CPU, a pass over a whole batch of float crops runs from main memory, over a few crops from cache.
    rows = max(1, _CPU_CHUNK_ELEMENTS // (3 * h * w)) if crops.device.type == "cpu" else k
    if rows >= k:
        return _photometric(crops, params, mean_t, inv_std, blur_kernel_size).to(dtype)
    out = torch.empty(crops.shape, dtype=dtype, device=crops.device)
    for start in range(0, k, rows):
        part = slice(start, start + rows)
        out[part] = _photometric(crops[part], params[part], mean_t, inv_std, blur_kernel_size)
    return out


def _photometric(
    crops: Tensor, params: PhotometricParams, mean: Tensor, inv_std: Tensor, blur_kernel_size: int
) -> Tensor:
    """:func:`apply_photometric` on one chunk of crops, float32 out."""
    x = crops.float().mul_(1.0 / 255.0) if crops.dtype == torch.uint8 else crops.float().contiguous()
    if params.hed is not None:
        x = hed_jitter(x, params.hed, params.hed_bias)
    x = colour_affine(x, params.colour, params.colour_from_mean)
    blur = params.blur_sigma > 0
    x = _where_rows(x, blur, lambda t: gaussian_blur(t, params.blur_sigma[blur], blur_kernel_size))
    x = _where_rows(x, params.solarize, solarize)
    return x.sub_(mean).mul_(inv_std)


class MultiCropPhotometric(nn.Module):
    """The photometric part for a collated batch (see :func:`collate_multicrop`), on the batch's device.

    Replaces ``collated_global_crops`` / ``collated_local_crops`` (uint8) by normalised ``dtype`` crops
    using the ``global_params`` / ``local_params`` drawn per sample by the geometric part.
    """

    def __init__(self, cfg: MultiCropConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype

    @torch.no_grad()
    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        for kind in ("global", "local"):
            crops, params = batch[f"collated_{kind}_crops"], out.pop(f"{kind}_params", None)
            if params is None:
                raise ValueError(f"batch has no {kind}_params: was it made with MultiCropAugment(photometric=False)?")
            if len(params) == 0:
                out[f"collated_{kind}_crops"] = crops.to(self.dtype)
                continue
            out[f"collated_{kind}_crops"] = apply_photometric(
                crops, params, self.cfg.mean, self.cfg.std, self.cfg.blur_kernel_size, self.dtype
            )
        return out

    def extra_repr(self) -> str:
        return f"hed_sigma={self.cfg.hed_sigma}, dtype={self.dtype}"


# ----------------------------------------------------------------------------- multi-crop


def _per_global(probabilities: tuple[float, ...], n_global: int) -> list[float]:
    """Global crop i uses entry i % len: the DINOv2 pattern repeats over any number of global crops."""
    return [probabilities[i % len(probabilities)] for i in range(n_global)]


def _key_entropy(key: int | str) -> int:
    """A non-negative int for a sample key; strings are hashed stably across processes (unlike ``hash``)."""
    if isinstance(key, (int, np.integer)) and key >= 0:
        return int(key)
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little")


class MultiCropAugment:
    """DINOv2 multi-crop for one image: ``augment(image, key) -> {"global_crops", "local_crops"}``.

    With ``photometric=True`` (default) the crops are normalised ``dtype`` tensors [N, 3, G, G] and
    [M, 3, L, L] (bfloat16 halves what workers hand over; a bf16-autocast step loses nothing).
    With ``photometric=False`` they stay uint8 and the sample also carries
    ``global_params`` / ``local_params`` for :class:`MultiCropPhotometric` to apply after collation
    (e.g. on the GPU, 4x less host-to-device traffic). Crops depend only on ``(cfg.seed, epoch, key)``
    and the image; call :meth:`set_epoch` (or pass ``epoch=``) so that each epoch sees new views.
    """

    def __init__(
        self, cfg: MultiCropConfig = MultiCropConfig(), photometric: bool = True, dtype: torch.dtype = torch.float32
    ) -> None:
        self.cfg, self.photometric, self.dtype, self.epoch = cfg, photometric, dtype, 0
        self.interpolation = InterpolationMode(cfg.interpolation)
        self.stain = (
            StainNormalize(cfg.stain_norm, cfg.stain_reference, cfg.stain_strength) if cfg.stain_norm else None
        )
        n_g, n_l = cfg.n_global, cfg.n_local
        self._blur_p = np.array(_per_global(cfg.global_blur_p, n_g) + [cfg.local_blur_p] * n_l)
        self._solarize_p = np.array(_per_global(cfg.global_solarize_p, n_g) + [cfg.local_solarize_p] * n_l)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, key: int | str, epoch: int | None = None) -> np.random.Generator:
        """The generator that draws every random parameter of sample ``key`` in ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng(np.random.SeedSequence([self.cfg.seed, epoch, _key_entropy(key)]))

    def __call__(self, image: ImageLike, key: int | str, epoch: int | None = None) -> dict[str, Any]:
        cfg, rng = self.cfg, self.rng(key, epoch)
        img = as_rgb_tensor(image)  # [3, H, W] uint8
        if self.stain is not None:
            img = self.stain(img)
        _, height, width = img.shape
        n = cfg.n_global + cfg.n_local
        boxes = np.concatenate(
            [
                sample_crop_boxes(rng, height, width, cfg.n_global, cfg.global_scale, cfg.ratio),
                sample_crop_boxes(rng, height, width, cfg.n_local, cfg.local_scale, cfg.ratio),
            ]
        )
        hflip, vflip = rng.random(n) < cfg.hflip_p, rng.random(n) < cfg.vflip_p
        rot = rng.integers(0, 4, n) if cfg.rot90 else np.zeros(n, dtype=np.int64)
        params = sample_photometric(rng, cfg, self._blur_p, self._solarize_p)
        sample: dict[str, Any] = {}
        for kind, rows, size in (
            ("global", slice(0, cfg.n_global), cfg.global_size),
            ("local", slice(cfg.n_global, n), cfg.local_size),
        ):
            crops = crop_resize_orient(img, boxes[rows], size, hflip[rows], vflip[rows], rot[rows], self.interpolation)
            kind_params = params[rows]
            if self.photometric and len(crops):
                crops = apply_photometric(crops, kind_params, cfg.mean, cfg.std, cfg.blur_kernel_size, self.dtype)
            elif self.photometric:
                crops = crops.to(self.dtype)
            else:
                sample[f"{kind}_params"] = kind_params
            sample[f"{kind}_crops"] = crops
        return sample


def collate_multicrop(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate multi-crop samples for a DINOv2 step, crop-major like dinov2's ``collate_data_and_cast``.

    Returns ``collated_global_crops`` [N * B, 3, G, G] and ``collated_local_crops`` [M * B, 3, L, L]
    (row ``i * B + b`` is crop i of sample b), ``n_global_crops``, ``n_local_crops``, and the collated
    ``global_params`` / ``local_params`` when the samples carry them (photometric part still to run).
    """
    if not samples:
        raise ValueError("collate_multicrop got an empty batch")
    first = samples[0]
    out: dict[str, Any] = {
        "collated_global_crops": _crop_major([s["global_crops"] for s in samples]),
        "collated_local_crops": _crop_major([s["local_crops"] for s in samples]),
        "n_global_crops": first["global_crops"].shape[0],
        "n_local_crops": first["local_crops"].shape[0],
    }
    for kind in ("global", "local"):
        if f"{kind}_params" in first:
            out[f"{kind}_params"] = PhotometricParams.crop_major([s[f"{kind}_params"] for s in samples])
    return out


# ----------------------------------------------------------------------------- evaluation


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
