"""A run's metrics: ``RUN_DIR/metrics.jsonl`` (one JSON line per logged step) and its loss-curve PNG.

The loop appends; ``python -m ssl_path.run_log RUN_DIR`` redraws ``RUN_DIR/loss.png`` at any time:
the loss terms, the schedules, and the collapse statistics (:mod:`ssl_path.training.collapse`) with
their warning thresholds, each in a panel of its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ssl_path.core.errors import UserError
from ssl_path.core.io import atomic_path
from ssl_path.training.collapse import MONITORED

METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"
# Logged values that are not loss terms, drawn in a panel of their own.
SCHEDULE_KEYS = ("lr", "wd", "momentum", "teacher_temperature")
NOT_PLOTTED = ("step", "epoch", "time", "img_per_s", "data_wait", "skipped_samples", "skipped_shards")


class MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log: each line that is a JSON object. A line cut by a kill, or
    edited into something else, is passed over; the rest stays readable."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_run(run_dir: Path) -> Path:
    """Draw the loss terms (log-free, raw) and the schedules of ``run_dir`` into ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no {METRICS} (is it a pretraining run directory?)")
    records = [r for r in read_metrics(metrics) if isinstance(r.get("step"), int)]
    if not records:
        raise UserError(f"{metrics}: no logged steps yet")
    steps = [r["step"] for r in records]
    keys = [k for k in records[-1] if k not in NOT_PLOTTED and k not in SCHEDULE_KEYS and k not in MONITORED]
    schedules = [k for k in SCHEDULE_KEYS if k in records[-1]]
    monitored = [k for k in MONITORED if k in records[-1]]
    fig, axes = plt.subplots(1, 3 if monitored else 2, figsize=(16 if monitored else 11, 4))
    for key in keys:
        axes[0].plot(steps, [_num(r.get(key)) for r in records], label=key, lw=1.2)
    axes[0].set(xlabel="step", ylabel="loss", title=f"{run_dir.name}: losses")
    axes[0].legend(fontsize=8)
    for key in schedules:
        values = [_num(r.get(key)) for r in records]
        top = max((abs(v) for v in values if math.isfinite(v)), default=1.0) or 1.0
        axes[1].plot(steps, [v / top for v in values], label=f"{key} (/ {top:.3g})", lw=1.2)
    axes[1].set(xlabel="step", title="schedules, scaled to max 1")
    axes[1].legend(fontsize=8)
    for key in monitored:
        line = axes[2].plot(steps, [_num(r.get(key)) for r in records], label=key, lw=1.2)[0]
        axes[2].axhline(MONITORED[key].threshold, color=line.get_color(), ls=":", lw=0.8)
    if monitored:
        axes[2].set(xlabel="step", ylim=(-0.02, 1.02), title="collapse: 1 = uniform targets / one direction")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    out = run_dir / LOSS_PNG
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
