"""``python -m ssl_path.run_log RUN_DIR``: redraw a run's PNGs, also while it runs: ``loss.png`` from
its metrics.jsonl, and the figure of its method where it has one (MAE: ``reconstruction.png``, from
the last checkpoint and the first tiles of the run's shards, or of ``--data``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ssl_path.core.cli import make_parser
from ssl_path.core.errors import run_cli
from ssl_path.methods import methods
from ssl_path.pretrain import CONFIG_FILE, draw_figure, resolve_config
from ssl_path.training.metrics_log import plot_run


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(
        "python -m ssl_path.run_log",
        "Draw a run's loss curves into RUN_DIR/loss.png, and its method's figure (MAE: reconstruction.png).",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", nargs="+", default=None, help="shards to draw the figure from (default: the run's)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir))
    method = resolve_config(str(args.run_dir / CONFIG_FILE)).method
    if methods()[method].method.figure:
        data = None if args.data is None else args.data if len(args.data) > 1 else args.data[0]
        print(draw_figure(args.run_dir, data))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
