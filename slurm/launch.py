"""``python -m slurm.launch``: run any stage on Slurm nodes, or on this machine, through submitit.

    python -m slurm.launch [--cluster slurm|local|debug] [--nodes N] [--gpus-per-node G] [--tasks-per-node T]
        [--cpus-per-task C] [--mem-gb M] [--time [D-]HH:MM:SS] [--partition P] [--account A] [--qos Q]
        [--constraint C] [--exclude NODES] [--array-parallelism K] [--chain N] [--logs DIR] [--dry-run]
        -- MODULE ARGS... [-- MODULE ARGS...]

Each task runs ``python -m MODULE ARGS`` as a call (:class:`slurm.job.StageJob`) with
torch.distributed's environment from submitit's (``TorchDistributedEnvironment``): nccl on GPUs,
gloo on CPUs. One task per GPU (``--gpus-per-node G`` starts G a node), or ``--tasks-per-node T`` on
machines without GPUs. ``--cluster local`` runs the tasks as processes of this machine, ``debug`` in
this process; the default is Slurm where ``srun`` is found, else local. Several commands, each after
its own ``--``, go as one job array, ``--array-parallelism`` of them at a time.

Time limits and preemption: submitit sends USR2 ``--signal-delay`` seconds before the end; the loop
saves the step it is on and the job is requeued with the same argv, which resumes it, up to
``--max-timeouts`` time limits. ``--chain N`` also submits N-1 more jobs, each starting once the one
before has ended, for runs longer than what a partition's limit and requeues allow.

Everything is checked before anything is submitted: the request, that MODULE is a stage, the
stage's arguments where the stage can check them without running (``check_command(argv)``, as
``ssl_path.pretrain`` and the fine-tuning stages have; else its ``build_parser()``'s flags, as the
probes and ``ssl_path.shards`` have), and that no two jobs, nor the logs, write one place. A mistake
is one line and exit 2. ``--dry-run`` prints the sbatch script
submitit would submit and submits nothing. On submission one JSON line a job says its id, the logs
of rank 0 and the stage's ``--out``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import submitit
import torch

from slurm.job import StageJob, stage_module
from ssl_path.core.cli import Parser, make_parser
from ssl_path.core.errors import UserError, run_cli

CLUSTERS = ("slurm", "local", "debug")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)$")
# Flags only Slurm acts on; another cluster says it ignores them rather than ignoring them silently.
SLURM_ONLY = ("partition", "account", "qos", "constraint", "exclude", "cpus_per_task", "mem_gb")


@dataclass(frozen=True)
class Command:
    module: str
    argv: tuple[str, ...]

    @property
    def out(self) -> str | None:
        """The stage's ``--out`` (its run dir or result file), to say where the job writes."""
        for i, arg in enumerate(self.argv):
            if arg == "--out" and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if arg.startswith("--out="):
                return arg.split("=", 1)[1]
        return None


