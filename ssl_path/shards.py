"""``python -m ssl_path.shards``: tile images and whole slides into WebDataset shards (see :mod:`ssl_path.tiling`)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ssl_path.core.cli import Parser, add_out, add_overwrite, add_progress, make_parser
from ssl_path.core.errors import run_cli, terminate_as_interrupt
from ssl_path.data.stain import METHODS as STAIN_METHODS
from ssl_path.tiling import TilingParams, make_shards, resolution_notes


def build_parser() -> Parser:
    d = TilingParams()
    p = make_parser(
        "python -m ssl_path.shards",
        "Tile images and whole slides into WebDataset shards (OUT/shard-*.tar + manifest.json).",
    )
    p.add_argument(
        "--data",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="image files or folders (searched recursively): PNG, JPEG, BMP, TIFF, SVS, NDPI, MRXS, ...",
    )
    add_out(p, help="output folder for the shards and manifest.json")
    p.add_argument("--tile-size", type=int, default=d.tile_size, help="tile side in pixels (default %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="tile spacing in tile pixels (default: tile size)")
    p.add_argument("--mpp", type=float, default=None, help="target resolution in µm/px for files that declare theirs")
    p.add_argument(
        "--downscale",
        type=float,
        default=d.downscale,
        help="level-0 pixels per tile pixel for files without a resolution, or without --mpp (default 1)",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=d.min_tissue,
        help="minimum tissue fraction of a tile; 0 keeps every tile (default %(default)s)",
    )
    p.add_argument("--format", choices=("jpg", "png"), default=d.format, help="tile encoding (default %(default)s)")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality (default %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard, help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="reader/encoder processes (default %(default)s)")
    domain = p.add_mutually_exclusive_group()
    domain.add_argument("--domain-regex", help="regex on the source path; group 'domain', else group 1, is the label")
    domain.add_argument("--domain-csv", help="CSV with columns path,domain; matched by full path, else file name")
    p.add_argument(
        "--max-tiles-per-source", type=int, default=None, help="keep at most this many tiles per file, evenly spread"
    )
    p.add_argument("--stain-norm", choices=STAIN_METHODS, default=None, help="stain-normalise every tile")
    p.add_argument("--stain-reference", default=None, metavar="IMAGE", help="reference tile for --stain-norm")
    p.add_argument(
        "--stain-strength",
        type=float,
        default=d.stain_strength,
        help="0 keeps the tile, 1 normalises fully (default %(default)s)",
    )
    p.add_argument(
        "--shuffle-seed",
        type=_seed_or_none,
        default=d.shuffle_seed,
        metavar="N|none",
        help="seed of the shards' global tile order, so that every shard mixes the sources; none: input order (default %(default)s)",
    )
    add_overwrite(p)
    add_progress(p)
    return p


def _seed_or_none(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed or 'none', got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = TilingParams(
        tile_size=args.tile_size,
        stride=args.stride,
        mpp=args.mpp,
        downscale=args.downscale,
        min_tissue=args.min_tissue,
        format=args.format,
        quality=args.quality,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        domain_regex=args.domain_regex,
        domain_csv=args.domain_csv,
        max_tiles_per_source=args.max_tiles_per_source,
        stain_norm=args.stain_norm,
        stain_reference=args.stain_reference,
        stain_strength=args.stain_strength,
        shuffle_seed=args.shuffle_seed,
    )
    # SIGTERM (Slurm, kill) unwinds like Ctrl-C: workers stopped, the half-written folder removed.
    with terminate_as_interrupt():
        manifest = make_shards(args.data, args.out, params, overwrite=args.overwrite, progress=not args.no_progress)
    print(
        f"wrote {manifest['total']} tiles from {len(manifest['sources'])} files into "
        f"{len(manifest['shards'])} shards in {args.out} ({len(manifest['skipped'])} skipped)"
    )
    for note in resolution_notes(manifest):
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
