"""The README's first command, ``make demo``, as ``--quick``: the whole pipeline on data/sample, from
a fresh temporary directory where no ../shared can be found, every artefact written and readable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from sample_helpers import REPO

DEMO = REPO / "scripts" / "demo.py"


def test_the_readme_runs_this_command():
    readme = (REPO / "README.md").read_text()
    first = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    assert "make demo" in first.splitlines()[0]
    makefile = (REPO / "Makefile").read_text()
    assert "scripts/demo.py" in makefile and "--quick" in makefile


def test_quick_demo_runs_every_stage_on_the_sample_alone(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SSL_PATH_"))}
    env["SSL_PATH_SHARED_DATA"] = str(tmp_path / "no_shared_here")
    env["HOME"] = str(tmp_path)  # no feature cache of an earlier run

    def demo() -> subprocess.CompletedProcess:
        command = [sys.executable, str(DEMO), "--quick", "--out", str(out)]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    done = demo()
    assert done.returncode == 0, done.stderr[-3000:]
    for n, name in enumerate(("split", "tile", "pretrain", "probe", "finetune", "export"), start=1):
        assert f"== {n}/7 {name}:" in done.stdout
    assert "== 7/7 summary" in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    artefacts = {k: Path(v) for k, v in summary["artefacts"].items()}
    for name, path in artefacts.items():
        assert path.exists(), name
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            assert Image.open(path).size[0] > 100
        assert str(path) in done.stdout  # the summary names every artefact
    assert torch.load(artefacts["run"] / "checkpoints" / "last.pt", weights_only=True)["step"] == 12
    assert "timm.create_model" in (artefacts["model card"]).read_text()

    # Pretrained against random init, paired, for each probe setting; the heads scored.
    rows = summary["balanced_accuracy"]
    assert {r["probe"] for r in rows} == {"knn", "linear", "few-label"}
    for r in rows:
        assert 0 <= r["pretrained"] <= 1 and 0 <= r["random_init"] <= 1
    assert all(r["diff_ci95"][0] <= r["diff"] <= r["diff_ci95"][1] for r in rows)
    # With all labels every seed draws the whole training set: the few-label kNN is the kNN probe at
    # k=20, fitted and paired alike, on the same test redraws; its figures must be that row's.
    by_setting = {(r["probe"], r["setting"]): r for r in rows}
    few, knn = by_setting[("few-label", "fraction_1/knn")], by_setting[("knn", "k20")]
    for key in ("pretrained", "random_init", "diff"):
        assert few[key] == pytest.approx(knn[key]), key
    assert few["diff_ci95"] == pytest.approx(knn["diff_ci95"])
    assert summary["heads"][0].startswith("classification head") and summary["heads"][1].startswith("detection head")
    # timm loaded the export through hf-hub: from the local cache, and it computes the same features.
    assert summary["hub_reload"]["max_abs_diff"] < 1e-5 and summary["hub_reload"]["num_features"] == 192

    # A rerun replaces what the demo wrote, the heads' run dirs too (no command replaces a run dir).
    first = (out / "classify" / "results.json").stat().st_mtime_ns
    again = demo()
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "classify" / "results.json").stat().st_mtime_ns > first and (out / "summary.json").is_file()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--data", "folder:{tmp}/nope"], "does not exist"),
        (["--data", "voc:{sample}/bccd"], "fewer than 2 image labels"),
        (["--detect", "amibr:{sample}/amibr"], "--detect amibr:"),
        (["--slides", "{tmp}/nope.svs"], "--slides"),
    ],
)
def test_bad_inputs_are_one_line_before_any_stage(args: list[str], fragment: str, tmp_path: Path) -> None:
    args = [a.format(tmp=tmp_path, sample=REPO / "data" / "sample") for a in args]
    done = subprocess.run(
        [sys.executable, str(DEMO), "--quick", *args, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and fragment in done.stderr, done.stderr
    assert "== 2/7" not in done.stdout and not (tmp_path / "o" / "summary.json").exists()


def test_an_out_folder_the_demo_did_not_write_is_refused_and_kept(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    done = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(mine)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "did not write" in done.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
