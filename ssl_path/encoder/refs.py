"""The one resolver of what an encoder ref names; loading, hashing and export all ask it.

- ``timm:ARCH``        a timm architecture at random init (a baseline), e.g. ``timm:vit_small_patch16_224``
- ``hf-hub:ORG/NAME``  a timm-format model on the Hugging Face Hub (or in the local HF cache)
- a checkpoint         a ``.pt``/``.pth`` file, or a run directory meaning its ``checkpoints/last.pt``
- an export            a folder holding timm's ``config.json`` and its weights
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm

from ssl_path.core.errors import UserError
from ssl_path.encoder.checkpoint import RUN_DIR_CHECKPOINT, SUFFIXES

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

Kind = Literal["timm", "hf-hub", "checkpoint", "export"]


class RefError(UserError):
    """A ref that names no encoder."""


@dataclass(frozen=True)
class EncoderRef:
    """A parsed ref: its kind, and the name (architecture or repo) or the file it comes down to."""

    text: str
    kind: Kind
    name: str = ""  # timm architecture or hub repo
    path: Path | None = None  # the checkpoint file, or the export folder

    def weights_files(self) -> list[Path]:
        """The files whose bytes define the encoder: the checkpoint, or an export's weights and config."""
        if self.kind == "checkpoint":
            return [self.path]
        if self.kind == "export":
            weights = [self.path / n for n in EXPORT_WEIGHTS if (self.path / n).is_file()]
            # The config carries mean/std/input size, which change the features as much as the weights.
            return [*weights[:1], self.path / EXPORT_CONFIG]
        return []


def resolve(ref: str | os.PathLike) -> EncoderRef:
    """Parse ``ref``; a ref that names nothing usable is a :class:`RefError` saying why."""
    text = str(ref)
    if text.startswith("timm:"):
        return EncoderRef(text, "timm", name=text.removeprefix("timm:"))
    if text.startswith("hf-hub:"):
        return EncoderRef(text, "hf-hub", name=text)
    path = Path(os.path.expanduser(text))
    if not path.exists():
        hint = f"; did you mean 'timm:{text}'?" if timm.is_model(text) else ""
        raise RefError(f"encoder ref {text!r} is not a file, folder, 'timm:ARCH' or 'hf-hub:ORG/NAME'{hint}")
    if path.is_dir():
        if (path / EXPORT_CONFIG).is_file():
            return EncoderRef(text, "export", path=path)
        if (path / RUN_DIR_CHECKPOINT).is_file():
            return EncoderRef(text, "checkpoint", path=path / RUN_DIR_CHECKPOINT)
        raise RefError(
            f"{path} is neither a run directory (no {RUN_DIR_CHECKPOINT}) nor an exported encoder (no {EXPORT_CONFIG})"
        )
    if path.suffix in SUFFIXES:
        return EncoderRef(text, "checkpoint", path=path)
    raise RefError(f"{path}: not a checkpoint (expected {', '.join(SUFFIXES)}), run directory or exported folder")


def checkpoint_file(ref: str | os.PathLike) -> Path:
    """The training checkpoint a ref names: the file itself, or a run directory's ``checkpoints/last.pt``."""
    try:
        resolved = resolve(ref)
    except RefError:
        resolved = None
    if resolved is None or resolved.kind != "checkpoint":
        raise RefError(
            f"{ref}: not a training checkpoint ({', '.join(SUFFIXES)}) or a run directory with {RUN_DIR_CHECKPOINT}"
        )
    assert resolved.path is not None
    return resolved.path
