"""The pretraining-method contract, for every method in the registry: a method added later is
tested the moment it registers (with a shipped ``<name>_tiny_cpu`` config), without editing this file.

Each method, on real tiles at a tiny size: a finite step that moves the weights; a run killed with
SIGKILL and resumed reaches the weights of an uninterrupted run, with metrics.jsonl logged once
per step; two gloo DDP ranks end with identical weights; the run's encoder loads through
``ssl_path.encoder.load`` as a plain timm model that computes what the method publishes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from pretrain_helpers import TINY_STEPS, make_tiles, model_state, pretrain_cli

from ssl_path import encoder
from ssl_path.core.config import CONFIG_DIR
from ssl_path.methods import methods
from ssl_path.pretrain import resolve_config, run

REPO = Path(__file__).resolve().parents[2]
METHODS = sorted(methods())
# Size only: the method's own section comes from its shipped tiny config.
CONTRACT_SIZE = [
    "model.kwargs.depth=2",
    "model.kwargs.embed_dim=64",
    "model.kwargs.num_heads=2",
    *TINY_STEPS,
]


def tiny_config(name: str) -> str:
    config = f"{name}_tiny_cpu"
    assert (CONFIG_DIR / f"{config}.yaml").is_file(), f"method {name} ships no {config}.yaml for the contract tests"
    return config


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tiles(tmp_path_factory.mktemp("tiles") / "shards")


def _fresh_state(name: str) -> dict[str, torch.Tensor]:
    cfg = resolve_config(tiny_config(name), CONTRACT_SIZE)
    torch.manual_seed(cfg.seed)
    return methods()[name].build(cfg.method_cfg, cfg.model, cfg.train, cfg.seed, torch.device("cpu")).state_dict()


@pytest.mark.parametrize("name", METHODS)
def test_a_step_on_real_tiles_is_finite_and_moves_the_weights(name, tiles, tmp_path):
    cfg = resolve_config(tiny_config(name), CONTRACT_SIZE)
    assert cfg.method == name
    trained = run(cfg, tiles, tmp_path / "run", max_steps=2, progress=False).state_dict()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    fresh = _fresh_state(name)
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)


@pytest.mark.parametrize("name", METHODS)
def test_resume_after_sigkill_reaches_the_uninterrupted_weights(name, tiles, tmp_path):
    common = ["--config", tiny_config(name), "--data", str(tiles), *CONTRACT_SIZE]
    whole = pretrain_cli(*common, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    killed_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ssl_path.pretrain", "--no-progress", *common, "--out", str(killed_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step_at_kill = torch.load(last, weights_only=True)["step"]
    assert 0 < step_at_kill < 8

    resumed = pretrain_cli(*common, "--out", str(killed_dir))
    assert resumed.returncode == 0, resumed.stderr
    a, b = model_state(tmp_path / "whole"), model_state(killed_dir)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel())
    assert worst <= 1e-6
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # steps redone after the kill are logged once


def _ddp_worker(rank: int, world: int, port: int, config: str, tiles: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    trained = run(resolve_config(config, CONTRACT_SIZE), tiles, Path(out) / "run", max_steps=3, progress=False)
    torch.save(trained.state_dict(), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name", METHODS)
def test_two_gloo_ddp_ranks_end_with_identical_weights(name, tiles, tmp_path):
    port = 29100 + os.getpid() % 300 + METHODS.index(name)
    mp.spawn(_ddp_worker, args=(2, port, tiny_config(name), str(tiles), str(tmp_path)), nprocs=2)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["data"]["world_size"] == 2 and saved["step"] == 3
    fresh = _fresh_state(name)
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # the ranks saw different tiles, and moved alike


@pytest.mark.parametrize("name", METHODS)
def test_the_run_loads_through_the_encoder_contract(name, tiles, tmp_path):
    cfg = resolve_config(tiny_config(name), CONTRACT_SIZE)
    trained = run(cfg, tiles, tmp_path / "run", max_steps=1, progress=False)
    model, info = encoder.load(tmp_path / "run")
    published = trained.encoder_state()
    assert info.architecture == cfg.model.arch and info.embed_dim == 64 and info.num_blocks == 2
    assert tuple(info.input_size) == tuple(published["pretrained_cfg"]["input_size"])
    state = model.state_dict()
    assert state.keys() == published["state_dict"].keys()
    assert all(torch.equal(state[k], published["state_dict"][k]) for k in state)
    size = info.input_size[-1]
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, info.embed_dim) and out.isfinite().all()
    assert not any("drop" in k and "rate" in k for k in published["model_kwargs"])  # training-only kwargs dropped
