import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_path.core.distributed import init_distributed


def _cpu_run_on_a_gpu_node(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.cuda.is_available = lambda: True  # the node has GPUs; the run was told train.device=cpu
    info = init_distributed("cpu")
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # nccl would refuse a CPU tensor
    torch.save({"backend": dist.get_backend(), "total": total, "rank": info.rank}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_a_cpu_run_on_a_gpu_node_joins_gloo(tmp_path):
    mp.spawn(_cpu_run_on_a_gpu_node, args=(2, 29300 + os.getpid() % 100, str(tmp_path)), nprocs=2)
    for rank in range(2):
        saved = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert saved["backend"] == "gloo" and saved["rank"] == rank and saved["total"].item() == 3.0
