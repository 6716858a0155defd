"""``python -m ssl_path.encoder --ckpt REF``: load an encoder ref and print its EncoderInfo as JSON."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from ssl_path.core.cli import add_device, make_parser, resolve_device
from ssl_path.core.errors import run_cli
from ssl_path.encoder import load


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m ssl_path.encoder", "Load an encoder ref and print its EncoderInfo as JSON.")
    parser.add_argument(
        "--ckpt", required=True, help="timm:ARCH, hf-hub:ORG/NAME, a checkpoint, a run directory or an exported folder"
    )
    add_device(parser, default="cpu")
    args = parser.parse_args(argv)
    _, info = load(args.ckpt, device=resolve_device(args.device))
    print(json.dumps(info.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
