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

What cannot be read is skipped, never the end of a stream: a shard that does not open or breaks off
(truncated, not a tar), a sample without an image, an image that does not decode. Each becomes a
:class:`Skip` (shard, key, reason) that keeps the place of what it replaces, so positions, and with
them exact resume, do not depend on what was readable; a rerun skips the same samples. A
:func:`shard_loader` batch carries the Skips of its places under :data:`SKIPPED` (the samples of a
batch are those that were read), from worker processes to the main one; the training loop counts
them. :func:`check_shards` finds the shards that cannot be read at all cheaply, before a stream
starts. A :class:`~ssl_path.core.errors.UserError` raised in a worker process reaches the caller of
the loader as itself, one line, not as the worker's traceback.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, NamedTuple, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ssl_path.core.errors import UserError
from ssl_path.data.images import as_rgb_tensor
from ssl_path.data.manifest import MANIFEST, data_locations, manifest_path, manifest_urls, read_manifest

Mode = Literal["train", "eval"]
IMAGE_KEYS = ("img.jpg", "img.jpeg", "img.png", "jpg", "jpeg", "png", "img.webp", "webp")
Transform = Callable[[dict[str, Any]], Any]
# The key of a shard_loader batch (a dict) that lists the Skips of its places; absent when none.
SKIPPED = "skipped"
# What reading a tar raises on a damaged or foreign file (ValueError covers undecodable names).
_TAR_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError)


class Skip(NamedTuple):
    """What a stream could not read: sample ``key`` of ``shard``, or the whole shard (``key`` "")."""

    shard: str
    key: str
    reason: str


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
    urls = [url for part in data_locations(data) for url in _expand_one(part)]
    if not urls:
        raise UserError(f"--data {data!s}: names no shards")
    return urls


def shard_total(data: str | Path | Sequence[str | Path]) -> int | None:
    """Total sample count from the manifests, or None when any part has no manifest."""
    total = 0
    for part in data_locations(data):
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
            _read_shards,
        ]
    stages.append(functools.partial(_decoded, transform=transform))
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

    Without ``collate_fn``, batches are made by :func:`collate_samples`.

    ``start_batch`` (train mode) resumes after that many batches of an identical loader. A batch
    holds the samples of its ``batch_size`` places that were read, through ``collate_fn``, with the
    Skips of the others under :data:`SKIPPED` when the batch is a dict; a batch none of whose
    samples was read is ``{SKIPPED: [...]}``. Other batch types cannot carry Skips, which are then
    printed on stderr, one line each.
    """
    position = StreamPosition(start_batch, batch_size)
    dataset = shard_dataset(
        data, mode, transform=transform, seed=seed, shuffle_buffer=shuffle_buffer, position=position
    )
    return _ShardLoader(
        wds.DataPipeline(dataset, _carry_worker_errors),
        batch_size=batch_size,
        collate_fn=_Collate(collate_fn or collate_samples),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=mode == "train",
        persistent_workers=num_workers > 0 and mode == "train",
        # Its own generator: creating an iterator must not draw from the global RNG a resumed run restores.
        generator=torch.Generator().manual_seed(seed),
    )


def collate_samples(samples: list[Any]) -> Any:
    """``default_collate``, except that each sample's ``meta`` stays its own dict, in a list.

    A tile's meta has fields that may be None (``mpp`` of an image without a pixel size) or absent,
    which ``default_collate`` cannot stack.
    """
    if samples and all(isinstance(s, dict) and "meta" in s for s in samples):
        rest = default_collate([{k: v for k, v in s.items() if k != "meta"} for s in samples])
        return {**rest, "meta": [s["meta"] for s in samples]}
    return default_collate(samples)


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw tar sample to ``{"key", "image" uint8 [3, H, W] RGB, "meta"}``.

    A sample that cannot be decoded is a UserError whose message is the reason alone (no image,
    an undecodable image or json): the stream files it as a Skip under the sample's shard and key.
    """
    name = next((k for k in IMAGE_KEYS if k in sample), None)
    if name is None:
        files = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
        raise UserError(f"no image (files: {files})")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        raise UserError(f"unreadable json: {err}") from None
    decoded = {"key": sample.get("__key__", "?"), "image": as_rgb_tensor(sample[name]), "meta": meta}
    if "__index__" in sample:
        decoded["index"] = sample["__index__"]
    return decoded


def check_shards(urls: Sequence[str]) -> list[Skip]:
    """A Skip for each shard of ``urls`` that cannot be read at all, found cheaply, before any stream.

    A shard must be a file, open as a tar with a first member, and, uncompressed, end with a zero
    block: tar writers close an archive with two, so a shard cut short by a full disk or a killed
    copy lacks them. Damage further in is for the stream to find, while it reads.
    """
    bad = []
    for url in dict.fromkeys(urls):
        reason = _unreadable(Path(url))
        if reason is not None:
            bad.append(Skip(url, "", reason))
    return bad


def _unreadable(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        with tarfile.open(path, mode="r|*") as tar:
            if tar.next() is None:
                return "an empty tar"
        if path.suffix == ".tar":
            size = path.stat().st_size
            with path.open("rb") as f:
                f.seek(max(0, size - tarfile.BLOCKSIZE))
                tail = f.read()
            if size % tarfile.BLOCKSIZE or tail.strip(b"\0"):
                return f"truncated: {size} bytes without the end-of-archive block"
    except _TAR_ERRORS as err:
        return f"not a readable tar ({_reason(err)})"
    return None


def _read_shards(shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any] | Skip]:
    for shard in shards:
        yield from _read_shard(shard["url"])


