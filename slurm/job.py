"""What every task of a job runs: one stage, ``python -m MODULE ARGS`` as a call, requeued as the same call.

Requeueing is running the same argv again. A stage that writes a long run resumes it from what it
wrote (the loop from ``RUN_DIR/checkpoints/last.pt``), so a job carries no state of its own, and a
requeued job, a job of a ``--chain`` and the same command typed again all continue alike.

Preemption and time limits follow submitit's checkpoint protocol with one change of timing.
submitit's handler of its warning signal (USR2, sent ``signal_delay_s`` before the end) calls
``checkpoint()`` and requeues at once, from inside whatever rank 0 is doing at that moment. Here the
signal only asks the loop to stop (:func:`ssl_path.core.errors.stop_on_signal`): the ranks agree on a
step, rank 0 saves it, the stage exits with ``EXIT_STOPPED``, and only then does submitit's own
handler run: :meth:`StageJob.checkpoint` gives back this same call, submitit dumps it and requeues
(``scontrol requeue``; exit code 144 under the local executor), and counts time-outs against
``max_num_timeout`` as it always does. Tasks other than rank 0 just return; the requeue restarts them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import signal
from types import ModuleType
from typing import Callable, Sequence

import submitit

from ssl_path.core.errors import EXIT_STOPPED, UserError, run_cli, stop_on_signal


class StageFailed(Exception):
    """The stage of a job exited with an error; its one line is in the task's log."""


def stage_module(name: str) -> ModuleType:
    """The module ``python -m NAME`` runs (a package's ``__main__``), refused unless it is a stage:
    a ``main(argv)`` called when the module runs as ``__main__``."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise UserError(f"no module named {name!r}")
    if spec.submodule_search_locations is not None:  # a package: python -m runs its __main__
        if importlib.util.find_spec(f"{name}.__main__") is None:
            raise UserError(f"{name} is a package without a __main__, not a stage")
        name = f"{name}.__main__"
    module = importlib.import_module(name)
    main = getattr(module, "main", None)
    if not callable(main) or 'if __name__ == "__main__":' not in inspect.getsource(module):
        raise UserError(f"{name} is not a stage (no main(argv) that python -m {name} runs)")
    return module


class StageJob(submitit.helpers.Checkpointable):
    """``python -m MODULE ARGS`` on one task of a job, with torch.distributed's environment set from submitit's."""

    def __init__(self, module: str, argv: Sequence[str]) -> None:
        self.module = module
        self.argv = list(argv)

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        # Every task sees its node's GPUs and takes LOCAL_RANK's (ssl_path.core.cli.resolve_device).
        distributed = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        _share_cpus(distributed.local_world_size)
        main: Callable = stage_module(self.module).main
        signum = signal.Signals[f"SIG{env.USR_SIG}"]
        requeue = signal.getsignal(signum)  # submitit's: checkpoint() and requeue (none in debug runs)
        with stop_on_signal(signum):
            code = run_cli(main, self.argv)
        if code == EXIT_STOPPED and callable(requeue):
            requeue(signum, None)  # rank 0 exits in here; the others return
            return code
        if code != 0 and env.cluster != "debug":  # debug runs in the launcher's process, which reports it
            raise StageFailed(f"python -m {self.module} exited with {code}; its error is in {env.paths.stderr}")
        return code

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """The same call: the stage resumes from what it saved."""
        return submitit.helpers.DelayedSubmission(StageJob(self.module, self.argv))

    def __repr__(self) -> str:
        return f"StageJob({' '.join(['python -m', self.module, *self.argv])})"


def _share_cpus(tasks_on_node: int) -> None:
    """One CPU thread pool per task, of the CPUs that task may use: several tasks on one node would
    otherwise each start a thread per core and slow each other down."""
    import torch

    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    threads = int(per_task) if per_task else len(os.sched_getaffinity(0)) // max(tasks_on_node, 1)
    torch.set_num_threads(max(threads, 1))
