"""Multi-crop augmentation: shapes, determinism, geometry, batched photometric ops, collation, eval transform."""

from __future__ import annotations

import io
import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sample_helpers import sample_slide_region
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from ssl_path.core.errors import UserError
from ssl_path.data.transforms import (
    MultiCropAugment,
    MultiCropConfig,
    MultiCropPhotometric,
    apply_photometric,
    as_rgb_tensor,
    collate_multicrop,
    colour_affine,
    colour_jitter_matrices,
    crop_resize_orient,
    eval_transform,
    gaussian_blur,
    hed_jitter,
    hed_jitter_matrices,
    sample_crop_boxes,
    sample_photometric,
    solarize,
)

# A real H&E PNG from another lab and scanner than the slide: the first normal AMi-Br patch (MIDOG slide 002).
AMIBR_PATCH = "amibr/patches/normal/MIDOG21_10.png"


@pytest.fixture(scope="module")
def he_rgb() -> np.ndarray:
    """A 1000 px level-0 region of the CMU H&E slide: dermis and epidermis, glass only between collagen fibres."""
    return sample_slide_region(725, 1950, 1000)


@pytest.fixture(scope="module")
def tiles(he_rgb: np.ndarray) -> list[bytes]:
    """Six 256 px JPEG (q95) tiles of real H&E on a fixed grid of the region, as the tiler writes them."""
    out = []
    for y, x in itertools.product((0, 372), (0, 372, 744)):
        buf = io.BytesIO()
        Image.fromarray(he_rgb[y : y + 256, x : x + 256]).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def crops01(tiles: list[bytes]) -> torch.Tensor:
    """Real H&E crops as float [6, 3, 128, 128] in [0, 1]."""
    return torch.stack([as_rgb_tensor(t)[:, :128, :128] for t in tiles]).float() / 255.0


def unnormalise(x: torch.Tensor, cfg: MultiCropConfig) -> torch.Tensor:
    return x * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)


# ----------------------------------------------------------------------------- multi-crop output


def test_default_multicrop_shapes_dtypes_and_value_range(tiles: list[bytes]) -> None:
    cfg = MultiCropConfig()
    sample = MultiCropAugment(cfg)(tiles[0], key=0)
    g, l = sample["global_crops"], sample["local_crops"]
    assert g.shape == (2, 3, 224, 224) and l.shape == (8, 3, 96, 96)
    assert g.dtype == l.dtype == torch.float32
    for crops in (g, l):
        assert torch.isfinite(crops).all()
        pixels = unnormalise(crops, cfg)
        assert pixels.min() > -1e-4 and pixels.max() < 1 + 1e-4  # normalised from [0, 1]
        assert 0.05 < pixels.std() < 0.45


def test_custom_config_shapes_and_uint8_geometric_output(tiles: list[bytes]) -> None:
    cfg = MultiCropConfig(n_global=3, n_local=5, global_size=160, local_size=64, global_scale=(0.5, 1.0))
    full = MultiCropAugment(cfg)(tiles[1], key="slide-3/x512_y768")
    assert full["global_crops"].shape == (3, 3, 160, 160) and full["local_crops"].shape == (5, 3, 64, 64)
    geo = MultiCropAugment(cfg, photometric=False)(tiles[1], key="slide-3/x512_y768")
    assert geo["global_crops"].dtype == torch.uint8 and len(geo["global_params"]) == 3 and len(geo["local_params"]) == 5
    no_local = MultiCropAugment(MultiCropConfig(n_local=0))(tiles[1], key=1)
    assert no_local["local_crops"].shape == (0, 3, 96, 96)


def test_same_seed_and_key_are_bit_identical_and_anything_else_differs(tiles: list[bytes]) -> None:
    aug = MultiCropAugment(MultiCropConfig(seed=7))
    a, b = aug(tiles[2], key=11), MultiCropAugment(MultiCropConfig(seed=7))(tiles[2], key=11)
    assert all(torch.equal(a[k], b[k]) for k in ("global_crops", "local_crops"))
    others = [
        MultiCropAugment(MultiCropConfig(seed=8))(tiles[2], key=11),
        aug(tiles[2], key=12),
        aug(tiles[2], key=11, epoch=1),
    ]
    for other in others:
        assert not torch.equal(a["global_crops"], other["global_crops"])
        assert not torch.equal(a["local_crops"], other["local_crops"])