@dataclass(frozen=True)
class Request:
    """What to run and on what, every value checked."""

    cluster: str
    commands: tuple[Command, ...]
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    time_min: int = 24 * 60
    logs: Path = Path("slurm_logs")
    chain: int = 1
    max_timeouts: int = 3
    signal_delay_s: int = 120
    array_parallelism: int | None = None
    name: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)  # the SLURM_ONLY flags given, in submitit's names

    @property
    def job_name(self) -> str:
        if self.name:
            return self.name
        first = self.commands[0]
        out = first.out
        return first.module.rsplit(".", 1)[-1] + (f"-{Path(out).stem}" if out else "")

    def slurm_parameters(self) -> dict[str, Any]:
        """The request in the names of submitit's Slurm executor (``_make_sbatch_string``'s)."""
        params: dict[str, Any] = {
            "job_name": self.job_name,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "time": self.time_min,
            "signal_delay_s": self.signal_delay_s,
            # A task that dies ends the job's others, which would otherwise wait in a collective until it times out.
            "srun_args": ["--kill-on-bad-exit=1"],
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.array_parallelism is not None:
            params["array_parallelism"] = self.array_parallelism
        return {**params, **self.slurm}


def parse_time(text: str) -> int:
    """Minutes, rounded up, of a Slurm ``[D-]HH:MM:SS`` limit (submitit takes minutes)."""
    match = _TIME.match(text.strip())
    if match is None:
        raise UserError(f"--time {text!r} is not [D-]HH:MM:SS (e.g. 48:00:00 or 2-00:00:00)")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = days * 24 * 60 + hours * 60 + minutes + math.ceil(seconds / 60)
    if total < 1:
        raise UserError(f"--time {text!r} is less than a minute")
    return total


def split_commands(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """The launcher's own arguments, and what follows the first ``--`` (None without one)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, None
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def parse_commands(rest: list[str] | None) -> list[Command]:
    """The commands after each ``--``: a module name, then its arguments."""
    if rest is None:
        raise UserError("name the stage to run after --: python -m slurm.launch [options] -- MODULE ARGS")
    commands, current = [], []
    for arg in [*rest, "--"]:
        if arg != "--":
            current.append(arg)
            continue
        if not current or current[0].startswith("-"):
            raise UserError("each -- must be followed by a stage's module name, e.g. -- ssl_path.pretrain --config ...")
        commands.append(Command(current[0], tuple(current[1:])))
        current = []
    return commands


def check_commands(commands: Sequence[Command]) -> None:
    """Each module is a stage, and its arguments pass the stage's own ``check_command(argv)`` where it
    has one, or else its parser (``build_parser()``: flags, their types and choices) where it has that."""
    for command in commands:
        module = stage_module(command.module)
        check = getattr(module, "check_command", None)
        build_parser = getattr(module, "build_parser", None)
        try:
            if callable(check):
                check(list(command.argv))
            elif callable(build_parser):
                build_parser().parse_args(list(command.argv))
        except UserError as err:
            raise UserError(f"{command.module}: {err}") from None


def check_outputs(commands: Sequence[Command], logs: Path) -> None:
    """No two jobs write one place: the commands of an array each have their own ``--out``, and
    submitit's logs lie in none of them (a run dir that holds them is not a run dir to the stage)."""
    where = logs.expanduser().resolve()
    if where.exists() and not where.is_dir():
        raise UserError(f"--logs {logs} is a file; name a folder")
    seen: dict[Path, Command] = {}
    for command in commands:
        if command.out is None:
            continue
        out = Path(command.out).expanduser().resolve()
        for other, before in seen.items():
            if other == out or other in out.parents or out in other.parents:
                raise UserError(
                    f"--out {command.out} of {command.module} and --out {before.out} of {before.module} are one "
                    "place or one holds the other; each job of an array needs its own"
                )
        seen[out] = command
        if where == out or out in where.parents:
            raise UserError(f"--logs {logs} lies in {command.module}'s --out {command.out}; put the logs elsewhere")


def _parser() -> Parser:
    parser = make_parser("python -m slurm.launch", "Run a stage on Slurm or on this machine through submitit.")
    parser.usage = "python -m slurm.launch [options] -- MODULE ARGS... [-- MODULE ARGS...]"
    add = parser.add_argument
    add("--cluster", choices=CLUSTERS, help="default: slurm where srun is found, else local")
    add("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    add("--gpus-per-node", type=int, default=0, metavar="G", help="GPUs a node, a task each (default 0)")
    add("--tasks-per-node", type=int, default=None, metavar="T", help="tasks a node without GPUs (default 1)")
    add("--cpus-per-task", type=int, default=None, metavar="C", help="CPUs a task (data workers + 2 is a start)")
    add("--mem-gb", type=int, default=None, metavar="M", help="memory a node, GB (0: all of it)")
    add("--time", default="24:00:00", help="time limit a job, [D-]HH:MM:SS (default 24:00:00)")
    for name in ("partition", "account", "qos", "constraint"):
        add(f"--{name}", default=None, help=f"Slurm {name}")
    add("--exclude", default=None, metavar="NODES", help="Slurm nodes not to use")
    add("--array-parallelism", type=int, default=None, metavar="K", help="array tasks at a time (several --)")
    add("--chain", type=int, default=1, metavar="N", help="jobs, each starting when the last ends (default 1)")
    add("--max-timeouts", type=int, default=3, help="time limits a job is requeued after (default 3)")
    add("--signal-delay", type=int, default=120, metavar="S", help="seconds from USR2 to the end (default 120)")
    add("--logs", type=Path, default=Path("slurm_logs"), help="submitit's folder (default slurm_logs/)")
    add("--name", default=None, help="job name (default: the stage and its --out)")
    add("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    return parser


# Flags that count something, and the least each may be.
AT_LEAST = {
    "nodes": 1,
    "tasks_per_node": 1,
    "cpus_per_task": 1,
    "gpus_per_node": 0,
    "mem_gb": 0,
    "array_parallelism": 1,
    "chain": 1,
    "max_timeouts": 0,
    "signal_delay": 1,
}


def parse_request(argv: Sequence[str]) -> tuple[Request, bool]:
    """The checked request, and whether it is a dry run."""
    own, rest = split_commands(argv)
    args = _parser().parse_args(own)
    commands = parse_commands(rest)
    for flag, least in AT_LEAST.items():
        value = getattr(args, flag)
        if value is not None and value < least:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {least}, not {value}")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise UserError(
            f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: "
            "a task runs each GPU, so they must be equal"
        )
    time_min = parse_time(args.time)
    if args.signal_delay >= time_min * 60:
        raise UserError(f"--signal-delay {args.signal_delay} s leaves nothing of --time {args.time}")
    cluster = args.cluster or ("slurm" if args.dry_run else submitit.AutoExecutor.which())
    given = {name: getattr(args, name) for name in SLURM_ONLY if getattr(args, name) is not None}
    _check_cluster(cluster, args, len(commands), given)
    check_commands(commands)
    check_outputs(commands, args.logs)
    if "mem_gb" in given:  # Slurm's --mem=0 is all of a node's memory
        mem = given.pop("mem_gb")
        given["mem"] = f"{mem}GB" if mem else "0"
    request = Request(
        cluster=cluster,
        commands=tuple(commands),
        nodes=args.nodes,
        tasks_per_node=args.gpus_per_node or args.tasks_per_node or 1,
        gpus_per_node=args.gpus_per_node,
        time_min=time_min,
        logs=args.logs,
        chain=args.chain,
        max_timeouts=args.max_timeouts,
        signal_delay_s=args.signal_delay,
        array_parallelism=args.array_parallelism,
        name=args.name,
        slurm=given,
    )
    return request, args.dry_run


def _check_cluster(cluster: str, args: Any, n_commands: int, slurm_only: dict[str, Any]) -> None:
    """What the cluster cannot do: several nodes or a chain off Slurm, Slurm without srun (but a dry run)."""
    if args.dry_run and cluster != "slurm":
        raise UserError(f"--dry-run prints the sbatch script of --cluster slurm; {cluster} runs have none")
    if cluster == "slurm":
        if not args.dry_run and submitit.SlurmExecutor.affinity() < 0:
            raise UserError("--cluster slurm: no srun on this machine; run from a Slurm login node, or use --dry-run")
        return
    if args.nodes != 1:
        raise UserError(f"--cluster {cluster} runs on this machine: --nodes must be 1, not {args.nodes}")
    if args.chain != 1:
        raise UserError(f"--chain needs Slurm's job dependencies; --cluster {cluster} has none")
    if cluster == "debug" and (n_commands > 1 or (args.tasks_per_node or 1) > 1 or args.gpus_per_node > 1):
        raise UserError("--cluster debug runs one command as one task, in this process")
    if args.gpus_per_node > torch.cuda.device_count():
        raise UserError(f"--gpus-per-node {args.gpus_per_node}: this machine has {torch.cuda.device_count()}")
    if slurm_only:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in slurm_only)
        print(f"warning: {flags}: Slurm settings, which --cluster {cluster} ignores", file=sys.stderr)


class _ScriptOnly(submitit.SlurmExecutor):
    """submitit's Slurm executor where there is no ``srun``, to write its script (``--dry-run``) and never submit."""

    @classmethod
    def affinity(cls) -> int:
        return 2

    def _submit_command(self, command: str) -> Any:
        raise RuntimeError("a dry run submits nothing")


def sbatch_scripts(request: Request) -> list[str]:
    """The sbatch script of each job of the chain, as submitit would write it."""
    scripts = []
    for link in range(request.chain):
        executor = _ScriptOnly(request.logs / "%j", max_num_timeout=request.max_timeouts)
        params = request.slurm_parameters()
        if link:
            params["dependency"] = "afterany:JOB_ID_OF_THE_LAST"
        executor.update_parameters(**params)
        if len(request.commands) > 1:
            executor.parameters["map_count"] = len(request.commands)  # as submitit does for an array
        scripts.append(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))
    return scripts


def executor_for(request: Request) -> submitit.AutoExecutor:
    # A folder a job on Slurm; the local executor would also make a literal "%j" folder.
    folder = request.logs / "%j" if request.cluster == "slurm" else request.logs
    executor = submitit.AutoExecutor(
        folder,
        cluster=request.cluster,
        slurm_max_num_timeout=request.max_timeouts,
        local_max_num_timeout=request.max_timeouts,
    )
    if request.cluster == "slurm":
        executor.update_parameters(**{f"slurm_{k}": v for k, v in request.slurm_parameters().items()})
    else:
        executor.update_parameters(
            timeout_min=request.time_min,
            tasks_per_node=request.tasks_per_node,
            gpus_per_node=request.gpus_per_node,
            name=request.job_name,
        )
    return executor


def submit(request: Request) -> list[submitit.Job]:
    """Submit the request's jobs (a chain of arrays where asked); returns them, last link last."""
    jobs: list[submitit.Job] = []
    executor = executor_for(request)
    # The job must not inherit this process's Slurm job or torch.distributed environment.
    with submitit.helpers.clean_env():
        for link in range(request.chain):
            if link:
                executor.update_parameters(slurm_dependency=f"afterany:{jobs[-1].job_id.split('_')[0]}")
            calls = [StageJob(c.module, c.argv) for c in request.commands]
            if len(calls) == 1:
                jobs.append(executor.submit(calls[0]))
            else:
                with executor.batch():
                    batch = [executor.submit(call) for call in calls]
                jobs.extend(batch)
    return jobs


def describe(job: submitit.Job, request: Request, command: Command) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "cluster": request.cluster,
        "tasks": request.nodes * request.tasks_per_node,
        "stdout": str(job.paths.stdout).replace("%t", "0"),
        "stderr": str(job.paths.stderr).replace("%t", "0"),
        "out": command.out,
    }


def main(argv: Sequence[str] | None = None) -> int:
    request, dry_run = parse_request(sys.argv[1:] if argv is None else argv)
    if dry_run:
        print("\n\n".join(sbatch_scripts(request)), end="")
        return 0
    jobs = submit(request)
    for i, job in enumerate(jobs):
        print(json.dumps(describe(job, request, request.commands[i % len(request.commands)])), flush=True)
    if request.cluster == "debug":  # in this process, now
        return int(jobs[0].result())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
