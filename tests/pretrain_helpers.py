"""Shared by the tests that need a trained encoder: a very small DINOv2 config and real tiles to train it on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from ssl_path.encoder.checkpoint import checkpoint_path
from ssl_path.tiling import TilingParams, make_shards

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "data" / "sample"

# 8 steps of 4 tiles, every step logged, a checkpoint every 2: any method's tiny run.
TINY_STEPS = [
    "train.batch_size=4",
    "train.steps_per_epoch=4",
    "train.epochs=2",
    "train.num_workers=0",
    "train.shuffle_buffer=20",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "optim.warmup_epochs=0.5",
]
# A very small DINOv2: 2 blocks of width 64, 2 register tokens and layer scale, 64 px global and
# 32 px local crops, 8 steps of 4 tiles.
TINY = [
    "model.arch=vit_tiny_patch16_224",
    "model.kwargs={img_size: 64, depth: 2, embed_dim: 64, num_heads: 2, reg_tokens: 2, init_values: 1.0e-5, drop_path_rate: 0.1}",
    "dinov2.crops.global_size=64",
    "dinov2.crops.local_size=32",
    "dinov2.crops.n_local=2",
    "dinov2.n_prototypes=256",
    "dinov2.head_hidden_dim=64",
    "dinov2.head_bottleneck_dim=32",
    *TINY_STEPS,
    "dinov2.freeze_last_layer_epochs=0.25",
    "optim.lr=0.01",
    "optim.lr_scaling=none",
]


def make_tiles(out: Path) -> Path:
    """64 px tiles of 12 AMi-Br patches and 225 of the whole slide, from the project's own sample
    (data/sample, so that these tests need no ../shared), in shards of 40 under ``out``."""
    patches = sorted((SAMPLE_DATA / "amibr" / "patches" / "normal").glob("*.png"))[:12]
    slide = SAMPLE_DATA / "slide" / "CMU-1-Small-Region.svs"
    params = TilingParams(tile_size=64, min_tissue=0.0, samples_per_shard=40, max_tiles_per_source=225)
    make_shards([*patches, slide], out, params, progress=False)
    return out


def pretrain_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m ssl_path.pretrain --no-progress ARGS`` in a process of its own."""
    cmd = [sys.executable, "-m", "ssl_path.pretrain", "--no-progress", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The whole training state of a run's last checkpoint."""
    return torch.load(checkpoint_path(run_dir), map_location="cpu", weights_only=True)["model"]
