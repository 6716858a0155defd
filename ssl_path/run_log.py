"""``python -m ssl_path.run_log RUN_DIR``: redraw a run's ``loss.png`` from its metrics.jsonl, also while it runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ssl_path.core.cli import make_parser
from ssl_path.core.errors import run_cli
from ssl_path.training.metrics_log import plot_run


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m ssl_path.run_log", "Draw a run's loss curves into RUN_DIR/loss.png.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
