"""The one exception type for mistakes a user can make, and the CLI wrapper that reports it.

A user error (missing file, wrong format, bad value) is one line on stderr and exit code 2, and so
is a path the system refuses: a read-only or foreign folder anywhere (:data:`NOT_PERMITTED`), and
also a file in the way where an output is made (:data:`PATH_REFUSED`, :mod:`ssl_path.core.io`).
Anything else is a bug and keeps its traceback. Ctrl-C is "interrupted" and exit code 130; a stage
that cleans up on the way out runs under :func:`terminate_as_interrupt`, so that SIGTERM (Slurm,
``kill``) unwinds the same way and exits with 143.

A job that may be preempted or reach its time limit runs its stage under :func:`stop_on_signal`
(``slurm/job.py``): the scheduler's warning signal then only asks the training loop to stop, which
it does at the next step that every rank agrees on, after saving it, by raising
:class:`StopRequested`; the stage exits with :data:`EXIT_STOPPED` and the same command resumes it.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

EXIT_USER_ERROR = 2
# What the system answers for a path the user may not write, anywhere a stage is: no permission, or a
# read-only file system. Where an output is made, a file in the way (ENOTDIR, EEXIST, EISDIR) is one too;
# elsewhere those are more often a bug, and keep their traceback.
NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)
PATH_REFUSED = (*NOT_PERMITTED, errno.ENOTDIR, errno.EISDIR, errno.EEXIST)
# sysexits' EX_TEMPFAIL: stopped on request with its state saved; the same command continues it.
EXIT_STOPPED = 75


class UserError(Exception):
    """An error the user caused and can fix; the message says what and where."""


class ConfigError(UserError):
    """A config value out of range, of the wrong type or not among its choices.

    Every config dataclass raises it from ``__post_init__``; :func:`ssl_path.core.config.from_dict`
    names the section (``optim: lr_scaling must be ...``).
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is so that cleanup (``finally``, context managers) runs as for Ctrl-C."""


class StopRequested(KeyboardInterrupt):
    """The loop saved the step it reached and stopped, as :func:`stop_on_signal` asked; rerunning resumes it.

    An interruption rather than an ``Exception``, so that no ``except Exception`` between the loop and
    :func:`run_cli` takes it for a failure.
    """


class _StopSignal:
    armed = False  # within stop_on_signal: the loop asks every step whether a rank was signalled
    requested = False


_STOP = _StopSignal()


@contextmanager
def stop_on_signal(signum: int) -> Iterator[None]:
    """Within the block, ``signum`` asks the training loop to save and stop at its next step instead of
    acting at once (see :func:`stop_requested`). A no-op outside the main thread, as :func:`terminate_as_interrupt`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        _STOP.requested = True  # nothing else: the signal may land inside a collective or a write

    previous = signal.signal(signum, request_stop)
    _STOP.armed, _STOP.requested = True, False
    try:
        yield
    finally:
        signal.signal(signum, previous)
        _STOP.armed = False


def stop_armed() -> bool:
    """Whether a stop can be requested at all; outside :func:`stop_on_signal` the loop never asks the ranks."""
    return _STOP.armed


def stop_requested() -> bool:
    """Whether this process was signalled to stop; the loop agrees on it with the other ranks."""
    return _STOP.requested


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


def path_refused(err: OSError, target: str | os.PathLike | None = None) -> str:
    """The one line for an OSError of :data:`PATH_REFUSED`: the path (``target``, where the error names
    a temporary file made for it), and what is wrong with it."""
    named = target or err.filename2 or err.filename or "?"  # filename2: where a rename was going
    if err.errno in (errno.EEXIST, errno.ENOTDIR) and err.filename:
        # mkdir(parents=True) names the file it found, or the path below it: name the file either way
        path = Path(err.filename)
        found = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if found is not None:
            return f"{found} is a file where a folder is needed; choose another path"
    advice = {
        errno.EACCES: "choose another path or fix its permissions",
        errno.EROFS: "choose another path",
        errno.EISDIR: "a folder is in the way; choose another path",
    }.get(err.errno or 0, "choose another path")
    return f"{named}: {err.strerror}; {advice}"


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a stage's ``main``; turn a :class:`UserError`, or a path the system does not permit, into one
    stderr line and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        if err.errno not in NOT_PERMITTED or not err.filename:
            raise
        print(f"error: {path_refused(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StopRequested as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
