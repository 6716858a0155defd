"""The segmentation head: targets from mask values, sliding windows, bad masks in one line, and the
command end to end on real WBC images (train, select, score, --eval, predict)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from finetune_helpers import TINY_KWARGS, assert_one_line_error, small_wbc, tiny_checkpoint, tiny_vit
from PIL import Image

from finetune import predict, segment
from finetune.config import EncoderTuning
from finetune.segment import SegmentConfig, label_masks, mask_values, predict_probs
from finetune.task import HeadTask
from ssl_path.core.errors import run_cli
from ssl_path.data.masks import read_mask
from ssl_path.encoder import load
from ssl_path.evaluation.results import read_results

WBC = SegmentConfig(labels={"cell": [128, 255], "nucleus": [255]}, crop=32, decoder_channels=(16, 8), stem_channels=8)


def seg_task(cfg: SegmentConfig = WBC) -> HeadTask:
    torch.manual_seed(0)
    vit, info = tiny_vit()
    head, loss = segment.build(cfg, info, None)  # a segmentation head needs no set to be built
    return HeadTask("segment", vit, info, TINY_KWARGS, head, loss, EncoderTuning()).eval()


def test_wbc_mask_values_become_overlapping_labels_and_back(shared_data):
    mask = read_mask(shared_data / "wbc_seg" / "Dataset 1" / "001.png")
    labels = label_masks(mask, WBC)
    assert labels.shape == (2, *mask.shape)
    np.testing.assert_array_equal(labels[0], mask > 0)  # whole cell = cytoplasm + nucleus
    np.testing.assert_array_equal(labels[1], mask == 255)
    np.testing.assert_array_equal(mask_values(labels, WBC), mask)
    # A nucleus predicted outside any cell still reads as nucleus.
    odd = np.zeros_like(labels)
    odd[1, :4, :4] = True
    assert set(np.unique(mask_values(odd, WBC)).tolist()) == {0, 255}


def test_overlapping_labels_learn_with_dice_plus_binary_cross_entropy():
    """Dice + BCE on independent sigmoids: a pixel that is cell and nucleus pulls both logits up (a
    softmax cross-entropy over the two channels would hold them at one half each)."""
    from monai.losses import DiceLoss

    _, loss = segment.build(WBC, tiny_vit()[1], None)
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    target = torch.ones(1, 2, 4, 4)
    value = loss(logits, target)
    expected = DiceLoss(sigmoid=True)(logits, target) + torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target
    )
    torch.testing.assert_close(value, expected)
    value.backward()
    assert (logits.grad < 0).all()  # descent raises both channels' logits


def test_sliding_windows_of_a_tiled_image_equal_the_window_alone():
    task = seg_task()
    window = torch.randn(3, 32, 32)
    tiled = window.repeat(1, 2, 2)  # [3, 64, 64]: four copies of the window
    with torch.no_grad():
        alone = torch.sigmoid(task.logits(window[None]))[0]
    cfg = SegmentConfig(**{**WBC.__dict__, "window_overlap": 0.0})
    probs = predict_probs(task, tiled, cfg, mode="constant")
    torch.testing.assert_close(probs, alone.repeat(1, 2, 2), atol=1e-5, rtol=1e-4)
    # An image the size of one window is the window itself, whatever the overlap.
    torch.testing.assert_close(predict_probs(task, window, WBC), alone, atol=1e-5, rtol=1e-4)


def test_images_smaller_than_the_window_keep_their_size():
    probs = predict_probs(seg_task(), torch.randn(3, 20, 27), WBC)
    assert probs.shape == (2, 20, 27)


@pytest.fixture
def monuseg_like(shared_data, tmp_path):
    """Two MoNuSeg images with their masks in a folder the monuseg reader reads (images/ + masks/)."""
    source = shared_data / "monuseg_kumar_norm"
    for name in ("images", "masks"):
        (tmp_path / "set" / name).mkdir(parents=True)
    for path in sorted((source / "NormalizedPNG").glob("*.png"))[:2]:
        shutil.copy(path, tmp_path / "set" / "images" / path.name)
        shutil.copy(source / "GroundTruthInside" / path.name, tmp_path / "set" / "masks" / path.name)
    return tmp_path / "set"


def test_bad_masks_fail_in_one_line(monuseg_like, tmp_path, capsys):
    mask = next((monuseg_like / "masks").iterdir())
    base = ["--ckpt", "timm:vit_tiny_patch16_224", "--train", f"monuseg:{monuseg_like}", "--out", str(tmp_path / "r")]
    values = np.array(Image.open(mask))
    values[:3, :3] = 7
    Image.fromarray(values).save(mask)
    assert run_cli(segment.main, [*base, "segment.labels={nucleus: [255]}"]) == 2
    assert_one_line_error(capsys, "value(s) [7]", mask.name)
    assert run_cli(segment.main, [*base, "segment.labels={nucleus: [255]}", "segment.overlays=-1"]) == 2
    assert_one_line_error(capsys, "overlays >= 0")
    Image.fromarray(values[:500]).save(mask)
    assert run_cli(segment.main, [*base, "segment.labels={nucleus: [255]}", "segment.background=[0, 7]"]) == 2
    assert_one_line_error(capsys, "1000x500 px", "1000x1000")
    assert not (tmp_path / "r").exists()


def test_segment_trains_selects_scores_and_predicts_on_wbc(shared_data, tmp_path, capsys):
    data = small_wbc(shared_data, tmp_path / "wbc", n=20)
    broken = data / "Dataset 1" / "007.bmp"
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated image: skipped and counted, not fatal
    ref = tiny_checkpoint(tmp_path / "tiny.pt")
    run = tmp_path / "run"
    argv = [
        "--ckpt", str(ref), "--train", f"wbc_seg:{data}", "--out", str(run), "--no-progress", "--mode", "last-1",
        "segment.crop=64", "segment.decoder_channels=[16, 8]", "segment.stem_channels=8", "segment.overlays=2",
        "train.batch_size=4", "train.epochs=2", "train.num_workers=0", "select.val_every=1", "optim.lr=0.01",
        "train.max_skipped_fraction=0.5",
    ]  # fmt: skip
    assert run_cli(segment.main, argv) == 0
    results = read_results(run / "results.json")
    assert results["task"] == "segmentation" and results["dataset"]["classes"] == ["cell", "nucleus"]
    assert results["split"]["method"] == "group"
    assert results["dataset"]["n_skipped"] == 1 and results["dataset"]["skipped"][0]["path"] == str(broken)
    n_test = results["dataset"]["n_test"]
    assert n_test in (3, 4)  # 4 test images, less the broken one if it is among them
    for label in ("cell", "nucleus"):
        row = results["metrics"][label]
        assert 0 <= row["dice"] <= 1 and row["n"] == n_test
    validations = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validations] == [3, 6]  # 12 training images, batches of 4, 2 epochs
    selection = json.loads((run / "selection.json").read_text())
    assert selection["validation"]["dice"] == max(v["dice"] for v in validations)
    assert set(selection["postprocess"]) == {"cell", "nucleus"}
    assert len(list((run / "overlays").glob("test_*.png"))) == 2
    assert (run / "loss.png").is_file() and (run / "validation.png").is_file()
    # The selected encoder loads as a ref; the first three blocks are the tiny ViT's, the last learnt.
    encoder, info = load(run / "checkpoints" / "best.pt")
    tiny, _ = load(ref)
    assert info.num_blocks == 4
    torch.testing.assert_close(encoder.blocks[0].attn.qkv.weight, tiny.blocks[0].attn.qkv.weight)
    assert not torch.equal(encoder.blocks[3].attn.qkv.weight, tiny.blocks[3].attn.qkv.weight)

    # A finished run is never trained again over itself.
    capsys.readouterr()
    assert run_cli(segment.main, argv) == 2
    assert_one_line_error(capsys, "finished run")

    scored = tmp_path / "scored.json"
    assert run_cli(segment.main, ["--eval", str(run), "--test", f"wbc_seg:{data}", "--out", str(scored)]) == 0
    rescored = read_results(scored)["metrics"]
    assert rescored["cell"]["n"] == 19 and read_results(scored)["dataset"]["n_skipped"] == 1

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((data / "Dataset 1").glob("*.bmp"))[:3]:  # 001-003, all readable
        shutil.copy(path, images)
    masks = tmp_path / "masks"
    shutil.copy(data / "Dataset 1" / "001.png", images / "001.png")  # two images named 001: refused
    capsys.readouterr()
    assert run_cli(predict.main, ["--run", str(run), "--data", str(images), "--out", str(masks)]) == 2
    assert_one_line_error(capsys, "named 001.*")
    (images / "001.png").unlink()
    assert run_cli(predict.main, ["--run", str(run), "--data", str(images), "--out", str(masks)]) == 0
    written = sorted(masks.glob("*.png"))
    assert [p.stem for p in written] == [p.stem for p in sorted(images.glob("*.bmp"))]
    mask = np.array(Image.open(written[0]))
    assert mask.shape == (120, 120) and set(np.unique(mask).tolist()) <= {0, 128, 255}


def test_refused_test_scores_leave_no_figures_and_a_repaired_set_is_scored(shared_data, tmp_path, capsys):
    train = small_wbc(shared_data, tmp_path / "train", n=8)
    test = small_wbc(shared_data, tmp_path / "test", n=4)
    broken = test / "Dataset 1" / "002.bmp"
    whole = broken.read_bytes()
    broken.write_bytes(whole[:200])
    run = tmp_path / "run"
    argv = [
        "--ckpt", str(tiny_checkpoint(tmp_path / "tiny.pt")), "--train", f"wbc_seg:{train}",
        "--test", f"wbc_seg:{test}", "--out", str(run), "--no-progress", "segment.crop=64",
        "segment.decoder_channels=[16, 8]", "segment.stem_channels=8", "segment.overlays=4", "train.batch_size=4",
        "train.epochs=1", "train.num_workers=0", "optim.lr=0.01", "train.max_skipped_fraction=0",
    ]  # fmt: skip
    assert run_cli(segment.main, argv) == 2
    assert_one_line_error(capsys, "1 of 4 test images cannot be read", "repair them")
    assert not (run / "overlays").exists() and not (run / "results.json").exists()
    broken.write_bytes(whole)
    stale = run / "overlays" / "test_gone.png"  # of an image since taken out of the set
    stale.parent.mkdir()
    stale.write_bytes(b"")
    assert run_cli(segment.main, argv) == 0
    assert read_results(run / "results.json")["dataset"]["n_skipped"] == 0
    assert sorted(p.name for p in (run / "overlays").iterdir()) == [f"test_{i:03d}.png" for i in range(1, 5)]


def test_glas_layout_scores_glands_by_their_mask_ids(shared_data, tmp_path, capsys):
    """A GlaS-layout set (train_N / testA_N / testB_N with instance masks and Grade.csv) made from
    MoNuSeg crops, whose nuclei stand in for glands: the named split gives two test sets, each scored
    per object against the stored ids; a refused second test set leaves no figures of the first."""
    from skimage.measure import label

    source = shared_data / "monuseg_kumar_norm"
    root = tmp_path / "glas"
    root.mkdir()
    rows = ["name,patient ID,grade (GlaS),grade (Sirinukunwattana et al. 2015)"]
    names = [f"train_{i}" for i in range(1, 7)] + ["testA_1", "testB_1"]
    for k, (name, path) in enumerate(zip(names, sorted((source / "NormalizedPNG").glob("*.png")))):
        image = Image.open(path).convert("RGB").crop((0, 0, 96, 64))
        mask = np.array(Image.open(source / "GroundTruthInside" / path.name))[:64, :96] > 0
        image.save(root / f"{name}.bmp")
        Image.fromarray(label(mask).astype(np.uint8)).save(root / f"{name}_anno.bmp")
        rows.append(f"{name},{k},{'benign' if k % 2 else 'malignant'},healthy")
    (root / "Grade.csv").write_text("\n".join(rows) + "\n")
    argv = ["--ckpt", str(tiny_checkpoint(tmp_path / "tiny.pt")), "--train", f"glas:{root}", "--config",
            "segment_glas", "--out", str(tmp_path / "run"), "--no-progress", "segment.crop=32",
            "segment.decoder_channels=[8, 8]", "segment.stem_channels=8", "segment.overlays=1", "train.batch_size=4",
            "train.epochs=1", "train.num_workers=0", "select.val_every=1"]  # fmt: skip
    # the second test set refused after the first drew its overlays: none may pass for the run's
    broken = root / "testB_1.bmp"
    whole = broken.read_bytes()
    broken.write_bytes(whole[:200])
    assert run_cli(segment.main, argv) == 2
    assert_one_line_error(capsys, "glas/testB: no readable image to score, of 1", f"first {broken}: ")
    assert not (tmp_path / "run" / "overlays").exists() and not (tmp_path / "run" / "results.json").exists()
    broken.write_bytes(whole)
    assert run_cli(segment.main, argv) == 0
    results = read_results(tmp_path / "run" / "results.json")
    assert results["split"]["method"] == "named" and results["dataset"]["tests"] == {"testA": 1, "testB": 1}
    assert set(results["metrics"]) == {"testA/gland", "testB/gland"}
    for row in results["metrics"].values():
        assert 0 <= row["object_dice"] <= 1 and 0 <= row["object_f1"] <= 1 and 0 <= row["aji"] <= 1
    assert len(list((tmp_path / "run" / "overlays").glob("*.png"))) == 2  # one per test set


def test_a_head_that_does_not_fit_the_encoder_is_one_line(shared_data, tmp_path, capsys):
    data = small_wbc(shared_data, tmp_path / "wbc", n=8)
    base = ["--ckpt", str(tiny_checkpoint(tmp_path / "tiny.pt")), "--train", f"wbc_seg:{data}", "--out",
            str(tmp_path / "r")]  # fmt: skip
    assert run_cli(segment.main, [*base, "segment.blocks=[1, 9]", "segment.decoder_channels=[8, 8]"]) == 2
    assert_one_line_error(capsys, "has blocks 0..3")
    assert run_cli(segment.main, [*base, "segment.crop=40"]) == 2
    assert_one_line_error(capsys, "not a multiple of the patch size 16")
    assert (
        run_cli(segment.main, [*base, "segment.labels={cell: [128, 255], nucleus: [255]}", "segment.multilabel=false"])
        == 2
    )
    assert_one_line_error(capsys, "labels share mask values")
    assert not (tmp_path / "r").exists()
