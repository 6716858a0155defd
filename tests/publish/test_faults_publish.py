"""Faults around publishing: ``hub export`` lists what it wrote (sizes, sha256) and ``hub push``
uploads exactly that, refusing a folder that no longer matches before any request; an ``hf-hub:``
ref the Hub cannot serve fails in one line, at once, instead of half a minute of retries."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from ssl_path import encoder, hub
from ssl_path.core.errors import run_cli
from ssl_path.publish.export import FILE_LIST
from ssl_path.publish.push import cache_export

REPO = Path(__file__).resolve().parents[2]
REPO_ID = "path-lab/tiny-faults"
TOKEN = "hf_sslpathTestTokenThatMustNeverBeShown"
EXPORTED = ["README.md", "config.json", "model.safetensors"]
REFUSED_HUB = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of a small ViT checkpoint, named for ``REPO_ID``."""
    root = tmp_path_factory.mktemp("faults_publish")
    arch, kwargs = "vit_tiny_patch16_224", {"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    vit = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    torch.save({"method": "dinov2", "encoder": encoder.encoder_state(vit, arch, kwargs)}, root / "ckpt.pt")
    out = root / "export"
    assert run_cli(hub.main, ["export", "--ckpt", str(root / "ckpt.pt"), "--out", str(out), "--name", REPO_ID]) == 0
    return out


@pytest.fixture
def folder(exported: Path, tmp_path: Path) -> Path:
    """A copy of the export that a test may damage."""
    return Path(shutil.copytree(exported, tmp_path / "export"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def _run(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=240
    )


def _refused(capsys: pytest.CaptureFixture[str], folder: Path, *fragments: str) -> str:
    assert run_cli(hub.main, ["push", str(folder), "--repo", REPO_ID, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)
    return captured.err


# ----------------------------------------------------------------------------- the file list


def test_export_lists_its_files_with_sizes_and_sha256(exported: Path) -> None:
    record = json.loads((exported / FILE_LIST).read_text())
    assert [f["name"] for f in record["files"]] == EXPORTED
    for entry in record["files"]:
        data = (exported / entry["name"]).read_bytes()
        assert entry["size"] == len(data) > 0 and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in exported.iterdir()) == sorted([*EXPORTED, FILE_LIST])


def test_push_dry_run_offers_exactly_the_listed_files(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / ".ipynb_checkpoints").mkdir()  # hidden: never uploaded, so no reason to refuse
    (folder / ".ipynb_checkpoints" / "README-checkpoint.md").write_text("an editor's copy")
    assert run_cli(hub.main, ["push", str(folder), "--repo", REPO_ID, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == EXPORTED
    assert all(line.startswith("would upload") and line.endswith(f"bytes) to {REPO_ID}") for line in lines)


# ----------------------------------------------------------------------------- a folder that no longer matches


def test_push_refuses_a_stray_file(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "notes.txt").write_text("my notes, not for the Hub")
    (folder / "extra").mkdir()
    (folder / "extra" / "pytorch_model.bin").write_bytes(b"\0" * 64)
    _refused(capsys, folder, "did not write", "extra/pytorch_model.bin, notes.txt")


def test_push_refuses_a_truncated_weights_file(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    _refused(capsys, folder, str(weights), f"{size // 2} bytes, not the {size}")


def test_push_refuses_a_file_changed_in_place(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = folder / "README.md"
    text = card.read_text()
    card.write_text(text.replace("pathology", "Pathology", 1))  # same size, other bytes
    assert card.stat().st_size == len(text.encode())
    _refused(capsys, folder, str(card), "sha256")


@pytest.mark.parametrize("gone", ["config.json", FILE_LIST])
def test_push_refuses_a_folder_missing_an_exported_file_or_the_list(
    folder: Path, capsys: pytest.CaptureFixture[str], gone: str
) -> None:
    (folder / gone).unlink()
    _refused(capsys, folder, gone)


def test_push_refuses_a_damaged_file_list(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / FILE_LIST).write_text('{"files": "not a list"}')
    _refused(capsys, folder, FILE_LIST, "not an ssl-path file list")


def test_a_real_push_of_a_mismatched_folder_is_refused_before_any_request(folder: Path) -> None:
    """Token set and the Hub 'online': the refusal is the folder's, not the connection's, and shows no token."""
    (folder / "notes.txt").write_text("stray")
    done = _run("ssl_path.hub", "push", str(folder), "--repo", REPO_ID, HF_TOKEN=TOKEN, **REFUSED_HUB)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "notes.txt" in done.stderr and "push to" not in done.stderr  # never got as far as the upload
    assert TOKEN not in done.stdout + done.stderr


# ----------------------------------------------------------------------------- an unreachable hf-hub ref


def test_unreachable_hub_ref_fails_in_one_line_at_once(tmp_path: Path) -> None:
    argv = ("ssl_path.encoder", "--ckpt", "hf-hub:org/name")
    started = time.monotonic()
    offline = _run(*argv, HF_HOME=str(tmp_path / "hf"))  # the same start-up, and no request at all
    baseline = time.monotonic() - started
    assert offline.returncode == 2 and offline.stderr.count("\n") == 1, offline.stderr

    started = time.monotonic()
    done = _run(*argv, HF_HOME=str(tmp_path / "hf"), **REFUSED_HUB)
    elapsed = time.monotonic() - started
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr  # no "Retrying in 8s" lines
    assert "hf-hub:org/name" in done.stderr and "http://127.0.0.1:9 cannot be reached" in done.stderr
    assert elapsed < baseline + 5.0, (elapsed, baseline)  # huggingface_hub alone retries for ~25 s


def test_a_cached_hub_ref_still_loads_when_the_hub_is_unreachable(exported: Path, tmp_path: Path) -> None:
    cache = cache_export(exported, tmp_path / "hub", REPO_ID)
    done = _run("ssl_path.encoder", "--ckpt", f"hf-hub:{REPO_ID}", HF_HUB_CACHE=str(cache), **REFUSED_HUB)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["embed_dim"] == 32
