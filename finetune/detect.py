"""``python -m finetune.detect``: torchvision's detectors on a plain ViT, for boxes, points and instances.

    python -m finetune.detect --ckpt REF --train voc:DATA/bccd --out runs/bccd [--test SPEC]
        [--head retinanet|fcos|fasterrcnn|maskrcnn] [--config detect_bccd] [--mode frozen|last-N|full|lora]
        [--fractions 0.1 0.5 1 | --leave-one-domain-out]
    python -m finetune.detect --eval runs/bccd --test SPEC [--out results.json]
    python -m finetune.predict --run runs/bccd --data IMAGES --out DIR

Objects come from a set's boxes (``voc``, ``coco``, ``midog``), from its points as boxes of
``detect.point_radius`` (a points-only set), or, with ``detect.instances``, from its masks: the connected
components of the ``instance_values`` (MoNuSeg's eroded nuclei) or each stored value as one object (GlaS
glands); ``maskrcnn`` learns those masks too. Classes are the set's; hard negatives (``negatives``, MIDOG's
imposters) are learned as their own class but never scored: the "all" row and the threshold cover the
others only.

The network is :func:`finetune.detectors.build_detector` (ViTDet's simple feature pyramid under
torchvision's heads and losses) with the anchors sized from the training boxes. Images are read at
``detect.scale`` (a 640x480 smear at 0.5 is 320x240) and trained as ``window``-pixel crops: with
probability ``guided`` a crop is centred on an object of the ``guide_classes``, else drawn uniformly
(:func:`finetune.windows.guided_crop`); flips and 90-degree turns; ``class_weighting`` draws images in
inverse proportion to the frequency of their rarest class. Validation, test and ``predict`` run overlapping
windows over whole images of any size and merge them (:func:`finetune.windows.merge_windows`); boxes,
points and masks are scored in the images' own pixels, whatever ``scale`` the network saw.

Selection: mAP@0.5 on the validation split (the set's ``val`` split where it has one); then the score
threshold with the best point F1 on it (MIDOG's rule, radius ``detect.radius``: by default MIDOG's 30 px =
7.5 um at 0.25 um/px, for mitoses; 12 px in ``detect_monuseg``, HoVer-Net's for nuclei, which lie closer). Scores (:func:`finetune.detection_metrics.detection_report`): COCO mAP@[.5:.95], @.5 and @.75 by
pycocotools, point precision / recall / F1 at the chosen threshold, per class and per domain; for
``maskrcnn`` also mask mAP and, from the masks pasted into each image, AJI and object F1 / Dice as the
segmentation head reports them. ``overlays/`` draws truth and predictions on a few test images and
``predictions/`` holds the test set's COCO results json.

A series of runs under one ``--out`` (:func:`finetune.stage.run_series`): ``--fractions`` trains one run
per share of the training images (drawn uniformly; validation and test stay whole), and
``--leave-one-domain-out`` one per domain of ``--train`` (MIDOG's scanners, MoNuSeg's organs), trained on
the others and tested on it; ``results.json`` there holds every run's rows under its name.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finetune import stage
from finetune.detection_metrics import (
    MIDOG_RADIUS_PX,
    box_centres,
    choose_threshold,
    coco_map,
    coco_results,
    detection_report,
    mask_rle,
)
from finetune.detectors import HEADS, anchor_sizes, build_detector
from finetune.metrics import instance_metrics, instances
from finetune.segment import mask_value_list
from finetune.windows import guided_crop, merge_windows, windows
from ssl_path.core.cli import Parser
from ssl_path.core.errors import ConfigError, UserError, run_cli
from ssl_path.core.io import atomic_path, write_json
from ssl_path.data.images import as_rgb_tensor
from ssl_path.data.masks import read_mask
from ssl_path.data.readers import LabelledSet, Record
from ssl_path.encoder import EncoderInfo
from ssl_path.evaluation.results import make_results, write_results
from ssl_path.training.loop import TrainingDiverged

INSTANCES = ("none", "components", "ids")
OVERLAYS = "overlays"
PREDICTIONS = "predictions"
RESULTS_JSON = "coco_results.json"  # COCO's results format: a list of detections with image ids
IMAGES_JSON = "coco_images.json"  # the images and categories those ids name (a COCO dataset without annotations)
POINTS_CSV = "points.csv"


@dataclass(frozen=True)
class DetectConfig:
    head: str = "retinanet"  # retinanet | fcos | fasterrcnn | maskrcnn
    scale: float = 1.0  # images (and their boxes, points, masks) are resized by this factor when read
    window: int = 256  # training crop and inference window side, in pixels at ``scale``
    window_overlap: int = 64  # px; at least the largest object for a cut object to be kept once
    window_batch: int = 4  # windows per forward pass at inference
    crops_per_image: int = 1  # training crops of each image per epoch
    guided: float = 0.5  # probability of a crop centred on an object of the guide classes
    guide_classes: tuple[str, ...] = ()  # () = every class but the negatives
    negatives: tuple[str, ...] = ()  # hard-negative classes: learned as their own class, never scored
    class_weighting: bool = False  # draw images in inverse proportion to their rarest class's frequency
    point_radius: float = 25.0  # half side of the box made from a point (MIDOG's boxes are 50 px)
    instances: str = "none"  # objects from masks: none | components | ids (each stored value one object)
    instance_values: tuple = ()  # mask values that are objects (ints or "a-b" ranges); () = every value > 0
    instance_class: str = "object"  # the class name of mask objects
    channels: int = 256  # pyramid and head width
    anchors: tuple[int, ...] = ()  # one size per pyramid level; () = from the training boxes
    max_detections: int = 300  # per window
    score_threshold: float = 0.05  # detections kept below the chosen threshold, for AP
    nms_iou: float = 0.5  # class-wise NMS of the merged windows
    radius: float = MIDOG_RADIUS_PX  # point-match radius in the image's own pixels
    overlays: int = 3

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"detect.head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.instances not in INSTANCES:
            raise ConfigError(f"detect.instances must be one of {', '.join(INSTANCES)}, not {self.instances!r}")
        if self.head == "maskrcnn" and self.instances == "none":
            raise ConfigError("detect.head=maskrcnn learns masks: set detect.instances=components or ids")
        if not 0 < self.scale <= 4 or self.window < 32 or not 0 <= self.window_overlap < self.window:
            raise ConfigError("detect: scale in (0, 4], window >= 32 and window_overlap in [0, window) are required")
        if not 0 <= self.guided <= 1 or self.crops_per_image < 1 or self.window_batch < 1 or self.overlays < 0:
            raise ConfigError(
                "detect: guided in [0, 1], crops_per_image >= 1, window_batch >= 1 and overlays >= 0 are required"
            )
        if self.point_radius <= 0 or self.radius <= 0 or not 0 < self.nms_iou <= 1 or self.channels < 32:
            raise ConfigError("detect: point_radius > 0, radius > 0, nms_iou in (0, 1] and channels >= 32 are required")
        if self.channels % 32:
            raise ConfigError(f"detect.channels {self.channels} must be a multiple of 32 (the heads' GroupNorm)")
        if self.anchors and (len(self.anchors) != 5 or min(self.anchors) < 1):
            raise ConfigError(f"detect.anchors needs 5 positive sizes (p2..p6), not {list(self.anchors)}")
        object.__setattr__(self, "instance_values", tuple(mask_value_list("detect.instance_values", self.instance_values))
                           if self.instance_values else ())  # fmt: skip


# ----------------------------------------------------------------------------- objects of a record


def set_classes(cfg: DetectConfig, data: LabelledSet) -> list[str]:
    """The classes a detector learns: the set's, or the one class of mask objects."""
    return [cfg.instance_class] if cfg.instances != "none" else list(data.classes)


