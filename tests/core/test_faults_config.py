"""Mistakes in a config, a flag or an input file are refused before any work, in one line and exit 2.

Every config value is checked when the config is read (ranges, types, choices), so a bad value never
reaches a DataLoader worker or a half-made run dir, and ``1e-3`` is a number wherever one is
expected. The flags and files that only the stage can check (a device, an input size, an exported
encoder's weights, a card template, ``--out``) fail as early, in one line, with nothing written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from pretrain_helpers import REPO, TINY, make_tiles, pretrain_cli
from probe_helpers import assert_one_line_error, probe_args
from timm.models import save_for_hf

from probes import embed, fewshot, knn, linear
from ssl_path import hub
from ssl_path.core.errors import ConfigError, run_cli
from ssl_path.pretrain import main as pretrain_main
from ssl_path.pretrain import resolve_config, run

AMIBR = "amibr"  # in data/sample


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A process that failed as a user error should: exit 2, one ``error:`` line, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def stage(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tiles(tmp_path_factory.mktemp("tiles") / "shards")


@pytest.fixture(scope="module")
def trained(tiles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    run(resolve_config("dinov2_tiny_cpu", TINY), tiles, out, max_steps=1, progress=False)
    return out


# ----------------------------------------------------------------------------- numbers


def test_numbers_written_like_1e_3_are_numbers(tmp_path):
    cfg = resolve_config("dinov2_tiny_cpu", ["optim.lr=1e-3", "model.kwargs.init_values=1e-5", "optim.min_lr=2E-6"])
    assert cfg.optim.lr == 0.001 and cfg.optim.min_lr == 2e-6
    assert cfg.model.kwargs["init_values"] == 1e-5  # a kwarg typed by no dataclass, still a number
    config = tmp_path / "mine.yaml"
    config.write_text("method: dinov2\noptim: {lr: 5e-4, betas: [0.9, 9.99e-1]}\n")
    assert resolve_config(str(config)).optim.betas == (0.9, 0.999)


# ----------------------------------------------------------------------------- every value, in range


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=-1.0",
        "optim.min_lr=-1e-6",
        "optim.warmup_epochs=-1",
        "optim.weight_decay=-0.1",
        "optim.weight_decay_end=-0.1",
        "optim.clip_grad=-1",
        "optim.layerwise_decay=0",
        "optim.layerwise_decay=1.5",
        "optim.patch_embed_lr_mult=-1",
        "optim.betas=[0.9, 1.0]",
        "optim.lr=.nan",
        "optim.lr=.inf",
        "optim.lr=fast",
        "train.epochs=0",
        "train.epochs=0.001",  # rounds to no step at 100 steps an epoch
        "train.num_workers=-1",
        "train.shuffle_buffer=0",
        "train.keep_every=-1",
        "train.device=bogus",
        "train.device=cpu:1",
        "train.batch_size=2.5",
        "dinov2.n_prototypes=0",
        "dinov2.ibot_n_prototypes=0",
        "dinov2.head_hidden_dim=0",
        "dinov2.head_bottleneck_dim=0",
        "dinov2.head_n_layers=0",
        "dinov2.sinkhorn_iterations=0",
        "dinov2.student_temperature=0",
        "dinov2.teacher_temperature=-0.1",
        "dinov2.warmup_teacher_temperature=0",
        "dinov2.warmup_teacher_temperature_epochs=-1",
        "dinov2.freeze_last_layer_epochs=-1",
        "dinov2.dino_loss_weight=-1",
        "dinov2.mask_ratio=[0.9, 0.1]",
        "dinov2.mask_ratio=[0.1, 1.5]",
        "dinov2.mask_probability=1.5",
        "dinov2.momentum_teacher=1.1",
        "dinov2.final_momentum_teacher=-0.1",
        "dinov2.center_momentum=2",
        "dinov2.crops.local_blur_p=2",
        "dinov2.crops.stain_norm=macenko",
        "model.arch=vit_nope",
    ],
)
def test_a_bad_value_is_refused_when_the_config_is_read(override):
    with pytest.raises(ConfigError) as refused:
        resolve_config("dinov2_tiny_cpu", [override])
    assert override.split("=")[0].split(".")[0] in str(refused.value)  # names its section


def test_all_loss_weights_zero_is_refused():
    zero = ["dinov2.dino_loss_weight=0", "dinov2.ibot_loss_weight=0", "dinov2.koleo_loss_weight=0"]
    with pytest.raises(ConfigError):
        resolve_config("dinov2_tiny_cpu", zero)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.epochs=0", "epochs"),  # it used to exit 0 and print a checkpoint that does not exist
        ("optim.lr=-1.0", "lr"),
        ("dinov2.mask_ratio=[0.9,0.1]", "mask_ratio"),  # used to fail in a worker, in 14 lines
        ("model.arch=vit_nope", "vit_nope"),
        ("train.device=bogus", "bogus"),
    ],
)
def test_the_pretrain_command_refuses_a_bad_value_before_any_work(tiles, tmp_path, override, fragment):
    out = tmp_path / "run"
    # One worker: a value checked only where it is used would fail inside it, in many lines.
    args = ["--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(out), *TINY, "train.num_workers=1"]
    assert_refused(pretrain_cli(*args, override), fragment)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_asked_for_where_there_is_none_is_one_line(tiles, tmp_path):
    result = pretrain_cli(
        "--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(tmp_path / "run"), *TINY, "train.device=cuda"
    )
    assert_refused(result, "train", "cuda")
    assert not (tmp_path / "run").exists()
    assert_refused(stage("ssl_path.encoder", "--ckpt", "timm:vit_tiny_patch16_224", "--device", "cuda"), "cuda")


def test_a_bad_device_for_the_encoder_is_one_line():
    assert_refused(stage("ssl_path.encoder", "--ckpt", "timm:vit_tiny_patch16_224", "--device", "bogus"), "bogus")


def test_pretrain_out_naming_a_file_is_refused_and_the_file_stays(tiles, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    argv = ["--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(out), "--no-progress", *TINY]
    assert run_cli(pretrain_main, argv) == 2
    assert_one_line_error(capsys, str(out), "file")
    assert out.read_text() == "mine\n"


# ----------------------------------------------------------------------------- encoder inputs


def test_an_input_size_that_is_no_multiple_of_the_patch_names_the_patch(sample_data, tmp_path):
    spec = f"amibr:{sample_data / AMIBR}"
    argv = probe_args(f"{spec}?domain=hamamatsu_xr", f"{spec}?domain=hamamatsu_s360", tmp_path)
    argv[argv.index("--input-size") + 1] = "50"
    result = stage("probes.knn", *argv, "--out", str(tmp_path / "knn.json"))
    assert_refused(result, "50", "patch size 16")
    assert not (tmp_path / "knn.json").exists()


@pytest.fixture(scope="module")
def damaged_export(tmp_path_factory) -> Path:
    """An exported tiny ViT whose model.safetensors lost its second half (a cut download, say)."""
    folder = tmp_path_factory.mktemp("export") / "vit"
    args = {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **args)
    save_for_hf(model, folder, model_args=args, safe_serialization=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def test_a_damaged_export_is_one_line_naming_its_weights(damaged_export):
    result = stage("ssl_path.encoder", "--ckpt", str(damaged_export))
    assert_refused(result, str(damaged_export / "model.safetensors"))


@pytest.mark.parametrize("probe", [knn, linear, fewshot, embed], ids=lambda m: m.__name__)
def test_every_probe_refuses_a_damaged_export_in_one_line(probe, damaged_export, sample_data, tmp_path, capsys):
    data = f"amibr:{sample_data / AMIBR}?group=005.tiff,006.tiff"
    argv = ["--ckpt", str(damaged_export), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    argv += ["--data", data] if probe is embed else ["--train", data, "--test", data]
    out = tmp_path / ("maps" if probe is embed else "results.json")
    assert run_cli(probe.main, [*argv, "--out", str(out)]) == 2
    assert_one_line_error(capsys, "model.safetensors")
    assert not out.exists()


# ----------------------------------------------------------------------------- card template


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("{{ model.name ", "line 1"),  # Jinja syntax
        ("{{ no_such_value.x }}", "no_such_value"),  # undefined
        ("{{ 1 / 0 }}", "ZeroDivisionError"),  # an expression that raises
        ("---\nlicense: [\n---\n{{ name }}\n", "ParserError"),  # front matter that is not YAML
    ],
)
def test_a_broken_card_template_is_one_line_naming_it(trained, tmp_path, capsys, text, fragment):
    template = tmp_path / "card.md"
    template.write_text(text)
    out = tmp_path / "export"
    assert run_cli(hub.main, ["export", "--ckpt", str(trained), "--out", str(out), "--template", str(template)]) == 2
    assert_one_line_error(capsys, str(template), fragment)
    assert not out.exists()
