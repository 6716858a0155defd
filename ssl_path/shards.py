"""Tile images and whole slides into WebDataset shards: ``python -m ssl_path.shards``.

Each input (a file, or a folder searched recursively) is opened through :mod:`ssl_path.slides`,
brought to a target resolution (``--mpp``, from the best pyramid level at or finer than it, then
resized; or ``--downscale`` when the file has no resolution), cut into a grid of ``--tile-size``
tiles every ``--stride`` pixels, and filtered by tissue (:mod:`ssl_path.tissue`). Tiles are
written in input order to ``OUT/shard-000000.tar, ...``, each sample ``{__key__, img.jpg|img.png,
json}``, then ``OUT/manifest.json``. The output is the same whatever ``--workers``: workers read and
encode, the main process writes in a fixed order.

Files that cannot be used (unreadable, empty, no tissue) are skipped and listed in the manifest.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import re
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ssl_path.errors import UserError, run_cli
from ssl_path.io import atomic_path, prepare_out_dir, write_json
from ssl_path.slides import (
    IMAGE_SUFFIXES,
    RESOLUTION_TOLERANCE,
    Slide,
    SlideError,
    best_level,
    error_summary,
    open_slide,
    read_thumbnail,
)
from ssl_path.tissue import SATURATION_CEILING, SATURATION_FLOOR, TissueMap, tissue_mask

__all__ = [
    "FORMAT",
    "MANIFEST",
    "TilingParams",
    "Source",
    "Geometry",
    "find_inputs",
    "domain_labeler",
    "tile_geometry",
    "tile_grid",
    "plan_source",
    "encode_chunk",
    "make_shards",
    "main",
]

FORMAT = "ssl-path-shards/1"
MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
CHUNK = 64  # tiles per worker job: small enough to keep memory flat, large enough to amortise the IPC
MASK_CELLS_PER_TILE = 16  # tissue-mask resolution: a tile spans about this many mask cells per side
MAX_MASK_SIDE = 4096  # ... but the thumbnail behind the mask stays at most this many pixels per side
MAX_REFERENCE_SIDE = 4096
STAIN_METHODS = ("macenko", "reinhard")
_TAR_MTIME = 0  # fixed member times: the same tiles give byte-identical shards


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class TilingParams:
    """Everything that decides which tiles are written and how; the manifest records it."""

    tile_size: int = 256
    stride: int | None = None  # None: the tile size (no overlap); smaller overlaps tiles
    mpp: float | None = None  # target µm/px; files without a resolution use ``downscale``
    downscale: float = 1.0  # level-0 pixels per tile pixel, for files without mpp (or without --mpp)
    min_tissue: float = 0.5  # a tile is kept when at least this fraction is tissue; 0 keeps all
    format: str = "jpg"
    quality: int = 95
    samples_per_shard: int = 1000
    workers: int = 1
    domain_regex: str | None = None
    domain_csv: str | None = None
    max_tiles_per_source: int | None = None
    stain_norm: str | None = None
    stain_reference: str | None = None
    stain_strength: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.tile_size >= 8, f"--tile-size must be at least 8, got {self.tile_size}"),
            (self.stride is None or self.stride >= 1, f"--stride must be at least 1, got {self.stride}"),
            (self.mpp is None or 0 < self.mpp < math.inf, f"--mpp must be a positive number, got {self.mpp}"),
            (0 < self.downscale < math.inf, f"--downscale must be a positive number, got {self.downscale}"),
            (0.0 <= self.min_tissue <= 1.0, f"--min-tissue must be in [0, 1], got {self.min_tissue}"),
            (self.format in ("jpg", "png"), f"--format must be jpg or png, got {self.format!r}"),
            (1 <= self.quality <= 100, f"--quality must be in [1, 100], got {self.quality}"),
            (self.samples_per_shard >= 1, f"--samples-per-shard must be at least 1, got {self.samples_per_shard}"),
            (self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (
                self.max_tiles_per_source is None or self.max_tiles_per_source >= 1,
                f"--max-tiles-per-source must be at least 1, got {self.max_tiles_per_source}",
            ),
            (
                not (self.domain_regex and self.domain_csv),
                "--domain-regex and --domain-csv are alternatives; give one",
            ),
            (
                self.stain_norm is None or self.stain_norm in STAIN_METHODS,
                f"--stain-norm must be one of {', '.join(STAIN_METHODS)}, got {self.stain_norm!r}",
            ),
            (
                self.stain_norm is None or bool(self.stain_reference),
                f"--stain-norm {self.stain_norm} needs --stain-reference IMAGE",
            ),
            (0.0 <= self.stain_strength <= 1.0, f"--stain-strength must be in [0, 1], got {self.stain_strength}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.domain_regex is not None:
            try:
                re.compile(self.domain_regex)
            except re.error as err:
                raise UserError(f"--domain-regex {self.domain_regex!r} is not a regular expression: {err}") from None
        if self.domain_csv is not None and not Path(self.domain_csv).is_file():
            raise UserError(f"--domain-csv {self.domain_csv}: no such file")
        if self.stain_norm is not None and not Path(str(self.stain_reference)).is_file():
            raise UserError(f"--stain-reference {self.stain_reference}: no such file")

    @property
    def step(self) -> int:
        """Distance between tile origins, in tile pixels."""
        return self.stride or self.tile_size

    def manifest_params(self) -> dict[str, Any]:
        """Parameters as written to the manifest; ``workers`` is left out since it changes no output."""
        params = asdict(self)
        params.pop("workers")
        params["stride"] = self.step
        params["tissue"] = {"method": "otsu-hsv-saturation", "floor": SATURATION_FLOOR, "ceiling": SATURATION_CEILING}
        params["resize"] = "lanczos"
        params["resolution_tolerance"] = RESOLUTION_TOLERANCE
        return params


@dataclass(frozen=True)
class Source:
    """One input file, its position in the input order and its domain label."""

    index: int
    path: str
    domain: str | None = None


@dataclass(frozen=True)
class Geometry:
    """How a source is read: ``read_size`` level pixels per tile side, resized to the tile size."""

    level: int
    level_downsample: float
    read_size: int
    step: float  # in level pixels
    downsample: float  # level-0 pixels per tile pixel, exactly (read_size * level_downsample / tile_size)
    mpp: float | None  # µm per tile pixel

    @property
    def extent(self) -> float:
        """Tile side in level-0 pixels."""
        return self.read_size * self.level_downsample


@dataclass
class Tile:
    key: str
    image: bytes
    meta: dict[str, Any]


@dataclass
class PlanResult:
    """A planned source: its grid after the tissue filter, the first chunk of tiles, or why it was skipped."""

    source: Source
    skip_reason: str | None = None
    geometry: Geometry | None = None
    grid: int = 0  # tiles on the grid before the tissue filter
    positions: list[tuple[int, int, float]] = field(default_factory=list)  # level-0 x, y, tissue fraction
    tiles: list[Tile] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class ChunkResult:
    source: Source
    tiles: list[Tile]
    errors: list[str]
    last: bool


# ----------------------------------------------------------------------------- inputs and domains


def find_inputs(inputs: Sequence[str | Path]) -> tuple[list[str], list[dict[str, str]]]:
    """Expand files and folders (recursively, sorted) into image files, as paths joined from the inputs.

    Returns the files, first occurrence kept, and skip records for folders that hold no image.
    A path that does not exist is a :class:`UserError`.
    """
    files: list[str] = []
    skipped: list[dict[str, str]] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise UserError(f"--data {item}: no such file or folder")
        found = [str(item)] if path.is_file() else _images_under(path)
        if path.is_dir() and not found:
            skipped.append({"path": str(item), "reason": "folder holds no image files"})
        for name in found:
            resolved = Path(name).resolve()
            if resolved not in seen:
                seen.add(resolved)
                files.append(name)
    return files, skipped


def _images_under(folder: Path) -> list[str]:
    found, visited = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a symlink cycle
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(os.path.join(root, name))
    return found


def domain_labeler(params: TilingParams) -> Callable[[str], str | None]:
    """The function that labels a source path with its domain, from ``--domain-regex`` or ``--domain-csv``."""
    if params.domain_regex:
        return functools.partial(_domain_from_regex, re.compile(params.domain_regex))
    if params.domain_csv:
        return _domain_table(Path(params.domain_csv))
    return lambda path: None


def _domain_from_regex(pattern: re.Pattern[str], path: str) -> str | None:
    """Named group ``domain``, else the first group, else the whole match; None when it does not match."""
    match = pattern.search(path)
    if match is None:
        return None
    if "domain" in pattern.groupindex:
        return match.group("domain")
    return match.group(1) if pattern.groups else match.group(0)


def _domain_table(table: Path) -> Callable[[str], str | None]:
    """Read ``path,domain`` rows; match a source by its full path, else by its file name."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if not {"path", "domain"} <= set(columns):
                raise UserError(f"--domain-csv {table}: needs columns path,domain, found {','.join(columns) or 'none'}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"--domain-csv {table}: unreadable ({err})") from None

    by_path: dict[str, str | None] = {}
    by_name: dict[str, set[str | None]] = {}
    for row in rows:
        if not row.get("path"):
            continue
        domain = row.get("domain") or None
        for key in _path_keys(row["path"], table.parent):
            by_path.setdefault(key, domain)
        by_name.setdefault(Path(row["path"]).name, set()).add(domain)

    def lookup(path: str) -> str | None:
        for key in _path_keys(path, Path.cwd()):
            if key in by_path:
                return by_path[key]
        domains = by_name.get(Path(path).name)
        if not domains:
            return None
        if len(domains) > 1:
            raise UserError(
                f"--domain-csv {table}: file name {Path(path).name} has several domains "
                f"({', '.join(sorted(str(d) for d in domains))}); list full paths"
            )
        return next(iter(domains))

    return lookup


def _path_keys(path: str, base: Path) -> list[str]:
    """The spellings a path can be matched by: as written, and absolute (relative to ``base``)."""
    keys = [os.path.normpath(path)]
    absolute = Path(path) if Path(path).is_absolute() else base / path
    keys.append(str(absolute.resolve()))
    return keys


# ----------------------------------------------------------------------------- geometry


def tile_geometry(slide: Slide, params: TilingParams) -> Geometry:
    """Choose the level and read size that give tiles at ``params.mpp`` (or ``params.downscale``)."""
    use_mpp = params.mpp is not None and slide.mpp is not None
    target = params.mpp / slide.mpp if use_mpp else params.downscale  # level-0 pixels per tile pixel
    level = best_level(slide, target)
    level_ds = slide.level_downsamples[level]
    scale = target / level_ds  # level pixels per tile pixel, >= 1 unless upsampling
    if abs(scale - 1.0) <= RESOLUTION_TOLERANCE:
        scale = 1.0  # the level is the target: read tiles as they are, no resampling
    read_size = max(1, int(round(params.tile_size * scale)))
    downsample = read_size * level_ds / params.tile_size
    return Geometry(
        level=level,
        level_downsample=level_ds,
        read_size=read_size,
        step=params.step * scale,
        downsample=downsample,
        mpp=slide.mpp * downsample if slide.mpp is not None else None,
    )


def tile_grid(level_size: tuple[int, int], read_size: int, step: float) -> list[tuple[int, int]]:
    """Top-left corners (level pixels) of every whole tile of ``read_size`` on a grid of ``step``, row-major."""
    width, height = level_size

    def axis(length: int) -> list[int]:
        if length < read_size:
            return []
        count = int(math.floor((length - read_size) / step + 1e-9)) + 1
        return [int(math.floor(i * step + 0.5)) for i in range(count)]

    return [(x, y) for y in axis(height) for x in axis(width)]


def _mask_downsample(slide: Slide, geometry: Geometry) -> float:
    """Level-0 pixels per tissue-mask cell: fine enough to resolve a tile, bounded in size."""
    per_tile = geometry.extent / MASK_CELLS_PER_TILE
    bounded = max(slide.dimensions) / MAX_MASK_SIDE
    return max(1.0, per_tile, bounded)


def _spread(count: int, keep: int) -> list[int]:
    """``keep`` indices spread evenly over ``range(count)``: a deterministic subsample."""
    if keep >= count:
        return list(range(count))
    if keep == 1:
        return [count // 2]
    return [int(math.floor(i * (count - 1) / (keep - 1) + 0.5)) for i in range(keep)]


# ----------------------------------------------------------------------------- worker jobs


def plan_source(source: Source, params: TilingParams) -> PlanResult:
    """Open a source, place its tile grid, keep the tiles with tissue, and encode the first chunk.

    Never raises for a bad file: the reason lands in ``skip_reason``.
    """
    try:
        slide = _open_cached(source.path)
    except SlideError as err:
        return PlanResult(source, skip_reason=err.reason)
    try:
        geometry = tile_geometry(slide, params)
        corners = tile_grid(slide.level_dimensions[geometry.level], geometry.read_size, geometry.step)
        if not corners:
            w, h = slide.dimensions
            return PlanResult(
                source,
                skip_reason=f"image {w}x{h} px is smaller than one tile ({params.tile_size} px "
                f"at downsample {geometry.downsample:g} = {geometry.extent:.0f} level-0 px)",
            )
        thumbnail, scale = read_thumbnail(slide, _mask_downsample(slide, geometry))
        tissue = TissueMap(tissue_mask(thumbnail)[0], scale)
    except Exception as err:  # a decoder failing mid-file is a bad input, not a bug here
        return PlanResult(source, skip_reason=f"unreadable: {error_summary(err)}")

    positions = []
    for lx, ly in corners:
        x, y = int(round(lx * geometry.level_downsample)), int(round(ly * geometry.level_downsample))
        fraction = tissue.fraction(x, y, geometry.extent, geometry.extent)
        if params.min_tissue == 0 or fraction >= params.min_tissue:
            positions.append((x, y, fraction))
    if not positions:
        return PlanResult(
            source,
            skip_reason=f"no tissue: none of {len(corners)} tiles reaches --min-tissue {params.min_tissue:g}",
            geometry=geometry,
            grid=len(corners),
        )
    if params.max_tiles_per_source is not None:
        positions = [positions[i] for i in _spread(len(positions), params.max_tiles_per_source)]

    tiles, errors = _encode_tiles(slide, source, geometry, positions[:CHUNK], params)
    return PlanResult(source, None, geometry, len(corners), positions, tiles, errors)


def encode_chunk(
    source: Source, geometry: Geometry, positions: list[tuple[int, int, float]], params: TilingParams, last: bool
) -> ChunkResult:
    """Read and encode one chunk of a planned source's tiles."""
    try:
        slide = _open_cached(source.path)
    except SlideError as err:
        return ChunkResult(source, [], [err.reason], last)
    tiles, errors = _encode_tiles(slide, source, geometry, positions, params)
    return ChunkResult(source, tiles, errors, last)


def _encode_tiles(
    slide: Slide, source: Source, geometry: Geometry, positions: list[tuple[int, int, float]], params: TilingParams
) -> tuple[list[Tile], list[str]]:
    normalize = _normalizer(params.stain_norm, params.stain_reference, params.stain_strength)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source.path).stem)[:80]
    tiles, errors = [], []
    for x, y, fraction in positions:
        try:
            rgb = slide.read_region(x, y, geometry.level, (geometry.read_size, geometry.read_size))
            if geometry.read_size != params.tile_size:
                size = (params.tile_size, params.tile_size)
                rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
            if normalize is not None:
                rgb = normalize(rgb)
            image = _encode_image(rgb, params.format, params.quality)
        except Exception as err:  # one unreadable tile (a corrupt JPEG block) must not lose the slide
            errors.append(f"tile at ({x}, {y}): {error_summary(err)}")
            continue
        meta = {
            "source": source.path,
            "x": x,
            "y": y,
            "level": geometry.level,
            "mpp": round(geometry.mpp, 6) if geometry.mpp is not None else None,
            "downsample": round(geometry.downsample, 6),
            "tile_size": params.tile_size,
            "tissue_fraction": round(fraction, 4),
            "domain": source.domain,
        }
        # No dots in keys: webdataset splits a member name into key and extension at the first dot.
        tiles.append(Tile(f"{source.index:06d}_{stem}_x{x}_y{y}", image, meta))
    return tiles, errors


