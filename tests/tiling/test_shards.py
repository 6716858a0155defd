"""``python -m ssl_path.shards`` on real images, all from data/sample: the Aperio .svs, 1000 px PNG crops of it
(fixture ``slide_crops``), one more resampled to 40x and a pyramidal TIFF made from that."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import webdataset as wds
from PIL import Image
from sample_helpers import sample_slide_region

from ssl_path.core.errors import UserError, run_cli
from ssl_path.data.manifest import FORMAT, MANIFEST
from ssl_path.shards import main
from ssl_path.tiling import CHUNK, TilingParams, make_shards


@pytest.fixture(scope="module")
def crops(slide_crops: list[Path]) -> list[Path]:
    """``CMU-1_x700_y1900.png``, ``CMU-1_x800_y1900.png``, ``CMU-1_x700_y1800.png``: tissue in every tile."""
    return slide_crops


def read_samples(out: Path) -> list[dict[str, Any]]:
    """Every sample of every shard listed in the manifest, in order, json decoded."""
    manifest = json.loads((out / MANIFEST).read_text())
    urls = [str(out / shard["name"]) for shard in manifest["shards"]]
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample["meta"] = json.loads(sample["json"])
        samples.append(sample)
    return samples


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


# ----------------------------------------------------------------------------- core output


def test_png_crops_and_svs_round_trip(tmp_path: Path, crops: list[Path], sample_slide: Path) -> None:
    out = tmp_path / "shards"
    params = TilingParams(format="png", samples_per_shard=10, stride=192)
    manifest = make_shards([*map(str, crops), str(sample_slide)], out, params, progress=False)

    assert manifest["format"] == FORMAT
    assert json.loads((out / MANIFEST).read_text()) == manifest
    samples = read_samples(out)
    assert len(samples) == manifest["total"] > 0
    assert [s["count"] for s in manifest["shards"]][:-1] == [10] * (len(manifest["shards"]) - 1)
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            assert len(tar.getnames()) == 2 * shard["count"]  # img.png + json per sample
    assert not [p.name for p in out.iterdir() if p.name != MANIFEST and not p.name.startswith("shard-")]
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and all("." not in k and "/" not in k for k in keys)

    # The crops: 1000 px at stride 192 gives 4 x 4 origins (0..576); every tile is tissue.
    by_source = {s["path"]: s for s in manifest["sources"]}
    for path in crops:
        assert by_source[str(path)]["tiles"] == 16
        metas = [s["meta"] for s in samples if s["meta"]["source"] == str(path)]
        assert sorted({m["x"] for m in metas}) == [0, 192, 384, 576]
        assert all(m["y"] % 192 == 0 and m["y"] + 256 <= 1000 for m in metas)
        assert all(m["level"] == 0 and m["mpp"] is None and m["downsample"] == 1 for m in metas)
    # The svs: 0.499 µm/px, only tiles that are at least half tissue.
    svs_metas = [s["meta"] for s in samples if s["meta"]["source"] == str(sample_slide)]
    assert 0 < len(svs_metas) < 14 * 10  # a grid of 10 x 14 origins on 2220 x 2967
    assert all(m["tissue_fraction"] >= 0.5 and m["mpp"] == pytest.approx(0.499) for m in svs_metas)
    assert all(m["x"] % 192 == 0 and m["x"] + 256 <= 2220 and m["y"] + 256 <= 2967 for m in svs_metas)

    # Tile pixels are the source region, exactly (PNG).
    png_sample = next(s for s in samples if s["meta"]["source"] == str(crops[1]) and s["meta"]["x"] == 384)
    m = png_sample["meta"]
    source = np.asarray(Image.open(crops[1]).convert("RGB"))
    np.testing.assert_array_equal(decode(png_sample["img.png"]), source[m["y"] : m["y"] + 256, m["x"] : m["x"] + 256])
    svs_sample = samples[-1]
    m = svs_sample["meta"]
    np.testing.assert_array_equal(decode(svs_sample["img.png"]), sample_slide_region(m["x"], m["y"], 256))
    assert set(m) >= {"source", "x", "y", "level", "mpp", "downsample", "tile_size", "tissue_fraction", "domain"}


@pytest.fixture(scope="module")
def crop_40x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1000 px of the slide's tissue at 0.25 µm/px, as MoNuSeg and 40x scans are: its 500 px square at (1000, 775)
    (0.5 µm/px) resampled. The slide's own pixels hold twice the detail, which JPEG keeps less well."""
    path = tmp_path_factory.mktemp("crop_40x") / "CMU-1_x1000_y775_40x.png"
    Image.fromarray(sample_slide_region(1000, 775, 500)).resize((1000, 1000), Image.LANCZOS).save(path)
    return path


