"""GPU ranks for the benchmarks and tests/gpu: `moeray.comm.local_ranks` on NCCL, one process
per GPU (no Ray: a benchmark should time the exchange, not actor start-up; the engine tests cover
the Ray path), and the plain torch.distributed group the benchmarks compare against."""

from __future__ import annotations

import torch.distributed as dist

from moeray.comm.group import NCCL_BACKEND
from moeray.comm.local_ranks import run_ranks


def run_on_gpus(world_size: int, fn, args=(), timeout_s: float = 60.0, wait_s: float = 600.0) -> list:
    """fn(group, rank, *args) on each of `world_size` GPUs (one process each, NCCL group)."""
    return run_ranks(world_size, fn, args, backend=NCCL_BACKEND, timeout_s=timeout_s, wait_s=wait_s)


def raw_process_group(group, rank: int, world_size: int):
    """A second, plain torch.distributed default group on the same rendezvous (the raw peer)."""
    import torch

    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.PrefixStore("raw", group._store), rank=rank,
                                world_size=world_size, device_id=torch.device("cuda", rank))
    return dist.group.WORLD
