"""Tiling images and whole slides into WebDataset shards.

:func:`make_shards` (``python -m ssl_path.shards``) opens each input through :mod:`.slides`
(OpenSlide, tifffile, Pillow), brings it to a target resolution, cuts a grid of tiles, keeps those
with tissue (:mod:`.tissue`), and writes them in input order with a manifest (:mod:`.write`).
Parameters: :mod:`.params`; inputs and domain labels: :mod:`.inputs`; the per-worker reading and
the scheduler: :mod:`.plan`; the stain preview: :mod:`.preview`.
"""

from ssl_path.tiling.inputs import domain_labeler, find_inputs
from ssl_path.tiling.params import CHUNK, Geometry, Source, TilingParams
from ssl_path.tiling.plan import encode_chunk, plan_source, tile_geometry, tile_grid
from ssl_path.tiling.write import make_shards, resolution_notes

__all__ = [
    "CHUNK",
    "Geometry",
    "Source",
    "TilingParams",
    "domain_labeler",
    "encode_chunk",
    "find_inputs",
    "make_shards",
    "plan_source",
    "resolution_notes",
    "tile_geometry",
    "tile_grid",
]