def test_crops_of_one_sample_differ(tiles: list[bytes]) -> None:
    sample = MultiCropAugment()(tiles[0], key=3)
    for crops in (sample["global_crops"], sample["local_crops"]):
        for i, j in itertools.combinations(range(len(crops)), 2):
            assert (crops[i] - crops[j]).abs().mean() > 0.05


class _Tiles(Dataset):
    def __init__(self, tiles: list[bytes], aug: MultiCropAugment) -> None:
        self.tiles, self.aug = tiles, aug

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict:
        return self.aug(self.tiles[index], key=index)


def test_dataloader_workers_reproduce_the_main_process(tiles: list[bytes]) -> None:
    aug = MultiCropAugment(MultiCropConfig(seed=3))
    expected = collate_multicrop([aug(t, key=i) for i, t in enumerate(tiles[:4])])
    # Draw from the global RNGs first: the workers must not depend on them.
    torch.rand(10), np.random.rand(10)
    loader = DataLoader(_Tiles(tiles[:4], aug), batch_size=4, num_workers=2, collate_fn=collate_multicrop)
    (batch,) = list(loader)
    assert torch.equal(batch["collated_global_crops"], expected["collated_global_crops"])
    assert torch.equal(batch["collated_local_crops"], expected["collated_local_crops"])


# ----------------------------------------------------------------------------- geometry


