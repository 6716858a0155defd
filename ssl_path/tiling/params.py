"""What decides which tiles are written and how (:class:`TilingParams`, recorded in the manifest),
and the plain records that pass between the tiling stages: a source, its geometry, tiles, results.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssl_path.core.errors import ConfigError
from ssl_path.data.stain import METHODS as STAIN_METHODS
from ssl_path.tiling.slides import (
    RESOLUTION_TOLERANCE,
)
from ssl_path.tiling.tissue import SATURATION_CEILING, SATURATION_FLOOR

CHUNK = 64  # tiles per worker job: small enough to keep memory flat, large enough to amortise the IPC
MASK_CELLS_PER_TILE = 16  # tissue-mask resolution: a tile spans about this many mask cells per side
MAX_MASK_SIDE = 4096  # ... but the thumbnail behind the mask stays at most this many pixels per side
MAX_REFERENCE_SIDE = 4096


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
    shuffle_seed: int | None = 0  # the shards' global tile order; None: input order

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
            (
                self.stain_norm is not None or not self.stain_reference,
                f"--stain-reference {self.stain_reference} is used only with --stain-norm METHOD; give one",
            ),
            (0.0 <= self.stain_strength <= 1.0, f"--stain-strength must be in [0, 1], got {self.stain_strength}"),
            (
                self.shuffle_seed is None or self.shuffle_seed >= 0,
                f"--shuffle-seed must be a non-negative integer or none, got {self.shuffle_seed}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.domain_regex is not None:
            try:
                re.compile(self.domain_regex)
            except re.error as err:
                raise ConfigError(f"--domain-regex {self.domain_regex!r} is not a regular expression: {err}") from None
        if self.domain_csv is not None and not Path(self.domain_csv).is_file():
            raise ConfigError(f"--domain-csv {self.domain_csv}: no such file")
        if self.stain_norm is not None and not Path(str(self.stain_reference)).is_file():
            raise ConfigError(f"--stain-reference {self.stain_reference}: no such file")

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
