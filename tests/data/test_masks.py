"""Label masks: read_mask on the real masks (read-only) and on small files written in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_path.core.errors import UserError
from ssl_path.data.masks import read_mask


def test_grey_masks_keep_their_values(shared_data: Path) -> None:
    wbc = read_mask(shared_data / "wbc_seg" / "Dataset 1" / "001.png")
    assert wbc.dtype == np.uint8 and wbc.shape == (120, 120)
    assert set(np.unique(wbc).tolist()) == {0, 128, 255}
    nuclei = read_mask(str(shared_data / "monuseg_kumar_norm" / "GroundTruthInside" / "TCGA-18-5592-01Z-00-DX1.png"))
    assert nuclei.dtype == np.uint8 and nuclei.shape == (1000, 1000)
    assert set(np.unique(nuclei).tolist()) == {0, 255}
    nuclei[0, 0] = 7  # writable: a caller may map values in place


def test_palette_16_bit_and_equal_rgb_masks(tmp_path: Path, shared_data: Path) -> None:
    values = read_mask(shared_data / "wbc_seg" / "Dataset 1" / "001.png")
    classes = (values // 127).astype(np.uint8)  # 0, 1, 2
    palette = Image.fromarray(classes).convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 - 3) * 3)
    palette.save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as saved:
        assert saved.mode == "P"
    indices = read_mask(tmp_path / "palette.png")
    assert indices.dtype == np.uint8 and np.array_equal(indices, classes)  # indices, not colours

    instances = np.arange(120 * 120, dtype=np.uint16).reshape(120, 120)
    Image.fromarray(instances).save(tmp_path / "instances.png")
    Image.fromarray(instances).save(tmp_path / "instances.tif")
    for name in ("instances.png", "instances.tif"):
        wide = read_mask(tmp_path / name)
        assert wide.dtype == np.int32 and np.array_equal(wide, instances)

    grey_rgb = np.repeat(values[..., None], 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "rgb.bmp")
    Image.fromarray(np.dstack([grey_rgb, np.full_like(values, 255)])).save(tmp_path / "rgba.png")
    for name in ("rgb.bmp", "rgba.png"):
        one = read_mask(tmp_path / name)
        assert one.dtype == np.uint8 and one.shape == (120, 120) and np.array_equal(one, values)


def test_unusable_masks_are_one_error_naming_the_file(tmp_path: Path, shared_data: Path) -> None:
    source = shared_data / "monuseg_kumar_norm" / "GroundTruthInside" / "TCGA-18-5592-01Z-00-DX1.png"
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[2, 5] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    (tmp_path / "truncated.png").write_bytes(source.read_bytes()[:5000])
    (tmp_path / "text.png").write_text("not a mask\n")
    Image.fromarray(colour[..., 0]).save(tmp_path / "lossy.jpg")
    frames = [Image.fromarray(colour[..., 0]), Image.fromarray(colour[..., 1])]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    cases = {
        "colour.png": r"colour\.png: a label mask has one value per pixel, .*at x=5, y=2: \(255, 0, 0\)",
        "truncated.png": r"cannot read label mask .*truncated\.png: .*truncated",
        "text.png": r"cannot read label mask .*text\.png: not an image format",
        "lossy.jpg": r"lossy\.jpg: \.jpg is not a lossless mask format",
        "stack.tif": r"stack\.tif has 2 frames",
        "gone.png": r"label mask not found: .*gone\.png",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as caught:
            read_mask(tmp_path / name)
        assert "\n" not in str(caught.value)
