"""Multi-crop throughput per CPU core: 2 x 224 + 8 x 96 crops from 256 px JPEG (q95) tiles, decode included.

Pipelines, each single-threaded (``torch.set_num_threads(1)``) so that a rate is per core:
- ``torchvision_pil``: a DINOv2/DINOTransform-like torchvision.transforms.v2 pipeline on PIL images
  (what lightly's DINOTransform does), plus vertical flips and 90-degree rotations; no HED jitter.
- ``ours_full``: ``MultiCropAugment(cfg)``: decode, crops, flips/rot90, HED + colour jitter, grayscale,
  blur, solarise, normalise, per sample, as in a DataLoader worker.
- ``ours_geometric``: ``MultiCropAugment(cfg, photometric=False)``: decode + crops + flips/rot90 (uint8).
- ``ours_photometric_batched``: ``MultiCropPhotometric`` on a collated batch of ``--batch`` samples
  (``--device cuda`` runs it on the GPU instead, host-to-device copy of the uint8 crops included).
- ``dataloader_*``: ``ours_full`` (float32 and bfloat16 crops) / ``ours_geometric`` through a DataLoader
  with ``--workers`` workers, one thread each; ``main cores`` is what the main process used meanwhile.

Rates are the best of ``--repeats`` runs (the least disturbed by other processes on the machine);
``per_cpu_s`` divides by this thread's CPU time rather than wall time, which other processes do not inflate.

    .venv/bin/python benchmarks/bench_augment.py --out benchmarks/out/bench_augment.json
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from ssl_path.core.io import write_json  # noqa: E402
from ssl_path.data.transforms import (  # noqa: E402
    MultiCropAugment,
    MultiCropConfig,
    MultiCropPhotometric,
    collate_multicrop,
)

SHARED_DATA = Path(os.environ.get("SSL_PATH_SHARED_DATA", REPO.parent / "shared" / "data"))
GOAL_PER_CORE = 125.0


def make_tiles(data: Path, n_tiles: int, size: int = 256, quality: int = 95) -> list[bytes]:
    """JPEG tiles cut on a grid from the MoNuSeg H&E images, as the tiler writes them."""
    tiles: list[bytes] = []
    for path in sorted((data / "monuseg_kumar_norm" / "NormalizedPNG").glob("*.png")):
        img = np.asarray(Image.open(path).convert("RGB"))
        for y in range(0, img.shape[0] - size + 1, size):
            for x in range(0, img.shape[1] - size + 1, size):
                buf = io.BytesIO()
                Image.fromarray(img[y : y + size, x : x + size]).save(buf, "JPEG", quality=quality)
                tiles.append(buf.getvalue())
                if len(tiles) == n_tiles:
                    return tiles
    return tiles


# ----------------------------------------------------------------------------- torchvision baseline


class _Rot90:
    """Random multiple of 90 degrees on a PIL image (transforms.v2 has no such op)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        k = int(torch.randint(0, 4, ()).item())
        return img if k == 0 else img.rotate(90 * k)


def torchvision_multicrop(cfg: MultiCropConfig) -> Callable[[bytes], dict[str, list[torch.Tensor]]]:
    """The DINOv2 recipe with torchvision.transforms.v2 on PIL images, one Compose per crop kind."""
    bicubic = v2.InterpolationMode.BICUBIC
    jitter = v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p)
    tail = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]

    def view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic),
                v2.RandomHorizontalFlip(cfg.hflip_p),
                v2.RandomVerticalFlip(cfg.vflip_p),
                _Rot90(),
                jitter,
                v2.RandomGrayscale(cfg.grayscale_p),
                v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel_size, cfg.blur_sigma)], p=blur_p),
                v2.RandomSolarize(128, p=solarize_p),
                *tail,
            ]
        )

    g1 = view(cfg.global_size, cfg.global_scale, cfg.global_blur_p[0], cfg.global_solarize_p[0])
    g2 = view(cfg.global_size, cfg.global_scale, cfg.global_blur_p[1], cfg.global_solarize_p[1])
    local = view(cfg.local_size, cfg.local_scale, cfg.local_blur_p, cfg.local_solarize_p)

    def transform(data: bytes) -> dict[str, list[torch.Tensor]]:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return {"global_crops": [g1(img), g2(img)], "local_crops": [local(img) for _ in range(cfg.n_local)]}

    return transform


# ----------------------------------------------------------------------------- measurement


def best_rate(fn: Callable[[int], Any], n: int, repeats: int, warmup: int = 5) -> dict[str, float]:
    """Best samples/s over ``repeats`` runs of ``n`` calls, by wall time and by this thread's CPU time."""
    for i in range(warmup):
        fn(i)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        for i in range(n):
            fn(i)
        wall.append(n / (time.perf_counter() - t0))
        cpu.append(n / (time.thread_time() - c0))
    return {"per_s": round(max(wall), 1), "per_cpu_s": round(max(cpu), 1)}


