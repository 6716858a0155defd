"""``python -m finetune.segment``: a U-Net decoder on an encoder's blocks, for semantic masks.

    python -m finetune.segment --ckpt REF --train wbc_seg:DATA?dataset=1 --out runs/wbc [--test SPEC]
        [--config segment_wbc] [--mode frozen|last-N|full|lora] [key=value ...]
    python -m finetune.segment --eval runs/wbc --test SPEC [--out results.json]

Targets come from mask values (``segment.labels``): each label is the set of mask values it covers,
e.g. WBC masks 0/128/255 give ``cell: [128, 255]`` (cytoplasm + nucleus) and ``nucleus: [255]``. With
``multilabel`` (default) each label is its own sigmoid channel and labels may overlap; otherwise
labels are disjoint classes of one softmax, ``background`` the rest. A mask value in no label and not
background, or a mask whose size differs from its image, fails before anything is built.

The network (:class:`UNetDecoder`): the encoder's ``segment.blocks`` (default: spread over its depth)
as maps, brought to strides p, p/2, p/4, ... by :class:`finetune.necks.UNetSkips`, merged deep to
shallow, then resized to the image and merged with a full-resolution stem on the image itself, which
gives the pixel detail a stride-16 token grid lacks (CellViT; eva's decoder with the image). Losses
are MONAI's: ``dice``, ``dice_ce`` (Dice + BCE for labels, Dice + CE for classes) and
``generalized_dice``. The decoder normalises with GroupNorm: no running statistics, so DDP ranks and
small batches see the same network.

Training crops ``segment.crop`` px with flips and 90-degree rotations; validation and test predict
whole images of any size by sliding windows of that size (MONAI's ``sliding_window_inference``, a
Gaussian-weighted blend of half-overlapping windows). After training, the post-processing of each
label (connected components keeping the largest k, hole filling, small-object removal) is chosen on
the validation split. Scores per label: Dice and IoU per image and pooled; with ``objects``,
objects too (GlaS object F1 / Dice / Hausdorff and AJI): a prediction's objects are its connected
components, the truth's either its connected components (``components``: MoNuSeg's eroded nuclei)
or the stored mask values (``mask``: GlaS masks hold one id per gland). A few test
images are drawn with truth and prediction outlines into ``overlays/``.
"""

from __future__ import annotations

import itertools
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finetune import stage
from finetune.metrics import instance_metrics, instances, segmentation_metrics
from finetune.necks import UNetSkips, conv_block, up_block
from finetune.postprocess import PostProcess, choose
from ssl_path.core.errors import ConfigError, UserError
from ssl_path.core.io import atomic_path
from ssl_path.data.images import as_rgb_tensor
from ssl_path.data.masks import read_mask
from ssl_path.data.readers import LabelledSet
from ssl_path.encoder import EncoderInfo

LOSSES = ("dice", "dice_ce", "generalized_dice")
OBJECTS = ("none", "components", "mask")
OVERLAYS = "overlays"


@dataclass(frozen=True)
class SegmentConfig:
    labels: dict = field(default_factory=dict)  # name -> the mask values it covers (ints, or "a-b" ranges)
    background: tuple[int, ...] = (0,)
    multilabel: bool = True
    loss: str = "dice_ce"
    crop: int = 224  # training crop and sliding window side, in pixels
    crops_per_image: int = 1  # random crops of each image per epoch (large images hold many crops)
    blocks: tuple[int, ...] = ()  # encoder blocks feeding the decoder; () = spread over its depth
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32)  # deep to shallow, one per block
    stem_channels: int = 32
    window_overlap: float = 0.5
    window_batch: int = 16  # windows per forward pass of sliding-window inference
    threshold: float = 0.5
    objects: str = "none"  # also score objects: none | components (of each label) | mask (its values are ids)
    overlays: int = 4

    def __post_init__(self) -> None:
        if not self.labels:
            raise ConfigError("segment.labels is empty; map each label to its mask values, e.g. {nucleus: [255]}")
        labels = {name: mask_value_list(f"segment.labels.{name}", values) for name, values in self.labels.items()}
        object.__setattr__(self, "labels", labels)
        if self.objects not in OBJECTS:
            raise ConfigError(f"segment.objects must be one of {', '.join(OBJECTS)}, not {self.objects!r}")
        covered = [v for values in self.labels.values() for v in values]
        if set(covered) & set(self.background):
            raise ConfigError(f"segment: background values {list(self.background)} also name a label")
        if not self.multilabel and len(covered) != len(set(covered)):
            raise ConfigError("segment: labels share mask values; set segment.multilabel=true for overlapping labels")
        if self.loss not in LOSSES:
            raise ConfigError(f"segment.loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if (
            self.crop < 16
            or self.crops_per_image < 1
            or self.window_batch < 1
            or not 0 <= self.window_overlap < 1
            or not 0 < self.threshold < 1
            or self.overlays < 0
        ):
            raise ConfigError(
                "segment: crop >= 16, crops_per_image >= 1, window_batch >= 1, window_overlap in [0, 1), "
                "threshold in (0, 1) and overlays >= 0 are required"
            )
        if not self.decoder_channels or min(self.decoder_channels) < 1:
            raise ConfigError("segment.decoder_channels needs one positive width per decoder level")
        if self.blocks and len(self.blocks) != len(self.decoder_channels):
            raise ConfigError(
                f"segment: {len(self.blocks)} blocks need as many decoder_channels, not {len(self.decoder_channels)}"
            )

    @property
    def names(self) -> list[str]:
        return list(self.labels)


