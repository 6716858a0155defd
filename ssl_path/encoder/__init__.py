"""The one encoder contract: every stage after pretraining asks for an encoder through :func:`load`.

``load(ref) -> (model, EncoderInfo)``: a timm model with ``num_classes=0`` in eval mode, whatever
the ref names (:mod:`ssl_path.encoder.refs`: ``timm:ARCH`` at random init, ``hf-hub:ORG/NAME``, a
training checkpoint or run directory, an exported folder), plus what downstream code needs
(:mod:`ssl_path.encoder.info`: embed dim, patch size, normalisation, input size, blocks, prefix
tokens, the blocks that feed dense heads; :func:`feature_maps` for those heads).

Checkpoints are method-agnostic (:mod:`ssl_path.encoder.checkpoint`): a method stores its encoder
under ``"encoder"`` as built by :func:`~ssl_path.encoder.state.encoder_state`, so the teacher
backbone of DINOv2 and the encoder of MAE load the same way. :mod:`ssl_path.encoder.identity`
hashes what a ref names. ``python -m ssl_path.encoder --ckpt REF`` prints the info of any ref.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ssl_path.core.errors import UserError, first_line
from ssl_path.encoder.checkpoint import encoder_entry, read_checkpoint
from ssl_path.encoder.info import (
    EncoderInfo,
    check_input_size,
    default_dense_blocks,
    encoder_info,
    feature_maps,
    patch_size,
)
from ssl_path.encoder.refs import EncoderRef, RefError, checkpoint_file, resolve
from ssl_path.encoder.state import (
    ModelArgumentError,
    create_timm,
    encoder_state,
    model_from_entry,
)

__all__ = [
    "EncoderInfo",
    "EncoderRef",
    "ModelArgumentError",
    "RefError",
    "check_input_size",
    "checkpoint_file",
    "default_dense_blocks",
    "encoder_info",
    "encoder_state",
    "feature_maps",
    "load",
    "model_kwargs",
    "patch_size",
    "resolve",
]


def load(
    ref: str | os.PathLike, device: str | torch.device = "cpu", **model_kwargs: Any
) -> tuple[nn.Module, EncoderInfo]:
    """Build the encoder named by ``ref``; ``model_kwargs`` reach timm (e.g. ``dynamic_img_size=True``)."""
    resolved = resolve(ref)
    if resolved.kind == "timm":
        model = create_timm(resolved.name, pretrained=False, ref=resolved.text, **model_kwargs)
    elif resolved.kind == "hf-hub":
        model = create_timm(resolved.name, pretrained=True, ref=resolved.text, **model_kwargs)
    elif resolved.kind == "export":
        try:
            model = create_timm(f"local-dir:{resolved.path}", pretrained=True, ref=resolved.text, **model_kwargs)
        except SafetensorError as err:  # not an OSError: create_timm lets it through
            raise UserError(f"{resolved.weights_files()[0]}: damaged safetensors file ({first_line(err)})") from None
    else:
        path = resolved.path
        model = model_from_entry(encoder_entry(read_checkpoint(path), path), str(path), model_kwargs)
    model.eval().to(device)
    return model, encoder_info(model, resolved.text)


def model_kwargs(ref: str | os.PathLike) -> dict[str, Any]:
    """The timm kwargs that rebuild the architecture ``ref`` names (``depth=6``, say), as its checkpoint
    or export stored them; ``{}`` for ``timm:ARCH``. A fine-tuning run stores them with its encoder."""
    resolved = resolve(ref)
    if resolved.kind == "checkpoint":
        return dict(encoder_entry(read_checkpoint(resolved.path), resolved.path).get("model_kwargs", {}))
    if resolved.kind == "export":
        try:
            return dict(json.loads((resolved.path / "config.json").read_text()).get("model_args", {}))
        except (OSError, ValueError) as err:
            raise UserError(f"{resolved.path / 'config.json'}: unreadable ({first_line(err)})") from None
    if resolved.kind == "hf-hub":
        from timm.models import load_model_config_from_hf

        try:
            return dict(load_model_config_from_hf(resolved.name.removeprefix("hf-hub:"))[2] or {})
        except Exception as err:  # offline, no such repo, no config: huggingface_hub raises many types
            raise UserError(f"cannot read the config of encoder {resolved.text!r}: {first_line(err)}") from None
    return {}
