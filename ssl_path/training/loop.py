"""The one training loop: any task (a pretraining method or a head), one process or many, CPU or GPU,
resumable exactly.

The loop knows a task only through :class:`ssl_path.training.task.TrainingTask`: it feeds it
batches, steps the optimiser with the schedules, calls the task's hooks, logs and checkpoints.
Everything that varies over time is a pure function of the step (``ssl_path.training.schedules``
and the task's ``set_step``); batches come from ``stream(start_batch)``, a factory that can restart
a stream at an exact position (``ssl_path.data.loader.shard_loader(..., start_batch=n)``, say).
So a checkpoint that stores weights, optimiser state, step and every rank's RNG state is enough to
continue exactly where a killed run left off (on a GPU as exactly as its kernels are deterministic:
some backward passes, of indexing and gathers, add up with atomics in no fixed order).

Checkpoints (``RUN_DIR/checkpoints/last.pt``, plus a retained copy every ``keep_every`` steps;
:mod:`ssl_path.encoder.checkpoint`) are whole, unsharded state dicts written atomically by rank 0,
gathered from FSDP shards when FSDP is on, so they resume at any world size and load on one CPU.

Under a scheduler that warns before it preempts or ends a job, the stage runs within
:func:`ssl_path.core.errors.stop_on_signal`: after each step the ranks agree whether any of them
was signalled, and if so every rank stops at that same step, rank 0 saves it, and the loop raises
:class:`~ssl_path.core.errors.StopRequested`; only the step in flight when the signal came is
finished first, none is lost, and rerunning the same command resumes it (``slurm/job.py``).

A stream may skip what it cannot read and say so in its batches (``train(..., skipped_key=...)``):
the loop counts the skips, names each shard with one on stderr once, lists them in
``RUN_DIR/skipped.jsonl``, logs ``skipped_samples`` and ``skipped_shards`` in metrics.jsonl, and
stops in one line when more are skipped than ``train.max_skipped_fraction`` allows.

A task that logs collapse statistics (:mod:`ssl_path.training.collapse`) is watched: one line on
stderr, once, when one of them says for a window of steps that the run learns nothing.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ssl_path.core.cli import resolve_device
from ssl_path.core.config import first_difference, lookup
from ssl_path.core.distributed import DistInfo, all_finite, any_rank, barrier
from ssl_path.core.errors import StopRequested, UserError, stop_armed, stop_requested
from ssl_path.core.io import atomic_path
from ssl_path.encoder.checkpoint import (
    checkpoint_path,
    kept_path,
    read_training_checkpoint,
    save_checkpoint,
)
from ssl_path.training.collapse import CollapseWatch
from ssl_path.training.config import OptimConfig, TrainConfig
from ssl_path.training.metrics_log import MetricsLog, plot_run, read_metrics
from ssl_path.training.schedules import cosine, warmup_cosine
from ssl_path.training.task import TrainingTask

# A stream factory: the batches of a run from batch ``start`` on, the same whenever it is restarted there.
StreamFactory = Callable[[int], Iterator[Any]]
# What a stream could not read: (shard, key, reason), key "" for a whole shard.
SkipRecord = Sequence[str]
SKIPS_LOG = "skipped.jsonl"


class TrainingDiverged(Exception):
    """A loss term went non-finite; nothing of that step was saved."""


def train(
    task: TrainingTask,
    stream: StreamFactory,
    run_dir: Path,
    optim_cfg: OptimConfig,
    cfg: TrainConfig,
    config: dict[str, Any],
    dist_info: DistInfo = DistInfo(),
    max_steps: int | None = None,
    progress: bool = True,
    desc: str = "train",
    skipped_key: str | None = None,
    skipped: Sequence[SkipRecord] = (),
    announce_resume: bool = True,
) -> TrainingTask:
    """Train ``task`` on ``stream`` into ``run_dir``, resuming from its last checkpoint, which it
    says unless told not to (``announce_resume``: a caller that trains round by round continues its run).

    ``config`` (the resolved run config) is stored in every checkpoint. ``max_steps`` stops early
    without changing the schedules, which always span ``cfg.total_steps``.

    ``skipped_key``: the key under which the stream's batches (dicts) list what it skipped to make
    them (``ssl_path.data.loader.SKIPPED``); a step whose batch holds nothing else makes no update.
    ``skipped``: what was found unreadable before the stream started (a check that named it already).
    """
    if not isinstance(task, TrainingTask):
        raise TypeError(f"the loop trains a TrainingTask, not a {type(task).__name__}")
    device = resolve_device(cfg.device, dist_info.local_rank)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    task.to(device)
    if dist_info.world_size > 1 and cfg.strategy == "fsdp":
        _shard(task)
    optimizer = torch.optim.AdamW(task.param_groups(optim_cfg), lr=0.0, betas=optim_cfg.betas)
    total = cfg.total_steps
    end = min(total, max_steps) if max_steps is not None else total
    start, wall_before = _resume(task, optimizer, run_dir, cfg, config, dist_info, device, announce_resume)
    if start == 0 and dist_info.world_size > 1:
        # The model was built alike on every rank from the run's seed (FSDP2 broadcasts nothing); from
        # here on each rank draws its own DropPath and dropout, as dinov2 seeds seed + rank.
        _seed_rank(dist_info.rank)
    if cfg.compile:
        task.compile_parts()
    step_fn: nn.Module = task
    if dist_info.world_size > 1 and cfg.strategy == "ddp":
        step_fn = nn.parallel.DistributedDataParallel(task, broadcast_buffers=False)

    if dist_info.is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    batches = stream(start)
    log = MetricsLog(run_dir, resume_step=start) if dist_info.is_main else None
    watch = CollapseWatch(cfg.total_steps)
    bar = tqdm(total=end, initial=start, desc=desc, disable=not (progress and dist_info.is_main), dynamic_ncols=True)
    skips = (
        _Skips(run_dir, start, skipped, cfg.max_skipped_fraction, dist_info, bar.write)
        if skipped_key is not None
        else None
    )
    global_batch = cfg.batch_size * dist_info.world_size
    peak_lr = optim_cfg.peak_lr(global_batch)
    warmup = int(round(optim_cfg.warmup_epochs * cfg.steps_per_epoch))
    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
    run_start = time.perf_counter()
    task.train()
    step = start
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            batch, read = next(batches), True
            if skips is not None:
                batch, read = skips.take(batch, skipped_key, device)
            batch = to_device(batch, device)
            window_wait += time.perf_counter() - t0
            lr = warmup_cosine(step, total, warmup, peak_lr, optim_cfg.min_lr)
            wd = cosine(step, total, optim_cfg.weight_decay, optim_cfg.weight_decay_end)
            for group in optimizer.param_groups:
                frozen = step < group.get("frozen_until", 0)
                group["lr"] = 0.0 if frozen else lr * group["lr_multiplier"]
                group["weight_decay"] = wd * group["wd_multiplier"]
            logs = task.set_step(step)

            out: dict[str, torch.Tensor] = {}
            if read:  # else no rank read a sample for this step, which makes no update
                with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                    out = step_fn(batch)
                _stop_if_not_finite(out, step)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                clip_gradients(task, optim_cfg.clip_grad)
                optimizer.step()
                task.after_optimizer_step()
            window_steps += 1

            done = step + 1
            # One small all-reduce a step, only where a stop can be asked for: every rank stops at one step.
            stop = done < end and stop_armed() and any_rank(stop_requested(), device)
            if skips is not None and (
                done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == end or stop
            ):
                skips.flush(done, drawn=(done - start) * global_batch)  # before the checkpoint that counts them
            if done % cfg.log_every == 0 or done == end:
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "epoch": round(done / cfg.steps_per_epoch, 4)}
                record.update({k: float(v.detach()) for k, v in out.items()})
                record.update(lr=lr, wd=wd, **logs, **(skips.counts() if skips is not None else {}))
                record.update(
                    img_per_s=round(window_steps * global_batch / max(elapsed, 1e-9), 2),
                    data_wait=round(window_wait / max(elapsed, 1e-9), 4),
                    time=round(wall_before + time.perf_counter() - run_start, 2),
                )
                if log is not None:
                    log.write(record)
                    for line in watch.observe(record):
                        bar.write(line, file=sys.stderr)
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == end or stop:
                keep = cfg.keep_every > 0 and done % cfg.keep_every == 0
                _save(
                    task,
                    optimizer,
                    run_dir,
                    done,
                    config,
                    cfg,
                    dist_info,
                    device,
                    wall_before + time.perf_counter() - run_start,
                    keep=keep,
                )
            if stop:
                raise StopRequested(
                    f"saved step {done} of {end} in {checkpoint_path(run_dir)}; the same command resumes it"
                )
    finally:
        bar.close()
        if log is not None:
            log.close()
    if dist_info.is_main and (Path(run_dir) / "metrics.jsonl").exists() and end > start:
        plot_run(run_dir)
    return task


class _Skips:
    """What the stream skipped, from its batches: counted, named once per shard, listed, bounded.

    Counts are of distinct samples and shards: a resampled stream draws a bad sample again and
    again, and it is one bad sample. Rank 0 keeps ``RUN_DIR/skipped.jsonl``, one line per distinct
    skip with the step by which it was seen; a resumed run keeps the lines up to its checkpoint's
    step, as metrics.jsonl does, and counts on from them. Skips travel to rank 0 at every log and
    checkpoint step (an all-gather on several ranks), so a checkpoint counts those of its batches.

    The bound is on the share of the places drawn since this process started that were skipped.
    Measured on few draws a share is noisy, so the run stops only when the skips exceed the count
    the bound allows by more than three standard deviations of a count at exactly that share: a
    first batch with one bad tile of 64 does not stop a run whose data are 99.5 % good.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int,
        before: Sequence[SkipRecord],
        max_fraction: float,
        dist_info: DistInfo,
        write: Callable[..., None],
    ) -> None:
        self.path = Path(run_dir) / SKIPS_LOG
        self.max_fraction, self.dist_info, self.write = max_fraction, dist_info, write
        self.seen: dict[tuple[str, str], str] = {}  # (shard, key) -> reason
        self.named: set[str] = set()  # shards already named on stderr
        self.unlisted: list[tuple[str, str, str]] = []  # distinct skips not yet in skipped.jsonl
        self.pending: list[tuple[str, str, str]] = []  # skips of batches since the last flush
        self.draws = 0  # places skipped since this process started, repeats included
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if self.path.exists() else []
        if dist_info.is_main and self.path.exists():
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        for record in kept:
            self.seen[(record["shard"], record["key"])] = record["reason"]
            self.named.add(record["shard"])
        for shard, key, reason in before:
            self.named.add(shard)
            self._remember(shard, key, reason)

    def take(self, batch: Any, key: str, device: torch.device) -> tuple[Any, bool]:
        """``batch`` without its skips, and whether every rank's batch holds a sample to learn from.

        A batch can hold none (a burst of skips from a broken shard drawn into the shuffle buffer):
        then no rank makes an update at this step, since each must take part in the same collectives.
        """
        if isinstance(batch, dict) and key in batch:
            self.pending.extend((str(shard), str(k), str(reason)) for shard, k, reason in batch.pop(key))
        empty = isinstance(batch, dict) and not batch
        if self.dist_info.world_size > 1:
            flag = torch.tensor([float(empty)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            empty = bool(flag.item())
        return batch, not empty

    def flush(self, done: int, drawn: int) -> None:
        """Take in the skips of the batches up to step ``done``, of every rank; stop if too many."""
        new, self.pending = self.pending, []
        if self.dist_info.world_size > 1:
            parts: list[Any] = [None] * self.dist_info.world_size
            dist.all_gather_object(parts, new)
            new = [skip for part in parts for skip in part]
        self.draws += len(new)
        for shard, key, reason in new:
            if shard not in self.named:
                self.named.add(shard)
                if self.dist_info.is_main:
                    what = f"sample {key}" if key else "the shard"
                    self.write(
                        f"warning: skipping unreadable data in {shard}, first {what}: {reason} "
                        f"(every skip is listed in {self.path})",
                        file=sys.stderr,
                    )
            self._remember(shard, key, reason)
        if self.dist_info.is_main and self.unlisted:
            with self.path.open("a") as f:
                for shard, key, reason in self.unlisted:
                    f.write(json.dumps({"step": done, "shard": shard, "key": key, "reason": reason}) + "\n")
        self.unlisted = []
        allowed = self.max_fraction * drawn
        if self.draws > allowed + 3 * math.sqrt(allowed):
            raise UserError(
                f"{self.draws} of the {drawn} samples drawn by step {done} were skipped as unreadable "
                f"({self.draws / max(drawn, 1):.1%}), more than train.max_skipped_fraction={self.max_fraction} "
                f"allows; they are listed in {self.path}"
            )

    def counts(self) -> dict[str, int]:
        shards = sum(1 for _, key in self.seen if not key)
        return {"skipped_samples": len(self.seen) - shards, "skipped_shards": shards}

    def _remember(self, shard: str, key: str, reason: str) -> None:
        if (shard, key) not in self.seen:
            self.seen[(shard, key)] = reason
            self.unlisted.append((shard, key, reason))


def clip_gradients(task: TrainingTask, max_norm: float) -> None:
    """Clip the gradients of each of the task's :meth:`~TrainingTask.clip_groups` to ``max_norm`` (0: off)."""
    if max_norm <= 0:
        return
    for params in task.clip_groups():
        grads = [p for p in params if p.grad is not None]
        if grads:
            nn.utils.clip_grad_norm_(grads, max_norm)


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch's tensors (in dicts and lists, nested) moved to ``device``; non-blocking from pinned memory."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):  # per-image targets of detection: a dict each
        return [to_device(v, device) for v in batch]
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


def _save(
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    run_dir: Path,
    step: int,
    config: dict[str, Any],
    cfg: TrainConfig,
    dist_info: DistInfo,
    device: torch.device,
    wall_time: float,
    keep: bool = False,
) -> None:
    """Write ``checkpoints/last.pt`` atomically (rank 0), gathering sharded state and every rank's
    generators from every rank."""
    model_state, optim_state = _full_state(task, optimizer)
    rng = _rng_states(device, dist_info)
    if dist_info.is_main:
        checkpoint = {
            "method": task.name,
            "step": step,
            "config": config,
            "model": model_state,
            "optimizer": optim_state,
            "encoder": task.encoder_state(model_state),
            "rng": rng,
            "data": {
                "batches": step,
                "batch_size": cfg.batch_size,
                "num_workers": cfg.num_workers,
                "world_size": dist_info.world_size,
            },
            "wall_time": wall_time,
            "torch": str(torch.__version__),
        }
        last = save_checkpoint(checkpoint, checkpoint_path(run_dir))
        if keep:
            kept = kept_path(run_dir, step)
            kept.unlink(missing_ok=True)
            os.link(last, kept)  # last.pt is only ever replaced, never written in place
    barrier()


def _full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    if _is_sharded(module):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(module, optimizer, options=options)
    return module.state_dict(), optimizer.state_dict()


def _resume(
    module: TrainingTask,
    optimizer: torch.optim.Optimizer,
    run_dir: Path,
    cfg: TrainConfig,
    config: dict[str, Any],
    dist_info: DistInfo,
    device: torch.device,
    announce: bool = True,
) -> tuple[int, float]:
    path = checkpoint_path(run_dir)
    if not path.exists():
        return 0, 0.0
    checkpoint = read_training_checkpoint(path)
    _refuse_foreign(checkpoint, module, config, path)
    data = checkpoint.get("data", {})
    if dist_info.is_main and (data.get("num_workers"), data.get("world_size")) != (
        cfg.num_workers,
        dist_info.world_size,
    ):
        print(
            f"warning: resuming with {cfg.num_workers} workers x {dist_info.world_size} processes where the run had "
            f"{data.get('num_workers')} x {data.get('world_size')}: the data order differs from an uninterrupted run",
            file=sys.stderr,
        )
    optim_state = checkpoint["optimizer"]
    if _is_sharded(module) or _keyed_by_name(optim_state):
        # FSDP runs save name-keyed optimiser state; these APIs load it at any world size, or unsharded.
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        set_state_dict(
            module,
            optimizer,
            model_state_dict=checkpoint["model"],
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        module.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(optim_state)
    _set_rng_state(checkpoint["rng"], device, dist_info)
    if dist_info.is_main and announce:
        print(f"resuming {run_dir} at step {checkpoint['step']}", file=sys.stderr)
    return int(checkpoint["step"]), float(checkpoint.get("wall_time", 0.0))


def _refuse_foreign(checkpoint: dict[str, Any], task: TrainingTask, config: dict[str, Any], where: Path) -> None:
    """Refuse, before anything is loaded, a checkpoint of another run: one :class:`UserError` naming
    the first difference in method, ``model`` config (architecture and kwargs) or tensor name and shape."""
    if checkpoint.get("method") != task.name:
        raise UserError(f"{where} was written by method {checkpoint.get('method')!r}, this run is {task.name!r}")
    saved = {"model": (checkpoint.get("config") or {}).get("model")}
    wanted = {"model": config.get("model")}
    if isinstance(saved["model"], dict) and isinstance(wanted["model"], dict):
        key = first_difference(saved, wanted)
        if key is not None:
            raise UserError(
                f"{where} was written by {key}={lookup(saved, key)!r}, the config says {lookup(wanted, key)!r}"
            )
    theirs = {k: tuple(getattr(v, "shape", ())) for k, v in checkpoint["model"].items()}
    ours = {k: tuple(getattr(v, "shape", ())) for k, v in task.state_dict().items()}
    for key, shape in ours.items():
        if key not in theirs:
            raise UserError(f"{where} has no {key}, which this run's model has")
        if theirs[key] != shape:
            raise UserError(f"{where} holds {key} of shape {list(theirs[key])}, this run's model {list(shape)}")
    extra = [k for k in theirs if k not in ours]
    if extra:
        raise UserError(f"{where} holds {extra[0]}, which this run's model has not")


def _keyed_by_name(optim_state: dict) -> bool:
    return any(isinstance(k, str) for k in optim_state.get("state", {}))


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators: torch's on the CPU, Python's, and its own CUDA device's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rng_states(device: torch.device, dist_info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's generators, in rank order: each rank draws its own, and resumes with its own."""
    state = _rng_state(device)
    if dist_info.world_size == 1:
        return [state]
    states: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(states, state)
    return states


def _set_rng_state(saved: list[dict[str, Any]] | dict[str, Any], device: torch.device, dist_info: DistInfo) -> None:
    """Restore this rank's generators; a rank the run did not have takes rank ``rank % saved ranks``'s,
    reseeded so that it draws its own."""
    states = saved if isinstance(saved, list) else [saved]  # checkpoints before per-rank states
    state = states[dist_info.rank % len(states)]
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # every device's, by get_rng_state_all() before per-rank states: this one's
        index = device.index or 0
        cuda = cuda[index] if device.type == "cuda" and index < len(cuda) else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    if dist_info.rank >= len(states):
        _seed_rank(dist_info.rank)


def _seed_rank(rank: int) -> None:
    """Seed every generator of this rank from the current seed and the rank (+ 1: rank 0 must not
    replay the draws that initialised the weights)."""
    torch.manual_seed((torch.initial_seed() + 1 + rank) % 2**63)


# ----------------------------------------------------------------------------- FSDP


def _shard(task: TrainingTask) -> None:
    """FSDP2 over the units the task names (``fsdp_units()``, innermost first)."""
    from torch.distributed.fsdp import fully_shard

    for unit in task.fsdp_units():
        # Explicit: the outer units are FSDP roots, which otherwise stay unsharded after forward
        # (the teacher, run without backward, would then never reshard).
        fully_shard(unit, reshard_after_forward=True)


def _is_sharded(module: nn.Module) -> bool:
    return (
        dist.is_available()
        and dist.is_initialized()
        and any(type(p).__name__ == "DTensor" for p in module.parameters())
    )
