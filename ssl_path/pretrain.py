"""``python -m ssl_path.pretrain``: pretrain an encoder on WebDataset shards.

    python -m ssl_path.pretrain --config dinov2_vits16 --data shards/ --out runs/vits16 [--max-steps N] [key=value ...]

``--config`` is a shipped config name (``ssl_path/configs/*.yaml``) or a YAML file; ``key=value``
overrides any entry (``seed=3``, ``optim.lr=0.001``, ``train.batch_size=32``,
``dinov2.crops.n_local=4``). Every value is checked before anything is built or written. The
resolved config is written to ``RUN_DIR/config.yaml`` once the method is built. Running the same
command on an existing run directory resumes it from ``RUN_DIR/checkpoints/last.pt``; a run
directory with a checkpoint is never reused with a different config, and one without a checkpoint
yet (a run that failed or was killed before its first) starts afresh with the new config.
Several processes (torchrun, ``slurm/launch.py``) train with DDP, or FSDP with ``train.strategy=fsdp``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from ssl_path.core.cli import add_out, add_progress, make_parser, resolve_device
from ssl_path.core.config import (
    apply_overrides,
    config_path,
    dump_yaml,
    from_dict,
    read_yaml,
    to_dict,
)
from ssl_path.core.distributed import DistInfo, barrier, init_distributed
from ssl_path.core.errors import UserError, run_cli
from ssl_path.core.io import atomic_path, refuse_out_over_inputs, write_json
from ssl_path.data.loader import SKIPPED, Skip, check_shards, shard_dataset, shard_loader, shard_urls
from ssl_path.data.manifest import data_locations, find_manifests
from ssl_path.encoder import encoder_state
from ssl_path.encoder.checkpoint import (
    CHECKPOINT_DIR,
    RUN_MANIFESTS,
    RUN_RECORD,
    checkpoint_path,
    read_checkpoint,
    read_run_record,
    read_training_checkpoint,
)
from ssl_path.encoder.identity import RANDOM_INIT_SEED, file_digest
from ssl_path.methods import PretrainingMethod, methods
from ssl_path.methods.backbone import ModelConfig, build_vit, encoder_kwargs
from ssl_path.training.config import OptimConfig, TrainConfig
from ssl_path.training.figures import draw_panels
from ssl_path.training.loop import SKIPS_LOG, StreamFactory, TrainingDiverged, train
from ssl_path.training.metrics_log import LOSS_PNG, METRICS
from ssl_path.training.run_dir import CONFIG_FILE
from ssl_path.training.run_dir import check_run_dir as check_any_run_dir

RUN_FILE = RUN_RECORD
FIGURE_IMAGES = 6  # the first readable tiles of the run's shards, in shard order
# What a run writes into its run dir; a folder holding anything else is not one.
RUN_DIR_ENTRIES = (
    RUN_FILE,
    METRICS,
    LOSS_PNG,
    SKIPS_LOG,
    CHECKPOINT_DIR,
    *sorted({spec.method.figure for spec in methods().values() if spec.method.figure}),
)


@dataclass(frozen=True)
class PretrainConfig:
    method: str
    seed: int
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    method_cfg: Any  # the method's own config dataclass, from the section named after the method

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "model": to_dict(self.model),
            self.method: to_dict(self.method_cfg),
            "optim": to_dict(self.optim),
            "train": to_dict(self.train),
        }


def resolve_config(name_or_path: str, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Read a config, apply ``key=value`` overrides, and check every key and value."""
    data = apply_overrides(read_yaml(config_path(name_or_path)), overrides)
    registry = methods()
    method = data.get("method", "dinov2")
    if method not in registry:
        raise UserError(f"method {method!r} is not one of {', '.join(registry)}")
    known = {"method", "seed", "model", "optim", "train", method}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"config: unknown section {unknown[0]!r} (sections: {', '.join(sorted(known))})")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, not {seed!r}")
    return PretrainConfig(
        method=method,
        seed=seed,
        model=from_dict(ModelConfig, data.get("model", {}), "model"),
        optim=from_dict(OptimConfig, data.get("optim", {}), "optim"),
        train=from_dict(TrainConfig, data.get("train", {}), "train"),
        method_cfg=from_dict(registry[method].config, data.get(method, {}), method),
    )


def check_run_dir(out: Path, config: dict[str, Any]) -> bool:
    """True where ``out`` starts a fresh pretraining run, False where it resumes one
    (:func:`ssl_path.training.run_dir.check_run_dir`)."""
    return check_any_run_dir(out, config, RUN_DIR_ENTRIES)


