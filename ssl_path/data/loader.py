"""Reading WebDataset shards: the one pipeline behind every ``--data SHARDS``.

``--data`` accepts a brace pattern (``/d/shard-{000000..000009}.tar``), a single ``.tar``, a shard
folder written by ``python -m ssl_path.shards`` (read through its ``manifest.json``), the
manifest file itself, or several of these (a list, or joined with ``::`` as webdataset does).

Two modes:

- ``train``: an infinite stream; shards are resampled with replacement by every (node, worker)
  from a seed of its own, then shuffled in a buffer. Deterministic for a given seed, world size
  and worker count.
- ``eval``: one exact pass; shards are split by node, then by worker, so every sample is seen
  exactly once across all processes, in shard order within a worker.

Each sample reaches the transform as ``{"key": str, "image": uint8 tensor [3, H, W] RGB,
"meta": dict}``; the transform returns whatever the batch collation expects.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from ssl_path.data.augment import as_rgb_tensor
from ssl_path.errors import UserError

Mode = Literal["train", "eval"]
MANIFEST = "manifest.json"
IMAGE_KEYS = ("img.jpg", "img.jpeg", "img.png", "jpg", "jpeg", "png", "img.webp", "webp")
Transform = Callable[[dict[str, Any]], Any]


def shard_urls(data: str | Path | Sequence[str | Path]) -> list[str]:
    """Expand a ``--data`` value to the list of shard files it names."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    urls: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            if part:
                urls.extend(_expand_one(part))
    if not urls:
        raise UserError(f"--data {data!s}: names no shards")
    return urls


def shard_total(data: str | Path | Sequence[str | Path]) -> int | None:
    """Total sample count from the manifests, or None when any part has no manifest."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    total = 0
    for item in items:
        for part in str(item).split("::"):
            manifest = _manifest_path(Path(part))
            if manifest is None:
                return None
            total += int(_read_manifest(manifest)["total"])
    return total


def shard_dataset(
    data: str | Path | Sequence[str | Path],
    mode: Mode,
    transform: Transform | None = None,
    seed: int = 0,
    shuffle_buffer: int = 1000,
) -> IterableDataset:
    """The WebDataset pipeline over ``data``: decoded RGB samples, then ``transform``."""
    if mode not in ("train", "eval"):
        raise UserError(f"shard mode must be 'train' or 'eval', not {mode!r}")
    urls = shard_urls(data)
    if mode == "train":
        stages: list[Any] = [
            wds.ResampledShards(urls, seed=seed, deterministic=True),
            wds.tarfile_to_samples(),
        ]
        if shuffle_buffer > 1:
            stages.append(_worker_shuffle(shuffle_buffer, seed))
    else:
        stages = [
            wds.SimpleShardList(urls),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
        ]
    stages.append(wds.map(decode_sample))
    if transform is not None:
        stages.append(wds.map(transform))
    return wds.DataPipeline(*stages)


def shard_loader(
    data: str | Path | Sequence[str | Path],
    mode: Mode,
    batch_size: int,
    transform: Transform | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over :func:`shard_dataset`; in eval mode the last short batch is kept."""
    dataset = shard_dataset(data, mode, transform=transform, seed=seed, shuffle_buffer=shuffle_buffer)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=mode == "train",
        persistent_workers=num_workers > 0 and mode == "train",
    )


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw tar sample to ``{"key", "image" uint8 [3, H, W] RGB, "meta"}``."""
    key = sample.get("__key__", "?")
    name = next((k for k in IMAGE_KEYS if k in sample), None)
    if name is None:
        raise ValueError(f"sample {key} in {sample.get('__url__', '?')} has no image (keys: {sorted(sample)})")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return {"key": key, "image": as_rgb_tensor(sample[name]), "meta": meta}


def _worker_shuffle(bufsize: int, seed: int) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """A shuffle buffer whose RNG is seeded per (seed, rank, worker), created where it runs."""

    def stage(source: Iterable[Any]) -> Iterator[Any]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"ssl-path-shuffle/{seed}/{rank}/{worker}")
        return wds.shuffle(bufsize, min(bufsize, 100), rng=rng)(source)

    return stage


def _expand_one(part: str) -> list[str]:
    path = Path(part)
    manifest = _manifest_path(path)
    if manifest is not None:
        return _manifest_urls(manifest)
    if "{" in part:
        urls = list(wds.shardlists.expand_urls(part))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise UserError(f"--data {part}: {len(missing)} of {len(urls)} shards missing, first {missing[0]}")
        return urls
    if path.is_file() and path.suffix == ".tar":
        return [str(path)]
    if path.is_dir():
        raise UserError(f"--data {part}: folder has no {MANIFEST} (write shards with python -m ssl_path.shards)")
    raise UserError(f"--data {part}: no such shard, shard folder or brace pattern")


def _manifest_path(path: Path) -> Path | None:
    if path.is_dir() and (path / MANIFEST).is_file():
        return path / MANIFEST
    if path.is_file() and path.name == MANIFEST:
        return path
    return None


def _read_manifest(manifest: Path) -> dict[str, Any]:
    try:
        content = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{manifest}: unreadable shard manifest ({err})") from None
    if not isinstance(content, dict) or not {"shards", "total"} <= content.keys():
        raise UserError(f"{manifest}: not a shard manifest (needs 'shards' and 'total')")
    return content


def _manifest_urls(manifest: Path) -> list[str]:
    urls = []
    for shard in _read_manifest(manifest)["shards"]:
        path = manifest.parent / shard["name"]
        if not path.is_file():
            raise UserError(f"{manifest}: lists {shard['name']}, which is missing")
        urls.append(str(path))
    return urls
