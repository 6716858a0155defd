"""The one output policy: atomic writes, and nothing a user made is lost or overwritten by mistake.

- A file is written beside its place and renamed when complete (:func:`atomic_path`); a folder is
  built beside its place and renamed when complete (:func:`atomic_dir`). A failed or killed run
  leaves the previous output as it was.
- An output that exists is refused unless ``--overwrite``, folders and files (PNG, CSV, JSON) alike,
  before any work starts (:func:`check_out_file`, :func:`check_out_dir`).
- An output may never equal, contain or lie inside what the stage reads (its inputs, a run
  directory, a checkpoint): :func:`refuse_out_over_inputs`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ssl_path.core.errors import UserError


def make_public(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions a plain ``open()`` or ``mkdir()`` would: mkstemp, mkdtemp and
    safetensors make private ones, which others sharing a run or an export could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    make_public(tmp_path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def refuse_out_over_inputs(out: str | os.PathLike, inputs: Sequence[str | os.PathLike], flag: str = "--out") -> None:
    """Refuse an output that is, holds, or lies inside one of ``inputs`` (files or folders being read).

    ``inputs`` are paths: a stage passes the path a data SPEC or an encoder ref names, not the SPEC.
    ``flag`` names the output in messages ("" for a file the stage names itself).
    """
    target = Path(out).expanduser().resolve()
    for item in inputs:
        path = Path(item).expanduser().resolve()
        if path == target or target in path.parents:
            raise UserError(f"{_named(flag, out)} would replace the input {item}; choose another output")
        if path in target.parents:
            raise UserError(f"{_named(flag, out)} lies inside the input {item}; choose another output")


def _named(flag: str, path: str | os.PathLike) -> str:
    return f"{flag} {path}" if flag else str(path)


def check_out_file(
    path: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = (), flag: str = "--out"
) -> Path:
    """Check, before any work, that the output file ``path`` may be written: not over an input, and
    replacing an existing file only with ``overwrite``."""
    path = Path(path)
    refuse_out_over_inputs(path, inputs, flag)
    if path.is_dir():
        raise UserError(f"{_named(flag, path)} is a folder; name a file")
    if path.exists() and not overwrite:
        raise UserError(f"{_named(flag, path)} already exists; pass --overwrite to replace it")
    return path


def check_out_dir(
    out: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = (), flag: str = "--out"
) -> Path:
    """Check, before any work, that the output folder ``out`` may be written: not over an input, and
    replacing a non-empty folder only with ``overwrite``."""
    out = Path(out)
    refuse_out_over_inputs(out, inputs, flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{flag} {out} already exists and is not empty; pass --overwrite to replace it")
    return out


@contextmanager
def atomic_dir(
    out: str | os.PathLike, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; it becomes ``out`` only if the block succeeds.

    :func:`check_out_dir` runs first; an old ``out`` is replaced only at the end, so a failed or
    killed run leaves it as it was.
    """
    out = check_out_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    make_public(tmp)
    try:
        yield tmp
        if out.exists():
            # Renames only: a kill between them leaves the old folder whole beside its place.
            previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, previous / out.name)
            os.replace(tmp, out)
            shutil.rmtree(previous)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
