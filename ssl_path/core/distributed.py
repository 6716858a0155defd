"""torch.distributed set-up from the environment torchrun, submitit and Slurm provide.

One process per device; ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` come
from torchrun, or from ``submitit.helpers.TorchDistributedEnvironment().export()`` under Slurm
(``slurm/launch.py``). A single process with none of them set runs without a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ssl_path.core.cli import parse_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group named by the environment: nccl where ``device`` (a ``train.device``
    value) lands on CUDA, gloo where it is the CPU, even on a GPU node (nccl cannot reduce CPU tensors)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if parse_device(device)[0] != "cpu" and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def from_rank_0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object), so that all of them act on one reading."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_finite(values: torch.Tensor) -> torch.Tensor:
    """Elementwise finiteness agreed across ranks, so that every rank stops at the same step."""
    finite = torch.isfinite(values).to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.bool()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank, so that all of them act on one rank's signal at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
