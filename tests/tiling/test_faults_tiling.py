"""Faults around ``python -m ssl_path.shards``, in real processes on real data: a killed or terminated
multi-worker run (no worker outlives it, nothing half-written is left), a full disk or a file-size
limit (one line naming the file, no partial file), and a truncated slide whose readers complain on
the side (their words land in the skip reason, not on the terminal)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import openslide
import pytest
from PIL import Image
from sample_helpers import sample_slide_region

from ssl_path.core.errors import run_cli
from ssl_path.data.manifest import MANIFEST
from ssl_path.shards import main

REPO = Path(__file__).resolve().parents[2]
# Many small PNG tiles, 101 844 from the slide's six regions: a run of about 10 s, long enough to be stopped mid-way.
LONG_RUN = ["--tile-size", "8", "--min-tissue", "0", "--format", "png", "--workers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def png(slide_crops: list[Path]) -> Path:
    """A 1000 px crop of the slide, tissue throughout: 9 tiles."""
    return slide_crops[0]


@pytest.fixture(scope="module")
def slide_regions(sample_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole slide as six PNG regions of 1110 x 989 px, in a folder of their own.

    PNGs, not the .svs: a run stopped while a worker reads the whole slide is slower to end.
    """
    folder = tmp_path_factory.mktemp("slide_regions")
    with openslide.OpenSlide(sample_slide) as slide:
        width, height = slide.dimensions
    for col in range(2):
        for row in range(3):
            x, y = col * width // 2, row * height // 3
            Image.fromarray(sample_slide_region(x, y, (width // 2, height // 3))).save(folder / f"CMU-1_x{x}_y{y}.png")
    return folder


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie has ended; only its parent has not collected it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_long_run(data: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, list[int]]:
    """Start a two-worker tiling of ``data`` into ``out``; return once it writes shards, with its two workers."""
    argv = [sys.executable, "-m", "ssl_path.shards", "--data", str(data), "--out", str(out)]
    proc = subprocess.Popen(
        [*argv, *LONG_RUN, *extra],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal or a batch job gives it
        # Ctrl-C answered, as in a terminal, even where this test runs in a background job (which ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not any(tmp.is_dir() and any(tmp.iterdir()) for tmp in out.parent.glob(f".{out.name}.*.tmp")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    return proc, workers


def assert_gone(pids: list[int], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


@pytest.fixture
def previous(png: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A finished tiling in ``tmp_path/shards`` that a rerun with --overwrite must leave as it was."""
    out = tmp_path / "shards"
    assert run_cli(main, ["--data", str(png), "--out", str(out), "--no-progress"]) == 0
    return out, snapshot(out)


# ----------------------------------------------------------------------------- kill -9, SIGTERM, Ctrl-C


def test_kill_9_of_a_two_worker_tiling_leaves_no_worker_alive(slide_regions: Path, tmp_path: Path) -> None:
    proc, workers = start_long_run(slide_regions, tmp_path / "shards")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert_gone(workers)
    finally:
        for pid in [proc.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()


@pytest.mark.parametrize(
    "sig, to_group, code, said",
    [
        (signal.SIGTERM, False, 143, "terminated"),  # `kill PID`
        (signal.SIGTERM, True, 143, "terminated"),  # Slurm signals every process of the job
        (signal.SIGINT, True, 130, "interrupted"),  # Ctrl-C signals the terminal's process group
    ],
    ids=["sigterm", "sigterm-group", "ctrl-c"],
)
def test_a_stopped_two_worker_rerun_cleans_up_and_keeps_the_previous_output(
    slide_regions: Path, previous: tuple[Path, dict[str, str]], sig: int, to_group: bool, code: int, said: str
) -> None:
    out, before = previous
    proc, workers = start_long_run(slide_regions, out, "--overwrite")
    try:
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == code and stderr == f"{said}\n" and stdout == "", (proc.returncode, stderr)
        assert_gone(workers)
    finally:
        for pid in [proc.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["shards"]  # no temporary folder or shard beside it


# ----------------------------------------------------------------------------- a full disk


def _mount_tmpfs(where: Path, size: int) -> None:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the file-size-limit tests cover this path"
        )


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs mounted at ``tmp_path/disk`` (root only), sized by the test; unmounted afterwards."""
    where = tmp_path / "disk"
    mounted = []

    def mount(size: int) -> Path:
        _mount_tmpfs(where, size)
        mounted.append(where)
        return where

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def _disk_error(capsys: pytest.CaptureFixture[str], out: Path) -> Path:
    """The one-line error of a full disk; returns the file it names, which must lie in folder ``out``."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "aborted" not in err, err
    match = re.fullmatch(r"error: cannot write (\S+): (No space left on device|File too large); .*\n", err)
    assert match, err
    named = Path(match.group(1))
    assert named.parent == out, named
    return named


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_while_writing_shards_is_one_line_naming_the_shard(
    sample_slide: Path, small_disk, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    disk = small_disk(400 * 1024)  # room for one shard of the slide's tiles, not for two
    out = disk / "shards"
    argv = ["--data", str(sample_slide), "--out", str(out), "--samples-per-shard", "7", "--no-progress"]
    assert run_cli(main, [*argv, "--workers", str(workers), "--shuffle-seed", "none"]) == 2
    assert re.fullmatch(r"shard-\d{6}\.tar", _disk_error(capsys, out).name)
    assert list(disk.iterdir()) == []  # no folder, no temporary shard, no partial file


def test_full_disk_while_shuffling_is_one_line_naming_the_bucket(
    sample_slide: Path, small_disk, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = small_disk(400 * 1024)  # the shuffle's buckets hold all tiles before the first shard
    out = disk / "shards"
    argv = ["--data", str(sample_slide), "--out", str(out), "--samples-per-shard", "7", "--no-progress"]
    assert run_cli(main, argv) == 2
    assert re.fullmatch(r"bucket-\d{3}\.pkl", _disk_error(capsys, out / ".shuffle").name)
    assert list(disk.iterdir()) == []


def test_full_disk_at_the_manifest_is_one_line_naming_it(
    sample_slide: Path, tmp_path: Path, small_disk, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data", str(sample_slide), "--samples-per-shard", "7", "--no-progress"]
    assert run_cli(main, [*argv, "--out", str(tmp_path / "measure")]) == 0
    page = os.sysconf("SC_PAGE_SIZE")
    pages = sum(-(-p.stat().st_size // page) for p in (tmp_path / "measure").glob("shard-*.tar"))
    disk = small_disk(pages * page)  # every shard fits; the manifest does not
    capsys.readouterr()
    assert run_cli(main, [*argv, "--out", str(disk / "shards")]) == 2
    assert _disk_error(capsys, disk / "shards").name == MANIFEST
    assert list(disk.iterdir()) == []


def _under_file_size_limit(script: str, limit: int) -> subprocess.CompletedProcess:
    """Run ``script`` in a Python whose files may not grow past ``limit`` bytes: writes fail with EFBIG.

    Works wherever a tmpfs cannot be mounted. SIGXFSZ is ignored, else the kernel ends the process
    instead of failing the write.
    """

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_files,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_file_size_limit_while_writing_shards_is_one_line_and_keeps_the_previous_output(
    sample_slide: Path, previous: tuple[Path, dict[str, str]], workers: int
) -> None:
    out, before = previous
    argv = ["--data", str(sample_slide), "--out", str(out), "--overwrite", "--no-progress"]
    argv += ["--samples-per-shard", "20", "--workers", str(workers)]
    done = _under_file_size_limit(
        f"""
        import sys
        from ssl_path.core.errors import run_cli
        from ssl_path.shards import main
        sys.exit(run_cli(main, {argv!r}))
        """,
        limit=200_000,  # 20 tiles of the slide make a larger shard; the manifest is far smaller
    )
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(
        rf"error: cannot write {re.escape(str(out))}/shard-000000\.tar: File too large; .*\n", done.stderr
    )
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["shards"]


def test_file_size_limit_on_json_and_a_checkpoint_names_the_file_and_leaves_none(tmp_path: Path) -> None:
    """Every atomic write reports the same way: JSON directly, torch.save through its own RuntimeError,
    safetensors through its Rust error's message."""
    done = _under_file_size_limit(
        f"""
        import json, torch
        from ssl_path.core.io import DiskFullError, write_json
        from safetensors.torch import save_file
        from ssl_path.core.io import atomic_path
        from ssl_path.encoder.checkpoint import save_checkpoint
        def save_weights(path):  # safetensors' Rust writer (the export's, through timm), into an atomic path
            with atomic_path(path) as tmp:
                save_file({{"w": torch.zeros(100_000)}}, str(tmp))
        seen = []
        for write, path in [
            (lambda p: write_json(p, {{"values": list(range(100_000))}}), {str(tmp_path / "big.json")!r}),
            (lambda p: save_checkpoint({{"w": torch.zeros(100_000)}}, p), {str(tmp_path / "last.pt")!r}),
            (save_weights, {str(tmp_path / "model.safetensors")!r}),
        ]:
            try:
                write(path)
            except DiskFullError as err:
                seen.append([str(err.path), err.errno, str(err), isinstance(err, OSError)])
        print(json.dumps(seen))
        """,
        limit=100_000,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert [s[0] for s in seen] == [str(tmp_path / name) for name in ("big.json", "last.pt", "model.safetensors")]
    for path, errno_, text, is_os_error in seen:
        assert errno_ == 27 and text.startswith(f"cannot write {path}: File too large") and is_os_error
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a truncated slide


@pytest.fixture(scope="module")
def truncated_svs(sample_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Aperio slide cut in half: its IFDs lie past the cut, so tifffile and PIL both complain, then fail."""
    data = sample_slide.read_bytes()
    path = tmp_path_factory.mktemp("truncated") / "cut.svs"
    path.write_bytes(data[: len(data) // 2])
    return path


def _tile(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_path.shards", *argv, "--no-progress"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_svs_is_skipped_with_the_readers_complaints_in_its_reason(
    png: Path, truncated_svs: Path, tmp_path: Path, workers: int
) -> None:
    out = tmp_path / "shards"
    done = _tile("--data", str(truncated_svs), str(png), "--out", str(out), "--workers", str(workers))
    assert done.returncode == 0 and done.stderr == "", done.stderr  # nothing on the terminal but the summary
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("wrote 9 tiles from 1 files")
    (skipped,) = json.loads((out / MANIFEST).read_text())["skipped"]
    assert skipped["path"] == str(truncated_svs)
    assert "tifffile: TIFF has no image [tifffile:" in skipped["reason"]  # tifffile's log record
    assert "invalid offset to first page" in skipped["reason"]
    assert "[UserWarning: Corrupt EXIF data" in skipped["reason"]  # PIL's warning


def test_truncated_svs_alone_fails_in_one_line_that_holds_the_complaints(truncated_svs: Path, tmp_path: Path) -> None:
    done = _tile("--data", str(truncated_svs), "--out", str(tmp_path / "shards"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert (
        done.stderr.startswith("error: no usable input: all 1 skipped")
        and "invalid offset to first page" in done.stderr
    )
    assert not (tmp_path / "shards").exists()
