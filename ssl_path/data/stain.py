"""Stain normalisation of H&E tiles: Macenko (2009) and Reinhard (2001), with an adjustable strength.

``make_normalizer(method, reference_rgb, strength)`` fits the reference once and returns a function
uint8 ``[H, W, 3]`` RGB -> uint8 ``[H, W, 3]`` RGB. ``strength`` blends the original (0) with the
fully normalised tile (1): full normalisation can flatten images whose colour statistics differ from
the reference (a blood smear against an H&E reference collapses to one flat colour), so the amount
is a setting, and ``python -m ssl_path.stain_preview`` shows its effect.

Tiles with too little tissue to estimate statistics from (near-white background) are returned
unchanged, never as NaN or noise: see :func:`tissue_fraction` and ``MIN_TISSUE_FRACTION``.

Both methods are written from the papers:
- Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009.
- Reinhard et al., "Color transfer between images", IEEE CG&A 2001 (here in CIELAB, D65).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ssl_path.core.errors import UserError

__all__ = [
    "METHODS",
    "MIN_TISSUE_FRACTION",
    "StainNormalizer",
    "make_normalizer",
    "macenko_stain_matrix",
    "optical_density",
    "rgb_to_lab",
    "lab_to_rgb",
    "tissue_fraction",
]

METHODS = ("macenko", "reinhard")
OD_BACKGROUND = 0.15  # Macenko's beta: optical density below this, in any channel, is background.
ANGLE_PERCENTILE = 1.0  # Macenko's alpha: robust extremes of the stain angles, in percent.
MAX_CONC_PERCENTILE = 99.0  # concentrations are scaled so that this percentile matches the reference.
MIN_TISSUE_FRACTION = 0.01  # below this fraction of tissue pixels a tile is returned unchanged ...
MIN_TISSUE_PIXELS = 64  # ... and below this many, whatever the fraction.

# sRGB (D65) -> CIE XYZ, and the D65 white point: IEC 61966-2-1.
_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_LAB_EPS = 216.0 / 24389.0  # CIE epsilon: (6/29)^3
_LAB_KAPPA = 24389.0 / 27.0


# ----------------------------------------------------------------------------- colour spaces


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 (or [0, 1] float) sRGB ``[..., 3]`` -> CIELAB ``[..., 3]`` float64 (L in [0, 100])."""
    x = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    lin = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _RGB_TO_XYZ.T / _WHITE_D65
    f = np.where(xyz > _LAB_EPS, np.cbrt(xyz), (_LAB_KAPPA * xyz + 16.0) / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB ``[..., 3]`` -> sRGB ``[..., 3]`` float64 in [0, 1] (out-of-gamut values clipped)."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], -1)
    xyz = np.where(f**3 > _LAB_EPS, f**3, (116.0 * f - 16.0) / _LAB_KAPPA) * _WHITE_D65
    lin = np.clip(xyz @ _XYZ_TO_RGB.T, 0.0, 1.0)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1.0 / 2.4) - 0.055)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[..., 3]`` -> optical density ``-ln(I / I0)`` with I0 = 256 so that white is ~0, never inf."""
    return -np.log((rgb.astype(np.float64) + 1.0) / 256.0)


def _od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Optical density ``[..., 3]`` -> float RGB in [0, 255] (inverse of :func:`optical_density`)."""
    return np.clip(256.0 * np.exp(-od) - 1.0, 0.0, 255.0)


def _min3(a: np.ndarray) -> np.ndarray:
    """Minimum over the last axis of length 3 (elementwise: numpy's strided reductions are ~50x slower)."""
    return np.minimum(np.minimum(a[..., 0], a[..., 1]), a[..., 2])


def _max3(a: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def tissue_fraction(rgb: np.ndarray, beta: float = OD_BACKGROUND) -> float:
    """Fraction of pixels whose optical density is at least ``beta`` in every channel (Macenko's tissue mask)."""
    return float((_min3(optical_density(rgb)) >= beta).mean())


def _has_tissue(mask: np.ndarray) -> bool:
    count = int(mask.sum())
    return count >= MIN_TISSUE_PIXELS and count >= MIN_TISSUE_FRACTION * mask.size


# ----------------------------------------------------------------------------- Macenko


@dataclass(frozen=True)
class _MacenkoFit:
    stains: np.ndarray  # [2, 3] unit OD vectors, haematoxylin first
    max_conc: np.ndarray  # [2] 99th percentile of each stain's concentration


def macenko_stain_matrix(rgb: np.ndarray) -> np.ndarray | None:
    """The two stain OD vectors ``[2, 3]`` of an H&E tile (haematoxylin first), or None without enough tissue."""
    fit = _fit_macenko(optical_density(rgb).reshape(-1, 3))
    return None if fit is None else fit.stains


def _fit_macenko(od: np.ndarray) -> _MacenkoFit | None:
    """Fit stain vectors and max concentrations to OD pixels ``[P, 3]``; None where the tile has no usable tissue."""
    mask = _min3(od) >= OD_BACKGROUND
    if not _has_tissue(mask):
        return None
    tissue = od[mask]  # [T, 3]
    # The plane of the two largest singular directions of the OD cloud holds both stains.
    _, eigvecs = np.linalg.eigh(np.cov(tissue, rowvar=False))
    plane = eigvecs[:, [2, 1]]  # [3, 2]
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    proj = tissue @ plane  # [T, 2]
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [ANGLE_PERCENTILE, 100.0 - ANGLE_PERCENTILE])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin absorbs red more than eosin does: it is the vector with the larger red OD.
    stains = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo])
    stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    if not np.isfinite(stains).all() or abs(np.dot(stains[0], stains[1])) > 1.0 - 1e-6:
        return None  # one stain only: the two vectors coincide and concentrations are undefined
    conc = _concentrations(tissue, stains)
    max_conc = np.percentile(conc, MAX_CONC_PERCENTILE, axis=0)
    if not (np.isfinite(max_conc).all() and (max_conc > 1e-6).all()):
        return None
    return _MacenkoFit(stains=stains, max_conc=max_conc)


