"""benchmarks/gpu_check.py --smoke: every part of the prepared GPU check runs at tiny size on the CPU,
in real processes; a part that outruns its budget (its own plus what earlier parts left) is killed
and reported, not waited for; what is missing or too old on the machine comes from carried wheels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sample_helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_smoke_runs_every_part_and_writes_the_table(tmp_path: Path, shared_data: Path) -> None:
    data = tmp_path / "gpu_data"
    prepared = _run("--prepare", "--smoke", "--shared", str(shared_data), "--data-dir", str(data))
    assert prepared.returncode == 0, prepared.stderr
    assert len(list((data / "tiles" / "monuseg").glob("*.jpg"))) == 16
    assert "a run carries" in prepared.stdout and "warning" not in prepared.stderr  # under the 64 MiB

    out = tmp_path / "out"
    result = _run("--smoke", "--data-dir", str(data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    # The compiling parts last, where they get the time the quick ones left.
    assert list(parts) == ["device", "data", "end_to_end", "knn", "features", "steps", "mae"]
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part["status"], result.stderr[-2000:])
    spare = 0.0
    for name, part in parts.items():
        assert part["budget_s"] == pytest.approx(gpu_check.BUDGETS_S[name] + spare, abs=0.11)
        spare = part["budget_s"] - part["seconds"]

    assert report["device"]["peak_flops"] > 0 and report["device"]["shm_gib"] > 0
    # The goals' DINOv2 rows first, eager and compiled, then the supervised ones to compare with.
    steps = [(r["step"], r["mode"]) for r in parts["steps"]["rows"]]
    assert steps == [(s, m) for s in ("dinov2", "supervised") for m in ("eager", "compiled")]
    assert all(r["img_per_s"] > 0 and 0 < r["mfu"] for r in parts["steps"]["rows"])
    assert {r["mode"] for r in parts["mae"]["rows"]} == {"eager", "compiled"}
    data_rows = {r["path"].split(":")[0]: r for r in parts["data"]["rows"]}
    assert data_rows["GPU-fed"]["samples_per_s"] > 0 and data_rows["CPU path"]["samples_per_s"] > 0
    assert "lightly" in data_rows["lightly DINOTransform in workers"].get("skipped", "lightly ran")
    wait = parts["end_to_end"]["rows"][0]["data_wait_fraction"]
    assert 0.0 <= wait < 1.0
    torch_row, faiss_row = parts["knn"]["rows"]
    assert torch_row["queries_per_s"] > 0
    # An exact search twice: the same neighbours (random features have no ties).
    assert faiss_row["top_k_agreement_with_torch"] > 0.999

    table = (out / "gpu_check.md").read_text()
    assert "| steps | ok |" in table and "## goals" in table


def test_a_part_over_its_budget_plus_the_spare_is_killed_and_the_next_runs(monkeypatch, tmp_path: Path) -> None:
    marker = tmp_path / "killed_part_outlived_its_budget"

    def quick(ctx, record) -> None:
        record({"row": 1})

    def hangs(ctx, record) -> None:
        record({"row": 1})
        time.sleep(30)
        marker.touch()

    def leaves_a_worker(ctx, record) -> None:  # as a loader's persistent workers outlive their part
        record({"worker": subprocess.Popen(["sleep", "30"]).pid})

    for name, part in (("quick", quick), ("hangs", hangs), ("after", leaves_a_worker)):
        monkeypatch.setitem(gpu_check.PARTS, name, part)
    start = time.perf_counter()
    parts = gpu_check.run_parts(
        ["quick", "hangs", "after"], {"device": "cpu"}, {"quick": 2.0, "hangs": 1.0, "after": 5.0}
    )
    assert time.perf_counter() - start < 15

    assert parts["quick"]["status"] == "ok" and parts["quick"]["budget_s"] == 2.0
    # "hangs" had its own second and what "quick" left of its two; killed, with the row it had.
    hung = parts["hangs"]
    assert hung["budget_s"] == round(1.0 + 2.0 - parts["quick"]["seconds"], 1) > 1.0
    assert hung["budget_s"] <= hung["seconds"] < hung["budget_s"] + 5
    assert hung["status"] == f"skipped: over its {hung['budget_s']:g} s budget after 1 rows"
    assert hung["rows"] == [{"row": 1}]
    # Nothing is left over from a part that ran out; the next part runs on its own budget.
    after = parts["after"]
    assert (after["status"], after["budget_s"]) == ("ok", 5.0)
    # What a part started ends with it (killed; then gone, or a zombie until someone reaps it).
    stat = Path(f"/proc/{after['rows'][0]['worker']}/stat")
    deadline = time.time() + 5
    while _running(stat) and time.time() < deadline:
        time.sleep(0.05)
    assert not _running(stat)
    time.sleep(1)
    assert not marker.exists()


def _running(stat: Path) -> bool:
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_parent_asks_cuda_nothing_so_that_its_forked_parts_can_use_it(monkeypatch, tmp_path: Path) -> None:
    # On a GPU machine one torch.cuda.is_available() in the parent makes every forked part fail with
    # "Cannot re-initialize CUDA in forked subprocess" (here too it marks the children as a bad fork).
    import torch

    parent, asked = os.getpid(), []

    def device_count() -> int:
        if os.getpid() == parent:
            asked.append(True)
        return 0

    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", device_count)
    assert not torch.cuda.is_available() and asked == [True]  # the probe sees what would poison
    asked.clear()
    (tmp_path / "data" / "shards").mkdir(parents=True)
    # The GPU sizes (not --smoke), each part killed at once: what is tested is the parent's run.
    budgets = [f"--budget={name}=0.1" for name in gpu_check.BUDGETS_S]
    assert gpu_check.main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *budgets]) == 0
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(report["parts"]) == list(gpu_check.BUDGETS_S)  # each part ran in its process (and was cut short)
    assert not asked


def _build_wheel(src: Path, dist: str, version: str, out: Path) -> None:
    package = dist.replace("-", "_")
    (src / package).mkdir(parents=True)
    (src / package / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (src / "pyproject.toml").write_text(
        f'[project]\nname = "{dist}"\nversion = "{version}"\n[tool.setuptools]\npackages = ["{package}"]\n'
    )
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*cmd, "-w", str(out), str(src)], check=True, capture_output=True)


def test_only_what_is_missing_or_too_old_is_installed_from_the_carried_wheels(monkeypatch, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _build_wheel(tmp_path / "a", "gpu-check-missing", "1.0", wheels)
    _build_wheel(tmp_path / "b", "gpu-check-unwanted", "1.0", wheels)  # carried, but nothing asks for it
    monkeypatch.setattr(gpu_check, "WHEELS", {"gpu_check_missing": ["gpu-check-missing"], "timm": ["timm"]})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")

    # timm here is what pyproject.toml asks for: kept. A timm older than that would be replaced.
    assert gpu_check.requirement("timm").startswith("timm>=")
    assert not gpu_check.needs_wheel("timm")
    with monkeypatch.context() as m:
        m.setattr("importlib.metadata.version", lambda dist: "0.0.1")
        assert gpu_check.needs_wheel("timm")

    assert gpu_check.install_missing(wheels) == ["gpu_check_missing"]
    target = Path(sys.path[0])
    assert (target / "gpu_check_missing" / "__init__.py").is_file()
    assert not (target / "gpu_check_unwanted").exists() and not (target / "timm").exists()
    assert os.environ["PYTHONPATH"].startswith(str(target))  # the parts' processes see it too
    # Nothing missing any more: a second call installs nothing.
    assert gpu_check.install_missing(wheels) == []


def test_a_run_without_prepared_data_is_one_line(tmp_path: Path) -> None:
    result = _run("--smoke", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--prepare" in result.stderr
