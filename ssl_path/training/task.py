"""The contract between the loop and whatever it trains: a pretraining method or a head on an encoder.

A task is an ``nn.Module``; the loop calls, in this order, every step:

1. ``set_step(step) -> logs``: the task's own schedules (teacher momentum and temperature, say),
   pure functions of the step so that a resumed run recomputes them; the logs go to metrics.jsonl;
2. ``forward(batch) -> {"loss": Tensor, **terms}``: every scalar term is logged and checked finite;
3. backward, clipping (each of :meth:`clip_groups` to its own norm), the optimiser step over
   :meth:`param_groups`;
4. ``after_optimizer_step()``: e.g. the EMA teacher update.

Checkpoints store ``encoder_state(model_state)`` (:func:`ssl_path.encoder.state.encoder_state`),
the encoder later stages load. ``fsdp_units`` and ``compile_parts`` say how to shard and compile.
Every hook but ``forward`` and ``encoder_state`` has a default; the loop never asks ``hasattr``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from ssl_path.training.config import OptimConfig
from ssl_path.training.optim import param_groups


class TrainingTask(nn.Module):
    """Base class of everything the loop trains; see the module docstring for the order of the hooks."""

    name: ClassVar[str] = "task"

    def forward(self, batch: Any) -> dict[str, Tensor]:  # pragma: no cover - every task defines it
        raise NotImplementedError(f"{type(self).__name__} must define forward(batch) -> dict(loss=...)")

    def encoder_state(self, model_state: dict[str, Tensor] | None = None) -> dict[str, Any]:  # pragma: no cover
        """The encoder to publish, from this module's whole state dict (gathered from FSDP shards)."""
        raise NotImplementedError(f"{type(self).__name__} must define encoder_state()")

    def set_step(self, step: int) -> dict[str, float]:
        """Set the task's own schedules for ``step``; return what to log."""
        return {}

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """Optimiser groups: layer-wise lr decay over the trunk by default. A group may carry
        ``frozen_until`` (a step): its lr is 0 before it."""
        return param_groups(self, optim.layerwise_decay, optim.patch_embed_lr_mult)

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The parameter sets whose gradients are clipped to ``optim.clip_grad``, each on its own norm;
        all parameters as one set by default."""
        return [list(self.parameters())]

    def after_optimizer_step(self) -> None:
        """Runs after every optimiser step (e.g. an EMA teacher update)."""

    def fsdp_units(self) -> list[nn.Module]:
        """Modules to shard with FSDP, innermost first; the direct children by default."""
        return list(self.children())

    def compile_parts(self, **options: Any) -> None:
        """Compile what is worth compiling (``options`` as ``torch.compile`` takes them); the direct
        children by default."""
        for child in self.children():
            child.compile(**options)