def mask_value_list(key: str, values: Any) -> list[int]:
    """The mask values of config entry ``key``: a list of integers and ``"a-b"`` ranges (GlaS glands: ``["1-255"]``)."""
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{key} must be a list of mask values, not {values!r}")
    out: list[int] = []
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            out.append(value)
            continue
        low, dash, high = str(value).partition("-")
        if not (dash and low.isdigit() and high.isdigit() and int(low) <= int(high)):
            raise ConfigError(f"{key}: {value!r} is neither a mask value nor a range like '1-255'")
        out.extend(range(int(low), int(high) + 1))
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- targets and data


def label_masks(mask: np.ndarray, cfg: SegmentConfig) -> np.ndarray:
    """bool [L, H, W]: where each label's mask values are."""
    return np.stack([np.isin(mask, values) for values in cfg.labels.values()])


def check_masks(cfg: SegmentConfig, data: LabelledSet, flag: str) -> None:
    """Refuse, in one line, a set whose masks the head cannot learn from (before any model is built):
    no mask, a mask whose size differs from its image's, or values in no label. A file that cannot be
    read is no such mistake: training and scoring skip it and count it."""
    if not len(data):
        raise UserError(f"{flag} {data.source}: no images")
    known = {*cfg.background, *(v for values in cfg.labels.values() for v in values)}
    for record in data.records:
        if record.mask_path is None:
            raise UserError(f"{flag} {data.source}: {record.path} has no mask; segmentation needs one per image")
        try:
            mask, image = read_mask(record.mask_path), as_rgb_tensor(record.path)
        except UserError:
            continue  # unreadable: skipped and counted where it is drawn, as in a long run
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise UserError(
                f"{flag}: mask {record.mask_path} is {mask.shape[1]}x{mask.shape[0]} px, its image "
                f"{image.shape[2]}x{image.shape[1]}"
            )
        unknown = sorted(set(np.unique(mask).tolist()) - known)
        if unknown:
            raise UserError(
                f"{flag}: mask {record.mask_path} holds value(s) {unknown[:5]} that are neither a label "
                f"({dict(cfg.labels)}) nor background {list(cfg.background)}; set segment.labels"
            )


class SegmentationImages(torch.utils.data.Dataset):
    """``dataset[(index, epoch)]`` -> ``{"image", "target", "path", "error", "set"}``; with ``crop``, a
    random crop with flips and rotations drawn from (seed, epoch, index), ``cfg.crops_per_image`` of
    them per image and epoch, else the whole image.

    Targets: float [L, h, w] with ``multilabel``, else long [1, h, w] (0 background, label i -> i + 1).
    """

    def __init__(self, data: LabelledSet, cfg: SegmentConfig, info: EncoderInfo, crop: int | None, seed: int = 0):
        self.records, self.cfg, self.crop, self.seed, self.name = data.records, cfg, crop, seed, data.name
        self.mean = torch.tensor(info.mean).view(3, 1, 1)
        self.std = torch.tensor(info.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.records) * (self.cfg.crops_per_image if self.crop is not None else 1)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        record = self.records[index % len(self.records)]
        try:
            image = as_rgb_tensor(record.path)
            raw = read_mask(record.mask_path)
            masks = torch.from_numpy(label_masks(raw, self.cfg))
        except UserError as err:
            size = self.crop or 16
            blank = torch.zeros(len(self.cfg.labels), size, size)
            return {"image": torch.zeros(3, size, size), "target": self._target(blank), "path": record.path,
                    "error": str(err), "set": self.name}  # fmt: skip
        image = (image.float() / 255.0 - self.mean) / self.std
        if self.crop is not None:  # padding with 0 after normalising: the mean colour, as sliding windows pad
            image, masks = _random_view(image, masks, self.crop, np.random.default_rng([self.seed, epoch, index]))
        item = {"image": image, "target": self._target(masks), "path": record.path, "error": "", "set": self.name}
        if self.crop is None:
            item["mask"] = raw  # the whole mask as stored: object ids where its values are ones
        return item

    def _target(self, masks: Tensor) -> Tensor:
        if self.cfg.multilabel:
            return masks.float()
        classes = torch.zeros(masks.shape[1:], dtype=torch.long)
        for i in range(masks.shape[0]):
            classes[masks[i].bool()] = i + 1
        return classes[None]