def scored_classes(cfg: DetectConfig, classes: Sequence[str]) -> list[int]:
    """Indices of the classes that are scored (all but the hard negatives)."""
    return [i for i, name in enumerate(classes) if name not in cfg.negatives]


@dataclass
class Objects:
    """A record's objects in its image's pixels: boxes [N, 4] xyxy, class indices [N], and with
    instances the label image (0 background, object k = k + 1 in box order)."""

    boxes: np.ndarray
    labels: np.ndarray
    instance_map: np.ndarray | None = None


def record_objects(record: Record, cfg: DetectConfig, classes: Sequence[str]) -> Objects:
    """The objects of ``record``: from its mask with instances, else its boxes, else boxes around its points."""
    if cfg.instances != "none":
        return _mask_objects(read_mask(record.mask_path), cfg)
    index = {name: i for i, name in enumerate(classes)}
    if record.boxes:
        boxes = np.array([[b.x0, b.y0, b.x1, b.y1] for b in record.boxes], dtype=np.float32)
        labels = np.array([index[b.label] for b in record.boxes], dtype=np.int64)
    elif record.points:
        r = cfg.point_radius
        boxes = np.array([[p.x - r, p.y - r, p.x + r, p.y + r] for p in record.points], dtype=np.float32)
        labels = np.array([index[p.label] for p in record.points], dtype=np.int64)
    else:
        boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    return Objects(boxes, labels)


def _mask_objects(mask: np.ndarray, cfg: DetectConfig) -> Objects:
    objects = np.isin(mask, cfg.instance_values) if cfg.instance_values else mask > 0
    if cfg.instances == "components":
        instance_map = instances(objects)
    else:
        instance_map = _renumbered(np.where(objects, mask, 0))
    return Objects(_boxes_of(instance_map), np.zeros(int(instance_map.max()), np.int64), instance_map)


