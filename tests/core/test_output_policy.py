"""The one output policy, on the runs that used to lose a user's files: an output never replaces or
lies inside what the stage reads, a failed or killed run leaves the previous output as it was, and
no file (PNG included) is replaced without ``--overwrite``. Every refusal is one line and exit 2."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from file_helpers import snapshot
from PIL import Image
from pretrain_helpers import TINY, make_tiles
from probe_helpers import assert_one_line_error, probe_args
from sample_helpers import SAMPLE_SLIDE

from finetune import classify
from probes import embed, fewshot, knn
from ssl_path import hub, shards, stain_preview
from ssl_path.core.errors import UserError, run_cli
from ssl_path.core.io import write_json
from ssl_path.data.manifest import MANIFEST
from ssl_path.pretrain import main as pretrain_main
from ssl_path.pretrain import resolve_config, run

REPO = Path(__file__).resolve().parents[2]
AMIBR = "amibr"  # in data/sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step tiny DINOv2 run directory: config, run.json, metrics and checkpoints/last.pt."""
    root = tmp_path_factory.mktemp("policy")
    tiles = make_tiles(root / "shards")
    run(resolve_config("dinov2_tiny_cpu", TINY), tiles, root / "run", max_steps=2, progress=False)
    return root / "run"


def user_images(sample_data: Path, data: Path) -> Path:
    """A user's folder-per-class set: 3 normal and 3 atypical AMi-Br patches."""
    for label in ("normal", "atypical"):
        (data / label).mkdir(parents=True)
        for image in sorted((sample_data / AMIBR / "patches" / label).glob("*.png"))[:3]:
            shutil.copy(image, data / label / image.name)
    return data


