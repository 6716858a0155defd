"""Shared by the fine-tuning tests: a tiny ViT, small real labelled sets, and the one-line error check."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import timm
from probe_helpers import assert_one_line_error
from torch import nn

from ssl_path.encoder import encoder_info

__all__ = ["TINY_KWARGS", "assert_one_line_error", "small_wbc", "tiny_checkpoint", "tiny_vit"]

# A 4-block ViT of width 32; with dynamic_img_size it takes any input size its 16 px patches divide.
TINY_KWARGS = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 32}


def tiny_vit() -> tuple[nn.Module, object]:
    model = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, num_classes=0, **TINY_KWARGS)
    return model.eval(), encoder_info(model, "tiny")


def small_wbc(shared_data: Path, out: Path, n: int = 16) -> Path:
    """The first ``n`` images of WBC Dataset 1 with their masks and class rows, in the reader's layout."""
    source = shared_data / "wbc_seg"
    folder = out / "Dataset 1"
    folder.mkdir(parents=True)
    with (source / "Class Labels of Dataset 1.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[1 : n + 1]
    for image_id, _ in kept:
        for suffix in (".bmp", ".png"):
            shutil.copy(source / "Dataset 1" / f"{int(image_id):03d}{suffix}", folder)
    with (out / "Class Labels of Dataset 1.csv").open("w", newline="") as f:
        csv.writer(f).writerows([rows[0], *kept])
    return out


def tiny_checkpoint(path: Path) -> Path:
    """The tiny ViT as an encoder checkpoint file, a ref every stage loads."""
    from ssl_path.encoder.checkpoint import save_checkpoint
    from ssl_path.encoder.state import encoder_state

    model, _ = tiny_vit()
    return save_checkpoint({"encoder": encoder_state(model, "vit_tiny_patch16_224", TINY_KWARGS)}, path)
