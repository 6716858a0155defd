"""Inputs of tiling: files and folders expanded into image files, and each file's domain label
(``--domain-regex`` on its path, or a ``--domain-csv`` table).
"""

from __future__ import annotations

import csv
import functools
import os
import re
from pathlib import Path
from typing import Callable, Sequence

from ssl_path.core.errors import UserError
from ssl_path.tiling.params import TilingParams
from ssl_path.tiling.slides import (
    IMAGE_SUFFIXES,
)


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
