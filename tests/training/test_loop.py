"""The one loop with a task that is not a pretraining method: a classification head on a tiny
timm ViT, fed by a plain stream factory over real AMi-Br patches. The loop gives it what it gives
DINOv2 (schedules, clipping, checkpoints, exact resume, metrics.jsonl, the loss PNG) through the
task contract alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import timm
import torch
from torch import Tensor, nn

from ssl_path.data.readers import read_spec
from ssl_path.data.transforms import eval_transform
from ssl_path.encoder.state import encoder_state
from ssl_path.training.config import OptimConfig, TrainConfig
from ssl_path.training.loop import train
from ssl_path.training.task import TrainingTask

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}


class PatchClassifier(TrainingTask):
    """A linear head on the class token, cross-entropy; its set_step logs a schedule of its own."""

    name = "patch_classifier"

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.encoder = timm.create_model(ARCH, pretrained=False, num_classes=0, **KWARGS)
        self.head = nn.Linear(self.encoder.embed_dim, n_classes)
        self.steps_seen: list[int] = []

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.head(self.encoder(batch["image"]))
        loss = nn.functional.cross_entropy(logits, batch["label"])
        return {"loss": loss, "accuracy": (logits.argmax(1) == batch["label"]).float().mean().detach()}

    def set_step(self, step: int) -> dict[str, float]:
        self.steps_seen.append(step)
        return {"head_share": 1.0 / (1 + step)}

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        # the encoder at a tenth of the head's lr, frozen for the first step
        return [
            {"params": list(self.encoder.parameters()), "lr_multiplier": 0.1, "wd_multiplier": 1.0, "frozen_until": 1},
            {"params": list(self.head.parameters()), "lr_multiplier": 1.0, "wd_multiplier": 0.0},
        ]

    def encoder_state(self, model_state: dict[str, Tensor] | None = None) -> dict[str, Any]:
        return encoder_state(self.encoder, ARCH, KWARGS)


@pytest.fixture(scope="module")
def patches(sample_data) -> tuple[Tensor, Tensor]:
    data = read_spec(f"amibr:{sample_data / 'amibr'}")
    picked = [i for c in range(2) for i in [j for j, t in enumerate(data.targets()) if t == c][:8]]
    transform = eval_transform(32)
    images = torch.stack([transform(data.records[i].path) for i in picked])
    return images, torch.tensor([data.targets()[i] for i in picked])


def stream_over(patches: tuple[Tensor, Tensor], batch_size: int):
    images, labels = patches

    def stream(start_batch: int) -> Iterator[dict[str, Tensor]]:
        batch = start_batch
        while True:  # batch b is a pure function of b, so any start resumes exactly
            g = torch.Generator().manual_seed(batch)
            rows = torch.randperm(len(labels), generator=g)[:batch_size]
            yield {"image": images[rows], "label": labels[rows]}
            batch += 1

    return stream


def _train(task: TrainingTask, patches, run_dir: Path, max_steps: int | None = None) -> TrainingTask:
    cfg = TrainConfig(
        batch_size=4, epochs=1, steps_per_epoch=6, num_workers=0, device="cpu", log_every=1, checkpoint_every=2
    )
    optim = OptimConfig(
        lr=0.01, lr_scaling="none", warmup_epochs=0.0, clip_grad=1.0, weight_decay=0.01, weight_decay_end=0.01
    )
    return train(
        task, stream_over(patches, 4), run_dir, optim, cfg, {"task": "patch"}, max_steps=max_steps, progress=False
    )


def test_a_head_task_trains_and_resumes_exactly_on_the_one_loop(patches, tmp_path):
    torch.manual_seed(0)
    whole = _train(PatchClassifier(2), patches, tmp_path / "whole")
    torch.manual_seed(0)
    first = PatchClassifier(2)
    _train(first, patches, tmp_path / "split", max_steps=2)
    torch.manual_seed(1)  # the resumed process starts elsewhere; the checkpoint brings it back
    resumed = _train(PatchClassifier(2), patches, tmp_path / "split")
    assert resumed.steps_seen == [2, 3, 4, 5]  # set_step for every step it ran, from the checkpoint on
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "accuracy", "lr", "wd", "head_share"} <= r.keys() for r in records)
    assert records[-1]["head_share"] == pytest.approx(1 / 6)
    assert (tmp_path / "split" / "loss.png").stat().st_size > 1000
    saved = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["method"] == "patch_classifier" and saved["encoder"]["architecture"] == ARCH


def test_a_frozen_group_does_not_move_before_its_step(patches, tmp_path):
    torch.manual_seed(0)
    task = PatchClassifier(2)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    _train(task, patches, tmp_path / "run", max_steps=1)
    after = task.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_the_loop_trains_only_a_training_task(patches, tmp_path):
    with pytest.raises(TypeError, match="TrainingTask"):
        _train(nn.Linear(2, 2), patches, tmp_path / "run")


def test_each_rank_resumes_its_own_generators_and_a_rank_the_run_lacked_draws_its_own() -> None:
    import random

    from ssl_path.core.distributed import DistInfo
    from ssl_path.training.loop import _set_rng_state

    cpu = torch.device("cpu")
    saved, next_draws = [], []
    for seed in (11, 12):  # two ranks' generators, as gathered into a checkpoint
        torch.manual_seed(seed)
        torch.rand(5)
        saved.append({"torch": torch.get_rng_state(), "python": list(random.getstate()[1])})
        next_draws.append(torch.rand(3))  # what that rank would have drawn next
    draws = {}
    for rank, world in ((0, 2), (1, 2), (2, 3)):
        _set_rng_state(saved, cpu, DistInfo(rank=rank, world_size=world))
        draws[rank] = torch.rand(3)
    assert torch.equal(draws[0], next_draws[0]) and torch.equal(draws[1], next_draws[1])
    # Rank 2 of a larger run takes rank 0's state, reseeded: neither rank's draws.
    assert not torch.equal(draws[2], draws[0]) and not torch.equal(draws[2], draws[1])
    _set_rng_state(saved[1], cpu, DistInfo())  # a one-process checkpoint from before per-rank lists
    assert torch.equal(torch.rand(3), next_draws[1])
