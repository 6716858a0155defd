"""Planning and reading tiles, in worker processes: the level and read size for a target
resolution, the tile grid, the tissue filter, and the encoded tiles of each chunk; then the
scheduler that keeps workers busy while results come back in input order.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from ssl_path.core.errors import UserError
from ssl_path.tiling.params import (
    CHUNK,
    MASK_CELLS_PER_TILE,
    MAX_MASK_SIDE,
    MAX_REFERENCE_SIDE,
    ChunkResult,
    Geometry,
    PlanResult,
    Source,
    Tile,
    TilingParams,
)
from ssl_path.tiling.slides import (
    RESOLUTION_TOLERANCE,
    Slide,
    SlideError,
    best_level,
    error_summary,
    open_slide,
    read_thumbnail,
    reader_notes,
)
from ssl_path.tiling.tissue import TissueMap, tissue_mask


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


def plan_source(source: Source, params: TilingParams) -> PlanResult:
    """Open a source, place its tile grid, keep the tiles with tissue, and encode the first chunk.

    Never raises for a bad file: the reason lands in ``skip_reason``.
    """
    try:
        slide = _open_cached(source.path)
    except SlideError as err:
        return PlanResult(source, skip_reason=err.reason)
    with reader_notes() as notes:
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
            return PlanResult(source, skip_reason=f"unreadable: {error_summary(err, notes)}")

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
    normalize = stain_normalizer(params.stain_norm, params.stain_reference, params.stain_strength)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source.path).stem)[:80]
    tiles, errors = [], []
    for x, y, fraction in positions:
        with reader_notes() as notes:
            try:
                rgb = slide.read_region(x, y, geometry.level, (geometry.read_size, geometry.read_size))
                if geometry.read_size != params.tile_size:
                    size = (params.tile_size, params.tile_size)
                    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
                if normalize is not None:
                    rgb = normalize(rgb)
                image = _encode_image(rgb, params.format, params.quality)
            except Exception as err:  # one unreadable tile (a corrupt JPEG block) must not lose the slide
                errors.append(f"tile at ({x}, {y}): {error_summary(err, notes)}")
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
        close_cached()
        _OPEN[path] = open_slide(path)
    return _OPEN[path]


def close_cached() -> None:
    for slide in _OPEN.values():
        slide.close()
    _OPEN.clear()


@functools.lru_cache(maxsize=2)
def stain_normalizer(
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


class _Later:
    """A job run when its result is asked for: the ``--workers 1`` stand-in for a Future."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._fn, self._args = fn, args

    def result(self) -> Any:
        return self._fn(*self._args)


class InProcess:
    def submit(self, fn: Callable[..., Any], *args: Any) -> _Later:
        return _Later(fn, args)


def results_in_order(executor: Any, sources: Sequence[Source], params: TilingParams, depth: int) -> Iterator[Any]:
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
