"""Tile images and whole slides into WebDataset shards: :func:`make_shards`, behind ``python -m ssl_path.shards``.

Each input (a file, or a folder searched recursively) is opened through :mod:`ssl_path.tiling.slides`,
brought to a target resolution (``--mpp``, from the best pyramid level at or finer than it, then
resized; or ``--downscale`` when the file has no resolution), cut into a grid of ``--tile-size``
tiles every ``--stride`` pixels, and filtered by tissue (:mod:`ssl_path.tiling.tissue`). Tiles are
written to ``OUT/shard-000000.tar, ...``, each sample ``{__key__, img.jpg|img.png, json}``, then
``OUT/manifest.json``, in one global order shuffled from ``--shuffle-seed`` (recorded in the
manifest's params): every shard then holds the data's mix of sources, so a training stream, which
reads a few shards at a time through a bounded buffer, mixes them too. Tiles written in input order
(``--shuffle-seed none``) put one dataset, or one slide, in each run of shards, and whole stretches
of batches come from one of them. The shuffle is exact and costs the tiles' size again on disk
for a while: tiles go first to :data:`SHUFFLE_BUCKETS` temporary files at random, then each file,
read whole and permuted, goes into the shards (so a bucket, about 1/128 of the data, must fit in
memory). The output is the same whatever ``--workers``: workers read and encode, the main process
draws the order and writes.

Files that cannot be used (unreadable, empty, no tissue) are skipped and listed in the manifest.
Worker processes end with the stage however it ends, SIGKILL included (:func:`_init_worker`); a
failed or stopped run leaves no shard behind, and a full disk is one error naming the file.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import shutil
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import webdataset as wds
from tqdm import tqdm

from ssl_path.core.errors import UserError
from ssl_path.core.io import NO_ROOM, DiskFullError, atomic_dir, atomic_path, check_out_dir, write_json
from ssl_path.data.manifest import FORMAT, MANIFEST, SHARD_NAME
from ssl_path.tiling.inputs import domain_labeler, find_inputs
from ssl_path.tiling.params import CHUNK, PlanResult, Source, Tile, TilingParams
from ssl_path.tiling.plan import (
    InProcess,
    close_cached,
    results_in_order,
    stain_normalizer,
)

_TAR_MTIME = 0  # fixed member times: the same tiles give byte-identical shards
SHUFFLE_BUCKETS = 128
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _ShardWriter:
    """Writes samples into ``shard-%06d.tar`` files of ``per_shard`` samples, each renamed into place when full.

    A shard's :func:`atomic_path`, file and tar are one stack. An error while finishing a shard (the
    tar's end, the close) runs through it; any other error, a full disk while writing a sample
    included, is handed to :meth:`abort`. Either way :func:`atomic_path` sees it, names the shard
    (a :class:`~ssl_path.core.io.DiskFullError` for a full disk) and removes the temporary file.
    """

    def __init__(self, out: Path, per_shard: int) -> None:
        self.out, self.per_shard = out, per_shard
        self.shards: list[dict[str, Any]] = []
        self._stack: ExitStack | None = None
        self._tar: wds.TarWriter | None = None
        self._stream: BinaryIO | None = None
        self._count = 0

    def write(self, tile: Tile, ext: str) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        meta = json.dumps(tile.meta, sort_keys=True).encode("utf-8")
        self._tar.write({"__key__": tile.key, f"img.{ext}": tile.image, "json": meta})  # failing: see abort()
        self._count += 1
        if self._count == self.per_shard:
            self._finish()

    def _open(self) -> None:
        name = SHARD_NAME.format(len(self.shards))
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.out / name))
            stream = stack.enter_context(open(tmp, "wb"))
            tar = wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME)
            stack.callback(self._close_tar)  # runs before the file closes and the rename
            self._stack = stack.pop_all()
        self._tar, self._stream = tar, stream
        self.shards.append({"name": name, "count": 0})

    def _close_tar(self) -> None:
        if self._tar is not None:  # None once aborted: a dropped shard needs no tar trailer
            self._tar.close()

    def _finish(self) -> None:
        assert self._stack is not None
        stack, count = self._stack, self._count
        try:
            stack.close()  # the tar's end, the file's close and the rename: any error reaches atomic_path
        except BaseException:
            self.shards.pop()
            raise
        finally:
            self._stack, self._tar, self._stream, self._count = None, None, None, 0
        self.shards[-1]["count"] = count

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self, err: BaseException) -> None:
        """Drop the shard being written because of ``err``: its temporary file is removed, nothing is renamed.

        Raises what :func:`atomic_path` makes of ``err`` (a :class:`DiskFullError` for a full disk).
        """
        if self._stack is None:
            return
        stack, tar, stream = self._stack, self._tar, self._stream
        self._stack, self._tar, self._stream, self._count = None, None, None, 0
        self.shards.pop()
        assert tar is not None and stream is not None
        # The dropped shard's bytes need not reach the disk: the file is closed first, so that neither
        # a flush into a full disk nor the tar's end replaces ``err`` as the reason for stopping.
        with suppress(OSError):
            stream.close()
        with suppress(ValueError):  # the tar's end goes into the closed file: nothing is written
            tar.close()
        stack.__exit__(type(err), err, err.__traceback__)


class _ShuffleBuckets:
    """The two-pass exact shuffle: each tile to a random bucket file, then each bucket permuted in memory.

    Uniform bucket draws followed by a uniform permutation of each bucket give a uniform permutation
    of all tiles, from ``seed`` alone, whatever the number of workers.
    """

    def __init__(self, folder: Path, seed: int, n_buckets: int = SHUFFLE_BUCKETS) -> None:
        self.folder, self.seed, self.n_buckets = folder, seed, n_buckets
        self._rng = np.random.default_rng([seed, 0])
        self._files: dict[int, BinaryIO] = {}

    def add(self, tile: Tile) -> None:
        bucket = int(self._rng.integers(self.n_buckets))
        path = self.folder / f"bucket-{bucket:03d}.pkl"
        try:
            if bucket not in self._files:
                self.folder.mkdir(exist_ok=True)
                self._files[bucket] = open(path, "wb")
            pickle.dump((tile.key, tile.image, tile.meta), self._files[bucket], protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as err:
            if err.errno not in NO_ROOM:
                raise
            raise DiskFullError(path, err.errno) from err

    def drain(self) -> Iterator[Tile]:
        """Every tile once, in the shuffled order; each bucket file is removed once read."""
        self.close()
        for bucket in range(self.n_buckets):
            path = self.folder / f"bucket-{bucket:03d}.pkl"
            if not path.exists():
                continue
            tiles = []
            with open(path, "rb") as f:  # written above by this process: trusted pickles
                while True:
                    try:
                        tiles.append(Tile(*pickle.load(f)))
                    except EOFError:
                        break
            path.unlink()
            for i in np.random.default_rng([self.seed, 1, bucket]).permutation(len(tiles)):
                yield tiles[i]
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        files, self._files = list(self._files.values()), {}
        for f in files:
            try:
                f.close()  # the last buffered write
            except OSError as err:
                if err.errno not in NO_ROOM:
                    raise
                raise DiskFullError(f.name, err.errno) from err


def make_shards(
    inputs: Sequence[str | Path],
    out: str | Path,
    params: TilingParams,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tile ``inputs`` into WebDataset shards in ``out``; return the manifest (also written to ``out``)."""
    if not inputs:
        raise UserError("--data: no inputs given")
    files, skipped = find_inputs(inputs)
    out = check_out_dir(out, overwrite, inputs)
    label = domain_labeler(params)
    sources = [Source(i, path, label(path)) for i, path in enumerate(files)]
    if not sources:
        raise UserError(f"--data {' '.join(map(str, inputs))}: no image files found")
    stain_normalizer(params.stain_norm, params.stain_reference, params.stain_strength)  # bad reference: fail now
    with atomic_dir(out, overwrite, inputs) as tmp:
        return _write_shards(sources, skipped, tmp, params, progress)


