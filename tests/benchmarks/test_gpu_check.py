"""benchmarks/gpu_check.py --smoke: every part of the prepared GPU check runs at tiny size on the CPU,
in real processes, and a part that outruns its budget is killed and reported, not waited for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sample_helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_smoke_runs_every_part_and_writes_the_table(tmp_path: Path, shared_data: Path) -> None:
    data = tmp_path / "gpu_data"
    prepared = _run("--prepare", "--smoke", "--shared", str(shared_data), "--data-dir", str(data))
    assert prepared.returncode == 0, prepared.stderr
    assert len(list((data / "tiles" / "monuseg").glob("*.jpg"))) == 16

    out = tmp_path / "out"
    result = _run("--smoke", "--data-dir", str(data), "--out", str(out), "--budget", "features=0.5")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["device", "steps", "mae", "data", "end_to_end", "knn", "features"]
    for name in ("device", "steps", "mae", "data", "end_to_end", "knn"):
        assert parts[name]["status"] == "ok", (name, parts[name]["status"], result.stderr[-2000:])
    # The features part had half a second: killed and reported as skipped, the run went on.
    assert parts["features"]["status"].startswith("skipped: over its 0.5 s budget")
    assert parts["features"]["seconds"] < 30

    assert report["device"]["peak_flops"] > 0
    steps = {(r["step"], r["mode"]) for r in parts["steps"]["rows"]}
    assert steps == {(s, m) for s in ("dinov2", "supervised") for m in ("eager", "compiled")}
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


def test_a_run_without_prepared_data_is_one_line(tmp_path: Path) -> None:
    result = _run("--smoke", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--prepare" in result.stderr
