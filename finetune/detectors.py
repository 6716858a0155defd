"""torchvision's detectors on a plain ViT: RetinaNet, FCOS, Faster R-CNN and Mask R-CNN over ViTDet's
simple feature pyramid (:class:`finetune.necks.SimpleFeaturePyramid`).

torchvision's detectors take a ``backbone`` that maps a padded, normalised batch to named maps. Here
that backbone is the pyramid over the task's encoder: :class:`Detector` hands the task's ``encode``
to it for the length of one forward, so that the encoder stays the task's own module (one set of
weights, tuned, frozen or LoRA'd as the task says) while torchvision resizes, pads, normalises and
computes its losses as it always does.

Sizes and statistics come from the encoder and the data, not COCO's: the transform normalises with
the encoder's mean and std and never resizes (every crop and window is ``window`` pixels square; the
data's own scale is applied when images are read); anchors follow the training boxes
(:func:`anchor_sizes`). Labels are class index + 1 for every head, 0 being torchvision's background for
the R-CNNs; RetinaNet and FCOS have no background class, and :class:`Detector` shifts their labels.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from finetune.necks import SimpleFeaturePyramid

HEADS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")
ONE_STAGE = ("retinanet", "fcos")
RATIOS = (0.5, 1.0, 2.0)


def anchor_sizes(box_sides: Sequence[float], levels: int = len(SimpleFeaturePyramid.strides)) -> tuple[int, ...]:
    """One anchor size per pyramid level, doubling from level to level as the strides do, starting at
    the 2nd percentile of the training boxes' sides (square root of the area): the smallest objects
    find an anchor on the finest level and each coarser level takes objects twice as large."""
    base = max(4, round(float(np.percentile(np.asarray(box_sides, dtype=float), 2)))) if len(box_sides) else 32
    return tuple(base * 2**i for i in range(levels))


class PyramidBackbone(nn.Module):
    """The encoder's last block map -> the simple feature pyramid, for torchvision's detectors."""

    def __init__(self, pyramid: SimpleFeaturePyramid) -> None:
        super().__init__()
        self.pyramid = pyramid
        self.out_channels = pyramid.out_channels
        self.encode: Callable[[Tensor], Sequence[Tensor]] | None = None

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        assert self.encode is not None, "Detector.forward sets the encoder"
        patch = self.pyramid.patch_size
        # torchvision pads the batch to a multiple of 32; a patch of 14 needs its own multiple.
        padded = nn.functional.pad(images, (0, -images.shape[-1] % patch, 0, -images.shape[-2] % patch))
        return self.pyramid(self.encode(padded)[-1])


class Detector(nn.Module):
    """A torchvision detector whose backbone reads the task's encoder; ``reads = "encoder"``: the task
    passes its ``encode`` (images -> block maps) rather than features, since the detector's transform
    decides what the encoder sees."""

    reads = "encoder"

    def __init__(self, model: nn.Module, block: int, kind: str, anchors: Sequence[int]) -> None:
        super().__init__()
        self.model, self.blocks, self.kind = model, (block,), kind
        self.shift = 1 if kind in ONE_STAGE else 0  # their class 0 is the first class, not background
        # The anchor sizes came from the training boxes: saved with the weights, so that a trained
        # detector reloads with its own anchors (they change no parameter shape, so nothing else would tell).
        self.register_buffer("anchor_sizes", torch.tensor(list(anchors), dtype=torch.int64))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        sizes = state_dict.get(prefix + "anchor_sizes")
        if sizes is not None:
            _set_anchor_generator(self.model, self.kind, [int(a) for a in sizes])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        encode: Callable[[Tensor], Sequence[Tensor]],
        images: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
    ) -> Any:
        """Training (with ``targets``): torchvision's loss dict; else its detections per image."""
        backbone = self.model.backbone
        backbone.encode = encode
        if targets is not None and self.shift:
            targets = [{**t, "labels": t["labels"] - self.shift} for t in targets]
        try:
            out = self.model(list(images), targets)
        finally:
            backbone.encode = None
        if targets is None and self.shift:
            out = [{**d, "labels": d["labels"] + self.shift} for d in out]
        return out


