"""The one walk over timm's ViT tokens: masking (iBOT) and keeping a subset of patches (MAE)."""

from __future__ import annotations

import torch

from ssl_path.methods.backbone import MaskedViT, ModelConfig, build_vit

TINY = ModelConfig(
    arch="vit_tiny_patch16_224",
    kwargs={"img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2, "reg_tokens": 2},
)


def test_without_masks_or_keep_it_is_timms_forward_features():
    torch.manual_seed(0)
    backbone = MaskedViT(build_vit(TINY)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        prefix, patches = backbone(images)
        reference = backbone.vit.forward_features(images)
    assert prefix.shape == (2, 1 + 2, 32)  # the class token, then the registers
    assert torch.allclose(prefix, reference[:, : backbone.vit.num_prefix_tokens], atol=1e-6)
    assert torch.allclose(patches, reference[:, backbone.vit.num_prefix_tokens :], atol=1e-6)


def test_keeping_every_patch_changes_nothing_and_a_subset_keeps_its_positions():
    torch.manual_seed(0)
    backbone = MaskedViT(build_vit(TINY)).eval()
    images = torch.randn(2, 3, 64, 64)
    n_patches = 16
    with torch.no_grad():
        _, full = backbone(images)
        _, all_kept = backbone(images, keep=torch.arange(n_patches).repeat(2, 1))
        keep = torch.tensor([[3, 0, 9, 15], [1, 2, 4, 8]])
        _, kept = backbone(images, keep=keep)
        _, shuffled = backbone(images, keep=keep.flip(1))
    assert torch.allclose(all_kept, full, atol=1e-6)
    assert kept.shape == (2, 4, 32)
    # attention has no order: the same kept patches in another order give the same tokens, reordered
    assert torch.allclose(shuffled, kept.flip(1), atol=1e-5)
    assert not torch.allclose(kept, full[:, :4], atol=1e-3)  # fewer tokens attend: other features


def test_masked_patches_are_replaced_before_the_blocks():
    torch.manual_seed(0)
    backbone = MaskedViT(build_vit(TINY)).eval()
    images = torch.randn(1, 3, 64, 64)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, :8] = True
    with torch.no_grad():
        _, plain = backbone(images)
        _, masked = backbone(images, masks=masks)
        other = images.clone()
        other[..., :32, :] = torch.randn(1, 3, 32, 64)  # change only the masked (top) half
        _, masked_other = backbone(other, masks=masks)
    assert not torch.allclose(plain, masked, atol=1e-4)
    assert torch.allclose(masked, masked_other, atol=1e-5)  # what was masked is never seen
