"""A stage for the launcher's DDP test: the tiny pretraining ``ssl_path.pretrain`` runs, after which each
rank saves the weights it ended with (the stage itself saves rank 0's only, in its checkpoint).

    python -m ranks_stage --data SHARDS --out RUN_DIR key=value ...   (writes RUN_DIR/../rank{R}.pt)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from ssl_path.core.cli import make_parser
from ssl_path.core.errors import run_cli
from ssl_path.pretrain import resolve_config, run


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m ranks_stage", "Tiny pretraining; every rank saves its final weights.")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    trained = run(resolve_config("dinov2_tiny_cpu", args.overrides), args.data, args.out, progress=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(trained.state_dict(), args.out.parent / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
