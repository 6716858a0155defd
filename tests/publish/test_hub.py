"""Publishing: a trained checkpoint exported for timm, its model card, and the upload command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from pretrain_helpers import SAMPLE_DATA, TINY, make_tiles
from safetensors.torch import load_file

from probes import fewshot, knn
from ssl_path import encoder, hub
from ssl_path.core.errors import run_cli
from ssl_path.data.manifest import MANIFEST
from ssl_path.data.transforms import as_rgb_tensor, eval_transform
from ssl_path.encoder.checkpoint import read_checkpoint
from ssl_path.evaluation.metrics import SCORES
from ssl_path.evaluation.results import read_results, write_results
from ssl_path.pretrain import resolve_config, run
from ssl_path.publish.push import cache_export
from ssl_path.publish.records import training_record
from ssl_path.tiling import TilingParams, make_shards

REPO = Path(__file__).resolve().parents[2]
REPO_ID = "path-lab/tiny-dinov2"
HUB_DATASET = "path-lab/amibr-midog21-patches"
EVAL_DATASET = "path-lab/amibr-test-slides"  # the Hub id of the set the probes were measured on
TOKEN = "hf_sslpathTestTokenThatMustNeverBeShown"
SECTIONS = (
    "## Intended use and limits",
    "## Training data",
    "## Training recipe",
    "## Evaluation",
    "## How to load",
    "## Citation",
)


@pytest.fixture(scope="module")
def trained(sample_data, tmp_path_factory) -> dict[str, Path]:
    """A 2-step DINOv2 run (register tokens and layer scale on) and a kNN and a few-label results.json of it."""
    root = tmp_path_factory.mktemp("hub")
    tiles = make_tiles(root / "shards")
    run(resolve_config("dinov2_tiny_cpu", TINY), tiles, root / "run", max_steps=2, progress=False)
    amibr = sample_data / "amibr"  # every patch of these four slides is in the sample
    common = [
        "--ckpt",
        str(root / "run"),
        "--train",
        f"amibr:{amibr}?group=005.tiff,006.tiff",
        "--test",
        f"amibr:{amibr}?group=029.tiff,031.tiff",
        "--input-size",
        "64",
        "--cache-dir",
        str(root / "cache"),
        "--no-progress",
    ]
    assert run_cli(knn.main, [*common, "--k", "3", "--out", str(root / "knn.json")]) == 0
    assert (
        run_cli(
            fewshot.main,
            [
                *common,
                "--seeds",
                "2",
                "--fractions",
                "1.0",
                "--shots",
                "2",
                "--episodes",
                "2",
                "--c-grid",
                "1",
                "--out",
                str(root / "fewshot" / "results.json"),
            ],
        )
        == 0
    )
    return {
        "root": root,
        "run": root / "run",
        "shards": tiles,
        "results": [root / "knn.json", root / "fewshot" / "results.json"],
    }


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    out = trained["root"] / "export"
    argv = [
        "export",
        "--ckpt",
        str(trained["run"]),
        "--out",
        str(out),
        "--name",
        REPO_ID,
        "--license",
        "cc-by-4.0",
        "--datasets",
        HUB_DATASET,
        f"amibr={EVAL_DATASET}",
        "--results",
        *map(str, trained["results"]),
    ]
    assert run_cli(hub.main, argv) == 0
    return out


def _tiles(sample_data: Path, size: int, mean, std) -> torch.Tensor:
    paths = sorted((sample_data / "amibr" / "patches" / "atypical").glob("*.png"))[:3]
    transform = eval_transform(size, mean, std)
    return torch.stack([transform(as_rgb_tensor(p.read_bytes())) for p in paths])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def test_timm_loads_the_export_from_the_hub_cache_with_no_arguments(exported, trained, sample_data, tmp_path):
    config = json.loads((exported / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["num_features"] == 64
    args = config["model_args"]
    assert args["reg_tokens"] == 2 and args["init_values"] == 1.0e-5 and args["dynamic_img_size"] is True
    assert args["img_size"] == [64, 64] and args["depth"] == 2 and "drop_path_rate" not in args
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 64, 64] and cfg["crop_pct"] == 1.0 and cfg["license"] == "cc-by-4.0"
    assert cfg["mean"] == [0.485, 0.456, 0.406] and "tag" not in cfg and "hf_hub_id" not in cfg

    reference, info = encoder.load(trained["run"])  # the teacher backbone of the checkpoint
    weights = load_file(exported / "model.safetensors")
    assert weights.keys() == reference.state_dict().keys()  # timm's names, heads dropped
    assert not any(k.startswith(("head", "dino", "ibot", "student", "teacher")) for k in weights)

    images = {size: _tiles(sample_data, size, info.mean, info.std) for size in (64, 96)}
    torch.save(images, tmp_path / "images.pt")
    cache = cache_export(exported, tmp_path / "hf_cache", REPO_ID)
    script = textwrap.dedent(f"""
        import torch, timm
        from ssl_path import encoder
        model = timm.create_model("hf-hub:{REPO_ID}", pretrained=True).eval()
        assert model.num_prefix_tokens == 3 and model.blocks[0].ls1.gamma.shape == (64,)
        ours, info = encoder.load("hf-hub:{REPO_ID}")
        images = torch.load({str(tmp_path / "images.pt")!r}, weights_only=True)
        with torch.inference_mode():
            out = {{s: (model(x), ours(x)) for s, x in images.items()}}
        torch.save({{"out": out, "input_size": list(info.input_size)}}, {str(tmp_path / "out.pt")!r})
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=_env(HF_HUB_CACHE=str(cache)),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert loaded["input_size"] == [3, 64, 64]
    with torch.inference_mode():
        for size, x in images.items():
            expected = reference(x)
            for features in loaded["out"][size]:
                assert features.shape == (3, 64)
                assert (features - expected).abs().max().item() < 1e-5

    local, local_info = encoder.load(exported)  # the folder itself, through the encoder contract
    with torch.inference_mode():
        assert (local(images[64]) - reference(images[64])).abs().max().item() < 1e-5
    assert local_info.mean == info.mean and local_info.input_size == (3, 64, 64)


