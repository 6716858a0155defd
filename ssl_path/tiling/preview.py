"""Before/after grid of stain normalisation at several strengths, to choose a method and strength by eye.

Drawn by ``python -m ssl_path.stain_preview``.
Rows: the first ``--rows`` readable images of ``--data`` (sorted by name; an unreadable one is skipped
and named); columns: the original, one column per
strength, and the reference. Strength 0 is the original; over-normalisation (e.g. a blood smear
flattened to one colour by an H&E reference) shows as the right-hand columns losing contrast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ssl_path.core.errors import UserError
from ssl_path.core.io import atomic_path
from ssl_path.data.images import TILE_SUFFIXES
from ssl_path.data.stain import make_normalizer


def _read_rgb(path: Path, max_side: int) -> np.ndarray:
    """uint8 [H, W, 3] of an image file, downscaled so that its longer side is at most ``max_side``."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return np.asarray(img)
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def find_images(data: Path) -> list[Path]:
    """``data`` itself if it is a file, else the image files in the folder, sorted by name."""
    if data.is_file():
        return [data]
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist")
    images = sorted(p for p in data.iterdir() if p.suffix.lower() in TILE_SUFFIXES and p.is_file())
    if not images:
        raise UserError(f"--data {data} holds no images ({', '.join(sorted(TILE_SUFFIXES))})")
    return images


def read_images(paths: Sequence[Path], rows: int, max_side: int) -> list[tuple[Path, np.ndarray]]:
    """The first ``rows`` of ``paths`` that can be read, as :func:`_read_rgb` gives them; each one
    that cannot is named on stderr and skipped, and none readable is an error naming the first."""
    read, failed = [], []
    for path in paths:
        if len(read) == rows:
            break
        try:
            read.append((path, _read_rgb(path, max_side)))
        except UserError as err:
            failed.append(err)
    if not read:
        raise UserError(f"none of the {len(failed)} images can be read; first {failed[0]}")
    for err in failed:
        print(f"warning: skipped: {err}", file=sys.stderr)
    return read


def render_preview(
    images: Sequence[tuple[Path, np.ndarray]],
    reference: Path,
    method: str,
    strengths: Sequence[float],
    out: Path,
    max_side: int = 512,
) -> None:
    """Normalise each image (path, pixels) at each strength against ``reference`` and write the grid
    to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = _read_rgb(reference, max_side)
    normalizers = [make_normalizer(method, ref, s) for s in strengths]
    ncols = len(strengths) + 2
    fig, axes = plt.subplots(len(images), ncols, figsize=(2.6 * ncols, 2.6 * len(images)), squeeze=False)
    for row, (path, img) in zip(axes, images):
        panels = [img, *(norm(img) for norm in normalizers), ref]
        titles = [path.name, *(f"{method} s={s:g}" for s in strengths), f"reference {reference.name}"]
        for ax, panel, title in zip(row, panels, titles):
            ax.imshow(panel)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
