"""Run a function on W local GPUs, one process per GPU, each a member of one fresh NCCL group.

Used by the GPU benchmarks and tests/gpu (no Ray: a benchmark should time the exchange, not actor
start-up; the engine tests cover the Ray path). The rendezvous TCPStore lives in the parent; every
rank joins as a client, binds GPU `rank`, and calls fn(group, rank, *args) -> picklable result.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import uuid

import torch.distributed as dist


def _rank_main(fn, name, world_size, rank, addr, timeout_s, args, queue):
    import torch

    from moeray.comm.group import NCCL_BACKEND, GroupSpec, create_group

    try:
        torch.cuda.set_device(rank)
        group = create_group(GroupSpec(name, world_size, rank, addr, timeout_s, NCCL_BACKEND))
        queue.put((rank, fn(group, rank, *args), None))
    except BaseException as exc:  # reported to the parent with the rank
        queue.put((rank, None, f"{type(exc).__name__}: {exc}"))


def run_on_gpus(world_size: int, fn, args=(), timeout_s: float = 60.0, wait_s: float = 600.0) -> list:
    """fn(group, rank, *args) on each of `world_size` GPUs; returns the results by rank.
    fn must be importable (module level). Raises with the rank's message if any rank failed."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # inherited by the ranks
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=timeout_s))
    addr = f"127.0.0.1:{server.port}"
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(fn, name, world_size, r, addr, timeout_s, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, value, error = queue.get(timeout=wait_s)
            if error is not None:
                errors.append(f"rank {rank}: {error}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("; ".join(errors))
    return [results[r] for r in range(world_size)]


def raw_process_group(group, rank: int, world_size: int):
    """A second, plain torch.distributed default group on the same rendezvous (the raw peer)."""
    import torch

    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.PrefixStore("raw", group._store), rank=rank,
                                world_size=world_size, device_id=torch.device("cuda", rank))
    return dist.group.WORLD
