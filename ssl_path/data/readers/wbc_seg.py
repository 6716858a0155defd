"""White-blood-cell crops with masks (Zheng et al. 2018, the ``segmentation_WBC`` repository).

Layout: ``ROOT/Dataset N/NNN.bmp`` (image), ``ROOT/Dataset N/NNN.png`` (mask: 0 background,
128 cytoplasm, 255 nucleus) and ``ROOT/Class Labels of Dataset N.csv`` with two columns, image
ID and class 1-5. IDs are plain integers (``17``) while file names are zero-padded (``017``),
and the second column's title differs between datasets, so the CSV is read by position and
IDs are matched as numbers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ssl_path.core.errors import UserError
from ssl_path.data.readers._common import (
    as_names,
    existing_dir,
    is_image,
    read_table,
    spec_string,
    subfolders,
)
from ssl_path.data.readers.records import LabelledSet, Record

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")  # class label 1..5
_DATASET_DIR = re.compile(r"Dataset (\d+)")


def read_wbc_seg(path: str | os.PathLike, *, dataset: str | int | None = None) -> LabelledSet:
    """Every ``Dataset N/`` under ``path`` (the repository root) or ``path`` itself if it is one.

    ``dataset`` picks some by number (``1`` or ``1,2``). Domain = ``dataset_N`` (each dataset is
    its own microscope and stain). Images missing from the CSV are kept unlabelled and counted in ``info``.
    """
    target = existing_dir(path, "wbc_seg")
    if _DATASET_DIR.fullmatch(target.name):
        folders = [target]
    else:
        folders = [d for d in subfolders(target) if _DATASET_DIR.fullmatch(d.name)]
        if not folders:
            raise UserError(f"wbc_seg: no 'Dataset N/' folder under {target}")
    if dataset is not None:
        folders = _pick(folders, as_names(dataset) or [], target)

    records: list[Record] = []
    unlabelled = 0
    for folder in folders:
        found, missing_label = _read_dataset(folder)
        records += found
        unlabelled += missing_label
    source = spec_string("wbc_seg", target, dataset=dataset)
    return LabelledSet(records, CLASSES, name=target.name, source=source, info={"unlabelled_images": unlabelled})


def _pick(folders: list[Path], wanted: list[str], target: Path) -> list[Path]:
    by_number = {_number(f): f for f in folders}
    try:
        numbers = [int(w) for w in wanted]
    except ValueError:
        raise UserError(
            f"wbc_seg: option dataset takes dataset numbers such as 1 or 1,2; got {','.join(wanted)!r}"
        ) from None
    unknown = [n for n in numbers if n not in by_number]
    if unknown:
        raise UserError(
            f"wbc_seg: no 'Dataset {unknown[0]}/' under {target} (found: {', '.join(f.name for f in folders)})"
        )
    return [by_number[n] for n in numbers]


def _number(folder: Path) -> int:
    return int(_DATASET_DIR.fullmatch(folder.name).group(1))  # type: ignore[union-attr]


def _read_dataset(folder: Path) -> tuple[list[Record], int]:
    """Records of one ``Dataset N/`` folder in ID order, and how many of its images have no CSV row."""
    number = _number(folder)
    table = folder.parent / f"Class Labels of {folder.name}.csv"
    if not table.is_file():
        raise UserError(f"wbc_seg: no '{table.name}' beside {folder}")
    images, masks = _index_files(folder)
    labels = _read_labels(table, images, folder)
    records = []
    for image_id in sorted(images):
        label = labels.get(image_id)
        if image_id not in masks:
            raise UserError(f"wbc_seg: image {images[image_id]} has no mask {image_id:03d}.png beside it")
        records.append(
            Record(
                path=str(images[image_id]),
                label=label,
                domain=f"dataset_{number}",
                mask_path=str(masks[image_id]),
                meta={"dataset": number, "image_id": image_id},
            )
        )
    return records, sum(1 for image_id in images if image_id not in labels)


def _index_files(folder: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    """Numbered images (any image type but PNG) and numbered PNG masks of one dataset folder."""
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for file in folder.iterdir():
        if not (is_image(file) and file.stem.isdigit()):
            continue
        kind = masks if file.suffix.lower() == ".png" else images
        kind[int(file.stem)] = Path(os.path.abspath(file))
    if not images:
        raise UserError(f"wbc_seg: no numbered images (NNN.bmp) in {folder}")
    return images, masks


def _read_labels(table: Path, images: dict[int, Path], folder: Path) -> dict[int, str]:
    header, rows = read_table(table, "wbc_seg")
    if len(header) < 2:
        raise UserError(f"wbc_seg: {table} needs two columns (image ID, class label); header is {header}")
    id_column, class_column = header[0], header[1]
    labels: dict[int, str] = {}
    for line, row in rows:
        where = f"line {line} of {table}"
        try:
            image_id, class_id = int(row[id_column]), int(row[class_column])
        except (KeyError, ValueError):
            raise UserError(f"wbc_seg: {where}: expected two integers (image ID, class 1-5)") from None
        if not 1 <= class_id <= len(CLASSES):
            raise UserError(f"wbc_seg: {where}: class {class_id} is not one of 1-{len(CLASSES)}")
        if image_id in labels:
            raise UserError(f"wbc_seg: {where}: image ID {image_id} appears twice")
        if image_id not in images:
            raise UserError(
                f"wbc_seg: {where}: image ID {image_id} has no image in {folder} (expected {image_id:03d}.bmp)"
            )
        labels[image_id] = CLASSES[class_id - 1]
    return labels