def _renumbered(ids: np.ndarray) -> np.ndarray:
    """int32 labels 1..K of the K distinct non-zero values of ``ids``, in value order; 0 stays 0."""
    out = np.zeros(ids.shape, np.int32)
    objects = ids > 0
    out[objects] = np.searchsorted(np.unique(ids[objects]), ids[objects]) + 1
    return out


def _boxes_of(instance_map: np.ndarray) -> np.ndarray:
    """[K, 4] xyxy pixel-edge boxes of objects 1..K of a label image (an object of one pixel is 1 px wide)."""
    k = int(instance_map.max())
    if k == 0:
        return np.zeros((0, 4), np.float32)
    from scipy import ndimage

    slices = ndimage.find_objects(instance_map, max_label=k)
    return np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=np.float32)


def check_set(cfg: DetectConfig, data: LabelledSet, flag: str) -> None:
    """Refuse, in one line, a set the detector cannot learn from or be scored on."""
    if not len(data):
        raise UserError(f"{flag} {data.source}: no images")
    if cfg.instances != "none":
        missing = [r.path for r in data.records if r.mask_path is None]
        if missing:
            raise UserError(
                f"{flag} {data.source}: {missing[0]} has no mask; detect.instances={cfg.instances} needs one"
            )
        return
    if not any(r.boxes or r.points for r in data.records):
        raise UserError(
            f"{flag} {data.source}: no boxes or points; for objects from masks set detect.instances=components or ids"
        )
    for names, key in ((cfg.negatives, "negatives"), (cfg.guide_classes, "guide_classes")):
        unknown = [n for n in names if n not in data.classes]
        if unknown:
            raise UserError(f"detect.{key}: {unknown[0]!r} is not a class of {data.source} ({', '.join(data.classes)})")
    if not scored_classes(cfg, data.classes):
        raise UserError(f"detect.negatives names every class of {data.source}; nothing would be scored")
    dropped = data.info.get("degenerate_boxes_dropped", 0)
    if dropped:
        print(f"warning: {flag} {data.source}: {dropped} box(es) without area dropped "
              f"({data.info.get('degenerate_by_class', {})})", file=sys.stderr)  # fmt: skip
    clipped, outside = data.info.get("boxes_clipped", 0), data.info.get("boxes_outside_image", 0)
    if clipped:
        print(f"warning: {flag} {data.source}: {clipped} box(es) reached past their image (by the size its "
              "annotation gives) and were clipped to it", file=sys.stderr)  # fmt: skip
    if outside:
        print(f"warning: {flag} {data.source}: {outside} box(es) lay wholly outside their image (by the size "
              "its annotation gives) and were dropped", file=sys.stderr)  # fmt: skip
    unlisted = data.info.get("listed_without_annotation", [])
    if unlisted:
        (listing, image_id), more = unlisted[0], f" ({len(unlisted)} such ids in all)" if len(unlisted) > 1 else ""
        print(f"warning: {flag} {data.source}: ImageSets/Main/{listing} lists {image_id!r}, which has no "
              f"annotation{more}; it is in no split", file=sys.stderr)  # fmt: skip


# ----------------------------------------------------------------------------- images at scale


def read_scaled(path: str, scale: float) -> Tensor:
    """float [3, h, w] in [0, 1] at ``scale`` (torchvision's transform normalises with the encoder's statistics)."""
    image = as_rgb_tensor(path).float() / 255.0
    if scale == 1.0:
        return image
    return F.interpolate(image[None], scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)[0]


