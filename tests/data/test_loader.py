"""Shard reading: exact single pass, node/worker splits, seeded infinite training stream, --data forms."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from ssl_path.core.errors import UserError
from ssl_path.data import shard_dataset, shard_loader, shard_total, shard_urls
from ssl_path.data.loader import check_shards
from ssl_path.tiling import TilingParams, make_shards

# The domain of a tile: its crop's origin in the slide, from the file name (CMU-1_x700_y1900.png: x700_y1900).
DOMAIN_REGEX = r"_(x\d+_y\d+)\.png"


@pytest.fixture(scope="module")
def shard_dir(slide_crops, tmp_path_factory) -> Path:
    """Real tiles of three 1000 px crops of the sample slide, 128 px PNG, 40 per shard, with a domain."""
    out = tmp_path_factory.mktemp("shards") / "slide_crops"
    params = TilingParams(tile_size=128, format="png", samples_per_shard=40, min_tissue=0.0, domain_regex=DOMAIN_REGEX)
    make_shards(slide_crops, out, params, progress=False)
    return out


def _keys(samples) -> list[str]:
    return [s["key"] for s in samples]


def test_eval_pass_reads_every_sample_once_as_rgb(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    samples = list(shard_dataset(shard_dir, "eval"))
    assert len(samples) == manifest["total"] == shard_total(shard_dir) == 3 * 49
    assert len(set(_keys(samples))) == len(samples)
    image = samples[0]["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 128, 128)
    assert len({s["meta"]["source"] for s in samples}) == 3
    for sample in samples:
        assert sample["meta"]["domain"] == re.search(DOMAIN_REGEX, sample["meta"]["source"]).group(1)


def test_eval_pass_is_exact_across_workers(shard_dir):
    loader = shard_loader(shard_dir, "eval", batch_size=16, num_workers=2, collate_fn=_keys)
    keys = [k for batch in loader for k in batch]
    assert sorted(keys) == sorted(_keys(shard_dataset(shard_dir, "eval")))


def test_default_batches_stack_images_and_keep_each_meta(shard_dir):
    """Without a collate_fn, a batch of tiles whose meta has None fields (PNGs: no mpp) still forms."""
    samples = list(shard_dataset(shard_dir, "eval"))
    assert all(s["meta"]["mpp"] is None for s in samples)
    batches = list(shard_loader(shard_dir, "eval", batch_size=16))
    assert [b["image"].shape for b in batches][0] == (16, 3, 128, 128)
    assert sum(len(b["key"]) for b in batches) == len(samples)
    by_key = {s["key"]: s["meta"] for s in samples}
    assert all(meta == by_key[key] for b in batches for key, meta in zip(b["key"], b["meta"]))


def test_eval_pass_splits_shards_between_ranks(shard_dir, monkeypatch):
    everything = _keys(shard_dataset(shard_dir, "eval"))
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(_keys(shard_dataset(shard_dir, "eval")))
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)


def _take(dataset, n: int) -> list[str]:
    stream = iter(dataset)
    return [next(stream)["key"] for _ in range(n)]


def test_train_stream_is_infinite_seeded_and_shuffled(shard_dir):
    total = shard_total(shard_dir)
    first = _take(shard_dataset(shard_dir, "train", seed=1, shuffle_buffer=50), 3 * total)
    assert len(first) == 3 * total  # goes on past one pass
    assert first == _take(shard_dataset(shard_dir, "train", seed=1, shuffle_buffer=50), 3 * total)
    assert first != _take(shard_dataset(shard_dir, "train", seed=2, shuffle_buffer=50), 3 * total)
    # shuffled: consecutive samples rarely come from the same source image in tile order
    eval_order = _keys(shard_dataset(shard_dir, "eval"))
    assert first[:total] != eval_order
    # resampled with replacement: over three passes' worth, most samples appear, some more than once
    counts = Counter(first)
    assert len(counts) > total // 2 and max(counts.values()) > 1


def test_train_workers_draw_different_streams(shard_dir):
    loader = shard_loader(shard_dir, "train", batch_size=8, num_workers=2, seed=0, shuffle_buffer=20, collate_fn=_keys)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 4:
            break
    # DataLoader alternates workers: batches 0 and 1 come from different workers
    assert batches[0] != batches[1]


def test_data_forms_name_the_same_shards(shard_dir):
    urls = shard_urls(shard_dir)
    assert len(urls) == 4 and all(Path(u).is_file() for u in urls)
    assert shard_urls(shard_dir / "manifest.json") == urls
    assert shard_urls(str(shard_dir / "shard-{000000..000003}.tar")) == urls
    assert shard_urls([str(shard_dir), urls[0]]) == urls + urls[:1]
    assert shard_urls(f"{shard_dir}::{urls[1]}") == urls + urls[1:2]


@pytest.mark.parametrize(
    "data,words",
    [
        ("/no/such/shards", "no such shard"),
        ("{parent}", "has no manifest.json"),
        ("{dir}/shard-{{000100..000109}}.tar", "none of its 10 shards exists"),
    ],
)
def test_bad_data_fails_with_a_clear_message(shard_dir, data, words):
    with pytest.raises(UserError, match=words):
        shard_urls(data.format(dir=shard_dir, parent=shard_dir.parent))


def test_missing_shards_of_a_manifest_or_pattern_are_all_named_by_the_start_check(shard_dir, tmp_path):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="none of the .* shards it lists exists"):
        shard_urls(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "manifest.json").write_text(json.dumps(manifest))
    names = [s["name"] for s in manifest["shards"]]
    shutil.copy(shard_dir / names[0], partial / names[0])
    urls = shard_urls(partial)
    assert len(urls) == len(names)
    assert [(Path(s.shard).name, s.reason) for s in check_shards(urls)] == [(n, "missing") for n in names[1:]]
    pattern = shard_urls(f"{shard_dir}/shard-{{000000..000009}}.tar")
    assert len([s for s in check_shards(pattern) if s.reason == "missing"]) == 10 - len(names)
