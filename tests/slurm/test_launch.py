"""``python -m slurm.launch`` before anything runs: a mistake in the request, the module or the stage's
own arguments is one line and exit 2 with nothing submitted or written; ``--dry-run`` prints the
sbatch script submitit would submit for a 4-node x 8-GPU ViT-L run; the plain sbatch template is
valid bash whose torchrun line torchrun and ``ssl_path.pretrain`` both accept."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from launch_helpers import pretrain_argv
from torch.distributed.run import get_args_parser

from slurm import launch
from ssl_path import pretrain
from ssl_path.core.errors import run_cli

REPO = Path(__file__).resolve().parents[2]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


BAD_REQUESTS = {
    "zero nodes": (["--nodes", "0"], "--nodes"),
    "malformed time": (["--time", "36h"], "--time"),
    "gpus and tasks disagree": (["--gpus-per-node", "8", "--tasks-per-node", "4"], "--tasks-per-node"),
    "local on two nodes": (["--cluster", "local", "--nodes", "2"], "--nodes"),
    "a chain without slurm": (["--cluster", "local", "--chain", "3"], "--chain"),
    "a dry run of a local job": (["--cluster", "local", "--dry-run"], "--dry-run"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_bad_request_fails_before_submission(case, tiles, tmp_path, capsys):
    flags, named = BAD_REQUESTS[case]
    argv = ["--logs", str(tmp_path / "logs"), *flags, *pretrain_argv(tiles, tmp_path / "run")]
    assert run_cli(launch.main, argv) == 2
    assert named in one_line_error(capsys)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "run").exists()


BAD_COMMANDS = {
    "no command": [],
    "no module after --": ["--", "--config", "dinov2_tiny_cpu"],
    "a missing module": ["--", "ssl_path.no_such_stage", "--out", "x"],
    "a module that is not a stage": ["--", "ssl_path.core.cli"],
    "a package that is not a stage": ["--", "ssl_path.training"],
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_a_command_that_is_not_a_stage_fails_before_submission(case, tmp_path, capsys):
    argv = ["--cluster", "local", "--logs", str(tmp_path / "logs"), *BAD_COMMANDS[case]]
    assert run_cli(launch.main, argv) == 2
    one_line_error(capsys)
    assert not (tmp_path / "logs").exists()


BAD_STAGE_ARGUMENTS = {
    "an unknown flag": ["--no-such-flag"],
    "a config value out of range": ["train.batch_size=0"],
    "an unknown config key": ["train.batch_sise=8"],
}


@pytest.mark.parametrize("case", sorted(BAD_STAGE_ARGUMENTS))
def test_bad_stage_arguments_fail_before_submission(case, tiles, tmp_path, capsys):
    command = pretrain_argv(tiles, tmp_path / "run", *BAD_STAGE_ARGUMENTS[case])
    assert run_cli(launch.main, ["--cluster", "local", "--logs", str(tmp_path / "logs"), *command]) == 2
    assert "ssl_path.pretrain" in one_line_error(capsys)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["probes.knn", "probes.linear", "ssl_path.shards"])
def test_a_stage_without_check_has_its_flags_checked_by_its_parser(stage, tmp_path, capsys):
    argv = ["--cluster", "local", "--logs", str(tmp_path / "logs"), "--", stage, "--no-such-flag"]
    assert run_cli(launch.main, argv) == 2
    assert stage in one_line_error(capsys)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("stage", ["finetune.classify", "finetune.segment", "finetune.detect"])
def test_a_fine_tuning_command_is_checked_by_its_stage_and_then_submitted(stage, tmp_path, capsys):
    command = ["--", stage, "--ckpt", "timm:vit_small_patch16_224", "--train", f"folder:{tmp_path}", "--out",
               str(tmp_path / "ft"), "train.epochs=2"]  # fmt: skip
    request = ["--dry-run", "--gpus-per-node", "1", "--logs", str(tmp_path / "logs")]
    assert run_cli(launch.main, [*request, *command]) == 0
    assert "#SBATCH --gpus-per-node=1" in sbatch_lines(capsys.readouterr().out)
    cases = [(["optim.lrr=1"], "lrr"), (["--no-such-flag"], "--no-such-flag"), (["--eval"], "--eval")]
    cases += {
        "finetune.classify": [(["--fractions", "0"], "--fractions must lie in (0, 1]"), (["--seeds", "0"], "--seeds")],
        "finetune.detect": [(["--fractions", "1.5"], "--fractions"), (["--head", "maskrcnn"], "detect.instances")],
    }.get(stage, [])  # the stage's own checks of its flags, as its main makes them
    for bad, named in cases:
        assert run_cli(launch.main, [*request, *command, *bad]) == 2
        assert stage in (err := one_line_error(capsys)) and named in err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ft").exists()


def test_jobs_that_would_write_one_place_fail_before_submission(tiles, tmp_path, capsys):
    twice = [*pretrain_argv(tiles, tmp_path / "run"), *pretrain_argv(tiles, tmp_path / "run", "seed=1")]
    assert run_cli(launch.main, ["--cluster", "local", "--logs", str(tmp_path / "logs"), *twice]) == 2
    assert f"--out {tmp_path / 'run'} of ssl_path.pretrain and --out {tmp_path / 'run'}" in one_line_error(capsys)
    nested = [*pretrain_argv(tiles, tmp_path / "run"), *pretrain_argv(tiles, tmp_path / "run" / "inner", "seed=1")]
    assert run_cli(launch.main, ["--cluster", "local", "--logs", str(tmp_path / "logs"), *nested]) == 2
    assert "one holds the other" in one_line_error(capsys)
    logs_in_run = [
        "--cluster",
        "local",
        "--logs",
        str(tmp_path / "run" / "logs"),
        *pretrain_argv(tiles, tmp_path / "run"),
    ]
    assert run_cli(launch.main, logs_in_run) == 2
    assert "lies in ssl_path.pretrain's --out" in one_line_error(capsys)
    (tmp_path / "notes.txt").write_text("mine\n")
    logs_a_file = ["--cluster", "local", "--logs", str(tmp_path / "notes.txt"), *pretrain_argv(tiles, tmp_path / "run")]
    assert run_cli(launch.main, logs_a_file) == 2
    assert "is a file" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_missing_data_and_a_foreign_run_dir_fail_before_submission(tiles, tmp_path, capsys):
    missing = pretrain_argv(tmp_path / "no_shards", tmp_path / "run")
    assert run_cli(launch.main, ["--cluster", "local", "--logs", str(tmp_path / "logs"), *missing]) == 2
    assert "no_shards" in one_line_error(capsys)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a run\n")
    foreign = pretrain_argv(tiles, mine)
    assert run_cli(launch.main, ["--cluster", "local", "--logs", str(tmp_path / "logs"), *foreign]) == 2
    assert str(mine) in one_line_error(capsys)
    assert not (tmp_path / "logs").exists() and (mine / "notes.txt").read_text() == "not a run\n"


def vitl_request(tiles: Path, tmp_path: Path, *extra: str) -> list[str]:
    """ViT-L on 4 nodes x 8 GPUs, as slurm/README.md launches it."""
    return [
        "--dry-run",
        "--nodes", "4",
        "--gpus-per-node", "8",
        "--cpus-per-task", "10",
        "--mem-gb", "480",
        "--time", "2-00:00:00",
        "--partition", "gpu",
        "--account", "pathology",
        "--qos", "high",
        "--constraint", "h100",
        "--exclude", "gpu[07-08]",
        "--logs", str(tmp_path / "logs"),
        *extra,
        "--",
        "ssl_path.pretrain", "--no-progress", "--config", "dinov2_vitl14", "--data", str(tiles),
        "--out", str(tmp_path / "vitl"),
    ]  # fmt: skip


def sbatch_lines(script: str) -> set[str]:
    return {line for line in script.splitlines() if line.startswith("#SBATCH")}


def test_a_dry_run_prints_the_sbatch_script_of_a_4_node_x_8_gpu_vitl_run(tiles, tmp_path, capsys):
    assert run_cli(launch.main, vitl_request(tiles, tmp_path)) == 0
    script = capsys.readouterr().out
    logs = tmp_path / "logs" / "%j"
    assert sbatch_lines(script) == {
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",  # one task per GPU
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=480GB",
        "#SBATCH --time=2880",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=pathology",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclude='gpu[07-08]'",
        "#SBATCH --signal=USR2@120",  # the warning the loop saves on, two minutes before the end
        "#SBATCH --job-name=pretrain-vitl",
        f"#SBATCH --output={logs}/%j_0_log.out",
        f"#SBATCH --error={logs}/%j_0_log.err",
        "#SBATCH --open-mode=append",  # a requeued job appends to the same logs
        "#SBATCH --wckey=submitit",
    }
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(f"-u -m submitit.core._submit {shlex.quote(str(logs))}"), srun
    assert " --kill-on-bad-exit=1 " in srun[0]  # a task that dies ends the others
    assert not (tmp_path / "logs").exists() and not (tmp_path / "vitl").exists()  # nothing written


def test_a_dry_run_of_a_chain_and_of_an_array(tiles, tmp_path, capsys):
    assert run_cli(launch.main, vitl_request(tiles, tmp_path, "--chain", "2")) == 0
    first, second = capsys.readouterr().out.split("#!/bin/bash")[1:]
    assert not any("--dependency" in line for line in sbatch_lines(first))
    assert "#SBATCH --dependency=afterany:JOB_ID_OF_THE_LAST" in sbatch_lines(second)

    seeds = [arg for seed in (0, 1, 2) for arg in ("--", "ssl_path.pretrain", "--config", "dinov2_tiny_cpu",
             "--data", str(tiles), "--out", str(tmp_path / f"seed{seed}"), f"seed={seed}")]  # fmt: skip
    argv = ["--dry-run", "--gpus-per-node", "1", "--array-parallelism", "2", "--logs", str(tmp_path / "logs"), *seeds]
    assert run_cli(launch.main, argv) == 0
    lines = sbatch_lines(capsys.readouterr().out)
    assert "#SBATCH --array=0-2%2" in lines and "#SBATCH --ntasks-per-node=1" in lines


def template_command(text: str) -> list[str]:
    """The template's ``srun torchrun ...`` line, continuations joined, as words."""
    joined = text.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.startswith("srun "))
    return shlex.split(line)


def test_the_plain_sbatch_template_runs_torchrun_on_a_valid_pretrain_command(tiles, tmp_path):
    template = REPO / "slurm" / "templates" / "pretrain.sbatch"
    assert subprocess.run(["bash", "-n", str(template)], capture_output=True).returncode == 0
    text = template.read_text()
    assert "#SBATCH --requeue" in text
    words = template_command(text)
    torchrun = words[words.index("torchrun") + 1 :]
    values = {"$SLURM_JOB_NUM_NODES": "4", "$GPUS_PER_NODE": "8", "$MASTER_ADDR:$MASTER_PORT": "node1:29500"}
    values.update({"$SLURM_JOB_ID": "1234", "$CONFIG": "dinov2_tiny_cpu", "$SHARDS": str(tiles)})
    values["$RUN_DIR"] = str(tmp_path / "run")
    argv = [values.get(word, word) for word in torchrun if word != "$@"]
    parsed = get_args_parser().parse_args(argv)  # torchrun's own parser
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend) == ("4", "8", "c10d")
    assert parsed.module and parsed.training_script == "ssl_path.pretrain"
    pretrain.check_command(parsed.training_script_args)  # raises on a flag the stage does not take