def _concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations ``[P, 2]`` with ``od ~= conc @ stains``."""
    return od @ np.linalg.pinv(stains)


def _macenko(rgb: np.ndarray, ref: _MacenkoFit) -> np.ndarray | None:
    """Macenko-normalised float RGB ``[H, W, 3]``, or None when ``rgb`` has no usable tissue."""
    od = optical_density(rgb).reshape(-1, 3)
    fit = _fit_macenko(od)
    if fit is None:
        return None
    conc = _concentrations(od, fit.stains) * (ref.max_conc / fit.max_conc)  # [P, 2]
    return _od_to_rgb(conc @ ref.stains).reshape(rgb.shape)


# ----------------------------------------------------------------------------- Reinhard


@dataclass(frozen=True)
class _LabStats:
    mean: np.ndarray  # [3]
    std: np.ndarray  # [3]


def _background_only(rgb: np.ndarray) -> bool:
    """True when too few pixels are darker than glass in any channel for colour statistics to mean much."""
    return not _has_tissue(_max3(optical_density(rgb)) >= OD_BACKGROUND)


def _lab_stats(lab: np.ndarray) -> _LabStats:
    channels = np.ascontiguousarray(lab.reshape(-1, 3).T)  # [3, P]: contiguous rows reduce fast
    return _LabStats(mean=channels.mean(axis=1), std=channels.std(axis=1))


def _fit_reinhard(rgb: np.ndarray) -> _LabStats | None:
    """Per-channel LAB mean and std of the whole tile; None when it is (near-)background only."""
    return None if _background_only(rgb) else _lab_stats(rgb_to_lab(rgb))


def _reinhard(rgb: np.ndarray, ref: _LabStats) -> np.ndarray | None:
    """Reinhard-normalised float RGB ``[H, W, 3]`` in [0, 255], or None when ``rgb`` is background only."""
    if _background_only(rgb):
        return None
    lab = rgb_to_lab(rgb)
    src = _lab_stats(lab)
    scale = ref.std / np.maximum(src.std, 1e-6)
    return lab_to_rgb((lab - src.mean) * scale + ref.mean) * 255.0


# ----------------------------------------------------------------------------- public API


def _check_rgb(rgb: np.ndarray, what: str) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise UserError(f"{what} must be a uint8 RGB array of shape [H, W, 3], got {desc}")


@dataclass(frozen=True)
class StainNormalizer:
    """A fitted stain normaliser: uint8 ``[H, W, 3]`` RGB -> uint8 RGB (picklable, for DataLoader workers)."""

    method: str
    reference: _MacenkoFit | _LabStats
    strength: float

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        _check_rgb(rgb, "image to stain-normalise")
        if self.strength == 0.0:
            return rgb.copy()
        apply = _macenko if self.method == "macenko" else _reinhard
        out = apply(rgb, self.reference)
        if out is None or not np.isfinite(out).all():
            return rgb.copy()  # too little tissue to normalise: unchanged, by design
        if self.strength < 1.0:
            out = (1.0 - self.strength) * rgb + self.strength * out
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_normalizer(
    method: str, reference_rgb: np.ndarray, strength: float = 1.0
) -> Callable[[np.ndarray], np.ndarray]:
    """Fit ``method`` ("macenko" or "reinhard") to ``reference_rgb``; return uint8 ``[H, W, 3]`` -> uint8 RGB.

    ``strength`` in [0, 1] blends the input (0, returned exactly) with the fully normalised tile (1).
    A tile with too little tissue is returned unchanged. Raises :class:`UserError` for an unknown
    method, a strength outside [0, 1], or a reference that is not a uint8 RGB image with tissue.
    """
    if method not in METHODS:
        raise UserError(f"stain normalisation method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= float(strength) <= 1.0:
        raise UserError(f"stain normalisation strength must be a number in [0, 1], got {strength!r}")
    _check_rgb(reference_rgb, "stain reference image")
    if method == "macenko":
        ref = _fit_macenko(optical_density(reference_rgb).reshape(-1, 3))
    else:
        ref = _fit_reinhard(reference_rgb)
    if ref is None:
        raise UserError(f"stain reference image has too little tissue to fit {method} (is it a background tile?)")
    return StainNormalizer(method, ref, float(strength))
