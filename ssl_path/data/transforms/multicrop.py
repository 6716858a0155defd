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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import InterpolationMode

from ssl_path.core.errors import ConfigError
from ssl_path.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageLike, as_rgb_tensor
from ssl_path.data.stain import METHODS as STAIN_METHODS
from ssl_path.data.transforms.geometric import crop_resize_orient, sample_crop_boxes
from ssl_path.data.transforms.photometric import (
    PhotometricParams,
    apply_photometric,
    sample_photometric,
    stack_crop_major,
)
from ssl_path.data.transforms.stain import StainNormalize


def _pair(value: Sequence[float], name: str, lo: float, hi: float) -> tuple[float, float]:
    if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
        raise ConfigError(f"multicrop {name} must be two increasing numbers in [{lo}, {hi}], got {tuple(value)}")
    return (float(value[0]), float(value[1]))


def _probs(value: Sequence[float], name: str) -> tuple[float, ...]:
    if len(value) == 0 or not all(0.0 <= p <= 1.0 for p in value):
        raise ConfigError(f"multicrop {name} must be one or more probabilities in [0, 1], got {tuple(value)}")
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
            raise ConfigError(f"multicrop needs n_global >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}")
        if self.global_size < 8 or self.local_size < 8:
            raise ConfigError(f"multicrop crop sizes must be >= 8 px, got {self.global_size}, {self.local_size}")
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
                raise ConfigError(f"multicrop {name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"multicrop hue must be in [0, 0.5], got {self.hue}")
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
            raise ConfigError(f"multicrop blur_kernel_size must be odd and positive, got {self.blur_kernel_size}")
        if self.blur_kernel_size // 2 >= min(self.global_size, self.local_size):
            raise ConfigError(f"multicrop blur_kernel_size {self.blur_kernel_size} is too large for the crop sizes")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ConfigError(f"multicrop interpolation must be bilinear or bicubic, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"multicrop mean/std must be three numbers each, std > 0, got {self.mean}, {self.std}")
        if self.stain_norm is not None:
            if self.stain_norm not in STAIN_METHODS:
                raise ConfigError(
                    f"multicrop stain_norm must be one of {STAIN_METHODS} or None, got {self.stain_norm!r}"
                )
            if self.stain_reference is None:
                raise ConfigError("multicrop stain_norm needs stain_reference (path of a reference image)")
            if not Path(self.stain_reference).is_file():
                raise ConfigError(f"multicrop stain_reference {self.stain_reference} not found")


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


def _per_global(probabilities: tuple[float, ...], n_global: int) -> list[float]:
    """Global crop i uses entry i % len: the DINOv2 pattern repeats over any number of global crops."""
    return [probabilities[i % len(probabilities)] for i in range(n_global)]


def key_entropy(key: int | str) -> int:
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
        self.stain = StainNormalize(cfg.stain_norm, cfg.stain_reference, cfg.stain_strength) if cfg.stain_norm else None
        n_g, n_l = cfg.n_global, cfg.n_local
        self._blur_p = np.array(_per_global(cfg.global_blur_p, n_g) + [cfg.local_blur_p] * n_l)
        self._solarize_p = np.array(_per_global(cfg.global_solarize_p, n_g) + [cfg.local_solarize_p] * n_l)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, key: int | str, epoch: int | None = None) -> np.random.Generator:
        """The generator that draws every random parameter of sample ``key`` in ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng(np.random.SeedSequence([self.cfg.seed, epoch, key_entropy(key)]))

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
        "collated_global_crops": stack_crop_major([s["global_crops"] for s in samples]),
        "collated_local_crops": stack_crop_major([s["local_crops"] for s in samples]),
        "n_global_crops": first["global_crops"].shape[0],
        "n_local_crops": first["local_crops"].shape[0],
    }
    for kind in ("global", "local"):
        if f"{kind}_params" in first:
            out[f"{kind}_params"] = PhotometricParams.crop_major([s[f"{kind}_params"] for s in samples])
    return out
