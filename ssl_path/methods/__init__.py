"""Pretraining methods and their registry.

A method is a :class:`~ssl_path.methods.base.PretrainingMethod`: the loop's
:class:`~ssl_path.training.task.TrainingTask` plus the data hooks (what the workers run on each
sample and batch) and the facts a model card states (title, citation, which weights it publishes).
A method registers its config dataclass and builder here; the config file names it (``method:
dinov2``) and holds its settings under a section of the same name. A new method is one module, one
line in :func:`methods` and a config; the contract tests then cover it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ssl_path.methods.backbone import ModelConfig
from ssl_path.methods.base import PretrainingMethod
from ssl_path.training.config import TrainConfig

__all__ = ["MethodSpec", "PretrainingMethod", "methods"]


@dataclass(frozen=True)
class MethodSpec:
    method: type[PretrainingMethod]  # its class: the card facts are class attributes
    config: type  # the dataclass of its config section
    build: Callable[[Any, ModelConfig, TrainConfig, int, torch.device], PretrainingMethod]
    # (method_cfg, model_cfg, train_cfg, seed, device) -> the method, on the CPU


def methods() -> dict[str, MethodSpec]:
    # Imported here so that importing one loss does not build every method.
    from ssl_path.methods import dinov2, mae

    return {
        "dinov2": MethodSpec(dinov2.DINOv2, dinov2.DINOv2Config, dinov2.build),
        "mae": MethodSpec(mae.MAE, mae.MAEConfig, mae.build),
    }
