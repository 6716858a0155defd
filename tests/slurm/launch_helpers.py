"""Shared by the launcher tests: the tiny run every job of them trains, and waiting for a job's results."""

from __future__ import annotations

import time
from pathlib import Path

import submitit
from pretrain_helpers import TINY

HERE = Path(__file__).resolve().parent
# 16 steps of the TINY config: long enough to be interrupted between two steps seen in metrics.jsonl.
STEPS = 16
TINY_RUN = [*TINY, "train.epochs=4"]


def pretrain_argv(tiles: Path, out: Path, *extra: str) -> list[str]:
    """``-- ssl_path.pretrain ...`` of the tiny run, as the launcher takes it."""
    stage = ["ssl_path.pretrain", "--no-progress", "--config", "dinov2_tiny_cpu", "--data", str(tiles)]
    return ["--", *stage, "--out", str(out), *TINY_RUN, *extra]


def wait_for_results(logs: Path, job_id: str, tasks: int, timeout: float = 240) -> list:
    """Each task's result, once every task has written one (a job whose launcher process has gone)."""
    deadline = time.time() + timeout
    while not all((logs / f"{job_id}_{t}_result.pkl").exists() for t in range(tasks)):
        assert time.time() < deadline, f"job {job_id} wrote no result within {timeout} s"
        time.sleep(0.2)
    return submitit.LocalJob(logs, job_id, tasks=list(range(tasks))).results()
