"""Readers for labelled sets, on real data (read-only) and small layouts built from it in tmp_path.

The project's own sample (data/sample: 344 AMi-Br patches, 30 BCCD smears) serves wherever some real images
will do; the full sets in ../shared/data only where their published counts are the point, or where the sample
has no such set (segmentation_WBC, MoNuSeg).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_path.core.errors import UserError
from ssl_path.data.readers import (
    READERS,
    Box,
    LabelledSet,
    Point,
    Record,
    parse_spec,
    read_amibr,
    read_coco,
    read_csv,
    read_folder,
    read_glas,
    read_midog,
    read_monuseg,
    read_spec,
    read_voc,
    read_wbc_seg,
    register_reader,
)


@pytest.fixture(scope="module")
def bccd(shared_data: Path) -> LabelledSet:
    return read_voc(shared_data / "bccd")


@pytest.fixture(scope="module")
def sample_bccd(sample_data: Path) -> LabelledSet:
    return read_voc(sample_data / "bccd")


@pytest.fixture(scope="module")
def amibr(sample_data: Path) -> Path:
    """The sample's AMi-Br: 344 patches of 63 slides (30 scanned on the XR, 33 on the S360), with the split."""
    return sample_data / "amibr"


# --- AMi-Br and folder-per-class --------------------------------------------------------------------------


# (root fixture, folder in it, normal, atypical, slides, XR and S360 patches, XR and S360 slides). The
# sample's counts come from its folders and CSV; 88 of the full set's 100 slides hold a figure.
AMIBR_COUNTS = {
    "full": ("shared_data", "amibr_midog21", 801, 232, 88, (451, 582), (44, 44)),
    "sample": ("sample_data", "amibr", 211, 133, 63, (168, 176), (30, 33)),
}


@pytest.mark.parametrize("which", AMIBR_COUNTS)
def test_amibr_counts_slides_and_scanners(which: str, request: pytest.FixtureRequest) -> None:
    fixture, folder, normal, atypical, slides, per_scanner, slides_per_scanner = AMIBR_COUNTS[which]
    ds = read_amibr(request.getfixturevalue(fixture) / folder)
    assert ds.classes == ("normal", "atypical")
    assert ds.class_counts() == {"normal": normal, "atypical": atypical}
    assert len(ds) == normal + atypical and len(ds.groups()) == slides
    xr, s360 = ds.filter(domain="hamamatsu_xr"), ds.filter(domain="hamamatsu_s360")
    assert (len(xr), len(s360)) == per_scanner
    assert (len(xr.groups()), len(s360.groups())) == slides_per_scanner
    # MIDOG 2021 slides 001-050 were scanned on the XR, 051-100 on the S360
    assert all(int(r.group[:3]) <= 50 for r in xr) and all(51 <= int(r.group[:3]) <= 100 for r in s360)
    assert not set(xr.groups()) & set(s360.groups())
    first = next(r for r in ds if r.meta["uid"] == "7")
    assert (first.group, first.label, first.meta["expert1_label"]) == ("002.tiff", "atypical", "AMF segregation")
    assert Path(first.path).parent.name == "atypical" and Path(first.path).is_file()
    assert ds.targets().count(1) == atypical


def test_amibr_expert_subtypes_as_target(amibr: Path) -> None:
    ds = read_amibr(amibr, target="expert1")
    # The sample holds all 8 subtypes; 116 of its 344 rows say "NMF prometaphase" in expert1_label.
    assert len(ds.classes) == 8 and sum(ds.class_counts().values()) == 344
    assert ds.class_counts()["NMF prometaphase"] == 116
    assert ds.classes == tuple(sorted(ds.classes))
    assert sum(r.meta["atypical"] == "atypical" for r in ds) == 133
    with pytest.raises(UserError, match="target must be one of"):
        read_amibr(amibr, target="expert3")