# ----------------------------------------------------------------------------- an output the system refuses


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs (root only; as root, chmod would not stop a write); unmounted afterwards."""
    where = tmp_path / "read_only"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the file-below-a-file case runs")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_an_output_below_a_file_is_one_line_naming_the_file(sample_data, trained, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    images = ["--data", str(sample_data / AMIBR / "patches" / "normal"), "--tile-size", "64", "--min-tissue", "0"]
    assert run_cli(shards.main, [*images, "--no-progress", "--out", str(notes / "shards")]) == 2
    assert_one_line_error(capsys, f"{notes} is a file where a folder is needed")
    assert run_cli(hub.main, ["export", "--ckpt", str(trained), "--out", str(notes / "export")]) == 2
    assert_one_line_error(capsys, f"{notes} is a file where a folder is needed")
    assert notes.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_atomic_file_names_its_output_whatever_is_in_the_way(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    with pytest.raises(UserError, match=f"^{re.escape(str(notes))} is a file where a folder is needed"):
        write_json(notes / "results.json", {})  # its folder cannot be made
    (tmp_path / "results.json").mkdir()
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'results.json'))}: Is a directory"):
        write_json(tmp_path / "results.json", {})  # the rename onto it fails: named, not its temporary file
    assert notes.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results.json"]


def test_a_path_not_permitted_is_one_line_anywhere_and_other_os_errors_keep_their_traceback(capsys):
    def denied(argv):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/theirs/tile.png")

    assert run_cli(denied) == 2
    assert_one_line_error(
        capsys, "/data/theirs/tile.png: Permission denied; choose another path or fix its permissions"
    )

    def raced(argv):  # a file appearing where a stage's own code makes one: a bug or a race, not the user's
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), "/runs/a/checkpoints/step_0000002.pt")

    with pytest.raises(FileExistsError):
        run_cli(raced)


def test_an_output_in_a_read_only_folder_is_one_line_naming_it(sample_data, trained, read_only_folder, capsys):
    images = ["--data", str(sample_data / AMIBR / "patches" / "normal"), "--tile-size", "64", "--min-tissue", "0"]
    assert run_cli(shards.main, [*images, "--no-progress", "--out", str(read_only_folder / "shards")]) == 2
    assert_one_line_error(capsys, f"{read_only_folder / 'shards'}: Read-only file system")
    assert run_cli(hub.main, ["export", "--ckpt", str(trained), "--out", str(read_only_folder / "export")]) == 2
    assert_one_line_error(capsys, f"{read_only_folder / 'export'}: Read-only file system")


# ----------------------------------------------------------------------------- an output over an input


def test_embed_out_over_its_data_is_refused_and_the_images_stay(sample_data, tmp_path, capsys):
    data = user_images(sample_data, tmp_path / "images")
    before = snapshot(data)
    base = ["--ckpt", "timm:vit_tiny_patch16_224", "--data", f"folder:{data}", "--input-size", "64"]
    base += ["--cache-dir", str(tmp_path / "cache"), "--no-progress", "--overwrite"]
    for out, fragment in ((data, "would replace the input"), (data / "maps", "lies inside the input")):
        assert run_cli(embed.main, [*base, "--out", str(out)]) == 2
        assert_one_line_error(capsys, fragment)
        assert snapshot(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # not even a temporary folder


def test_export_over_the_training_run_is_refused_and_the_run_stays(trained, tmp_path, capsys):
    before = snapshot(trained)
    results = tmp_path / "probes" / "knn.json"
    results.parent.mkdir()
    results.write_text("{}\n")
    ckpt = trained / "checkpoints" / "last.pt"
    cases = [
        (["--ckpt", str(trained), "--out", str(trained)], "would replace the input"),
        (["--ckpt", str(ckpt), "--out", str(trained)], "would replace the input"),
        (["--ckpt", str(trained), "--out", str(trained / "export")], "lies inside the input"),
        (["--ckpt", str(trained), "--out", str(results.parent), "--results", str(results)], "would replace"),
    ]
    for argv, fragment in cases:
        assert run_cli(hub.main, ["export", *argv, "--overwrite"]) == 2
        assert_one_line_error(capsys, fragment)
        assert snapshot(trained) == before
    assert results.read_text() == "{}\n"


def test_probe_results_never_land_in_the_set_or_the_run_they_read(trained, sample_data, tmp_path, capsys):
    data = user_images(sample_data, tmp_path / "images")
    argv = probe_args(f"folder:{data}", f"folder:{data}", tmp_path)
    argv[argv.index("--ckpt") + 1] = str(trained)
    before = snapshot(trained), snapshot(data)
    for out in (trained / "knn.json", trained / "checkpoints" / "last.pt", data / "knn.json"):
        assert run_cli(knn.main, [*argv, "--out", str(out), "--overwrite"]) == 2
        assert_one_line_error(capsys, "the input")
    assert (snapshot(trained), snapshot(data)) == before


def test_a_results_file_typed_as_a_folder_is_refused(trained, sample_data, tmp_path, capsys):
    """``--out kdir/`` would otherwise write a file named kdir: Path drops the trailing slash."""
    data = user_images(sample_data, tmp_path / "images")
    argv = probe_args(f"folder:{data}", f"folder:{data}", tmp_path)
    argv[argv.index("--ckpt") + 1] = str(trained)
    assert run_cli(knn.main, [*argv, "--out", f"{tmp_path / 'kdir'}/"]) == 2
    assert_one_line_error(capsys, "kdir/ names a folder")
    assert run_cli(knn.main, [*argv, "--out", f"{tmp_path / 'kdir'}/."]) == 2
    assert_one_line_error(capsys, "kdir/. names a folder")
    png = f"{tmp_path / 'preview.png'}/"
    assert run_cli(stain_preview.main, ["--data", str(data), "--reference", str(data), "--out", png]) == 2
    assert_one_line_error(capsys, "preview.png/ names a folder")
    scores = f"{tmp_path / 'scores'}/"
    assert run_cli(classify.main, ["--eval", str(trained), "--test", f"folder:{data}", "--out", scores]) == 2
    assert_one_line_error(capsys, "scores/ names a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_pretrain_out_inside_or_holding_its_shards_is_refused(trained, capsys):
    tiles = trained.parent / "shards"
    before = snapshot(tiles)
    for out in (tiles, tiles / "run", trained.parent):
        assert run_cli(pretrain_main, ["--config", "dinov2_tiny_cpu", "--data", str(tiles), "--out", str(out)]) == 2
        assert_one_line_error(capsys, "the input")
        assert snapshot(tiles) == before
    assert not (tiles / "run").exists()


# ----------------------------------------------------------------------------- a failed or killed rerun


def _good_shards(out: Path) -> dict[str, str]:
    argv = ["--data", str(SAMPLE_SLIDE), "--out", str(out)]
    assert run_cli(shards.main, [*argv, "--tile-size", "250", "--no-progress"]) == 0
    return snapshot(out)


def test_shards_rerun_on_unusable_inputs_leaves_the_previous_output(sample_data, tmp_path, capsys):
    out = tmp_path / "shards"
    before = _good_shards(out)
    blank = tmp_path / "inputs" / "blank.png"
    blank.parent.mkdir()
    Image.new("RGB", (600, 600), (255, 255, 255)).save(blank)  # no tissue
    broken = tmp_path / "inputs" / "broken.png"
    patch = sorted((sample_data / AMIBR / "patches" / "normal").glob("*.png"))[0]
    broken.write_bytes(patch.read_bytes()[:2000])  # a PNG cut short
    capsys.readouterr()
    argv = ["--data", str(blank), str(broken), "--out", str(out), "--overwrite", "--no-progress"]
    assert run_cli(shards.main, argv) == 2
    assert_one_line_error(capsys, "no usable input")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "shards"]


def test_killed_shards_rerun_leaves_the_previous_output(sample_data, tmp_path):
    out = tmp_path / "shards"
    before = _good_shards(out)
    # the whole slide in 16 px tiles: 25,530 tiles, about 4 s of work here, where the first shard
    # lands after about 1 s: far from done when it is killed
    argv = ["--data", str(SAMPLE_SLIDE), "--out", str(out), "--overwrite", "--no-progress"]
    argv += ["--tile-size", "16", "--min-tissue", "0", "--samples-per-shard", "50"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ssl_path.shards", *argv], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        # Killed once it has started writing shards into its folder beside --out.
        while not any(tmp.is_dir() and any(tmp.iterdir()) for tmp in tmp_path.glob(f".{out.name}.*.tmp")):
            assert proc.poll() is None, "the rerun ended before it could be killed"
            assert time.monotonic() < deadline, "the rerun never started writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert snapshot(out) == before
    assert (out / MANIFEST).is_file()


# ----------------------------------------------------------------------------- files need --overwrite


def test_fewshot_does_not_replace_its_curves_without_overwrite(sample_data, tmp_path, monkeypatch, capsys):
    root = sample_data / AMIBR
    argv = probe_args(f"amibr:{root}?group=005.tiff,006.tiff", f"amibr:{root}?group=029.tiff,031.tiff", tmp_path)
    argv += ["--seeds", "2", "--fractions", "1.0", "--shots", "1", "--episodes", "1", "--c-grid", "1"]
    argv += ["--probes", "knn", "prototype"]
    folder = tmp_path / "fewshot"
    monkeypatch.chdir(folder.parent)
    assert run_cli(fewshot.main, argv) == 0  # no --out: the curves in the current folder
    curves = folder.parent / fewshot.CURVES_NAME
    before = curves.read_bytes()
    capsys.readouterr()
    assert run_cli(fewshot.main, argv) == 2  # a second run there would replace them
    assert_one_line_error(capsys, fewshot.CURVES_NAME, "--overwrite")
    assert curves.read_bytes() == before

    # With --out, each results file has curves of its own: two runs share a folder.
    for name in ("results.json", "again.json"):
        assert run_cli(fewshot.main, [*argv, "--out", str(folder / name)]) == 0
    names = ["again.json", "again_curves.png", "results.json", "results_curves.png"]
    assert sorted(p.name for p in folder.iterdir()) == names
    (folder / "results.json").unlink()  # results gone, their curves kept: still not replaced unasked
    capsys.readouterr()
    assert run_cli(fewshot.main, [*argv, "--out", str(folder / "results.json")]) == 2
    assert_one_line_error(capsys, "results_curves.png", "--overwrite")

    assert run_cli(fewshot.main, [*argv, "--overwrite"]) == 0  # asked for: replaced
    assert Image.open(curves).format == "PNG"