class _TileDataset(Dataset):
    def __init__(self, tiles: list[bytes], aug: MultiCropAugment, n: int) -> None:
        self.tiles, self.aug, self.n = tiles, aug, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.aug(self.tiles[index % len(self.tiles)], key=index)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def loader_rate(
    tiles: list[bytes], aug: MultiCropAugment, n: int, workers: int, batch: int, repeats: int
) -> dict[str, float]:
    """Samples/s through a DataLoader (wall time, first batch excluded: worker start-up)."""
    rates = []
    for _ in range(repeats):
        loader = DataLoader(
            _TileDataset(tiles, aug, n + batch),
            batch_size=batch,
            num_workers=workers,
            collate_fn=collate_multicrop,
            worker_init_fn=_one_thread,
            prefetch_factor=4,
        )
        it = iter(loader)
        next(it)
        t0, c0, count = time.perf_counter(), time.process_time(), 0
        for b in it:
            count += b["collated_global_crops"].shape[0] // b["n_global_crops"]
        wall = time.perf_counter() - t0
        rates.append((count / wall, (time.process_time() - c0) / wall))
    best, main_busy = max(rates)
    return {"per_s": round(best, 1), "per_worker": round(best / workers, 1), "main_process_cores": round(main_busy, 2)}


def photometric_rate(
    tiles: list[bytes], cfg: MultiCropConfig, batch: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Samples/s of MultiCropPhotometric on collated batches (``device``; uint8 copy to it included)."""
    geo = MultiCropAugment(cfg, photometric=False)
    keys = [list(range(b * batch, (b + 1) * batch)) for b in range(2)]
    batches = [collate_multicrop([geo(tiles[k % len(tiles)], key=k) for k in ks]) for ks in keys]
    if device.type == "cuda":
        batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    photometric = MultiCropPhotometric(cfg)

    def step(i: int) -> None:
        b = batches[i % 2]
        b = dict(
            b,
            collated_global_crops=b["collated_global_crops"].to(device, non_blocking=True),
            collated_local_crops=b["collated_local_crops"].to(device, non_blocking=True),
        )
        photometric(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    n_batches = 4 if device.type == "cpu" else 50
    rate = best_rate(step, n_batches, repeats, warmup=2)
    return {key: round(value * batch, 1) for key, value in rate.items()}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "bench_augment.json")
    p.add_argument("--samples", type=int, default=200, help="samples per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiles", type=int, default=120, help="distinct 256 px tiles to cycle through")
    p.add_argument("--batch", type=int, default=32, help="batch size for the batched photometric part and loaders")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--device", default="cpu", help="where the batched photometric part runs: cpu or cuda")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")

    torch.set_num_threads(1)
    tiles = make_tiles(args.data, args.tiles)
    cfg = MultiCropConfig()
    full, geo = MultiCropAugment(cfg), MultiCropAugment(cfg, photometric=False)
    baseline = torchvision_multicrop(cfg)
    n = args.samples

    def tile(i: int) -> bytes:
        return tiles[i % len(tiles)]

    rows: dict[str, dict[str, float]] = {
        "torchvision_pil": best_rate(lambda i: baseline(tile(i)), n, args.repeats),
        "ours_full": best_rate(lambda i: full(tile(i), key=i), n, args.repeats),
        "ours_geometric": best_rate(lambda i: geo(tile(i), key=i), n, args.repeats),
        "ours_photometric_batched": photometric_rate(tiles, cfg, args.batch, args.repeats, torch.device("cpu")),
    }
    if device.type != "cpu":
        rows[f"ours_photometric_batched_{device.type}"] = photometric_rate(tiles, cfg, args.batch, args.repeats, device)
    full_bf16 = MultiCropAugment(cfg, dtype=torch.bfloat16)
    for name, aug in (("full", full), ("full_bf16", full_bf16), ("geometric", geo)):
        rate = loader_rate(tiles, aug, 4 * n, args.workers, args.batch, args.repeats)
        rows[f"dataloader_{name}_{args.workers}w"] = rate

    base = rows["torchvision_pil"]["per_s"]
    header = ("pipeline (1 thread per process)", "samples/s", "per CPU-s", "per worker", "main cores", "vs tv")
    print(f"{header[0]:<36} {header[1]:>10} {header[2]:>10} {header[3]:>11} {header[4]:>11} {header[5]:>6}")
    for name, r in rows.items():
        per_cpu = f"{r['per_cpu_s']:>10.1f}" if "per_cpu_s" in r else f"{'':>10}"
        per_worker = f"{r['per_worker']:>11.1f}" if "per_worker" in r else f"{'':>11}"
        main_cores = f"{r['main_process_cores']:>11.2f}" if "main_process_cores" in r else f"{'':>11}"
        print(f"{name:<36} {r['per_s']:>10.1f} {per_cpu} {per_worker} {main_cores} {r['per_s'] / base:>5.1f}x")
    goal_met = rows["ours_full"]["per_s"] >= GOAL_PER_CORE
    print(f"goal >= {GOAL_PER_CORE:.0f} samples/s per core, full pipeline: {'met' if goal_met else 'NOT met'}")

    write_json(
        args.out,
        {
            "benchmark": "bench_augment",
            "unit": "multi-crop samples (2x224 + 8x96) per second",
            "goal_per_core": GOAL_PER_CORE,
            "goal_met_full_pipeline": goal_met,
            "config": {k: v for k, v in vars(cfg).items()},
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": {
                "cpu_count": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "load_avg_1m": os.getloadavg()[0],
            },
            "results": rows,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
