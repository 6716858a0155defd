"""Stain normalisation (Macenko, Reinhard) and the before/after preview, on real H&E and blood-smear images."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sample_helpers import sample_slide_region

from ssl_path.core.errors import UserError, run_cli
from ssl_path.data.stain import (
    lab_to_rgb,
    macenko_stain_matrix,
    make_normalizer,
    rgb_to_lab,
)
from ssl_path.stain_preview import main as preview_main

BCCD = "bccd/BCCD/JPEGImages/BloodImage_00000.jpg"
# 512 px level-0 tiles (x, y) of the CMU H&E slide (Aperio): dermis between two rete ridges, dermis beside one.
CMU_TILES = {"cmu_dermis_ridges": (725, 1950), "cmu_dermis": (600, 2400)}
# MIDOG 2021 slides by scanner: 001-050 Hamamatsu XR (the reference's), 051-100 Hamamatsu S360.
XR, S360 = range(1, 51), range(51, 101)


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def amibr_mosaic(sample_data: Path, slides: range) -> np.ndarray:
    """512 px of H&E from one scanner: the first 16 normal AMi-Br patches (128 px) of ``slides``, 4 x 4."""
    with open(sample_data / "amibr/AMI-BR_MIDOG21.csv", newline="") as f:
        uids = [
            r["uid"] for r in csv.DictReader(f) if r["majority_atypical"] == "False" and int(r["slide"][:3]) in slides
        ]
    patches = [rgb(sample_data / f"amibr/patches/normal/MIDOG21_{uid}.png") for uid in uids[:16]]
    return np.concatenate([np.concatenate(patches[i : i + 4], axis=1) for i in range(0, 16, 4)], axis=0)


@pytest.fixture(scope="module")
def reference(sample_data: Path) -> np.ndarray:
    """Another lab's and scanner's H&E than the slide's: AMi-Br patches scanned on the Hamamatsu XR."""
    return amibr_mosaic(sample_data, XR)


