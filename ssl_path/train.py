"""The one training loop: any method, one process or many, CPU or GPU, resumable exactly.

The loop knows a method only through its interface (``ssl_path.methods``): it feeds it batches,
steps the optimiser with the schedules, moves the teacher, logs, and checkpoints. Everything that
varies over time is a pure function of the step (``ssl_path.schedules``), and the data stream is a
pure function of (seed, rank, worker, batches consumed); so a checkpoint that stores weights,
optimiser state, step and RNG state is enough to continue exactly where a killed run left off.

Checkpoints (``RUN_DIR/checkpoints/last.pt``, plus a retained copy every ``keep_every`` steps) are
whole, unsharded state dicts written atomically by rank 0, gathered from FSDP shards when FSDP is on,
so they resume at any world size and load on one CPU.
"""
from __future__ import annotations

import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ssl_path.data.loader import shard_loader
from ssl_path.distributed import DistInfo, all_finite, barrier
from ssl_path.encoder import read_checkpoint
from ssl_path.errors import UserError
from ssl_path.io import atomic_path
from ssl_path.optim import param_groups
from ssl_path.run_log import MetricsLog, plot_run
from ssl_path.schedules import cosine, warmup_cosine

CHECKPOINT_FORMAT = "ssl-path/checkpoint/v1"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
PRECISIONS = ("auto", "bf16", "fp32")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedules; epochs are ``train.steps_per_epoch`` steps. Defaults: DINOv2's."""

    lr: float = 0.004  # at a global batch of 1024, scaled by lr_scaling
    lr_scaling: str = "sqrt"  # "sqrt" | "linear" | "none" with respect to a global batch of 1024
    min_lr: float = 1.0e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    clip_grad: float = 3.0  # 0 turns clipping off
    freeze_last_layer_epochs: float = 1.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.lr_scaling not in ("sqrt", "linear", "none"):
            raise ValueError(f"lr_scaling must be sqrt, linear or none, not {self.lr_scaling!r}")

    def peak_lr(self, global_batch: int) -> float:
        ratio = global_batch / 1024
        return self.lr * {"sqrt": ratio**0.5, "linear": ratio, "none": 1.0}[self.lr_scaling]


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # per process
    epochs: float = 100.0
    steps_per_epoch: int = 1250  # dinov2's OFFICIAL_EPOCH_LENGTH: an "epoch" is a number of steps
    num_workers: int = 8
    shuffle_buffer: int = 1000
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    strategy: str = "ddp"  # with several processes: ddp, or fsdp for models that do not fit
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    keep_every: int = 0  # also keep checkpoints/step_NNNNNNN.pt every this many steps (0: never)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if self.batch_size < 1 or self.steps_per_epoch < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("batch_size, steps_per_epoch, log_every and checkpoint_every must be >= 1")

    @property
    def total_steps(self) -> int:
        return int(round(self.epochs * self.steps_per_epoch))


class TrainingDiverged(Exception):
    """A loss term went non-finite; nothing of that step was saved."""


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST


