"""Pretraining methods: each an nn.Module with forward(batch) -> dict(loss=..., **logs).

The loop (``ssl_path.train``) uses only this interface:

- ``forward(batch) -> {"loss": Tensor, **detached terms}``
- ``update_teacher(momentum)`` where the method has an EMA teacher
- ``set_step(step) -> dict`` for method-owned schedules (e.g. the teacher temperature), logged
- ``data_transform()`` / ``collate_fn()``: what the data workers run on each sample and batch
- ``encoder_state(model_state)``: the encoder to publish (``ssl_path.encoder.encoder_state`` format),
  from the method's whole state dict (gathered from FSDP shards where there are any)

A method registers its config dataclass and builder in :data:`METHODS`; the config file names it
(``method: dinov2``) and holds its settings under a section of the same name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class MethodSpec:
    config: type
    build: Callable[..., Any]  # (method_cfg, model_cfg, steps_per_epoch, seed, device) -> nn.Module


def methods() -> dict[str, MethodSpec]:
    # Imported here so that importing one loss does not build every method.
    from ssl_path.methods import dinov2

    return {"dinov2": MethodSpec(dinov2.DINOv2Config, dinov2.build)}