def _random_view(image: Tensor, masks: Tensor, crop: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """The same random crop (zero-padded where the image is smaller), flips and rotation of both."""
    height, width = image.shape[1:]
    pad_h, pad_w = max(0, crop - height), max(0, crop - width)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
        masks = F.pad(masks, (0, pad_w, 0, pad_h))
        height, width = image.shape[1:]
    top, left = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
    image, masks = image[:, top : top + crop, left : left + crop], masks[:, top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        image, masks = image.flip(-1), masks.flip(-1)
    if rng.random() < 0.5:
        image, masks = image.flip(-2), masks.flip(-2)
    turns = int(rng.integers(0, 4))
    return image.rot90(turns, (-2, -1)).contiguous(), masks.rot90(turns, (-2, -1)).contiguous()


# ----------------------------------------------------------------------------- the network


class UNetDecoder(nn.Module):
    """Block maps + the image -> logits [B, n_out, H, W] at the image's resolution; see the module docstring."""

    reads = "maps"

    def __init__(
        self, embed_dim: int, blocks: Sequence[int], channels: Sequence[int], stem_channels: int, n_out: int
    ) -> None:
        super().__init__()
        self.blocks = tuple(blocks)
        channels = tuple(channels)[: len(self.blocks)]
        self.skips = UNetSkips(embed_dim, channels)
        self.ups = nn.ModuleList(up_block(channels[i - 1], channels[i]) for i in range(1, len(channels)))
        self.merges = nn.ModuleList(conv_block(2 * channels[i], channels[i]) for i in range(1, len(channels)))
        self.stem = conv_block(3, stem_channels)
        self.fuse = conv_block(channels[-1] + stem_channels, stem_channels)
        self.out = nn.Conv2d(stem_channels, n_out, 1)

    def forward(self, maps: Sequence[Tensor], images: Tensor) -> Tensor:
        skips = self.skips(maps)
        x = skips[0]
        for up, merge, skip in zip(self.ups, self.merges, skips[1:]):
            x = merge(torch.cat([up(x), skip], dim=1))
        x = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.fuse(torch.cat([x, self.stem(images)], dim=1)))


def build(cfg: SegmentConfig, info: EncoderInfo, data: LabelledSet) -> tuple[nn.Module, nn.Module]:
    from monai.losses import DiceCELoss, DiceLoss, GeneralizedDiceLoss

    blocks = cfg.blocks or info.dense_blocks[-len(cfg.decoder_channels) :]
    bad = [b for b in blocks if not 0 <= b < info.num_blocks]
    if bad:
        raise UserError(f"segment.blocks {list(blocks)}: {info.ref} has blocks 0..{info.num_blocks - 1}")
    if cfg.crop % info.patch_size:
        raise UserError(f"segment.crop {cfg.crop} is not a multiple of the patch size {info.patch_size} of {info.ref}")
    n_out = len(cfg.labels) + (0 if cfg.multilabel else 1)
    head = UNetDecoder(info.embed_dim, blocks, cfg.decoder_channels, cfg.stem_channels, n_out)
    if cfg.multilabel:
        # MONAI's DiceCELoss takes a softmax cross-entropy whenever there are several channels, which
        # overlapping labels are not: Dice + BCE is MONAI's Dice beside torch's BCE on the same logits.
        losses = {"dice": DiceLoss, "dice_ce": DiceBCELoss, "generalized_dice": GeneralizedDiceLoss}
        return head, losses[cfg.loss](sigmoid=True)
    losses = {"dice": DiceLoss, "dice_ce": DiceCELoss, "generalized_dice": GeneralizedDiceLoss}
    return head, losses[cfg.loss](softmax=True, to_onehot_y=True)


class DiceBCELoss(nn.Module):
    """MONAI's Dice loss plus torch's binary cross-entropy, both on the logits of independent labels."""

    def __init__(self, sigmoid: bool = True) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=sigmoid)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.dice(logits, target) + self.bce(logits, target)