@pytest.fixture(scope="module")
def reference_png(reference: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stain") / "reference.png"
    Image.fromarray(reference).save(path)
    return path


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    return sample_slide_region(*CMU_TILES["cmu_dermis_ridges"], 512)


def lab_stats(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = rgb_to_lab(img).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def test_lab_round_trip_and_white_point() -> None:
    values = np.random.default_rng(0).integers(0, 256, (4096, 3), dtype=np.uint8)
    assert np.abs(lab_to_rgb(rgb_to_lab(values)) * 255.0 - values).max() < 1e-6
    np.testing.assert_allclose(rgb_to_lab(np.array([255, 255, 255], np.uint8)), [100.0, 0.0, 0.0], atol=1e-3)


def test_reinhard_matches_reference_lab_statistics(tile: np.ndarray, reference: np.ndarray) -> None:
    out = make_normalizer("reinhard", reference)(tile)
    (m_out, s_out), (m_ref, s_ref), (m_in, _) = lab_stats(out), lab_stats(reference), lab_stats(tile)
    assert np.abs(m_in - m_ref).max() > 5.0  # the input really differs ...
    np.testing.assert_allclose(m_out, m_ref, atol=1.0)  # ... and the output does not
    np.testing.assert_allclose(s_out, s_ref, rtol=0.05)


@pytest.mark.parametrize("source", [*CMU_TILES, "amibr_s360"])
def test_macenko_moves_stain_vectors_to_the_reference(sample_data: Path, reference: np.ndarray, source: str) -> None:
    img = amibr_mosaic(sample_data, S360) if source == "amibr_s360" else sample_slide_region(*CMU_TILES[source], 512)
    out = make_normalizer("macenko", reference)(img)
    ref_stains = macenko_stain_matrix(reference)
    before = np.linalg.norm(macenko_stain_matrix(img) - ref_stains)
    after = np.linalg.norm(macenko_stain_matrix(out) - ref_stains)
    assert after < 0.5 * before, (before, after)
    # Haematoxylin first: it absorbs red more than eosin.
    assert ref_stains[0, 0] > ref_stains[1, 0]


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_strength_blends_between_input_and_full_normalisation(
    method: str, sample_data: Path, reference: np.ndarray
) -> None:
    img = rgb(sample_data / BCCD)
    none, half, full = (make_normalizer(method, reference, s)(img) for s in (0.0, 0.5, 1.0))
    assert np.array_equal(none, img)
    lo, hi = np.minimum(img, full).astype(int), np.maximum(img, full).astype(int)
    assert ((half >= lo - 1) & (half <= hi + 1)).all()
    moved_full = np.abs(full.astype(int) - img).mean()
    moved_half = np.abs(half.astype(int) - img).mean()
    assert moved_full > 10.0  # a blood smear is far from the H&E reference
    assert 0.4 * moved_full < moved_half < 0.6 * moved_full


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_near_white_tile_is_returned_unchanged(method: str, tile: np.ndarray, reference: np.ndarray) -> None:
    washed_out = (255 - (255 - tile.astype(np.int32)) // 24).astype(np.uint8)  # faint tissue on glass
    normalize = make_normalizer(method, reference)
    for img in (washed_out, np.full((256, 256, 3), 255, np.uint8)):
        out = normalize(img)
        assert out.dtype == np.uint8 and np.array_equal(out, img)


def test_bad_arguments_raise_user_error(reference: np.ndarray) -> None:
    with pytest.raises(UserError, match="method"):
        make_normalizer("vahadane", reference)
    for strength in (-0.1, 1.5, float("nan"), "1"):
        with pytest.raises(UserError, match="strength"):
            make_normalizer("macenko", reference, strength)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="too little tissue"):
        make_normalizer("macenko", np.full((64, 64, 3), 250, np.uint8))
    with pytest.raises(UserError, match="uint8"):
        make_normalizer("reinhard", reference.astype(np.float32))
    with pytest.raises(UserError, match="uint8"):
        make_normalizer("reinhard", reference)(reference[..., 0])


def test_preview_writes_a_grid(sample_data: Path, reference_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    args = [
        "--data",
        str(sample_data / BCCD),
        "--reference",
        str(reference_png),
        "--method",
        "macenko",
        "--strength",
        "0",
        "0.5",
        "1",
        "--max-side",
        "160",
        "--out",
        str(out),
    ]
    assert run_cli(preview_main, args) == 0
    grid = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert grid.shape[1] > 2.5 * grid.shape[0]  # one row of five panels
    assert grid.std() > 20.0  # images, not a blank canvas
    assert run_cli(preview_main, args) == 2  # exists, no --overwrite


def test_preview_skips_what_it_cannot_read_and_takes_the_next_image(
    sample_data: Path, reference_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "images"
    data.mkdir()
    for i in range(3):
        shutil.copy(sample_data / BCCD.replace("00000", f"0000{i}"), data / f"{i}.jpg")
    (data / "0_cut.jpg").write_bytes((data / "0.jpg").read_bytes()[:400])  # sorts among the first
    (data / "0_folder.png").mkdir()
    out = tmp_path / "preview.png"
    base = ["--reference", str(reference_png), "--strength", "1", "--max-side", "96"]
    assert run_cli(preview_main, ["--data", str(data), "--rows", "2", *base, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: skipped") == 1 and "0_cut.jpg" in err and "0_folder" not in err
    two_rows = np.asarray(Image.open(out)).shape
    assert run_cli(preview_main, ["--data", str(data), "--rows", "1", *base, "--out", str(tmp_path / "one.png")]) == 0
    assert two_rows[0] > 1.8 * np.asarray(Image.open(tmp_path / "one.png")).shape[0]  # two images shown, not one
    for name in ("0.jpg", "1.jpg", "2.jpg"):
        (data / name).unlink()
    capsys.readouterr()
    assert run_cli(preview_main, ["--data", str(data), *base, "--out", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: none of the 1 images can be read; first cannot read image") and err.count("\n") == 1
    # checked before the images are read: one line, no warning of the unreadable one before it
    assert run_cli(preview_main, ["--data", str(data), "--reference", str(data), "--out", str(tmp_path / "r.png")]) == 2
    assert capsys.readouterr().err == f"error: --reference {data} is a folder; name an image\n"


@pytest.mark.parametrize(
    "change",
    [
        ["--method", "vahadane"],
        ["--strength", "2"],
        ["--reference", "/nonexistent.png"],
        ["--data", "/nonexistent"],
        ["--bogus"],
    ],
)
def test_preview_bad_arguments_exit_2_with_one_line(
    change: list[str], sample_data: Path, reference_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--data", str(sample_data / BCCD), "--reference", str(reference_png)]
    assert run_cli(preview_main, args + ["--out", str(tmp_path / "p.png"), *change]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "p.png").exists()