def _scaled_map(instance_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if instance_map.shape == size:
        return instance_map
    resized = F.interpolate(torch.from_numpy(instance_map)[None, None].float(), size=size, mode="nearest")
    return resized[0, 0].to(torch.int32).numpy()


def _pad(image: Tensor, size: int, fill: Sequence[float]) -> Tensor:
    """``image`` padded right and bottom to ``size`` with the mean colour (zero once normalised)."""
    h, w = image.shape[-2:]
    if h >= size and w >= size:
        return image
    out = torch.tensor(list(fill), dtype=image.dtype).view(3, 1, 1).expand(3, max(h, size), max(w, size)).clone()
    out[:, :h, :w] = image
    return out


class DetectionCrops(torch.utils.data.Dataset):
    """``dataset[(index, epoch)]`` -> ``{"image", "target", "path", "error", "set"}``: a ``window`` crop
    (guided, flipped, turned; drawn from (seed, epoch, index)) and its torchvision target: ``boxes``,
    ``labels`` (class index + 1) and, with instances, ``masks``. ``cfg.crops_per_image`` per image."""

    def __init__(self, data: LabelledSet, cfg: DetectConfig, info: EncoderInfo, classes: Sequence[str], seed: int):
        self.records, self.cfg, self.classes, self.seed, self.name = data.records, cfg, list(classes), seed, data.name
        self.mean = tuple(info.mean)
        guide = cfg.guide_classes or [c for c in self.classes if c not in cfg.negatives]
        self.guide = np.array([c in guide for c in self.classes])

    def __len__(self) -> int:
        return len(self.records) * self.cfg.crops_per_image

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        record, cfg, size = self.records[index % len(self.records)], self.cfg, self.cfg.window
        try:
            image = read_scaled(record.path, cfg.scale)
            objects = record_objects(record, cfg, self.classes)
        except UserError as err:
            empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
            if cfg.instances != "none":
                empty["masks"] = torch.zeros(0, size, size, dtype=torch.uint8)
            return {"image": torch.zeros(3, size, size), "target": empty, "path": record.path, "error": str(err),
                    "set": self.name}  # fmt: skip
        rng = np.random.default_rng([self.seed, epoch, index])
        h, w = image.shape[-2:]
        boxes = objects.boxes * cfg.scale
        y0, x0 = guided_crop(rng, (h, w), size, box_centres(boxes), self.guide[objects.labels], cfg.guided)
        image = _pad(image[:, y0 : y0 + size, x0 : x0 + size], size, self.mean)
        if objects.instance_map is not None:
            target = _crop_instances(_scaled_map(objects.instance_map, (h, w)), objects.labels, y0, x0, size)
        else:
            target = _crop_boxes(boxes, objects.labels, y0, x0, size, (h, w))
        image, target = _flip_turn(image, target, rng)
        return {"image": image, "target": target, "path": record.path, "error": "", "set": self.name}


def _crop_boxes(
    boxes: np.ndarray, labels: np.ndarray, y0: int, x0: int, size: int, image_size: tuple[int, int]
) -> dict[str, Tensor]:
    """The boxes whose centre lies in the crop (within the image), clipped to it, in crop coordinates."""
    h, w = min(size, image_size[0] - y0), min(size, image_size[1] - x0)
    shifted = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    cx, cy = (shifted[:, 0] + shifted[:, 2]) / 2, (shifted[:, 1] + shifted[:, 3]) / 2
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    kept = np.clip(shifted[inside], 0, [w, h, w, h])
    visible = (kept[:, 2] - kept[:, 0] >= 1) & (kept[:, 3] - kept[:, 1] >= 1)
    return {
        "boxes": torch.from_numpy(kept[visible].astype(np.float32)).reshape(-1, 4),
        "labels": torch.from_numpy(labels[inside][visible] + 1),
    }


def _crop_instances(instance_map: np.ndarray, labels: np.ndarray, y0: int, x0: int, size: int) -> dict[str, Tensor]:
    """The objects with pixels in the crop: their masks (padded to the window), boxes and labels."""
    crop = np.zeros((size, size), np.int32)
    part = instance_map[y0 : y0 + size, x0 : x0 + size]
    crop[: part.shape[0], : part.shape[1]] = part
    ids = np.unique(crop[crop > 0])
    relabelled = _renumbered(crop)
    masks = relabelled[None] == np.arange(1, len(ids) + 1)[:, None, None]
    return {
        "boxes": torch.from_numpy(_boxes_of(relabelled)).reshape(-1, 4),
        "labels": torch.from_numpy(labels[ids - 1] + 1),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }


def _flip_turn(image: Tensor, target: dict[str, Tensor], rng: np.random.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """The same random flips and 90-degree turn of a square crop, its boxes and masks."""
    size = image.shape[-1]
    boxes, masks = target["boxes"].clone(), target.get("masks")
    if rng.random() < 0.5:  # left-right
        image, boxes = (
            image.flip(-1),
            torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1),
        )
        masks = masks.flip(-1) if masks is not None else None
    if rng.random() < 0.5:  # top-bottom
        image, boxes = (
            image.flip(-2),
            torch.stack([boxes[:, 0], size - boxes[:, 3], boxes[:, 2], size - boxes[:, 1]], 1),
        )
        masks = masks.flip(-2) if masks is not None else None
    for _ in range(int(rng.integers(0, 4))):  # torch.rot90 over (H, W): (x, y) -> (y, size - x)
        image, boxes = (
            image.rot90(1, (-2, -1)),
            torch.stack([boxes[:, 1], size - boxes[:, 2], boxes[:, 3], size - boxes[:, 0]], 1),
        )
        masks = masks.rot90(1, (-2, -1)) if masks is not None else None
    out = {**target, "boxes": boxes.reshape(-1, 4)}
    if masks is not None:
        out["masks"] = masks.contiguous()
    return image.contiguous(), out


def train_data(cfg: DetectConfig, data: LabelledSet, info: EncoderInfo, seed: int) -> tuple[Any, np.ndarray | None]:
    classes = set_classes(cfg, data)
    dataset = DetectionCrops(data, cfg, info, classes, seed)
    if not cfg.class_weighting:
        return dataset, None
    return dataset, np.tile(rarest_class_weights(data, cfg, classes), cfg.crops_per_image) / cfg.crops_per_image


def rarest_class_weights(data: LabelledSet, cfg: DetectConfig, classes: Sequence[str]) -> np.ndarray:
    """A draw weight per image: 1 / (images holding its rarest class); images without objects take the
    smallest weight any image has. Sums to 1."""
    present = [set(record_objects(r, cfg, classes).labels.tolist()) for r in data.records]
    holding = np.bincount([c for p in present for c in p], minlength=len(classes))
    weights = np.array([max((1.0 / holding[c] for c in p), default=0.0) for p in present])
    weights[weights == 0] = weights[weights > 0].min() if (weights > 0).any() else 1.0
    return weights / weights.sum()


# ----------------------------------------------------------------------------- the network


def build(cfg: DetectConfig, info: EncoderInfo, data: LabelledSet) -> tuple[nn.Module, nn.Module]:
    if cfg.window % info.patch_size:
        raise UserError(
            f"detect.window {cfg.window} is not a multiple of the patch size {info.patch_size} of {info.ref}"
        )
    classes = set_classes(cfg, data)
    anchors = cfg.anchors
    if not anchors:
        sides = (
            [s for r in data.records for s in _sides(record_objects(r, cfg, classes).boxes * cfg.scale)]
            if data.records
            else []
        )
        anchors = anchor_sizes(sides)
    detector = build_detector(
        cfg.head,
        info.embed_dim,
        info.patch_size,
        info.num_blocks,
        len(classes),
        info.mean,
        info.std,
        cfg.window,
        anchors,
        channels=cfg.channels,
        max_detections=cfg.max_detections,
        score_threshold=cfg.score_threshold,
    )
    detector.classes = classes  # what its labels name, whatever set it is scored on later
    return detector, nn.Identity()  # torchvision's detectors compute their own losses


def _sides(boxes: np.ndarray) -> list[float]:
    return np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)).tolist()


