"""Whether ``--out`` resumes a run: a change that does not alter what is computed is allowed, and
never hides one that does."""

from __future__ import annotations

import pytest

from ssl_path.core.config import dump_yaml, first_difference
from ssl_path.core.errors import UserError
from ssl_path.encoder.checkpoint import checkpoint_path
from ssl_path.training.run_dir import CONFIG_FILE, check_run_dir

STARTED = {"method": "dinov2", "dinov2": {"out_dim": 64}, "train": {"compile": False, "num_workers": 2, "steps": 10}}


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    checkpoint_path(out).parent.mkdir(parents=True)
    checkpoint_path(out).write_bytes(b"a checkpoint")  # only its presence counts here
    (out / CONFIG_FILE).write_text(dump_yaml(STARTED))
    return out


def test_a_resumable_change_resumes(run_dir):
    changed = {**STARTED, "train": {**STARTED["train"], "compile": True, "num_workers": 8}}
    assert check_run_dir(run_dir, changed, ()) is False


def test_a_resumable_change_does_not_hide_one_after_it(run_dir):
    # train.compile sorts before train.steps: the first difference alone would be the resumable one
    changed = {**STARTED, "train": {**STARTED["train"], "compile": True, "steps": 20}}
    with pytest.raises(UserError, match=r"different config \(train\.steps: 10 there, 20 now\)"):
        check_run_dir(run_dir, changed, ())


def test_another_method_is_named_as_such_not_as_its_whole_section(run_dir):
    mae = {"method": "mae", "mae": {"mask_ratio": 0.75}, "train": STARTED["train"]}
    assert first_difference(STARTED, mae) == "method"
    with pytest.raises(UserError, match=r"\(method: 'dinov2' there, 'mae' now\)"):
        check_run_dir(run_dir, mae, ())
