"""The one exception type for mistakes a user can make, and the CLI wrapper that reports it.

A user error (missing file, wrong format, bad value) is one line on stderr and exit code 2;
anything else is a bug and keeps its traceback. Ctrl-C is "interrupted" and exit code 130; a stage
that cleans up on the way out runs under :func:`terminate_as_interrupt`, so that SIGTERM (Slurm,
``kill``) unwinds the same way and exits with 143.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user caused and can fix; the message says what and where."""


class ConfigError(UserError):
    """A config value out of range, of the wrong type or not among its choices.

    Every config dataclass raises it from ``__post_init__``; :func:`ssl_path.core.config.from_dict`
    names the section (``optim: lr_scaling must be ...``).
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is so that cleanup (``finally``, context managers) runs as for Ctrl-C."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of ending the process on the spot.

    A no-op outside the main thread, where Python cannot take signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for a one-line error."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a stage's ``main``; turn a :class:`UserError` into one stderr line and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