def _encode_image(rgb: np.ndarray, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    else:
        Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


# One open slide per process: consecutive jobs usually come from the same source, and a PNG
# decoded once serves all of its chunks.
_OPEN: dict[str, Slide] = {}


def _open_cached(path: str) -> Slide:
    if path not in _OPEN:
        _close_cached()
        _OPEN[path] = open_slide(path)
    return _OPEN[path]


def _close_cached() -> None:
    for slide in _OPEN.values():
        slide.close()
    _OPEN.clear()


@functools.lru_cache(maxsize=2)
def _normalizer(
    method: str | None, reference: str | None, strength: float
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The stain normaliser for these settings, fitted once per process; None when off."""
    if method is None:
        return None
    from ssl_path.data.stain import make_normalizer

    return make_normalizer(method, _read_reference(str(reference)), strength)


def _read_reference(path: str) -> np.ndarray:
    try:
        with open_slide(path) as slide:
            w, h = slide.dimensions
            if max(w, h) > MAX_REFERENCE_SIDE:
                raise UserError(
                    f"--stain-reference {path}: {w}x{h} px is larger than {MAX_REFERENCE_SIDE} px a side; give a tile"
                )
            return slide.read_region(0, 0, 0, (w, h))
    except SlideError as err:
        raise UserError(f"--stain-reference {err}") from None


# ----------------------------------------------------------------------------- scheduling


class _Later:
    """A job run when its result is asked for: the ``--workers 1`` stand-in for a Future."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._fn, self._args = fn, args

    def result(self) -> Any:
        return self._fn(*self._args)


class _InProcess:
    def submit(self, fn: Callable[..., Any], *args: Any) -> _Later:
        return _Later(fn, args)


def _results(executor: Any, sources: Sequence[Source], params: TilingParams, depth: int) -> Iterator[Any]:
    """Plan and encode every source on ``executor``; yield results in input order, ``depth`` jobs in flight.

    A source's plan comes first, then its chunks; plans of the next sources are started ahead so
    that workers stay busy, and a source's chunks are queued before any later plan is consumed.
    """
    upcoming = iter(sources)
    plans: deque[Any] = deque()
    chunks: deque[Any] = deque()
    backlog: deque[tuple[Any, ...]] = deque()  # chunk jobs of the current source not yet submitted
    while True:
        while len(plans) + len(chunks) < depth:
            if backlog:
                chunks.append(executor.submit(encode_chunk, *backlog.popleft()))
                continue
            source = next(upcoming, None)
            if source is None:
                break
            plans.append(executor.submit(plan_source, source, params))
        if backlog and not chunks:
            chunks.append(executor.submit(encode_chunk, *backlog.popleft()))
        if chunks:
            yield chunks.popleft().result()
        elif plans:
            plan: PlanResult = plans.popleft().result()
            rest = plan.positions[CHUNK:]
            starts = range(0, len(rest), CHUNK)
            for i, start in enumerate(starts):
                backlog.append((plan.source, plan.geometry, rest[start : start + CHUNK], params, i == len(starts) - 1))
            yield plan
        else:
            return


# ----------------------------------------------------------------------------- writing


class _ShardWriter:
    """Writes samples into ``shard-%06d.tar`` files of ``per_shard`` samples, each renamed into place when full."""

    def __init__(self, out: Path, per_shard: int) -> None:
        self.out, self.per_shard = out, per_shard
        self.shards: list[dict[str, Any]] = []
        self._stack: ExitStack | None = None
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def write(self, tile: Tile, ext: str) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        meta = json.dumps(tile.meta, sort_keys=True).encode("utf-8")
        self._tar.write({"__key__": tile.key, f"img.{ext}": tile.image, "json": meta})
        self._count += 1
        if self._count == self.per_shard:
            self._finish()

    def _open(self) -> None:
        name = SHARD_NAME.format(len(self.shards))
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.out / name))
        stream = self._stack.enter_context(open(tmp, "wb"))
        self._tar = wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME)
        self._stack.callback(self._tar.close)  # runs before the file closes and the rename
        self.shards.append({"name": name, "count": 0})

    def _finish(self) -> None:
        assert self._stack is not None
        self._stack.close()
        self.shards[-1]["count"] = self._count
        self._stack, self._tar, self._count = None, None, 0

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written: its temporary file is removed, nothing is renamed."""
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self.shards.pop()
            self._stack, self._tar, self._count = None, None, 0


# ----------------------------------------------------------------------------- the stage


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
    out = Path(out)
    _refuse_out_over_inputs(out, inputs)
    label = domain_labeler(params)
    sources = [Source(i, path, label(path)) for i, path in enumerate(files)]
    if not sources:
        raise UserError(f"--data {' '.join(map(str, inputs))}: no image files found")
    _normalizer(params.stain_norm, params.stain_reference, params.stain_strength)  # bad reference: fail now
    out = prepare_out_dir(out, overwrite)

    records: dict[int, dict[str, Any]] = {}
    writer = _ShardWriter(out, params.samples_per_shard)
    executor: Any = _InProcess()
    pool = None
    if params.workers > 1:
        pool = ProcessPoolExecutor(max_workers=params.workers)
        executor = pool
    bar = tqdm(total=len(sources), desc="tiling", unit="file", disable=not progress, dynamic_ncols=True)
    total = 0
    try:
        for result in _results(executor, sources, params, depth=2 * params.workers + 2):
            if isinstance(result, PlanResult):
                records[result.source.index] = _source_record(result)
                done = result.skip_reason is not None or len(result.positions) <= CHUNK
            else:
                records[result.source.index]["errors"].extend(result.errors)
                done = result.last
            for tile in result.tiles:
                writer.write(tile, params.format)
            records[result.source.index]["tiles"] += len(result.tiles)
            total += len(result.tiles)
            if done:
                bar.update(1)
                bar.set_postfix(tiles=total, refresh=False)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _close_cached()

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


def _refuse_out_over_inputs(out: Path, inputs: Sequence[str | Path]) -> None:
    """``--overwrite`` empties ``out``: refuse an ``out`` that is, or holds, an input."""
    target = out.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == target or target in path.parents:
            raise UserError(f"--out {out} holds input {item}; choose another output folder")


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = TilingParams()
    p = argparse.ArgumentParser(
        prog="python -m ssl_path.shards",
        description="Tile images and whole slides into WebDataset shards (OUT/shard-*.tar + manifest.json).",
    )
    p.add_argument("--data", nargs="+", action="extend", required=True, metavar="PATH",
                   help="image files or folders (searched recursively): PNG, JPEG, BMP, TIFF, SVS, NDPI, MRXS, ...")
    p.add_argument("--out", required=True, type=Path, help="output folder for the shards and manifest.json")
    p.add_argument("--tile-size", type=int, default=d.tile_size, help="tile side in pixels (default %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="tile spacing in tile pixels (default: tile size)")
    p.add_argument("--mpp", type=float, default=None, help="target resolution in µm/px for files that declare theirs")
    p.add_argument("--downscale", type=float, default=d.downscale,
                   help="level-0 pixels per tile pixel for files without a resolution, or without --mpp (default 1)")
    p.add_argument("--min-tissue", type=float, default=d.min_tissue,
                   help="minimum tissue fraction of a tile; 0 keeps every tile (default %(default)s)")
    p.add_argument("--format", choices=("jpg", "png"), default=d.format, help="tile encoding (default %(default)s)")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality (default %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard, help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="reader/encoder processes (default %(default)s)")
    domain = p.add_mutually_exclusive_group()
    domain.add_argument("--domain-regex", help="regex on the source path; group 'domain', else group 1, is the label")
    domain.add_argument("--domain-csv", help="CSV with columns path,domain; matched by full path, else file name")
    p.add_argument("--max-tiles-per-source", type=int, default=None,
                   help="keep at most this many tiles per file, evenly spread")
    p.add_argument("--stain-norm", choices=STAIN_METHODS, default=None, help="stain-normalise every tile")
    p.add_argument("--stain-reference", default=None, metavar="IMAGE", help="reference tile for --stain-norm")
    p.add_argument("--stain-strength", type=float, default=d.stain_strength,
                   help="0 keeps the tile, 1 normalises fully (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = TilingParams(
        tile_size=args.tile_size,
        stride=args.stride,
        mpp=args.mpp,
        downscale=args.downscale,
        min_tissue=args.min_tissue,
        format=args.format,
        quality=args.quality,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        domain_regex=args.domain_regex,
        domain_csv=args.domain_csv,
        max_tiles_per_source=args.max_tiles_per_source,
        stain_norm=args.stain_norm,
        stain_reference=args.stain_reference,
        stain_strength=args.stain_strength,
    )
    manifest = make_shards(args.data, args.out, params, overwrite=args.overwrite, progress=not args.no_progress)
    print(
        f"wrote {manifest['total']} tiles from {len(manifest['sources'])} files into "
        f"{len(manifest['shards'])} shards in {args.out} ({len(manifest['skipped'])} skipped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
