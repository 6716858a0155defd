"""The config of a fine-tuning run: the same YAML + ``key=value`` system as pretraining.

Sections: ``seed``, ``encoder`` (how the encoder is tuned: :class:`EncoderTuning`), ``select``
(validation, early stopping: :class:`SelectionConfig`), the loop's ``optim`` and ``train``
(:mod:`ssl_path.training.config`), and one section named after the head task (``segment``,
``classify``) holding that head's own settings. Shipped configs live in ``finetune/configs/``.

``optim.lr`` is the head's peak lr and ``encoder.lr`` the encoder's (its last block; earlier blocks
decay by ``optim.layerwise_decay``, as in BEiT and MAE fine-tuning); ``optim.lr_scaling`` scales both
with the batch alike (the shipped configs state them as they are: ``lr_scaling: none``). An epoch is one pass over the
training images, so ``train.steps_per_epoch`` follows from the training set and is not set by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ssl_path.core.config import apply_overrides, config_path, from_dict, read_yaml, to_dict
from ssl_path.core.errors import ConfigError, UserError
from ssl_path.training.config import OptimConfig, TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"
INPUTS = "inputs"  # a run dir's config.yaml also names what it was trained from (encoder hash, sets, share)
MODES = ("frozen", "last-N", "full", "lora")
_LAST_N = re.compile(r"last-(\d+)")


@dataclass(frozen=True)
class EncoderTuning:
    """Which encoder weights learn: ``frozen`` (none), ``last-N`` (the last N blocks and the final
    norm, e.g. ``last-4``), ``full`` (all, with layer-wise lr decay) or ``lora`` (low-rank adapters
    on ``lora_targets``, Hu et al. 2021, arXiv 2106.09685, through peft; the rest frozen)."""

    mode: str = "frozen"
    lr: float = 1.0e-4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("qkv",)  # timm ViT module names: qkv, proj, fc1, fc2
    drop_path_rate: float = 0.0  # stochastic depth while the encoder learns (full, last-N, lora)

    def __post_init__(self) -> None:
        if self.mode not in ("frozen", "full", "lora") and not _LAST_N.fullmatch(self.mode):
            raise ConfigError(f"encoder.mode must be frozen, last-N (e.g. last-4), full or lora, not {self.mode!r}")
        if self.mode.startswith("last-") and self.last_n < 1:
            raise ConfigError(f"encoder.mode {self.mode}: N must be >= 1")
        if self.lr < 0 or self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(
                "encoder: lr >= 0, lora_rank >= 1, lora_alpha > 0 and lora_dropout in [0, 1) are required"
            )
        if not self.lora_targets:
            raise ConfigError("encoder.lora_targets names no module")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"encoder.drop_path_rate must be in [0, 1), not {self.drop_path_rate}")

    @property
    def last_n(self) -> int:
        match = _LAST_N.fullmatch(self.mode)
        return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class SelectionConfig:
    """Model selection on a validation split carved from the training set (never the test set)."""

    val_fraction: float = 0.2
    val_every: float = 1.0  # epochs between validations
    patience: int = 10  # validations without a better score before the run stops (0: never early)

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"select.val_fraction must lie strictly between 0 and 1, not {self.val_fraction}")
        if self.val_every <= 0 or self.patience < 0:
            raise ConfigError("select: val_every > 0 and patience >= 0 are required")


@dataclass(frozen=True)
class FinetuneConfig:
    task: str
    seed: int
    encoder: EncoderTuning
    select: SelectionConfig
    optim: OptimConfig
    train: TrainConfig
    head: Any  # the head task's own config dataclass, from the section named after the task

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "seed": self.seed,
            "encoder": to_dict(self.encoder),
            "select": to_dict(self.select),
            self.task: to_dict(self.head),
            "optim": to_dict(self.optim),
            "train": to_dict(self.train),
        }


def resolve_config(
    name_or_path: str | Path, task: str, head_config: type, overrides: Sequence[str] = (), saved: bool = False
) -> FinetuneConfig:
    """Read a config, apply ``key=value`` overrides, and check every key and value. ``saved``: a run
    dir's ``config.yaml``, whose ``train.steps_per_epoch`` its training set set."""
    data = apply_overrides(read_yaml(config_path(str(name_or_path), CONFIG_DIR)), overrides)
    if data.get("task", task) != task:
        other = data.get("task")
        raise UserError(
            f"{name_or_path} is for task {other!r}, this command is {task!r} (use python -m finetune.{other})"
        )
    if saved:
        data.pop(INPUTS, None)
    known = {"task", "seed", "encoder", "select", "optim", "train", task}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"config: unknown section {unknown[0]!r} (sections: {', '.join(sorted(known))})")
    if "steps_per_epoch" in data.get("train", {}) and not saved:
        raise UserError("train.steps_per_epoch is set by the training set (an epoch is one pass over it); drop it")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, not {seed!r}")
    train = from_dict(TrainConfig, data.get("train", {}), "train")
    if train.strategy == "fsdp":
        raise UserError("train.strategy=fsdp: heads train with DDP (the encoders they tune fit on one device)")
    return FinetuneConfig(
        task=task,
        seed=seed,
        encoder=from_dict(EncoderTuning, data.get("encoder", {}), "encoder"),
        select=from_dict(SelectionConfig, data.get("select", {}), "select"),
        optim=from_dict(OptimConfig, data.get("optim", {}), "optim"),
        train=train,
        head=from_dict(head_config, data.get(task, {}), task),
    )
