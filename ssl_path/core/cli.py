"""The one command-line layer: a parser whose mistakes are one line and exit 2, the flags every
stage shares, and the one device resolver.

Stages build their parser with :func:`make_parser` and add the shared flags with the ``add_*``
helpers, so ``--out``, ``--overwrite``, ``--device``, ``--no-progress`` and ``--seed`` read and
behave the same everywhere. A bad flag raises :class:`~ssl_path.core.errors.UserError` (``run_cli``
prints it as one line), never argparse's usage block. Libraries never see the parsed ``Namespace``:
a stage turns it into plain values.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Callable, NoReturn

import torch

from ssl_path.core.errors import UserError

DEVICES = "auto | cpu | cuda | cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class Parser(argparse.ArgumentParser):
    """argparse, with errors raised as one-line :class:`UserError` s (sub-parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see --help)")


def make_parser(prog: str, description: str) -> Parser:
    return Parser(prog=prog, description=description)


def add_out(
    parser: argparse.ArgumentParser,
    help: str,
    required: bool = True,
    metavar: str | None = None,
    type: Callable[[str], object] = Path,
) -> None:
    """``--out``: a folder by default; ``type=out_file`` for a file."""
    parser.add_argument("--out", required=required, type=type, metavar=metavar, help=help)


def out_file(text: str) -> Path:
    """An output file as typed; a trailing separator or ``/.``, which Path drops, means a folder: refused."""
    path = Path(text)
    if text.endswith(("/", os.sep)) or os.path.basename(text) != path.name:
        raise UserError(f"--out {text} names a folder (Path would make it {path}); name the file to write in it")
    return path


def add_overwrite(
    parser: argparse.ArgumentParser, help: str = "replace existing outputs (only when the new ones are complete)"
) -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help=f"{DEVICES} (default {default})")


def add_seed(
    parser: argparse.ArgumentParser, help: str = "random seed (default %(default)s)", default: int = 0
) -> None:
    parser.add_argument("--seed", type=int, default=default, help=help)


def parse_device(name: str) -> tuple[str, int | None]:
    """The kind (auto, cpu, cuda) and index of a device name: its spelling only, so a config is
    checked where there is no GPU; whether the device exists is :func:`resolve_device`'s question."""
    match = _DEVICE.match(str(name).strip())
    if match is None:
        raise UserError(f"device {name!r} is not one of {DEVICES}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto" and index is not None:
        raise UserError(f"device {name!r} is not one of {DEVICES}")
    if kind == "cpu" and index is not None:
        raise UserError(f"device {name!r}: the CPU takes no index")
    return kind, None if index is None else int(index)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA where there is one, else CPU), ``cpu``, ``cuda`` (this process's local GPU) or ``cuda:N``."""
    kind, index = parse_device(name)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA GPU (use cpu instead)")
    device = index if index is not None else local_rank
    if device >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", device)
