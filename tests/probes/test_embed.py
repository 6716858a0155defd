"""probes.embed: stratified sub-sampling, and the CLI's maps, CSV, json and one-line errors on real AMi-Br patches."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from probe_helpers import assert_one_line_error

from probes import embed
from ssl_path import encoder
from ssl_path.core.errors import run_cli

ENCODER = "timm:vit_tiny_patch16_224"
# 27 patches: 9 from two Hamamatsu XR slides, 18 from three S360 slides; both classes on each scanner.
GROUPS = "005.tiff,006.tiff,067.tiff,085.tiff,093.tiff"
N_IMAGES = 27


# ----------------------------------------------------------------------------- subsample


def test_subsample_is_stratified_seeded_bounded_and_keeps_every_class():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 3 + [3] * 1 + [-1] * 1)
    idx = embed.subsample(labels, 20, seed=0)
    assert len(idx) == 20 and np.all(np.diff(idx) > 0)  # sorted, no repeats
    counts = {v: int((labels[idx] == v).sum()) for v in (-1, 0, 1, 2, 3)}
    assert all(c >= 1 for c in counts.values())  # every label, even the single-image ones
    assert counts[0] > counts[1] > counts[2]  # shares follow the class sizes
    assert embed.subsample(labels, 20, seed=0).tolist() == idx.tolist()
    assert embed.subsample(labels, 20, seed=1).tolist() != idx.tolist()
    assert embed.subsample(labels, 500, seed=0).tolist() == list(range(len(labels)))
    for budget in (5, 6, 37, 99):
        picked = embed.subsample(labels, budget, seed=3)
        assert len(picked) == budget and set(labels[picked]) == set(labels)
    with pytest.raises(ValueError, match="cannot keep"):
        embed.subsample(labels, 4, seed=0)


def test_clamps_stay_below_the_number_of_points():
    assert embed.clamp_perplexity(30.0, 1000) == 30.0
    assert embed.clamp_perplexity(30.0, 25) == 8.0 and embed.clamp_perplexity(30.0, 2) == 1.0
    assert embed.clamp_neighbors(15, 1000) == 15 and embed.clamp_neighbors(15, 10) == 9
    assert embed.clamp_neighbors(15, 2) == 2


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def spec(sample_data: Path) -> str:
    return f"amibr:{sample_data / 'amibr'}?group={GROUPS}"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One feature cache for the module: the encoder runs once, later runs read the cache."""
    return tmp_path_factory.mktemp("feature_cache")


def cli(argv: list[str]) -> int:
    return run_cli(embed.main, argv)


def common(data: str, out: Path, cache_dir: Path) -> list[str]:
    return [
        "--ckpt",
        ENCODER,
        "--data",
        data,
        "--out",
        str(out),
        "--input-size",
        "64",
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
    ]


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_cli_tsne_writes_map_csv_and_json_and_guards_out(spec, cache_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "maps"
    argv = [*common(spec, out, cache_dir), "--methods", "tsne", "--max-points", "20", "--seed", "3"]
    assert cli(argv) == 0
    assert "Traceback" not in capsys.readouterr().err

    png = out / "tsne.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1024
    header, rows = read_rows(out / "coordinates.csv")
    assert header == ["path", "label", "domain", "group", "tsne_x", "tsne_y"]
    assert len(rows) == 20 and len({r["path"] for r in rows}) == 20
    assert all(math.isfinite(float(r["tsne_x"])) and math.isfinite(float(r["tsne_y"])) for r in rows)
    assert {r["label"] for r in rows} == {"normal", "atypical"}
    assert {r["domain"] for r in rows} == {"hamamatsu_xr", "hamamatsu_s360"}
    assert {r["group"] for r in rows} <= set(GROUPS.split(","))

    meta = json.loads((out / "embed.json").read_text())
    assert meta["encoder"]["ref"] == ENCODER and len(meta["encoder"]["hash"]) == 16
    assert meta["data"]["spec"] == spec and meta["n"] == 20 and meta["n_total"] == N_IMAGES
    assert meta["methods"] == ["tsne"] and meta["seed"] == 3
    assert meta["config"]["perplexity"] < 20 and meta["config"]["input_size"] == 64
    assert sorted(p.name for p in out.iterdir()) == ["coordinates.csv", "embed.json", "tsne.png"]

    # later runs read the cached features: no encoder may be built
    monkeypatch.setattr(encoder, "load", lambda *a, **k: pytest.fail("encoder built despite the cache"))
    # a second run into the same folder: refused, and the folder left as it was
    before = (out / "coordinates.csv").read_bytes()
    assert cli(argv) == 2
    assert_one_line_error(capsys, "already exists", "--overwrite")
    assert (out / "coordinates.csv").read_bytes() == before
    # --overwrite replaces it; same seed, same cached features: the same map
    assert cli([*argv, "--overwrite"]) == 0
    assert (out / "coordinates.csv").read_bytes() == before


def test_cli_umap_on_a_tiny_set(spec, cache_dir, tmp_path, capsys):
    # the only UMAP test (numba compiles it once per process, tens of seconds); features from the cache
    out = tmp_path / "umap"
    assert cli([*common(spec, out, cache_dir), "--methods", "umap"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert (out / "umap.png").stat().st_size > 1024 and not (out / "tsne.png").exists()
    header, rows = read_rows(out / "coordinates.csv")
    assert header == ["path", "label", "domain", "group", "umap_x", "umap_y"]
    assert len(rows) == N_IMAGES
    assert all(math.isfinite(float(r["umap_x"])) and math.isfinite(float(r["umap_y"])) for r in rows)
    meta = json.loads((out / "embed.json").read_text())
    assert meta["methods"] == ["umap"] and meta["config"]["neighbors"] == 15 and meta["config"]["perplexity"] is None


def test_cli_bad_inputs_are_one_line_errors(spec, sample_data, tmp_path, capsys, monkeypatch):
    # none of these may get as far as building an encoder
    monkeypatch.setattr(encoder, "load", lambda *a, **k: pytest.fail("encoder built for a bad input"))
    cache = tmp_path / "cache"

    assert cli(common(f"amibr:{tmp_path / 'nowhere'}", tmp_path / "a", cache)) == 2
    assert_one_line_error(capsys, "nowhere")

    assert cli([*common(spec, tmp_path / "b", cache), "--max-points", "9"]) == 2
    assert_one_line_error(capsys, "--max-points", ">= 10")

    assert cli([*common(spec, tmp_path / "c", cache), "--methods", "tsne", "pca"]) == 2
    assert_one_line_error(capsys, "'pca'", "tsne, umap")

    few = f"amibr:{sample_data / 'amibr'}?group=011.tiff"  # 3 patches
    assert cli(common(few, tmp_path / "d", cache)) == 2
    assert_one_line_error(capsys, "3 images", "at least 5")

    assert cli([*common(spec, tmp_path / "e", cache), "--perplexity", "0"]) == 2
    assert_one_line_error(capsys, "--perplexity")
    # nothing was created for any of them
    assert not any((tmp_path / name).exists() for name in "abcde")
