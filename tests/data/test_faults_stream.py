"""Damaged shards on real tiles: what cannot be read is skipped, counted and named, never a traceback.

A truncated shard, a tar that is not WebDataset, JPEGs cut short inside a valid shard: the loader
keeps their places as Skips (so positions and resume stay exact), ``python -m ssl_path.pretrain``
names unreadable shards at start in one line, names each shard with a skip once, counts the skips
in metrics.jsonl and ``skipped.jsonl``, and stops in one line only when too much is unreadable.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from pretrain_helpers import REPO, TINY, model_state, pretrain_cli

from ssl_path.core.errors import UserError
from ssl_path.data.loader import SKIPPED, Skip, check_shards, shard_dataset, shard_loader
from ssl_path.encoder.checkpoint import checkpoint_path
from ssl_path.tiling import TilingParams, make_shards


@pytest.fixture(scope="module")
def clean(sample_data, tmp_path_factory) -> Path:
    """144 real 64 px JPEG tiles of 36 AMi-Br patches, in 6 shards of 24."""
    patches = sorted((sample_data / "amibr" / "patches" / "normal").glob("*.png"))[:36]
    out = tmp_path_factory.mktemp("faults") / "shards"
    make_shards(patches, out, TilingParams(tile_size=64, min_tissue=0.0, samples_per_shard=24), progress=False)
    return out


@pytest.fixture
def shards(clean, tmp_path) -> Path:
    """A copy of the clean shards that a test may damage."""
    return Path(shutil.copytree(clean, tmp_path / "shards"))


def shard(shards: Path, i: int) -> Path:
    return shards / f"shard-{i:06d}.tar"


def truncate(path: Path) -> None:
    """Cut a shard mid-member, as a full disk or a killed copy leaves it: inside the data of its middle
    member (a cut inside a header block reads as the archive's end; see the loader's known limits)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    data = path.read_bytes()
    path.write_bytes(data[: middle.offset_data + max(1, middle.size // 2)])


def corrupt_images(path: Path, n: int, damage=lambda data: data[: len(data) // 2]) -> list[str]:
    """Rewrite ``path`` with the images of its first ``n`` samples damaged; their keys."""
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    keys: list[str] = []
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            key, _, suffix = info.name.partition(".")
            if suffix in ("img.jpg", "img.png") and len(keys) < n:
                data = damage(data)
                keys.append(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return keys


def foreign_tar(path: Path) -> Path:
    """A real tar that is not WebDataset: the project's own source files, a sample each."""
    with tarfile.open(path, "w") as tar:
        for source in sorted((REPO / "ssl_path").rglob("*.py")):
            tar.add(source, arcname=str(source.relative_to(REPO)))
    return path


def truncated_tiff(tile_jpeg: bytes) -> bytes:
    """A real tile as TIFF, cut short: Pillow warns (corrupt EXIF data) and then fails."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(tile_jpeg)).save(buffer, "TIFF")
    return buffer.getvalue()[:40]


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


# ----------------------------------------------------------------------------- the loader


def test_the_start_check_names_missing_truncated_empty_and_foreign_files_and_passes_good_shards(shards, tmp_path):
    truncate(shard(shards, 1))
    (tmp_path / "empty.tar").write_bytes(b"")
    not_tar = tmp_path / "not_tar.tar"
    not_tar.write_bytes(shard(shards, 2).read_bytes()[600:9000])
    urls = [str(shard(shards, i)) for i in range(6)] + [str(tmp_path / "gone.tar"), str(tmp_path / "empty.tar")]
    bad = check_shards([*urls, str(not_tar), urls[0]])
    assert [b.shard for b in bad] == [urls[1], urls[6], urls[7], str(not_tar)]
    assert all(b.key == "" for b in bad)
    assert bad[0].reason.startswith("truncated") and bad[1].reason == "missing"
    assert "not a readable tar" in bad[2].reason and "not a readable tar" in bad[3].reason
    # A foreign tar is a good tar: what it holds is for the stream to find.
    assert check_shards([str(foreign_tar(tmp_path / "foreign.tar"))]) == []


def test_an_eval_pass_reads_every_good_sample_once_and_skips_the_rest_in_place(clean, shards, tmp_path, capfd):
    corrupt = corrupt_images(shard(shards, 0), 3)
    warned = corrupt_images(shard(shards, 3), 1, damage=truncated_tiff)
    truncate(shard(shards, 5))
    foreign = foreign_tar(tmp_path / "foreign.tar")
    urls = [str(shard(shards, i)) for i in range(6)] + [str(foreign)]
    good = {s["key"] for s in shard_dataset([str(shard(clean, i)) for i in range(5)], "eval")} - {*corrupt, *warned}

    loader = shard_loader(
        urls, "eval", batch_size=10, num_workers=2, collate_fn=lambda s: {"keys": [x["key"] for x in s]}
    )
    keys, skips = [], []
    for batch in loader:
        keys += batch.get("keys", [])
        skips += batch.get(SKIPPED, [])
    # The truncated shard gives the samples before its break, then a Skip for the rest.
    head = [k for k in keys if k not in good]
    assert sorted(keys) == sorted([*good, *head]) and len(set(keys)) == len(keys)
    in_order = [s["key"] for s in shard_dataset(shard(clean, 5), "eval")]
    assert 0 < len(head) < 24 and set(head) == set(in_order[: len(head)])
    assert all(isinstance(s, Skip) for s in skips)
    by_key = {(Path(s.shard).name, s.key): s.reason for s in skips}
    assert {k for (name, k) in by_key if name == "shard-000000.tar"} == set(corrupt)
    assert all(by_key[("shard-000000.tar", k)].startswith("cannot decode image") for k in corrupt)
    # Pillow's warning on the cut TIFF is in the reason, and not on the terminal of the workers.
    assert "not an image format Pillow reads (warned: Corrupt EXIF data" in by_key[("shard-000003.tar", warned[0])]
    assert "Warning" not in capfd.readouterr().err
    assert by_key[("shard-000005.tar", "")].startswith(f"unreadable after {len(head)} samples: ReadError")
    foreign_reasons = [r for (name, k), r in by_key.items() if name == "foreign.tar"]
    assert foreign_reasons and all(r.startswith("no image (files: ") for r in foreign_reasons)


def test_a_resumed_train_stream_skips_the_same_places(shards):
    for i in range(4):
        corrupt_images(shard(shards, i), 4)
    for i in (4, 5):
        truncate(shard(shards, i))  # not left out here: drawn, it is a Skip in a place of its own

    def batches(start: int, n: int) -> list[tuple[list[str], list[Skip]]]:
        loader = shard_loader(
            shards,
            "train",
            4,
            collate_fn=lambda s: {"keys": [x["key"] for x in s]},
            num_workers=2,
            seed=5,
            shuffle_buffer=10,
            start_batch=start,
        )
        it = iter(loader)
        return [(b.get("keys", []), b.get(SKIPPED, [])) for b in (next(it) for _ in range(n))]

    whole = batches(0, 60)
    reasons = [skip.reason for _, skips in whole for skip in skips]
    assert any(r.startswith("cannot decode image") for r in reasons)
    assert any(r.startswith("unreadable after") for r in reasons)
    assert all(len(keys) + len(skips) == 4 for keys, skips in whole)  # a skip keeps its place
    for start in (3, 17, 41):
        assert batches(start, 60 - start) == whole[start:]


def test_a_user_error_in_a_worker_process_is_raised_as_its_own_one_line(clean):
    def transform(sample):
        if sample["index"] == 5:
            raise UserError(f"tile {sample['key']} is not what this transform takes")
        return sample["key"]

    loader = shard_loader(clean, "train", 4, transform=transform, collate_fn=list, num_workers=1, seed=0)
    with pytest.raises(UserError) as caught:
        for _ in loader:
            pass
    message = str(caught.value)
    assert message.startswith("tile ") and message.endswith("is not what this transform takes")
    assert "\n" not in message and "Traceback" not in message and "worker" not in message


# ----------------------------------------------------------------------------- the pretraining stage


def pretrain(shards, out, *overrides):
    return pretrain_cli("--config", "dinov2_tiny_cpu", "--data", str(shards), "--out", str(out), *TINY, *overrides)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def listed(run_dir: Path) -> list[tuple[str, str]]:
    return [(Path(r["shard"]).name, r["key"]) for r in map(json.loads, (run_dir / "skipped.jsonl").open())]


def test_200_steps_over_a_truncated_shard_and_ten_corrupt_tiles_finish_and_report_exactly_those(shards, tmp_path):
    truncate(shard(shards, 5))
    corrupt = corrupt_images(shard(shards, 0), 6) + corrupt_images(shard(shards, 2), 4)
    run_dir = tmp_path / "run"
    result = pretrain(
        shards,
        run_dir,
        "train.epochs=50",
        "train.log_every=10",
        "train.checkpoint_every=100",
        "train.max_skipped_fraction=0.2",  # 10 of the 120 readable tiles
    )
    assert result.returncode == 0, result.stderr
    # TINY's layer scale collapses its heads (the collapse watch says so); the lines here are the data's.
    lines = [line for line in result.stderr.splitlines() if "has collapsed" not in line]
    assert lines == [line for line in warning_lines(result.stderr) if "has collapsed" not in line], result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # At start, one line naming the truncated shard, then one line for each shard with a bad tile.
    assert len(lines) == 3, lines
    assert "1 of 6 shards cannot be read" in lines[0] and "shard-000005.tar (truncated" in lines[0]
    for line, i in zip(sorted(lines[1:]), (0, 2)):
        assert line.startswith(f"warning: skipping unreadable data in {shard(shards, i)}, first sample ")
        assert ": cannot decode image (" in line
    records = metrics(run_dir)
    assert records[-1]["step"] == 200
    assert all("skipped_samples" in r and "skipped_shards" in r for r in records)
    assert (records[-1]["skipped_samples"], records[-1]["skipped_shards"]) == (10, 1)
    assert sorted(listed(run_dir)) == sorted(
        [("shard-000005.tar", "")]
        + [("shard-000000.tar", k) for k in corrupt[:6]]
        + [("shard-000002.tar", k) for k in corrupt[6:]]
    )


def test_a_resumed_run_skips_the_same_tiles_and_counts_on(shards, tmp_path):
    corrupt_images(shard(shards, 1), 12)
    settings = ["train.max_skipped_fraction=0.5", "train.checkpoint_every=4", "train.num_workers=2"]
    whole = pretrain(shards, tmp_path / "whole", *settings)
    assert whole.returncode == 0, whole.stderr
    first = pretrain(shards, tmp_path / "resumed", *settings, "--max-steps", "4")
    resumed = pretrain(shards, tmp_path / "resumed", *settings)
    assert first.returncode == resumed.returncode == 0, first.stderr + resumed.stderr

    def counts(run_dir):
        return [(r["step"], r["skipped_samples"], r["skipped_shards"]) for r in metrics(run_dir)]

    assert counts(tmp_path / "resumed") == counts(tmp_path / "whole")
    assert counts(tmp_path / "whole")[-1][1] > 0
    assert listed(tmp_path / "resumed") == listed(tmp_path / "whole")
    a, b = model_state(tmp_path / "whole"), model_state(tmp_path / "resumed")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel()) <= 1e-6


def test_a_foreign_tar_among_the_shards_stops_the_run_in_one_line_when_too_much_is_skipped(shards, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    foreign = foreign_tar(tmp_path / "elsewhere" / "foreign.tar")
    run_dir = tmp_path / "run"
    # Seed 1 draws the good shard first, then the foreign one.
    data = [str(foreign), str(shard(shards, 0))]
    result = pretrain_cli("--config", "dinov2_tiny_cpu", "--data", *data, "--out", str(run_dir), *TINY, "seed=1")
    assert result.returncode == 2, result.stderr
    *warnings, error = result.stderr.splitlines()
    assert error.startswith("error: ") and "more than train.max_skipped_fraction=0.01 allows" in error, error
    assert "Traceback" not in result.stderr
    assert len(warnings) == 1 and "foreign.tar, first sample " in warnings[0] and "no image" in warnings[0]
    assert {shard for shard, _ in listed(run_dir)} == {"foreign.tar"}


def test_no_readable_shard_is_one_line_before_anything_is_built(shards, tmp_path):
    for i in range(6):
        truncate(shard(shards, i))
    result = pretrain(shards, tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --data: none of the 6 shards")
    assert result.stderr.count("(truncated") == 6
    assert not (tmp_path / "run").exists()


def test_shards_of_nothing_but_foreign_files_stop_at_the_first_log_in_one_line(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    result = pretrain(foreign_tar(tmp_path / "elsewhere" / "foreign.tar"), tmp_path / "run")
    assert result.returncode == 2
    warning, error = result.stderr.splitlines()
    assert warning.startswith("warning: skipping unreadable data in ") and "Traceback" not in result.stderr
    assert error.startswith("error: 4 of the 4 samples drawn by step 1 were skipped as unreadable (100.0%)")
    assert not checkpoint_path(tmp_path / "run").exists()
