"""The loop's parts that are pure functions: schedules, parameter groups, typed configs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import timm
from torch import nn

from ssl_path.core.config import apply_overrides, from_dict
from ssl_path.core.errors import ConfigError, UserError
from ssl_path.methods.dinov2 import DINOv2Config
from ssl_path.tiling import TilingParams
from ssl_path.training.config import OptimConfig, TrainConfig
from ssl_path.training.optim import param_groups, param_rule
from ssl_path.training.schedules import cosine, linear_warmup, warmup_cosine


def test_warmup_cosine_hits_its_anchors():
    assert warmup_cosine(0, 100, 10, 1.0, 0.1) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)  # half-way down the cosine
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine(25, 100, 0.992, 1.0) == pytest.approx(1.0 - 0.008 * (1 + math.cos(math.pi / 4)) / 2)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(40, 30, 0.04, 0.07) == 0.07 and linear_warmup(0, 0, 0.04, 0.07) == 0.07


def test_lr_scaling_rules():
    assert OptimConfig(lr=0.004).peak_lr(256) == pytest.approx(0.002)
    assert OptimConfig(lr=0.004, lr_scaling="linear").peak_lr(256) == pytest.approx(0.001)
    assert OptimConfig(lr=0.004, lr_scaling="none").peak_lr(256) == pytest.approx(0.004)


class _Method(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.student = nn.ModuleDict(
            {
                "backbone": timm.create_model(
                    "vit_tiny_patch16_224",
                    img_size=32,
                    depth=3,
                    embed_dim=32,
                    num_heads=2,
                    init_values=1e-5,
                    num_classes=0,
                ),
                "head": nn.Sequential(nn.Linear(32, 8)),
            }
        )
        self.student["head"].last_layer = nn.Linear(8, 4)
        self.teacher = nn.Linear(4, 4).requires_grad_(False)


def test_param_groups_layerwise_decay_patch_embed_no_decay_and_tags():
    method = _Method()
    groups = param_groups(method, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {name: g for g in groups for name in g["names"]}
    assert not any(n.startswith("teacher") for n in by_name)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in method.parameters())
    lr = {n: g["lr_multiplier"] for n, g in by_name.items()}
    # 3 blocks: layer ids 0 (embeddings), 1..3 (blocks), 4 (after the trunk) -> 0.5 ** (4 - id)
    assert lr["student.backbone.cls_token"] == pytest.approx(0.5**4)
    assert lr["student.backbone.patch_embed.proj.weight"] == pytest.approx(0.5**4 * 0.2)
    assert lr["student.backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**3)
    assert lr["student.backbone.blocks.2.mlp.fc1.weight"] == pytest.approx(0.5)
    assert lr["student.backbone.norm.weight"] == 1.0 and lr["student.head.0.weight"] == 1.0
    wd = {n: g["wd_multiplier"] for n, g in by_name.items()}
    assert wd["student.backbone.blocks.0.attn.qkv.bias"] == 0.0
    assert wd["student.backbone.blocks.0.norm1.weight"] == 0.0
    assert wd["student.backbone.blocks.0.ls1.gamma"] == 0.0
    assert wd["student.backbone.blocks.0.attn.qkv.weight"] == 1.0
    tagged = param_groups(method, tag=lambda name: "last" if "last_layer" in name else "")
    by_name = {name: g for g in tagged for name in g["names"]}
    assert by_name["student.head.last_layer.weight"]["tag"] == "last"
    assert by_name["student.head.0.weight"]["tag"] == ""
    assert param_rule("x.mask_token", 12, 0.9, 1.0).lr_multiplier == pytest.approx(0.9**13)


@dataclass(frozen=True)
class _Inner:
    size: int = 1
    scale: tuple[float, float] = (0.1, 1.0)
    name: str | None = None


@dataclass(frozen=True)
class _Outer:
    lr: float = 0.1
    inner: _Inner = field(default_factory=_Inner)
    kwargs: dict = field(default_factory=dict)


def test_config_overrides_convert_and_validate():
    data = apply_overrides(
        {"inner": {"size": 2}}, ["lr=1", "inner.scale=[0.2, 0.5]", "kwargs.depth=3", "inner.name=null"]
    )
    cfg = from_dict(_Outer, data)
    assert cfg == _Outer(lr=1.0, inner=_Inner(size=2, scale=(0.2, 0.5)), kwargs={"depth": 3})
    assert isinstance(cfg.lr, float)
    with pytest.raises(UserError, match="unknown key 'sise'"):
        from_dict(_Outer, {"inner": {"sise": 1}})
    with pytest.raises(UserError, match="inner.scale: expected 2 values"):
        from_dict(_Outer, {"inner": {"scale": [1]}})
    with pytest.raises(UserError, match="expected an integer"):
        from_dict(_Outer, {"inner": {"size": 1.5}})
    with pytest.raises(UserError, match="not key=value"):
        apply_overrides({}, ["lr"])
    with pytest.raises(UserError, match="is a value, not a section"):
        apply_overrides({"lr": 1}, ["lr.x=2"])


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: from_dict(OptimConfig, {"lr_scaling": "cubic"}, "optim"), "optim: lr_scaling must be one of"),
        (lambda: from_dict(OptimConfig, {"lr_reference_batch": 0}, "optim"), "optim: lr_reference_batch"),
        (lambda: from_dict(TrainConfig, {"precision": "fp8"}, "train"), "train: precision must be one of"),
        (lambda: from_dict(DINOv2Config, {"centering": "mean"}, "dinov2"), "dinov2: centering must be one of"),
        (lambda: from_dict(DINOv2Config, {"crops": {"n_global": 0}}, "dinov2"), "dinov2.crops: multicrop needs"),
        (lambda: TilingParams(tile_size=2), "--tile-size must be at least 8"),
    ],
)
def test_every_config_refuses_a_bad_value_with_one_exception_type(build, words):
    with pytest.raises(ConfigError, match=words):
        build()
