"""``python -m ssl_path.stain_preview``: a before/after grid of stain normalisation at several strengths.

    python -m ssl_path.stain_preview --data IMAGE_OR_FOLDER --reference REF_IMAGE \\
        --method macenko --strength 0 0.5 1 --out preview.png

Choose a method and strength by eye before tiling with ``--stain-norm`` (see :mod:`ssl_path.tiling.preview`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ssl_path.core.cli import add_out, add_overwrite, make_parser, out_file
from ssl_path.core.errors import UserError, run_cli
from ssl_path.core.io import check_out_file
from ssl_path.data.stain import METHODS
from ssl_path.tiling.preview import find_images, read_images, render_preview


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m ssl_path.stain_preview", __doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="an image or a folder of images")
    parser.add_argument("--reference", required=True, type=Path, help="the reference (target) image")
    parser.add_argument("--method", default="macenko", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--strength", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="strengths in [0, 1]")
    parser.add_argument("--rows", type=int, default=4, help="at most this many images of a folder")
    parser.add_argument("--max-side", type=int, default=512, help="downscale images to this longer side first")
    add_out(parser, help="PNG to write", type=out_file)
    add_overwrite(parser)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.max_side < 16:
        raise UserError(f"--rows must be >= 1 and --max-side >= 16, got {args.rows}, {args.max_side}")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out} must end in .png")
    check_out_file(args.out, args.overwrite, [args.data, args.reference])
    if not args.reference.is_file():  # before the images, whose skips it would follow
        state = "is a folder; name an image" if args.reference.is_dir() else "does not exist"
        raise UserError(f"--reference {args.reference} {state}")
    images = read_images(find_images(args.data), args.rows, args.max_side)
    render_preview(images, args.reference, args.method, args.strength, args.out, args.max_side)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
