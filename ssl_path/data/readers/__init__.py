"""Readers for labelled sets: each turns one on-disk format into plain records.

Nothing downstream (probes, heads, fine-tuning) parses dataset files; it asks for a
:class:`LabelledSet` through :func:`read_spec` (``READER:PATH?options``) or a ``read_<name>``
function, and uses only records. New formats join through :func:`register_reader`.
"""

from ssl_path.data.readers._common import list_images
from ssl_path.data.readers.amibr import read_amibr
from ssl_path.data.readers.coco import read_coco
from ssl_path.data.readers.folder import read_csv, read_folder
from ssl_path.data.readers.glas import read_glas
from ssl_path.data.readers.midog import MIDOG21_SCANNERS, midog21_scanner, read_midog
from ssl_path.data.readers.monuseg import (
    TCGA_ORGANS,
    read_monuseg,
    tcga_patient_and_organ,
)
from ssl_path.data.readers.records import Box, LabelledSet, Point, Record
from ssl_path.data.readers.spec import (
    FILTERS,
    READERS,
    Spec,
    parse_spec,
    read_spec,
    register_reader,
    with_filters,
)
from ssl_path.data.readers.voc import read_voc
from ssl_path.data.readers.wbc_seg import read_wbc_seg

__all__ = [
    "FILTERS",
    "MIDOG21_SCANNERS",
    "READERS",
    "TCGA_ORGANS",
    "Box",
    "LabelledSet",
    "Point",
    "Record",
    "Spec",
    "list_images",
    "midog21_scanner",
    "parse_spec",
    "read_amibr",
    "read_coco",
    "read_csv",
    "read_folder",
    "read_glas",
    "read_midog",
    "read_monuseg",
    "read_spec",
    "read_voc",
    "read_wbc_seg",
    "register_reader",
    "tcga_patient_and_organ",
    "with_filters",
]
