"""Publish an encoder: a folder that timm loads as it loads UNI or Phikon, and its upload to the Hub.

``python -m ssl_path.hub export --ckpt RUN_DIR --out DIR [--results results.json ...] [--name org/name]``
writes ``config.json`` (architecture, ``model_args`` and ``pretrained_cfg``, so that loading needs
no keyword argument), ``model.safetensors`` (timm's key names: the encoder entry of the
checkpoint, so any pretraining method exports the same way) and ``README.md`` (the model card,
see :mod:`ssl_path.publish.card`), then ``files.json``, their names, sizes and sha256.

``python -m ssl_path.hub push DIR --repo org/name [--private] [--revision BRANCH] [--dry-run]``
uploads exactly the files ``files.json`` lists with huggingface_hub, once each matches its size and
sha256; a folder with any other file, or a file missing or changed, is refused (``--dry-run``
too). The token comes from ``HF_TOKEN`` or ``hf auth login``; it is passed to huggingface_hub and
never printed or written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ssl_path.core.cli import Parser, add_out, add_overwrite, make_parser
from ssl_path.core.errors import run_cli
from ssl_path.publish.export import DEFAULT_LICENSE, export
from ssl_path.publish.push import exported_files, push


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m ssl_path.hub", __doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    ex = commands.add_parser("export", help="write a timm-format folder with its model card")
    ex.add_argument("--ckpt", required=True, help="a training checkpoint (.pt) or run directory")
    add_out(ex, help="folder to write (new or empty, or replaced with --overwrite)")
    ex.add_argument("--results", nargs="*", default=[], type=Path, help="results.json files of this encoder's probes")
    ex.add_argument("--name", help="org/name on the Hub (the card's title and loading code)")
    ex.add_argument("--license", default=DEFAULT_LICENSE, help=f"Hub license id (default {DEFAULT_LICENSE})")
    ex.add_argument(
        "--datasets",
        nargs="*",
        default=[],
        help="Hub ids (org/name) of the datasets it was trained or measured on, for the card's datasets: "
        "(the Hub links them); SET=org/name also names the set SET a results file was measured on by it",
    )
    ex.add_argument("--shards", nargs="*", help="the training shards, where run.json's data path no longer holds them")
    ex.add_argument("--template", type=Path, help="a card template instead of model_cards/encoder.md")
    add_overwrite(ex)
    pu = commands.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    pu.add_argument("folder", type=Path)
    pu.add_argument("--repo", required=True, help="org/name")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--revision", help="branch to upload to (created if missing)")
    pu.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    args = parser.parse_args(argv)
    if args.command == "export":
        out = export(
            args.ckpt,
            args.out,
            args.results,
            name=args.name,
            license=args.license,
            datasets=args.datasets,
            shards=args.shards,
            template=args.template,
            overwrite=args.overwrite,
        )
        for file in exported_files(out):
            print(out / file)
        return 0
    files = push(args.folder, args.repo, args.private, args.revision, args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    where = f"{args.repo}" + (f" (revision {args.revision})" if args.revision else "")
    for file in files:
        print(f"{verb} {file} ({(args.folder / file).stat().st_size} bytes) to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
