"""MoNuSeg-style nucleus sets: an image folder and a mask folder holding the same file names.

Names are TCGA barcodes (``TCGA-18-5592-01Z-00-DX1``): the patient is the first three fields and
the two-character tissue source site (TSS) code tells the organ.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ssl_path.core.errors import UserError
from ssl_path.data.readers._common import existing_dir, list_images, spec_string
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
_TCGA = re.compile(r"TCGA-([A-Z0-9]{2})-([A-Z0-9]{4})", re.IGNORECASE)


def read_monuseg(path: str | os.PathLike, *, images: str | None = None, masks: str | None = None) -> LabelledSet:
    """Image/mask pairs matched by file stem; ``images``/``masks`` name the two subfolders if not a known layout.

    Group = TCGA patient (``TCGA-18-5592``), domain = organ from the TSS code (None if unknown).
    No image-level labels, so ``classes`` is empty.
    """
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
    info = {"masks_without_image": len(mask_of) - len(image_files)}
    source = spec_string("monuseg", root, images=images, masks=masks)
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
