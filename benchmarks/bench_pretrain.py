"""Speed of a full pretraining step (DINOv2 or MAE, with the shipped config's recipe) beside a plain timm step.

For each backbone and mode (eager, compiled) it times:

- the method's step through the task contract: ``set_step``, ``forward`` + backward, AdamW over the
  method's ``param_groups``, ``after_optimizer_step``, bf16 autocast on CUDA, on a batch of its
  shape: DINOv2 2x224 + 8x96 crops with iBOT masks from the real collate (heads, losses, teacher
  EMA); MAE one 224 px view with the real collate's masking noise (75 % of the patches removed);
- ``supervised``: the same timm backbone with a 1000-class head, one 224 px view, cross-entropy;

and reports images/s (an image = one source tile with all its crops) and model FLOP utilisation:
FLOPs of one step from ``torch.utils.flop_counter`` divided by the step time and by the device's
measured peak (a large bf16 matmul on CUDA, float32 on the CPU). Data loading is not included
(``bench_augment.py`` measures it). Goals on one H100: DINOv2 ViT-S/16 >= 2,000 img/s, ViT-B/16
>= 50% MFU; MAE ViT-B/16 >= 4,000 img/s.

    .venv/bin/python benchmarks/bench_pretrain.py [--method dinov2|mae] [--device cuda] [--batch-size 128]
        [--steps 20] [--compile]

Prints a table and writes ``benchmarks/out/bench_pretrain_METHOD.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_path.methods import methods  # noqa: E402
from ssl_path.methods.masking import batch_masks  # noqa: E402
from ssl_path.pretrain import resolve_config  # noqa: E402

# The shipped config of each method and backbone; the first two of a method are its default backbones.
CONFIGS = {
    "dinov2": {"vit_small_patch16_224": "dinov2_vits16", "vit_base_patch16_224": "dinov2_vitb16"},
    "mae": {"vit_base_patch16_224": "mae_vitb16", "vit_large_patch16_224": "mae_vitl16"},
}


def measured_peak(device: torch.device) -> tuple[float, str]:
    """FLOP/s of a large square matmul: bf16 on CUDA, float32 on the CPU."""
    dtype, n, reps = (torch.bfloat16, 8192, 20) if device.type == "cuda" else (torch.float32, 2048, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):  # best of 3: a busy moment must not lower the peak (and inflate the MFU)
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best, str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def dinov2_batch(cfg, batch_size: int, device: torch.device, patch: int) -> dict:
    crops = cfg.method_cfg.crops
    grid = crops.global_size // patch
    rng = np.random.default_rng(0)
    masks = batch_masks(
        rng, crops.n_global * batch_size, (grid, grid), cfg.method_cfg.mask_ratio, cfg.method_cfg.mask_probability
    )
    return {
        "collated_global_crops": torch.randn(
            crops.n_global * batch_size, 3, crops.global_size, crops.global_size, device=device
        ),
        "collated_local_crops": torch.randn(
            crops.n_local * batch_size, 3, crops.local_size, crops.local_size, device=device
        ),
        "collated_masks": torch.from_numpy(masks).to(device),
        "n_global_crops": crops.n_global,
        "n_local_crops": crops.n_local,
    }


def mae_batch(method, batch_size: int, device: torch.device) -> dict:
    size = method.cfg.view.size
    samples = [{"image": torch.randn(3, size, size), "key": str(i), "index": i} for i in range(batch_size)]
    return {k: v.to(device) for k, v in method.collate_fn()(samples).items()}


def method_step_fn(
    name: str,
    arch: str,
    batch_size: int,
    device: torch.device,
    compile_backend: str | None,
    bf16: bool,
    config: str | None = None,
    overrides: list[str] = (),
):
    """One training step of method ``name`` (``compile_backend`` None: eager); ``config`` defaults to
    the method's shipped config for ``arch``, ``overrides`` apply to it."""
    config = config or CONFIGS[name].get(arch, next(iter(CONFIGS[name].values())))
    overrides = [f"model.arch={arch}", *(["dinov2.photometric=workers"] if name == "dinov2" else []), *overrides]
    cfg = resolve_config(config, overrides)
    method = methods()[name].build(cfg.method_cfg, cfg.model, cfg.train, 0, device).to(device)
    method.train()
    method.set_step(0)
    if compile_backend:
        method.compile_parts(backend=compile_backend)
    optimizer = torch.optim.AdamW(method.param_groups(cfg.optim), lr=1e-4, fused=device.type == "cuda")
    if name == "dinov2":
        batch = dinov2_batch(cfg, batch_size, device, method.patch_size)
    else:
        batch = mae_batch(method, batch_size, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = method(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_optimizer_step()

    return step


def supervised_step_fn(
    arch: str, batch_size: int, device: torch.device, compile_backend: str | None, bf16: bool, size: int = 224
):
    model = timm.create_model(arch, num_classes=1000, img_size=size).to(device).train()
    if compile_backend:
        model.compile(backend=compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(step, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per step, FLOPs per step)."""
    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps, float(counter.get_total_flops())


def step_row(
    step: str, arch: str, mode: str, batch_size: int, seconds: float, flops: float, peak: float | None
) -> dict:
    """One timed step as a table row: img/s and, where the device's peak is known, MFU."""
    return {
        "step": step,
        "arch": arch,
        "mode": mode,
        "batch_size": batch_size,
        "img_per_s": round(batch_size / seconds, 2),
        "tflop_per_step": round(flops / 1e12, 4),
        "mfu": round(flops / seconds / peak, 4) if peak else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(CONFIGS), default="dinov2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", default=None, help="timm backbones (default: the method's two)")
    parser.add_argument("--batch-size", type=int, default=None, help="per step (default 128 on CUDA, 4 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/out/bench_pretrain_METHOD.json")
    args = parser.parse_args()
    archs = args.archs or list(CONFIGS[args.method])
    out = args.out or REPO / "benchmarks" / "out" / f"bench_pretrain_{args.method}.json"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (128 if cuda else 4)
    steps = args.steps or (20 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    peak, peak_dtype = measured_peak(device)
    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    print(f"device: {name}; measured {peak_dtype} matmul peak {peak / 1e12:.2f} TFLOP/s; batch {batch_size}")
    rows = []
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    for arch in archs:
        for mode in modes:
            for kind in (args.method, "supervised"):
                backend = "inductor" if mode == "compiled" else None
                if kind == "supervised":
                    step = supervised_step_fn(arch, batch_size, device, backend, bf16=cuda)
                else:
                    step = method_step_fn(kind, arch, batch_size, device, backend, bf16=cuda)
                seconds, flops = measure(step, device, steps, warmup)
                row = step_row(kind, arch, mode, batch_size, seconds, flops, peak)
                rows.append(row)
                print(
                    f"{arch:<24}{kind:<12}{mode:<10}{row['img_per_s']:>10.1f} img/s{100 * row['mfu']:>8.1f}% MFU"
                    f"{row['tflop_per_step']:>9.3f} TFLOP/step"
                )
                del step
                if cuda:
                    torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "method": args.method,
                "device": name,
                "peak_flops": peak,
                "peak_dtype": peak_dtype,
                "torch": str(torch.__version__),
                "timm": timm.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