def test_card_front_matter_parses_and_holds_every_score(exported, trained):
    card = ModelCard.load(exported / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.license == "cc-by-4.0"
    assert data.pipeline_tag == "image-feature-extraction" and data.model_name == REPO_ID
    assert {"pathology", "histology", "self-supervised", "dinov2"} <= set(data.tags)
    # Hub ids alone: the Hub links each, so a local folder name would point at a stranger's dataset
    assert data.datasets == [HUB_DATASET, EVAL_DATASET]
    assert f"(https://huggingface.co/datasets/{HUB_DATASET})" in card.text
    assert "| amibr |" in card.text  # the source folders are in the card's own table
    # the model-index names the set by the Hub id given for it, and by its own name as the pretty name
    assert {(r.dataset_type, r.dataset_name) for r in data.eval_results} == {(EVAL_DATASET, "amibr")}
    index = {(r.metric_config, r.metric_type): r.metric_value for r in data.eval_results}
    expected = {}
    for path in trained["results"]:
        results = read_results(path)
        for row_name, row in results["metrics"].items():
            for score in SCORES:
                if isinstance(row.get(score), float):
                    expected[(f"{results['probe']}/{row_name}", score)] = row[score]
    assert len(expected) > 20 and index == expected
    # The Hub's model-index keeps one task name per task and dataset: the first file's title.
    assert {(r.task_type, r.task_name) for r in data.eval_results} == {("image-classification", knn.TITLE)}

    text = card.text
    for section in SECTIONS:
        assert section in text
    assert not re.search(r"\{\{ *[a-z_.]+ *\}\}|\{%|None|TODO|PATH_TO", text)  # no template text left
    assert f'timm.create_model("hf-hub:{REPO_ID}", pretrained=True)' in text
    assert "2 of 8 planned" in text and "4 images per step" in text  # the recipe, from the checkpoint
    assert "13 images" in text  # the shard manifest's sources
    # few-label curves with their confidence intervals, and how those were drawn
    assert re.search(r"shots_2/prototype \| [0-9.]+ \[[0-9.]+, [0-9.]+\]", text) and "t over seeds" in text
    assert "[95 % confidence interval: percentile bootstrap over the 2 test groups, 1000 resamples]" in text  # kNN's
    assert "95 % confidence interval: 95" not in text
    assert f"### {knn.TITLE} on amibr, a separate test set" in text and f"### {fewshot.TITLE} on amibr" in text
    assert {r.dataset_split for r in data.eval_results} == {"test"}  # a split's name, not how it was chosen
    assert "Oquab" in text  # the method's paper


def test_card_takes_each_evaluation_task_title_and_scores_from_its_results_file(trained, tmp_path):
    results = read_results(trained["results"][0])
    title = "a U-Net head, as a segmentation evaluator would name itself"
    rows = {"nucleus": {"dice": 0.81, "iou": 0.68, "aji": 0.55, "n": 14}, "cell": {"dice": 0.9, "n": 14}}
    retitled = write_results(
        tmp_path / "retitled.json", {**results, "task": "segmentation", "title": title, "metrics": rows}
    )
    out = tmp_path / "export"
    argv = ["export", "--ckpt", str(trained["run"]), "--out", str(out), "--results", str(retitled)]
    assert run_cli(hub.main, argv) == 0
    card = ModelCard.load(out / "README.md")
    assert {(r.task_type, r.task_name) for r in card.data.eval_results} == {("segmentation", title)}
    index = {(r.metric_config.split("/", 1)[1], r.metric_type): r.metric_value for r in card.data.eval_results}
    assert index == {
        ("nucleus", "dice"): 0.81,
        ("nucleus", "iou"): 0.68,
        ("nucleus", "aji"): 0.55,
        ("cell", "dice"): 0.9,
    }
    assert f"### {title} on amibr" in card.text and knn.TITLE not in card.text
    assert card.data.datasets is None and "Datasets on the Hub" not in card.text  # no --datasets: none claimed
    assert {r.dataset_type for r in card.data.eval_results} == {"amibr"}  # unnamed: the set's own name
    assert "0.810" in card.text and "n/a" in card.text  # the cell row has no IoU


def test_card_names_the_published_split_each_row_was_scored_on(trained, tmp_path):
    results = read_results(trained["results"][0])
    rows = {"testA/gland": {"dice": 0.81}, "testB/gland": {"dice": 0.77}, "fraction_0.5/testB/gland": {"dice": 0.7}}
    named = write_results(
        tmp_path / "glas.json",
        {**results, "task": "segmentation", "title": "U-Net", "metrics": rows,
         "split": {"method": "named", "source": "glas:/data/glas", "tests": ["testA", "testB"]}},
    )  # fmt: skip
    out = tmp_path / "export"
    assert run_cli(hub.main, ["export", "--ckpt", str(trained["run"]), "--out", str(out), "--results", str(named)]) == 0
    card = ModelCard.load(out / "README.md")
    assert {(r.metric_config, r.dataset_split) for r in card.data.eval_results} == {
        (f"{results['probe']}/testA/gland", "testA"),
        (f"{results['probe']}/testB/gland", "testB"),
        (f"{results['probe']}/fraction_0.5/testB/gland", "testB"),  # a series' row, under its run's name
    }
    assert "### U-Net on amibr, its published test splits" in card.text


def test_card_shows_detection_scores_and_marks_a_lower_is_better_column(trained, tmp_path):
    results = read_results(trained["results"][0])
    detection = {
        "all": {"map": 0.235, "map_50": 0.478, "map_75": 0.211, "precision": 0.446, "recall": 0.514, "f1": 0.478},
        "class/WBC": {"ap": 0.531, "ap_50": 1.0, "precision": 0.455, "recall": 0.833, "f1": 0.588, "n_truth": 6},
    }
    masks = {"all": {"map": 0.3, "f1": 0.6, "mask_map": 0.25, "mask_map_50": 0.5, "aji": 0.41, "object_f1": 0.7}}
    detected = write_results(
        tmp_path / "detect.json",
        {**results, "task": "detection", "title": "ViTDet-style detector", "probe": "finetune.detect",
         "metrics": detection},
    )  # fmt: skip
    segmented = write_results(
        tmp_path / "segment.json",
        {**results, "task": "segmentation", "title": "U-Net", "probe": "finetune.segment",
         "metrics": {"gland": {"dice": 0.8, "object_hausdorff": 41.5}}},
    )  # fmt: skip
    masked = write_results(
        tmp_path / "maskrcnn.json",
        {**results, "task": "detection", "title": "Mask R-CNN", "probe": "finetune.maskrcnn", "metrics": masks},
    )
    out = tmp_path / "export"
    argv = ["export", "--ckpt", str(trained["run"]), "--out", str(out), "--results", str(detected), str(segmented),
            str(masked)]  # fmt: skip
    assert run_cli(hub.main, argv) == 0
    card = ModelCard.load(out / "README.md")
    index = {(r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    expected = {(f"finetune.detect/{row}", s): v for row, scores in detection.items() for s, v in scores.items()}
    del expected[("finetune.detect/class/WBC", "n_truth")]  # a count, not a score
    assert {k: v for k, v in index.items() if k[0].startswith("finetune.detect")} == expected
    assert "| row | map | map_50 | map_75 | ap | ap_50 | precision | recall | f1 |" in card.text
    assert "| all | 0.235 | 0.478 | 0.211 | n/a | n/a | 0.446 | 0.514 | 0.478 |" in card.text
    assert "| row | dice | object_hausdorff (lower is better) |" in card.text
    assert "| row | map | f1 | mask_map | mask_map_50 | aji | object_f1 |" in card.text  # Mask R-CNN's too
    assert index[("finetune.maskrcnn/all", "aji")] == 0.41


def test_export_is_method_agnostic(sample_data, tmp_path):
    """Any method's checkpoint carries the same encoder entry; a patch-14 ViT with 4 registers made outside DINOv2."""
    arch, kwargs = (
        "vit_small_patch14_reg4_dinov2",
        {"img_size": 56, "embed_dim": 32, "depth": 1, "num_heads": 2, "init_values": 1e-5, "dynamic_img_size": True},
    )
    torch.manual_seed(0)
    vit = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    vit.pretrained_cfg = {
        **vit.pretrained_cfg,
        "mean": (0.7, 0.5, 0.7),
        "std": (0.2, 0.25, 0.2),
        "input_size": (3, 56, 56),
    }
    ckpt = tmp_path / "msn.pt"
    torch.save({"method": "msn", "encoder": encoder.encoder_state(vit, arch, kwargs)}, ckpt)
    out = tmp_path / "export"
    assert run_cli(hub.main, ["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0

    reference, _ = encoder.load(ckpt)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.num_prefix_tokens == 5 and model.pretrained_cfg["mean"] == [0.7, 0.5, 0.7]
    x = _tiles(sample_data, 70, (0.7, 0.5, 0.7), (0.2, 0.25, 0.2))
    with torch.inference_mode():
        assert (model(x) - reference(x)).abs().max().item() < 1e-5
    text = (out / "README.md").read_text()
    # a method the registry does not know is named as its checkpoint names it
    assert "with msn" in text and "no evaluation" in text and "carries no training config" in text
    assert "the publisher named none" in text and f"local-dir:{out.resolve()}" in text
    assert not re.search(r"\{\{ *[a-z_.]+ *\}\}|\{%|None", text)


def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_bad_results_checkpoint_or_out_fail_in_one_line(trained, exported, tmp_path, capsys):
    base = ["export", "--ckpt", str(trained["run"]), "--out", str(tmp_path / "out")]
    assert run_cli(hub.main, [*base, "--results", str(tmp_path / "missing.json")]) == 2
    _one_line_error(capsys, "missing.json", "does not exist")
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"accuracy": 0.9}))
    assert run_cli(hub.main, [*base, "--results", str(foreign)]) == 2
    _one_line_error(capsys, "foreign.json", "not an ssl-path results file")
    other = read_results(trained["results"][0])
    other["encoder"] = {"ref": "timm:vit_tiny_patch16_224", "hash": "0123456789abcdef"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert run_cli(hub.main, [*base, "--results", str(tmp_path / "other.json")]) == 2
    _one_line_error(capsys, "other.json", "timm:vit_tiny_patch16_224", "its own encoder")
    assert not (tmp_path / "out").exists()

    assert run_cli(hub.main, ["export", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "nowhere")
    for name in ("not a repo!", "path-vit-s"):  # push would refuse a bare name; the card's hf-hub: would not load
        assert run_cli(hub.main, [*base, "--name", name]) == 2
        _one_line_error(capsys, "--name", repr(name))
    for local in ("../shared/data/amibr", "amibr"):  # a path, or a folder's bare name, is no Hub dataset
        assert run_cli(hub.main, [*base, "--datasets", HUB_DATASET, local]) == 2
        _one_line_error(capsys, "--datasets", repr(local))
    assert run_cli(hub.main, [*base, "--datasets", "midog=path-lab/midog"]) == 2  # no results of that set
    _one_line_error(capsys, "--datasets midog=", "no results file was measured on 'midog'")
    before = {p.name: p.stat().st_mtime_ns for p in exported.iterdir()}
    assert run_cli(hub.main, ["export", "--ckpt", str(trained["run"]), "--out", str(exported)]) == 2
    _one_line_error(capsys, "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in exported.iterdir()} == before  # nothing a user made is touched


def _push(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_path.hub", "push", *args],
        cwd=REPO,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_push_dry_run_lists_the_exported_files_and_no_path_shows_the_token(exported, tmp_path):
    dry = _push(str(exported), "--repo", REPO_ID, "--dry-run", HF_TOKEN=TOKEN, HF_HUB_VERBOSITY="debug")
    assert dry.returncode == 0, dry.stderr
    listed = [line.split()[2] for line in dry.stdout.splitlines()]
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "files.json", "model.safetensors"]
    assert listed == ["README.md", "config.json", "model.safetensors"]  # the file list itself stays local
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in exported.iterdir())  # as open() would make them
    assert all(line.startswith("would upload") and REPO_ID in line for line in dry.stdout.splitlines())

    # A real upload attempt, token set, against a Hub that refuses connections: one line, no token.
    refused = {"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    failed = _push(str(exported), "--repo", REPO_ID, **refused)
    assert failed.returncode == 2
    assert failed.stderr.startswith(f"error: push to {REPO_ID} failed") and failed.stderr.count("\n") == 1
    debug = _push(str(exported), "--repo", REPO_ID, **refused, HF_HUB_VERBOSITY="debug")  # every request logged
    assert debug.returncode == 2 and "authenticated: True" in debug.stderr
    no_token = _push(str(exported), "--repo", REPO_ID, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0")
    assert no_token.returncode == 2 and "no Hugging Face token" in no_token.stderr
    for done in (dry, failed, debug, no_token):
        assert TOKEN not in done.stdout + done.stderr
    for path in Path(exported).rglob("*"):
        assert TOKEN.encode() not in path.read_bytes()

    wrong = _push(str(exported), "--repo", "path-lab/another-name", "--dry-run")
    assert wrong.returncode == 2 and "--name path-lab/another-name" in wrong.stderr
    assert _push(str(tmp_path), "--repo", REPO_ID, "--dry-run").returncode == 2


def test_moved_shards_are_named_by_shards_or_reported_missing(trained, sample_data, tmp_path, capsys):
    """run.json's data path may be gone at export time: --shards names the shards, else the card says so."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    os.link(trained["run"] / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt")
    record = json.loads((trained["run"] / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "data": str(tmp_path / "moved_away")}))

    assert run_cli(hub.main, ["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "a")]) == 0
    assert "no shard manifest found for" in capsys.readouterr().err
    assert "manifest was not available" in (tmp_path / "a" / "README.md").read_text()

    assert (
        run_cli(
            hub.main,
            ["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "b"), "--shards", str(trained["shards"])],
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err
    text = (tmp_path / "b" / "README.md").read_text()
    assert "13 images" in text and "| amibr | 12 | 48 |" in text  # 12 patches cut into 4 tiles each
    assert str(trained["root"]) not in text and str(sample_data) not in text  # no local path is published
    # --shards is the user's word for where the shards are: a wrong one is refused, not warned of
    argv = ["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "c"), "--shards", str(tmp_path / "typo")]
    assert run_cli(hub.main, argv) == 2
    _one_line_error(capsys, "--shards", "typo", "no shard manifest")
    assert not (tmp_path / "c").exists()

    # Shards tiled otherwise than the run's (here: their manifest says 96 px) would make the card lie.
    other = Path(shutil.copytree(trained["shards"], tmp_path / "other"))
    manifest = json.loads((other / MANIFEST).read_text())
    (other / MANIFEST).write_text(json.dumps({**manifest, "params": {**manifest["params"], "tile_size": 96}}))
    argv = ["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "d"), "--shards", str(other)]
    assert run_cli(hub.main, argv) == 2
    _one_line_error(capsys, "--shards", str(other / MANIFEST), "is not a shard manifest this run started on")
    assert not (tmp_path / "d").exists()
    # The run's own and other shards: the card would describe more than the run saw.
    argv[-1:] = [str(trained["shards"]), str(other)]
    assert run_cli(hub.main, argv) == 2
    _one_line_error(capsys, "--shards", str(other / MANIFEST), "is not a shard manifest this run started on")
    (run_dir / "run.json").write_text(json.dumps({**record, "data": str(other)}))  # re-tiled where the run read
    assert run_cli(hub.main, ["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "e")]) == 0
    assert "is not a shard manifest this run started on" in capsys.readouterr().err
    card = " ".join((tmp_path / "e" / "README.md").read_text().split())
    assert "the shards found when the encoder was exported were not those its run started on" in card


def test_shards_are_described_only_when_they_are_all_the_run_started_on(trained, tmp_path, capsys):
    """A run on two shard folders, one of them given alone; a run started on shards without a manifest."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.pt"
    os.link(trained["run"] / "checkpoints" / "last.pt", last)
    record = json.loads((trained["run"] / "run.json").read_text())
    checkpoint = read_checkpoint(last)
    for started_on, found in ((record["manifests"], 0), ([*record["manifests"], "0" * 64], 1)):
        (run_dir / "run.json").write_text(json.dumps({**record, "manifests": started_on}))
        described = training_record(checkpoint, last)
        assert (described.data is not None, described.data_absent) == (found == 0, found)
    (run_dir / "run.json").write_text(json.dumps({**record, "manifests": []}))  # bare .tar shards
    assert training_record(checkpoint, last, [str(trained["shards"])]).data_foreign == [
        str(trained["shards"] / MANIFEST)
    ]
    out = tmp_path / "export"
    (run_dir / "run.json").write_text(json.dumps({**record, "manifests": [*record["manifests"], "0" * 64]}))
    argv = ["export", "--ckpt", str(run_dir), "--out", str(out), "--shards", str(trained["shards"])]
    assert run_cli(hub.main, argv) == 2
    _one_line_error(capsys, "--shards: 1 of the shard manifests this run started on are not among those found")
    assert not out.exists()


def test_a_relative_data_path_is_recorded_whole_so_that_export_finds_it_from_anywhere(trained, tmp_path, monkeypatch):
    shards = trained["shards"]
    monkeypatch.chdir(shards.parent)
    run(resolve_config("dinov2_tiny_cpu", TINY), shards.name, tmp_path / "run", max_steps=1, progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"] == str(shards)
    monkeypatch.chdir(tmp_path)  # the export runs elsewhere: the card still describes the shards
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    record = training_record(read_checkpoint(last), last)
    assert record.data_missing == [] and record.data is not None


def test_the_card_tells_which_images_had_no_pixel_size_under_mpp(trained, tmp_path):
    """Under --mpp, images without a pixel size are tiled at --downscale: the card may not claim the mpp for them."""
    patches = sorted((SAMPLE_DATA / "amibr" / "patches" / "normal").glob("*.png"))[:3]  # PNGs: no pixel size
    slide = SAMPLE_DATA / "slide" / "CMU-1-Small-Region.svs"  # 0.499 µm/px
    params = TilingParams(tile_size=64, min_tissue=0.0, samples_per_shard=40, max_tiles_per_source=20, mpp=0.5)
    make_shards([*patches, slide], tmp_path / "shards", params, progress=False)
    run(resolve_config("dinov2_tiny_cpu", TINY), tmp_path / "shards", tmp_path / "run", max_steps=1, progress=False)
    out = tmp_path / "export"
    argv = ["export", "--ckpt", str(tmp_path / "run"), "--out", str(out)]
    assert run_cli(hub.main, argv) == 0
    text = " ".join((out / "README.md").read_text().split())
    assert (
        "at 0.5 µm/px (3 of its 4 images have no pixel size and were tiled at their native resolution instead)" in text
    )
