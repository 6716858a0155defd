"""The tiling stage says when tiles are not what --mpp promises: a scan coarser than the target is
upsampled (no finer detail), a file without a pixel size is tiled at --downscale instead."""

from __future__ import annotations

from pathlib import Path

from sample_helpers import SAMPLE_SLIDE

from ssl_path import shards
from ssl_path.core.errors import run_cli


def _tile(out: Path, mpp: str, *extra: Path) -> None:
    argv = ["--data", str(SAMPLE_SLIDE), *map(str, extra), "--out", str(out), "--mpp", mpp]
    assert run_cli(shards.main, [*argv, "--tile-size", "64", "--max-tiles-per-source", "4", "--no-progress"]) == 0


def test_an_upsampled_scan_and_a_file_without_pixel_size_are_one_warning_each(sample_data, tmp_path, capsys):
    patch = next((sample_data / "amibr" / "patches" / "normal").glob("*.png"))  # a PNG without a pixel size
    _tile(tmp_path / "fine", "0.25", patch)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("warning: 1 of 2 files are read finer than they were scanned, their tiles upsampled")
    assert "CMU-1-Small-Region.svs: 0.499 µm/px, enlarged 2x" in err[0]
    assert err[1].startswith("warning: 1 of 2 files have no pixel size") and patch.name in err[1]
    assert "--downscale 1, not at --mpp 0.25" in err[1]


def test_a_scan_at_the_target_within_tolerance_is_not_warned_about(tmp_path, capsys):
    _tile(tmp_path / "native", "0.5")  # 0.499 serves 0.5 as is
    _tile(tmp_path / "coarser", "1.0")  # downsampled: real pixels, nothing to say
    assert capsys.readouterr().err == ""
