"""Pascal VOC detection folders: ``Annotations/*.xml``, ``JPEGImages/`` and ``ImageSets/Main/<split>.txt``."""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from ssl_path.core.errors import UserError
from ssl_path.data.readers._common import (
    box_info,
    existing_dir,
    fit_in_image,
    natural_key,
    spec_string,
    subfolders,
)
from ssl_path.data.readers.records import Box, LabelledSet, Record

# The disjoint official splits; other lists (trainval, per-class files) are unions of these.
RECORD_SPLITS = ("train", "val", "test")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_voc(path: str | os.PathLike, *, split: str | None = None) -> LabelledSet:
    """A VOC folder (or a folder holding exactly one, e.g. ``bccd/`` -> ``bccd/BCCD``) as image records with boxes.

    ``split`` keeps the ids listed in ``ImageSets/Main/<split>.txt`` (train, val, trainval, test...).
    Every record's ``split`` is train, val or test where those lists exist; without ``split``, the ids
    those lists name that have no annotation are in ``info`` (with ``split``, one in its list is an
    error). Boxes without area are dropped, and boxes reaching past the image (by the size its
    annotation gives) clipped to it; both are counted in ``info``, over the records returned.
    Coordinates are VOC's own (1-based pixels). Classes are the box names over the whole set,
    sorted, so they agree between splits.
    """
    root = _voc_root(existing_dir(path, "voc"))
    xmls = sorted((root / "Annotations").glob("*.xml"), key=lambda p: natural_key(p.name))
    if not xmls:
        raise UserError(f"voc: no .xml files in {root / 'Annotations'}")
    split_of = {image_id: name for name in RECORD_SPLITS for image_id in _split_ids(root, name, required=False)}
    records, degenerate, fits = {}, {}, {}
    for xml in xmls:
        record, degenerate[xml.stem], fits[xml.stem] = _parse(xml, root)
        records[xml.stem] = dataclasses.replace(record, split=split_of.get(xml.stem))
    boxless = {name for counts in degenerate.values() for name in counts}
    classes = sorted({b.label for r in records.values() for b in r.boxes} | boxless)
    unlisted = []
    if split is not None:
        wanted = _split_ids(root, split, required=True)
        unknown = [image_id for image_id in wanted if image_id not in records]
        if unknown:
            raise UserError(
                f"voc: {_split_file(root, split)} lists {unknown[0]!r}, which has no Annotations/{unknown[0]}.xml"
            )
        listed = set(wanted)
        kept = [image_id for image_id in records if image_id in listed]
    else:
        kept = list(records)
        # a split carved from record.split is smaller than its list says
        unlisted = [(f"{name}.txt", image_id) for image_id, name in split_of.items() if image_id not in records]
    info = {
        **box_info(sum((degenerate[i] for i in kept), Counter()), sum((fits[i] for i in kept), Counter())),
        "listed_without_annotation": unlisted,
    }
    return LabelledSet(
        [records[i] for i in kept], classes, name=root.name, source=spec_string("voc", root, split=split), info=info
    )


def _voc_root(folder: Path) -> Path:
    if (folder / "Annotations").is_dir():
        return folder
    candidates = [d for d in subfolders(folder) if (d / "Annotations").is_dir()]
    if len(candidates) > 1:
        names = ", ".join(d.name for d in candidates)
        raise UserError(f"voc: several VOC folders under {folder} ({names}); give one of them")
    if not candidates:
        raise UserError(f"voc: no Annotations/ folder under {folder}")
    return candidates[0]


def _split_file(root: Path, split: str) -> Path:
    return root / "ImageSets" / "Main" / f"{split}.txt"


def _split_ids(root: Path, split: str, required: bool) -> list[str]:
    """Image ids of one split list, first token per line (class lists add a ±1 flag after the id)."""
    file = _split_file(root, split)
    if not file.is_file():
        if not required:
            return []
        present = sorted(p.stem for p in file.parent.glob("*.txt")) if file.parent.is_dir() else []
        raise UserError(f"voc: no split list {file} (available: {', '.join(present) or 'none'})")
    return [line.split()[0] for line in file.read_text().splitlines() if line.strip()]


def _parse(xml: Path, root: Path) -> tuple[Record, Counter[str], Counter[str]]:
    """One annotation file: its record (boxes with area, clipped to the image), the boxes without
    area per class, and the counts of the clipping (:func:`fit_in_image`)."""
    try:
        tree = ET.parse(xml).getroot()
    except ET.ParseError as err:
        raise UserError(f"voc: {xml} is not valid XML ({err})") from None
    boxes: list[Box] = []
    difficult: list[bool] = []
    degenerate: Counter[str] = Counter()
    fits: Counter[str] = Counter()
    size = {key: _int(tree.findtext(f"size/{key}")) for key in ("width", "height")}
    for number, obj in enumerate(tree.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        bndbox = obj.find("bndbox")
        try:
            coords = [float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, ValueError):
            coords = []
        if not name or len(coords) != 4:
            raise UserError(f"voc: {xml}: object {number} lacks a name or a numeric bndbox")
        x0, y0, x1, y1 = coords
        box = Box(x0, y0, x1, y1, name)
        if box.is_degenerate:
            degenerate[name] += 1
            continue
        if size["width"] and size["height"]:
            box = fit_in_image(box, size["width"], size["height"], fits)
            if box is None:
                continue
        boxes.append(box)
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    meta: dict[str, Any] = {"id": xml.stem, **size}
    if any(difficult):
        meta["difficult"] = difficult
    return Record(path=str(_image_of(xml, tree, root)), boxes=tuple(boxes), meta=meta), degenerate, fits


def _image_of(xml: Path, tree: ET.Element, root: Path) -> Path:
    folder = root / "JPEGImages"
    named = (tree.findtext("filename") or "").strip()
    candidates = ([folder / named] if named else []) + [folder / (xml.stem + s) for s in _IMAGE_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return Path(os.path.abspath(candidate))
    raise UserError(f"voc: {xml}: no image in {folder} (tried {', '.join(c.name for c in candidates)})")


def _int(text: str | None) -> int | None:
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None
