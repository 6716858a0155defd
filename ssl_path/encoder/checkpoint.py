"""Training checkpoints: where a run keeps them, what a file holds, how it is written and read.

A run directory keeps ``checkpoints/last.pt`` (plus ``checkpoints/step_NNNNNNN.pt`` copies when a
run retains them). A checkpoint is one ``torch.save`` dict tagged with :data:`FORMAT`; its
``"encoder"`` entry (:func:`ssl_path.encoder.state.encoder_state`) is what every later stage loads,
whichever method or task wrote it. Files are written beside their place and renamed, so a kill
leaves the previous checkpoint whole; they are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ssl_path.core.errors import UserError, first_line
from ssl_path.core.io import atomic_path

FORMAT = "ssl-path/checkpoint/v1"
CHECKPOINT_DIR = "checkpoints"
RUN_RECORD = "run.json"  # beside checkpoints/: how the run was started (command, data, host, device)
RUN_MANIFESTS = "manifests"  # the run record's sha256 of each shard manifest its data named at the start
LAST = "last.pt"
SUFFIXES = (".pt", ".pth")
# How a file torch.save wrote begins: its zip format (torch >= 1.6), or a pickle's protocol opcode (older)
ZIP_START, PICKLE_START = b"PK\x03\x04", b"\x80"
RUN_DIR_CHECKPOINT = Path(CHECKPOINT_DIR) / LAST


class CheckpointError(UserError):
    """A checkpoint file that cannot be read, or that is not what the caller needs."""


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """The last checkpoint of a run directory (it may not exist yet)."""
    return Path(run_dir) / RUN_DIR_CHECKPOINT


def kept_path(run_dir: str | os.PathLike, step: int) -> Path:
    """A retained checkpoint of a run directory at ``step``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run dir's :data:`RUN_RECORD` as a dict; {} where it is missing, unreadable or not an object."""
    try:
        record = json.loads((Path(run_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` (tagged with :data:`FORMAT`) to ``path`` atomically, synced to disk."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with tmp.open("wb") as fh:
            torch.save({"format": FORMAT, **checkpoint}, fh)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file safely; a corrupt or truncated file is refused, naming it."""
    try:
        with open(path, "rb") as f:
            start = f.read(len(ZIP_START))
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror}") from None
    if not (start == ZIP_START or start[:1] == PICKLE_START):
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch file (neither its zip nor its pickle format)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own line would suggest weights_only=False, which runs whatever code the file holds
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe:
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds a {unsafe.group(1)} object, which a safe load "
                "(weights only) refuses"
            ) from None
        detail = re.search(r"WeightsUnpickler error: ([^\n]+)", str(err))
        raise CheckpointError(
            f"cannot read checkpoint {path}: damaged, or not a PyTorch checkpoint "
            f"({detail.group(1).strip() if detail else type(err).__name__})"
        ) from None
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(err)}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by the training loop: the whole state to resume from, not only an encoder."""
    checkpoint = read_checkpoint(path)
    if checkpoint.get("format") != FORMAT or "model" not in checkpoint:
        raise CheckpointError(f"{path} is not an ssl-path training checkpoint")
    return checkpoint


def encoder_entry(checkpoint: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The method-agnostic ``"encoder"`` entry of a checkpoint read by :func:`read_checkpoint`."""
    entry = checkpoint.get("encoder")
    if not isinstance(entry, dict) or not {"architecture", "state_dict"} <= entry.keys():
        raise CheckpointError(f"checkpoint {path} has no 'encoder' entry (was it written by ssl_path.pretrain?)")
    for key in ("model_kwargs", "pretrained_cfg"):  # optional, but mappings where present
        if not isinstance(entry.get(key, {}), dict):
            raise CheckpointError(
                f"checkpoint {path}: its encoder's {key} is {type(entry[key]).__name__}, not a mapping"
            )
    return entry
