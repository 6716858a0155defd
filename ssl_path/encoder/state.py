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
    if name.startswith("hf-hub:") and pretrained:
        _refuse_unreachable_hub(name.removeprefix("hf-hub:"), ref)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as err:
        raise ModelArgumentError(f"encoder ref {ref!r}: bad model argument: {err}") from None
    except (OSError, ValueError, RuntimeError) as err:
        # Hub misses (offline, unknown repo, missing files) surface as these.
        raise UserError(f"cannot load encoder {ref!r}: {first_line(err)}") from None


def _refuse_unreachable_hub(repo_ref: str, ref: str) -> None:
    """Fail at once, in one line, when a Hub model is neither in the local cache nor reachable.

    huggingface_hub retries a file it has not cached for half a minute, logging every try; one
    request of its own without retries (within its ``HF_HUB_ETAG_TIMEOUT``) first tells whether the
    Hub answers at all. Offline mode (``HF_HUB_OFFLINE=1``) reads the cache only and needs no check.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    repo, _, revision = repo_ref.partition("@")  # timm's hf-hub:ORG/NAME[@REVISION]
    if constants.is_offline_mode():
        return
    try:
        if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision or None), str):
            return  # cached: huggingface_hub falls back to it without retrying
        get_hf_file_metadata(
            hf_hub_url(repo, "config.json", revision=revision or None), timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except HFValidationError as err:
        raise UserError(f"encoder ref {ref!r} does not name a Hub repo: {first_line(err)}") from None
    except HfHubHTTPError:
        return  # the Hub answered: a missing repo or file is reported by the load itself
    except Exception as err:  # no HTTP answer at all (refused, timed out, no route, DNS): same to a user
        raise UserError(
            f"cannot load encoder {ref!r}: the Hub at {constants.ENDPOINT} cannot be reached ({first_line(err)}); "
            "set HF_HUB_OFFLINE=1 to use only the local cache"
        ) from None


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