def train(
    method: nn.Module,
    data: Any,
    run_dir: Path,
    optim_cfg: OptimConfig,
    cfg: TrainConfig,
    config: dict[str, Any],
    seed: int = 0,
    dist_info: DistInfo = DistInfo(),
    max_steps: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Train ``method`` on the shards ``data`` into ``run_dir``, resuming from its last checkpoint.

    ``config`` (the resolved run config) is stored in every checkpoint. ``max_steps`` stops early
    without changing the schedules, which always span ``cfg.total_steps``.
    """
    device = resolve_device(cfg.device, dist_info)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    method.to(device)
    if dist_info.world_size > 1 and cfg.strategy == "fsdp":
        _shard(method)
    optimizer = torch.optim.AdamW(
        param_groups(method, optim_cfg.layerwise_decay, optim_cfg.patch_embed_lr_mult), lr=0.0, betas=optim_cfg.betas
    )
    total = cfg.total_steps
    end = min(total, max_steps) if max_steps is not None else total
    start, wall_before = _resume(method, optimizer, run_dir, cfg, dist_info, config)
    if cfg.compile and hasattr(method, "compile_parts"):
        method.compile_parts()
    step_fn = method
    if dist_info.world_size > 1 and cfg.strategy == "ddp":
        step_fn = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)

    loader = shard_loader(
        data, "train", cfg.batch_size, transform=method.data_transform(), collate_fn=method.collate_fn(),
        num_workers=cfg.num_workers, seed=seed, shuffle_buffer=cfg.shuffle_buffer,
        pin_memory=device.type == "cuda", start_batch=start,
    )
    batches: Iterator[Any] = iter(loader)
    log = MetricsLog(run_dir, resume_step=start) if dist_info.is_main else None
    bar = tqdm(total=end, initial=start, desc="pretrain", disable=not (progress and dist_info.is_main), dynamic_ncols=True)
    global_batch = cfg.batch_size * dist_info.world_size
    peak_lr = optim_cfg.peak_lr(global_batch)
    warmup = int(round(optim_cfg.warmup_epochs * cfg.steps_per_epoch))
    freeze = int(round(optim_cfg.freeze_last_layer_epochs * cfg.steps_per_epoch))
    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
    run_start = time.perf_counter()
    method.train()
    step = start
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            batch = _to_device(next(batches), device)
            window_wait += time.perf_counter() - t0
            lr = warmup_cosine(step, total, warmup, peak_lr, optim_cfg.min_lr)
            wd = cosine(step, total, optim_cfg.weight_decay, optim_cfg.weight_decay_end)
            momentum = cosine(step, total, optim_cfg.momentum_teacher, optim_cfg.final_momentum_teacher)
            for group in optimizer.param_groups:
                frozen = group["last_layer"] and step < freeze
                group["lr"] = 0.0 if frozen else lr * group["lr_multiplier"]
                group["weight_decay"] = wd * group["wd_multiplier"]
            logs = dict(method.set_step(step)) if hasattr(method, "set_step") else {}

            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                out = step_fn(batch)
            _stop_if_not_finite(out, step)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if optim_cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_([p for p in method.parameters() if p.grad is not None], optim_cfg.clip_grad)
            optimizer.step()
            if hasattr(method, "update_teacher"):
                method.update_teacher(momentum)
            window_steps += 1

            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "epoch": round(done / cfg.steps_per_epoch, 4)}
                record.update({k: float(v.detach()) for k, v in out.items()})
                record.update(lr=lr, wd=wd, momentum=momentum, **logs)
                record.update(
                    img_per_s=round(window_steps * global_batch / max(elapsed, 1e-9), 2),
                    data_wait=round(window_wait / max(elapsed, 1e-9), 4),
                    time=round(wall_before + time.perf_counter() - run_start, 2),
                )
                if log is not None:
                    log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == end:
                keep = cfg.keep_every > 0 and done % cfg.keep_every == 0
                save_checkpoint(method, optimizer, run_dir, done, config, cfg, dist_info,
                                wall_before + time.perf_counter() - run_start, keep=keep)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if dist_info.is_main and (Path(run_dir) / "metrics.jsonl").exists() and end > start:
        plot_run(run_dir)
    return method


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor) or hasattr(batch, "to"):
        return batch.to(device, non_blocking=True)
    return batch


def _stop_if_not_finite(out: dict[str, torch.Tensor], step: int) -> None:
    names = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
    values = torch.stack([out[k].detach().float().reshape(()) for k in names])
    finite = all_finite(values).tolist()
    if not all(finite):
        bad = [n for n, ok in zip(names, finite) if not ok and n != "loss"] or ["loss"]
        raise TrainingDiverged(f"non-finite loss term {bad[0]!r} at step {step + 1}; nothing of this step was saved")


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    method: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, step: int, config: dict[str, Any],
    cfg: TrainConfig, dist_info: DistInfo, wall_time: float, keep: bool = False,
) -> None:
    """Write ``checkpoints/last.pt`` atomically (rank 0), gathering sharded state from every rank."""
    model_state, optim_state = _full_state(method, optimizer)
    if dist_info.is_main:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "method": getattr(method, "name", type(method).__name__),
            "step": step,
            "config": config,
            "model": model_state,
            "optimizer": optim_state,
            "encoder": method.encoder_state(model_state),
            "rng": _rng_state(),
            "data": {"batches": step, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                     "world_size": dist_info.world_size},
            "wall_time": wall_time,
            "torch": str(torch.__version__),
        }
        last = checkpoint_path(run_dir)
        with atomic_path(last) as tmp:
            with tmp.open("wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
        if keep:
            kept = last.with_name(f"step_{step:07d}.pt")
            kept.unlink(missing_ok=True)
            os.link(last, kept)  # last.pt is only ever replaced, never written in place
    barrier()


def _full_state(method: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    if _is_sharded(method):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(method, optimizer, options=options)
    return method.state_dict(), optimizer.state_dict()


def _resume(
    method: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, cfg: TrainConfig, dist_info: DistInfo,
    config: dict[str, Any],
) -> tuple[int, float]:
    path = checkpoint_path(run_dir)
    if not path.exists():
        return 0, 0.0
    checkpoint = read_checkpoint(path)
    if checkpoint.get("format") != CHECKPOINT_FORMAT or "model" not in checkpoint:
        raise UserError(f"{path} is not an ssl-path training checkpoint")
    data = checkpoint.get("data", {})
    if dist_info.is_main and (data.get("num_workers"), data.get("world_size")) != (cfg.num_workers, dist_info.world_size):
        print(
            f"warning: resuming with {cfg.num_workers} workers x {dist_info.world_size} processes where the run had "
            f"{data.get('num_workers')} x {data.get('world_size')}: the data order differs from an uninterrupted run",
            file=sys.stderr,
        )
    optim_state = checkpoint["optimizer"]
    if _is_sharded(method) or _keyed_by_name(optim_state):
        # FSDP runs save name-keyed optimiser state; these APIs load it at any world size, or unsharded.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(method, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        method.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(optim_state)
    _set_rng_state(checkpoint["rng"])
    return int(checkpoint["step"]), float(checkpoint.get("wall_time", 0.0))


def _keyed_by_name(optim_state: dict) -> bool:
    return any(isinstance(k, str) for k in optim_state.get("state", {}))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- FSDP


def _shard(method: nn.Module) -> None:
    """FSDP2 over the units the method names (``fsdp_units()``, innermost first), else its children."""
    from torch.distributed.fsdp import fully_shard

    units = method.fsdp_units() if hasattr(method, "fsdp_units") else list(method.children())
    for unit in units:
        # Explicit: the outer units are FSDP roots, which otherwise stay unsharded after forward
        # (the teacher, run without backward, would then never reshard).
        fully_shard(unit, reshard_after_forward=True)


def _is_sharded(method: nn.Module) -> bool:
    return dist.is_available() and dist.is_initialized() and any(
        type(p).__name__ == "DTensor" for p in method.parameters()
    )