# ----------------------------------------------------------------------------- inference


@torch.no_grad()
def detect_image(task: nn.Module, image: Tensor, cfg: DetectConfig, masks: bool = False) -> dict[str, Any]:
    """Detections of one image (float [3, h, w] at ``cfg.scale``) by overlapping windows, merged, in the
    image's own pixels (``/ scale``): ``boxes``, ``scores``, ``labels`` (class indices) and, with
    ``masks``, each detection's mask as a COCO RLE at the image's own size."""
    device = next(task.parameters()).device
    h, w = image.shape[-2:]
    origins = windows(h, w, cfg.window, cfg.window_overlap)
    mean = task.info.mean
    found: list[dict[str, Tensor]] = []
    for start in range(0, len(origins), cfg.window_batch):
        batch = torch.stack(
            [_pad(image[:, y0 : y0 + cfg.window, x0 : x0 + cfg.window], cfg.window, mean)
             for y0, x0 in origins[start : start + cfg.window_batch]]
        ).to(device)  # fmt: skip
        for d in task.logits(batch):
            one = {"boxes": d["boxes"].float().cpu(), "scores": d["scores"].float().cpu(), "labels": d["labels"].cpu()}
            if masks:
                one["masks"] = (d["masks"][:, 0] > 0.5).cpu()
            found.append(one)
    merged = merge_windows(found, origins, (h, w), cfg.window, cfg.nms_iou)
    out: dict[str, Any] = {
        "boxes": (merged["boxes"] / cfg.scale).numpy(),
        "scores": merged["scores"].numpy(),
        "labels": (merged["labels"] - 1).numpy(),
    }
    if masks:
        size = (round(h / cfg.scale), round(w / cfg.scale))
        out["masks"] = [
            mask_rle(_paste(m, origins[int(i)], (h, w), size)) for m, i in zip(merged["masks"], merged["window"])
        ]
    return out


def _paste(mask: Tensor, origin: tuple[int, int], size: tuple[int, int], full: tuple[int, int]) -> np.ndarray:
    """A window's mask placed into its image (at scale) and resized to the image's own ``full`` size."""
    y0, x0 = origin
    canvas = torch.zeros(size, dtype=torch.bool)
    part = mask[: size[0] - y0, : size[1] - x0]
    canvas[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]] = part
    if size != full:
        canvas = F.interpolate(canvas[None, None].float(), size=full, mode="nearest")[0, 0].bool()
    return canvas.numpy()


def _truth(record: Record, cfg: DetectConfig, classes: Sequence[str]) -> tuple[dict[str, Any], np.ndarray | None]:
    objects = record_objects(record, cfg, classes)
    truth: dict[str, Any] = {"boxes": objects.boxes, "labels": objects.labels}
    if objects.instance_map is not None:
        truth["masks"] = [mask_rle(objects.instance_map == k) for k in range(1, len(objects.boxes) + 1)]
        truth["size"] = objects.instance_map.shape
    return truth, objects.instance_map


