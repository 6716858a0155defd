"""The one encoder contract: every stage after pretraining asks for an encoder through :func:`load`.

A reference (``ref``) names an encoder in one of four ways:

- ``timm:ARCH``            a timm architecture at random init (a baseline), e.g. ``timm:vit_small_patch16_224``
- ``hf-hub:ORG/NAME``      a timm-format model on the Hugging Face Hub (or in the local HF cache)
- a training checkpoint    a ``.pt`` file, or a run directory meaning its ``checkpoints/last.pt``
- an exported folder       a folder holding timm's ``config.json`` and ``model.safetensors``

Whatever the source, the result is a timm model with ``num_classes=0`` in eval mode, plus an
:class:`EncoderInfo` describing what downstream code needs (embed dim, patch size, normalisation,
input size, blocks, prefix tokens, the blocks that feed dense heads).

Checkpoints are method-agnostic: a pretraining method stores its encoder under the ``"encoder"``
key as built by :func:`encoder_state`, so the teacher backbone of DINOv2 and the encoder of MAE
load the same way. ``python -m ssl_path.encoder --ckpt REF`` prints the info of any ref.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from torch import nn

from ssl_path.errors import UserError, first_line, run_cli

CHECKPOINT_SUFFIXES = (".pt", ".pth")
RUN_DIR_CHECKPOINT = Path("checkpoints") / "last.pt"
EXPORT_CONFIG = "config.json"
DENSE_FEATURE_LEVELS = 4


@dataclass(frozen=True)
class EncoderInfo:
    """What downstream code needs to know about an encoder, whatever its source."""

    ref: str
    architecture: str
    embed_dim: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]
    num_blocks: int
    num_prefix_tokens: int
    dense_blocks: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load(ref: str | Path, device: str | torch.device = "cpu", **model_kwargs: Any) -> tuple[nn.Module, EncoderInfo]:
    """Build the encoder named by ``ref``; ``model_kwargs`` reach timm (e.g. ``dynamic_img_size=True``)."""
    ref = str(ref)
    if ref.startswith("timm:"):
        model = _create_timm(ref.removeprefix("timm:"), pretrained=False, ref=ref, **model_kwargs)
    elif ref.startswith("hf-hub:"):
        model = _create_timm(ref, pretrained=True, ref=ref, **model_kwargs)
    else:
        model = _load_path(Path(ref), ref, model_kwargs)
    model.eval().to(device)
    return model, encoder_info(model, ref)


def encoder_info(model: nn.Module, ref: str = "") -> EncoderInfo:
    """Describe a timm model: dims, patching and normalisation from its ``pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    num_blocks, patch_size = _blocks_and_stride(model)
    return EncoderInfo(
        ref=ref,
        architecture=cfg.get("architecture") or type(model).__name__,
        embed_dim=int(getattr(model, "embed_dim", None) or model.num_features),
        patch_size=patch_size,
        mean=tuple(float(v) for v in cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)),
        input_size=tuple(int(v) for v in cfg.get("input_size", (3, 224, 224))),
        num_blocks=num_blocks,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        dense_blocks=default_dense_blocks(num_blocks),
    )


def default_dense_blocks(num_blocks: int, levels: int = DENSE_FEATURE_LEVELS) -> tuple[int, ...]:
    """Evenly spaced blocks ending at the last one, as ViTDet and UNETR tap a plain ViT.

    12 blocks -> (2, 5, 8, 11); 24 -> (5, 11, 17, 23).
    """
    levels = min(levels, num_blocks)
    step = num_blocks / levels
    return tuple(round(step * (i + 1)) - 1 for i in range(levels))


def feature_maps(model: nn.Module, images: torch.Tensor, blocks: Sequence[int], norm: bool = True) -> list[torch.Tensor]:
    """Outputs of the chosen blocks as spatial maps, one ``[B, C, H/p, W/p]`` tensor per block.

    Prefix tokens (class, registers) are dropped; ``norm`` applies the encoder's final norm to
    each map, which keeps the scales of early and late blocks comparable for a dense head.
    Images whose size differs from the training size need a model built with ``dynamic_img_size``.
    """
    if not hasattr(model, "forward_intermediates"):
        raise UserError(f"{type(model).__name__} has no forward_intermediates; it cannot feed a dense head")
    return model.forward_intermediates(  # [B, C, H/p, W/p] each
        images, indices=list(blocks), norm=norm, output_fmt="NCHW", intermediates_only=True
    )


