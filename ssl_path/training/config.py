"""The loop's own settings: the optimiser and its schedules (``optim``), and how a run steps (``train``).

Whatever is particular to a method or a head (teacher momentum, last-layer freezing, the teacher
temperature) lives in that method's config, not here. Defaults are DINOv2's; MAE's configs set
its own (AdamW betas 0.9/0.95, lr 1.5e-4 linear in the batch over 256).
"""

from __future__ import annotations

from dataclasses import dataclass

from ssl_path.core.cli import parse_device
from ssl_path.core.errors import ConfigError, UserError

LR_SCALINGS = ("sqrt", "linear", "none")
PRECISIONS = ("auto", "bf16", "fp32")
STRATEGIES = ("ddp", "fsdp")
NON_NEGATIVE_OPTIM = (
    "lr",
    "min_lr",
    "warmup_epochs",
    "weight_decay",
    "weight_decay_end",
    "clip_grad",
    "patch_embed_lr_mult",
)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedules; epochs are ``train.steps_per_epoch`` steps."""

    lr: float = 0.004  # at a global batch of lr_reference_batch, scaled by lr_scaling
    lr_scaling: str = "sqrt"  # sqrt | linear | none, in the ratio global batch / lr_reference_batch
    lr_reference_batch: int = 1024  # DINOv2 states its lr at 1024 images, MAE at 256
    min_lr: float = 1.0e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # 0 turns clipping off
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)}, not {self.lr_scaling!r}")
        if self.lr_reference_batch < 1:
            raise ConfigError(f"lr_reference_batch must be >= 1, not {self.lr_reference_batch}")
        for name in NON_NEGATIVE_OPTIM:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not 0 < self.layerwise_decay <= 1:
            raise ConfigError(f"layerwise_decay must be in (0, 1], not {self.layerwise_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), not {list(self.betas)}")

    def peak_lr(self, global_batch: int) -> float:
        ratio = global_batch / self.lr_reference_batch
        return self.lr * {"sqrt": ratio**0.5, "linear": ratio, "none": 1.0}[self.lr_scaling]


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # per process
    epochs: float = 100.0
    steps_per_epoch: int = 1250  # dinov2's OFFICIAL_EPOCH_LENGTH: an "epoch" is a number of steps
    num_workers: int = 8
    shuffle_buffer: int = 1000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    strategy: str = "ddp"  # with several processes: ddp, or fsdp for models that do not fit
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    keep_every: int = 0  # also keep checkpoints/step_NNNNNNN.pt every this many steps (0: never)
    max_skipped_fraction: float = 0.01  # stop when more of the samples drawn than this are unreadable

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        for name in ("batch_size", "steps_per_epoch", "shuffle_buffer", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("num_workers", "keep_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError(f"max_skipped_fraction must be in [0, 1], not {self.max_skipped_fraction}")
        if self.epochs <= 0 or self.total_steps < 1:
            raise ConfigError(
                f"epochs must make at least one step: {self.epochs} epochs of {self.steps_per_epoch} steps make "
                f"{self.total_steps}"
            )
        try:
            parse_device(self.device)  # the spelling; whether the GPU is there is asked when the run starts
        except UserError as err:
            raise ConfigError(str(err)) from None

    @property
    def total_steps(self) -> int:
        return int(round(self.epochs * self.steps_per_epoch))