def _predictions(task: nn.Module, data: LabelledSet, cfg: DetectConfig, classes: Sequence[str]) -> dict[str, list]:
    """Truth and detections of every readable image of ``data``, the records, instance maps, and skips."""
    out: dict[str, list] = {"truth": [], "predicted": [], "records": [], "maps": [], "skipped": []}
    for record in data.records:
        try:
            image = read_scaled(record.path, cfg.scale)
            truth, instance_map = _truth(record, cfg, classes)
        except UserError as err:
            out["skipped"].append((record.path, str(err)))
            continue
        out["truth"].append(truth)
        out["predicted"].append(detect_image(task, image, cfg, masks=cfg.head == "maskrcnn"))
        out["records"].append(record)
        out["maps"].append(instance_map)
    return out


def _scored(truth: Sequence[dict], predicted: Sequence[dict], keep: Sequence[int]) -> tuple[list[dict], list[dict]]:
    """Truth and predictions of the scored classes only, relabelled 0..len(keep)-1."""
    new = {old: i for i, old in enumerate(keep)}

    def select(record: dict) -> dict:
        labels = np.asarray(record["labels"], dtype=np.int64)
        chosen = np.isin(labels, list(keep))
        one = {k: v for k, v in record.items() if k not in ("boxes", "labels", "scores", "masks")}
        one["boxes"] = np.asarray(record["boxes"]).reshape(-1, 4)[chosen]
        one["labels"] = np.array([new[int(v)] for v in labels[chosen]], dtype=np.int64)
        if "scores" in record:
            one["scores"] = np.asarray(record["scores"])[chosen]
        if "masks" in record:
            one["masks"] = [m for m, c in zip(record["masks"], chosen) if c]
        return one

    return [select(t) for t in truth], [select(p) for p in predicted]


def validate(cfg: DetectConfig, task: nn.Module, data: LabelledSet) -> dict[str, Any]:
    classes = list(task.head.classes)
    found = _predictions(task, data, cfg, classes)
    if not found["truth"]:
        raise UserError(f"{data.source}: no readable validation image")
    keep = scored_classes(cfg, classes)
    truth, predicted = _scored(found["truth"], found["predicted"], keep)
    scores = coco_map(truth, predicted, [classes[i] for i in keep])
    return {
        "map_50": scores["map_50"] if scores["map_50"] is not None else 0.0,
        "map": scores["map"],
        **{f"ap_50/{name}": row["ap_50"] for name, row in scores["per_class"].items()},
        **({"skipped": found["skipped"]} if found["skipped"] else {}),
    }


def choose(cfg: DetectConfig, task: nn.Module, data: LabelledSet) -> dict[str, Any]:
    """The score threshold with the best point F1 on validation, the scored classes pooled (matched class by class)."""
    classes = list(task.head.classes)
    found = _predictions(task, data, cfg, classes)
    truth, predicted = _scored(found["truth"], found["predicted"], scored_classes(cfg, classes))
    images = []
    for t, p in zip(truth, predicted):
        for c in range(len(scored_classes(cfg, classes))):
            images.append((box_centres(t["boxes"][t["labels"] == c]), box_centres(p["boxes"][p["labels"] == c]),
                           p["scores"][p["labels"] == c]))  # fmt: skip
    chosen = choose_threshold(images, cfg.radius)
    return {"threshold": {**chosen, "radius": cfg.radius}}


