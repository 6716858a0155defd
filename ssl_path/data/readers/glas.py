"""GlaS (Warwick-QU gland segmentation): ``train_N.bmp`` / ``train_N_anno.bmp``, ``testA_N``, ``testB_N``
and ``Grade.csv`` (name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)).

The released ``Grade.csv`` pads headers and values with spaces, so both are stripped.
"""

from __future__ import annotations

import os
import re

from ssl_path.core.errors import UserError
from ssl_path.data.readers._common import (
    choice,
    existing_dir,
    list_images,
    read_table,
    require_columns,
    spec_string,
)
from ssl_path.data.readers.records import LabelledSet, Record

TARGETS = ("glas", "sirinukunwattana")
SPLITS = ("train", "testA", "testB", "test")
GLAS_CLASSES = ("benign", "malignant")
_COLUMNS = {"glas": "grade (glas)", "sirinukunwattana": "grade (sirinukunwattana et al. 2015)"}
_NAME = re.compile(r"(train|testA|testB)_\d+")


def read_glas(path: str | os.PathLike, *, split: str | None = None, target: str = "glas") -> LabelledSet:
    """GlaS images with gland masks; label = GlaS grade (benign/malignant) or, with
    ``target=sirinukunwattana``, the 5-level grade. Group = patient ID; split = train/testA/testB
    from the name; option ``split=test`` keeps testA and testB.
    """
    choice(target, TARGETS, "target", "glas")
    if split is not None:
        choice(split, SPLITS, "split", "glas")
    root = existing_dir(path, "glas")
    table = root / "Grade.csv"
    if not table.is_file():
        raise UserError(f"glas: no Grade.csv under {root}")
    header, rows = read_table(table, "glas")
    require_columns(header, ("name", "patient id", _COLUMNS[target]), table, "glas")
    files = {p.stem: p for p in list_images(root)}

    records = []
    for line, row in rows:
        name, where = row["name"], f"line {line} of {table}"
        match = _NAME.fullmatch(name)
        if match is None:
            raise UserError(f"glas: {where}: name {name!r} is not train_N, testA_N or testB_N")
        if name not in files or f"{name}_anno" not in files:
            raise UserError(f"glas: {where}: {name} needs both {name}.bmp and {name}_anno.bmp in {root}")
        grades = {key: row.get(column, "") for key, column in _COLUMNS.items()}
        records.append(
            Record(
                path=str(files[name]),
                label=(grades[target].lower() if target == "glas" else grades[target]) or None,
                group=row["patient id"] or None,
                mask_path=str(files[f"{name}_anno"]),
                split=match.group(1),
                meta={"name": name, **{f"grade_{key}": value for key, value in grades.items() if value}},
            )
        )
    if not records:
        raise UserError(f"glas: {table} has no rows")
    classes = GLAS_CLASSES if target == "glas" else sorted({r.label for r in records if r.label is not None})
    odd = sorted({r.label for r in records if r.label is not None} - set(classes))
    if odd:
        raise UserError(f"glas: {table}: grade(s) {odd} are not {' or '.join(GLAS_CLASSES)}")
    if split is not None:
        keep = ("testA", "testB") if split == "test" else (split,)
        records = [r for r in records if r.split in keep]
    source = spec_string("glas", root, split=split, target=None if target == "glas" else target)
    return LabelledSet(records, classes, name=root.name, source=source)
