"""How a pretraining stream mixes its datasets: shards tiled in input order against a shuffled order.

The pretraining tiles of ``benchmarks/pretrain_knn.py`` (AMi-Br train-slide patches, then the
MoNuSeg images) are tiled twice, with ``--shuffle-seed none`` (input order) and with the default
seeded shuffle, and each is streamed as ``dinov2_tiny_cpu`` streams it (its batch size, shuffle
buffer, seed and one worker). For the first ``--batches`` batches it reports the data's share of
each dataset, the mean share in a batch, and how many batches are over 90 % one dataset.

    .venv/bin/python benchmarks/stream_mix.py [--out benchmarks/out/stream_mix] [--batches 200]

Prints a table and writes ``OUT/stream_mix.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain_knn import slide_split  # noqa: E402

from ssl_path.data.loader import shard_loader  # noqa: E402
from ssl_path.data.manifest import MANIFEST, read_manifest  # noqa: E402
from ssl_path.data.readers import read_amibr  # noqa: E402
from ssl_path.pretrain import resolve_config  # noqa: E402
from ssl_path.tiling import TilingParams, make_shards  # noqa: E402

ONE_SOURCE = 0.9


class DatasetOf:
    """A sample's dataset: the folder of ``data_root`` its source lies in (picklable, for the worker)."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = str(data_root.resolve())

    def __call__(self, sample: dict) -> str:
        source = str(Path(sample["meta"]["source"]).resolve())
        return source[len(self.data_root) :].strip("/").split("/")[0]


def mix(shards: Path, data_root: Path, batches: int, batch_size: int, buffer: int, seed: int) -> dict:
    dataset_of = DatasetOf(data_root)
    loader = shard_loader(
        shards,
        "train",
        batch_size,
        transform=dataset_of,
        collate_fn=list,
        num_workers=1,
        seed=seed,
        shuffle_buffer=buffer,
    )
    per_source = Counter()
    for s in read_manifest(shards / MANIFEST)["sources"]:
        per_source[dataset_of({"meta": {"source": s["path"]}})] += s["tiles"]
    total = sum(per_source.values())
    shares, one_source, seen = [], 0, Counter()
    for _i, batch in zip(range(batches), loader):
        counts = Counter(batch)
        seen.update(counts)
        top = max(counts.values()) / len(batch)
        one_source += top > ONE_SOURCE
        shares.append({name: counts[name] / len(batch) for name in per_source})
    return {
        "data_share": {name: round(n / total, 4) for name, n in per_source.items()},
        "stream_share": {name: round(seen[name] / sum(seen.values()), 4) for name in per_source},
        "batches": len(shares),
        "batches_over_90pct_one_dataset": one_source,
        "first_batches_share": {name: [round(s[name], 3) for s in shares[:10]] for name in per_source},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "stream_mix")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--config", default="dinov2_tiny_cpu", help="whose batch size, buffer and seed")
    args = parser.parse_args()
    cfg = resolve_config(args.config)
    train, _ = slide_split(read_amibr(args.data_root / "amibr_midog21"))
    inputs = [r.path for r in train.records] + [str(args.data_root / "monuseg_kumar_norm")]
    rows = {}
    for name, seed in (("input order", None), ("shuffled (seed 0)", 0)):
        shards = args.out / f"shards-{'input' if seed is None else 'shuffled'}"
        if not (shards / MANIFEST).exists():
            params = TilingParams(tile_size=128, stride=128, workers=2, shuffle_seed=seed)
            make_shards(inputs, shards, params, progress=False)
        rows[name] = mix(shards, args.data_root, args.batches, cfg.train.batch_size, cfg.train.shuffle_buffer, cfg.seed)
    print(f"{'shards':<20}{'dataset':<22}{'in data':>9}{'in stream':>11}{'batches >90% one':>18}")
    for name, row in rows.items():
        for i, dataset in enumerate(row["data_share"]):
            over = f"{row['batches_over_90pct_one_dataset']} / {row['batches']}" if i == 0 else ""
            print(
                f"{name if i == 0 else '':<20}{dataset:<22}{row['data_share'][dataset]:>9.1%}{row['stream_share'][dataset]:>11.1%}{over:>18}"
            )
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "config": args.config,
        "batch_size": cfg.train.batch_size,
        "shuffle_buffer": cfg.train.shuffle_buffer,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream_mix.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
