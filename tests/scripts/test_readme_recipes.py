"""The README's "Recipes on real data", run as written, at toy size, on data laid out as each recipe
says (a pRCC-style folder of 2000 px PNGs per class, MIDOG-style TIFFs with a MIDOG json and a
whole slide, AMi-Br patches), built from data/sample in a temporary directory.

Only what makes them toy-sized is changed, each change declared below and required to match: the
tiny CPU config for 2 steps instead of a ViT-S/B, 2 workers, a small detector window, 2 few-label
seeds. Commands that
need the outside world are left out and counted: a real Slurm submission (its ``--dry-run`` twin
runs), a push with a token, a download from the Hub (the demo test loads an export through
``hf-hub:`` from a local cache). The MIDOG-style boxes are placed by this test, not by
pathologists: the run checks that the commands work together, not what the detector learns.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from sample_helpers import REPO, SAMPLE_SLIDE, sample_slide_region

from ssl_path.core.errors import run_cli

# Toy size: (README text, replacement); each must occur in the recipes.
TOY = (
    ("--config dinov2_vits16", "--config dinov2_tiny_cpu --max-steps 2"),
    ("--config dinov2_vitb16", "--config dinov2_tiny_cpu --max-steps 2"),
    ("--workers 8", "--workers 2"),
    ("--workers 16", "--workers 2"),
    ("--data /lustre/shards --out /lustre/runs/vitl14", "--data shards/prcc --out runs/vitl14"),
)
# Extra settings per stage, appended to its command line.
EXTRA = {
    "finetune.detect": [
        "detect.scale=0.25",
        "detect.window=64",
        "detect.window_overlap=16",
        "detect.channels=32",
        "train.epochs=1",
        "train.batch_size=2",
        "select.val_every=1",
        "--no-progress",
    ],  # fmt: skip
    "probes.fewshot": ["--seeds", "2", "--episodes", "10"],
}
OUTSIDE_WORLD = ("HF_TOKEN=", "python -c")


def recipe_commands() -> list[str]:
    """The shell lines of the bash blocks of the README's recipes, continuations joined, comments cut."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Recipes on real data", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def build_recipe_data(root: Path, sample: Path) -> None:
    """pRCC/type{1,2}/*.png (2000 px), slides/ (the sample .svs), midog/images/*.tiff + midog/MIDOG.json,
    AMi-Br/ (the sample's patches): the layouts the recipes name."""
    for label, xs in (("type1", (0, 300, 600, 900)), ("type2", (150, 450, 750, 967))):
        (root / "pRCC" / label).mkdir(parents=True)
        for n, x in enumerate(xs):
            region = np.ascontiguousarray(np.rot90(sample_slide_region(x, 220 - 40 * n, 2000), n))
            Image.fromarray(region).save(root / "pRCC" / label / f"{n}.png")
    (root / "slides").mkdir()
    shutil.copy(SAMPLE_SLIDE, root / "slides")
    shutil.copytree(sample / "amibr", root / "AMi-Br")
    # MIDOG 2021 numbering: images 1-50 Hamamatsu XR, 51-100 Hamamatsu S360.
    images = root / "midog" / "images"
    images.mkdir(parents=True)
    entries, annotations = [], []
    for n, (image_id, x, y) in enumerate(((1, 400, 300), (2, 1400, 500), (3, 2000, 1400),
                                          (51, 700, 1200), (52, 1700, 900), (53, 2300, 400))):  # fmt: skip
        name = f"{image_id:03d}.tiff"
        tifffile.imwrite(
            images / name, sample_slide_region(x, y, 512), resolution=(40000, 40000), resolutionunit="CENTIMETER"
        )
        entries.append({"id": image_id, "file_name": name, "width": 512, "height": 512})
        for k, (cx, cy) in enumerate(((100 + 30 * n, 120), (300, 260 + 20 * n), (420, 400))):
            category = 2 if k == 2 else 1  # two mitotic figures and an imposter per image
            box = [cx - 25, cy - 25, cx + 25, cy + 25]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": box})
    categories = [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "hard negative"}]
    payload = {"images": entries, "annotations": annotations, "categories": categories}
    (root / "midog" / "MIDOG.json").write_text(json.dumps(payload))
    (root / "new_images").mkdir()
    Image.fromarray(sample_slide_region(1200, 1200, 400)).save(root / "new_images" / "region.png")


def stage_main(module: str):
    return importlib.import_module(module).main


def test_every_recipe_runs_as_written_on_data_laid_out_as_it_says(sample_data, tmp_path, monkeypatch, capsys):
    build_recipe_data(tmp_path, sample_data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSL_PATH_CACHE", str(tmp_path / "cache"))
    text = "\n".join(recipe_commands())
    for old, new in TOY:
        assert old in text, f"the README's recipes no longer say {old!r}: update TOY"
        text = text.replace(old, new)
    ran, left_out = [], []
    for line in text.splitlines():
        words = shlex.split(line)
        submits = words[:3] == ["python", "-m", "slurm.launch"] and "--dry-run" not in words
        if line.startswith(OUTSIDE_WORLD) or submits:
            left_out.append(line)
            continue
        assert words[:2] == ["python", "-m"], line
        module, argv = words[2], words[3:]
        if module == "finetune.predict":  # RUN: one of the sub-runs the detector wrote
            run = next(p.parent for p in sorted((tmp_path / "ft" / "midog").glob("*/selection.json")))
            argv = [str(run) if a == "ft/midog/RUN" else a for a in argv]
        argv += EXTRA.get(module, [])
        capsys.readouterr()
        code = run_cli(stage_main(module), argv)
        captured = capsys.readouterr()
        assert code == 0, f"{line}\n{captured.err[-2000:]}"
        assert "Traceback" not in captured.err, line
        ran.append(module)
    assert len(left_out) == 3, left_out  # the Slurm submission, the push with a token, the Hub download

    assert ran.count("ssl_path.shards") == 2 and ran.count("ssl_path.pretrain") == 2
    assert {"probes.linear", "probes.fewshot", "probes.knn", "finetune.detect", "finetune.predict"} <= set(ran)
    assert ran.count("slurm.launch") == 1 and ran.count("ssl_path.hub") == 2
    # pRCC: 2000 px at --downscale 2 in 224 px tiles; the probes compared with random init, in whole groups
    linear = json.loads((tmp_path / "prcc_linear.json").read_text())
    assert linear["split"]["method"] == "group" and linear["config"]["compare"]["ref"] == "timm:vit_small_patch16_224"
    assert json.loads((tmp_path / "prcc_fewshot.json").read_text())["probe"] == "fewshot"
    # MIDOG: a detector per left-out scanner, predictions on new images, the atypical-figure kNN
    detected = json.loads((tmp_path / "ft" / "midog" / "results.json").read_text())
    assert detected["split"]["method"] == "leave-one-domain-out"
    assert (tmp_path / "predictions" / "points.csv").is_file()
    knn = json.loads((tmp_path / "midog_knn.json").read_text())
    assert {f["domain"] for f in knn["split"]["folds"]} == {"hamamatsu_xr", "hamamatsu_s360"}
    # Publish: the card lists the results it was given
    card = (tmp_path / "export" / "README.md").read_text()
    assert "my-lab/path-vit-b" in card and "cc-by-4.0" in card
