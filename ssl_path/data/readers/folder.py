"""Folder-per-class sets (``ROOT/<class>/**/*.png``) and CSV lists of images with labels."""

from __future__ import annotations

import os
from pathlib import Path

from ssl_path.core.errors import UserError
from ssl_path.data.images import TILE_SUFFIXES
from ssl_path.data.readers._common import (
    existing_dir,
    existing_file,
    list_images,
    read_table,
    require_columns,
    spec_string,
    subfolders,
)
from ssl_path.data.readers.records import LabelledSet, Record

_CSV_FIELDS = ("path", "label", "group", "domain", "split", "mask")


def read_folder(path: str | os.PathLike) -> LabelledSet:
    """One class per subfolder of ``path``, images found recursively inside each; classes sorted by name.

    An empty class folder is an error rather than a silently missing class, since class ids
    would then shift between two copies of the same set.
    """
    root = existing_dir(path, "folder")
    class_dirs = subfolders(root)
    if not class_dirs:
        loose = len(list_images(root))
        hint = f" ({loose} images lie directly in it)" if loose else ""
        raise UserError(f"folder: no class folders under {root}{hint}; expected ROOT/<class>/<image>")
    class_dirs = sorted(class_dirs, key=lambda p: p.name)
    records = []
    for class_dir in class_dirs:
        images = list_images(class_dir, recursive=True)
        if not images:
            raise UserError(f"folder: class folder {class_dir} has no images ({', '.join(sorted(TILE_SUFFIXES))})")
        records += [Record(path=str(image), label=class_dir.name) for image in images]
    return LabelledSet(records, [d.name for d in class_dirs], name=root.name, source=spec_string("folder", root))


def read_csv(path: str | os.PathLike) -> LabelledSet:
    """Rows ``path,label[,group,domain,split,mask]``; image paths absolute or relative to the CSV's folder.

    Blank labels are allowed (unlabelled rows, e.g. for segmentation); other columns go to ``meta``.
    Classes are the distinct labels, sorted.
    """
    table = existing_file(path, "csv")
    header, rows = read_table(table, "csv")
    require_columns(header, ("path", "label"), table, "csv")
    records = []
    for line, row in rows:
        image = _row_file(row.get("path", ""), table, line, "image")
        mask = _row_file(row["mask"], table, line, "mask") if row.get("mask") else None
        meta = {key: value for key, value in row.items() if key not in _CSV_FIELDS and key and value}
        records.append(
            Record(
                path=str(image),
                label=row.get("label") or None,
                group=row.get("group") or None,
                domain=row.get("domain") or None,
                split=row.get("split") or None,
                mask_path=str(mask) if mask else None,
                meta=meta,
            )
        )
    if not records:
        raise UserError(f"csv: {table} has a header but no rows")
    classes = sorted({r.label for r in records if r.label is not None})
    return LabelledSet(records, classes, name=table.stem, source=spec_string("csv", table))


def _row_file(value: str, table: Path, line: int, what: str) -> Path:
    if not value:
        raise UserError(f"csv: line {line} of {table}: empty {what} path")
    file = Path(os.path.expanduser(value))
    file = Path(os.path.abspath(file if file.is_absolute() else table.parent / file))
    if not file.is_file():
        raise UserError(f"csv: line {line} of {table}: {what} {value!r} not found (looked at {file})")
    return file