def _read_shard(url: str) -> Iterator[dict[str, Any] | Skip]:
    """The samples of one shard in tar order, then one Skip if it breaks off before its end or has none.

    webdataset's grouping of files into samples (``base_plus_ext``), on tarfile directly: its own tar
    iterators append the stream and url to a failure's arguments, which leaves no readable reason.
    The sample being read when a shard breaks off is dropped with the rest of the shard. A shard
    without samples is a Skip too, else a stream drawing only such shards would never yield.
    """
    sample: dict[str, Any] | None = None
    read = 0
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for info in tar:
                if not info.isreg() or info.name.startswith("__"):
                    continue  # folders, and webdataset's own metadata files
                key, suffix = wds.tariterators.base_plus_ext(info.name)
                if key is None:
                    continue  # a file without an extension belongs to no sample
                data = tar.extractfile(info).read()  # type: ignore[union-attr]  # a regular member
                if sample is not None and key != sample["__key__"]:
                    yield sample
                    sample, read = None, read + 1
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                if suffix.lower() in sample:
                    raise ValueError(f"{info.name} appears twice")
                sample[suffix.lower()] = data
    except _TAR_ERRORS as err:
        yield Skip(url, "", f"unreadable after {read} samples: {_reason(err)}")
        return
    if sample is not None:
        yield sample
    elif not read:
        yield Skip(url, "", "no samples")


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _decoded(items: Iterable[dict[str, Any] | Skip], transform: Transform | None) -> Iterator[Any]:
    """Raw samples decoded and transformed; one that does not decode becomes a Skip in its place."""
    for item in items:
        if isinstance(item, Skip):
            yield item
            continue
        try:
            sample = decode_sample(item)
        except UserError as err:
            yield Skip(item.get("__url__", "?"), item.get("__key__", "?"), str(err))
            continue
        yield transform(sample) if transform is not None else sample


class _WorkerError:
    """A UserError raised in a worker process, as a value: torch would re-raise it in the main process
    with the worker's traceback as its message, where the user is owed one line."""

    def __init__(self, message: str) -> None:
        self.message = message


def _carry_worker_errors(items: Iterable[Any]) -> Iterator[Any]:
    try:
        yield from items
    except UserError as err:
        if get_worker_info() is None:
            raise  # in the main process: nothing to carry
        error = _WorkerError(str(err))
        while True:  # every place of the batch, which a train loader would drop if short
            yield error


class _Collate:
    """Runs where the batch is made: ``collate_fn`` over the samples read, the Skips under SKIPPED."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[Any]) -> Any:
        error = next((item for item in items if isinstance(item, _WorkerError)), None)
        if error is not None:
            return error
        skips = [item for item in items if isinstance(item, Skip)]
        samples = [item for item in items if not isinstance(item, Skip)]
        try:
            batch = self.collate_fn(samples) if samples else {}
        except UserError as err:
            if get_worker_info() is None:
                raise
            return _WorkerError(str(err))
        if skips and isinstance(batch, dict):
            batch[SKIPPED] = skips
        else:
            for skip in skips:
                print(f"warning: {skip.shard}: skipped {skip.key or 'the shard'}: {skip.reason}", file=sys.stderr)
        return batch


class _ShardLoader(DataLoader):
    """A DataLoader that raises what a worker carried as a value (:class:`_WorkerError`) as a UserError."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, _WorkerError):
                raise UserError(batch.message)
            yield batch


def _train_stream(
    urls: list[str], seed: int, bufsize: int, position: StreamPosition
) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """Resampled shards -> samples -> shuffle buffer -> numbered samples, skipping what was consumed.

    Every random choice comes from generators seeded by (seed, rank, stream) and created where the
    stage runs (in the worker), so the stream is a pure function of those and of the position.
    Samples consumed before the position are read but never decoded. A shard that breaks off is
    one Skip, numbered like a sample, each time it is drawn.
    """

    def stage(_: Iterable[Any] = ()) -> Iterator[Any]:
        rank, _, worker, num_workers = wds.utils.pytorch_worker_info()
        stream, skip = position.worker_stream(worker, num_workers)
        shard_rng = random.Random(f"ssl-path-shards/{seed}/{rank}/{stream}")
        items: Iterator[Any] = (item for _ in iter(int, 1) for item in _read_shard(shard_rng.choice(urls)))
        if bufsize > 1:
            shuffle_rng = random.Random(f"ssl-path-shuffle/{seed}/{rank}/{stream}")
            items = wds.shuffle(bufsize, min(bufsize, 100), rng=shuffle_rng)(items)
        for index, item in enumerate(items):
            if index >= skip:
                if isinstance(item, dict):
                    item["__index__"] = index
                yield item

    return stage


def _expand_one(part: str) -> list[str]:
    path = Path(part)
    manifest = manifest_path(path)
    if manifest is not None:
        return manifest_urls(manifest)
    if "{" in part:
        urls = list(wds.shardlists.expand_urls(part))
        # Some missing shards are for check_shards to name, all of them at once; none is a wrong pattern.
        if not any(Path(u).is_file() for u in urls):
            raise UserError(f"--data {part}: none of its {len(urls)} shards exists, first {urls[0]}")
        return urls
    if path.is_file() and path.suffix == ".tar":
        return [str(path)]
    if path.is_dir():
        raise UserError(f"--data {part}: folder has no {MANIFEST} (write shards with python -m ssl_path.shards)")
    raise UserError(f"--data {part}: no such shard, shard folder or brace pattern")