def build_detector(
    kind: str,
    embed_dim: int,
    patch_size: int,
    num_blocks: int,
    n_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    window: int,
    anchors: Sequence[int],
    channels: int = 256,
    max_detections: int = 300,
    score_threshold: float = 0.05,
) -> Detector:
    """The ``kind`` detector (:data:`HEADS`) for ``n_classes`` classes on ``window``-pixel inputs."""
    from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    backbone = PyramidBackbone(SimpleFeaturePyramid(embed_dim, patch_size, channels))
    names = list(SimpleFeaturePyramid.names)
    common: dict[str, Any] = {
        "min_size": window,
        "max_size": window,
        "image_mean": list(mean),
        "image_std": list(std),
        "size_divisible": 32,
    }
    # RetinaNet's 32 groups (Lin et al. 2017), but two channels or more in each: with one, a 1x1 level
    # (a small window's coarsest) of a one-window batch has nothing to normalise over and raises.
    group_norm = partial(nn.GroupNorm, min(32, channels // 2))
    num_classes = n_classes if kind in ONE_STAGE else n_classes + 1
    generator = anchor_generator(kind, anchors)
    if kind == "retinanet":
        head = RetinaNetHead(channels, generator.num_anchors_per_location()[0], num_classes, norm_layer=group_norm)
        model = RetinaNet(backbone, num_classes, anchor_generator=generator, head=head,
                          score_thresh=score_threshold, detections_per_img=max_detections, **common)  # fmt: skip
    elif kind == "fcos":
        head = FCOSHead(channels, 1, num_classes)
        model = FCOS(backbone, num_classes, anchor_generator=generator, head=head,
                     score_thresh=score_threshold, detections_per_img=max_detections, **common)  # fmt: skip
    elif kind in ("fasterrcnn", "maskrcnn"):
        rpn_head = RPNHead(channels, generator.num_anchors_per_location()[0], conv_depth=2)
        box_pool = MultiScaleRoIAlign(names[:4], output_size=7, sampling_ratio=2)
        rcnn: dict[str, Any] = {
            "rpn_anchor_generator": generator,
            "rpn_head": rpn_head,
            "box_roi_pool": box_pool,
            "box_head": TwoMLPHead(channels * 7 * 7, 1024),
            "box_score_thresh": score_threshold,
            "box_detections_per_img": max_detections,
            **common,
        }
        if kind == "fasterrcnn":
            model = FasterRCNN(backbone, num_classes, **rcnn)
        else:
            mask_pool = MultiScaleRoIAlign(names[:4], output_size=14, sampling_ratio=2)
            model = MaskRCNN(backbone, None, box_predictor=FastRCNNPredictor(1024, num_classes),
                             mask_roi_pool=mask_pool, mask_head=MaskRCNNHeads(channels, [256] * 4, 1),
                             mask_predictor=MaskRCNNPredictor(256, 256, num_classes), **rcnn)  # fmt: skip
    else:
        raise ValueError(f"unknown detector {kind!r}; choose one of {', '.join(HEADS)}")
    _decode_in_float32(model)
    return Detector(model, num_blocks - 1, kind, anchors)


def _decode_in_float32(model: nn.Module) -> None:
    """Give the detector box coders that decode in float32.

    torchvision's coders cast the anchors to the regression's dtype, so under a bf16-autocast step
    the boxes of a 256 px window (RPN proposals, FCOS's GIoU boxes) would come in 1 px steps, enough
    to move a nucleus's IoU across the 0.3-0.7 sampling thresholds; detectron2 decodes in float32 too.
    """
    from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder

    class Float32BoxCoder(BoxCoder):
        def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
            return super().decode_single(rel_codes.float(), boxes)

    class Float32BoxLinearCoder(BoxLinearCoder):
        def decode(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
            return super().decode(rel_codes.float(), boxes)

    for owner in model.modules():  # the model's own, the RPN's, the R-CNN heads', FCOS/RetinaNet heads' (losses)
        coder = getattr(owner, "box_coder", None)
        if isinstance(coder, BoxCoder):
            owner.box_coder = Float32BoxCoder(coder.weights, coder.bbox_xform_clip)
        elif isinstance(coder, BoxLinearCoder):
            owner.box_coder = Float32BoxLinearCoder(coder.normalize_by_size)


def anchor_generator(kind: str, anchors: Sequence[int]) -> nn.Module:
    """torchvision's anchor generator of the ``kind`` detector over the pyramid, one size per level."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if kind not in HEADS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {', '.join(HEADS)}")
    if len(anchors) != len(SimpleFeaturePyramid.strides):
        raise ValueError(f"need one anchor size per pyramid level ({len(SimpleFeaturePyramid.strides)}), got {anchors}")
    if kind == "retinanet":  # RetinaNet's three octave scales per level (Lin et al. 2017), on the data's sizes
        sizes = tuple(tuple(int(round(a * 2 ** (k / 3))) for k in range(3)) for a in anchors)
        return AnchorGenerator(sizes, (RATIOS,) * len(sizes))
    if kind == "fcos":
        # FCOS assigns objects to levels by size relative to the stride (4x to 8x an anchor of one
        # stride), so its "anchors" are the strides themselves.
        return AnchorGenerator(tuple((s,) for s in SimpleFeaturePyramid.strides), ((1.0,),) * len(anchors))
    return AnchorGenerator(tuple((a,) for a in anchors), (RATIOS,) * len(anchors))


def _set_anchor_generator(model: nn.Module, kind: str, anchors: Sequence[int]) -> None:
    generator = anchor_generator(kind, anchors)
    if kind in ONE_STAGE:
        model.anchor_generator = generator
    else:
        model.rpn.anchor_generator = generator
