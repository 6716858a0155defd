"""MIDOG 2021 / MIDOG++ json: COCO-like, but ``bbox`` is [x0, y0, x1, y1] (50 px around each cell).

Category 1 is a mitotic figure, 2 a hard negative (imposter); names come from the json's
``categories``. Each record is one image (a cropped slide region) with its boxes and a point at
every box centre; group = the image's slide name, domain = its scanner.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from ssl_path.core.errors import UserError
from ssl_path.data.readers._common import (
    as_bool,
    box_info,
    existing_file,
    read_table,
    require_columns,
    spec_string,
)
from ssl_path.data.readers.coco import (
    _image_records,
    category_names,
    image_roots,
    json_file,
    load_json,
)
from ssl_path.data.readers.records import Box, LabelledSet, Point, Record

DEFAULT_CATEGORIES = {1: "mitotic figure", 2: "hard negative"}

# MIDOG 2021 training set: 50 images per scanner, by image number (the last 50 came without labels).
MIDOG21_SCANNERS = (
    (1, 50, "hamamatsu_xr"),
    (51, 100, "hamamatsu_s360"),
    (101, 150, "aperio_cs2"),
    (151, 200, "leica_gt450"),
)
# Spellings in MIDOG++'s datasets_xvalidation.csv mapped onto the names above.
_SCANNER_ALIASES = {"hamammatsu_xr": "hamamatsu_xr"}


def midog21_scanner(number: int) -> str | None:
    """The scanner of MIDOG 2021 image ``number`` (1-200), else None."""
    for first, last, scanner in MIDOG21_SCANNERS:
        if first <= number <= last:
            return scanner
    return None


def read_midog(
    path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    slides: str | os.PathLike | None = None,
    keep_unannotated: bool | str = False,
) -> LabelledSet:
    """A MIDOG json (or a folder holding exactly one) as image records with boxes and centre points.

    Scanner (domain) per image id: the MIDOG 2021 assignment for ids 1-200, or the ``slides``
    table (columns ``slide``, ``scanner``, optional ``dataset``/``tumor``/``species``, e.g.
    MIDOG++'s ``datasets_xvalidation.csv``), which wins where it lists an id; ``dataset``
    becomes the split. Images without any annotation (MIDOG 2021's unlabelled scanner) are left
    out unless ``keep_unannotated``; their number is in ``info``. ``images`` as for COCO. Boxes are
    kept as given, also where they reach past the image: their centres are the annotated points.
    """
    keep_unannotated = as_bool(keep_unannotated, "keep_unannotated", "midog")
    file = json_file(path, "midog")
    data = load_json(file, "midog")
    categories = category_names(data, file, "midog", default=DEFAULT_CATEGORIES)
    table = _slide_table(existing_file(slides, "midog")) if slides is not None else {}

    annotated = {ann.get("image_id") for ann in data.get("annotations", [])}
    kept = [entry for entry in data["images"] if keep_unannotated or entry.get("id") in annotated]
    unannotated = sum(1 for entry in data["images"] if entry.get("id") not in annotated)

    def to_box(ann: dict[str, Any]) -> Box:
        x0, y0, x1, y1 = ann["bbox"]
        return Box(x0, y0, x1, y1, categories[ann["category_id"]])

    raw, dropped, fits = _image_records(
        # Not clipped: a box's centre is the figure's annotated point, also at the image's edge.
        {**data, "images": kept},
        file,
        image_roots(file, images),
        categories,
        to_box,
        "midog",
        clip=False,
    )
    records = [_with_slide_fields(record, table) for record in raw]
    info = {
        **box_info(dropped, fits),
        "unannotated_images": unannotated,
        "unannotated_images_kept": keep_unannotated,
    }
    source = spec_string(
        "midog",
        file,
        images=str(images) if images is not None else None,
        slides=str(slides) if slides is not None else None,
        keep_unannotated=True if keep_unannotated else None,
    )
    return LabelledSet(records, list(categories.values()), name=file.stem, source=source, info=info)


def _with_slide_fields(record: Record, table: dict[int, dict[str, str]]) -> Record:
    """Group, domain, split, centre points and slide facts for one image record."""
    image_id = record.meta["id"]
    row = table.get(image_id, {}) if isinstance(image_id, int) else {}
    scanner = _scanner_name(row["scanner"]) if row.get("scanner") else None
    if scanner is None and isinstance(image_id, int):
        scanner = midog21_scanner(image_id)
    extra = {key: row[key] for key in ("tumor", "species", "origin") if row.get(key)}
    return dataclasses.replace(
        record,
        group=Path(record.path).stem,
        domain=scanner,
        split=row.get("dataset") or None,
        points=tuple(Point(*b.center, b.label) for b in record.boxes),
        meta={**record.meta, **extra},
    )


def _scanner_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")
    return _SCANNER_ALIASES.get(name, name)


def _slide_table(file: Path) -> dict[int, dict[str, str]]:
    """Slide id -> row (lower-case column names) of a per-slide table."""
    header, rows = read_table(file, "midog")
    require_columns(header, ("slide", "scanner"), file, "midog")
    table = {}
    for line, row in rows:
        slide = row["slide"].split(".")[0]
        if not slide.isdigit():
            raise UserError(f"midog: line {line} of {file}: slide {row['slide']!r} is not an image number")
        table[int(slide)] = row
    return table
