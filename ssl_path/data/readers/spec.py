"""Data SPECs: ``READER:PATH[?option=value&...]`` or a bare PATH, read into a :class:`LabelledSet`.

A bare folder is read folder-per-class and a bare ``.csv`` as a CSV list. ``READER:`` counts only
when READER is registered, so paths that contain a colon still work. Options the reader does not
take but that name a record field (split, label, group, domain) filter the records, e.g.
``amibr:data/amibr_midog21?domain=hamamatsu_xr``; several values are comma-separated.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from ssl_path.core.errors import UserError
from ssl_path.data.readers._common import absolute, as_names, spec_string
from ssl_path.data.readers.amibr import read_amibr
from ssl_path.data.readers.coco import read_coco
from ssl_path.data.readers.folder import read_csv, read_folder
from ssl_path.data.readers.glas import read_glas
from ssl_path.data.readers.midog import read_midog
from ssl_path.data.readers.monuseg import read_monuseg
from ssl_path.data.readers.records import LabelledSet
from ssl_path.data.readers.voc import read_voc
from ssl_path.data.readers.wbc_seg import read_wbc_seg

Reader = Callable[..., LabelledSet]

READERS: dict[str, Reader] = {
    "folder": read_folder,
    "csv": read_csv,
    "amibr": read_amibr,
    "wbc_seg": read_wbc_seg,
    "voc": read_voc,
    "coco": read_coco,
    "midog": read_midog,
    "monuseg": read_monuseg,
    "glas": read_glas,
}
FILTERS = ("split", "label", "group", "domain")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Spec:
    """A parsed SPEC: reader name, path as written, and option values as text."""

    reader: str
    path: str
    options: dict[str, str] = field(default_factory=dict)


def register_reader(name: str, reader: Reader) -> None:
    """Make ``name:PATH`` read with ``reader(path, **options) -> LabelledSet``."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"reader name {name!r} must be an identifier")
    READERS[name] = reader


def parse_spec(spec: str) -> Spec:
    """Split a SPEC into reader, path and options without reading anything but the file system's names."""
    text = spec.strip()
    if not text:
        raise UserError("empty data SPEC; give READER:PATH or a folder or .csv file")
    prefix, colon, rest = text.partition(":")
    if colon and prefix in READERS:
        reader = prefix
    elif colon and _NAME.fullmatch(prefix) and not _exists(text):
        known = ", ".join(READERS)
        raise UserError(
            f"unknown reader {prefix!r} in data SPEC {spec!r} (readers: {known}), and no file or folder has that name"
        )
    else:
        reader, rest = "", text
    path, options = _split_options(rest, spec)
    if not path:
        raise UserError(f"data SPEC {spec!r} has no PATH")
    return Spec(reader or _infer_reader(path), path, options)


def read_spec(spec: str) -> LabelledSet:
    """Read the labelled set a SPEC names; one UserError saying what and where if it cannot."""
    parsed = parse_spec(spec)
    reader = READERS[parsed.reader]
    accepted = _accepted_options(reader)
    reader_options = {k: v for k, v in parsed.options.items() if accepted is None or k in accepted}
    filters = {k: v for k, v in parsed.options.items() if k not in reader_options and k in FILTERS}
    unknown = sorted(set(parsed.options) - set(reader_options) - set(filters))
    if unknown:
        takes = ", ".join(sorted(accepted or ())) or "none"
        raise UserError(
            f"{parsed.reader}: unknown option {unknown[0]!r} in data SPEC {spec!r} "
            f"(reader options: {takes}; filters: {', '.join(FILTERS)})"
        )
    labelled = reader(parsed.path, **reader_options)
    if not filters:
        return labelled
    wanted = {key: as_names(value) for key, value in filters.items()}
    kept = labelled.filter(
        split=wanted.get("split"), label=wanted.get("label"), group=wanted.get("group"), domain=wanted.get("domain")
    )
    query = urlencode(filters, safe=",")
    if not kept.records:
        key = next(iter(filters))
        present = ", ".join(sorted({str(getattr(r, key)) for r in labelled if getattr(r, key) is not None})) or "none"
        raise UserError(
            f"{parsed.reader}: no records left after {query} in {labelled.source} ({key} values present: {present})"
        )
    joiner = "&" if "?" in labelled.source else "?"
    return dataclasses.replace(kept, source=kept.source + joiner + query)


def with_filters(spec: str, **filters: Sequence[str]) -> str:
    """``spec`` with these filters (e.g. ``domain``) set to these names: the SPEC of that part of the set."""
    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise ValueError(f"not a filter: {unknown[0]!r} (filters: {', '.join(FILTERS)})")
    parsed = parse_spec(spec)
    return spec_string(
        parsed.reader, Path(parsed.path), **{**parsed.options, **{k: list(v) for k, v in filters.items()}}
    )


def _exists(text: str) -> bool:
    return os.path.exists(os.path.expanduser(text)) or os.path.exists(os.path.expanduser(text.partition("?")[0]))


def _split_options(rest: str, spec: str) -> tuple[str, dict[str, str]]:
    """PATH and the options after its first ``?`` (unless the whole text names an existing path)."""
    if "?" not in rest or os.path.exists(os.path.expanduser(rest)):
        return rest, {}
    path, _, query = rest.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise UserError(f"malformed options {query!r} in data SPEC {spec!r}; write ?name=value&name=value") from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise UserError(f"option {key!r} given twice in data SPEC {spec!r}; separate several values by commas")
        options[key] = value
    return path, options


def _infer_reader(path: str) -> str:
    target = absolute(path)
    if target.is_dir():
        return "folder"
    if target.is_file() and target.suffix.lower() == ".csv":
        return "csv"
    if not target.exists():
        raise UserError(f"data {path!r} does not exist ({target})")
    raise UserError(f"cannot tell how to read {target}; write READER:PATH with READER one of {', '.join(READERS)}")


def _accepted_options(reader: Reader) -> set[str] | None:
    """Keyword options a reader takes after its path; None if it takes any (``**options``)."""
    params = list(inspect.signature(reader).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {
        p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
