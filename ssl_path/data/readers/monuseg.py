"""MoNuSeg-style nucleus sets: an image folder and a mask folder holding the same file names.

Names are TCGA barcodes (``TCGA-18-5592-01Z-00-DX1``): the patient is the first three fields and
the two-character tissue source site (TSS) code tells the organ. Option ``split=kumar`` annotates
every record with its part of the Kumar et al. 2017 split (:data:`KUMAR_SPLIT`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ssl_path.core.errors import UserError
from ssl_path.data.readers._common import choice, existing_dir, list_images, spec_string
from ssl_path.data.readers.records import LabelledSet, Record

# (image folder, mask folder) pairs tried in order when none is given.
LAYOUTS = (("NormalizedPNG", "GroundTruthInside"), ("images", "masks"))

# TSS code -> organ for the MoNuSeg 2018 training slides (per the data's PROVENANCE.md).
# HE sites are papillary renal cell carcinoma; listed as kidney with the other kidney site.
# fmt: off
TCGA_ORGANS = {
    "A7": "breast", "AR": "breast", "E2": "breast",
    "B0": "kidney", "HE": "kidney",
    "CH": "prostate", "G9": "prostate",
    "DK": "bladder", "G2": "bladder",
    "AY": "colon", "NH": "colon",
    "RD": "stomach",
    "18": "lung", "21": "lung", "38": "lung", "49": "lung", "50": "lung",
    "KB": "liver",
}
# fmt: on

# Kumar N. et al., IEEE TMI 36(7), 2017: the 30 MoNuSeg training slides as 16 train, 8 test images of
# organs seen in training and 6 of other organs; by the TSS-PATIENT part of the TCGA barcode.
# fmt: off
KUMAR_SPLIT: dict[str, tuple[str, ...]] = {
    "train": (
        "A7-A13E", "A7-A13F", "AR-A1AK", "AR-A1AS", "18-5592", "38-6178", "49-4488", "50-5931",
        "B0-5711", "HE-7128", "HE-7129", "HE-7130", "G9-6336", "G9-6348", "G9-6356", "G9-6363",
    ),
    "test_same_organ": ("E2-A1B5", "E2-A14V", "B0-5710", "B0-5698", "21-5784", "21-5786", "CH-5767", "G9-6362"),
    "test_other_organ": ("DK-A2I6", "G2-A2EK", "AY-A8YK", "NH-A8F7", "KB-A93J", "RD-A8N9"),
}
# fmt: on
SPLITS = ("kumar",)
_TCGA = re.compile(r"TCGA-([A-Z0-9]{2})-([A-Z0-9]{4})", re.IGNORECASE)


def read_monuseg(
    path: str | os.PathLike, *, images: str | None = None, masks: str | None = None, split: str | None = None
) -> LabelledSet:
    """Image/mask pairs matched by file stem; ``images``/``masks`` name the two subfolders if not a known layout.

    Group = TCGA patient (``TCGA-18-5592``), domain = organ from the TSS code (None if unknown).
    No image-level labels, so ``classes`` is empty. Without ``split`` records have no split.

    ``split`` names a published split that annotates the records (it keeps them all): ``kumar``
    sets ``Record.split`` to ``train``, ``test_same_organ`` or ``test_other_organ``. Every image
    must then be one of the 30 it names and every test image must be present; training images
    the folder lacks are listed in ``info["split_train_missing"]``. As a SPEC option
    (``monuseg:PATH?split=kumar``) ``split`` goes to this reader, not to the split filter: select
    a part with ``LabelledSet.filter(split=...)``.
    """
    if split is not None:
        choice(split, SPLITS, "split", "monuseg")
    root = existing_dir(path, "monuseg")
    image_dir, mask_dir = _layout(root, images, masks)
    image_files = list_images(image_dir)
    if not image_files:
        raise UserError(f"monuseg: no images in {image_dir}")
    mask_of = {p.stem: p for p in list_images(mask_dir)}
    unmatched = [p.name for p in image_files if p.stem not in mask_of]
    if unmatched:
        raise UserError(
            f"monuseg: {len(unmatched)} image(s) in {image_dir} have no mask of the same name "
            f"in {mask_dir}, e.g. {unmatched[0]}"
        )
    records = [_record(image, mask_of[image.stem]) for image in image_files]
    info: dict[str, object] = {"masks_without_image": len(mask_of) - len(image_files)}
    if split is not None:
        records, info["split_train_missing"] = _kumar_split(records, image_dir)
    source = spec_string("monuseg", root, images=images, masks=masks, split=split)
    return LabelledSet(records, (), name=root.name, source=source, info=info)


def tcga_patient_and_organ(name: str) -> tuple[str | None, str | None]:
    """(``TCGA-XX-YYYY``, organ or None) from a TCGA barcode; (None, None) if ``name`` is not one."""
    match = _TCGA.match(name)
    if match is None:
        return None, None
    site = match.group(1).upper()
    return f"TCGA-{site}-{match.group(2).upper()}", TCGA_ORGANS.get(site)


def _record(image: Path, mask: Path) -> Record:
    patient, organ = tcga_patient_and_organ(image.stem)
    return Record(path=str(image), group=patient, domain=organ, mask_path=str(mask), meta={"name": image.stem})


def _kumar_split(records: list[Record], image_dir: Path) -> tuple[list[Record], list[str]]:
    """Records with their Kumar split set, and the training patients the folder lacks."""
    part_of = {patient: part for part, patients in KUMAR_SPLIT.items() for patient in patients}
    known = ", ".join(f"{part} ({len(patients)})" for part, patients in KUMAR_SPLIT.items())
    found: set[str] = set()
    annotated = []
    for record in records:
        patient = (record.group or "").removeprefix("TCGA-")
        if patient not in part_of:
            raise UserError(
                f"monuseg: split=kumar: {Path(record.path).name} in {image_dir} is none of the 30 Kumar et al. "
                f"images ({known}), matched by the TSS-PATIENT part of a TCGA name"
            )
        found.add(patient)
        annotated.append(dataclasses.replace(record, split=part_of[patient]))
    missing_test = [p for part in ("test_same_organ", "test_other_organ") for p in KUMAR_SPLIT[part] if p not in found]
    if missing_test:
        raise UserError(
            f"monuseg: split=kumar: {len(missing_test)} test image(s) missing from {image_dir}: "
            f"{', '.join(f'TCGA-{p}' for p in missing_test)}"
        )
    return annotated, [f"TCGA-{p}" for p in KUMAR_SPLIT["train"] if p not in found]


def _layout(root: Path, images: str | None, masks: str | None) -> tuple[Path, Path]:
    if images is not None or masks is not None:
        if images is None or masks is None:
            raise UserError("monuseg: options images and masks go together (both subfolder names)")
        pairs = [(images, masks)]
    else:
        pairs = list(LAYOUTS)
    for image_name, mask_name in pairs:
        image_dir, mask_dir = root / image_name, root / mask_name
        if image_dir.is_dir() and mask_dir.is_dir():
            return Path(os.path.abspath(image_dir)), Path(os.path.abspath(mask_dir))
    expected = " or ".join(f"{i}/ + {m}/" for i, m in pairs)
    raise UserError(f"monuseg: no image and mask folders under {root} (expected {expected})")
