"""The real result of a pretraining method: its ``<method>_tiny_cpu`` on 2 CPU cores, then frozen kNN
and linear probes on held-out AMi-Br slides.

1. Slide split of AMi-Br (normal vs atypical mitoses): per scanner, every third slide (sorted) is
   a test slide; the others are train slides.
2. Pretraining tiles: the train slides' patches and the MoNuSeg images, tiled at 128 px (test
   slides' images are never seen in pretraining).
3. ``python -m ssl_path.pretrain --config CONFIG`` (the goal: at most 15 minutes on 2 cores).
4. Frozen kNN (DINO weighted vote, k = 10/20/50, and UNI's k=20 majority) with train-slide patches
   as the memory and test-slide patches as queries, and the linear probe (logistic regression, C
   chosen on a slide-grouped validation part of the train slides), for the published encoder and
   for the same architecture at random init (seed 0), both at the training resolution. Every figure
   has a 95 % bootstrap CI over the test slides (1000 redraws of whole slides, seed 0), and each
   probe row of the trained encoder the paired difference trained minus random init, scored on the
   same redraws: a gain is real where that interval excludes 0.

    .venv/bin/python benchmarks/pretrain_knn.py [--config dinov2_tiny_cpu|mae_tiny_cpu]
        [--out benchmarks/out/pretrain_knn] [--max-steps N]

Prints a table and writes ``OUT/pretrain_knn.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probes.common import ci_cell  # noqa: E402
from probes.features import extract_features  # noqa: E402
from probes.knn import run_knn  # noqa: E402
from probes.linear import run_linear  # noqa: E402
from ssl_path.data.manifest import MANIFEST, read_manifest  # noqa: E402
from ssl_path.data.readers import read_amibr  # noqa: E402
from ssl_path.encoder.checkpoint import checkpoint_path, read_checkpoint  # noqa: E402
from ssl_path.evaluation.bootstrap import DEFAULT_RESAMPLES  # noqa: E402
from ssl_path.pretrain import random_init_checkpoint  # noqa: E402
from ssl_path.tiling import TilingParams, make_shards  # noqa: E402


def slide_split(data):
    """Every third slide of each scanner (sorted) is a test slide."""
    test = set()
    for domain in data.domains():
        slides = sorted({r.group for r in data.records if r.domain == domain})
        test |= {s for i, s in enumerate(slides) if i % 3 == 2}
    train = data.select([i for i, r in enumerate(data.records) if r.group not in test])
    held = data.select([i for i, r in enumerate(data.records) if r.group in test])
    return train, held


PAIRED_SCORES = ("balanced_accuracy", "auroc")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="dinov2_tiny_cpu", help="the pretraining config (a shipped name)")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "pretrain_knn")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop pretraining early (default: the config's steps)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for the pretraining run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    amibr = read_amibr(args.data_root / "amibr_midog21")
    train, test = slide_split(amibr)
    print(
        f"AMi-Br: {len(train)} train patches ({len(train.groups())} slides), {len(test)} test patches ({len(test.groups())} slides)"
    )
    shards = args.out / "shards"
    if not (shards / MANIFEST).exists():
        inputs = [r.path for r in train.records] + [str(args.data_root / "monuseg_kumar_norm")]
        make_shards(inputs, shards, TilingParams(tile_size=128, stride=128, workers=2), progress=False)
    manifest = read_manifest(shards / MANIFEST)
    print(f"pretraining tiles: {manifest['total']}")

    run_dir = args.out / "run"
    cmd = [sys.executable, "-m", "ssl_path.pretrain", "--config", args.config, "--data", str(shards)]
    cmd += ["--out", str(run_dir)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    cmd += args.overrides
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    pretrain_s = time.perf_counter() - start
    checkpoint = read_checkpoint(checkpoint_path(run_dir))

    random_init = random_init_checkpoint(run_dir, args.out / "random_init.pt")
    refs = {"random init": str(random_init), args.config: str(run_dir)}
    rows, paired = {}, {}
    # The class token alone flatters pretraining (a random ViT's class tokens are near-identical),
    # so the mean of patch tokens is reported too: the stronger random-init baseline.
    for pool in ("cls", "mean"):
        feats = {
            name: tuple(
                extract_features(ref, s, pool=pool, batch_size=64, cache_dir=None, progress=False)
                for s in (train, test)
            )
            for name, ref in refs.items()
        }
        baseline = feats["random init"]
        for name in refs:
            # The same seed gives every row the same redraws of the test slides, so the trained
            # encoder's rows are paired with random init's.
            reference = None if name == "random init" else baseline
            rows[f"{name} [{pool}]"] = {
                **run_knn(*feats[name], reference=reference),
                "linear": run_linear(*feats[name], reference=reference),
            }
        trained = rows[f"{args.config} [{pool}]"]
        paired[pool] = {
            probe: {key: row[key] for s in PAIRED_SCORES for key in (f"{s}_diff", f"{s}_diff_ci95")}
            for probe, row in trained.items()
        }
    print(
        f"\npretraining: {checkpoint['step']} steps in {pretrain_s / 60:.1f} min (checkpointed wall {checkpoint['wall_time'] / 60:.1f} min)"
    )
    print(
        f"{'encoder [pool]':<26}{'probe':<10}{'bal. acc [95% CI]':>24}{'AUROC [95% CI]':>24}{'acc':>8}{'macro F1':>10}"
    )
    for name, result in rows.items():
        for probe, m in result.items():
            print(
                f"{name:<26}{probe:<10}{ci_cell(m['balanced_accuracy'], m.get('balanced_accuracy_ci95')):>24}{ci_cell(m['auroc'], m.get('auroc_ci95')):>24}"
                f"{m['accuracy']:>8.3f}{m['macro_f1']:>10.3f}"
            )
    print(f"\npaired difference, {args.config} minus random init (same redraws of the test slides; * CI excludes 0)")
    print(f"{'pool':<8}{'probe':<10}" + "".join(f"{'d ' + s + ' [95% CI]':>36}" for s in PAIRED_SCORES))
    for pool, probes in paired.items():
        for probe, d in probes.items():
            print(
                f"{pool:<8}{probe:<10}"
                + "".join(f"{ci_cell(d[f'{s}_diff'], d[f'{s}_diff_ci95'], signed=True):>36}" for s in PAIRED_SCORES)
            )
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "command": " ".join(cmd),
        "pretrain_steps": checkpoint["step"],
        "pretrain_minutes": round(pretrain_s / 60, 2),
        "tiles": manifest["total"],
        "split": {
            "train_patches": len(train),
            "test_patches": len(test),
            "train_slides": len(train.groups()),
            "test_slides": len(test.groups()),
        },
        "config": args.config,
        "probes": rows,
        "paired_vs_random_init": {
            "what": f"{args.config} minus random init, 95% percentile bootstrap over the same redraws of test slides",
            "resamples": DEFAULT_RESAMPLES,
            "seed": 0,
            "rows": paired,
        },
    }
    (args.out / "pretrain_knn.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
