"""Small helpers the readers share: path checks, CSV rows, option values, canonical SPEC strings."""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from ssl_path.core.errors import UserError
from ssl_path.data.images import TILE_SUFFIXES
from ssl_path.data.readers.records import Box


def is_image(path: Path) -> bool:
    """An image file by extension; hidden files (``.DS_Store``, ``._x.png``) are never images."""
    return path.suffix.lower() in TILE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def natural_key(text: str) -> tuple:
    """Sort key that puts ``train_2`` before ``train_10``."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text))


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and below it if ``recursive``), in natural order of their relative paths."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    images = [p for p in found if is_image(p) and not _hidden_below(p, folder)]
    return sorted(images, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def _hidden_below(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def subfolders(folder: Path) -> list[Path]:
    """Visible child folders in natural order."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name)
    )


def absolute(path: str | os.PathLike) -> Path:
    """``~`` expanded and made absolute without resolving symlinks (the user's names stay visible)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def existing_dir(path: str | os.PathLike, reader: str) -> Path:
    """``path`` as an absolute folder, or a UserError saying what is wrong with it."""
    folder = absolute(path)
    if not folder.exists():
        raise UserError(f"{reader}: {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{reader}: {folder} is not a folder")
    return folder


def existing_file(path: str | os.PathLike, reader: str) -> Path:
    """``path`` as an absolute file, or a UserError saying what is wrong with it."""
    file = absolute(path)
    if not file.exists():
        raise UserError(f"{reader}: {file} does not exist")
    if not file.is_file():
        raise UserError(f"{reader}: {file} is not a file")
    return file


def read_table(
    path: Path, reader: str, delimiters: str = ",;\t"
) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Header names (stripped, lower case) and ``(line number, row)`` pairs with stripped values.

    Handles a UTF-8 BOM, CRLF line ends and the delimiter (sniffed among ``delimiters``);
    blank lines are skipped. Line numbers count the header as line 1, as an editor shows them.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{reader}: {path} is not UTF-8 text ({err.reason})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise UserError(f"{reader}: {path} is empty or has no header line")
    try:
        dialect = csv.Sniffer().sniff(lines[0], delimiters=delimiters)
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = ","
    rows = csv.reader(lines, delimiter=delimiter)
    header = [name.strip().lower() for name in next(rows)]

    def numbered() -> Iterator[tuple[int, dict[str, str]]]:
        for line, values in enumerate(rows, start=2):
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise UserError(
                    f"{reader}: line {line} of {path} has {len(values)} fields, the header has {len(header)}"
                )
            yield line, {name: value.strip() for name, value in zip(header, values, strict=False)}

    return header, numbered()


def require_columns(header: Sequence[str], required: Iterable[str], path: Path, reader: str) -> None:
    """A UserError naming every required column that the header lacks."""
    missing = [name for name in required if name not in header]
    if missing:
        raise UserError(f"{reader}: {path} lacks column(s) {', '.join(missing)} (found: {', '.join(header) or 'none'})")


def choice(value: str, allowed: Sequence[str], option: str, reader: str) -> str:
    """``value`` if it is one of ``allowed``, else a UserError listing them."""
    if value not in allowed:
        raise UserError(f"{reader}: option {option} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def as_bool(value: bool | str, option: str, reader: str) -> bool:
    """A flag given as a bool (Python) or as text (SPEC query: 1/0, true/false, yes/no)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{reader}: option {option} must be true or false; got {value!r}")


def as_names(value: str | Iterable[str] | int | None) -> list[str] | None:
    """Comma-separated text or a collection as a list of names; None stays None."""
    if value is None:
        return None
    if isinstance(value, (str, int)):
        return [part.strip() for part in str(value).split(",") if part.strip()]
    return [str(v) for v in value]


def spec_string(reader: str, path: Path, **options: object) -> str:
    """The canonical SPEC ``reader:path?options`` that reads a set again (options left at None are omitted)."""
    given = {
        key: value if isinstance(value, str) else _option_text(value)
        for key, value in options.items()
        if value is not None
    }
    query = urlencode(given, safe="/,:")
    return f"{reader}:{path}" + (f"?{query}" if query else "")


def _option_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(str(v) for v in value)
    return str(value)


def fit_in_image(box: Box, width: float, height: float, fits: Counter[str]) -> Box | None:
    """``box`` clipped to a ``width`` x ``height`` image (counted in ``fits["clipped"]``), or None where
    none of it lies inside (counted in ``fits["outside"]``). A box without area is the caller's to drop."""
    inside = box.clipped(width, height)
    if inside.is_degenerate:
        fits["outside"] += 1
        return None
    fits["clipped"] += inside != box
    return inside


def box_info(degenerate: Mapping[str, int], fits: Mapping[str, int]) -> dict[str, Any]:
    """What a box reader tells in ``LabelledSet.info``: the boxes it dropped or clipped, and why."""
    return {
        "degenerate_boxes_dropped": sum(degenerate.values()),
        "degenerate_by_class": dict(degenerate),
        "boxes_clipped": fits.get("clipped", 0),
        "boxes_outside_image": fits.get("outside", 0),
    }