def test_jpeg_tiles_are_close_to_source(tmp_path: Path, crop_40x: Path) -> None:
    manifest = make_shards([crop_40x], tmp_path / "o", TilingParams(quality=95), progress=False)
    assert manifest["total"] == 9 and manifest["params"]["format"] == "jpg"
    sample = read_samples(tmp_path / "o")[4]
    m = sample["meta"]
    source = np.asarray(Image.open(crop_40x).convert("RGB")).astype(int)
    region = source[m["y"] : m["y"] + 256, m["x"] : m["x"] + 256]
    tile = decode(sample["img.jpg"]).astype(int)
    assert np.abs(tile - region).mean() < 4
    # And closer than quality 90 would be, whatever the image's detail.
    at_90 = io.BytesIO()
    Image.fromarray(region.astype(np.uint8)).save(at_90, format="JPEG", quality=90)
    assert np.abs(tile - region).mean() < np.abs(decode(at_90.getvalue()).astype(int) - region).mean()


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory, crop_40x: Path) -> Path:
    """A MIDOG-like 40x TIFF: 4096 px at 0.25 µm/px, levels at 0.5 and 1.0 µm/px in SubIFDs, JPEG tiles;
    its image is the 40x crop mirrored about its edges, so tissue throughout."""
    rgb = np.asarray(Image.open(crop_40x).convert("RGB"))
    row = np.concatenate([rgb, rgb[:, ::-1]], axis=1)
    full = np.ascontiguousarray(np.tile(np.concatenate([row, row[::-1]], axis=0), (3, 3, 1))[:4096, :4096])
    path = tmp_path_factory.mktemp("midog") / "slide_40x.tiff"
    options = dict(tile=(256, 256), photometric="rgb", compression="jpeg", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(full, subifds=2, resolution=(1e4 / 0.25, 1e4 / 0.25), **options)
        for factor in (2, 4):
            mpp = 0.25 * factor
            tif.write(full[::factor, ::factor], subfiletype=1, resolution=(1e4 / mpp, 1e4 / mpp), **options)
    return path


def test_pyramidal_tiff_at_half_micron_uses_level_one(tmp_path: Path, pyramid: Path) -> None:
    manifest = make_shards([pyramid], tmp_path / "o", TilingParams(mpp=0.5, format="png"), progress=False)
    samples = read_samples(tmp_path / "o")
    # Level 1 is 2048 px: an 8 x 8 grid of 256 px tiles, 512 level-0 px apart.
    assert manifest["total"] == len(samples) == 64
    assert sorted({(s["meta"]["x"], s["meta"]["y"]) for s in samples}) == [
        (512 * i, 512 * j) for i in range(8) for j in range(8)
    ]
    assert {(s["meta"]["level"], s["meta"]["downsample"], s["meta"]["mpp"]) for s in samples} == {(1, 2.0, 0.5)}
    level1 = tifffile.imread(pyramid, level=1)
    m = samples[10]["meta"]
    y, x = m["y"] // 2, m["x"] // 2
    np.testing.assert_array_equal(decode(samples[10]["img.png"]), level1[y : y + 256, x : x + 256])


def test_pyramidal_tiff_between_levels_is_resized(tmp_path: Path, pyramid: Path) -> None:
    """0.6 µm/px: read 307 px from the 0.5 µm/px level and resize; 1706 px wide at 0.6 gives 6 x 6 tiles."""
    manifest = make_shards([pyramid], tmp_path / "o", TilingParams(mpp=0.6), progress=False)
    samples = read_samples(tmp_path / "o")
    assert manifest["total"] == 36
    step = 256 * 1.2  # level-1 pixels between tile origins
    origins = [2 * math.floor(i * step + 0.5) for i in range(6)]  # level-0 = 2 x level-1
    expected = sorted((x, y) for x in origins for y in origins)
    assert sorted((s["meta"]["x"], s["meta"]["y"]) for s in samples) == expected
    assert all(decode(s["img.jpg"]).shape == (256, 256, 3) for s in samples)
    assert {s["meta"]["level"] for s in samples} == {1}
    assert samples[0]["meta"]["mpp"] == pytest.approx(0.6, rel=2e-3)


def test_downscale_applies_to_files_without_mpp(tmp_path: Path, crops: list[Path], pyramid: Path) -> None:
    params = TilingParams(mpp=1.0, downscale=2.0)
    manifest = make_shards([crops[0], pyramid], tmp_path / "o", params, progress=False)
    by_source = {s["path"]: s for s in manifest["sources"]}
    assert by_source[str(crops[0])]["tiles"] == 1  # 500 px after 2x: one 256 px tile
    assert by_source[str(crops[0])]["mpp"] is None and by_source[str(crops[0])]["downsample"] == 2.0
    assert by_source[str(pyramid)]["tiles"] == 16 and by_source[str(pyramid)]["level"] == 2


# ----------------------------------------------------------------------------- bad inputs


def test_corrupt_inputs_are_skipped_with_reasons(tmp_path: Path, sample_data: Path, crops: list[Path]) -> None:
    bad = tmp_path / "inputs"
    bad.mkdir()
    (bad / "noise.png").write_bytes(np.random.default_rng(0).bytes(10_000))
    jpeg = (sample_data / "bccd/BCCD/JPEGImages/BloodImage_00000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (bad / "empty.tif").write_bytes(b"")
    (bad / "notes.txt").write_text("not an image")  # not an image suffix: not an input at all

    manifest = make_shards([str(bad), str(crops[0])], tmp_path / "o", TilingParams(), progress=False)
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"noise.png", "truncated.jpg", "empty.tif"}
    assert "cannot identify" in skipped["noise.png"]
    assert "truncated" in skipped["truncated.jpg"]
    assert skipped["empty.tif"] == "empty file"
    assert [s["path"] for s in manifest["sources"]] == [str(crops[0])]
    assert manifest["total"] == len(read_samples(tmp_path / "o")) == 9


def test_blank_image_has_no_tissue(tmp_path: Path, crops: list[Path]) -> None:
    blank = tmp_path / "blank.png"
    noise = np.random.default_rng(0).integers(0, 8, (600, 600, 3), dtype=np.uint8)
    Image.fromarray(np.uint8(240) + noise).save(blank)

    manifest = make_shards([blank, crops[0]], tmp_path / "o", TilingParams(), progress=False)
    assert manifest["skipped"] == [{"path": str(blank), "reason": manifest["skipped"][0]["reason"]}]
    assert manifest["skipped"][0]["reason"].startswith("no tissue: none of 4 tiles")
    assert all(s["meta"]["source"] == str(crops[0]) for s in read_samples(tmp_path / "o"))

    with pytest.raises(UserError, match="no usable input"):
        make_shards([blank], tmp_path / "only_blank", TilingParams(), progress=False)
    # The filter off, the blank tiles are written, with their tissue fraction.
    kept = make_shards([blank], tmp_path / "unfiltered", TilingParams(min_tissue=0), progress=False)
    assert kept["total"] == 4
    assert {s["meta"]["tissue_fraction"] for s in read_samples(tmp_path / "unfiltered")} == {0.0}


def test_image_smaller_than_a_tile_is_skipped(tmp_path: Path, crops: list[Path]) -> None:
    small = tmp_path / "small.png"
    Image.open(crops[0]).crop((0, 0, 200, 300)).save(small)
    manifest = make_shards([small, crops[0]], tmp_path / "o", TilingParams(), progress=False)
    assert "smaller than one tile" in manifest["skipped"][0]["reason"]


# ----------------------------------------------------------------------------- command line


def test_cli_refuses_existing_output_unless_overwrite(
    tmp_path: Path, crops: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = ["--data", str(crops[0]), "--out", str(out), "--no-progress"]
    assert run_cli(main, argv) == 0
    first = shard_bytes(out)
    capsys.readouterr()

    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and str(out) in err
    assert shard_bytes(out) == first  # untouched

    assert run_cli(main, [*argv, "--overwrite", "--tile-size", "500"]) == 0
    assert json.loads((out / MANIFEST).read_text())["total"] == 4


def test_cli_user_errors_are_one_line(tmp_path: Path, crops: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--data", str(tmp_path / "nope.svs")], "no such file"),
        (["--data", str(crops[0]), "--min-tissue", "1.5"], "--min-tissue"),
        (["--data", str(crops[0]), "--domain-regex", "("], "--domain-regex"),
        (["--data", str(crops[0]), "--stain-norm", "macenko"], "--stain-reference"),
        (["--data", str(crops[0]), "--stain-reference", str(crops[1])], "used only with --stain-norm"),
    ]
    for extra, expected in cases:
        assert run_cli(main, [*extra, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "o").exists()


def test_out_holding_an_input_is_refused(tmp_path: Path, crops: list[Path]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(crops[0].read_bytes())
    with pytest.raises(UserError, match="would replace the input"):
        make_shards([data / "a.png"], data, TilingParams(), overwrite=True, progress=False)
    assert (data / "a.png").is_file()


# ----------------------------------------------------------------------------- workers, domains, limits


def test_two_workers_write_identical_shards(tmp_path: Path, crops: list[Path], sample_slide: Path) -> None:
    inputs = [*crops, sample_slide]
    params = TilingParams(samples_per_shard=7, stride=128)
    one = make_shards(inputs, tmp_path / "w1", params, progress=False)
    two = make_shards(inputs, tmp_path / "w2", TilingParams(samples_per_shard=7, stride=128, workers=2), progress=False)
    assert one["sources"][-1]["tiles"] > 2 * CHUNK  # the svs is split over several worker jobs
    assert one["shards"] == two["shards"] and one["sources"] == two["sources"]
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")


def test_shuffled_order_is_a_seeded_permutation_that_mixes_sources(
    tmp_path: Path, crops: list[Path], sample_slide: Path
) -> None:
    inputs = [*crops, sample_slide]

    def order(name: str, seed: int | None) -> list[tuple[int, int, int]]:
        manifest = make_shards(
            inputs, tmp_path / name, TilingParams(samples_per_shard=50, stride=128, shuffle_seed=seed), progress=False
        )
        assert manifest["params"]["shuffle_seed"] == seed
        return [
            (inputs.index(Path(m["source"])), m["y"], m["x"])
            for m in (s["meta"] for s in read_samples(tmp_path / name))
        ]

    plain, first, again, other = order("plain", None), order("a", 0), order("b", 0), order("c", 1)
    assert plain == sorted(plain)  # input order, then row-major within a source
    assert first == again and shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert first != other and sorted(first) == sorted(other) == plain
    # Each shard holds about the data's share of the slide's tiles, where input order puts them all last.
    share = sum(source == len(inputs) - 1 for source, _, _ in plain) / len(plain)
    shards = [first[i : i + 50] for i in range(0, len(first) - 49, 50)]
    assert len(shards) >= 3
    for shard in shards:
        assert abs(sum(source == len(inputs) - 1 for source, _, _ in shard) / 50 - share) < 0.25


def test_domain_from_regex(tmp_path: Path, crops: list[Path]) -> None:
    params = TilingParams(domain_regex=r"_(?P<domain>x\d+_y\d+)\.png", max_tiles_per_source=2)
    manifest = make_shards(crops, tmp_path / "o", params, progress=False)
    assert [s["domain"] for s in manifest["sources"]] == ["x700_y1900", "x800_y1900", "x700_y1800"]
    assert {(s["meta"]["source"], s["meta"]["domain"]) for s in read_samples(tmp_path / "o")} == {
        (str(crops[0]), "x700_y1900"),
        (str(crops[1]), "x800_y1900"),
        (str(crops[2]), "x700_y1800"),
    }
    # First group when unnamed; no match gives null.
    manifest = make_shards(crops, tmp_path / "o2", TilingParams(domain_regex=r"_(x800|y1800)"), progress=False)
    assert [s["domain"] for s in manifest["sources"]] == [None, "x800", "y1800"]


def test_domain_from_csv_by_path_or_name(tmp_path: Path, crops: list[Path]) -> None:
    table = tmp_path / "domains.csv"
    table.write_text(f"path,domain\n{crops[0]},scanner_a\n{crops[1].name},scanner_b\nother.png,scanner_c\n")
    params = TilingParams(domain_csv=str(table), max_tiles_per_source=1)
    manifest = make_shards(crops, tmp_path / "o", params, progress=False)
    assert [s["domain"] for s in manifest["sources"]] == ["scanner_a", "scanner_b", None]
    by_source = {s["meta"]["source"]: s["meta"]["domain"] for s in read_samples(tmp_path / "o")}
    assert [by_source[str(path)] for path in crops] == ["scanner_a", "scanner_b", None]


def test_max_tiles_per_source_spreads_evenly(tmp_path: Path, crops: list[Path]) -> None:
    manifest = make_shards([crops[0]], tmp_path / "o", TilingParams(max_tiles_per_source=3), progress=False)
    assert manifest["total"] == 3
    # Of the 3 x 3 grid in row-major order, the first, middle and last tile.
    assert sorted((s["meta"]["x"], s["meta"]["y"]) for s in read_samples(tmp_path / "o")) == [
        (0, 0),
        (256, 256),
        (512, 512),
    ]


# ----------------------------------------------------------------------------- stain normalisation


def test_stain_normalisation_changes_tiles_by_strength(tmp_path: Path, sample_data: Path, crops: list[Path]) -> None:
    # A mitotic figure from another lab and scanner (MIDOG 2021), stained unlike the Aperio slide.
    reference = str(sample_data / "amibr/patches/normal/MIDOG21_10.png")
    common = dict(format="png", max_tiles_per_source=2)
    make_shards([crops[0]], tmp_path / "raw", TilingParams(**common), progress=False)
    for name, strength in [("zero", 0.0), ("full", 1.0)]:
        params = TilingParams(stain_norm="reinhard", stain_reference=reference, stain_strength=strength, **common)
        manifest = make_shards([crops[0]], tmp_path / name, params, progress=False)
        assert manifest["params"]["stain_norm"] == "reinhard"
    raw, zero, full = (
        [decode(s["img.png"]).astype(int) for s in read_samples(tmp_path / name)] for name in ("raw", "zero", "full")
    )
    assert all(np.array_equal(a, b) for a, b in zip(raw, zero))
    assert all(np.abs(a - b).mean() > 3 for a, b in zip(raw, full))
