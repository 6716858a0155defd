"""Object detection on images larger than the network's window: tiling, merging, and guided crops.

A detector trained on ``window``-pixel crops is run on a larger image (a 1000x1000 field, a whole-slide
region) one overlapping window at a time; the windows' detections are then merged into one list in
image coordinates. Detections follow the torchvision layout: ``boxes`` [N, 4] xyxy float, ``scores``
[N] float, ``labels`` [N] int, plus any other per-detection entries (``masks``) carried along by index.

- :func:`window_starts`, :func:`windows`: window origins, ``window - overlap`` apart, the last one flush
  with the image's end so that no window leaves the image (an image smaller than a window gets one
  window at 0, which the caller pads).
- :func:`core_bounds`: the interval of image coordinates each window is responsible for: from the middle
  of its overlap with the previous window to the middle of its overlap with the next. The cores tile the
  axis exactly, so every point of the image belongs to exactly one window.
- :func:`merge_windows`: a detection is kept only by the window whose core holds its box centre, then
  class-wise NMS (``torchvision.ops.batched_nms``) as a safety net, then boxes are clipped to the image.
  Core assignment rather than NMS alone, because an object cut by a window border is seen twice: whole
  by the neighbouring window and as a cut box by this one. A box cut in half has IoU about 0.5 with the
  whole one and one cut further has less, so NMS at 0.5 keeps both. With an overlap at least the size of
  the object, the cut box's centre lies beyond the middle of the overlap (outside its window's core) and
  the whole box's centre inside the neighbour's core, so the object is kept exactly once; NMS then only
  matters for objects larger than the overlap.
- :func:`guided_crop`: a training crop centred, with probability ``p``, on an object of the wanted
  classes, else uniform: the guided patch sampling of the MIDOG reference detector (p = 0.5 around a
  mitotic figure; Wilm et al., arXiv:2108.11269; the challenge: Aubreville et al., arXiv:2204.03742),
  which keeps rare objects in the batches.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms, clip_boxes_to_image

__all__ = ["window_starts", "windows", "core_bounds", "merge_windows", "guided_crop"]

# Keys of a detection dict that merge_windows transforms itself; any other key is carried by index.
BOXES, SCORES, LABELS, WINDOW = "boxes", "scores", "labels", "window"


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis: 0, then every ``window - overlap``, the last at ``length - window``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window={window}), got {overlap}")
    if length <= window:
        return [0]
    last = length - window
    # The flush last window overlaps its neighbour by more than ``overlap``, never less.
    return list(range(0, last, window - overlap)) + [last]


def windows(height: int, width: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """(y0, x0) origins of the windows covering a ``height`` x ``width`` image, row-major."""
    xs = window_starts(width, window, overlap)
    return [(y0, x0) for y0 in window_starts(height, window, overlap) for x0 in xs]


def core_bounds(starts: Sequence[int], window: int, length: int) -> list[tuple[float, float]]:
    """Half-open [lo, hi) image interval each window owns: overlap midpoint to overlap midpoint."""
    starts = list(starts)
    if not starts:
        raise ValueError("starts must not be empty")
    for prev, nxt in zip(starts, starts[1:]):
        if nxt <= prev:
            raise ValueError(f"starts must be strictly increasing, got {starts}")
        if nxt > prev + window:
            raise ValueError(f"windows at {prev} and {nxt} leave a gap (window {window})")
    # The overlap of windows at s and t (s < t) is [t, s + window); its middle is the shared border.
    borders = [(nxt + prev + window) / 2 for prev, nxt in zip(starts, starts[1:])]
    return list(zip([0.0] + borders, borders + [float(length)]))


def merge_windows(
    detections: Sequence[dict[str, Any]],
    origins: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
    window: int,
    iou_threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """One detection list in image coordinates from per-window lists in window coordinates.

    ``detections[i]`` is the output of the window at ``origins[i]`` = (y0, x0); the origins form a grid
    (as :func:`windows` gives) and ``image_size`` is (height, width). Boxes are shifted by their origin
    and clipped to the image; a detection is kept only if its box centre lies in its window's core
    (:func:`core_bounds` on the grid's y and x starts), which keeps an object cut by a window border once
    (see the module docstring); class-wise NMS at ``iou_threshold`` then removes what the cores could not
    (objects larger than the overlap). Extra entries (``masks``) are selected by index, not transformed:
    masks stay in window coordinates, and the returned ``window`` (index into ``origins``) says where to
    paste them. The result is sorted by descending score.
    """
    if len(detections) != len(origins):
        raise ValueError(f"{len(detections)} detection lists for {len(origins)} windows")
    height, width = image_size
    y_core = _cores_by_start([y0 for y0, _ in origins], window, height)
    x_core = _cores_by_start([x0 for _, x0 in origins], window, width)
    extra_keys = sorted(set(detections[0]) - {BOXES, SCORES, LABELS}) if detections else []

    kept: list[dict[str, torch.Tensor]] = []
    for index, (found, (y0, x0)) in enumerate(zip(detections, origins)):
        if sorted(set(found) - {BOXES, SCORES, LABELS}) != extra_keys:
            raise ValueError(f"window {index} has keys {sorted(found)}, window 0 has {sorted(detections[0])}")
        one = _as_tensors(found, index)
        shift = torch.tensor([x0, y0, x0, y0], dtype=one[BOXES].dtype, device=one[BOXES].device)
        # Clipped before the centre test so that a box reaching into a small image's padding is judged
        # by its visible part; a box wholly in the padding ends up with its centre on the border, outside.
        boxes = clip_boxes_to_image(one[BOXES] + shift, (height, width))
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        (y_lo, y_hi), (x_lo, x_hi) = y_core[y0], x_core[x0]
        inside = (cx >= x_lo) & (cx < x_hi) & (cy >= y_lo) & (cy < y_hi)
        one[BOXES] = boxes
        one[WINDOW] = torch.full((len(boxes),), index, dtype=torch.int64, device=boxes.device)
        kept.append({key: value[inside] for key, value in one.items()})

    if not kept:
        return {
            BOXES: torch.zeros((0, 4)),
            SCORES: torch.zeros(0),
            LABELS: torch.zeros(0, dtype=torch.int64),
            WINDOW: torch.zeros(0, dtype=torch.int64),
        }
    merged = {key: torch.cat([one[key] for one in kept]) for key in kept[0]}
    order = batched_nms(merged[BOXES], merged[SCORES], merged[LABELS], iou_threshold)  # by descending score
    return {key: value[order] for key, value in merged.items()}


def _cores_by_start(starts: Sequence[int], window: int, length: int) -> dict[int, tuple[float, float]]:
    grid = sorted(set(starts))
    return dict(zip(grid, core_bounds(grid, window, length))) if grid else {}


def _as_tensors(found: dict[str, Any], index: int) -> dict[str, torch.Tensor]:
    """A window's detections as tensors (numpy accepted), every entry checked to hold N detections."""
    one = {key: torch.as_tensor(value) for key, value in found.items()}
    boxes = one[BOXES]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"window {index}: boxes must be [N, 4], got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        one[BOXES] = boxes.float()
    for key, value in one.items():
        if value.ndim == 0 or len(value) != len(boxes):
            raise ValueError(f"window {index}: {key} has shape {tuple(value.shape)} for {len(boxes)} boxes")
    return one


def guided_crop(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    crop: int,
    centres: np.ndarray,
    wanted: np.ndarray,
    p: float = 0.5,
) -> tuple[int, int]:
    """(y0, x0) of a ``crop`` x ``crop`` training crop of an image of ``image_size`` = (height, width).

    With probability ``p``, when any object is ``wanted``, the crop is centred on one wanted object
    (``centres`` [N, 2] as (x, y)) chosen uniformly, shifted by an integer jitter uniform in
    [-crop // 4, crop // 4] on each axis so that the object is not always at the exact centre (a network
    would otherwise learn "mitosis is in the middle"); the jitter keeps the object inside the crop, and so
    does clamping the crop into the image. Otherwise the origin is uniform over the crops inside the image.
    Along an axis shorter than the crop the origin is 0 and the caller pads.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    centres, wanted = np.asarray(centres, dtype=float).reshape(-1, 2), np.asarray(wanted, dtype=bool)
    if wanted.shape != (len(centres),):
        raise ValueError(f"wanted must be [{len(centres)}] for {len(centres)} centres, got {wanted.shape}")
    height, width = image_size
    y_max, x_max = max(height - crop, 0), max(width - crop, 0)
    candidates = np.flatnonzero(wanted)
    if rng.random() < p and len(candidates):
        cx, cy = centres[rng.choice(candidates)]
        jy, jx = rng.integers(-(crop // 4), crop // 4, size=2, endpoint=True)
        y0 = int(np.floor(cy)) - crop // 2 + int(jy)
        x0 = int(np.floor(cx)) - crop // 2 + int(jx)
        return min(max(y0, 0), y_max), min(max(x0, 0), x_max)
    return int(rng.integers(0, y_max, endpoint=True)), int(rng.integers(0, x_max, endpoint=True))
