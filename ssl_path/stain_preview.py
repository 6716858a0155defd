"""Before/after grid of stain normalisation at several strengths, to choose a method and strength by eye.

    python -m ssl_path.stain_preview --data IMAGE_OR_FOLDER --reference REF_IMAGE \\
        --method macenko --strength 0 0.5 1 --out preview.png

Rows: up to ``--rows`` images of ``--data`` (sorted by name); columns: the original, one column per
strength, and the reference. Strength 0 is the original; over-normalisation (e.g. a blood smear
flattened to one colour by an H&E reference) shows as the right-hand columns losing contrast.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn, Sequence

import numpy as np
from PIL import Image

from ssl_path.data.stain import METHODS, make_normalizer
from ssl_path.errors import UserError, run_cli
from ssl_path.io import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class _Parser(argparse.ArgumentParser):
    """Argument errors are user errors: one line and exit 2, like every other mistake."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def _read_rgb(path: Path, max_side: int) -> np.ndarray:
    """uint8 [H, W, 3] of an image file, downscaled so that its longer side is at most ``max_side``."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return np.asarray(img)
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def find_images(data: Path, rows: int) -> list[Path]:
    """``data`` itself if it is a file, else the first ``rows`` images in the folder (sorted by name)."""
    if data.is_file():
        return [data]
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist")
    images = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"--data {data} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images[:rows]


def render_preview(
    images: Sequence[Path],
    reference: Path,
    method: str,
    strengths: Sequence[float],
    out: Path,
    max_side: int = 512,
) -> None:
    """Normalise each image at each strength against ``reference`` and write the grid to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not reference.is_file():
        raise UserError(f"--reference {reference} does not exist")
    ref = _read_rgb(reference, max_side)
    normalizers = [make_normalizer(method, ref, s) for s in strengths]
    ncols = len(strengths) + 2
    fig, axes = plt.subplots(len(images), ncols, figsize=(2.6 * ncols, 2.6 * len(images)), squeeze=False)
    for row, path in zip(axes, images):
        img = _read_rgb(path, max_side)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m ssl_path.stain_preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="an image or a folder of images")
    parser.add_argument("--reference", required=True, type=Path, help="the reference (target) image")
    parser.add_argument("--method", default="macenko", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--strength", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="strengths in [0, 1]")
    parser.add_argument("--rows", type=int, default=4, help="at most this many images of a folder")
    parser.add_argument("--max-side", type=int, default=512, help="downscale images to this longer side first")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.max_side < 16:
        raise UserError(f"--rows must be >= 1 and --max-side >= 16, got {args.rows}, {args.max_side}")
    if args.out.exists() and not args.overwrite:
        raise UserError(f"--out {args.out} already exists; pass --overwrite to replace it")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out} must end in .png")
    images = find_images(args.data, args.rows)
    render_preview(images, args.reference, args.method, args.strength, args.out, args.max_side)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
