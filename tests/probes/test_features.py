"""Feature extraction and its cache, on real AMi-Br patches with a tiny random-init ViT at 64 px."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probes import features as F
from ssl_path import encoder
from ssl_path.core.errors import UserError
from ssl_path.data.readers import LabelledSet, Record, read_spec
from ssl_path.encoder.identity import encoder_identity

REF = "timm:vit_tiny_patch16_224"
REPO = Path(__file__).resolve().parents[2]
SIZE = 64


@pytest.fixture(scope="module")
def eight(sample_data) -> LabelledSet:
    """Four normal and four atypical real patches."""
    full = read_spec(f"amibr:{sample_data / 'amibr'}")
    targets = np.asarray(full.targets())
    picks = [*np.flatnonzero(targets == 0)[:4], *np.flatnonzero(targets == 1)[:4]]
    return full.select(int(i) for i in picks)


def extract(data, cache_dir, **kwargs):
    return F.extract_features(REF, data, input_size=SIZE, cache_dir=cache_dir, progress=False, **kwargs)


def _no_build(*args, **kwargs):
    raise AssertionError("the encoder was built although the features are cached")


def test_pools_give_the_expected_shapes_and_parts(eight, tmp_path):
    cls = extract(eight, tmp_path, pool="cls")
    both = extract(eight, tmp_path, pool="cls+mean")
    mean = extract(eight, tmp_path, pool="mean")
    assert cls.features.shape == (8, 192) and cls.features.dtype == np.float32
    assert both.features.shape == (8, 384)
    np.testing.assert_allclose(both.features[:, :192], cls.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both.features[:, 192:], mean.features, rtol=1e-5, atol=1e-6)
    assert not np.allclose(cls.features, mean.features)
    assert cls.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and cls.classes == ("normal", "atypical")
    assert cls.paths == [r.path for r in eight] and cls.groups == [r.group for r in eight]
    assert cls.domains == [r.domain for r in eight] and cls.input_size == SIZE
    assert cls.encoder_hash == both.encoder_hash and cls.data_hash == both.data_hash
    # one .npy + .json pair per pool
    assert len(list(tmp_path.glob("*.npy"))) == 3 and len(list(tmp_path.glob("*.json"))) == 3


def test_cache_is_reused_without_building_the_model(eight, tmp_path, monkeypatch):
    first = extract(eight, tmp_path)
    (meta_file,) = tmp_path.glob("*.json")
    meta = json.loads(meta_file.read_text())
    assert meta["pool"] == "cls" and meta["shape"] == [8, 192] and meta["paths"] == first.paths
    monkeypatch.setattr(encoder, "load", _no_build)
    again = extract(eight, tmp_path)
    np.testing.assert_array_equal(again.features, first.features)
    assert again.input_size == SIZE and again.labels.tolist() == first.labels.tolist()
    # a different pool, TTA or size is another entry, so it must build the model
    for kwargs in ({"pool": "mean"}, {"tta": True}):
        with pytest.raises(AssertionError, match="encoder was built"):
            extract(eight, tmp_path, **kwargs)


def test_cache_key_covers_the_transform_and_the_hub_revision(monkeypatch):
    identity, data = "hf-hub:org/encoder", "d" * 64
    base = F.cache_key(identity, "cls", False, F.transform_settings(None), data, revision="a" * 40)
    assert F.cache_key(identity, "cls", False, F.transform_settings(None), data, revision="a" * 40) == base
    changed = [
        F.cache_key(identity, "cls", False, F.transform_settings(None), data, revision="b" * 40),
        F.cache_key(identity, "cls", False, F.transform_settings(None), data, revision=None),
        F.cache_key(identity, "cls", False, F.transform_settings(224), data, revision="a" * 40),
        F.cache_key(identity, "cls", True, F.transform_settings(None), data, revision="a" * 40),
        F.cache_key(identity, "mean", False, F.transform_settings(None), data, revision="a" * 40),
    ]
    assert len({base, *changed}) == 6
    # the transform's own settings are read off it: another crop or interpolation is another key
    settings = F.transform_settings(64)
    assert settings["crop_pct"] == 1.0 and settings["interpolation"] == "bicubic" and settings["input_size"] == 64
    for override in ({"crop_pct": 0.875}, {"interpolation": "bilinear"}):
        real = F.eval_transform
        monkeypatch.setattr(F, "eval_transform", lambda *a, **k: dataclasses.replace(real(*a, **k), **override))
        assert F.transform_settings(64) != settings
        monkeypatch.setattr(F, "eval_transform", real)


def test_hub_revision_is_read_from_the_local_cache_only(tmp_path):
    # huggingface_hub's cache layout: refs/main names the commit whose snapshot holds the files
    repo = tmp_path / "models--org--encoder"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert F.hub_revision("hf-hub:org/encoder", tmp_path) == commit
    assert F.hub_revision(f"hf-hub:org/encoder@{commit}", tmp_path) == commit
    # not cached: the ref's own revision, else nothing known yet
    assert F.hub_revision("hf-hub:org/other@v1.0", tmp_path) == "v1.0"
    assert F.hub_revision("hf-hub:org/other", tmp_path) is None


def test_changed_image_misses_the_cache(eight, tmp_path):
    copies = tmp_path / "imgs"
    copies.mkdir()
    records = []
    for i, record in enumerate(eight.records[:3]):
        target = copies / f"{i}.png"
        shutil.copy(record.path, target)
        records.append(Record(path=str(target), label=record.label))
    data = LabelledSet(records, eight.classes, name="copies", source="test")
    before = F.data_fingerprint([r.path for r in records])
    stat = os.stat(records[1].path)
    os.utime(records[1].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert F.data_fingerprint([r.path for r in records]) != before
    assert F.data_fingerprint([r.path for r in records[::-1]]) != F.data_fingerprint([r.path for r in records])
    assert extract(data, tmp_path / "cache").features.shape == (3, 192)


def test_tta_changes_features_and_is_rotation_invariant(eight, tmp_path):
    four = eight.select([0, 1, 4, 5])
    plain = extract(four, None)
    tta = extract(four, None, tta=True)
    assert tta.features.shape == plain.features.shape
    assert not np.allclose(tta.features, plain.features, atol=1e-3)
    # A rotated or mirrored copy of a tile has the same 8 views, hence the same TTA features. The tiles
    # are made 64 px first: resizing uint8 rounds between its two passes, so it does not commute with rot90.
    records = []
    for i, record in enumerate(eight.records[:1]):
        with Image.open(record.path) as tile:
            image = tile.convert("RGB").resize((SIZE, SIZE))
        for j, op in enumerate((None, Image.Transpose.ROTATE_90, Image.Transpose.FLIP_TOP_BOTTOM)):
            target = tmp_path / f"{i}_{j}.png"
            (image if op is None else image.transpose(op)).save(target)
            records.append(Record(path=str(target), label=record.label))
    small = LabelledSet(records, eight.classes, name="turned", source="test")
    turned = extract(small, None, tta=True).features
    np.testing.assert_allclose(turned[1:], turned[[0, 0]], rtol=1e-4, atol=1e-4)
    # ...while without TTA they differ
    untouched = extract(small, None).features
    assert not np.allclose(untouched[1:], untouched[[0, 0]], atol=1e-2)


def test_dihedral_views_are_the_eight_distinct_symmetries():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = F.dihedral_views(x)
    assert len(views) == 8
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_random_init_is_reproducible_and_leaves_the_global_rng_alone(eight, tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    some = eight.select([0, 4])
    a = extract(some, tmp_path / "a")
    assert torch.equal(torch.rand(3), expected_draw)
    b = extract(some, tmp_path / "b")
    np.testing.assert_array_equal(a.features, b.features)
    assert a.encoder_hash == b.encoder_hash


def test_file_ref_identity_is_the_weights_sha256(tmp_path):
    weights = tmp_path / "run" / "checkpoints" / "last.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(os.urandom(3 * (1 << 20) + 5))  # more than one read chunk
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert encoder_identity(str(weights), tmp_path / "cache") == f"file|{digest}"
    assert encoder_identity(str(tmp_path / "run")) == f"file|{digest}"  # a run dir means its last.pt
    assert len(list((tmp_path / "cache" / "digests").glob("*.txt"))) == 1
    weights.write_bytes(b"other weights")
    assert encoder_identity(str(weights)) == f"file|{hashlib.sha256(b'other weights').hexdigest()}"
    timm_id = encoder_identity(REF)
    assert timm_id.startswith(REF) and "timm=" in timm_id
    with pytest.raises(UserError, match="not a file, folder"):
        encoder_identity(str(tmp_path / "nothing.pt"))


def test_cnn_encoders_pool_their_map(eight):
    some = eight.select(range(2))
    out = F.extract_features("timm:resnet18", some, pool="mean", input_size=SIZE, cache_dir=None, progress=False)
    assert out.features.shape == (2, 512)
    with pytest.raises(UserError, match="class token"):
        F.extract_features("timm:resnet18", some, pool="cls", input_size=SIZE, cache_dir=None, progress=False)


def test_bad_inputs_are_user_errors(eight, tmp_path):
    with pytest.raises(UserError, match="unknown pool"):
        extract(eight, None, pool="max")
    missing = LabelledSet([Record(path=str(tmp_path / "gone.png"), label="normal")], eight.classes, "x", "x")
    with pytest.raises(UserError, match="image not found"):
        extract(missing, None)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = LabelledSet([Record(path=str(broken), label="normal")], eight.classes, "x", "x")
    with pytest.raises(UserError, match="broken.png"):
        extract(bad, None)


def _with_unreadable(data: LabelledSet, folder, position: int) -> tuple[LabelledSet, str]:
    """``data`` with a truncated TIFF, which Pillow warns about and cannot decode, at ``position``."""
    folder.mkdir(parents=True, exist_ok=True)
    cut = folder / "cut.tif"
    buffer = io.BytesIO()
    Image.open(data.records[0].path).convert("RGB").save(buffer, "TIFF")
    cut.write_bytes(buffer.getvalue()[:40])
    records = list(data.records)
    records.insert(position, Record(path=str(cut), label=records[position].label))
    return LabelledSet(records, data.classes, name="with-a-cut-tiff", source="test"), str(cut)


def test_an_unreadable_image_is_left_out_named_once_and_cached(eight, tmp_path, capfd, monkeypatch):
    data, cut = _with_unreadable(eight, tmp_path / "images", position=5)
    out = extract(data, tmp_path / "cache", max_skipped_fraction=0.2)
    err = capfd.readouterr().err
    # The rows are those of the eight readable images, in order; the cut one is named with its reason.
    np.testing.assert_allclose(out.features, extract(eight, None).features, rtol=1e-5, atol=1e-6)
    assert out.paths == [r.path for r in eight] and out.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    [(path, reason)] = out.skipped
    assert path == cut and reason.startswith("cannot decode image") and "(warned: " in reason
    assert err.count("\n") == 1 and err.startswith("warning: with-a-cut-tiff: 1 of 9 images cannot be read")
    assert "Warning" not in err  # Pillow's warning went into the reason
    # Records 5 (the cut one) and 6 map to row 5 alone; a selection keeps the skips and the mapping.
    assert out.rows_of([4, 5, 6]).tolist() == [4, 5]
    picked = out.select(out.rows_of([6, 8]))
    assert picked.paths == [eight.records[5].path, eight.records[7].path] and picked.skipped == out.skipped
    assert picked.rows_of([6]).tolist() == [0]

    monkeypatch.setattr(encoder, "load", _no_build)
    again = extract(data, tmp_path / "cache", max_skipped_fraction=0.2)
    np.testing.assert_array_equal(again.features, out.features)
    assert again.skipped == out.skipped and again.paths == out.paths
    assert capfd.readouterr().err.startswith("warning: with-a-cut-tiff: 1 of 9")
    with pytest.raises(UserError, match=r"1 of 9 images cannot be read, more than 1.0% of them; first .*cut.tif"):
        extract(data, tmp_path / "cache")


def test_a_probe_leaves_out_an_unreadable_image_and_counts_it_in_its_results(sample_data, tmp_path):
    """A real knn run on 100 patches and a cut TIFF: 1 % may be unreadable, so it runs and says so."""
    root = tmp_path / "set"
    for label in ("atypical", "normal"):
        (root / label).mkdir(parents=True)
        for path in sorted((sample_data / "amibr" / "patches" / label).glob("*.png"))[:50]:
            shutil.copy(path, root / label / path.name)
    data = read_spec(f"folder:{root}")
    _, cut = _with_unreadable(data, root / "normal", position=0)
    out = tmp_path / "knn.json"
    args = ["--ckpt", REF, "--train", f"folder:{root}", "--test", f"folder:{root}", "--input-size", "32"]
    cmd = [sys.executable, "-m", "probes.knn", *args, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    result = subprocess.run([*cmd, "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert warning_count(result.stderr) == 2 and "Traceback" not in result.stderr  # train, then test
    assert "Warning" not in result.stderr
    dataset = json.loads(out.read_text())["dataset"]
    assert (dataset["n_train"], dataset["n_test"], dataset["n_skipped"]) == (100, 100, 1)
    [skipped] = dataset["skipped"]
    assert skipped["path"] == cut and skipped["reason"].startswith("cannot decode image")


def warning_count(stderr: str) -> int:
    return sum(
        line.startswith("warning: ") and "cannot be read and are left out" in line for line in stderr.splitlines()
    )
