"""Speed of fine-tuning: a segmentation and a classification training step, and sliding-window inference.

Every step goes through the task contract the loop trains (:class:`finetune.task.HeadTask`): the
encoder from ``finetune.task.load_encoder(--ckpt, EncoderTuning(mode))``, a head from the head task's
own ``build``, ``forward`` -> loss, backward, clipping at ``optim.clip_grad`` and AdamW over
``task.param_groups(optim)`` (``OptimConfig(lr=1e-3, lr_scaling="none")``, each group at its
``lr_multiplier`` as the loop sets it), bf16 autocast on CUDA as the loop does. It times:

- ``segment``: the U-Net decoder of :mod:`finetune.segment` (labels ``cell`` and ``nucleus``,
  multilabel Dice + BCE) on random ``--crop`` px crops with random float [B, 2, H, W] targets, for
  encoder modes ``frozen`` and ``full``;
- ``classify``: :class:`finetune.classify.LinearHead` + cross-entropy at the encoder's input size,
  for modes ``frozen``, ``lora`` and ``full``;
- ``predict``: :func:`finetune.segment.predict_probs` of one ``--image-size`` px image (1000 px, as a
  MoNuSeg image) by Gaussian-blended half-overlapping ``--crop`` px windows, the encoder frozen and
  the task in eval mode: images/s and windows/s, in float32 as the stage calls it, and on CUDA also
  under bf16 autocast (what the stage would gain from it).

Batches are random tensors already on the device: data loading and augmentation are not included
(``bench_augment.py`` measures those). ``trainable M`` is the parameters the optimiser updates; on
CUDA ``peak GiB`` is the step's peak allocated memory.

    .venv/bin/python benchmarks/bench_finetune.py [--ckpt REF] [--device cuda] [--batch-size 32]
        [--crop 224] [--steps 10] [--warmup 3] [--tasks segment classify predict] [--out PATH]

Prints a table and writes ``benchmarks/out/bench_finetune.json``. A quick CPU check:

    .venv/bin/python benchmarks/bench_finetune.py --ckpt timm:vit_tiny_patch16_224 --crop 112
        --batch-size 4 --steps 2 --warmup 1 --out /tmp/bf.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune import classify, segment  # noqa: E402
from finetune.config import EncoderTuning  # noqa: E402
from finetune.task import HeadTask, load_encoder  # noqa: E402
from ssl_path.data.readers import LabelledSet, Record  # noqa: E402
from ssl_path.training.config import OptimConfig  # noqa: E402

OPTIM = OptimConfig(lr=1e-3, lr_scaling="none")
LABELS = {"cell": [128, 255], "nucleus": [255]}  # WBC masks 0/128/255
CLASSES = ("a", "b")
SEGMENT_MODES = ("frozen", "full")
CLASSIFY_MODES = ("frozen", "lora", "full")
TASKS = ("segment", "classify", "predict")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def segment_task(ref: str, mode: str, crop: int) -> tuple[HeadTask, segment.SegmentConfig]:
    cfg = segment.SegmentConfig(labels=LABELS, crop=crop)
    tuning = EncoderTuning(mode=mode)
    encoder, info, kwargs = load_encoder(ref, tuning)
    head, criterion = segment.build(cfg, info, None)
    return HeadTask("segment", encoder, info, kwargs, head, criterion, tuning), cfg


def classify_task(ref: str, mode: str) -> tuple[HeadTask, int]:
    cfg = classify.ClassifyConfig()
    tuning = EncoderTuning(mode=mode)
    encoder, info, kwargs = load_encoder(ref, tuning)
    records = [Record(path=f"bench_{i}.png", label=CLASSES[i % len(CLASSES)]) for i in range(4)]
    head, criterion = classify.build(cfg, info, LabelledSet(records, CLASSES, name="bench", source=""))
    size = cfg.input_size or info.input_size[-1]
    return HeadTask("classify", encoder, info, kwargs, head, criterion, tuning), size


def train_step_fn(task: HeadTask, batch: dict[str, torch.Tensor], bf16: bool) -> Callable[[], None]:
    """One step of the loop (``ssl_path.training.loop.train``) on a fixed batch."""
    device = batch["image"].device
    optimizer = torch.optim.AdamW(task.param_groups(OPTIM), lr=0.0, betas=OPTIM.betas)
    lr = OPTIM.peak_lr(batch["image"].shape[0])
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = OPTIM.weight_decay * group["wd_multiplier"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    task.train()

    def step() -> None:
        task.set_step(0)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = task(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if OPTIM.clip_grad > 0:
            nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], OPTIM.clip_grad)
        optimizer.step()
        task.after_optimizer_step()

    return step


def predict_fn(
    task: HeadTask, cfg: segment.SegmentConfig, image: torch.Tensor, bf16: bool
) -> tuple[Callable[[], None], int]:
    """One whole-image sliding-window prediction, and the number of windows it runs."""
    task.eval()
    device = next(task.parameters()).device

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            segment.predict_probs(task, image, cfg)

    windows = 0
    logits = task.logits

    def counting(images: torch.Tensor) -> torch.Tensor:
        nonlocal windows
        windows += images.shape[0]
        return logits(images)

    task.logits = counting  # an instance attribute shadows the method for this one call
    try:
        step()
    finally:
        del task.logits
    return step, windows


def measure(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> tuple[float, float | None]:
    """(seconds per step, peak GiB allocated on CUDA or None)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def trainable(task: HeadTask) -> float:
    return sum(p.numel() for p in task.parameters() if p.requires_grad) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="timm:vit_small_patch16_224", help="any encoder ref")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="training steps (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--crop", type=int, default=segment.SegmentConfig.crop, help="segmentation crop and window")
    parser.add_argument("--image-size", type=int, default=1000, help="side of the image the predict row segments")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (predict: timed images)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "bench_finetune.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (32 if cuda else 8)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    print(f"device: {name} ({threads} threads); encoder {args.ckpt}; batch {batch_size}; crop {args.crop}")
    header = f"{'step':<10}{'mode':<8}{'input':>7}{'batch':>7}{'img/s':>10}{'win/s':>10}{'trainable M':>13}"
    print(header + (f"{'peak GiB':>10}" if cuda else ""))
    rows: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(0)

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        windows = f"{row['windows_per_s']:>10.1f}" if "windows_per_s" in row else f"{'-':>10}"
        line = (
            f"{row['step']:<10}{row['mode']:<8}{row['input']:>7}{row['batch_size']:>7}{row['img_per_s']:>10.2f}"
            f"{windows}{row['trainable_m']:>13.2f}"
        )
        print(line + (f"{row['peak_gib']:>10.2f}" if cuda else ""), flush=True)

    def free() -> None:
        if cuda:
            torch.cuda.empty_cache()

    if "segment" in args.tasks:
        n_labels = len(LABELS)
        batch = {
            "image": torch.randn(batch_size, 3, args.crop, args.crop, generator=generator).to(device),
            "target": (torch.rand(batch_size, n_labels, args.crop, args.crop, generator=generator) < 0.3)
            .float()
            .to(device),
        }
        for mode in SEGMENT_MODES:
            task, _ = segment_task(args.ckpt, mode, args.crop)
            task.to(device)
            seconds, peak = measure(train_step_fn(task, batch, bf16=cuda), device, args.steps, args.warmup)
            report({"step": "segment", "mode": mode, "input": args.crop, "batch_size": batch_size,
                    "img_per_s": round(batch_size / seconds, 2), "trainable_m": round(trainable(task), 3),
                    "peak_gib": None if peak is None else round(peak, 3)})  # fmt: skip
            del task
            free()
    if "classify" in args.tasks:
        for mode in CLASSIFY_MODES:
            task, size = classify_task(args.ckpt, mode)
            task.to(device)
            batch = {
                "image": torch.randn(batch_size, 3, size, size, generator=generator).to(device),
                "target": torch.randint(0, len(CLASSES), (batch_size,), generator=generator).to(device),
            }
            seconds, peak = measure(train_step_fn(task, batch, bf16=cuda), device, args.steps, args.warmup)
            report({"step": "classify", "mode": mode, "input": size, "batch_size": batch_size,
                    "img_per_s": round(batch_size / seconds, 2), "trainable_m": round(trainable(task), 3),
                    "peak_gib": None if peak is None else round(peak, 3)})  # fmt: skip
            del task
            free()
    if "predict" in args.tasks:
        task, cfg = segment_task(args.ckpt, "frozen", args.crop)
        task.to(device)
        image = torch.randn(3, args.image_size, args.image_size, generator=generator)
        for precision in ("fp32", "bf16") if cuda else ("fp32",):
            step, windows = predict_fn(task, cfg, image, bf16=precision == "bf16")
            seconds, peak = measure(step, device, args.steps, max(0, args.warmup - 1))  # predict_fn ran it once
            report({"step": "predict", "mode": precision, "input": args.image_size, "batch_size": 1,
                    "windows": windows, "window_batch": 4, "img_per_s": round(1 / seconds, 3),
                    "windows_per_s": round(windows / seconds, 2), "trainable_m": 0.0,
                    "peak_gib": None if peak is None else round(peak, 3)})  # fmt: skip
        del task
        free()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(),
                "device": name,
                "threads": threads,
                "torch": str(torch.__version__),
                "timm": timm.__version__,
                "encoder": args.ckpt,
                "batch_size": batch_size,
                "crop": args.crop,
                "steps": args.steps,
                "warmup": args.warmup,
                "bf16": cuda,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
