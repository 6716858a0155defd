"""Reading WebDataset shards: the one pipeline behind every ``--data SHARDS``.

``--data`` accepts a brace pattern (``/d/shard-{000000..000009}.tar``), a single ``.tar``, a shard
folder written by ``python -m ssl_path.shards`` (read through its ``manifest.json``), the
manifest file itself, or several of these (a list, or joined with ``::`` as webdataset does).

Two modes:

- ``train``: an infinite stream; shards are resampled with replacement by every (node, worker)
  from a seed of its own, then shuffled in a buffer. Deterministic for a given seed, world size
  and worker count, and resumable: given a :class:`StreamPosition` (batches already handed out),
  each worker skips what it had produced before, so a resumed run sees the batches an
  uninterrupted run would have seen next. Train samples also carry ``index``, their position in
  their worker's stream, which augmentations use as a per-draw seed.
- ``eval``: one exact pass; shards are split by node, then by worker, so every sample is seen
  exactly once across all processes, in shard order within a worker.

Each sample reaches the transform as ``{"key": str, "image": uint8 tensor [3, H, W] RGB,
"meta": dict}``; the transform returns whatever the batch collation expects.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from ssl_path.core.errors import UserError
from ssl_path.data.images import as_rgb_tensor
from ssl_path.data.manifest import MANIFEST, manifest_path, manifest_urls, read_manifest

Mode = Literal["train", "eval"]
IMAGE_KEYS = ("img.jpg", "img.jpeg", "img.png", "jpg", "jpeg", "png", "img.webp", "webp")
Transform = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class StreamPosition:
    """Where a train stream stands: ``batches`` of ``batch_size`` samples handed out by its DataLoader.

    A DataLoader over an iterable dataset takes batches from its workers in strict rotation
    (batch i from worker i % W), so the position fixes how far every worker's own stream got.
    """

    batches: int = 0
    batch_size: int = 1

    def worker_stream(self, worker: int, num_workers: int) -> tuple[int, int]:
        """(stream id, samples to skip) for ``worker`` of a loader that restarts at this position.

        A new DataLoader asks worker 0 first, but batch ``batches`` belongs to stream
        ``batches % W``; so worker j plays stream ``(j + batches) % W``.
        """
        stream = (worker + self.batches) % num_workers
        produced = max(0, -(-(self.batches - stream) // num_workers))  # #{i < batches : i % W == stream}
        return stream, produced * self.batch_size


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
            manifest = manifest_path(Path(part))
            if manifest is None:
                return None
            total += int(read_manifest(manifest)["total"])
    return total


def shard_dataset(
    data: str | Path | Sequence[str | Path],
    mode: Mode,
    transform: Transform | None = None,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    position: StreamPosition = StreamPosition(),
) -> IterableDataset:
    """The WebDataset pipeline over ``data``: decoded RGB samples, then ``transform``.

    ``position`` (train mode) resumes the stream after the batches a previous loader handed out.
    """
    if mode not in ("train", "eval"):
        raise UserError(f"shard mode must be 'train' or 'eval', not {mode!r}")
    urls = shard_urls(data)
    if mode == "train":
        stages: list[Any] = [_train_stream(urls, seed, shuffle_buffer, position)]
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
    start_batch: int = 0,
) -> DataLoader:
    """A DataLoader over :func:`shard_dataset`; in eval mode the last short batch is kept.

    ``start_batch`` (train mode) resumes after that many batches of an identical loader.
    """
    position = StreamPosition(start_batch, batch_size)
    dataset = shard_dataset(
        data, mode, transform=transform, seed=seed, shuffle_buffer=shuffle_buffer, position=position
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=mode == "train",
        persistent_workers=num_workers > 0 and mode == "train",
        # Its own generator: creating an iterator must not draw from the global RNG a resumed run restores.
        generator=torch.Generator().manual_seed(seed),
    )


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw tar sample to ``{"key", "image" uint8 [3, H, W] RGB, "meta"}``."""
    key = sample.get("__key__", "?")
    name = next((k for k in IMAGE_KEYS if k in sample), None)
    if name is None:
        raise ValueError(f"sample {key} in {sample.get('__url__', '?')} has no image (keys: {sorted(sample)})")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    decoded = {"key": key, "image": as_rgb_tensor(sample[name]), "meta": meta}
    if "__index__" in sample:
        decoded["index"] = sample["__index__"]
    return decoded


def _train_stream(
    urls: list[str], seed: int, bufsize: int, position: StreamPosition
) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """Resampled shards -> samples -> shuffle buffer -> numbered samples, skipping what was consumed.

    Every random choice comes from generators seeded by (seed, rank, stream) and created where the
    stage runs (in the worker), so the stream is a pure function of those and of the position.
    Skipped samples are read but never decoded.
    """

    def stage(_: Iterable[Any] = ()) -> Iterator[Any]:
        rank, _, worker, num_workers = wds.utils.pytorch_worker_info()
        stream, skip = position.worker_stream(worker, num_workers)
        shard_rng = random.Random(f"ssl-path-shards/{seed}/{rank}/{stream}")
        shards = ({"url": shard_rng.choice(urls)} for _ in iter(int, 1))
        samples = wds.tarfile_to_samples()(shards)
        if bufsize > 1:
            shuffle_rng = random.Random(f"ssl-path-shuffle/{seed}/{rank}/{stream}")
            samples = wds.shuffle(bufsize, min(bufsize, 100), rng=shuffle_rng)(samples)
        for index, sample in enumerate(samples):
            if index >= skip:
                sample["__index__"] = index
                yield sample

    return stage


def _expand_one(part: str) -> list[str]:
    path = Path(part)
    manifest = manifest_path(path)
    if manifest is not None:
        return manifest_urls(manifest)
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
