"""The head task on the loop: which encoder weights each mode trains, at which lr, and LoRA merged
into the published encoder."""

from __future__ import annotations

import pytest
import torch
from finetune_helpers import TINY_KWARGS, tiny_vit
from torch import nn

from finetune.config import EncoderTuning
from finetune.task import HeadTask
from ssl_path.core.errors import UserError
from ssl_path.encoder.state import model_from_entry
from ssl_path.training.config import OptimConfig


class Probe(nn.Module):
    reads = "embedding"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 3)

    def forward(self, embedding, images):
        return self.fc(embedding)


def task(mode: str, **tuning) -> HeadTask:
    torch.manual_seed(0)
    vit, info = tiny_vit()
    return HeadTask(
        "test", vit, info, TINY_KWARGS, Probe(info.embed_dim), nn.CrossEntropyLoss(), EncoderTuning(mode=mode, **tuning)
    )


def trainable(t: HeadTask) -> set[str]:
    return {name for name, p in t.named_parameters() if p.requires_grad}


def test_each_mode_trains_its_share_of_the_encoder():
    head = {"head.fc.weight", "head.fc.bias"}
    assert trainable(task("frozen")) == head
    last = trainable(task("last-2"))
    assert {n.split(".")[2] for n in last if n.startswith("encoder.blocks.")} == {"2", "3"}
    assert "encoder.norm.weight" in last and "encoder.patch_embed.proj.weight" not in last
    full = task("full")
    assert trainable(full) == {name for name, _ in full.named_parameters()}
    lora = trainable(task("lora", lora_targets=("qkv", "fc1")))
    assert lora - head and all("lora_" in n for n in lora - head)
    assert {n.split(".")[4] for n in lora - head} == {"qkv", "fc1"}  # encoder.blocks.N.attn.qkv.lora_A...


def test_the_encoder_and_the_head_have_their_own_lr_with_layerwise_decay():
    optim = OptimConfig(lr=1e-3, layerwise_decay=0.5, patch_embed_lr_mult=1.0)
    t = task("full", lr=1e-5)
    rate = {name: g["lr_multiplier"] * optim.lr for g in t.param_groups(optim) for name in g["names"]}
    assert rate["fc.weight"] == pytest.approx(1e-3)  # the head's group names its own parameters
    assert rate["blocks.3.attn.qkv.weight"] == pytest.approx(1e-5)
    assert rate["norm.weight"] == pytest.approx(1e-5)
    assert rate["blocks.2.attn.qkv.weight"] == pytest.approx(0.5e-5)
    assert rate["blocks.0.attn.qkv.weight"] == pytest.approx(1e-5 * 0.5**3)
    frozen = task("frozen").param_groups(optim)
    assert {g["tag"] for g in frozen} == {"head"}


def test_lora_is_merged_into_the_published_encoder():
    t = task("lora", lora_targets=("qkv", "proj"))
    with torch.no_grad():
        for name, p in t.encoder.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would make the merge trivially right
                p.normal_(0, 0.2)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        adapted = t.encoder(images)
    entry = t.encoder_state(t.state_dict())
    assert not any("lora" in k for k in entry["state_dict"])
    published = model_from_entry(entry, "merged", {"dynamic_img_size": True}).eval()
    with torch.no_grad():
        merged = published(images)
        plain = tiny_vit()[0](images)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-3)


def test_a_lora_target_the_encoder_lacks_is_one_line():
    with pytest.raises(UserError, match="names no linear layer"):
        task("lora", lora_targets=("q_proj",))
    with pytest.raises(UserError, match="has 4 blocks"):
        task("last-5")
