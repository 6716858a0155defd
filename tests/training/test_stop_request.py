"""A stop request (a scheduler's warning signal, under ``stop_on_signal``): the loop finishes the step in
flight, saves it although it is not a checkpoint step, and stops in one line with ``EXIT_STOPPED``;
rerunning resumes it and reaches the weights of a run never stopped."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_loop import PatchClassifier, _train, patches  # noqa: F401 (patches: the fixture)

from ssl_path.core.errors import EXIT_STOPPED, StopRequested, run_cli, stop_on_signal


class SignalledAt(PatchClassifier):
    """Sends this process the warning signal while it runs step ``at`` (0-based)."""

    def __init__(self, n_classes: int, at: int) -> None:
        super().__init__(n_classes)
        self.at = at

    def set_step(self, step: int) -> dict[str, float]:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGUSR2)
        return super().set_step(step)


def test_a_stop_request_saves_the_step_in_flight_and_the_rerun_reaches_the_whole_run(patches, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    whole = _train(PatchClassifier(2), patches, tmp_path / "whole")
    torch.manual_seed(0)
    stopped = SignalledAt(2, at=2)
    with stop_on_signal(signal.SIGUSR2), pytest.raises(StopRequested):
        _train(stopped, patches, tmp_path / "split")  # checkpoints every 2 steps, of 6
    assert stopped.steps_seen == [0, 1, 2]  # nothing after the step the signal came in
    saved = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 3  # saved on the request, not on the checkpoint schedule

    torch.manual_seed(1)
    resumed = _train(PatchClassifier(2), patches, tmp_path / "split")
    assert resumed.steps_seen == [3, 4, 5]
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stopped_stage_is_one_line_and_exit_stopped(capsys):
    def main(argv):
        raise StopRequested("saved step 3 of 6 in run/checkpoints/last.pt; the same command resumes it")

    assert run_cli(main, []) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert err.startswith("stopped: saved step 3") and err.count("\n") == 1
