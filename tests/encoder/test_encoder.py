"""The encoder contract: every ref form gives the same kind of model and info; bad refs fail in one line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from ssl_path import encoder
from ssl_path.core.errors import UserError, run_cli
from ssl_path.encoder import __main__ as encoder_cli

TINY_VIT = dict(
    img_size=64,
    patch_size=16,
    embed_dim=48,
    depth=4,
    num_heads=3,
    reg_tokens=2,
    init_values=1e-5,
    dynamic_img_size=True,
)


@pytest.fixture(scope="module")
def tissue_batch(sample_data) -> torch.Tensor:
    """Two real H&E patches from AMi-Br, normalised, [2, 3, 64, 96]."""
    paths = sorted((sample_data / "amibr" / "patches" / "normal").glob("*.png"))[:2]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((96, 64))) for p in paths]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (batch - 0.5) / 0.5


def _trained_like(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", num_classes=0, **TINY_VIT).eval()


def test_timm_ref_gives_headless_model_and_info():
    model, info = encoder.load("timm:vit_small_patch16_224", reg_tokens=4, init_values=1e-5)
    assert (info.embed_dim, info.patch_size, info.num_blocks, info.num_prefix_tokens) == (384, 16, 12, 5)
    assert info.input_size == (3, 224, 224) and len(info.mean) == len(info.std) == 3
    assert info.dense_blocks == (2, 5, 8, 11)
    assert not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 384)


def test_timm_ref_works_for_a_cnn():
    model, info = encoder.load("timm:resnet18")
    assert (info.embed_dim, info.patch_size, info.num_prefix_tokens) == (512, 32, 0)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


def test_feature_maps_match_the_final_tokens(tissue_batch):
    model = _trained_like()
    info = encoder.encoder_info(model)
    with torch.no_grad():
        maps = encoder.feature_maps(model, tissue_batch, info.dense_blocks)
        tokens = model.forward_features(tissue_batch)[:, info.num_prefix_tokens :]  # [B, L, C]
    assert [m.shape for m in maps] == [(2, 48, 4, 6)] * len(info.dense_blocks)
    # the last tapped block, normed, is the encoder's own output laid out on the patch grid
    expected = tokens.transpose(1, 2).reshape(2, 48, 4, 6)
    torch.testing.assert_close(maps[-1], expected)
    assert not torch.allclose(maps[0], maps[-1])


@pytest.mark.parametrize(
    "levels,blocks", [(12, (2, 5, 8, 11)), (24, (5, 11, 17, 23)), (40, (9, 19, 29, 39)), (2, (0, 1))]
)
def test_default_dense_blocks_end_at_the_last_block(levels, blocks):
    assert encoder.default_dense_blocks(levels) == blocks


def test_checkpoint_file_and_run_dir_load_the_same_weights(tmp_path, tissue_batch):
    model = _trained_like(seed=3)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = {"encoder": encoder.encoder_state(model, "vit_small_patch16_224", TINY_VIT), "step": 7}
    torch.save(state, run / "checkpoints" / "last.pt")

    from_file, info = encoder.load(run / "checkpoints" / "last.pt")
    from_dir, _ = encoder.load(str(run))
    with torch.no_grad():
        reference = model(tissue_batch)
        torch.testing.assert_close(from_file(tissue_batch), reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(from_dir(tissue_batch), reference, rtol=0, atol=1e-6)
    assert (info.embed_dim, info.num_blocks, info.num_prefix_tokens) == (48, 4, 3)


def test_exported_timm_folder_loads(tmp_path, tissue_batch):
    model = _trained_like(seed=5)
    folder = tmp_path / "export"
    timm.models.save_for_hf(model, str(folder), model_args=TINY_VIT, safe_serialization=True)
    loaded, info = encoder.load(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tissue_batch), model(tissue_batch), rtol=0, atol=1e-6)
    assert info.num_prefix_tokens == 3


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"encoder": encoder.encoder_state(_trained_like(), "vit_small_patch16_224", TINY_VIT)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot read checkpoint .*last.pt"):
        encoder.load(path)


class _NotWeights:
    """What a safe (weights-only) load refuses: a Python object of the test's own."""


def test_a_file_that_is_no_checkpoint_is_refused_without_advising_an_unsafe_load(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    with pytest.raises(UserError, match="notes.pt: not a PyTorch file"):
        encoder.load(text)
    pickled = tmp_path / "objects.pt"
    torch.save({"encoder": _NotWeights()}, pickled)
    with pytest.raises(UserError, match=r"objects.pt: it holds a \S+_NotWeights object, which a safe load") as err:
        encoder.load(pickled)
    assert "weights_only" not in str(err.value) and "False" not in str(err.value)
    plain = tmp_path / "plain.pt"  # a pickle, but not torch's: damaged or foreign, not "unsafe"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="plain.pt: damaged, or not a PyTorch checkpoint"):
        encoder.load(plain)


def test_checkpoint_without_encoder_entry_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(UserError, match="no 'encoder' entry"):
        encoder.load(path)
    entry = encoder.encoder_state(_trained_like(), "vit_small_patch16_224", TINY_VIT)
    for key in ("pretrained_cfg", "model_kwargs"):
        torch.save({"encoder": {**entry, key: None}}, path)
        with pytest.raises(UserError, match=f"its encoder's {key} is NoneType, not a mapping"):
            encoder.load(path)


@pytest.mark.parametrize(
    "ref,words",
    [
        ("vit_small_patch16_224", "did you mean 'timm:vit_small_patch16_224'"),
        ("timm:vit_nonexistent_patch99", "unknown timm architecture"),
        ("/no/such/run", "is not a file, folder"),
        ("hf-hub:ssl-path-tests/absent", "cannot load encoder"),
    ],
)
def test_bad_refs_fail_in_one_line_with_exit_2(ref, words, capsys):
    assert run_cli(encoder_cli.main, ["--ckpt", ref]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_cli_prints_info(capsys):
    assert run_cli(encoder_cli.main, ["--ckpt", "timm:vit_tiny_patch16_224"]) == 0
    assert '"embed_dim": 192' in capsys.readouterr().out