def test_amibr_benchmark_split_is_slide_disjoint(amibr: Path) -> None:
    assert {r.split for r in read_amibr(amibr)} == {None}
    ds = read_spec(f"amibr:{amibr}?split=benchmark")
    # benchmark_split.csv: 248 train and 96 test rows, of 44 and 19 slides.
    assert Counter(r.split for r in ds) == {"train": 248, "test": 96}
    assert ds.splits() == ["test", "train"] and ds.info["split_rows_without_patch"] == 0
    train, test = ds.filter(split="train"), ds.filter(split="test")
    assert not set(train.groups()) & set(test.groups())
    assert len(train.groups()) + len(test.groups()) == 63
    assert ds.source == f"amibr:{amibr}?split=benchmark"
    assert read_spec(ds.source).records == ds.records
    # The option goes to the reader; the record filters still apply beside it.
    xr = read_spec(f"amibr:{amibr}?split=benchmark&domain=hamamatsu_xr")
    assert len(xr) == 168 and {r.split for r in xr} == {"train", "test"}
    with pytest.raises(UserError, match="split must be one of benchmark; got 'kumar'"):
        read_amibr(amibr, split="kumar")


def test_amibr_benchmark_split_errors(tmp_path: Path, amibr: Path) -> None:
    (tmp_path / "patches").symlink_to(amibr / "patches")
    (tmp_path / "AMI-BR_MIDOG21.csv").symlink_to(amibr / "AMI-BR_MIDOG21.csv")
    with pytest.raises(UserError, match=rf"split=benchmark needs benchmark_split.csv under {tmp_path}"):
        read_amibr(tmp_path, split="benchmark")
    lines = (amibr / "benchmark_split.csv").read_text().splitlines()
    table = tmp_path / "benchmark_split.csv"
    cases = {
        "\n".join(lines[:-1]): rf"1 patch\(es\) have no row in {table}, e.g. uid {lines[-1].split(',')[0]}",
        "\n".join([*lines[:3], lines[3].replace("train", "val"), *lines[4:]]): r"line 4 of .*split is 'val'",
        "\n".join([*lines, lines[1]]): rf"line {len(lines) + 1} of .*uid {lines[1].split(',')[0]} is listed twice",
        "uid,fold\n6,1": r"lacks column\(s\) split",
    }
    for text, message in cases.items():
        table.write_text(text + "\n")
        with pytest.raises(UserError, match=message):
            read_amibr(tmp_path, split="benchmark")


def test_folder_per_class_reads_amibr_patches(amibr: Path) -> None:
    ds = read_folder(amibr / "patches")
    assert ds.classes == ("atypical", "normal")
    assert ds.class_counts() == {"atypical": 133, "normal": 211}
    assert ds.source == f"folder:{amibr / 'patches'}"