def run(
    cfg: PretrainConfig,
    data: Any,
    out: Path,
    max_steps: int | None = None,
    progress: bool = True,
    dist_info: DistInfo | None = None,
) -> torch.nn.Module:
    """Build the method and train it; returns the trained method (unwrapped)."""
    dist_info = dist_info or init_distributed(cfg.train.device)
    urls = shard_urls(data)  # bad --data fails here, before any model is built
    # A run dir inside a shard folder, or holding one, would mix checkpoints with the data.
    refuse_out_over_inputs(out, sorted({Path(u).parent for u in urls}))
    urls, unreadable = readable_shards(urls, dist_info.is_main)
    try:
        device = resolve_device(cfg.train.device, dist_info.local_rank)
    except UserError as err:
        raise UserError(f"train: {err}") from None
    config = cfg.to_dict()
    fresh = check_run_dir(out, config)
    manifests = [file_digest(m) for m in find_manifests(data_locations(data))[0]]
    if not fresh:
        _refuse_other_data(out, data, manifests)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    # Built before anything is written: a config that builds no method leaves the run dir as it was.
    method = methods()[cfg.method].build(cfg.method_cfg, cfg.model, cfg.train, cfg.seed, device)
    barrier()
    if fresh and dist_info.is_main:
        with atomic_path(out / CONFIG_FILE) as tmp:
            tmp.write_text(dump_yaml(config))
        write_json(
            out / RUN_FILE,
            {
                # absolute, so that the export and the figures find them from any folder
                "data": [_absolute(d) for d in data] if isinstance(data, (list, tuple)) else _absolute(data),
                # what a resume and the model card's data summary are checked against, wherever the shards move
                RUN_MANIFESTS: manifests,
                "command": " ".join(sys.argv),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(),
                "world_size": dist_info.world_size,
                "device": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"CPU ({torch.get_num_threads()} threads)",
                "torch": str(torch.__version__),
            },
        )
    barrier()
    stream = shard_stream(method, urls, cfg.train, cfg.seed, pin_memory=device.type == "cuda")
    trained = train(
        method,
        stream,
        out,
        cfg.optim,
        cfg.train,
        config,
        dist_info=dist_info,
        max_steps=max_steps,
        progress=progress,
        desc="pretrain",
        skipped_key=SKIPPED,
        skipped=unreadable,
    )
    if dist_info.is_main and method.figure:
        draw_figure(out, urls)  # from the checkpoint: the same under every strategy, FSDP included
    return trained


def _refuse_other_data(out: Path, data: Any, manifests: list[str]) -> None:
    """A run resumed on other shards than it started on: its stream position and its card would be wrong."""
    started_on = read_run_record(out).get(RUN_MANIFESTS)  # absent in runs started before it was recorded
    if isinstance(started_on, list) and sorted(started_on) != sorted(manifests):
        raise UserError(
            f"--data {data}: not the shards {out} started on (their manifests differ from those its {RUN_FILE} "
            "records); resume it on those, or give another --out"
        )


def draw_figure(run_dir: Path, data: Any = None) -> Path:
    """Draw the ``figure`` of a run's method (its last checkpoint) for the first readable tiles of
    ``data``, by default the shards the run was started on, into the run dir."""
    _, method, record = load_run(run_dir)
    if not method.figure:
        raise UserError(f"method {method.name!r} draws no figure")
    data = data if data is not None else record.get("data")
    if not data:
        raise UserError(f"{run_dir}: {RUN_FILE} names no training data; give the shards with --data")
    images = []
    for sample in shard_dataset(data, "eval"):
        if isinstance(sample, dict):
            images.append(sample["image"])
        if len(images) == FIGURE_IMAGES:
            break
    if not images:
        raise UserError(f"no readable tile in {data} to draw {method.figure} with")
    panels = method.eval().figure_panels(images)
    return draw_panels(panels, Path(run_dir) / method.figure, title=f"{Path(run_dir).name}: {method.name}")


def _absolute(data: str | Path) -> str:
    """A ``--data`` value with each of its ``::``-joined locations made absolute."""
    return "::".join(os.path.abspath(os.path.expanduser(part)) for part in str(data).split("::") if part)


