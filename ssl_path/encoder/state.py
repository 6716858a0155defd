"""An encoder as a checkpoint entry and back: the entry every method stores and every stage loads.

``encoder_state(model, arch, kwargs)`` is what a pretraining method (or a fine-tuning task) puts
under ``checkpoint["encoder"]``: the timm architecture, the kwargs that rebuild it, its
``pretrained_cfg`` (mean, std, input size) and weights with timm's key names.
:func:`model_from_entry` rebuilds the timm model from it. Regularisation that only training uses
(dropout and drop-path rates) is never part of the published encoder: :func:`published_kwargs`.
"""

from __future__ import annotations

import re
from typing import Any

import timm
from torch import nn

from ssl_path.core.errors import UserError, first_line

PRETRAINED_CFG_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct")
# timm kwargs that shape training only (dropout, drop path): drop_rate, attn_drop_rate, drop_path_rate, ...
_TRAINING_ONLY = re.compile(r"drop(_path)?_rate$")


class ModelArgumentError(UserError):
    """timm refused a keyword argument for an architecture (e.g. ``dynamic_img_size`` for a CNN)."""


def is_training_only(kwarg: str) -> bool:
    return bool(_TRAINING_ONLY.search(kwarg))


def published_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The timm kwargs that rebuild an encoder for use, without the training-only ones."""
    return {k: v for k, v in kwargs.items() if not is_training_only(k)}


def create_timm(name: str, pretrained: bool, ref: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``, its failures as one-line user errors."""
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(name):
        raise UserError(f"unknown timm architecture in encoder ref {ref!r} (see timm.list_models())")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as err:
        raise ModelArgumentError(f"encoder ref {ref!r}: bad model argument: {err}") from None
    except (OSError, ValueError, RuntimeError) as err:
        # Hub misses (offline, unknown repo, missing files) surface as these.
        raise UserError(f"cannot load encoder {ref!r}: {first_line(err)}") from None


def encoder_state(
    model: nn.Module, architecture: str, model_kwargs: dict[str, Any], state_dict: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint entry that :func:`model_from_entry` reads back: architecture, kwargs, config and weights.

    ``state_dict`` replaces the model's own (e.g. whole tensors gathered from FSDP shards).
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    weights = model.state_dict() if state_dict is None else state_dict
    return {
        "architecture": architecture,
        "model_kwargs": published_kwargs(dict(model_kwargs)),
        "pretrained_cfg": {k: cfg[k] for k in PRETRAINED_CFG_KEYS if k in cfg},
        "state_dict": {k: v.detach().cpu() for k, v in weights.items()},
    }


def model_from_entry(entry: dict[str, Any], where: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The timm model an :func:`encoder_state` entry describes, with its weights and ``pretrained_cfg``."""
    kwargs = {**entry.get("model_kwargs", {}), **(model_kwargs or {})}
    model = create_timm(entry["architecture"], pretrained=False, ref=str(where), **kwargs)
    try:
        model.load_state_dict(entry["state_dict"], strict=True)
    except RuntimeError as err:
        raise UserError(f"checkpoint {where} does not fit {entry['architecture']}: {first_line(err)}") from None
    model.pretrained_cfg = {**model.pretrained_cfg, **entry.get("pretrained_cfg", {})}
    return model
