"""The one output policy: atomic writes, and nothing a user made is lost or overwritten by mistake.

- A file is written beside its place and renamed when complete (:func:`atomic_path`); a folder is
  built beside its place and renamed when complete (:func:`atomic_dir`). A failed or killed run
  leaves the previous output as it was.
- An output that exists is refused unless ``--overwrite``, folders and files (PNG, CSV, JSON) alike,
  before any work starts (:func:`check_out_file`, :func:`check_out_dir`).
- An output may never equal, contain or lie inside what the stage reads (its inputs, a run
  directory, a checkpoint): :func:`refuse_out_over_inputs`.
- A full disk (or quota, or file-size limit) while writing is one :class:`DiskFullError` naming the
  file, raised by :func:`atomic_path` and :func:`atomic_dir` whatever did the writing (a tar
  writer, ``json``, PIL, ``torch.save``); the partial file is removed as for any other failure.
- A place the system refuses (a read-only or foreign folder, a file where a folder is needed) is one
  :class:`UserError` naming the output, not the temporary beside it (:func:`~ssl_path.core.errors.path_refused`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ssl_path.core.errors import PATH_REFUSED, UserError, path_refused

# Errors that mean "no room for this file": free space, quota, or RLIMIT_FSIZE / a file system's size cap.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(UserError, OSError):
    """Writing ``path`` failed for lack of room: a full disk, an exhausted quota or a file-size limit.

    Still the OSError it was (``errno``, ``filename``): code that makes a write optional by catching
    OSError (a cache) keeps doing so.
    """

    def __init__(self, path: str | os.PathLike, errno_: int) -> None:
        super().__init__(errno_, os.strerror(errno_), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror}; free some space or choose another output"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.errno)


def _no_room(err: BaseException) -> int | None:
    """The errno of a lack-of-room OSError that caused ``err``, if one did.

    Writers wrap it: torch.save raises a RuntimeError whose context is the OSError of the write; a
    writer in Rust (safetensors) raises its own error, whose message ends in Rust's "(os error 28)".
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in NO_ROOM:
            return cause.errno
        rust = re.search(r"\(os error (\d+)\)", str(cause))
        if rust and int(rust.group(1)) in NO_ROOM:
            return int(rust.group(1))
        cause = cause.__cause__ or cause.__context__
    return None


def make_public(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions a plain ``open()`` or ``mkdir()`` would: mkstemp, mkdtemp and
    safetensors make private ones, which others sharing a run or an export could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


@contextmanager
def _refused_as(target: Path) -> Iterator[None]:
    """Making or renaming into ``target``'s place: a place the system refuses is the user's one line,
    naming ``target`` (not the temporary file beside it)."""
    try:
        yield
    except OSError as err:
        if err.errno in PATH_REFUSED:
            raise UserError(path_refused(err, target)) from None
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A lack of room anywhere, in the block or in making the temporary file, is a :class:`DiskFullError`
    naming ``path``.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        with _refused_as(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        make_public(tmp_path)
        yield tmp_path
        with _refused_as(path):
            os.replace(tmp_path, path)
    except Exception as err:
        code = _no_room(err)
        if code is None or isinstance(err, DiskFullError):
            raise
        raise DiskFullError(path, code) from err
    finally:
        if tmp_path is not None and tmp_path.exists():
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
    killed run leaves it as it was. A lack of room is a :class:`DiskFullError` naming the file, as it
    will be called in ``out``, or ``out`` where the file is not known.
    """
    out = check_out_dir(out, overwrite, inputs)
    try:
        with _refused_as(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        code = _no_room(err)
        if code is None:
            raise
        raise DiskFullError(out, code) from err
    make_public(tmp)
    try:
        yield tmp
        with _refused_as(out):
            if out.exists():
                # Renames only: a kill between them leaves the old folder whole beside its place.
                previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
                os.replace(out, previous / out.name)
                os.replace(tmp, out)
                shutil.rmtree(previous)
            else:
                os.replace(tmp, out)
    except Exception as err:
        if isinstance(err, DiskFullError):
            where, code = err.path, err.errno
        else:
            found = _no_room(err)
            if found is None:
                raise
            where, code = Path(getattr(err, "filename", None) or out), found
        # The temporary folder is gone once this returns: name the file by its place in ``out``.
        if where == tmp or tmp in where.parents:
            where = out / where.relative_to(tmp)
        if isinstance(err, DiskFullError) and where == err.path:
            raise
        raise DiskFullError(where, code) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
