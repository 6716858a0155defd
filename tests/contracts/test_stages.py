"""The stage contract, for every stage: each module of the project with a ``main(argv)`` that runs as
``python -m`` (found by reading the tree, so a stage added later is covered the moment it exists).

Every stage: ``--help`` works and exits 0; a bad flag is one ``error:`` line and exit 2, no usage
block, no traceback. Every stage that writes an ``--out``: a rerun with ``--overwrite`` that fails
midway (unreadable inputs) exits 2 in one line and leaves the previous output exactly as it was.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Callable

import pytest
from file_helpers import snapshot

from ssl_path.core.errors import run_cli

REPO = Path(__file__).resolve().parents[2]
STAGE_ROOTS = ("ssl_path", "probes", "finetune", "slurm")


def discover_stages() -> list[str]:
    """Module names of every ``python -m`` entry point of the project."""
    stages = []
    for root in STAGE_ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            text = path.read_text()
            if "def main(" in text and 'if __name__ == "__main__":' in text:
                parts = path.relative_to(REPO).with_suffix("").parts
                stages.append(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return stages


STAGES = discover_stages()
# Stages with sub-commands: every sub-command is a stage of its own to the contract.
SUBCOMMANDS = {"ssl_path.hub": ("export", "push")}


def stage_main(module: str) -> Callable:
    name = module + (".__main__" if (REPO / module.replace(".", "/") / "__main__.py").is_file() else "")
    return importlib.import_module(name).main


def invocations() -> list[tuple[str, tuple[str, ...]]]:
    return [(m, (sub,)) for m in STAGES for sub in SUBCOMMANDS.get(m, ("",))]


def test_the_stages_are_found():
    expected = {
        "ssl_path.shards",
        "ssl_path.pretrain",
        "ssl_path.hub",
        "ssl_path.encoder",
        "probes.knn",
        "probes.embed",
        "slurm.launch",
    }
    assert expected <= set(STAGES)
    assert not {"probes.common", "probes.features", "ssl_path.core.cli"} & set(STAGES)


@pytest.mark.parametrize("module,sub", invocations())
def test_help_works(module, sub, capsys):
    argv = [s for s in sub if s] + ["--help"]
    with pytest.raises(SystemExit) as stopped:
        stage_main(module)(argv)
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--help" in out


@pytest.mark.parametrize("module,sub", invocations())
def test_a_bad_flag_is_one_line_and_exit_2(module, sub, capsys):
    assert run_cli(stage_main(module), [s for s in sub if s] + ["--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "usage:" not in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- failing reruns


def _bad_png(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    return folder / "broken.png"


@pytest.fixture
def unreadable_set(sample_data, tmp_path) -> Path:
    """A folder-per-class set whose images look fine by name but one of each class cannot be decoded."""
    root = tmp_path / "unreadable_set"
    for label in ("atypical", "normal"):
        good = sorted((sample_data / "amibr" / "patches" / label).glob("*.png"))[:3]
        assert len(good) == 3  # the stages must fail on the broken images, not on an empty set
        (root / label).mkdir(parents=True)
        for path in good:
            shutil.copy(path, root / label / path.name)
        _bad_png(root / label)
    return root


def _tiny_probe(spec: str, tmp_path: Path) -> list[str]:
    return [
        "--ckpt",
        "timm:vit_tiny_patch16_224",
        "--input-size",
        "32",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        "--train",
        spec,
        "--test",
        spec,
    ]


# module -> (argv without --out, whether --out is a folder) for a rerun that fails after its checks.
FAILING_RERUNS: dict[str, Callable[[Path, Path, Path], tuple[list[str], bool]]] = {
    "ssl_path.shards": lambda sample, tmp, bad: (["--data", str(_bad_png(tmp / "blank")), "--no-progress"], True),
    "ssl_path.stain_preview": lambda sample, tmp, bad: (
        [
            "--data",
            str(_bad_png(tmp / "broken")),
            "--reference",
            str(sorted((sample / "amibr" / "patches" / "normal").glob("*.png"))[0]),
        ],
        False,
    ),
    "ssl_path.hub": lambda sample, tmp, bad: (
        ["export", "--ckpt", str(_bad_checkpoint(tmp))],
        True,
    ),
    "probes.knn": lambda sample, tmp, bad: (_tiny_probe(f"folder:{bad}", tmp), False),
    "probes.linear": lambda sample, tmp, bad: (_tiny_probe(f"folder:{bad}", tmp), False),
    "probes.fewshot": lambda sample, tmp, bad: (_tiny_probe(f"folder:{bad}", tmp), False),
    "probes.embed": lambda sample, tmp, bad: (
        [
            "--ckpt",
            "timm:vit_tiny_patch16_224",
            "--input-size",
            "32",
            "--cache-dir",
            str(tmp / "cache"),
            "--no-progress",
            "--data",
            f"folder:{bad}",
        ],
        True,
    ),
    "finetune.predict": lambda sample, tmp, bad: (["--run", str(_not_a_run(tmp)), "--data", str(bad)], True),
}
# Stages without an --out of their own: the run dir is their output (pretrain and the heads refuse
# any folder that is not their run, and never train over a finished one), or they write inside a run
# dir (run_log), or print (encoder), or they run another stage, whose --out it is (slurm.launch).
NO_OUT = {
    "ssl_path.pretrain",
    "ssl_path.run_log",
    "ssl_path.encoder",
    "slurm.launch",
    "finetune.segment",
    "finetune.classify",
    "finetune.detect",
}


def _not_a_run(tmp: Path) -> Path:
    (tmp / "not_a_run").mkdir(exist_ok=True)
    (tmp / "not_a_run" / "config.yaml").write_text("task: regress\n")
    return tmp / "not_a_run"


def _bad_checkpoint(tmp: Path) -> Path:
    path = tmp / "truncated.pt"
    path.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    return path


def test_every_stage_with_an_out_has_a_failing_rerun():
    assert set(STAGES) - NO_OUT <= set(FAILING_RERUNS), set(STAGES) - NO_OUT - set(FAILING_RERUNS)


@pytest.mark.parametrize("module", sorted(FAILING_RERUNS))
def test_a_failing_rerun_with_overwrite_leaves_the_previous_output(
    module, sample_data, unreadable_set, tmp_path, capsys
):
    argv, is_folder = FAILING_RERUNS[module](sample_data, tmp_path, unreadable_set)
    out = tmp_path / ("previous" if is_folder else "previous.json")
    if is_folder:
        out.mkdir()
        (out / "mine.txt").write_text("a result someone wants to keep")
        (out / "sub").mkdir()
        (out / "sub" / "more.bin").write_bytes(bytes(range(256)))
    else:
        out = out.with_suffix(".png") if module == "ssl_path.stain_preview" else out
        out.write_bytes(b"the previous result, byte for byte")
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli(stage_main(module), [*argv, "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(out) == before
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers  # no half-built output beside it either