def test_folder_recurses_and_rejects_an_empty_class(tmp_path: Path, amibr: Path) -> None:
    src = sorted((amibr / "patches" / "normal").iterdir())[:3]
    (tmp_path / "b" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    shutil.copy(src[0], tmp_path / "a")
    shutil.copy(src[1], tmp_path / "b" / "deep" / "er")
    shutil.copy(src[2], tmp_path / "b")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    assert read_folder(tmp_path).class_counts() == {"a": 1, "b": 2}

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*empty has no images"):
        read_folder(tmp_path)


# --- CSV lists ----------------------------------------------------------------------------------------------


def test_csv_resolves_relative_and_absolute_paths(tmp_path: Path, amibr: Path) -> None:
    one, two, three = sorted((amibr / "patches" / "normal").iterdir())[:3]
    local = tmp_path / "imgs"
    local.mkdir()
    shutil.copy(one, local / "one.png")
    mask = tmp_path / "masks" / two.name  # the reader checks that a mask exists, not what it holds
    mask.parent.mkdir()
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(mask)
    table = tmp_path / "list.csv"
    table.write_text(
        "path,label,group,domain,split,mask,stain\n"
        "imgs/one.png,lymphocyte,p1,site_a,train,,rapid\n"
        f"{two},neutrophil,p2,site_b,test,{mask},\n"
        f"{three},,p2,site_b,test,,\n"
    )
    ds = read_csv(table)
    assert ds.classes == ("lymphocyte", "neutrophil")
    assert [r.path for r in ds] == [str(local / "one.png"), str(two), str(three)]
    assert ds.labels() == ["lymphocyte", "neutrophil", None]
    assert ds.targets() == [0, 1, -1]
    assert ds[0].meta == {"stain": "rapid"} and ds[1].mask_path == str(mask)
    assert ds.filter(split="test", group="p2").labels() == ["neutrophil", None]
    assert ds.filter(domain=["site_a", "site_b"], label="lymphocyte").labels() == ["lymphocyte"]


def test_csv_errors_name_the_line_or_the_columns(tmp_path: Path, amibr: Path) -> None:
    image = amibr / "patches" / "normal" / "MIDOG21_10.png"
    table = tmp_path / "bad.csv"
    table.write_text(f"path,label\n{image},a\nmissing.png,b\n")
    with pytest.raises(UserError, match=r"line 3 of .*bad\.csv: image 'missing\.png' not found"):
        read_csv(table)
    table.write_text(f"file,class\n{image},a\n")
    with pytest.raises(UserError, match="lacks column.*path, label"):
        read_csv(table)


# --- segmentation_WBC ---------------------------------------------------------------------------------------


def test_wbc_seg_classes_masks_and_mask_values(shared_data: Path) -> None:
    ds = read_wbc_seg(shared_data / "wbc_seg")
    assert ds.classes == ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
    assert list(ds.class_counts().values()) == [176, 53, 48, 22, 1]
    assert ds.domains() == ["dataset_1"]
    # ID 1 is a lymphocyte (CSV row "1,2"); IDs are matched to zero-padded names.
    assert (Path(ds[0].path).name, ds[0].label) == ("001.bmp", "lymphocyte")
    values: set[int] = set()
    for r in ds:
        assert Path(r.mask_path).stem == Path(r.path).stem
        values |= set(np.unique(np.asarray(Image.open(r.mask_path))).tolist())
    assert values == {0, 128, 255}
    single = read_wbc_seg(shared_data / "wbc_seg" / "Dataset 1")
    assert single.records == ds.records


def test_wbc_seg_root_with_two_datasets(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "wbc_seg"
    (tmp_path / "Dataset 1").symlink_to(src / "Dataset 1", target_is_directory=True)
    shutil.copy(src / "Class Labels of Dataset 1.csv", tmp_path)
    second = tmp_path / "Dataset 2"
    second.mkdir()
    for n in (1, 2, 3):
        shutil.copy(src / "Dataset 1" / f"{n + 10:03d}.bmp", second / f"{n:03d}.bmp")
        shutil.copy(src / "Dataset 1" / f"{n + 10:03d}.png", second / f"{n:03d}.png")
    # Dataset 2's CSV in the repository titles its second column "class", not "class label".
    (tmp_path / "Class Labels of Dataset 2.csv").write_text("image ID,class\n1,2\n2,2\n3,5\n")

    ds = read_wbc_seg(tmp_path)
    assert len(ds) == 303 and ds.domains() == ["dataset_1", "dataset_2"]
    assert ds.filter(domain="dataset_2").labels() == ["lymphocyte", "lymphocyte", "basophil"]
    assert read_spec(f"wbc_seg:{tmp_path}?dataset=2").labels() == ["lymphocyte", "lymphocyte", "basophil"]
    with pytest.raises(UserError, match="no 'Dataset 7/'"):
        read_wbc_seg(tmp_path, dataset=7)

    (tmp_path / "Class Labels of Dataset 2.csv").write_text("image ID,class\n1,2\n4,1\n")
    with pytest.raises(UserError, match=r"line 3 of .*image ID 4 has no image"):
        read_wbc_seg(tmp_path)


# --- Pascal VOC and COCO ------------------------------------------------------------------------------------


def test_voc_bccd_boxes_after_dropping_degenerate_ones(bccd: LabelledSet) -> None:
    assert len(bccd) == 364 and bccd.classes == ("Platelets", "RBC", "WBC")
    # PROVENANCE: RBC 4155, WBC 372, Platelets 361; the 2 zero-area boxes are both RBC.
    assert bccd.box_counts() == {"Platelets": 361, "RBC": 4153, "WBC": 372}
    assert bccd.info["degenerate_by_class"] == {"RBC": 2} and bccd.info["degenerate_boxes_dropped"] == 2
    assert all(b.x1 > b.x0 and b.y1 > b.y0 for r in bccd for b in r.boxes)
    assert all(r.label is None and r.meta["width"] == 640 and r.meta["height"] == 480 for r in bccd)
    assert Counter(r.split for r in bccd) == {"train": 205, "val": 87, "test": 72}
    first = bccd[0]
    assert Path(first.path).name == "BloodImage_00000.jpg"
    assert Box(260, 177, 491, 376, "WBC") in first.boxes


def test_voc_sample_bccd_boxes(sample_bccd: LabelledSet) -> None:
    """The same on the sample; its counts from its XML files (no zero-area box among them) and split lists."""
    assert len(sample_bccd) == 30 and sample_bccd.classes == ("Platelets", "RBC", "WBC")
    assert sample_bccd.box_counts() == {"Platelets": 31, "RBC": 496, "WBC": 32}
    assert sample_bccd.info["degenerate_by_class"] == {} and sample_bccd.info["degenerate_boxes_dropped"] == 0
    assert all(b.x1 > b.x0 and b.y1 > b.y0 for r in sample_bccd for b in r.boxes)
    assert all(r.label is None and r.meta["width"] == 640 and r.meta["height"] == 480 for r in sample_bccd)
    assert Counter(r.split for r in sample_bccd) == {"train": 18, "val": 6, "test": 6}
    first = sample_bccd[0]
    assert (Path(first.path).name, first.split) == ("BloodImage_00000.jpg", "val")
    assert Box(260, 177, 491, 376, "WBC") in first.boxes


def test_voc_drops_a_zero_area_box_and_counts_it(sample_data: Path, tmp_path: Path) -> None:
    """The full set's two zero-area RBC boxes, made on a copy of the sample: one added to an XML file."""
    root = tmp_path / "BCCD"
    shutil.copytree(sample_data / "bccd" / "BCCD", root)
    xml = root / "Annotations" / "BloodImage_00000.xml"
    flat = "<object><name>RBC</name><bndbox><xmin>100</xmin><ymin>50</ymin><xmax>100</xmax><ymax>90</ymax></bndbox></object>"
    xml.write_text(xml.read_text().replace("</annotation>", flat + "</annotation>"))
    ds = read_voc(root)
    assert ds.info["degenerate_by_class"] == {"RBC": 1} and ds.info["degenerate_boxes_dropped"] == 1
    assert ds.box_counts() == {"Platelets": 31, "RBC": 496, "WBC": 32}  # the sample's, the flat box left out


def test_voc_clips_a_box_past_the_image_and_drops_one_outside_it(sample_data: Path, tmp_path: Path) -> None:
    """The sample's images are 640 x 480 (their XML says so): a box reaching to x 9000 ends at the edge."""
    root = tmp_path / "BCCD"
    shutil.copytree(sample_data / "bccd" / "BCCD", root)
    xml = root / "Annotations" / "BloodImage_00000.xml"
    past = "<object><name>WBC</name><bndbox><xmin>600</xmin><ymin>-5</ymin><xmax>9000</xmax><ymax>90</ymax></bndbox></object>"
    outside = "<object><name>RBC</name><bndbox><xmin>700</xmin><ymin>50</ymin><xmax>760</xmax><ymax>90</ymax></bndbox></object>"
    xml.write_text(xml.read_text().replace("</annotation>", past + outside + "</annotation>"))
    ds = read_voc(root)
    first = next(r for r in ds if Path(r.path).name == "BloodImage_00000.jpg")
    assert Box(600, 0, 640, 90, "WBC") in first.boxes and not any(b.x1 > 640 for b in first.boxes)
    assert (ds.info["boxes_clipped"], ds.info["boxes_outside_image"], ds.info["degenerate_by_class"]) == (1, 1, {})
    assert read_voc(root, split="test").info["boxes_clipped"] == 0  # BloodImage_00000 is in val: counted there
    assert ds.box_counts() == {"Platelets": 31, "RBC": 496, "WBC": 33}


def test_voc_split_option(shared_data: Path) -> None:
    sizes = {s: len(read_voc(shared_data / "bccd", split=s)) for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 205, "val": 87, "trainval": 292, "test": 72}
    trainval = read_voc(shared_data / "bccd", split="trainval")
    assert trainval.splits() == ["train", "val"] and trainval.classes == ("Platelets", "RBC", "WBC")
    via_spec = read_spec(f"voc:{shared_data / 'bccd'}?split=test")
    assert len(via_spec) == 72 and via_spec.source.endswith("BCCD?split=test")
    with pytest.raises(UserError, match=r"no split list .*holdout\.txt \(available: test, train, trainval, val\)"):
        read_voc(shared_data / "bccd", split="holdout")


def test_voc_split_option_on_the_sample(sample_data: Path) -> None:
    """The sample's lists: the first 18 / 6 / 6 ids of the official train / val / test, trainval = train + val."""
    root = sample_data / "bccd"
    sizes = {s: len(read_voc(root, split=s)) for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 18, "val": 6, "trainval": 24, "test": 6}
    trainval = read_voc(root, split="trainval")
    assert trainval.splits() == ["train", "val"] and trainval.classes == ("Platelets", "RBC", "WBC")
    via_spec = read_spec(f"voc:{root}?split=test")
    assert len(via_spec) == 6 and via_spec.source.endswith("BCCD?split=test")
    with pytest.raises(UserError, match=r"no split list .*holdout\.txt \(available: test, train, trainval, val\)"):
        read_voc(root, split="holdout")


def test_voc_without_annotations_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(UserError, match=f"voc: no Annotations/ folder under {tmp_path}"):
        read_voc(tmp_path)


def test_coco_reads_back_bccd_converted_from_voc(tmp_path: Path, sample_data: Path, sample_bccd: LabelledSet) -> None:
    categories = {name: i + 1 for i, name in enumerate(sample_bccd.classes)}
    images, annotations = [], []
    for image_id, r in enumerate(sample_bccd, start=1):
        images.append({"id": image_id, "file_name": Path(r.path).name, "width": 640, "height": 480})
        for b in r.boxes:
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": categories[b.label]}
            ann["bbox"] = [b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0]
            annotations.append(ann)
    annotations[0]["segmentation"] = [[260, 177, 491, 177, 491, 376]]
    annotations.append({"id": 99999, "image_id": 1, "category_id": 2, "bbox": [10, 10, 0, 5]})
    annotations.append({"id": 99998, "image_id": 2, "category_id": 3, "bbox": [600, 400, 100, 100]})  # past the edge
    cats = [{"id": i, "name": n} for n, i in categories.items()]
    (tmp_path / "bccd.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    # Images are looked up beside the json, then in images/ beside it.
    (tmp_path / "images").symlink_to(sample_data / "bccd" / "BCCD" / "JPEGImages", target_is_directory=True)

    ds = read_coco(tmp_path / "bccd.json")
    assert ds.classes == sample_bccd.classes and len(ds) == len(sample_bccd)
    assert [Path(r.path).name for r in ds] == [Path(r.path).name for r in sample_bccd]
    assert [r.boxes for r in ds][2:] == [r.boxes for r in sample_bccd][2:] and ds[0].boxes == sample_bccd[0].boxes
    assert ds[1].boxes == (*sample_bccd[1].boxes, Box(600, 400, 640, 480, "WBC"))  # clipped to 640 x 480
    assert ds.info["degenerate_by_class"] == {"RBC": 1} and ds.info["boxes_clipped"] == 1
    assert ds[0].meta["segmentations"][0] == [[260, 177, 491, 177, 491, 376]]
    assert len(read_spec(f"coco:{tmp_path}?images={sample_data / 'bccd' / 'BCCD' / 'JPEGImages'}")) == 30


# --- MIDOG json ---------------------------------------------------------------------------------------------


def _midog_json(tmp_path: Path, amibr: Path) -> tuple[Path, dict[str, list[tuple[float, float, str]]]]:
    """MIDOG 2021-style json with AMi-Br's figure centres on slides 002 and 054; AMi-Br patches stand in for images."""
    rows = list(csv.DictReader((amibr / "AMI-BR_MIDOG21.csv").open()))
    stand_ins = sorted((amibr / "patches" / "normal").iterdir())
    folder = tmp_path / "slides"
    folder.mkdir()
    numbers = (2, 54, 180, 250)
    images, annotations, expected = [], [], {}
    for number, stand_in in zip(numbers, stand_ins, strict=False):
        name = f"{number:03d}.png"
        (folder / name).symlink_to(stand_in)
        images.append({"license": 1, "file_name": name, "id": number, "width": 7215, "height": 5412})
        figures = [r for r in rows if r["slide"] == f"{number:03d}.tiff"][:5]
        expected[f"{number:03d}"] = [(float(r["x"]), float(r["y"]), "mitotic figure") for r in figures]
        for r in figures:
            x, y = float(r["x"]), float(r["y"])
            annotations.append(
                {"bbox": [x - 25, y - 25, x + 25, y + 25], "category_id": 1, "image_id": number, "id": int(r["uid"])}
            )
    annotations.append({"bbox": [100, 200, 150, 250], "category_id": 2, "image_id": 250, "id": 90001})
    annotations.append({"bbox": [300, 300, 300, 350], "category_id": 2, "image_id": 250, "id": 90002})  # no area
    expected["250"].append((125.0, 225.0, "not mitotic figure"))
    # A figure at the image's edge: its box is not clipped, so its centre stays the annotated point.
    annotations.append({"bbox": [7180, 5380, 7230, 5430], "category_id": 2, "image_id": 250, "id": 90003})
    expected["250"].append((7205.0, 5405.0, "not mitotic figure"))
    categories = [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "not mitotic figure"}]
    file = tmp_path / "MIDOG.json"
    file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return file, expected


def test_midog_points_boxes_scanners_and_unannotated_images(tmp_path: Path, amibr: Path) -> None:
    file, expected = _midog_json(tmp_path, amibr)
    ds = read_midog(file, images="slides")
    assert ds.classes == ("mitotic figure", "not mitotic figure")
    assert [r.group for r in ds] == ["002", "054", "250"]  # 180 (Leica, unlabelled in MIDOG 2021) left out
    assert [r.domain for r in ds] == ["hamamatsu_xr", "hamamatsu_s360", None]
    assert ds.info["unannotated_images"] == 1 and ds.info["degenerate_by_class"] == {"not mitotic figure": 1}
    for r in ds:
        assert [tuple(p) for p in r.points] == expected[r.group]
        assert all(b.width == 50 and b.height == 50 for b in r.boxes)
        assert [Point(*b.center, b.label) for b in r.boxes] == list(r.points)
    assert ds.box_counts() == {"mitotic figure": 10, "not mitotic figure": 2}

    # MIDOG++ lists per-slide scanner and train/test split in a table (its spelling "Hamammatsu XR" included).
    table = tmp_path / "datasets_xvalidation.csv"
    table.write_text(
        "Slide;Dataset;Tumor;Scanner\n2;train;human breast cancer;Hamammatsu XR\n250;test;canine lymphoma;3D Histech\n"
    )
    plus = read_spec(f"midog:{file}?images=slides&slides={table}&keep_unannotated=1")
    assert [(r.group, r.domain, r.split) for r in plus] == [
        ("002", "hamamatsu_xr", "train"),
        ("054", "hamamatsu_s360", None),
        ("180", "leica_gt450", None),
        ("250", "3d_histech", "test"),
    ]
    assert plus[3].meta["tumor"] == "canine lymphoma" and plus[2].boxes == ()


# --- MoNuSeg and GlaS ---------------------------------------------------------------------------------------


def test_monuseg_pairs_patients_and_organs(shared_data: Path) -> None:
    root = shared_data / "monuseg_kumar_norm"
    ds = read_monuseg(root)
    assert len(ds) == 30 and ds.classes == ()
    assert all(Path(r.mask_path).name == Path(r.path).name and Path(r.mask_path).is_file() for r in ds)
    assert all(Path(r.mask_path).parent.name == "GroundTruthInside" for r in ds)
    assert len(ds.groups()) == 30
    organs = Counter(r.domain for r in ds)
    assert organs == {
        "breast": 6,
        "kidney": 6,
        "prostate": 6,
        "lung": 6,
        "bladder": 2,
        "colon": 2,
        "stomach": 1,
        "liver": 1,
    }
    lung = next(r for r in ds if r.meta["name"] == "TCGA-18-5592-01Z-00-DX1")
    assert (lung.group, lung.domain) == ("TCGA-18-5592", "lung")


def test_monuseg_images_masks_layout_and_missing_mask(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "monuseg_kumar_norm"
    names = sorted(p.name for p in (src / "NormalizedPNG").iterdir())[:2]
    for sub, origin in (("images", "NormalizedPNG"), ("masks", "GroundTruthInside")):
        (tmp_path / sub).mkdir()
        for name in names:
            (tmp_path / sub / name).symlink_to(src / origin / name)
    assert [Path(r.path).name for r in read_monuseg(tmp_path)] == names
    (tmp_path / "masks" / names[1]).unlink()
    with pytest.raises(UserError, match=f"no mask of the same name .*e.g. {names[1]}"):
        read_monuseg(tmp_path)


def test_monuseg_kumar_split(tmp_path: Path, shared_data: Path) -> None:
    root = shared_data / "monuseg_kumar_norm"
    assert {r.split for r in read_monuseg(root)} == {None}
    ds = read_spec(f"monuseg:{root}?split=kumar")
    assert ds.source == f"monuseg:{root}?split=kumar" and read_spec(ds.source).records == ds.records
    assert Counter(r.split for r in ds) == {"train": 16, "test_same_organ": 8, "test_other_organ": 6}
    organs = {part: Counter(r.domain for r in ds.filter(split=part)) for part in ds.splits()}
    assert organs["train"] == {"breast": 4, "kidney": 4, "prostate": 4, "lung": 4}
    assert organs["test_same_organ"] == {"breast": 2, "kidney": 2, "prostate": 2, "lung": 2}
    assert organs["test_other_organ"] == {"bladder": 2, "colon": 2, "stomach": 1, "liver": 1}
    by_patient = {r.group: r.split for r in ds}
    assert (by_patient["TCGA-E2-A1B5"], by_patient["TCGA-RD-A8N9"]) == ("test_same_organ", "test_other_organ")
    assert ds.info["split_train_missing"] == []
    with pytest.raises(UserError, match="option split must be one of kumar; got 'test'"):
        read_monuseg(root, split="test")

    # images/masks layout: some of the 30 and one stranger, by symlinks to the real pairs.
    names = sorted(p.name for p in (root / "NormalizedPNG").iterdir())
    for sub, origin in (("images", "NormalizedPNG"), ("masks", "GroundTruthInside")):
        (tmp_path / sub).mkdir()
        for name in names:
            (tmp_path / sub / name).symlink_to(root / origin / name)
    train_name = next(n for n in names if n.startswith("TCGA-A7-A13E"))
    test_name = next(n for n in names if n.startswith("TCGA-KB-A93J"))
    for sub in ("images", "masks"):
        (tmp_path / sub / train_name).unlink()
    assert read_monuseg(tmp_path, split="kumar").info["split_train_missing"] == ["TCGA-A7-A13E"]
    for sub in ("images", "masks"):
        (tmp_path / sub / test_name).unlink()
    with pytest.raises(UserError, match=r"1 test image\(s\) missing from .*images: TCGA-KB-A93J"):
        read_monuseg(tmp_path, split="kumar")
    for sub, origin in (("images", "NormalizedPNG"), ("masks", "GroundTruthInside")):
        (tmp_path / sub / test_name).symlink_to(root / origin / test_name)
        (tmp_path / sub / "TCGA-A7-A13G-01Z-00-DX1.png").symlink_to(root / origin / train_name.replace("A13E", "A13F"))
    with pytest.raises(UserError, match=r"TCGA-A7-A13G-01Z-00-DX1.png in .*images is none of the 30 Kumar"):
        read_monuseg(tmp_path, split="kumar")
    assert len(read_monuseg(tmp_path)) == 30  # without the option any TCGA images will do


def _glas_folder(tmp_path: Path, amibr: Path) -> Path:
    """A GlaS-layout folder (BMP images + _anno masks + Grade.csv as released, space-padded) from AMi-Br patches,
    each with its dark pixels as the mask (the reader pairs the files; it does not read them)."""
    root = tmp_path / "Warwick QU Dataset"
    root.mkdir()
    names = ["train_1", "train_2", "train_10", "testA_1", "testB_1"]
    for name, patch in zip(names, sorted((amibr / "patches" / "normal").iterdir()), strict=False):
        image = Image.open(patch).convert("RGB").resize((64, 64))
        image.save(root / f"{name}.bmp")
        Image.fromarray(np.where(np.asarray(image.convert("L")) < 128, 255, 0).astype(np.uint8)).save(
            root / f"{name}_anno.bmp"
        )
    (root / "Grade.csv").write_text(
        "name, Patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)\n"
        "testA_1,4, benign, healthy\n"
        "train_1,1, malignant, moderately differentiated\n"
        "train_2,1, malignant, moderately differentiated\n"
        "train_10,2, benign, adenomatous\n"
        "testB_1,4, benign, healthy\n"
    )
    return root


def test_glas_labels_patients_and_splits(tmp_path: Path, amibr: Path) -> None:
    root = _glas_folder(tmp_path, amibr)
    ds = read_glas(root)
    assert ds.classes == ("benign", "malignant")
    assert [r.meta["name"] for r in ds] == ["testA_1", "train_1", "train_2", "train_10", "testB_1"]
    assert ds.labels() == ["benign", "malignant", "malignant", "benign", "benign"]
    assert [r.group for r in ds] == ["4", "1", "1", "2", "4"]
    assert [r.split for r in ds] == ["testA", "train", "train", "train", "testB"]
    assert all(r.mask_path == r.path.replace(".bmp", "_anno.bmp") for r in ds)
    assert [r.meta["name"] for r in read_glas(root, split="test")] == ["testA_1", "testB_1"]
    fine = read_spec(f"glas:{root}?target=sirinukunwattana&split=train")
    assert fine.classes == ("adenomatous", "healthy", "moderately differentiated")
    assert fine.labels() == ["moderately differentiated", "moderately differentiated", "adenomatous"]

    (root / "train_2_anno.bmp").unlink()
    with pytest.raises(UserError, match=r"line 4 of .*Grade\.csv: train_2 needs both"):
        read_glas(root)


# --- SPEC parsing -------------------------------------------------------------------------------------------


def test_spec_bare_paths_options_and_filters(tmp_path: Path, amibr: Path) -> None:
    patches = amibr / "patches"
    assert read_spec(str(patches)).class_counts() == {"atypical": 133, "normal": 211}
    table = tmp_path / "list.csv"
    table.write_text(f"path,label\n{patches / 'normal' / 'MIDOG21_10.png'},normal\n")
    assert read_spec(str(table)).labels() == ["normal"]

    spec = f"amibr:{amibr}?domain=hamamatsu_xr&label=atypical"
    xr = read_spec(spec)
    # 65 of the CSV's rows of slides 001-050 have majority_atypical True.
    assert len(xr) == 65 and xr.domains() == ["hamamatsu_xr"] and xr.classes == ("normal", "atypical")
    assert read_spec(xr.source).records == xr.records  # the source SPEC reads the same set again
    both = read_spec(f"amibr:{amibr}?domain=hamamatsu_xr,hamamatsu_s360")
    assert len(both) == 344
    assert parse_spec("voc:../x?split=test").options == {"split": "test"}


def test_spec_colon_in_a_path_is_not_a_reader(tmp_path: Path, amibr: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = amibr / "patches" / "normal" / "MIDOG21_10.png"
    (tmp_path / "run:1" / "cls").mkdir(parents=True)
    shutil.copy(image, tmp_path / "run:1" / "cls")
    monkeypatch.chdir(tmp_path)
    assert parse_spec("run:1").reader == "folder"
    assert read_spec("run:1").class_counts() == {"cls": 1}
    assert read_spec("folder:run:1").class_counts() == {"cls": 1}


def test_spec_errors_say_what_and_where(tmp_path: Path, sample_data: Path) -> None:
    cases = {
        f"nosuch:{tmp_path}": r"unknown reader 'nosuch' .*readers: folder, csv, amibr",
        f"voc:{tmp_path / 'gone'}": rf"voc: {tmp_path / 'gone'} does not exist",
        str(tmp_path / "gone"): "does not exist",
        f"voc:{sample_data / 'bccd'}?splt=test": r"voc: unknown option 'splt' .*reader options: split",
        f"voc:{sample_data / 'bccd'}?split": "malformed options",
        f"amibr:{sample_data / 'amibr'}?domain=leica_gt450": (
            r"no records left after domain=leica_gt450 .*hamamatsu_s360, hamamatsu_xr"
        ),
        f"{sample_data / 'bccd' / 'BCCD' / 'Annotations' / 'BloodImage_00000.xml'}": "cannot tell how to read",
        "voc:": "has no PATH",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message):
            read_spec(spec)


def test_registered_reader_joins_the_spec_syntax(tmp_path: Path) -> None:
    def read_single(path: str, *, label: str = "x") -> LabelledSet:
        return LabelledSet([Record(path=path, label=label)], [label], name="single", source=f"single:{path}")

    register_reader("single", read_single)
    try:
        ds = read_spec(f"single:{tmp_path}?label=y")
        assert ds.labels() == ["y"] and ds[0].path == str(tmp_path)
    finally:
        READERS.pop("single")


def test_records_are_immutable_hashable_and_checked(tmp_path: Path) -> None:
    record = Record(path=tmp_path / "a.png", boxes=[(0, 0, 2, 3, "c")], meta={"k": 1})
    assert record.path == str(tmp_path / "a.png") and record.boxes == (Box(0, 0, 2, 3, "c"),)
    assert record.boxes[0].center == (1, 1.5) and len({record, record}) == 1
    with pytest.raises(AttributeError):
        record.label = "b"  # type: ignore[misc]
    with pytest.raises(ValueError, match="not in"):
        LabelledSet([record], ["other"], name="t", source="t")
