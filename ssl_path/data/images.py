"""Images as the project reads them: the one list of image suffixes, decoding to uint8 RGB tensors,
and the default normalisation statistics.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ssl_path.core.errors import UserError, first_line

# Suffixes by reader: Pillow, tifffile (pyramidal TIFF level by level), OpenSlide (whole slides).
PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
OPENSLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif"})
IMAGE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES | OPENSLIDE_SUFFIXES
# Files read whole, as single images (labelled sets, previews); whole slides are tiled instead.
TILE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[bytes, bytearray, memoryview, Tensor, np.ndarray, Image.Image, str, Path]


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
        image = _decode(image)
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


def _decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Encoded bytes to uint8 [H, W, 3]; a file that does not decode is a UserError saying why.

    Warnings raised while decoding never reach the terminal, where a data worker would print them
    once per process, away from the image they concern: when decoding fails they join its reason,
    and an image that decodes is good whatever was said about it (its EXIF, say).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(io.BytesIO(data)) as img:
                return _pil_to_array(img)
        except UnidentifiedImageError:
            reason = "not an image format Pillow reads"
        # What Pillow raises on damaged data besides OSError: SyntaxError and struct.error from
        # malformed headers, ValueError, EOFError, and the decompression-bomb guard.
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as err:
            reason = first_line(err)
    said = "; ".join(dict.fromkeys(first_line(w.message) for w in caught))
    warned = f" (warned: {said})" if said else ""
    raise UserError(f"cannot decode image ({len(data)} bytes): {reason}{warned}")


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3], writable, decoded and copied once."""
    return np.array(img if img.mode == "RGB" else img.convert("RGB"))