def load_run(run_dir: Path) -> tuple[PretrainConfig, PretrainingMethod, dict[str, Any]]:
    """The config of a run dir, its method built on the CPU with the last checkpoint's weights, and
    the run's ``run.json`` record."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: no {CONFIG_FILE} (is it a pretraining run directory?)")
    if not checkpoint_path(run_dir).is_file():
        raise UserError(f"{run_dir}: no checkpoint yet ({checkpoint_path(run_dir)})")
    cfg = resolve_config(str(run_dir / CONFIG_FILE))
    checkpoint = read_training_checkpoint(checkpoint_path(run_dir))
    method = methods()[cfg.method].build(cfg.method_cfg, cfg.model, cfg.train, cfg.seed, torch.device("cpu"))
    method.load_state_dict(checkpoint["model"])
    return cfg, method, read_run_record(run_dir)


def random_init_checkpoint(run_dir: Path, path: Path) -> Path:
    """The run's architecture at random init (torch seeded to ``RANDOM_INIT_SEED``), saved at ``path``
    as an encoder checkpoint with the input size of the run's published encoder: the baseline that
    a pretrained encoder must beat, probed at the same resolution."""
    cfg = resolve_config(str(Path(run_dir) / CONFIG_FILE))
    torch.manual_seed(RANDOM_INIT_SEED)
    state = encoder_state(build_vit(cfg.model), cfg.model.arch, encoder_kwargs(cfg.model))
    published = read_checkpoint(checkpoint_path(run_dir))["encoder"]["pretrained_cfg"]
    state["pretrained_cfg"]["input_size"] = tuple(published["input_size"])
    with atomic_path(Path(path)) as tmp:
        torch.save({"encoder": state}, tmp)
    return Path(path)


def readable_shards(urls: list[str], is_main: bool) -> tuple[list[str], list[Skip]]:
    """``urls`` without the shards that cannot be read at all, named in one warning line, and a Skip
    for each of those; a UserError naming them when none is left. Cheap: before any model or worker."""
    unreadable = check_shards(urls)
    bad = {skip.shard for skip in unreadable}
    readable = [u for u in urls if u not in bad]
    named = "; ".join(f"{skip.shard} ({skip.reason})" for skip in unreadable)
    if not readable:
        raise UserError(f"--data: none of the {len(bad)} shards can be read: {named}")
    if unreadable and is_main:
        total = len(set(urls))
        print(f"warning: {len(bad)} of {total} shards cannot be read and are left out: {named}", file=sys.stderr)
    return readable, unreadable


def shard_stream(
    method: PretrainingMethod, data: Any, train_cfg: TrainConfig, seed: int, pin_memory: bool
) -> StreamFactory:
    """The method's batches from the training shards, restartable at any batch (exact resume)."""

    def stream(start_batch: int) -> Any:
        loader = shard_loader(
            data,
            "train",
            train_cfg.batch_size,
            transform=method.data_transform(),
            collate_fn=method.collate_fn(),
            num_workers=train_cfg.num_workers,
            seed=seed,
            shuffle_buffer=train_cfg.shuffle_buffer,
            pin_memory=pin_memory,
            start_batch=start_batch,
        )
        return iter(loader)

    return stream


def _arguments(argv: Sequence[str] | None) -> tuple[PretrainConfig, Any, Path, int | None, bool]:
    """``main``'s arguments, each checked: (config, data, run dir, max steps, progress bar)."""
    parser = make_parser(
        "python -m ssl_path.pretrain",
        "Pretrain an encoder (DINOv2 or MAE) on WebDataset shards; rerun the same command to resume.",
    )
    parser.add_argument("--config", required=True, help="shipped config name (e.g. dinov2_vits16) or a YAML file")
    parser.add_argument("--data", required=True, nargs="+", help="shard folder(s), manifest, .tar or brace pattern")
    add_out(parser, help="run directory (created, or resumed)")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this step (schedules still span the full run)"
    )
    add_progress(parser)
    parser.add_argument(
        "overrides", nargs="*", default=[], metavar="key=value", help="config overrides, e.g. seed=1 optim.lr=1e-3"
    )
    args, extra = parser.parse_known_args(argv)
    # key=value items may follow --data's list; argparse files them under --data.
    data = [d for d in args.data if "=" not in d or Path(d).exists()]
    overrides = [d for d in args.data if d not in data] + list(args.overrides) + extra
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r} (overrides are key=value)")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, not {args.max_steps}")
    cfg = resolve_config(args.config, overrides)
    return cfg, data if len(data) > 1 else data[0], args.out, args.max_steps, not args.no_progress


def check_command(argv: Sequence[str] | None = None) -> None:
    """Refuse what ``main(argv)`` would refuse before it trains (arguments, config, data, run dir),
    building and writing nothing: ``slurm.launch`` calls it before it submits a job that would fail."""
    cfg, data, out, _, _ = _arguments(argv)
    urls = shard_urls(data)
    refuse_out_over_inputs(out, sorted({Path(u).parent for u in urls}))
    check_run_dir(out, cfg.to_dict())


def main(argv: Sequence[str] | None = None) -> int:
    cfg, data, out, max_steps, progress = _arguments(argv)
    try:
        run(cfg, data, out, max_steps, progress=progress)
    except TrainingDiverged as err:
        print(f"error: {err}; last good checkpoint: {checkpoint_path(out)}", file=sys.stderr)
        return 1
    if init_distributed().is_main:
        print(json.dumps({"run_dir": str(out), "checkpoint": str(checkpoint_path(out))}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
