"""Tissue detection on a low-resolution thumbnail: Otsu's threshold on HSV saturation.

Glass and background are near-grey (low saturation); stained tissue is coloured. Otsu alone
always splits a histogram in two, so the threshold is clamped: at least ``SATURATION_FLOOR``
(a blank slide stays blank instead of having its noise called tissue) and at most
``SATURATION_CEILING`` (an image that is all tissue is not split into "pale" and "dark" tissue).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SATURATION_FLOOR",
    "SATURATION_CEILING",
    "saturation",
    "otsu_threshold",
    "tissue_mask",
    "TissueMap",
]

SATURATION_FLOOR = 0.05  # glass under JPEG colour noise stays below this
SATURATION_CEILING = 0.15  # pale eosin (stroma, mucus) stays above this


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 RGB image ``[H, W, 3]`` (0 for black)."""
    rgb = rgb.astype(np.float32)
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1]: the cut that maximises between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(p)  # weight of the class at or below each cut
    m0 = np.cumsum(p * centers)  # its unnormalised mean
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0) ** 2 / (w0 * (1.0 - w0))
    between = np.nan_to_num(between, nan=-1.0, posinf=-1.0)
    if between.max() <= 0:  # a constant image has no cut
        return float(edges[-1])
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(
    rgb: np.ndarray, floor: float = SATURATION_FLOOR, ceiling: float = SATURATION_CEILING
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a thumbnail and the saturation threshold used."""
    sat = saturation(rgb)
    threshold = float(np.clip(otsu_threshold(sat), floor, ceiling))
    return sat > threshold, threshold


class TissueMap:
    """A tissue mask with its level-0 scale; answers "what fraction of this rectangle is tissue"."""

    def __init__(self, mask: np.ndarray, scale: tuple[float, float]) -> None:
        """``mask`` is ``[h, w]`` bool; ``scale`` is level-0 pixels per mask pixel in (x, y)."""
        self.mask = mask
        self.scale = scale
        # Summed-area table with a zero row/column in front: any rectangle's sum in four lookups.
        self._integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    @property
    def fraction_total(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction(self, x: float, y: float, width: float, height: float) -> float:
        """Tissue fraction of the level-0 rectangle ``(x, y, width, height)``; mask cells by centre."""
        h, w = self.mask.shape
        sx, sy = self.scale
        x0, x1 = _cells(x / sx, (x + width) / sx, w)
        y0, y1 = _cells(y / sy, (y + height) / sy, h)
        if x1 <= x0 or y1 <= y0:
            return 0.0
        s = self._integral
        inside = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        return float(inside) / float((x1 - x0) * (y1 - y0))


def _cells(start: float, stop: float, size: int) -> tuple[int, int]:
    """Mask cells whose centres fall in ``[start, stop)``, at least one, clipped to ``[0, size)``."""
    first = int(np.ceil(start - 0.5))
    last = max(first + 1, int(np.ceil(stop - 0.5)))
    return max(0, min(first, size)), max(0, min(last, size))
