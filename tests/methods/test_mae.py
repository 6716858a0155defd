"""MAE: masking, the pixel loss and its norm-pix target, the encoder's view of the patches, the fixed
positions, the reconstruction figure and the encoder and card it publishes. Resume after SIGKILL,
DDP and the encoder contract are the method contract's (tests/contracts/test_methods.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pretrain_helpers import TINY_STEPS, make_tiles
from torch import nn

from ssl_path import hub, run_log
from ssl_path.core.errors import UserError, run_cli
from ssl_path.data.transforms import SingleViewAugment, SingleViewConfig
from ssl_path.methods import methods
from ssl_path.methods.losses import normalized_patches, pixel_reconstruction_loss
from ssl_path.methods.mae import MAE, patchify, predicted_patches, unpatchify
from ssl_path.methods.masking import random_masking
from ssl_path.pretrain import resolve_config, run

SMALL = ["model.kwargs.depth=2", "model.kwargs.embed_dim=64", "model.kwargs.num_heads=2", "mae.view.size=64"]
SMALL += ["mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2", *TINY_STEPS]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tiles(tmp_path_factory.mktemp("tiles") / "shards")


def small_mae(*overrides: str) -> MAE:
    cfg = resolve_config("mae_tiny_cpu", [*SMALL, *overrides])
    torch.manual_seed(0)
    return methods()["mae"].build(cfg.method_cfg, cfg.model, cfg.train, cfg.seed, torch.device("cpu"))


# ----------------------------------------------------------------------------- masking


def test_random_masking_keeps_the_requested_patches_per_image_and_restore_undoes_the_shuffle():
    noise = torch.rand(5, 49, generator=torch.Generator().manual_seed(0))
    keep, removed, restore = random_masking(noise, 12)
    assert keep.shape == (5, 12) and removed.shape == (5, 49)
    assert (removed.sum(dim=1) == 37).all()  # exactly P - K removed in every image
    for b in range(5):
        assert len(set(keep[b].tolist())) == 12
        assert not removed[b, keep[b]].any()  # the kept patches are the visible ones
        assert set(keep[b].tolist()) == set(noise[b].argsort()[:12].tolist())  # the lowest noise stays
    # A sequence in noise order (kept first, then removed) goes back to patch order through restore.
    patches = torch.arange(49).expand(5, -1)
    shuffled = torch.gather(patches, 1, noise.argsort(dim=1))
    assert torch.equal(shuffled[:, :12], keep)
    assert torch.equal(torch.gather(shuffled, 1, restore), patches)
    with pytest.raises(UserError, match="keep between 1 and 48"):
        random_masking(noise, 49)


def test_mask_ratio_that_keeps_no_patch_is_refused_before_a_run():
    with pytest.raises(UserError, match="mask_ratio must be in"):
        resolve_config("mae_tiny_cpu", ["mae.mask_ratio=1.0"])
    with pytest.raises(UserError, match="keeps 0 of 16 patches"):
        small_mae("mae.mask_ratio=0.95")


# ----------------------------------------------------------------------------- loss


def test_the_loss_counts_only_removed_patches():
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(2, 6, 12, generator=gen)
    prediction = torch.rand(2, 6, 12, generator=gen)
    removed = torch.tensor([[True, False, True, False, False, False], [False, False, False, True, True, True]])
    loss = pixel_reconstruction_loss(prediction, target, removed, norm_pix=False)
    by_hand = ((prediction - target) ** 2).mean(dim=-1)[removed].mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    visible_changed = prediction.clone()
    visible_changed[~removed] += 5.0
    assert pixel_reconstruction_loss(visible_changed, target, removed, norm_pix=False) == loss
    removed_changed = prediction.clone()
    removed_changed[0, 2] += 5.0
    assert pixel_reconstruction_loss(removed_changed, target, removed, norm_pix=False) > loss


def test_norm_pix_target_is_the_patch_normalised_by_its_own_mean_and_variance():
    patch = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0, 8.0]]])  # one image, one patch of 6 values
    normalised, mean, std = normalized_patches(patch)
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 8.0])
    mu = values.sum() / 6  # 3.0
    var = ((values - mu) ** 2).sum() / 5  # unbiased, as MAE's torch.var: 8.0
    expected = (values - mu) / math.sqrt(var + 1e-6)
    assert mean.item() == pytest.approx(3.0) and std.item() == pytest.approx(math.sqrt(8.0 + 1e-6))
    assert np.allclose(normalised[0, 0].numpy(), expected, atol=1e-6)
    # The loss's norm-pix target is that normalised patch: predicting it exactly costs nothing.
    prediction = torch.from_numpy(expected).float().view(1, 1, 6)
    loss = pixel_reconstruction_loss(prediction, patch, torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    # A blank patch (glass) has a finite target.
    assert normalized_patches(torch.ones(1, 1, 6))[0].isfinite().all()


def test_the_figure_denormalises_a_norm_pix_prediction_with_the_target_patch_statistics():
    target = patchify(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), 16)
    perfect = normalized_patches(target)[0]  # what a perfect norm-pix decoder predicts
    assert torch.allclose(predicted_patches(perfect, target, norm_pix=True), target, atol=1e-5)
    assert torch.equal(predicted_patches(target, target, norm_pix=False), target)


def test_patchify_is_row_major_pixel_major_and_unpatchify_inverts_it():
    images = torch.rand(2, 3, 32, 48)
    patches = patchify(images, 16)
    assert patches.shape == (2, 6, 16 * 16 * 3)
    # Patch 4 is row 1, column 1; each patch lists its pixels row by row, the 3 channels of each together.
    assert torch.equal(patches[1, 4], images[1, :, 16:32, 16:32].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 16, (2, 3)), images)


# ----------------------------------------------------------------------------- the model


def test_the_encoder_sees_only_the_visible_patches_and_the_decoder_predicts_every_patch():
    mae = small_mae("model.kwargs.reg_tokens=2")
    seen: list[tuple[int, ...]] = []
    mae.encoder.vit.blocks[0].register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    images, noise = torch.randn(3, 3, 64, 64), torch.rand(3, 16)
    prediction, removed = mae.reconstruct(images, noise)
    assert seen == [(3, 1 + 2 + 4, 64)]  # class + 2 register tokens + a quarter of the 16 patches
    assert prediction.shape == (3, 16, 16 * 16 * 3) and (removed.sum(dim=1) == 12).all()
    loss = mae({"images": images, "noise": noise})["loss"]
    loss.backward()
    no_grad = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # every trainable parameter takes part: DDP needs no unused-parameter search


def test_positions_are_fixed_sincos_and_initialisation_is_maes():
    mae = small_mae()
    vit = mae.encoder.vit
    assert not vit.pos_embed.requires_grad
    assert torch.equal(vit.pos_embed[0, 0], torch.zeros(64))  # the class token's slot gets no position
    patches = vit.pos_embed[0, 1:]
    assert patches.abs().max() <= 1.0 and patches.std() > 0.3  # sines and cosines of the grid
    assert "decoder.positions" not in mae.state_dict()  # fixed, recomputed, never saved or trained
    trainable = {id(p) for group in mae.param_groups(resolve_config("mae_tiny_cpu").optim) for p in group["params"]}
    assert id(vit.pos_embed) not in trainable
    for name, module in mae.named_modules():
        if isinstance(module, nn.Linear):
            bound = math.sqrt(6.0 / (module.in_features + module.out_features))  # xavier-uniform
            assert module.weight.abs().max() <= bound + 1e-6, name
            assert module.weight.abs().max() > 0.8 * bound, name
            assert module.bias is None or torch.equal(module.bias, torch.zeros_like(module.bias)), name
    big = small_mae("model.kwargs.embed_dim=256", "mae.decoder_dim=256")
    for token in (big.encoder.vit.cls_token, big.decoder.mask_token):
        assert token.std().item() == pytest.approx(0.02, rel=0.25)


def test_positions_stay_fixed_through_training_and_the_figure_is_drawn(tiles, tmp_path):
    cfg = resolve_config("mae_tiny_cpu", SMALL)
    fresh = small_mae().encoder.vit.pos_embed.detach().clone()
    trained = run(cfg, tiles, tmp_path / "run", max_steps=2, progress=False)
    assert torch.equal(trained.encoder.vit.pos_embed, fresh)
    figure = tmp_path / "run" / "reconstruction.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    figure.unlink()
    assert run_cli(run_log.main, [str(tmp_path / "run")]) == 0  # on demand, from the run's own shards
    assert figure.stat().st_size > 10_000 and (tmp_path / "run" / "loss.png").is_file()
    assert run_cli(run_log.main, [str(tmp_path / "run"), "--data", str(tmp_path / "nowhere")]) == 2


def _fsdp_worker(rank: int, world: int, port: int, tiles: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    cfg = resolve_config("mae_tiny_cpu", [*SMALL, "train.strategy=fsdp"])
    run(cfg, tiles, Path(out) / "run", max_steps=2, progress=False)
    torch.distributed.destroy_process_group()


def test_fsdp_shards_a_model_with_frozen_positions_and_saves_it_whole(tiles, tmp_path):
    mp.spawn(_fsdp_worker, args=(2, 29500 + os.getpid() % 100, str(tiles), str(tmp_path)), nprocs=2)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["data"]["world_size"] == 2
    fresh = small_mae().state_dict()
    assert saved["model"].keys() == fresh.keys()
    assert torch.equal(saved["model"]["encoder.vit.pos_embed"], fresh["encoder.vit.pos_embed"])  # frozen
    assert saved["model"]["decoder.layers.0.attn.qkv.weight"].shape == fresh["decoder.layers.0.attn.qkv.weight"].shape
    assert not torch.equal(saved["model"]["decoder.predict.weight"], fresh["decoder.predict.weight"])


# ----------------------------------------------------------------------------- data


def test_the_single_view_is_a_pure_function_of_seed_draw_and_key():
    image = torch.randint(0, 256, (3, 96, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    augment = SingleViewAugment(SingleViewConfig(size=48), seed=0)
    view = augment(image, "tile-1", epoch=0)
    assert view.shape == (3, 48, 48) and view.dtype == torch.float32
    assert torch.equal(view, SingleViewAugment(SingleViewConfig(size=48), seed=0)(image, "tile-1", epoch=0))
    assert not torch.equal(view, augment(image, "tile-1", epoch=1))  # a new draw, a new view
    assert not torch.equal(view, augment(image, "tile-2", epoch=0))
    fixed = dict(size=80, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, vflip_p=0.0, rot90=False)
    square = image[:, :80, :80]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = (square.float() / 255 - mean) / std  # the whole tile at its own size: only normalised
    assert torch.allclose(SingleViewAugment(SingleViewConfig(**fixed))(square, "k"), expected, atol=1e-5)
    stained = SingleViewAugment(SingleViewConfig(**fixed, hed_sigma=0.05))(square, "k")
    assert not torch.allclose(stained, expected, atol=1e-2)  # HED jitter recolours


# ----------------------------------------------------------------------------- publishing


def test_the_export_is_the_encoder_alone_with_a_card_that_says_mae(tiles, tmp_path):
    cfg = resolve_config("mae_tiny_cpu", SMALL)
    run(cfg, tiles, tmp_path / "run", max_steps=1, progress=False)
    out = tmp_path / "export"
    assert run_cli(hub.main, ["export", "--ckpt", str(tmp_path / "run"), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert not any("decoder" in k or "mask_token" in k for k in weights)
    assert "pos_embed" in weights and json.loads((out / "config.json").read_text())["architecture"] == cfg.model.arch
    card = (out / "README.md").read_text()
    assert MAE.title in card and "Masked Autoencoders Are Scalable Vision Learners" in card
    assert "trail those of self-distillation methods" in card  # what is known of MAE's frozen features
    assert "the MAE encoder (decoder dropped)" in card