def _orientations(img: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of the dihedral group D4 acting on a [3, S, S] image."""
    return [r.flip(2) if f else r for k in range(4) for r in [img.rot90(k, (1, 2))] for f in (False, True)]


@pytest.mark.parametrize("rot90, vflip_p, expected", [(True, 0.5, 8), (False, 0.0, 2)])
def test_flips_and_rot90_cover_the_configured_orientations(
    tiles: list[bytes], rot90: bool, vflip_p: float, expected: int
) -> None:
    # Whole-image crops, so that a crop differs from the resized tile only by its orientation.
    cfg = MultiCropConfig(global_scale=(1.0, 1.0), ratio=(1.0, 1.0), n_local=0, rot90=rot90, vflip_p=vflip_p)
    aug = MultiCropAugment(cfg, photometric=False)
    whole = TF.resize(as_rgb_tensor(tiles[0]), [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    candidates = _orientations(whole)
    counts = np.zeros(8, dtype=int)
    for key in range(160):
        for crop in aug(tiles[0], key=key)["global_crops"]:
            counts[[torch.equal(crop, c) for c in candidates].index(True)] += 1
    seen = counts > 0
    assert seen.sum() == expected
    assert counts[seen].min() > 0.5 * counts.sum() / expected  # about uniform


def test_crop_boxes_follow_scale_and_ratio() -> None:
    boxes = sample_crop_boxes(np.random.default_rng(0), 256, 256, 4000, (0.05, 0.32), (3 / 4, 4 / 3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 256).all() and (left + w <= 256).all()
    frac = h * w / 256**2
    assert frac.min() > 0.04 and frac.max() < 0.34 and 0.15 < frac.mean() < 0.22
    assert (w / h).min() > 0.7 and (w / h).max() < 1.43
    # Crop positions are spread over the whole image.
    assert top.min() < 10 and (top + h).max() > 246 and left.min() < 10 and (left + w).max() > 246


def test_crop_resize_orient_matches_torchvision(tiles: list[bytes]) -> None:
    img = as_rgb_tensor(tiles[0])
    boxes = np.array([[10, 20, 150, 130], [0, 0, 256, 256]])
    out = crop_resize_orient(img, boxes, 96, np.array([True, False]), np.array([False, True]), np.array([1, 3]))
    ref0 = TF.resized_crop(img, 10, 20, 150, 130, [96, 96], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    ref1 = TF.resize(img, [96, 96], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(out[0], TF.rotate(TF.horizontal_flip(ref0), 90))
    assert torch.equal(out[1], TF.rotate(TF.vertical_flip(ref1), 270))


def test_decode_reads_jpeg_png_bmp_and_arrays(sample_data: Path, tiles: list[bytes], tmp_path: Path) -> None:
    bmp = tmp_path / "tile.bmp"  # the sample has no BMP: Pillow writes one (24-bit RGB, as the WBC set's are)
    Image.open(io.BytesIO(tiles[0])).save(bmp)
    png = sample_data / AMIBR_PATCH
    for image in (tiles[0], bmp.read_bytes(), png, Image.open(png), np.asarray(Image.open(png).convert("RGB"))):
        img = as_rgb_tensor(image)
        assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
    with pytest.raises(UserError, match="not found"):
        as_rgb_tensor(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- photometric ops


def _jitter(b=1.0, c=1.0, s=1.0, h=0.0, order=(0, 1, 2, 3), gray=False) -> tuple[torch.Tensor, torch.Tensor]:
    col, mean = colour_jitter_matrices(
        np.array([b]), np.array([c]), np.array([s]), np.array([h]), np.array([order]), np.array([gray])
    )
    return torch.from_numpy(col).float(), torch.from_numpy(mean).float()


def _affine(x: torch.Tensor, **kw) -> torch.Tensor:
    col, mean = _jitter(**kw)
    return colour_affine(x.clone(), col.expand(len(x), 3, 3), mean.expand(len(x), 3, 3))


def test_each_colour_op_equals_torchvision(crops01: torch.Tensor) -> None:
    x = crops01
    torch.testing.assert_close(_affine(x, b=1.4), TF.adjust_brightness(x, 1.4), atol=1e-5, rtol=0)
    torch.testing.assert_close(_affine(x, c=0.6), TF.adjust_contrast(x, 0.6), atol=1e-5, rtol=0)
    torch.testing.assert_close(_affine(x, s=1.2), TF.adjust_saturation(x, 1.2), atol=1e-5, rtol=0)
    torch.testing.assert_close(_affine(x, gray=True), TF.rgb_to_grayscale(x, 3), atol=1e-5, rtol=0)
    # Hue is a YIQ rotation, not torchvision's HSV shift: same direction, close, not equal.
    for hue in (0.08, -0.08):
        err = (_affine(x, h=hue) - TF.adjust_hue(x, hue)).abs().mean()
        assert err < 0.025 and err < 0.5 * (_affine(x, h=-hue) - TF.adjust_hue(x, hue)).abs().mean()


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_fused_jitter_equals_torchvision_ops_in_sequence(crops01: torch.Tensor, order: tuple[int, ...]) -> None:
    # Factors below 1 keep every intermediate in [0, 1], where torchvision's per-op clamps are no-ops.
    ops = [
        lambda t: TF.adjust_brightness(t, 0.9),
        lambda t: TF.adjust_contrast(t, 0.7),
        lambda t: TF.adjust_saturation(t, 0.8),
        lambda t: t,
    ]
    expected = crops01
    for op in order:
        expected = ops[op](expected)
    fused = _affine(crops01, b=0.9, c=0.7, s=0.8, order=order)
    torch.testing.assert_close(fused, expected, atol=2e-5, rtol=0)


def test_blur_and_solarize_equal_torchvision(crops01: torch.Tensor) -> None:
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0, 1.0, 0.4])
    blurred = gaussian_blur(crops01.clone(), sigma, 9)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(blurred[i], TF.gaussian_blur(crops01[i], [9, 9], [s, s]), atol=1e-5, rtol=0)
    torch.testing.assert_close(solarize(crops01), TF.solarize(crops01, 0.5), atol=0, rtol=0)


def test_hed_jitter_identity_at_sigma_zero_and_scales_haematoxylin(crops01: torch.Tensor) -> None:
    k = len(crops01)
    ident, zero = hed_jitter_matrices(np.ones((k, 3)), np.zeros((k, 3)))
    out = hed_jitter(crops01.clone(), torch.from_numpy(ident).float(), torch.from_numpy(zero).float())
    dark = crops01 < 1.0 / 255.0  # black pixels are clamped to the darkest non-zero intensity
    torch.testing.assert_close(out[~dark], crops01[~dark], atol=1e-5, rtol=0)
    no_hed = sample_photometric(np.random.default_rng(0), MultiCropConfig(hed_sigma=0.0), np.ones(4), np.zeros(4))
    assert no_hed.hed is None

    more_h, _ = hed_jitter_matrices(np.tile([1.3, 1.0, 1.0], (k, 1)), np.zeros((k, 3)))
    out = hed_jitter(crops01.clone(), torch.from_numpy(more_h).float(), torch.from_numpy(zero).float())
    # More haematoxylin absorbs more red and green: darker there; eosin-dominated blue barely changes.
    drop = (crops01 - out).mean(dim=(0, 2, 3))
    assert drop[0] > 0.01 and drop[1] > 0.01 and drop[0] > 2 * drop[2].abs()


def test_probabilities_of_blur_solarize_grayscale_and_jitter() -> None:
    cfg = MultiCropConfig(grayscale_p=0.2, jitter_p=0.8)
    n = 6000
    blur_p = np.repeat([1.0, 0.1, 0.5], n)
    solar_p = np.repeat([0.0, 0.2, 0.0], n)
    params = sample_photometric(np.random.default_rng(1), cfg, blur_p, solar_p)
    blurred = (params.blur_sigma > 0).float().view(3, n).mean(1)
    solarized = params.solarize.float().view(3, n).mean(1)
    torch.testing.assert_close(blurred, torch.tensor([1.0, 0.1, 0.5]), atol=0.025, rtol=0)
    torch.testing.assert_close(solarized, torch.tensor([0.0, 0.2, 0.0]), atol=0.025, rtol=0)
    sig = params.blur_sigma[params.blur_sigma > 0]
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    gray = (params.colour - params.colour[:, :1]).abs().amax(dim=(1, 2)) < 1e-6  # all rows equal: luma only
    assert abs(gray.float().mean().item() - 0.2) < 0.025
    jittered = (params.colour - torch.eye(3)).abs().amax(dim=(1, 2)) > 1e-6
    assert abs((jittered | gray).float().mean().item() - (1 - 0.2 * 0.8)) < 0.025


def test_grayscale_and_solarize_masks_are_applied(tiles: list[bytes]) -> None:
    cfg = MultiCropConfig(global_solarize_p=(1.0,), grayscale_p=0.3, hed_sigma=0.0, global_blur_p=(0.0,))
    aug = MultiCropAugment(cfg, photometric=False)
    samples = [aug(t, key=i) for i, t in enumerate(tiles * 20)]
    batch = collate_multicrop(samples)
    out = unnormalise(MultiCropPhotometric(cfg)(batch)["collated_local_crops"], cfg)
    gray_rows = (out - out[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-5
    colour = batch["local_params"].colour  # [K, 3, 3]: grayscale rows map every channel to luma
    assert torch.equal(gray_rows, (colour - colour[:, :1]).abs().amax(dim=(1, 2)) < 1e-6)
    assert 0.22 < gray_rows.float().mean() < 0.38
    globals_ = unnormalise(MultiCropPhotometric(cfg)(batch)["collated_global_crops"], cfg)
    assert globals_.max() <= 0.5 + 1e-5  # every global crop solarised: nothing above the threshold


def test_batched_photometric_equals_per_sample_path(tiles: list[bytes]) -> None:
    cfg = MultiCropConfig(seed=5)
    keys = list(range(len(tiles)))
    per_sample = [MultiCropAugment(cfg)(t, key=k) for t, k in zip(tiles, keys)]
    deferred = collate_multicrop([MultiCropAugment(cfg, photometric=False)(t, key=k) for t, k in zip(tiles, keys)])
    out = MultiCropPhotometric(cfg)(deferred)
    expected = collate_multicrop(per_sample)
    assert "global_params" not in out and "global_params" in deferred  # the input batch is not modified
    for name in ("collated_global_crops", "collated_local_crops"):
        torch.testing.assert_close(out[name], expected[name], atol=1e-5, rtol=0)
    in_worker_bf16 = MultiCropAugment(cfg, dtype=torch.bfloat16)(tiles[0], key=0)["local_crops"]
    assert in_worker_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(in_worker_bf16.float(), per_sample[0]["local_crops"], atol=0.05, rtol=0.01)
    bf16 = MultiCropPhotometric(cfg, dtype=torch.bfloat16)(deferred)["collated_global_crops"]
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), expected["collated_global_crops"], atol=0.05, rtol=0.01)


def test_photometric_inside_a_bf16_autocast_step_still_computes_in_float32(tiles: list[bytes]) -> None:
    # On the device it runs inside the training step's autocast, whose bf16 bmm/conv2d would move
    # crops by up to ~3/255 (CPU autocast casts the same ops as CUDA's).
    cfg = MultiCropConfig(seed=3, global_blur_p=(1.0,), local_blur_p=1.0)
    batch = collate_multicrop([MultiCropAugment(cfg, photometric=False)(t, key=k) for k, t in enumerate(tiles)])
    plain = MultiCropPhotometric(cfg)(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_step = MultiCropPhotometric(cfg)(batch)
    for name in ("collated_global_crops", "collated_local_crops"):
        assert in_step[name].dtype == torch.float32
        torch.testing.assert_close(in_step[name], plain[name], atol=0, rtol=0)


def test_collate_is_crop_major(tiles: list[bytes]) -> None:
    aug = MultiCropAugment(MultiCropConfig(), photometric=False)
    samples = [aug(t, key=i) for i, t in enumerate(tiles[:3])]
    batch = collate_multicrop(samples)
    assert batch["collated_global_crops"].shape == (6, 3, 224, 224)
    assert batch["collated_local_crops"].shape == (24, 3, 96, 96)
    assert batch["n_global_crops"] == 2 and batch["n_local_crops"] == 8
    for i, b in itertools.product(range(2), range(3)):
        assert torch.equal(batch["collated_global_crops"][i * 3 + b], samples[b]["global_crops"][i])
        assert torch.equal(batch["global_params"].colour[i * 3 + b], samples[b]["global_params"].colour[i])
    for i, b in itertools.product(range(8), range(3)):
        assert torch.equal(batch["collated_local_crops"][i * 3 + b], samples[b]["local_crops"][i])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_photometric_on_cuda_matches_cpu(tiles: list[bytes]) -> None:
    cfg = MultiCropConfig()
    batch = collate_multicrop([MultiCropAugment(cfg, photometric=False)(t, key=i) for i, t in enumerate(tiles)])
    cpu = MultiCropPhotometric(cfg)(batch)
    gpu_batch = dict(
        batch,
        collated_global_crops=batch["collated_global_crops"].cuda(),
        collated_local_crops=batch["collated_local_crops"].cuda(),
    )
    gpu = MultiCropPhotometric(cfg)(gpu_batch)
    for name in ("collated_global_crops", "collated_local_crops"):
        assert gpu[name].is_cuda
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], atol=1e-3, rtol=0)


def test_apply_photometric_rejects_mismatched_params(tiles: list[bytes]) -> None:
    sample = MultiCropAugment(photometric=False)(tiles[0], key=0)
    with pytest.raises(ValueError, match="rows"):
        apply_photometric(sample["global_crops"], sample["local_params"])


# ----------------------------------------------------------------------------- stain option, eval, config


def test_stain_normalisation_before_multicrop(sample_data: Path, tiles: list[bytes], tmp_path: Path) -> None:
    ref = str(sample_data / AMIBR_PATCH)
    plain = MultiCropAugment(MultiCropConfig(n_local=0), photometric=False)(tiles[0], key=0)["global_crops"]
    cfg = MultiCropConfig(n_local=0, stain_norm="macenko", stain_reference=ref)
    normed = MultiCropAugment(cfg, photometric=False)(tiles[0], key=0)["global_crops"]
    assert normed.shape == plain.shape and (normed.float() - plain.float()).abs().mean() > 3.0
    # Picklable, so that DataLoader workers started with "spawn" get the fitted normaliser.
    clone = pickle.loads(pickle.dumps(MultiCropAugment(cfg, photometric=False)))
    assert torch.equal(clone(tiles[0], key=0)["global_crops"], normed)
    with pytest.raises(UserError, match="stain_reference"):
        MultiCropConfig(stain_norm="reinhard")
    with pytest.raises(UserError, match="not found"):
        MultiCropAugment(MultiCropConfig(stain_norm="reinhard", stain_reference=str(tmp_path / "none.png")))


def test_eval_transform_resizes_centre_crops_and_normalises(sample_data: Path) -> None:
    smear = sample_data / "bccd/BCCD/JPEGImages/BloodImage_00000.jpg"  # 640x480
    x = eval_transform(224)(smear.read_bytes())
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    img = as_rgb_tensor(smear)
    ref = TF.center_crop(TF.resize(img, [224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [224, 224])
    torch.testing.assert_close(x, TF.normalize(ref.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    assert eval_transform(96, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)(smear).shape == (3, 96, 96)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_global=0),
        dict(global_scale=(0.9, 0.2)),
        dict(hue=0.7),
        dict(blur_kernel_size=8),
        dict(global_blur_p=(1.5,)),
        dict(stain_norm="vahadane", stain_reference="x.png"),
        dict(interpolation="nearest"),
    ],
)
def test_bad_config_raises_user_error(kwargs: dict) -> None:
    with pytest.raises(UserError):
        MultiCropConfig(**kwargs)
