"""The slide readers and the tissue mask, on the real Aperio slide, regions of it and TIFFs written from them."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from sample_helpers import sample_slide_region

from ssl_path.tiling.slides import (
    SlideError,
    TiffSlide,
    best_level,
    open_slide,
    read_thumbnail,
)
from ssl_path.tiling.tissue import TissueMap, otsu_threshold, saturation, tissue_mask


@pytest.fixture(scope="module")
def he_rgb() -> np.ndarray:
    """A 1000 px level-0 region of the CMU slide: epidermis, dermis, keratin, glass and a speck of marking ink."""
    return sample_slide_region(900, 700, 1000)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory, he_rgb: np.ndarray) -> Path:
    """A 4096 px JPEG-tiled TIFF at 0.25 µm/px with 0.5 and 1.0 µm/px levels in SubIFDs (MIDOG-like)."""
    row = np.concatenate([he_rgb, he_rgb[:, ::-1]], axis=1)
    block = np.concatenate([row, row[::-1]], axis=0)  # 2000 x 2000, mirrored so edges match
    full = np.ascontiguousarray(np.tile(block, (3, 3, 1))[:4096, :4096])
    path = tmp_path_factory.mktemp("pyramid") / "midog_like.tif"
    options = dict(tile=(256, 256), photometric="rgb", compression="jpeg", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(full, subifds=2, resolution=(1e4 / 0.25, 1e4 / 0.25), **options)
        for factor in (2, 4):
            mpp = 0.25 * factor
            tif.write(full[::factor, ::factor], subfiletype=1, resolution=(1e4 / mpp, 1e4 / mpp), **options)
    return path


def test_svs_opens_with_openslide_geometry_and_mpp(sample_slide: Path) -> None:
    with open_slide(sample_slide) as slide:
        assert slide.backend == "openslide"
        assert slide.dimensions == (2220, 2967)
        assert slide.level_dimensions == ((2220, 2967),)
        assert slide.mpp == pytest.approx(0.499)
        region = slide.read_region(1000, 1500, 0, (300, 200))
    assert region.shape == (200, 300, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region, sample_slide_region(1000, 1500, (300, 200)))


def test_tifffile_backend_reads_svs_like_openslide(sample_slide: Path) -> None:
    """Same pixels from both backends, and the Aperio ``MPP = 0.499`` found in the ImageDescription."""
    with TiffSlide(sample_slide) as tiff, open_slide(sample_slide) as osr:
        assert tiff.mpp == pytest.approx(0.499)
        assert tiff.dimensions == osr.dimensions
        for x, y in [(0, 0), (239, 241), (2000, 2800)]:
            np.testing.assert_array_equal(tiff.read_region(x, y, 0, (220, 167)), osr.read_region(x, y, 0, (220, 167)))


def test_pyramidal_tiff_levels_mpp_and_regions(pyramid: Path) -> None:
    level1 = tifffile.imread(pyramid, level=1)
    with open_slide(pyramid) as slide:
        assert slide.backend == "tifffile"  # OpenSlide's generic-tiff would see one level only
        assert slide.level_dimensions == ((4096, 4096), (2048, 2048), (1024, 1024))
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.mpp == pytest.approx(0.25)
        # Level-0 coordinates (1000, 600) are level-1 pixel (500, 300).
        np.testing.assert_array_equal(slide.read_region(1000, 600, 1, (300, 200)), level1[300:500, 500:800])
        # Beyond the right edge is white background.
        edge = slide.read_region(4096 - 64, 0, 0, (128, 32))
        assert (edge[:, 64:] == 255).all() and not (edge[:, :64] == 255).all()


def test_region_read_decodes_only_the_tiles_it_needs(pyramid: Path) -> None:
    """A 256 px region of a 4096 px level must not decode the level (48 MiB as uint8 RGB)."""
    with open_slide(pyramid) as slide:
        slide.read_region(2048, 2048, 0, (256, 256))  # warm up decoder caches
        tracemalloc.start()
        slide.read_region(1024, 3072, 0, (256, 256))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 4 * 2**20


@pytest.mark.parametrize(
    "layout",
    [
        dict(rowsperstrip=37, compression="zlib"),
        dict(planarconfig="separate"),
        dict(tile=(128, 128), compression="zlib"),
    ],
    ids=["strips", "planar", "tiled"],
)
def test_tiff_layouts_read_exactly(tmp_path: Path, he_rgb: np.ndarray, layout: dict) -> None:
    data = np.moveaxis(he_rgb, -1, 0) if layout.get("planarconfig") == "separate" else he_rgb
    path = tmp_path / "layout.tif"
    tifffile.imwrite(path, data, photometric="rgb", **layout)
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region(123, 457, 0, (300, 211)), he_rgb[457:668, 123:423])


def test_16bit_gray_tiff_scaled_by_bit_depth(tmp_path: Path, he_rgb: np.ndarray) -> None:
    gray = he_rgb[..., 0]
    tifffile.imwrite(tmp_path / "gray16.tif", gray.astype(np.uint16) * 257, tile=(128, 128))
    with open_slide(tmp_path / "gray16.tif") as slide:
        region = slide.read_region(0, 0, 0, (1000, 1000))
    np.testing.assert_array_equal(region, np.repeat(gray[..., None], 3, axis=-1))


def test_ome_tiff_mpp(tmp_path: Path, he_rgb: np.ndarray) -> None:
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, he_rgb, ome=True, metadata={"axes": "YXS", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3})
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.3)


def test_png_without_resolution_and_rgba_over_white(tmp_path: Path, he_rgb: np.ndarray) -> None:
    rgba = np.dstack([he_rgb[:64, :64], np.full((64, 64), 255, np.uint8)])
    rgba[:, 32:, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    with open_slide(tmp_path / "rgba.png") as slide:
        assert slide.backend == "pil" and slide.mpp is None
        region = slide.read_region(0, 0, 0, (64, 64))
    np.testing.assert_array_equal(region[:, :32], he_rgb[:64, :32])
    assert (region[:, 32:] == 255).all()


def test_unreadable_files_raise_slide_error_with_reason(tmp_path: Path, sample_data: Path) -> None:
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(4096))
    jpeg = (sample_data / "bccd/BCCD/JPEGImages/BloodImage_00000.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    reasons = {}
    for name in ["empty.tif", "noise.png", "cut.jpg", "missing.svs"]:
        with pytest.raises(SlideError) as info:
            open_slide(tmp_path / name)
        assert info.value.path == str(tmp_path / name)
        reasons[name] = info.value.reason
    assert reasons["empty.tif"] == "empty file"
    assert "cannot identify" in reasons["noise.png"]
    assert "truncated" in reasons["cut.jpg"]
    assert reasons["missing.svs"] == "not a file"


def test_best_level_is_at_or_finer_than_target(pyramid: Path) -> None:
    with open_slide(pyramid) as slide:
        assert [best_level(slide, ds) for ds in (0.5, 1.0, 1.9, 2.0, 2.01, 3.9, 4.0, 64.0)] == [0, 0, 0, 1, 1, 1, 2, 2]


def test_thumbnail_is_block_mean_with_exact_scale(tmp_path: Path, he_rgb: np.ndarray) -> None:
    Image.fromarray(he_rgb).save(tmp_path / "region.png")  # a 1000 px PNG, read by the PIL backend
    with open_slide(tmp_path / "region.png") as slide:
        thumb, scale = read_thumbnail(slide, 16, block=256)  # blocks smaller than the image
        full = slide.read_region(0, 0, 0, (1000, 1000))
    assert thumb.shape == (62, 62, 3) and scale == (16.0, 16.0)
    expected = full[:992, :992].reshape(62, 16, 62, 16, 3).mean(axis=(1, 3))
    assert np.abs(thumb - expected).max() <= 0.5 + 1e-9  # the cell mean, rounded


# ----------------------------------------------------------------------------- tissue


def test_otsu_separates_two_modes() -> None:
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.1, 0.02, 5000).clip(0, 1), rng.normal(0.6, 0.05, 2000).clip(0, 1)
    threshold = otsu_threshold(np.concatenate([low, high]))
    assert low.max() <= threshold < high.min()


def test_saturation_of_grey_and_pure_colour() -> None:
    rgb = np.array([[[200, 200, 200], [255, 0, 0], [0, 0, 0], [200, 100, 100]]], np.uint8)
    np.testing.assert_allclose(saturation(rgb)[0], [0.0, 1.0, 0.0, 0.5])


def test_tissue_mask_on_real_slide_and_blank(sample_slide: Path) -> None:
    with open_slide(sample_slide) as slide:
        thumb, _ = read_thumbnail(slide, 16)
    mask, threshold = tissue_mask(thumb)
    assert 0.2 < mask.mean() < 0.5  # the CMU section covers about a third of the region
    assert mask[:50, :40].mean() < 0.01  # the top-left corner is glass (a few scanner-edge pixels)
    blank = np.full((64, 64, 3), 244, np.uint8) + np.random.default_rng(0).integers(0, 6, (64, 64, 3), np.uint8)
    assert not tissue_mask(blank)[0].any()


def test_tissue_mask_keeps_an_all_tissue_image(he_rgb: np.ndarray) -> None:
    """Otsu alone would split H&E into pale and dark halves; the clamped threshold keeps both."""
    # Level-0 (1000, 775), 500 px of epidermis: the slide's window with the least bright near-grey
    # (glass-like) pixels, 3 %; its every 4th pixel makes a 125 px thumbnail.
    mask, _ = tissue_mask(he_rgb[75:575:4, 100:600:4])
    assert mask.mean() > 0.9


def test_tissue_map_fraction_of_level0_rectangles() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    tissue = TissueMap(mask, (8.0, 8.0))  # each cell is 8x8 level-0 pixels
    assert tissue.fraction(0, 0, 40, 80) == 1.0
    assert tissue.fraction(40, 0, 40, 80) == 0.0
    assert tissue.fraction(16, 16, 48, 48) == pytest.approx(0.5)
    assert tissue.fraction(200, 200, 16, 16) == 0.0  # outside the slide
