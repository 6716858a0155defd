"""Real jobs of ``python -m slurm.launch --cluster local``: submitit's local executor starts one process
a task, torch.distributed joins them with gloo on the CPU, and the tiny DINOv2 trains on real tiles.

Two tasks end with identical weights. A job sent submitit's preemption signal mid-run saves the step
both ranks agreed on, is requeued by submitit, resumes and ends with exactly the weights of a job
never interrupted. A checkpoint of two tasks resumed by one task continues from its step.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import submitit
import torch
from launch_helpers import HERE, STEPS, TINY_RUN, pretrain_argv, wait_for_results
from pretrain_helpers import model_state

from slurm import launch
from ssl_path.core.errors import run_cli
from ssl_path.encoder.checkpoint import checkpoint_path, kept_path

KEPT = 6  # the step whose checkpoint the uninterrupted run keeps, to be resumed at another world size


def jobs_of(argv: list[str]) -> list[submitit.Job]:
    request, dry_run = launch.parse_request(argv)
    assert not dry_run
    return launch.submit(request)


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def task_log(job: submitit.Job, task: int, suffix: str) -> str:
    return (job.paths.folder / f"{job.job_id}_{task}_log.{suffix}").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tiles, tmp_path_factory) -> Path:
    """Two tasks launched by ``slurm.launch``'s command line, never interrupted: each saves its final
    weights beside the run dir (``ranks_stage``); the run is the one an interrupted run must reach,
    and keeps its checkpoint of step KEPT."""
    root = tmp_path_factory.mktemp("uninterrupted")
    logs, run_dir = root / "logs", root / "run"
    argv = ["--cluster", "local", "--tasks-per-node", "2", "--logs", str(logs)]
    argv += ["--", "ranks_stage", "--data", str(tiles), "--out", str(run_dir), *TINY_RUN, f"train.keep_every={KEPT}"]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(printed):
        patch.setenv("PYTHONPATH", str(HERE), prepend=os.pathsep)  # where the jobs find ranks_stage
        assert run_cli(launch.main, argv) == 0
    line = json.loads(printed.getvalue())  # the one line a job
    assert line["cluster"] == "local" and line["tasks"] == 2 and line["out"] == str(run_dir)
    assert line["stdout"] == str(logs / f"{line['job_id']}_0_log.out")
    assert wait_for_results(logs, line["job_id"], tasks=2) == [0, 0]
    return run_dir


def test_two_gloo_tasks_end_with_identical_weights(uninterrupted):
    a = torch.load(uninterrupted.parent / "rank0.pt", weights_only=True)
    b = torch.load(uninterrupted.parent / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)
    assert saved["data"]["world_size"] == 2 and saved["step"] == STEPS
    # One model, but each rank its own DropPath draws since the first step, saved each for its rank
    # (a requeued rank 1 that took rank 0's generators would not reach the uninterrupted weights).
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    assert all(torch.equal(saved["model"][k], a[k]) for k in a)
    assert steps_logged(uninterrupted) == list(range(1, STEPS + 1))


def task_pid(job: submitit.Job, rank: int) -> int:
    """The process of one task: the local controller's child whose environment names that rank."""
    pid = job._process.pid
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"SUBMITIT_LOCAL_GLOBALID={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no task of rank {rank} under the controller {pid}")


def test_a_preempted_job_saves_its_step_requeues_and_reaches_the_uninterrupted_weights(uninterrupted, tiles, tmp_path):
    run_dir = tmp_path / "run"
    # No periodic checkpoint before the end: the only one to resume from is the one the signal made.
    argv = ["--cluster", "local", "--tasks-per-node", "2", "--logs", str(tmp_path / "logs")]
    (job,) = jobs_of([*argv, *pretrain_argv(tiles, run_dir, "train.checkpoint_every=1000")])
    deadline = time.time() + 240
    while len(steps_logged(run_dir)) < 2:
        assert job.state == "RUNNING" and time.time() < deadline, job.stderr()
        time.sleep(0.02)
    # submitit's own warning signal, as its local controller sends it to the tasks at a time limit
    # (LocalJob._interrupt() signals the controller itself, which has no handler for it). Rank 1 alone:
    # rank 0, which saves and requeues, learns of it only through the ranks' agreement.
    os.kill(task_pid(job, rank=1), signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"])
    job.wait()
    assert job.results() == [0, 0]

    stopped = [re.findall(r"stopped: saved step (\d+) of 16", task_log(job, t, "err")) for t in (0, 1)]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped  # once, at one step on both ranks
    assert 2 <= int(stopped[0][0]) < STEPS
    log = task_log(job, 0, "out")
    assert "this job is preempted" in log and "Requeued job" in log and log.count("Starting with") == 2

    assert steps_logged(run_dir) == list(range(1, STEPS + 1))  # each step once: none lost, none redone
    a, b = model_state(uninterrupted), model_state(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_of_two_tasks_resumed_by_one_continues_from_its_step(uninterrupted, tiles, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    # The two tasks' run as it stood after step KEPT: its checkpoint of then is the last one again.
    os.replace(kept_path(run_dir, KEPT), checkpoint_path(run_dir))
    two_tasks = (run_dir / "metrics.jsonl").read_text().splitlines()

    (job,) = jobs_of(["--cluster", "local", "--logs", str(tmp_path / "logs"), *pretrain_argv(tiles, run_dir)])
    job.wait()
    assert job.results() == [0]
    saved = torch.load(checkpoint_path(run_dir), weights_only=True)
    assert (saved["step"], saved["data"]["world_size"]) == (STEPS, 1)
    one_task = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))
    assert one_task[:KEPT] == two_tasks[:KEPT]  # steps 1-6 of the two tasks kept, not trained again
    assert one_task[KEPT:] != two_tasks[KEPT:]  # steps 7-16 trained again, by one task (half the batch)
    assert json.loads(one_task[KEPT])["time"] > json.loads(two_tasks[KEPT - 1])["time"]  # the run's clock went on