def encoder_state(
    model: nn.Module, architecture: str, model_kwargs: dict[str, Any], state_dict: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint entry that :func:`load` reads back: architecture, kwargs, config and weights.

    Pretraining methods store this under ``checkpoint["encoder"]`` so the loop and the loader
    need not know which method made the checkpoint. ``state_dict`` replaces the model's own (e.g.
    whole tensors gathered from FSDP shards).
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    weights = model.state_dict() if state_dict is None else state_dict
    return {
        "architecture": architecture,
        "model_kwargs": dict(model_kwargs),
        "pretrained_cfg": {k: cfg[k] for k in ("mean", "std", "input_size", "interpolation", "crop_pct") if k in cfg},
        "state_dict": {k: v.detach().cpu() for k, v in weights.items()},
    }


def _create_timm(name: str, pretrained: bool, ref: str, **kwargs: Any) -> nn.Module:
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(name):
        raise UserError(f"unknown timm architecture in encoder ref {ref!r} (see timm.list_models())")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as err:
        raise UserError(f"encoder ref {ref!r}: bad model argument: {err}") from None
    except (OSError, ValueError, RuntimeError) as err:
        # Hub misses (offline, unknown repo, missing files) surface as these.
        raise UserError(f"cannot load encoder {ref!r}: {first_line(err)}") from None


def _load_path(path: Path, ref: str, model_kwargs: dict[str, Any]) -> nn.Module:
    if not path.exists():
        hint = f"; did you mean 'timm:{ref}'?" if timm.is_model(ref) else ""
        raise UserError(
            f"encoder ref {ref!r} is not a file, folder, 'timm:ARCH' or 'hf-hub:ORG/NAME'{hint}"
        )
    if path.is_dir():
        if (path / EXPORT_CONFIG).is_file():
            return _create_timm(f"local-dir:{path}", pretrained=True, ref=ref, **model_kwargs)
        if (path / RUN_DIR_CHECKPOINT).is_file():
            return _load_checkpoint(path / RUN_DIR_CHECKPOINT, model_kwargs)
        raise UserError(f"{path} is neither a run directory (no {RUN_DIR_CHECKPOINT}) nor an exported encoder (no {EXPORT_CONFIG})")
    if path.suffix in CHECKPOINT_SUFFIXES:
        return _load_checkpoint(path, model_kwargs)
    raise UserError(f"{path}: not a checkpoint (expected {', '.join(CHECKPOINT_SUFFIXES)}), run directory or exported folder")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file safely; a corrupt or truncated file is refused, naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def checkpoint_file(ref: str | Path) -> Path:
    """The checkpoint file a ref names: the file itself, or a run directory's ``checkpoints/last.pt``."""
    path = Path(ref)
    if path.is_dir() and (path / RUN_DIR_CHECKPOINT).is_file():
        return path / RUN_DIR_CHECKPOINT
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        return path
    raise UserError(f"{ref}: not a training checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a run directory with {RUN_DIR_CHECKPOINT}")


def encoder_entry(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The method-agnostic ``"encoder"`` entry of a checkpoint read by :func:`read_checkpoint`."""
    entry = checkpoint.get("encoder")
    if not isinstance(entry, dict) or not {"architecture", "state_dict"} <= entry.keys():
        raise UserError(f"checkpoint {path} has no 'encoder' entry (was it written by ssl_path.pretrain?)")
    return entry


def model_from_entry(entry: dict[str, Any], path: Path, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The timm model an :func:`encoder_state` entry describes, with its weights and ``pretrained_cfg``."""
    kwargs = {**entry.get("model_kwargs", {}), **(model_kwargs or {})}
    model = _create_timm(entry["architecture"], pretrained=False, ref=str(path), **kwargs)
    try:
        model.load_state_dict(entry["state_dict"], strict=True)
    except RuntimeError as err:
        raise UserError(f"checkpoint {path} does not fit {entry['architecture']}: {first_line(err)}") from None
    model.pretrained_cfg = {**model.pretrained_cfg, **entry.get("pretrained_cfg", {})}
    return model


def _load_checkpoint(path: Path, model_kwargs: dict[str, Any]) -> nn.Module:
    return model_from_entry(encoder_entry(read_checkpoint(path), path), path, model_kwargs)


def _blocks_and_stride(model: nn.Module) -> tuple[int, int]:
    """Number of blocks and output stride: patch size for a ViT, last reduction for a CNN."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        patch = model.patch_embed.patch_size
        return len(model.blocks), int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    feature_info = getattr(model, "feature_info", None) or []
    if feature_info:
        return len(feature_info), int(feature_info[-1]["reduction"])
    raise UserError(f"{type(model).__name__} exposes neither ViT blocks nor timm feature_info")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_path.encoder", description="Load an encoder ref and print its EncoderInfo as JSON.")
    parser.add_argument("--ckpt", required=True, help="timm:ARCH, hf-hub:ORG/NAME, a checkpoint, a run directory or an exported folder")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    _, info = load(args.ckpt, device=args.device)
    print(json.dumps(info.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
