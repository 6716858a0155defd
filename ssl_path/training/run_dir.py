"""A run directory, the one layout every training stage writes: whether ``--out`` starts a run,
resumes one, or is refused.

A run dir holds ``config.yaml`` (the resolved config, written once the task is built),
``checkpoints/last.pt`` and the stage's own named entries. Rerunning the same command on it resumes
it; a different config is refused, except the settings that do not change what is computed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

from ssl_path.core.config import first_difference, lookup, read_yaml
from ssl_path.core.errors import UserError
from ssl_path.encoder.checkpoint import CHECKPOINT_DIR, checkpoint_path

CONFIG_FILE = "config.yaml"
# Settings that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = (
    "train.num_workers",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_every",
    "train.compile",
    "train.max_skipped_fraction",  # when a run stops for skips, not what it computes until then
)


def check_run_dir(out: Path, config: dict[str, Any], entries: Sequence[str], kind: str = "pretraining") -> bool:
    """True where ``out`` starts a fresh run, False where it resumes one; any other folder is refused.

    Fresh: ``out`` is new or empty, or a run dir that holds no checkpoint yet (a run that failed or
    was killed before its first), whatever config it was started with. Resumed: ``out`` holds a
    checkpoint and the config the run was started with, up to :data:`RESUMABLE_CHANGES`. ``entries``: what the stage writes into a run dir; a folder holding anything else
    is not one. Only reads, so that every rank checks (and fails alike) before any of them writes.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run directory")
    saved = out / CONFIG_FILE
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and not saved.is_file():
        raise UserError(f"--out {out} exists and is not a {kind} run directory (no {CONFIG_FILE})")
    if not checkpoint_path(out).exists():
        # Hidden files are temporaries of a write that was killed; any other file in checkpoints/ is one.
        kept = sorted(str(p.relative_to(out)) for p in out.glob(f"{CHECKPOINT_DIR}/[!.]*"))
        foreign = [n for n in names if n not in (CONFIG_FILE, *entries) and not n.startswith(".")] + kept
        if foreign:
            raise UserError(f"--out {out} holds {foreign[0]} but no {checkpoint_path(out)}; use another --out")
        return True
    previous = read_yaml(saved)
    # A resumable change must not hide a change after it: compare without them.
    difference = first_difference(_without(previous, RESUMABLE_CHANGES), _without(config, RESUMABLE_CHANGES))
    if difference is not None:
        raise UserError(
            f"--out {out} is a run with a different config ({difference}: "
            f"{lookup(previous, difference)!r} there, {lookup(config, difference)!r} now); use another --out"
        )
    return False


def _without(tree: dict[str, Any], dotted: Sequence[str]) -> dict[str, Any]:
    """A copy of ``tree`` without the entries at the ``dotted`` keys."""
    pruned = copy.deepcopy(tree)
    for key in dotted:
        *parents, last = key.split(".")
        node: Any = pruned
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return pruned
