"""Resume only what this run would have written, and never lose a run dir to a failed start.

A checkpoint of another method, architecture or tensor shape is refused before anything is loaded
or written, naming the first difference, with the run dir byte for byte as it was. A run dir that
holds no checkpoint yet (its first run failed or was killed early) starts afresh with the new config;
one that holds anything a run does not write is still refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from file_helpers import snapshot
from pretrain_helpers import TINY, make_tiles, pretrain_cli

from ssl_path.core.config import read_yaml
from ssl_path.core.errors import UserError
from ssl_path.data.manifest import MANIFEST
from ssl_path.encoder.checkpoint import checkpoint_path
from ssl_path.pretrain import check_run_dir, resolve_config, run


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tiles(tmp_path_factory.mktemp("tiles") / "shards")


@pytest.fixture(scope="module")
def runs(tiles, tmp_path_factory) -> dict[str, Path]:
    """One-step runs: the TINY config, and two others that differ in depth and in head size."""
    root = tmp_path_factory.mktemp("runs")
    variants = {"tiny": [], "deeper": ["model.kwargs.depth=4"], "wider_head": ["dinov2.n_prototypes=128"]}
    for name, extra in variants.items():
        run(resolve_config("dinov2_tiny_cpu", [*TINY, *extra]), tiles, root / name, max_steps=1, progress=False)
    return {name: root / name for name in variants}


def with_checkpoint_of(runs: dict[str, Path], other: str, out: Path) -> Path:
    """A copy of the TINY run whose last.pt comes from another run."""
    shutil.copytree(runs["tiny"], out)
    shutil.copy(checkpoint_path(runs[other]), checkpoint_path(out))
    return out


def test_a_checkpoint_of_another_architecture_is_refused_and_left_as_it_was(runs, tiles, tmp_path):
    out = with_checkpoint_of(runs, "deeper", tmp_path / "run")
    before = snapshot(out)
    result = pretrain_cli("--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(out), *TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.kwargs.depth=4" in lines[0] and "says 2" in lines[0], lines
    assert str(checkpoint_path(out)) in lines[0]
    assert snapshot(out) == before


def test_a_checkpoint_whose_tensors_differ_is_refused_naming_the_first(runs, tiles, tmp_path):
    out = with_checkpoint_of(runs, "wider_head", tmp_path / "run")  # same model section, other head
    before = snapshot(out)
    with pytest.raises(UserError) as refused:
        run(resolve_config("dinov2_tiny_cpu", TINY), tiles, out, progress=False)
    assert "dino_head" in str(refused.value) and "128" in str(refused.value)
    assert snapshot(out) == before


def test_a_checkpoint_of_another_method_is_refused(runs, tiles, tmp_path):
    out = with_checkpoint_of(runs, "tiny", tmp_path / "run")
    checkpoint = torch.load(checkpoint_path(out), map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "method": "mae"}, checkpoint_path(out))
    before = snapshot(out)
    with pytest.raises(UserError) as refused:
        run(resolve_config("dinov2_tiny_cpu", TINY), tiles, out, progress=False)
    assert "'mae'" in str(refused.value)
    assert snapshot(out) == before


def test_a_run_dir_without_a_checkpoint_starts_afresh_with_the_new_config(runs, tiles, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["tiny"], out)
    shutil.rmtree(out / "checkpoints")  # killed before its first checkpoint: config, run.json, metrics
    result = pretrain_cli(
        "--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(out), *TINY, "seed=5", "--max-steps", "1"
    )
    assert result.returncode == 0, result.stderr
    assert read_yaml(out / "config.yaml")["seed"] == 5
    assert torch.load(checkpoint_path(out), weights_only=True)["config"]["seed"] == 5


def test_a_failed_start_leaves_the_run_dir_as_it_was(tiles, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError):  # builds no model: the kwarg is not timm's
        run(resolve_config("dinov2_tiny_cpu", [*TINY, "model.kwargs.depthh=4"]), tiles, out, progress=False)
    assert not out.exists()


def test_a_folder_a_run_did_not_make_is_refused(runs, tmp_path):
    config = resolve_config("dinov2_tiny_cpu", TINY).to_dict()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError):  # no config.yaml
        check_run_dir(mine, config)
    (mine / "config.yaml").write_text((runs["tiny"] / "config.yaml").read_text())
    with pytest.raises(UserError):  # a config.yaml, no checkpoint, and a file no run writes
        check_run_dir(mine, config)
    assert (mine / "notes.txt").read_text() == "mine\n"
    assert check_run_dir(tmp_path / "new", config) is True
    assert check_run_dir(runs["tiny"], config) is False


def test_a_run_resumes_on_its_own_shards_wherever_they_lie_and_not_on_others(runs, tiles, tmp_path):
    out = Path(shutil.copytree(runs["tiny"], tmp_path / "run"))
    cfg = resolve_config("dinov2_tiny_cpu", TINY)
    moved = Path(shutil.copytree(tiles, tmp_path / "moved"))  # the same shards, elsewhere
    run(cfg, moved, out, max_steps=2, progress=False)
    assert torch.load(checkpoint_path(out), weights_only=True)["step"] == 2
    other = Path(shutil.copytree(tiles, tmp_path / "other"))
    manifest = json.loads((other / MANIFEST).read_text())
    (other / MANIFEST).write_text(json.dumps({**manifest, "total": manifest["total"] - 1}))
    before = snapshot(out)
    with pytest.raises(UserError, match=r"--data .*other: not the shards .*run started on"):
        run(cfg, other, out, max_steps=3, progress=False)
    assert snapshot(out) == before