# ----------------------------------------------------------------------------- inference and scores


@torch.no_grad()
def predict_probs(task: nn.Module, image: Tensor, cfg: SegmentConfig, mode: str = "gaussian") -> Tensor:
    """Probabilities [C, H, W] of one normalised image [3, H, W] of any size, by sliding windows."""
    from monai.inferers import sliding_window_inference

    device = next(task.parameters()).device

    def predictor(windows: Tensor) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
            logits = task.logits(windows).float()
        return torch.sigmoid(logits) if cfg.multilabel else torch.softmax(logits, dim=1)

    probs = sliding_window_inference(
        image[None].to(device), (cfg.crop, cfg.crop), cfg.window_batch, predictor, overlap=cfg.window_overlap, mode=mode
    )
    return probs[0].float().cpu()


def probs_to_masks(probs: Tensor, cfg: SegmentConfig) -> np.ndarray:
    """bool [L, H, W] from probabilities: thresholds per label, or the arg-max class."""
    if cfg.multilabel:
        return (probs > cfg.threshold).numpy()
    winner = probs.argmax(0)
    return np.stack([(winner == i + 1).numpy() for i in range(len(cfg.labels))])


def _predictions(task: nn.Module, data: LabelledSet, cfg: SegmentConfig) -> tuple[list, list, list, list]:
    """Predicted and true label masks of every readable image, those images' (record, stored mask),
    and (path, reason) of each image that could not be read."""
    images = SegmentationImages(data, cfg, task.info, crop=None)
    preds, truths, kept, skipped = [], [], [], []
    for i in range(len(images)):
        item = images[i]
        if item["error"]:
            skipped.append((item["path"], item["error"]))
            continue
        preds.append(probs_to_masks(predict_probs(task, item["image"], cfg), cfg))
        truths.append(item["target"].bool().numpy() if cfg.multilabel else _one_hot(item["target"][0], cfg))
        kept.append((data.records[i], item["mask"]))
    return preds, truths, kept, skipped


def _one_hot(classes: Tensor, cfg: SegmentConfig) -> np.ndarray:
    return np.stack([(classes == i + 1).numpy() for i in range(len(cfg.labels))])


def validate(cfg: SegmentConfig, task: nn.Module, data: LabelledSet) -> dict[str, Any]:
    preds, truths, _, skipped = _predictions(task, data, cfg)
    if not preds:
        raise UserError(f"{data.source}: no readable validation image")
    scores = segmentation_metrics(preds, truths, cfg.names)
    return {
        "dice": float(np.mean([scores[name]["dice"] for name in cfg.names])),
        **{f"dice_{name}": scores[name]["dice"] for name in cfg.names},
        **({"skipped": skipped} if skipped else {}),
    }


def choose_postprocess(cfg: SegmentConfig, task: nn.Module, data: LabelledSet) -> dict[str, Any]:
    preds, truths, _, _ = _predictions(task, data, cfg)
    chosen = {}
    for i, name in enumerate(cfg.names):
        best, score = choose([p[i] for p in preds], [t[i] for t in truths])
        chosen[name] = {**best.to_dict(), "validation_dice": score}
    return {"postprocess": chosen}


def _postprocessors(selection: dict[str, Any], cfg: SegmentConfig) -> list[PostProcess]:
    chosen = selection.get("postprocess", {})
    return [
        PostProcess(**{k: v for k, v in chosen.get(name, {}).items() if k != "validation_dice"}) for name in cfg.names
    ]