def _write_shards(
    sources: Sequence[Source], skipped: list[dict[str, str]], out: Path, params: TilingParams, progress: bool
) -> dict[str, Any]:
    """Tile ``sources`` into ``out`` (a fresh folder) and write its manifest."""
    records: dict[int, dict[str, Any]] = {}
    writer = _ShardWriter(out, params.samples_per_shard)
    executor: Any = InProcess()
    pool = None
    if params.workers > 1:
        pool = ProcessPoolExecutor(max_workers=params.workers, initializer=_init_worker, initargs=(os.getpid(),))
        executor = pool
    bar = tqdm(total=len(sources), desc="tiling", unit="file", disable=not progress, dynamic_ncols=True)
    total = 0
    buckets = _ShuffleBuckets(out / ".shuffle", params.shuffle_seed) if params.shuffle_seed is not None else None
    try:
        for result in results_in_order(executor, sources, params, depth=2 * params.workers + 2):
            if isinstance(result, PlanResult):
                records[result.source.index] = _source_record(result)
                done = result.skip_reason is not None or len(result.positions) <= CHUNK
            else:
                records[result.source.index]["errors"].extend(result.errors)
                done = result.last
            for tile in result.tiles:
                if buckets is not None:
                    buckets.add(tile)
                else:
                    writer.write(tile, params.format)
            records[result.source.index]["tiles"] += len(result.tiles)
            total += len(result.tiles)
            if done:
                bar.update(1)
                bar.set_postfix(tiles=total, refresh=False)
        if buckets is not None:
            bar.close()
            for tile in tqdm(buckets.drain(), total=total, desc="shuffling", unit="tile", disable=not progress):
                writer.write(tile, params.format)
        writer.close()
    except BaseException as err:
        writer.abort(err)
        raise
    finally:
        bar.close()
        if buckets is not None:
            buckets.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        close_cached()

    used, skipped = _split_records(sources, records, skipped)
    if total == 0:
        first = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        raise UserError(f"no usable input: all {len(skipped)} skipped ({first}{'; ...' if len(skipped) > 3 else ''})")
    manifest = {
        "format": FORMAT,
        "params": params.manifest_params(),
        "shards": writer.shards,
        "total": total,
        "sources": used,
        "skipped": skipped,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def resolution_notes(manifest: dict[str, Any]) -> list[str]:
    """Warnings on the tiles' resolution, from a manifest: sources read finer than they were scanned
    (upsampled tiles: more pixels, no more detail; e.g. a 20x slide at ``--mpp 0.25``, or
    ``--downscale`` below 1) and, under ``--mpp``, sources without a pixel size, tiled at
    ``--downscale`` instead. Each names how many files and the first of them."""
    params = manifest["params"]
    sources = manifest["sources"]
    tolerance = 1.0 - params["resolution_tolerance"]
    upsampled = [s for s in sources if s["downsample"] is not None and s["downsample"] < tolerance]
    notes = []
    if upsampled:
        first = upsampled[0]
        scanned = f"{first['mpp'] / first['downsample']:.3g} µm/px, " if first["mpp"] is not None else ""
        notes.append(
            f"warning: {len(upsampled)} of {len(sources)} files are read finer than they were scanned, "
            f"their tiles upsampled (e.g. {first['path']}: {scanned}enlarged {1 / first['downsample']:.3g}x); "
            "they hold no finer detail than the scan"
        )
    if params["mpp"] is not None:
        unknown = [s for s in sources if s["mpp"] is None]
        if unknown:
            notes.append(
                f"warning: {len(unknown)} of {len(sources)} files have no pixel size (e.g. {unknown[0]['path']}); "
                f"they were tiled at --downscale {params['downscale']:g}, not at --mpp {params['mpp']:g}"
            )
    return notes


def _init_worker(parent: int) -> None:
    """Pool initializer: a worker ends with the stage, however the stage ends.

    The stage alone answers Ctrl-C and SIGTERM, which reach the workers too (a terminal signals its
    process group, Slurm every process of the job): it drops its shard and stops the pool, whose
    workers finish the job at hand and exit. A worker that took them itself would die in the middle
    of the queue protocol (a traceback, a broken pool). A worker blocks on its job queue, whose other
    end it inherited, so a stage killed by SIGKILL would leave it waiting forever; Linux's
    ``PR_SET_PDEATHSIG`` has the kernel kill it instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the stage died before the request took effect
        os._exit(1)


def _source_record(plan: PlanResult) -> dict[str, Any]:
    geometry = plan.geometry
    return {
        "path": plan.source.path,
        "tiles": 0,
        "domain": plan.source.domain,
        "level": geometry.level if geometry else None,
        "downsample": round(geometry.downsample, 6) if geometry else None,
        "mpp": round(geometry.mpp, 6) if geometry and geometry.mpp is not None else None,
        "grid": plan.grid,
        "skip_reason": plan.skip_reason,
        "errors": list(plan.errors),
    }


def _split_records(
    sources: Sequence[Source], records: dict[int, dict[str, Any]], skipped: list[dict[str, str]]
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Sources that gave tiles, and every input that gave none with the reason, in input order."""
    used, skipped = [], list(skipped)
    for source in sources:
        record = records[source.index]
        errors = record.pop("errors")
        reason = record.pop("skip_reason")
        if record["tiles"] == 0:
            if reason is None:
                reason = f"all {len(errors)} tiles failed ({errors[0] if errors else 'no detail'})"
            skipped.append({"path": source.path, "reason": reason})
            continue
        if errors:
            record["failed_tiles"] = len(errors)
            record["first_error"] = errors[0]
        used.append(record)
    return used, skipped
