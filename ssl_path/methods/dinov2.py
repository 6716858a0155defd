"""DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision") on a timm ViT.

A student and an EMA teacher share one architecture: a timm ``VisionTransformer`` backbone, a DINO
head on the class token and an iBOT head on patch tokens (the same head unless
``ibot_separate_head``). Each step:

1. the teacher sees the global crops; its class-token logits and its logits at the student's
   masked patch positions are centred (Sinkhorn-Knopp, or softmax minus an EMA centre) at a
   temperature warmed up from 0.04 to 0.07;
2. the student sees the global crops with block-wise masked patches replaced by a learned mask
   token (one backbone call) and the local crops (a second call, as they differ in size); all its
   head inputs (global and local class tokens, masked patch tokens) go through the head in one call;
3. loss = DINO class-token cross-entropy over all (student crop, other teacher global crop) pairs
   + iBOT masked-patch cross-entropy + KoLeo on the student's global class tokens.

Each step also returns, from the teacher's side of the batch, what shows a collapse
(:mod:`ssl_path.training.collapse`): the entropy of the DINO and iBOT targets as a fraction of ln K,
and the mean pairwise cosine of the DINO head's bottleneck outputs and of the trunk's class tokens.

The loop sees only the task contract (:mod:`ssl_path.training.task`): ``set_step`` sets the
teacher temperature and momentum and whether the heads' last layer is still frozen,
``forward(batch) -> dict(loss, ...)``, ``after_optimizer_step`` moves the EMA teacher. The encoder
it publishes is the teacher backbone, a plain timm model (``encoder_state``).
Defaults are the paper's (``dinov2/configs/ssl_default_config.yaml``); each is a config value.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_path.core.errors import ConfigError, UserError
from ssl_path.data.transforms import (
    MultiCropAugment,
    MultiCropConfig,
    MultiCropPhotometric,
    collate_multicrop,
    key_entropy,
)
from ssl_path.encoder.info import patch_size
from ssl_path.methods.backbone import MaskedViT, ModelConfig, build_vit, published_encoder
from ssl_path.methods.base import PretrainingMethod
from ssl_path.methods.losses import (
    SoftmaxCentering,
    dino_clstoken_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
)
from ssl_path.methods.masking import batch_masks
from ssl_path.training.collapse import mean_pairwise_cosine, target_entropy
from ssl_path.training.config import OptimConfig, TrainConfig
from ssl_path.training.optim import param_groups
from ssl_path.training.schedules import cosine, linear_warmup

CENTERINGS = ("sinkhorn_knopp", "softmax")


@dataclass(frozen=True)
class DINOv2Config:
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    # heads
    n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_n_layers: int = 3
    ibot_separate_head: bool = False
    ibot_n_prototypes: int = 65536  # only with a separate iBOT head
    # losses
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_temperature_epochs: float = 30.0
    centering: str = "sinkhorn_knopp"  # or "softmax" (DINO v1 centre)
    center_momentum: float = 0.9  # softmax centering only
    sinkhorn_iterations: int = 3
    # iBOT masking of global crops
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    # teacher EMA momentum, cosine from momentum_teacher to final_momentum_teacher over the run
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    # the heads' last layer (the prototypes) stays fixed for this many epochs
    freeze_last_layer_epochs: float = 1.0
    # the heads' lr relative to the trunk's last block (the reference: 1)
    head_lr_multiplier: float = 1.0
    # where the photometric augmentation runs: "workers", "device" (after collation), or "auto"
    # (device on CUDA, workers otherwise)
    photometric: str = "auto"

    def __post_init__(self) -> None:
        if self.centering not in CENTERINGS:
            raise ConfigError(f"centering must be one of {CENTERINGS}, not {self.centering!r}")
        if self.photometric not in ("auto", "workers", "device"):
            raise ConfigError(f"photometric must be auto, workers or device, not {self.photometric!r}")
        if self.crops.n_global < 2:
            raise ConfigError("DINOv2 needs at least 2 global crops")
        for name in ("n_prototypes", "ibot_n_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_n_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.sinkhorn_iterations < 1:
            raise ConfigError(f"sinkhorn_iterations must be >= 1, not {self.sinkhorn_iterations}")
        weights = ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight")
        for name in (*weights, "warmup_teacher_temperature_epochs", "freeze_last_layer_epochs", "head_lr_multiplier"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not any(getattr(self, name) > 0 for name in weights):
            raise ConfigError(f"at least one of {', '.join(weights)} must be > 0")
        for name in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, not {getattr(self, name)}")
        for name in ("center_momentum", "mask_probability", "momentum_teacher", "final_momentum_teacher"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if len(self.mask_ratio) != 2 or not 0 <= self.mask_ratio[0] <= self.mask_ratio[1] <= 1:
            raise ConfigError(f"mask_ratio must be two increasing numbers in [0, 1], not {list(self.mask_ratio)}")


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2-normalised, then weight-normalised prototypes (norm fixed at 1)."""

    def __init__(
        self, in_dim: int, n_prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, n_layers: int = 3
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(n_layers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = False

    def forward(self, x: Tensor, with_bottleneck: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; with ``with_bottleneck`` also the unit vectors the prototypes saw (logits are their
        cosines). One call either way: under FSDP only the module's own call gathers its weights."""
        bottleneck = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6)  # eps large enough for bf16
        logits = self.last_layer(bottleneck)
        return (logits, bottleneck) if with_bottleneck else logits


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOv2Transform:
    """Per-sample multi-crop for the data workers; the stream ``index`` makes each draw's crops new."""

    def __init__(self, crops: MultiCropConfig, photometric: bool) -> None:
        self.augment = MultiCropAugment(crops, photometric=photometric)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = self.augment(sample["image"], sample["key"], epoch=sample.get("index", 0))
        out["key"], out["index"] = sample["key"], sample.get("index", 0)
        return out


class DINOv2Collate:
    """Crop-major collation plus the iBOT masks of the global crops, drawn from the batch's own seed."""

    def __init__(
        self, seed: int, grid: tuple[int, int], n_global: int, ratio: tuple[float, float], probability: float
    ) -> None:
        self.seed, self.grid, self.n_global, self.ratio, self.probability = seed, grid, n_global, ratio, probability

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_multicrop(samples)
        first = samples[0]
        rng = np.random.default_rng([self.seed, int(first["index"]), key_entropy(first["key"])])
        masks = batch_masks(rng, self.n_global * len(samples), self.grid, self.ratio, self.probability)
        batch["collated_masks"] = torch.from_numpy(masks)  # [n_global * B, P], crop-major like the crops
        return batch


class DINOv2(PretrainingMethod):
    """Student, EMA teacher, heads and centring; see the module docstring."""

    name = "dinov2"
    title = "DINOv2 (self-distillation with iBOT masked-patch prediction and KoLeo)"
    citation = """@article{oquab2024dinov2,
  title   = {{DINOv2}: Learning Robust Visual Features without Supervision},
  author  = {Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and others},
  journal = {Transactions on Machine Learning Research},
  year    = {2024}
}"""
    published = "the EMA teacher's backbone (heads dropped)"

    def __init__(
        self, cfg: DINOv2Config, model: ModelConfig, train: TrainConfig, seed: int = 0, device_photometric: bool = False
    ) -> None:
        super().__init__()
        self.cfg, self.model_cfg, self.seed = cfg, model, seed
        vit = build_vit(model)
        if vit.cls_token is None:
            raise UserError(f"model.arch {model.arch!r} has no class token; DINOv2 needs one")
        backbone = MaskedViT(vit)
        embed_dim = backbone.vit.embed_dim
        heads = {"dino_head": self._head(embed_dim, cfg.n_prototypes)}
        if cfg.ibot_separate_head:
            heads["ibot_head"] = self._head(embed_dim, cfg.ibot_n_prototypes)
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        if cfg.centering == "softmax":
            self.dino_center = SoftmaxCentering(cfg.n_prototypes, cfg.center_momentum)
            ibot_k = cfg.ibot_n_prototypes if cfg.ibot_separate_head else cfg.n_prototypes
            self.ibot_center = SoftmaxCentering(ibot_k, cfg.center_momentum)
        self.total_steps = train.total_steps
        self.warmup_temperature_steps = int(round(cfg.warmup_teacher_temperature_epochs * train.steps_per_epoch))
        self.freeze_last_layer_steps = int(round(cfg.freeze_last_layer_epochs * train.steps_per_epoch))
        self.teacher_temperature = cfg.warmup_teacher_temperature
        self.momentum = cfg.momentum_teacher
        self.photometric = MultiCropPhotometric(cfg.crops) if device_photometric else None
        self.patch_size = patch_size(vit)
        if cfg.crops.global_size % self.patch_size or cfg.crops.local_size % self.patch_size:
            raise UserError(
                f"crop sizes {cfg.crops.global_size}/{cfg.crops.local_size} must be multiples of the patch size {self.patch_size}"
            )

    def _head(self, embed_dim: int, n_prototypes: int) -> DINOHead:
        c = self.cfg
        return DINOHead(embed_dim, n_prototypes, c.head_hidden_dim, c.head_bottleneck_dim, c.head_n_layers)

    # ----------------------------------------------------------------- loop hooks

    def data_transform(self) -> DINOv2Transform:
        return DINOv2Transform(self.cfg.crops, photometric=self.photometric is None)

    def collate_fn(self) -> DINOv2Collate:
        grid = self.cfg.crops.global_size // self.patch_size
        c = self.cfg
        return DINOv2Collate(self.seed, (grid, grid), c.crops.n_global, c.mask_ratio, c.mask_probability)

    def set_step(self, step: int) -> dict[str, float]:
        c = self.cfg
        self.momentum = cosine(step, self.total_steps, c.momentum_teacher, c.final_momentum_teacher)
        self.teacher_temperature = linear_warmup(
            step, self.warmup_temperature_steps, c.warmup_teacher_temperature, c.teacher_temperature
        )
        return {"momentum": self.momentum, "teacher_temperature": self.teacher_temperature}

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """The default layer-wise groups, with the heads' last layers apart and frozen for their first
        steps, and the heads apart where their lr differs from the trunk's."""
        head_lr = self.cfg.head_lr_multiplier
        # Heads get their own groups only when their lr differs: the groups, and so a checkpoint's
        # optimiser state, of a run at the reference setting stay as they were.
        tag = functools.partial(_param_tag, heads_apart=head_lr != 1.0)
        groups = param_groups(self, optim.layerwise_decay, optim.patch_embed_lr_mult, tag=tag)
        for group in groups:
            if group["tag"] == "last_layer":
                group["frozen_until"] = self.freeze_last_layer_steps
            if group["tag"] in ("head", "last_layer"):
                group["lr_multiplier"] *= head_lr
        return groups

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Each student part (backbone, DINO head, iBOT head) on its own norm, as DINOv2 clips: the
        backbone's, hundreds of times the heads' early on, would otherwise scale the heads down with it."""
        return [list(part.parameters()) for part in self.student.values()]

    def train(self, mode: bool = True) -> DINOv2:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.update_teacher(self.momentum)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        # One fused update per tensor type: under FSDP most parameters are DTensor shards, but some
        # (e.g. weight-norm parametrisations) stay plain tensors, and foreach ops cannot mix the two.
        by_type: dict[type, tuple[list[Tensor], list[Tensor]]] = {}
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            teacher, student = by_type.setdefault(type(t), ([], []))
            teacher.append(t)
            student.append(s.detach())
        for teacher, student in by_type.values():
            torch._foreach_mul_(teacher, momentum)
            torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def encoder_state(self, model_state: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """The teacher backbone as the published encoder; ``model_state``: this module's whole state dict."""
        crops = self.cfg.crops
        vit = self.teacher["backbone"].vit
        prefix = "teacher.backbone.vit."
        return published_encoder(vit, self.model_cfg, model_state, prefix, crops.global_size, crops.mean, crops.std)

    def fsdp_units(self) -> list[nn.Module]:
        """Blocks first, then whole parts: student and teacher sharded alike, so the EMA acts on matching shards."""
        units: list[nn.Module] = []
        for root in (self.student, self.teacher):
            units.extend(root["backbone"].vit.blocks)
            units.extend(root.values())
        return units

    def compile_parts(self, **options: Any) -> None:
        """Compile backbones and heads, not the step: masking gives the step data-dependent shapes."""
        for part in (*self.student.values(), *self.teacher.values()):
            part.compile(**options)

    # ----------------------------------------------------------------- step

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.photometric is not None:
            batch = self.photometric(batch)
        c = self.cfg
        global_crops, local_crops = batch["collated_global_crops"], batch["collated_local_crops"]
        masks = batch["collated_masks"].to(global_crops.device)
        n_global, n_local = int(batch["n_global_crops"]), int(batch["n_local_crops"])
        batch_size = global_crops.shape[0] // n_global

        teacher_cls, teacher_patch, monitor = self._teacher_targets(global_crops, masks, n_global)

        student_prefix, student_patch = self.student["backbone"](global_crops, masks)
        student_cls = student_prefix[:, 0]
        cls_tokens = [student_cls]
        if n_local:
            cls_tokens.append(self.student["backbone"](local_crops)[0][:, 0])
        masked_tokens = student_patch[masks]  # [M, D]
        n_cls = sum(t.shape[0] for t in cls_tokens)
        if c.ibot_separate_head:
            cls_logits = self.student["dino_head"](torch.cat(cls_tokens))
            patch_logits = self.student["ibot_head"](masked_tokens)
        else:
            logits = self.student["dino_head"](torch.cat([*cls_tokens, masked_tokens]))
            cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]

        student_views = cls_logits.view(n_global + n_local, batch_size, -1)
        dino = dino_clstoken_loss(student_views, teacher_cls, c.student_temperature, n_global)
        ibot = ibot_patch_loss(patch_logits, teacher_patch, masks, c.student_temperature)
        koleo = sum(koleo_loss(v) for v in student_cls.view(n_global, batch_size, -1))
        loss = c.dino_loss_weight * dino + c.ibot_loss_weight * ibot + c.koleo_loss_weight * koleo
        return {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach(), **monitor}

    @torch.no_grad()
    def _teacher_targets(
        self, global_crops: Tensor, masks: Tensor, n_global: int
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Centred teacher probabilities: class tokens [n_global, B, K] and masked patches [M, K]; and
        the collapse statistics of this batch (:mod:`ssl_path.training.collapse`)."""
        c, temperature = self.cfg, self.teacher_temperature
        prefix, patch = self.teacher["backbone"](global_crops)
        cls = prefix[:, 0]
        masked = patch[masks]
        if c.ibot_separate_head:
            cls_logits, cls_bottleneck = self.teacher["dino_head"](cls, with_bottleneck=True)
            patch_logits = self.teacher["ibot_head"](masked)
        else:
            logits, bottleneck = self.teacher["dino_head"](torch.cat([cls, masked]), with_bottleneck=True)
            cls_logits, patch_logits = logits[: cls.shape[0]], logits[cls.shape[0] :]
            cls_bottleneck = bottleneck[: cls.shape[0]]
        # Called on every rank even with no masked patch here: both centrings all-reduce across ranks.
        if c.centering == "sinkhorn_knopp":
            n_masked = torch.tensor(float(masked.shape[0]), device=masked.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(n_masked)
            cls_probs = sinkhorn_knopp(cls_logits, temperature, c.sinkhorn_iterations)
            patch_probs = sinkhorn_knopp(patch_logits, temperature, c.sinkhorn_iterations, n_samples=n_masked)
        else:
            cls_probs = self.dino_center(cls_logits, temperature)
            patch_probs = self.ibot_center(patch_logits, temperature)
            self.dino_center.update(cls_logits)
            self.ibot_center.update(patch_logits)
        monitor = {
            "dino_target_entropy": target_entropy(cls_probs),
            "ibot_target_entropy": target_entropy(patch_probs),
            "head_cosine": mean_pairwise_cosine(cls_bottleneck),
            "cls_cosine": mean_pairwise_cosine(cls),
        }
        return cls_probs.view(n_global, cls.shape[0] // n_global, -1), patch_probs, monitor


def _param_tag(name: str, heads_apart: bool) -> str:
    if "last_layer" in name:
        return "last_layer"
    return "head" if heads_apart and "_head." in name else ""


def build(cfg: DINOv2Config, model: ModelConfig, train: TrainConfig, seed: int, device: torch.device) -> DINOv2:
    on_device = cfg.photometric == "device" or (cfg.photometric == "auto" and device.type == "cuda")
    return DINOv2(cfg, model, train, seed=seed, device_photometric=on_device)
