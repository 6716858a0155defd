"""COCO detection json: ``images``, ``annotations`` (bbox = [x, y, width, height]) and ``categories``.

The helpers here (json loading, category table, image lookup) also serve the MIDOG reader,
whose json is COCO-like but stores boxes as [x0, y0, x1, y1].
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ssl_path.core.errors import UserError
from ssl_path.data.readers._common import absolute, box_info, existing_dir, fit_in_image, spec_string
from ssl_path.data.readers.records import Box, LabelledSet, Record


def read_coco(path: str | os.PathLike, *, images: str | os.PathLike | None = None) -> LabelledSet:
    """A COCO json (or a folder holding exactly one) as one record per image with its boxes.

    ``images`` is the image folder (relative to the json's folder unless absolute); by default an
    image is looked up beside the json, then in ``images/`` beside it. Boxes reaching past their
    image (by its ``width`` and ``height``) are clipped to it, and boxes without area dropped; both
    are counted in ``info``; polygons, where present, are kept in ``meta['segmentations']``
    aligned with ``boxes``. Classes are the category names in category-id order.
    """
    file = json_file(path, "coco")
    data = load_json(file, "coco")
    categories = category_names(data, file, "coco", default={})
    roots = image_roots(file, images)

    def to_box(ann: dict[str, Any]) -> Box:
        x, y, w, h = ann["bbox"]
        return Box(x, y, x + w, y + h, categories[ann["category_id"]])

    records, dropped, fits = _image_records(data, file, roots, categories, to_box, "coco", keep_segmentation=True)
    info = box_info(dropped, fits)
    source = spec_string("coco", file, images=str(images) if images is not None else None)
    return LabelledSet(records, list(categories.values()), name=file.stem, source=source, info=info)


def json_file(path: str | os.PathLike, reader: str) -> Path:
    """``path`` if it is a file, else the single ``*.json`` in the folder ``path``."""
    target = absolute(path)
    if target.is_file():
        return target
    folder = existing_dir(target, reader)
    found = sorted(folder.glob("*.json"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise UserError(
            f"{reader}: expected one .json file in {folder}, found {len(found)} ({names}); give the file itself"
        )
    return found[0]


def load_json(file: Path, reader: str) -> dict[str, Any]:
    """The parsed json, which must be an object with ``images`` and ``annotations`` lists."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{reader}: {file} is not valid json ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{reader}: {file} has no 'images' list; is it a {reader.upper()} json?")
    if not isinstance(data.get("annotations", []), list):
        raise UserError(f"{reader}: {file}: 'annotations' is not a list")
    return data


def category_names(data: dict[str, Any], file: Path, reader: str, default: dict[int, str]) -> dict[int, str]:
    """Category id -> name, ordered by id; ``default`` when the json has no categories."""
    entries = data.get("categories") or [{"id": i, "name": n} for i, n in default.items()]
    try:
        names = {int(c["id"]): str(c["name"]) for c in entries}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{reader}: {file}: every category needs an integer 'id' and a 'name'") from None
    if not names:
        raise UserError(f"{reader}: {file} has no 'categories'")
    if len(set(names.values())) != len(names):
        raise UserError(f"{reader}: {file}: category names repeat ({sorted(names.values())})")
    return dict(sorted(names.items()))


def image_roots(file: Path, images: str | os.PathLike | None) -> list[Path]:
    """Where images are: ``images`` (relative to the json's folder), else beside the json, then in ``images/``."""
    if images is not None:
        return [Path(os.path.abspath(file.parent / os.path.expanduser(os.fspath(images))))]
    return [file.parent, file.parent / "images"]


def _find_image(file_name: str, roots: Sequence[Path], file: Path, image_id: Any, reader: str) -> Path:
    for root in roots:
        candidate = root / file_name
        if candidate.is_file():
            return Path(os.path.abspath(candidate))
    where = " or ".join(str(r) for r in roots)
    raise UserError(f"{reader}: {file}: image {file_name!r} (id {image_id}) not found under {where}")


def _image_records(
    data: dict[str, Any],
    file: Path,
    roots: Sequence[Path],
    categories: dict[int, str],
    to_box: Callable[[dict[str, Any]], Box],
    reader: str,
    keep_segmentation: bool = False,
    clip: bool = True,
) -> tuple[list[Record], dict[str, int], Counter[str]]:
    """One record per json image (json order) with its non-degenerate boxes, with ``clip`` clipped to
    the image where the json gives its size (:func:`fit_in_image`); also the boxes without area per class
    and the counts of the clipping."""
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in data.get("annotations", []):
        by_image[ann.get("image_id")].append(ann)
    image_ids = {entry.get("id") for entry in data["images"]}
    orphans = [a.get("id") for image_id, anns in by_image.items() if image_id not in image_ids for a in anns]
    if orphans:
        raise UserError(f"{reader}: {file}: annotations {orphans[:5]} refer to image ids not in 'images'")

    records: list[Record] = []
    dropped: defaultdict[str, int] = defaultdict(int)
    fits: Counter[str] = Counter()
    for entry in data["images"]:
        if "file_name" not in entry or "id" not in entry:
            raise UserError(f"{reader}: {file}: an image entry lacks 'file_name' or 'id': {entry}")
        boxes, segmentations = [], []
        width, height = _positive(entry.get("width")), _positive(entry.get("height"))
        for ann in by_image.get(entry["id"], []):
            if ann.get("category_id") not in categories:
                raise UserError(
                    f"{reader}: {file}: annotation {ann.get('id')} has unknown category_id {ann.get('category_id')}"
                )
            try:
                box = to_box(ann)
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{reader}: {file}: annotation {ann.get('id')} has no 4-number 'bbox'") from None
            if box.is_degenerate:
                dropped[box.label] += 1
                continue
            if clip and width and height:
                box = fit_in_image(box, width, height, fits)
                if box is None:
                    continue
            boxes.append(box)
            segmentations.append(ann.get("segmentation"))
        meta = {"id": entry["id"], "width": entry.get("width"), "height": entry.get("height")}
        if keep_segmentation and any(s for s in segmentations):
            meta["segmentations"] = segmentations
        image = _find_image(str(entry["file_name"]), roots, file, entry["id"], reader)
        records.append(Record(path=str(image), boxes=tuple(boxes), meta=meta))
    return records, dict(dropped), fits


def _positive(value: Any) -> float | None:
    """An image side as the json gives it, where it is a positive number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None
