"""The classification head: label fractions over seeds in the probes' schema, exact resume through
model selection, scoring a trained run on another set, predictions as CSV, bad input in one line."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from finetune_helpers import assert_one_line_error, tiny_checkpoint

from finetune import classify, predict
from ssl_path import hub
from ssl_path.core.errors import run_cli
from ssl_path.encoder.checkpoint import read_training_checkpoint
from ssl_path.encoder.identity import encoder_hash
from ssl_path.evaluation.results import read_results
from ssl_path.publish.card import evaluation_tables
from ssl_path.training.metrics_log import read_metrics

SMALL = ["classify.input_size=32", "train.batch_size=16", "train.num_workers=0", "--no-progress"]


@pytest.fixture(scope="module")
def amibr_small(sample_data, tmp_path_factory):
    """48 AMi-Br patches of each class, from two scanners, as a folder-per-class set."""
    root = tmp_path_factory.mktemp("amibr") / "set"
    for label in ("normal", "atypical"):
        (root / label).mkdir(parents=True)
        for path in sorted((sample_data / "amibr" / "patches" / label).glob("*.png"))[:48]:
            shutil.copy(path, root / label / path.name)
    return root


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("enc") / "tiny.pt")


def test_fractions_and_seeds_give_one_row_per_fraction_with_its_spread(amibr_small, tiny_ref, tmp_path):
    out = tmp_path / "run"
    argv = ["--ckpt", str(tiny_ref), "--train", f"folder:{amibr_small}", "--out", str(out), "--mode", "last-1",
            "--fractions", "0.25", "1", "--seeds", "2", "train.epochs=2", *SMALL]  # fmt: skip
    assert run_cli(classify.main, [*argv, "--max-steps", "2"]) == 0  # a pause in the first run
    assert not (out / "results.json").exists()
    assert run_cli(classify.main, argv) == 0  # the same command resumes it and trains the rest
    results = read_results(out / "results.json")
    assert results["task"] == "image-classification" and results["seeds"] == [0, 1]
    assert set(results["metrics"]) == {"fraction_0.25/last-1", "fraction_1/last-1"}
    row = results["metrics"]["fraction_0.25/last-1"]
    assert row["n_seeds"] == 2 and len(row["per_seed"]["balanced_accuracy"]) == 2
    assert row["balanced_accuracy_std"] is not None and (out / "learning_curve.png").is_file()
    one = read_results(out / "fraction_0.25" / "seed_1" / "results.json")
    full = read_results(out / "fraction_1" / "seed_1" / "results.json")
    assert one["split"]["n_train"] < full["split"]["n_train"]
    # Every run of the command is scored on the same test images, carved once.
    assert one["dataset"]["n_test"] == full["dataset"]["n_test"] == results["dataset"]["n_test"]
    # but each fraction trained on its own share: no one training count, the card gives each run's
    assert results["dataset"]["n_train"] is None
    images = evaluation_tables([results])[0]["images"]
    for run in (one, full):
        assert f"{run['dataset']['n_train']} training and {run['dataset']['n_test']} test images" in images
    assert "fraction_0.25/seed_0, fraction_0.25/seed_1:" in images
    assert run_cli(classify.main, argv) == 2  # finished: never trained again over itself


def test_a_paused_run_resumes_exactly_through_validation_and_selection(amibr_small, tiny_ref, tmp_path):
    base = ["--ckpt", str(tiny_ref), "--train", f"folder:{amibr_small}", "--mode", "full", "train.epochs=3",
            "select.val_every=0.5", "train.checkpoint_every=2", *SMALL]  # fmt: skip
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    assert run_cli(classify.main, [*base, "--out", str(whole)]) == 0
    assert run_cli(classify.main, [*base, "--out", str(paused), "--max-steps", "5"]) == 0
    assert not (paused / "results.json").exists()
    assert run_cli(classify.main, [*base, "--out", str(paused)]) == 0
    assert (whole / "validation.jsonl").read_text() == (paused / "validation.jsonl").read_text()
    a, b = (read_training_checkpoint(r / "checkpoints" / "best.pt") for r in (whole, paused))
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)


def test_a_paused_run_resumes_from_its_encoder_wherever_it_is_and_refuses_another(amibr_small, tmp_path, capsys):
    encoder = tiny_checkpoint(tmp_path / "a" / "tiny.pt")
    out = tmp_path / "run"
    base = ["--out", str(out), "train.epochs=3", *SMALL]
    assert run_cli(classify.main, ["--ckpt", str(encoder), "--train", f"folder:{amibr_small}", *base,
                                   "--max-steps", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    assert run_cli(classify.main, ["--eval", str(out), "--test", f"folder:{amibr_small}"]) == 2
    assert_one_line_error(capsys, "has not finished training (no selection.json); its training command resumes it")
    assert run_cli(classify.main, ["--eval", str(tmp_path / "nope"), "--test", f"folder:{amibr_small}"]) == 2
    assert_one_line_error(capsys, "nope: no such run directory")
    pretrained = tmp_path / "pretrained"  # a pretraining run's config, as ssl_path.pretrain writes one
    pretrained.mkdir()
    (pretrained / "config.yaml").write_text("method: dinov2\nseed: 0\nmodel: {arch: vit_small_patch16_224}\n")
    assert run_cli(classify.main, ["--eval", str(pretrained), "--test", f"folder:{amibr_small}"]) == 2
    assert_one_line_error(capsys, "is not a finetune.classify run (its config.yaml has no classify section)")
    moved = tmp_path / "b" / "tiny.pt"
    moved.parent.mkdir()
    shutil.copy(encoder, moved)
    # the same encoder elsewhere, the same set written another way (bare, trailing slash, relative)
    same_set = os.path.relpath(amibr_small, os.getcwd()) + "/"
    assert run_cli(classify.main, ["--ckpt", str(moved), "--train", same_set, *base, "--max-steps", "3"]) == 0
    assert read_training_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3
    assert f"resuming {out} at step 2" in capsys.readouterr().err  # a rerun says it resumed

    torch.manual_seed(1)
    tiny_checkpoint(encoder)  # other weights at the path the run started from
    capsys.readouterr()
    assert run_cli(classify.main, ["--ckpt", str(encoder), "--train", f"folder:{amibr_small}", *base]) == 2
    assert_one_line_error(capsys, "was trained from another encoder (hash", f"than --ckpt {encoder} (hash")
    # a run dir of the version that named its encoder by path
    config = out / "config.yaml"
    saved = config.read_text()
    config.write_text(saved.replace("encoder_hash:", "ckpt: a/tiny.pt\n  hash_was:"))
    assert run_cli(classify.main, ["--ckpt", str(moved), "--train", f"folder:{amibr_small}", *base]) == 2
    assert_one_line_error(capsys, "was started by an older ssl-path")
    config.write_text(saved)
    assert run_cli(classify.main, ["--ckpt", str(moved), "--train", f"folder:{amibr_small}", *base]) == 0
    results = read_results(out / "results.json")
    assert results["encoder"] == {"ref": str(moved), "hash": encoder_hash(str(moved))}
    assert results["encoder"]["hash"] != encoder_hash(str(encoder))


def test_a_series_refuses_to_go_on_from_another_encoder_than_its_finished_runs(amibr_small, tmp_path, capsys):
    encoder = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "series"
    argv = ["--ckpt", str(encoder), "--train", f"folder:{amibr_small}", "--out", str(out), "train.epochs=1",
            *SMALL, "--fractions", "0.5", "1"]  # fmt: skip
    assert run_cli(classify.main, argv) == 0
    # as if the job had been requeued after the first run finished, and the encoder then trained on
    (out / "results.json").unlink()
    shutil.rmtree(out / "fraction_1")
    torch.manual_seed(1)
    tiny_checkpoint(encoder)
    capsys.readouterr()
    assert run_cli(classify.main, argv) == 2
    assert_one_line_error(capsys, "fraction_0.5", "was trained from encoder")
    assert not (out / "fraction_1").exists()


def test_unreadable_test_images_are_told_and_too_many_refuse_the_scores(amibr_small, tiny_ref, tmp_path, capsys):
    run = tmp_path / "run"
    # the run allows 2 % of its images unreadable: 1 of 96 test images is told and left out, 2 refuse the scores
    assert run_cli(classify.main, ["--ckpt", str(tiny_ref), "--train", f"folder:{amibr_small}", "--out", str(run),
                                   "train.epochs=2", "select.val_every=1", "train.max_skipped_fraction=0.02",
                                   *SMALL]) == 0  # fmt: skip
    assert len(read_metrics(run / "validation.jsonl")) == 2  # two rounds of training,
    assert "resuming" not in capsys.readouterr().err  # the second continuing the first, not resuming it
    test = tmp_path / "test"
    shutil.copytree(amibr_small, test)
    broken = sorted((test / "atypical").glob("*.png"))[:2]
    broken[0].write_bytes(broken[0].read_bytes()[:300])
    capsys.readouterr()
    assert (
        run_cli(classify.main, ["--eval", str(run), "--test", f"folder:{test}", "--out", str(tmp_path / "one.json")])
        == 0
    )
    assert f"warning: test: 1 of 96 test images cannot be read and are left out of its scores; first {broken[0]}" in (
        capsys.readouterr().err
    )
    results = read_results(tmp_path / "one.json")
    assert results["dataset"]["n_test"] == 95 and results["dataset"]["n_skipped"] == 1
    broken[1].write_bytes(b"")
    assert (
        run_cli(classify.main, ["--eval", str(run), "--test", f"folder:{test}", "--out", str(tmp_path / "two.json")])
        == 2
    )
    assert_one_line_error(
        capsys, "2 of 96 test images cannot be read, more than the run allows (train.max_skipped_fraction=0.02)"
    )
    assert not (tmp_path / "two.json").exists()


def test_a_run_refused_for_unreadable_test_images_is_scored_once_they_are_repaired(
    amibr_small, tiny_ref, tmp_path, capsys
):
    test = tmp_path / "test"
    shutil.copytree(amibr_small, test)
    broken = sorted((test / "normal").glob("*.png"))[:2]
    for path in broken:
        path.write_bytes(b"")
    run = tmp_path / "run"
    argv = ["--ckpt", str(tiny_ref), "--train", f"folder:{amibr_small}", "--test", f"folder:{test}", "--out", str(run),
            "train.epochs=1", *SMALL]  # fmt: skip
    assert run_cli(classify.main, argv) == 2
    assert_one_line_error(capsys, "2 of 96 test images cannot be read", "the trained run is kept")
    assert not (run / "results.json").exists() and (run / "selection.json").is_file()
    validated = (run / "validation.jsonl").read_text()
    for path in broken:
        shutil.copy(amibr_small / "normal" / path.name, path)
    assert run_cli(classify.main, argv) == 0
    assert read_results(run / "results.json")["dataset"]["n_test"] == 96
    assert (run / "validation.jsonl").read_text() == validated  # scored, not trained again


def test_a_trained_run_scores_another_set_and_predicts_a_folder(amibr_small, tiny_ref, sample_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(classify.main, ["--ckpt", str(tiny_ref), "--train", f"folder:{amibr_small}", "--out", str(run),
                                   "train.epochs=1", *SMALL]) == 0  # fmt: skip
    other = f"amibr:{sample_data / 'amibr'}?domain=hamamatsu_s360"
    scored = tmp_path / "scored.json"
    assert run_cli(classify.main, ["--eval", str(run), "--test", other, "--out", str(scored)]) == 0
    row = read_results(scored)["metrics"]["frozen"]
    # MIDOG 2021 scanned slides 051-100 on the Hamamatsu S360
    with (sample_data / "amibr" / "AMI-BR_MIDOG21.csv").open() as f:
        n_s360 = sum(51 <= int(r["slide"][:3]) <= 100 for r in csv.DictReader(f))
    assert row["n"] == n_s360 and 0 <= row["balanced_accuracy"] <= 1
    out, images = tmp_path / "pred", tmp_path / "images"
    shutil.copytree(amibr_small / "normal", images)
    (images / "broken.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert run_cli(predict.main, ["--run", str(run), "--data", str(images), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote 48 predictions of 49 images" in captured.out and "warning: skipped" in captured.err
    assert "predict: 100%" in captured.err and "49/49" in captured.err  # the bar counts every image asked for
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    scored_rows = [r for r in rows if not r["error"]]
    assert len(rows) == 49 and len(scored_rows) == 48  # the unreadable one listed, with its reason
    assert {r["prediction"] for r in scored_rows} <= {"normal", "atypical"}
    assert all(abs(float(r["p_normal"]) + float(r["p_atypical"]) - 1) < 1e-5 for r in scored_rows)
    assert json.loads((run / "selection.json").read_text())["mode"] == "frozen"
    assert run_cli(predict.main, ["--run", str(run), "--data", str(images), "--out", str(tmp_path / "quiet"),
                                  "--no-progress"]) == 0  # fmt: skip
    assert "predict:" not in capsys.readouterr().err
    assert run_cli(predict.main, ["--run", str(run), "--data", str(amibr_small), "--out", str(tmp_path / "tree")]) == 2
    assert_one_line_error(capsys, "no images; its images lie in subfolders")  # a folder per class, as it trained on
    # its encoder was not pretrained by this head: the card would say so
    capsys.readouterr()
    assert run_cli(hub.main, ["export", "--ckpt", str(run), "--out", str(tmp_path / "export")]) == 2
    assert_one_line_error(capsys, "is of a fine-tuning run (a classify head)")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--fractions", "0"], "--fractions must lie in (0, 1]"),
        (["--mode", "half"], "encoder.mode must be frozen, last-N"),
        (["--mode", "frozen", "encoder.mode=full"], "--mode and encoder.mode=... set the same thing"),
        (["--mode", "frozen", "encoder={mode: full}"], "--mode and encoder.mode=... set the same thing"),
        (["--mode", "frozen", "encoder.mode=full", "encoder={lora_rank: 4}"], "--mode and encoder.mode=..."),
        (["classify.balance=oversample"], "classify.balance must be one of"),
        (["train.steps_per_epoch=3"], "set by the training set"),
        (["--mode", "lora", "encoder.lora_targets=[q]"], "names no linear layer"),
        (["--overwrite"], "--overwrite is for --eval's results.json; a run dir is never replaced"),
        (
            ["--config", "segment_wbc"],
            "is for task 'segment', this command is 'classify' (use python -m finetune.segment)",
        ),
    ],
)
def test_bad_requests_are_one_line(extra, fragment, amibr_small, tiny_ref, tmp_path, capsys):
    argv = ["--ckpt", str(tiny_ref), "--train", f"folder:{amibr_small}", "--out", str(tmp_path / "r"), *SMALL]
    assert run_cli(classify.main, [*argv, *extra]) == 2
    assert_one_line_error(capsys, fragment)
    assert not (tmp_path / "r").exists()


def test_unlabelled_rows_are_named_before_a_class_too_few(amibr_small, tiny_ref, tmp_path, capsys):
    images = sorted(amibr_small.rglob("*.png"))[:4]
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{p},{'normal' if i < 2 else ''}\n" for i, p in enumerate(images)))
    argv = ["--ckpt", str(tiny_ref), "--train", f"csv:{table}", "--out", str(tmp_path / "r"), *SMALL]
    assert run_cli(classify.main, argv) == 2
    assert_one_line_error(capsys, "2 images have no label")


def _ddp_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    assert classify.main(argv) == 0
    torch.distributed.destroy_process_group()


def test_two_ddp_ranks_of_8_train_as_one_process_of_16(amibr_small, tiny_ref, tmp_path):
    """Each rank takes its half of every global batch: with a frozen encoder and no dropout, two gloo
    ranks of 8 images make the updates of one process of 16, so they validate alike. (Layer norm: the
    default batch norm is synchronised across ranks on GPUs only.)"""
    base = ["--ckpt", str(tiny_ref), "--train", f"folder:{amibr_small}", "train.epochs=2", "select.val_every=1",
            "classify.input_size=32", "classify.norm=layer", "train.num_workers=0", "--no-progress"]  # fmt: skip
    assert run_cli(classify.main, [*base, "--out", str(tmp_path / "one"), "train.batch_size=16"]) == 0
    port = 29600 + os.getpid() % 1000
    argv = [*base, "--out", str(tmp_path / "two"), "train.batch_size=8"]
    mp.spawn(_ddp_worker, args=(2, port, argv), nprocs=2)
    one, two = (
        [json.loads(line) for line in (tmp_path / name / "validation.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    )
    assert [r["step"] for r in one] == [r["step"] for r in two] == [3, 6]
    for a, b in zip(one, two):
        assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-6)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert (
        read_results(tmp_path / "two" / "results.json")["dataset"]["n_test"]
        == read_results(tmp_path / "one" / "results.json")["dataset"]["n_test"]
    )


def test_the_linear_head_standardises_features_and_trains_on_one_image():
    torch.manual_seed(0)
    head = classify.LinearHead(8, 3)
    head.train()
    scales = torch.tensor([1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5])
    batch = torch.randn(64, 8) * scales
    head(batch, batch)
    standard = head.norm(batch)
    assert torch.allclose(standard.std(0), torch.ones(8), atol=0.03)  # every dimension at one scale
    logits = head(batch[:1], batch[:1])  # a batch of one (a fraction's last images) still learns
    logits.sum().backward()
    assert head.fc.weight.grad is not None and head.training and head.norm.training
