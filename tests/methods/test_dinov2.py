"""The DINOv2 engine end to end on real tiles: steps, resume after SIGKILL, DDP, failures, the encoder it publishes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from pretrain_helpers import TINY, make_tiles, pretrain_cli

from ssl_path import encoder, run_log
from ssl_path.core.errors import run_cli
from ssl_path.data.loader import StreamPosition, shard_loader
from ssl_path.pretrain import resolve_config, run


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tiles(tmp_path_factory.mktemp("tiles") / "shards")


def test_a_step_on_real_tiles_is_finite_and_moves_student_and_teacher(tiles, tmp_path):
    cfg = resolve_config("dinov2_tiny_cpu", [*TINY, "train.keep_every=2"])
    method = run(cfg, tiles, tmp_path / "run", max_steps=2, progress=False)
    state = method.state_dict()
    torch.manual_seed(cfg.seed)
    from ssl_path.methods import methods

    fresh = methods()["dinov2"].build(cfg.method_cfg, cfg.model, cfg.train, cfg.seed, torch.device("cpu"))
    before = fresh.state_dict()
    moved = [k for k in state if not torch.equal(state[k], before[k])]
    assert any(k.startswith("student.backbone.vit.blocks") for k in moved)
    assert any(k.startswith("teacher.backbone.vit.blocks") for k in moved)
    # the last layer is frozen for the first step (freeze_last_layer_epochs=0.25 of 4 steps) but moves at step 2
    assert any("student.dino_head.last_layer" in k for k in moved)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in (
            "loss",
            "dino",
            "ibot",
            "koleo",
            "lr",
            "wd",
            "momentum",
            "teacher_temperature",
            "img_per_s",
            "data_wait",
        ):
            assert key in r and r[key] == r[key] and abs(r[key]) < 1e6, (key, r)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "config.yaml").is_file()
    kept = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    assert torch.load(kept, weights_only=True)["step"] == 2  # the retained history
    (tmp_path / "run" / "loss.png").unlink()
    with (tmp_path / "run" / "metrics.jsonl").open("a") as log:
        log.write('[1, 2]\n{"note": "edited by hand"}\n{"step": 3, "lo')  # not steps, and a line cut by a kill
    assert run_cli(run_log.main, [str(tmp_path / "run")]) == 0  # the PNG on demand, of the steps logged
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert run_cli(run_log.main, [str(tmp_path)]) == 2


def test_encoder_load_of_a_run_returns_the_teacher_backbone(tiles, tmp_path):
    cfg = resolve_config("dinov2_tiny_cpu", TINY)
    method = run(cfg, tiles, tmp_path / "run", max_steps=2, progress=False)
    model, info = encoder.load(tmp_path / "run")
    assert (info.embed_dim, info.patch_size, info.num_blocks, info.num_prefix_tokens) == (64, 16, 2, 3)
    images = torch.randn(2, 3, 64, 64)
    teacher = method.teacher["backbone"].vit.eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_features(images), teacher.forward_features(images), atol=1e-6)
        # dynamic_img_size travels with the encoder: another input size works too
        assert model.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, 36 + 3, 64)


def test_photometric_on_the_device_trains_as_in_the_workers(tiles, tmp_path):
    """The loop moves uint8 crops and their photometric parameters (non-blocking) to the device, where
    the photometric part runs; the parameters were drawn per sample in the workers either way."""
    runs = {}
    for where in ("workers", "device"):
        cfg = resolve_config("dinov2_tiny_cpu", [*TINY, f"dinov2.photometric={where}"])
        method = run(cfg, tiles, tmp_path / where, max_steps=2, progress=False)
        assert (method.photometric is not None) == (where == "device")
        runs[where] = method.state_dict()
    key = "teacher.backbone.vit.blocks.0.attn.qkv.weight"
    assert torch.allclose(runs["workers"][key], runs["device"][key], atol=1e-5)


def test_head_lr_multiplier_scales_the_heads_alone_and_the_reference_keeps_its_groups():
    from ssl_path.methods import methods

    def groups(multiplier: float) -> list[dict]:
        cfg = resolve_config("dinov2_tiny_cpu", [*TINY, f"dinov2.head_lr_multiplier={multiplier}"])
        method = methods()["dinov2"].build(cfg.method_cfg, cfg.model, cfg.train, 0, torch.device("cpu"))
        return method.param_groups(cfg.optim)

    def lr_of(gs: list[dict]) -> dict[str, float]:
        return {name: g["lr_multiplier"] for g in gs for name in g["names"]}

    reference, slow = groups(1.0), groups(0.2)
    assert {g["tag"] for g in reference} == {"", "last_layer"}  # a run's optimiser state keeps its shape
    before, after = lr_of(reference), lr_of(slow)
    assert before.keys() == after.keys()
    heads = [n for n in before if "_head." in n]
    assert heads and any("last_layer" in n for n in heads)
    for name in before:
        expected = before[name] * (0.2 if name in heads else 1.0)
        assert after[name] == pytest.approx(expected), name
    frozen = [g for g in slow if g.get("frozen_until")]
    assert frozen and all(g["tag"] == "last_layer" for g in frozen)


def test_each_student_part_is_clipped_on_its_own_norm(tiles):
    """DINOv2 clips the backbone, the DINO head and the iBOT head each to clip_grad: one global norm,
    dominated by the backbone's, would scale the heads' gradients down with it."""
    from ssl_path.methods import methods
    from ssl_path.training.loop import clip_gradients

    cfg = resolve_config("dinov2_tiny_cpu", [*TINY, "dinov2.ibot_separate_head=true"])
    method = methods()["dinov2"].build(cfg.method_cfg, cfg.model, cfg.train, 0, torch.device("cpu"))
    batch = next(iter(shard_loader(tiles, "train", 4, method.data_transform(), method.collate_fn(), seed=0)))
    method.set_step(0)
    method(batch)["loss"].backward()
    parts = method.student
    assert set(parts) == {"backbone", "dino_head", "ibot_head"}

    def norm(part: str) -> float:
        return torch.cat([p.grad.flatten() for p in parts[part].parameters() if p.grad is not None]).norm().item()

    before = {part: norm(part) for part in parts}
    limit = before["dino_head"] * 1.5  # above one head's norm, below the backbone's and the whole's
    assert before["backbone"] > limit
    clip_gradients(method, limit)
    after = {part: norm(part) for part in parts}
    assert after["backbone"] == pytest.approx(limit, rel=1e-4)
    assert after["dino_head"] == pytest.approx(before["dino_head"], rel=1e-6)  # under the limit: untouched
    assert after["ibot_head"] == pytest.approx(min(before["ibot_head"], limit), rel=1e-4)


def test_same_seed_same_weights_other_seed_other_weights(tiles, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = resolve_config("dinov2_tiny_cpu", [*TINY, f"seed={seed}"])
        runs[name] = run(cfg, tiles, tmp_path / name, max_steps=2, progress=False).state_dict()
    key = "teacher.backbone.vit.blocks.0.attn.qkv.weight"
    assert torch.equal(runs["a"][key], runs["b"][key])
    assert not torch.equal(runs["a"][key], runs["c"][key])


def test_train_stream_resumes_at_any_batch_with_workers(tiles):
    def keys(start: int, n: int) -> list[list[str]]:
        loader = shard_loader(
            tiles,
            "train",
            3,
            collate_fn=lambda s: [x["key"] for x in s],
            num_workers=2,
            seed=1,
            shuffle_buffer=10,
            start_batch=start,
        )
        it = iter(loader)
        return [next(it) for _ in range(n)]

    whole = keys(0, 7)
    for start in (1, 2, 5):
        assert keys(start, 7 - start) == whole[start:]
    assert StreamPosition(5, 3).worker_stream(0, 2) == (1, 6)


def test_corrupt_checkpoint_is_refused_in_one_line(tiles, tmp_path):
    cfg = resolve_config("dinov2_tiny_cpu", TINY)
    run(cfg, tiles, tmp_path / "run", max_steps=2, progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    result = pretrain_cli("--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(tmp_path / "run"), *TINY)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(last) in result.stderr and "Traceback" not in result.stderr


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_good_checkpoints(tiles, tmp_path):
    result = pretrain_cli(
        "--config",
        "dinov2_tiny_cpu",
        "--data",
        str(tiles),
        "--out",
        str(tmp_path / "run"),
        *TINY,
        "optim.lr=1.0e+30",
        "optim.warmup_epochs=0",
        "optim.clip_grad=0",
        "train.checkpoint_every=1",
    )
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss term" in line and "at step" in line
    assert any(f"'{t}'" in line for t in ("dino", "ibot", "koleo", "loss"))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    if last.exists():
        saved = torch.load(last, weights_only=True)
        assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "args, words",
    [
        (["--config", "no_such_config"], "not a YAML file nor a shipped config"),
        (["--config", "dinov2_tiny_cpu", "optim.lrr=1"], "unknown key 'lrr'"),
        (["--config", "dinov2_tiny_cpu", "train.batch_size=many"], "expected an integer"),
        (["--config", "dinov2_tiny_cpu", "dinov2.centering=mean"], "centering must be one of"),
    ],
)
def test_bad_config_fails_in_one_line(tiles, tmp_path, args, words):
    result = pretrain_cli(*args, "--data", str(tiles), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and words in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_run_dir_is_never_reused_with_another_config(tiles, tmp_path):
    cfg = resolve_config("dinov2_tiny_cpu", TINY)
    run(cfg, tiles, tmp_path / "run", max_steps=1, progress=False)
    result = pretrain_cli(
        "--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(tmp_path / "run"), *TINY, "optim.lr=0.5"
    )
    assert result.returncode == 2 and "different config (optim.lr" in result.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = pretrain_cli("--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(tmp_path / "other"), *TINY)
    assert result.returncode == 2 and "not a pretraining run directory" in result.stderr
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def _ddp_worker(rank: int, world: int, port: int, tiles: str, out: str, overrides: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    method = run(resolve_config("dinov2_tiny_cpu", overrides), tiles, Path(out) / "run", max_steps=3, progress=False)
    torch.save(method.state_dict(), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


# The method contract (tests/contracts) runs DDP with the tiny config's softmax centring; Sinkhorn-Knopp
# all-reduces its own sums across ranks.
@pytest.mark.parametrize("centering", ["sinkhorn_knopp"])
def test_ddp_with_two_gloo_processes_keeps_ranks_identical(tiles, tmp_path, centering):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, port, str(tiles), str(tmp_path), [*TINY, f"dinov2.centering={centering}"]), nprocs=2)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["data"]["world_size"] == 2 and saved["step"] == 3
    # the ranks saw different tiles, yet training moved them identically
    assert not torch.equal(a["student.backbone.vit.pos_embed"], resolve_and_build_pos_embed())


def resolve_and_build_pos_embed() -> torch.Tensor:
    cfg = resolve_config("dinov2_tiny_cpu", TINY)
    torch.manual_seed(cfg.seed)
    from ssl_path.methods import methods

    method = methods()["dinov2"].build(cfg.method_cfg, cfg.model, cfg.train, cfg.seed, torch.device("cpu"))
    return method.state_dict()["student.backbone.vit.pos_embed"]


def _fsdp_worker(rank: int, world: int, port: int, tiles: str, out: str, overrides: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    run(resolve_config("dinov2_tiny_cpu", overrides), tiles, Path(out) / "run", max_steps=2, progress=False)
    torch.distributed.destroy_process_group()


def test_fsdp_checkpoint_resumes_in_one_process_and_loads_on_cpu(tiles, tmp_path):
    overrides = [*TINY, "train.strategy=fsdp"]
    mp.spawn(_fsdp_worker, args=(2, 29400 + os.getpid() % 100, str(tiles), str(tmp_path), overrides), nprocs=2)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["data"]["world_size"] == 2
    # whole tensors, not shards: the first block's qkv has its full shape
    assert saved["model"]["student.backbone.vit.blocks.0.attn.qkv.weight"].shape == (192, 64)
    model, _ = encoder.load(tmp_path / "run")  # one CPU, no process group
    assert model.forward_features(torch.randn(1, 3, 64, 64)).isfinite().all()
    method = run(resolve_config("dinov2_tiny_cpu", overrides), tiles, tmp_path / "run", max_steps=4, progress=False)
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == 4 and resumed["data"]["world_size"] == 1
    assert not torch.equal(
        resumed["model"]["student.backbone.vit.pos_embed"], saved["model"]["student.backbone.vit.pos_embed"]
    )
    assert method.state_dict().keys() == saved["model"].keys()
