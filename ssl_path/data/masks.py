"""Label masks as the project reads them: the one place a mask file is decoded.

A label mask holds one value per pixel (a class id, or an instance id), stored losslessly: PNG,
BMP or TIFF. :func:`read_mask` returns the values as they are stored; what they mean (which value
is which class) is for the reader or head that knows the dataset.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssl_path.core.errors import UserError, first_line
from ssl_path.data.images import TILE_SUFFIXES

# Lossless formats only: JPEG blurs the values a mask is made of.
MASK_SUFFIXES = TILE_SUFFIXES - {".jpg", ".jpeg"}

# Pillow modes read as they are: 8-bit values or palette indices -> uint8, wider integers -> int32.
_UINT8_MODES = frozenset({"L", "P"})
_INT32_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# Modes whose first channel holds the value when every colour channel is equal; the rest is alpha.
_COLOUR_MODES = {"RGB": 3, "RGBA": 3, "RGBX": 3, "LA": 1, "PA": 1, "La": 1}


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """The label mask at ``path`` as a writable 2-D integer array [H, W].

    uint8 for 8-bit grey masks, palette PNGs (their indices, not their colours) and 1-bit masks
    (0/1); int32 for 16- and 32-bit masks (instance ids) and for float TIFFs whose values are
    whole numbers. An RGB(A) mask whose colour channels are equal gives one channel (alpha is
    ignored). Anything else is one UserError naming the file: a colour mask whose channels differ,
    a file that does not decode or is truncated, several frames, another format.
    """
    file = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not file.is_file():
        raise UserError(f"label mask not found: {file}")
    if file.suffix.lower() not in MASK_SUFFIXES:
        kinds = ", ".join(sorted(MASK_SUFFIXES))
        raise UserError(f"label mask {file}: {file.suffix or 'no suffix'} is not a lossless mask format ({kinds})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(file) as img:
                frames = getattr(img, "n_frames", 1)
                if frames > 1:
                    raise UserError(f"label mask {file} has {frames} frames; a label mask is one 2-D image")
                mode = img.mode
                values = np.array(img)
        except UnidentifiedImageError:
            reason = "not an image format Pillow reads"
        # As in images.py: what Pillow raises on damaged data, the decompression-bomb guard included.
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as err:
            reason = first_line(err)
        else:
            return _values(values, mode, file)
    said = "; ".join(dict.fromkeys(first_line(w.message) for w in caught))
    warned = f" (warned: {said})" if said else ""
    raise UserError(f"cannot read label mask {file}: {reason}{warned}")


def _values(values: np.ndarray, mode: str, file: Path) -> np.ndarray:
    """The decoded pixels of a ``mode`` image as [H, W] uint8 or int32."""
    if mode == "1":
        return values.astype(np.uint8)
    if mode in _UINT8_MODES:
        return _writable(values)
    if mode in _INT32_MODES:
        return values.astype(np.int32)
    if mode == "F":
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise UserError(f"label mask {file} holds fractional values; a label mask holds whole numbers")
        if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
            raise UserError(f"label mask {file} holds values beyond 32-bit integers")
        return values.astype(np.int32)
    if mode in _COLOUR_MODES:
        channels = values[..., : _COLOUR_MODES[mode]]
        differ = np.any(channels != channels[..., :1], axis=-1)
        if differ.any():
            y, x = (int(i[0]) for i in np.nonzero(differ))
            raise UserError(
                f"label mask {file}: a label mask has one value per pixel, but its {mode} channels differ "
                f"(at x={x}, y={y}: {tuple(int(v) for v in values[y, x])})"
            )
        return np.ascontiguousarray(channels[..., 0])
    raise UserError(f"label mask {file}: Pillow mode {mode!r} is not a label mask (grey, palette or integer)")


def _writable(values: np.ndarray) -> np.ndarray:
    return values if values.flags.writeable else values.copy()