def evaluate(
    cfg: DetectConfig, task: nn.Module, data: LabelledSet, selection: dict[str, Any], run_dir: Path | None, name: str
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    classes = list(task.head.classes)
    unknown = [c for c in set_classes(cfg, data) if c not in classes]
    if unknown:
        raise UserError(f"{data.source}: class {unknown[0]!r} is not one the detector learned ({', '.join(classes)})")
    keep = scored_classes(cfg, classes)
    threshold = chosen_threshold(selection)
    found = _predictions(task, data, cfg, classes)
    if not found["truth"]:
        raise stage.no_readable_image(data, found["skipped"])
    truth, predicted = _scored(found["truth"], found["predicted"], keep)
    domains = [r.domain for r in found["records"]]
    rows = detection_report(
        truth,
        predicted,
        [classes[i] for i in keep],
        cfg.radius,
        threshold,
        domains=domains if any(d is not None for d in domains) else None,
        iou_types=("bbox", "segm") if cfg.head == "maskrcnn" else ("bbox",),
    )
    if cfg.head == "maskrcnn":
        pred_maps = [_instance_map(p, threshold, m.shape) for p, m in zip(found["predicted"], found["maps"])]
        rows["all"].update(instance_metrics(pred_maps, found["maps"]))
    if run_dir is not None:
        folder = Path(run_dir) / PREDICTIONS
        folder.mkdir(parents=True, exist_ok=True)
        paths = [r.path for r in found["records"]]
        write_predictions(folder, f"{name}_", paths, found["predicted"], classes, threshold)
        if cfg.overlays:
            draw_overlays(found["records"], found["truth"], found["predicted"], classes, threshold, cfg,
                          Path(run_dir) / OVERLAYS, name)  # fmt: skip
    return rows, found["skipped"]


def chosen_threshold(selection: dict[str, Any]) -> float:
    """The selected score threshold; infinite where validation had no detection at all (a head
    trained too briefly): predicting nothing was the best found, so the test scores it too."""
    threshold = selection["threshold"]["threshold"]
    return math.inf if threshold is None else float(threshold)


def _instance_map(predicted: dict[str, Any], threshold: float, shape: tuple[int, int]) -> np.ndarray:
    """One label image from the detections at >= ``threshold``: pasted in ascending score order, so
    that where masks overlap the most confident one holds the pixel."""
    from pycocotools import mask as mask_utils

    out = np.zeros(shape, np.int32)
    order = np.argsort(predicted["scores"], kind="stable")
    k = 0
    for j in order:
        if predicted["scores"][j] < threshold:
            continue
        rle = predicted["masks"][j]
        mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)
        k += 1
        out[mask] = k
    return out


def write_predictions(
    folder: Path,
    prefix: str,
    paths: Sequence[str],
    predicted: Sequence[dict],
    classes: Sequence[str],
    threshold: float,
) -> None:
    """``<prefix>coco_results.json`` (every detection), ``<prefix>coco_images.json`` (the images and
    categories its ids name) and ``<prefix>points.csv`` (box centres at >= ``threshold``), in the images' own pixels."""
    ids = list(range(1, len(paths) + 1))
    with atomic_path(folder / f"{prefix}{RESULTS_JSON}") as tmp:
        tmp.write_text(json.dumps(coco_results(predicted, ids, classes)))
    images = [{"id": i, "file_name": str(path)} for i, path in zip(ids, paths)]
    categories = [{"id": c + 1, "name": n} for c, n in enumerate(classes)]
    write_json(folder / f"{prefix}{IMAGES_JSON}", {"images": images, "categories": categories})
    write_points(folder / f"{prefix}{POINTS_CSV}", paths, predicted, classes, threshold)


def write_points(
    path: Path, images: Sequence[str], predicted: Sequence[dict], classes: Sequence[str], threshold: float
) -> int:
    rows = 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "x", "y", "class", "score"])
        for image, p in zip(images, predicted):
            for (x, y), label, score in zip(
                box_centres(np.asarray(p["boxes"]).reshape(-1, 4)), p["labels"], p["scores"]
            ):
                if score >= threshold:
                    writer.writerow([image, f"{x:.1f}", f"{y:.1f}", classes[int(label)], f"{score:.4f}"])
                    rows += 1
    return rows


