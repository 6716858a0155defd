"""AMi-Br: 128 px patches of normal and atypical mitotic figures, labels from ``AMI-BR_MIDOG21.csv``.

Layout: ``ROOT/patches/{normal,atypical}/<dataset>_<uid>.png`` and ``ROOT/AMI-BR_MIDOG21.csv``
(columns slide, dataset, uid, x, y, expert1_label, expert2_label, expert1..3_atypical,
majority_atypical), joined on dataset and uid. Group = slide; domain = the MIDOG 2021 scanner,
known from the slide number. Option ``split=benchmark`` sets each record's split to train or test
from ``ROOT/benchmark_split.csv`` (columns uid, split), the slide-disjoint split of the AMi-Br
benchmark (Banerjee et al. 2025), joined on uid.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

from ssl_path.core.errors import UserError
from ssl_path.data.readers._common import (
    choice,
    existing_dir,
    read_table,
    require_columns,
    spec_string,
)
from ssl_path.data.readers.midog import midog21_scanner
from ssl_path.data.readers.records import LabelledSet, Record

CSV_NAME = "AMI-BR_MIDOG21.csv"
SPLIT_FILES = {"benchmark": "benchmark_split.csv"}
SPLIT_VALUES = ("train", "test")
CLASSES = ("normal", "atypical")
TARGETS = ("atypical", "expert1", "expert2")
_META_COLUMNS = ("x", "y", "expert1_label", "expert2_label", "expert1_atypical", "expert2_atypical", "expert3_atypical")


def read_amibr(path: str | os.PathLike, *, target: str = "atypical", split: str | None = None) -> LabelledSet:
    """AMi-Br patches; ``target`` = ``atypical`` (normal/atypical, the agreed label) or ``expert1``/``expert2``
    (that expert's 8 subtypes). Subtypes, votes and the figure's x/y in its slide are in ``meta``.

    ``split`` names a published split that annotates the records (it keeps them all):
    ``benchmark`` sets ``Record.split`` to ``train`` or ``test`` from ``benchmark_split.csv``;
    every patch must be listed there. Without it records have no split. As a SPEC option
    (``amibr:PATH?split=benchmark``) ``split`` goes to this reader, not to the split filter: select
    a part with ``LabelledSet.filter(split=...)``.
    """
    choice(target, TARGETS, "target", "amibr")
    if split is not None:
        choice(split, tuple(SPLIT_FILES), "split", "amibr")
    root = existing_dir(path, "amibr")
    table = root / CSV_NAME
    if not table.is_file():
        raise UserError(f"amibr: no {CSV_NAME} under {root}")
    patches = _patch_index(root)
    header, rows = read_table(table, "amibr")
    require_columns(header, ("slide", "dataset", "uid", "majority_atypical", *_META_COLUMNS), table, "amibr")

    records, without_patch = [], 0
    for line, row in rows:
        key = f"{row['dataset']}_{row['uid']}"
        if key not in patches:
            without_patch += 1
            continue
        folder_label, image = patches.pop(key)
        agreed = "atypical" if _truth(row["majority_atypical"], table, line) else "normal"
        if agreed != folder_label:
            raise UserError(
                f"amibr: line {line} of {table}: majority_atypical says {agreed}, but {image} is in {folder_label}/"
            )
        meta = {name: row[name] for name in _META_COLUMNS}
        meta.update(uid=row["uid"], dataset=row["dataset"], atypical=agreed)
        records.append(
            Record(
                path=str(image),
                label=agreed if target == "atypical" else row[f"{target}_label"],
                group=row["slide"],
                domain=_scanner(row["dataset"], row["slide"]),
                meta=meta,
            )
        )
    if not records:
        raise UserError(f"amibr: no row of {table} matches a patch under {root / 'patches'}")
    classes = CLASSES if target == "atypical" else sorted({r.label for r in records if r.label is not None})
    info = {"rows_without_patch": without_patch, "patches_without_row": len(patches)}
    if split is not None:
        records, info["split_rows_without_patch"] = _with_split(records, root / SPLIT_FILES[split], split)
    source = spec_string("amibr", root, target=None if target == "atypical" else target, split=split)
    return LabelledSet(records, classes, name=root.name, source=source, info=info)


def _with_split(records: list[Record], table: Path, name: str) -> tuple[list[Record], int]:
    """Records with ``split`` from ``table`` (uid, split), and how many of its rows name no record."""
    if not table.is_file():
        raise UserError(f"amibr: split={name} needs {table.name} under {table.parent}; it is not there")
    header, rows = read_table(table, "amibr")
    require_columns(header, ("uid", "split"), table, "amibr")
    split_of: dict[str, str] = {}
    for line, row in rows:
        uid, value = row["uid"], row["split"]
        if value not in SPLIT_VALUES:
            raise UserError(f"amibr: line {line} of {table}: split is {value!r}, expected {' or '.join(SPLIT_VALUES)}")
        if uid in split_of:
            raise UserError(f"amibr: line {line} of {table}: uid {uid} is listed twice")
        split_of[uid] = value
    # The split file names patches by uid alone; uids shared between datasets could not be joined.
    shared = [uid for uid, n in Counter(r.meta["uid"] for r in records).items() if n > 1]
    if shared:
        raise UserError(f"amibr: split={name}: uid {shared[0]} belongs to more than one patch, so {table} is ambiguous")
    unlisted = [r for r in records if r.meta["uid"] not in split_of]
    if unlisted:
        raise UserError(
            f"amibr: {len(unlisted)} patch(es) have no row in {table}, e.g. uid {unlisted[0].meta['uid']} "
            f"({unlisted[0].path})"
        )
    annotated = [dataclasses.replace(r, split=split_of[r.meta["uid"]]) for r in records]
    return annotated, len(split_of) - len(records)


def _patch_index(root: Path) -> dict[str, tuple[str, Path]]:
    """``<dataset>_<uid>`` -> (folder label, patch path) over ``patches/normal`` and ``patches/atypical``."""
    index: dict[str, tuple[str, Path]] = {}
    for label in CLASSES:
        folder = root / "patches" / label
        if not folder.is_dir():
            raise UserError(f"amibr: no patches/{label}/ folder under {root}")
        for image in folder.glob("*.png"):
            index[image.stem] = (label, image)
    return index


def _truth(value: str, table: Path, line: int) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise UserError(f"amibr: line {line} of {table}: majority_atypical is {value!r}, expected True or False")


def _scanner(dataset: str, slide: str) -> str | None:
    """MIDOG 2021 scanner from the slide file name (``002.tiff`` -> 2); other datasets have none here."""
    stem = slide.split(".")[0]
    if dataset != "MIDOG21" or not stem.isdigit():
        return None
    return midog21_scanner(int(stem))
