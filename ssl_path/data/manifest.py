"""The shard manifest: ``SHARDS/manifest.json``, written by ``python -m ssl_path.shards``.

It lists the shards with their sample counts, the total, the tiling parameters and every input
skipped with its reason. The stream reads shard lists from it; the model card reads its summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Sequence

from ssl_path.core.errors import UserError

FORMAT = "ssl-path-shards/1"
MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"


def manifest_path(path: Path) -> Path | None:
    """``path`` itself if it is a manifest, a folder's manifest, or None."""
    if path.is_dir() and (path / MANIFEST).is_file():
        return path / MANIFEST
    if path.is_file() and path.name == MANIFEST:
        return path
    return None


def data_locations(data: Any) -> list[str]:
    """The shard locations of a ``--data`` value: ``::``-joined parts of a path, or of each of several;
    none of anything else (a run record's ``data`` may hold anything)."""
    if isinstance(data, (str, os.PathLike)):
        items = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (Mapping, bytes)):
        items = list(data)
    else:
        items = []
    texts = [os.fspath(item) if isinstance(item, (str, os.PathLike)) else str(item) for item in items]
    return [part for text in texts for part in text.split("::") if part]


def find_manifests(locations: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The manifest of each shard location (a folder, a manifest, or a .tar or brace pattern in a
    folder), each once, and the locations that have none."""
    found: list[Path] = []
    missing: list[str] = []
    for location in locations:
        path = Path(location.split("{")[0])  # a brace pattern or a .tar lies in its shard folder
        manifest = manifest_path(path) or manifest_path(path.parent)
        if manifest is None:
            missing.append(location)
        elif manifest.resolve() not in {m.resolve() for m in found}:
            found.append(manifest)
    return found, missing


def read_manifest(manifest: Path) -> dict[str, Any]:
    """A shard manifest as a dict; an unreadable or foreign file is a UserError naming it."""
    try:
        content = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{manifest}: unreadable shard manifest ({err})") from None
    if not isinstance(content, dict) or not {"shards", "total"} <= content.keys():
        raise UserError(f"{manifest}: not a shard manifest (needs 'shards' and 'total')")
    return content


def manifest_urls(manifest: Path) -> list[str]:
    """The shard files a manifest lists. Some may be missing (a lost file on a cluster): the stream's
    start-up check names them all and leaves them out; a manifest none of whose shards exists is refused."""
    urls = [str(manifest.parent / shard["name"]) for shard in read_manifest(manifest)["shards"]]
    if urls and not any(Path(u).is_file() for u in urls):
        raise UserError(f"{manifest}: none of the {len(urls)} shards it lists exists beside it")
    return urls
