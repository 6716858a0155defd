"""The collapse monitor: its statistics, its watch, and a DINOv2 run that collapses or does not."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pretrain_helpers import TINY, make_tiles, pretrain_cli

from ssl_path.data.loader import shard_loader
from ssl_path.methods import methods
from ssl_path.pretrain import resolve_config
from ssl_path.training.collapse import MONITORED, CollapseWatch, mean_pairwise_cosine, target_entropy

# TINY without layer scale: with it every block starts as the identity and all class tokens are equal,
# which is itself the trunk's collapse at init.
HEALTHY = [
    *TINY,
    "model.kwargs={img_size: 64, depth: 2, embed_dim: 64, num_heads: 2, reg_tokens: 2, init_values: null}",
]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return make_tiles(tmp_path_factory.mktemp("tiles") / "shards")


def test_statistics_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    assert target_entropy(torch.full((5, 64), 1 / 64)).item() == pytest.approx(1.0)
    assert target_entropy(torch.eye(64)[:5]).item() == pytest.approx(0.0, abs=1e-6)
    probs = torch.softmax(torch.randn(7, 32, generator=g), dim=-1)
    explicit = -(probs * probs.log()).sum(-1).mean() / math.log(32)
    assert target_entropy(probs).item() == pytest.approx(explicit.item(), rel=1e-5)

    x = torch.randn(9, 16, generator=g)
    unit = torch.nn.functional.normalize(x, dim=-1)
    gram = unit @ unit.T
    explicit = (gram.sum() - gram.diagonal().sum()) / (9 * 8)
    assert mean_pairwise_cosine(x).item() == pytest.approx(explicit.item(), abs=1e-5)
    assert mean_pairwise_cosine(x[:1].repeat(6, 1) * torch.arange(1, 7)[:, None]).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(8)).item() == pytest.approx(0.0, abs=1e-6)


def test_watch_warns_once_per_signal_after_its_window_and_forgets_a_recovered_one() -> None:
    watch = CollapseWatch(total_steps=1000)  # a window of 50 steps
    healthy = {"dino_target_entropy": 0.7, "ibot_target_entropy": 0.6, "head_cosine": 0.4, "cls_cosine": 0.3}
    lines = []
    for step in range(10, 200, 10):
        flat = step >= 100
        lines += watch.observe({"step": step, **healthy, "dino_target_entropy": 0.99 if flat else 0.7})
    assert len(lines) == 1 and "DINO class-token term has collapsed" in lines[0] and "since step 100" in lines[0]
    # A signal that dips below its threshold starts its window again.
    watch, lines = CollapseWatch(total_steps=1000), []
    for step in range(10, 300, 10):
        lines += watch.observe({"step": step, **healthy, "head_cosine": 0.5 if step % 40 == 0 else 0.99})
    assert lines == []
    assert all(0 < s.threshold < 1 for s in MONITORED.values())


def _method_and_batch(tiles, overrides):
    cfg = resolve_config("dinov2_tiny_cpu", overrides)
    torch.manual_seed(cfg.seed)
    method = methods()["dinov2"].build(cfg.method_cfg, cfg.model, cfg.train, cfg.seed, torch.device("cpu"))
    loader = shard_loader(
        tiles, "train", 8, transform=method.data_transform(), collate_fn=method.collate_fn(), shuffle_buffer=20
    )
    return method, next(iter(loader))


def test_a_forced_collapse_is_seen_and_a_healthy_step_is_not(tiles) -> None:
    method, batch = _method_and_batch(tiles, HEALTHY)
    method.train()
    out = {k: float(v) for k, v in method(batch).items()}
    assert {k: out[k] < MONITORED[k].threshold for k in MONITORED} == dict.fromkeys(MONITORED, True), out
    watch = CollapseWatch(total_steps=40)
    assert [line for step in range(1, 40) for line in watch.observe({"step": step, **out})] == []

    head = method.teacher["dino_head"]
    with torch.no_grad():
        # One prototype repeated: every logit of a row is equal, so the targets are uniform ...
        direction = head.last_layer.parametrizations.weight.original1
        direction.copy_(direction[:1].expand_as(direction))
        # ... and one constant bottleneck output: every tile maps to one direction.
        last = head.mlp[-1]
        last.weight.zero_()
        last.bias.fill_(0.5)
        method.dino_center.center.zero_()  # the first step's centre, left from other logits
    out = {k: float(v) for k, v in method(batch).items()}
    assert out["dino_target_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert out["head_cosine"] == pytest.approx(1.0, abs=1e-4)
    watch = CollapseWatch(total_steps=40)  # a window of 10 steps
    lines = [line for step in range(1, 40) for line in watch.observe({"step": step, **out})]
    assert any("DINO class-token term has collapsed" in line for line in lines), lines
    assert any("the head has collapsed" in line for line in lines)
    assert len(lines) == len(set(lines)) <= len(MONITORED)


def test_a_run_with_uniform_targets_warns_in_one_line_and_logs_the_statistics(tiles, tmp_path) -> None:
    # A teacher as soft as the student (temperature 1 on cosine logits): uniform targets from step 1.
    flat = ["dinov2.teacher_temperature=1.0", "dinov2.warmup_teacher_temperature=1.0"]
    done = pretrain_cli(
        "--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(tmp_path / "run"), *HEALTHY, *flat
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "has collapsed" in line]
    assert len(warnings) >= 1 and sum("DINO class-token term" in line for line in warnings) == 1, done.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dino_target_entropy"] > 0.95 for r in records)
    assert all(set(MONITORED) <= set(r) for r in records)