def draw_overlays(
    records: Sequence[Record],
    truth: Sequence[dict],
    predicted: Sequence[dict],
    classes: Sequence[str],
    threshold: float,
    cfg: DetectConfig,
    folder: Path,
    name: str,
) -> None:
    """The first test images with the truth (dashed) and the detections at >= threshold (solid), by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    folder.mkdir(parents=True, exist_ok=True)
    colours = plt.get_cmap("tab10")
    for record, t, p in list(zip(records, truth, predicted))[: cfg.overlays]:
        image = as_rgb_tensor(record.path).permute(1, 2, 0).numpy()
        fig, ax = plt.subplots(figsize=(7, 7 * image.shape[0] / image.shape[1]))
        ax.imshow(image)
        for boxes, labels, style in ((t["boxes"], t["labels"], "--"), (p["boxes"][p["scores"] >= threshold],
                                                                        p["labels"][p["scores"] >= threshold], "-")):  # fmt: skip
            for (x0, y0, x1, y1), label in zip(np.asarray(boxes).reshape(-1, 4), labels):
                ax.add_patch(
                    Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls=style, lw=1, color=colours(int(label)))
                )
        for c, cls in enumerate(classes):
            ax.plot([], [], color=colours(c), label=cls)
        ax.plot([], [], "k--", label="truth")
        ax.plot([], [], "k-", label=f"detected (score >= {threshold:.2f})")
        ax.legend(loc="lower right", fontsize=7)
        ax.axis("off")
        fig.tight_layout()
        with atomic_path(folder / f"{name}_{Path(record.path).stem}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


def predict_files(
    cfg: DetectConfig,
    task: nn.Module,
    paths: Sequence[Path],
    selection: dict[str, Any],
    out: Path,
    advance: Callable[[int], object],
) -> int:
    """``coco_results.json`` + ``coco_images.json`` and ``points.csv`` (at the chosen threshold) for images of any size."""
    threshold = chosen_threshold(selection)
    kept, predicted = [], []
    for path in paths:
        try:
            image = read_scaled(str(path), cfg.scale)
        except UserError as err:
            print(f"warning: skipped {path}: {err}", file=sys.stderr)
            advance(1)
            continue
        kept.append(str(path))
        predicted.append(detect_image(task, image, cfg, masks=cfg.head == "maskrcnn"))
        advance(1)
    if kept:
        write_predictions(out, "", kept, predicted, list(task.head.classes), threshold)
    return len(kept)


HEAD = stage.Head(
    name="detect",
    task="detection",
    title="ViTDet-style detector",
    config=DetectConfig,
    default_config="detect_bccd",
    score="map_50",
    figures=(OVERLAYS, PREDICTIONS),
    classes=set_classes,
    check=check_set,
    build=build,
    train_data=train_data,
    validate=validate,
    choose=choose,
    evaluate=evaluate,
    predict=predict_files,
)


def build_parser() -> Parser:
    parser = stage.build_parser(HEAD)
    parser.add_argument("--head", choices=HEADS, help="detector (= detect.head=...; default: the config's)")
    parser.add_argument("--fractions", type=float, nargs="+", help="shares of the training images, a run each")
    parser.add_argument(
        "--leave-one-domain-out",
        action="store_true",
        help="a run per domain of --train (scanner, site): trained on the others, tested on it",
    )
    return parser


def parse_request(argv: Sequence[str] | None) -> tuple[argparse.Namespace, stage.Request]:
    """The checked arguments and request, before any data is read (``main`` and ``check_command``)."""
    args = stage.parse_arguments(build_parser(), argv)
    series = args.fractions is not None or args.leave_one_domain_out
    if args.eval is not None and (args.head or series):
        raise UserError("--eval scores one trained run as it is: drop --head, --fractions and --leave-one-domain-out")
    if args.head:
        stage.refuse_flag_and_override(args.head, "--head", "detect.head", args.overrides)
        args.overrides = [*args.overrides, f"detect.head={args.head}"]
    if args.fractions is not None and args.leave_one_domain_out:
        raise UserError("give --fractions or --leave-one-domain-out, not both")
    bad = [f for f in args.fractions or () if not 0 < f <= 1]
    if bad:
        raise UserError(f"--fractions must lie in (0, 1]; got {bad[0]}")
    return args, stage.request_from(HEAD, args)


def check_command(argv: Sequence[str] | None = None) -> None:
    stage.check_config(HEAD, parse_request(argv)[1])


def main(argv: Sequence[str] | None = None) -> int:
    args, request = parse_request(argv)
    if args.fractions is None and not args.leave_one_domain_out:
        return stage.run(HEAD, request)
    if args.fractions is not None:
        assert request.out is not None
        runs = [(name, replace(request, out=request.out / name, fraction=None if f == 1 else f))
                for name, f in stage.fraction_runs(args.fractions).items()]  # fmt: skip
    else:
        runs = stage.leave_one_domain_out(request)
    try:
        done = stage.run_series(HEAD, request, runs)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if done:
        write_series(request, done, "fractions" if args.fractions is not None else "leave-one-domain-out")
    return 0


def write_series(request: stage.Request, done: dict[str, dict[str, Any]], method: str) -> dict[str, Any]:
    """``results.json`` of a series: every run's rows under its name, and a table of their "all" rows."""
    assert request.out is not None
    last = next(reversed(done.values()))
    rows = {f"{name}/{key}": row for name, results in done.items() for key, row in results["metrics"].items()}
    results = make_results(
        probe="finetune.detect",
        task="detection",
        title=f"{last['title']}, {method}",
        encoder=last["encoder"],
        # Each run trained (and, leaving a domain out, tested) on its own images: no one count holds.
        dataset={
            **last["dataset"],
            "n_train": None,
            "n_val": None,
            "n_test": None,
            "runs": {name: r["dataset"] for name, r in done.items()},
        },
        split={"method": method, "runs": {name: r["split"] for name, r in done.items()}},
        seeds=last["seeds"],
        metrics=rows,
        config=last["config"],
    )
    write_results(request.out / stage.RESULTS, results)
    scores = ("map_50", "map", "precision", "recall", "f1")
    print(f"{'run':<28}" + "".join(f"{s:>11}" for s in scores))
    for name, r in done.items():
        row = r["metrics"].get("all") or next(v for k, v in r["metrics"].items() if k.endswith("/all"))
        print(f"{name:<28}" + "".join(f"{row[s]:>11.4f}" if row.get(s) is not None else f"{'-':>11}" for s in scores))
    print(f"wrote {request.out / stage.RESULTS}")
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
