"""The photometric part of pathology augmentation, batched: HED stain jitter, colour jitter,
grayscale, Gaussian blur, solarisation and normalisation over all crops of one size at once, in a
DataLoader worker or on the accelerator after collation. Parameters are drawn per crop on the CPU
(:func:`sample_photometric`) by the geometric part, so where this runs does not change them.

Photometric ops as fused affine maps (documented deviations from torchvision's ColorJitter):
brightness, contrast, saturation, hue and grayscale are each affine in RGB, so a crop's whole jitter
(in its random order) is one 3x3 matrix plus a term in the crop's mean colour, applied in one pass
and clamped to [0, 1] once at the end, where torchvision clamps after every op. Hue is a rotation in
the YIQ chroma plane, not an HSV hue shift (luma is kept; saturated colours shift slightly
differently). Each op alone, followed by the clamp, equals torchvision's for the same factor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor
from torch.utils.data import default_collate

from ssl_path.data.images import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from ssl_path.data.transforms.multicrop import MultiCropConfig


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

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PhotometricParams:
        return PhotometricParams(
            **{
                f.name: _maybe(getattr(self, f.name), lambda t: t.to(device, non_blocking=non_blocking))
                for f in fields(self)
            }
        )

    def pin_memory(self) -> PhotometricParams:
        """Pinned copies, which a DataLoader with ``pin_memory=True`` asks for, for non-blocking copies."""
        return PhotometricParams(
            **{f.name: _maybe(getattr(self, f.name), lambda t: t.pin_memory()) for f in fields(self)}
        )

    @staticmethod
    def crop_major(samples: Sequence[PhotometricParams]) -> PhotometricParams:
        """Collate per-sample params ``[n, ...]`` into ``[n * B, ...]`` ordered crop-major, like the crops."""
        return PhotometricParams(
            **{
                f.name: _maybe(
                    getattr(samples[0], f.name), lambda _: stack_crop_major([getattr(s, f.name) for s in samples])
                )
                for f in fields(PhotometricParams)
            }
        )


def _maybe(value: Tensor | None, fn: Callable[[Tensor], Tensor]) -> Tensor | None:
    return None if value is None else fn(value)


def stack_crop_major(per_sample: Sequence[Tensor]) -> Tensor:
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
    # Called inside a bf16-autocast training step, bmm/baddbmm/conv2d would run in bf16 (errors of
    # up to 3/255 in the crops) and the device path would no longer equal the workers' float32 one.
    with torch.autocast(crops.device.type, enabled=False):
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
