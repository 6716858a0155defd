"""ViTDet's simple feature pyramid and torchvision's detectors over it, on tiny ViTs."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from finetune.detectors import HEADS, anchor_sizes, build_detector
from finetune.necks import SimpleFeaturePyramid
from ssl_path.encoder import feature_maps


def tiny_vit(patch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", patch_size=patch, img_size=patch * 8, embed_dim=32, depth=2, num_heads=2,
        num_classes=0, dynamic_img_size=True,
    )  # fmt: skip


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("size", [(224, 224), (256, 320), (96, 160)])
def test_the_pyramid_has_strides_4_to_64_for_patch_14_and_16(patch: int, size: tuple[int, int]) -> None:
    vit, pyramid = tiny_vit(patch), SimpleFeaturePyramid(32, patch, channels=16)
    height, width = size
    padded = torch.nn.functional.pad(torch.rand(1, 3, height, width), (0, -width % patch, 0, -height % patch))
    levels = pyramid(feature_maps(vit, padded, [1])[-1])
    assert list(levels) == ["p2", "p3", "p4", "p5", "p6"]
    grid = (height // 16, width // 16)  # the stride-16 grid of the image, whatever the patch
    expected = {
        "p2": (4 * grid[0], 4 * grid[1]),
        "p3": (2 * grid[0], 2 * grid[1]),
        "p4": grid,
        "p5": (grid[0] // 2, grid[1] // 2),
        "p6": (math.ceil(grid[0] / 4), math.ceil(grid[1] / 4)),
    }
    assert {name: tuple(level.shape[-2:]) for name, level in levels.items()} == expected
    assert all(level.shape[:2] == (1, 16) for level in levels.values())


def test_anchor_sizes_start_at_the_small_boxes_and_double_per_level() -> None:
    sizes = anchor_sizes([10.0] * 5 + [40.0] * 95)
    assert sizes == (10, 20, 40, 80, 160)
    assert anchor_sizes([1.0] * 10) == (4, 8, 16, 32, 64)  # no anchor finer than the finest stride


@pytest.mark.parametrize("kind", HEADS)
def test_each_detector_learns_from_boxes_and_detects_with_the_encoder(kind: str) -> None:
    vit = tiny_vit(16)
    detector = build_detector(kind, 32, 16, 2, n_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3, window=64,
                              anchors=anchor_sizes([16.0, 24.0]), channels=32, max_detections=20)  # fmt: skip
    encode = lambda images: feature_maps(vit, images, detector.blocks)  # noqa: E731
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:28, 8:30], masks[1, 36:60, 30:50] = 1, 1
    target = {"boxes": torch.tensor([[8.0, 8, 30, 28], [30, 36, 50, 60]]), "labels": torch.tensor([1, 2])}
    targets = [target | ({"masks": masks} if kind == "maskrcnn" else {})] * 2
    detector.train()
    losses = detector(encode, images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vit.parameters())  # the encoder learns
    assert detector.model.backbone.encode is None  # the encoder is lent for one call, never kept
    detector.eval()
    with torch.no_grad():
        found = detector(encode, images)
    assert len(found) == 2 and found[0]["boxes"].shape[1] == 4
    assert set(found[0]["labels"].tolist()) <= {1, 2}
    assert (kind == "maskrcnn") == ("masks" in found[0])