def evaluate(
    cfg: SegmentConfig, task: nn.Module, data: LabelledSet, selection: dict[str, Any], run_dir: Path | None, name: str
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Rows per label (pixel scores, object scores with ``objects``) and the images skipped;
    overlays into ``run_dir``."""
    post = _postprocessors(selection, cfg)
    preds, truths, kept, skipped = _predictions(task, data, cfg)
    if not preds:
        raise stage.no_readable_image(data, skipped)
    preds = [np.stack([post[i](p[i]) for i in range(len(post))]) for p in preds]
    scores = segmentation_metrics(preds, truths, cfg.names)
    rows: dict[str, Any] = {}
    for i, label in enumerate(cfg.names):
        row = dict(scores[label])
        if cfg.objects != "none":
            truth_objects = [
                instances(t[i]) if cfg.objects == "components" else np.where(t[i], stored, 0).astype(np.int32)
                for t, (_, stored) in zip(truths, kept)
            ]
            row.update(instance_metrics([instances(p[i]) for p in preds], truth_objects))
        rows[label] = row
    if run_dir is not None and cfg.overlays:
        draw_overlays([record for record, _ in kept], preds, cfg, Path(run_dir) / OVERLAYS, name)
    return rows, skipped


def draw_overlays(
    records: Sequence[Any], preds: Sequence[np.ndarray], cfg: SegmentConfig, folder: Path, name: str
) -> None:
    """The first test images with truth (left) and prediction (right) outlines per label, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    colours = plt.get_cmap("tab10")
    for record, pred in list(zip(records, preds))[: cfg.overlays]:
        image = as_rgb_tensor(record.path).permute(1, 2, 0).numpy()
        truth = label_masks(read_mask(record.mask_path), cfg)
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
        for ax, masks, title in ((axes[0], truth, "truth"), (axes[1], pred, "prediction")):
            ax.imshow(image)
            for i, label in enumerate(cfg.names):
                if masks[i].any():
                    ax.contour(masks[i], levels=[0.5], colors=[colours(i)], linewidths=0.8)
                ax.plot([], [], color=colours(i), label=label)
            ax.set_title(title)
            ax.axis("off")
        axes[1].legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        with atomic_path(folder / f"{name}_{Path(record.path).stem}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


def mask_values(masks: np.ndarray, cfg: SegmentConfig) -> np.ndarray:
    """One mask [H, W] in the training set's values from predicted labels [L, H, W]: each pixel takes the
    value whose labels are exactly those predicted there, else the closest such value (the most
    predicted labels it covers, the fewest it adds); nothing predicted is the first background value."""
    values = [cfg.background[0], *dict.fromkeys(v for vs in cfg.labels.values() for v in vs)]
    covers = np.array([[v in vs for vs in cfg.labels.values()] for v in values])  # [V, L]
    combos = np.array(list(itertools.product([False, True], repeat=len(cfg.labels))))  # [2^L, L]
    found = (combos[:, None, :] & covers[None]).sum(-1)
    added = (~combos[:, None, :] & covers[None]).sum(-1)
    score = found * (len(cfg.labels) + 1) - added  # first the most found, then the fewest added
    exact = (combos[:, None, :] == covers[None]).all(-1)
    best = np.where(exact.any(1), exact.argmax(1), score.argmax(1))  # [2^L] -> value index
    code = (masks.astype(np.int64) * (1 << np.arange(len(cfg.labels))[::-1, None, None])).sum(0)
    dtype = np.uint8 if max(values) < 256 else np.uint16
    return np.asarray(values, dtype=dtype)[best[code]]


def predict_files(
    cfg: SegmentConfig,
    task: nn.Module,
    paths: Sequence[Path],
    selection: dict[str, Any],
    out: Path,
    advance: Callable[[int], object],
) -> int:
    """A mask PNG per image (its stem, in ``out``), in the label values of the training set."""
    from PIL import Image

    post = _postprocessors(selection, cfg)
    mean, std = torch.tensor(task.info.mean).view(3, 1, 1), torch.tensor(task.info.std).view(3, 1, 1)
    written = 0
    for path in paths:
        try:
            image = as_rgb_tensor(path)
        except UserError as err:
            print(f"warning: skipped {path}: {err}", file=sys.stderr)
            advance(1)
            continue
        masks = probs_to_masks(predict_probs(task, (image.float() / 255.0 - mean) / std, cfg), cfg)
        masks = np.stack([post[i](masks[i]) for i in range(len(post))])
        with atomic_path(out / f"{Path(path).stem}.png") as tmp:
            Image.fromarray(mask_values(masks, cfg)).save(tmp, format="PNG")
        written += 1
        advance(1)
    return written


def train_data(cfg: SegmentConfig, data: LabelledSet, info: EncoderInfo, seed: int) -> tuple[Any, None]:
    return SegmentationImages(data, cfg, info, crop=cfg.crop, seed=seed), None


HEAD = stage.Head(
    name="segment",
    task="segmentation",
    title="U-Net segmentation head",
    config=SegmentConfig,
    default_config="segment_wbc",
    score="dice",
    figures=(OVERLAYS,),
    classes=lambda cfg, data: cfg.names,
    check=check_masks,
    build=build,
    train_data=train_data,
    validate=validate,
    choose=choose_postprocess,
    evaluate=evaluate,
    predict=predict_files,
)


def check_command(argv: Sequence[str] | None = None) -> None:
    stage.check_config(HEAD, stage.parse_request(HEAD, argv))


def main(argv: Sequence[str] | None = None) -> int:
    return stage.main(HEAD, argv)


if __name__ == "__main__":
    stage.cli(HEAD)
