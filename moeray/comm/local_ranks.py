"""Run a function on W local processes that form one fresh collective group, without Ray.

For benchmarks (time the exchange, not actor start-up), GPU tests and unit tests of the exchange
code. The rendezvous TCPStore lives in the calling process and is no rank's master: every rank
joins as a client, builds its member with `create_group`, and calls fn(group, rank, *args); fn
must be importable (module level) and return something picklable. Results cross the queue as
plain pickle bytes: the queue's own pickler would ship torch tensors as shared-memory handles,
which vanish when the rank exits before the caller has read them (a race seen in CI).

Processes, not threads (threads of one process stall Gloo's set-up). NCCL ranks are spawned
(CUDA cannot be used in forked children) with NCCL_SAFETY_ENV inherited; Gloo ranks come from a
forkserver, because forking a process that already runs Ray's threads is unsafe.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import uuid

import torch.distributed as dist

from moeray.comm.group import GLOO_BACKEND, NCCL_BACKEND, NCCL_SAFETY_ENV, GroupSpec, create_group


def _rank_main(fn, name, world_size, rank, addr, timeout_s, backend, args, queue):
    try:
        if backend == NCCL_BACKEND:
            import torch

            torch.cuda.set_device(rank)
        group = create_group(GroupSpec(name, world_size, rank, addr, timeout_s, backend))
        queue.put((rank, pickle.dumps(fn(group, rank, *args)), None))
    except BaseException as exc:  # reported to the caller with the rank
        queue.put((rank, None, f"{type(exc).__name__}: {exc}"))


def run_ranks(world_size: int, fn, args=(), backend: str = GLOO_BACKEND, timeout_s: float = 60.0,
              wait_s: float = 600.0, preload: tuple[str, ...] = ()) -> list:
    """fn(group, rank, *args) on each rank; returns the results by rank. Raises naming the rank if
    any rank failed, or if no answer came within `wait_s` (a hung rank never hangs the caller)."""
    name = f"ranks-{uuid.uuid4().hex[:8]}"
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=timeout_s))
    addr = f"127.0.0.1:{server.port}"
    if backend == NCCL_BACKEND:
        os.environ.update(NCCL_SAFETY_ENV)  # inherited by the spawned ranks before they import torch
        ctx = mp.get_context("spawn")
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "moeray.comm.group", *preload])
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(fn, name, world_size, r, addr, timeout_s, backend, args, queue),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, payload, error = queue.get(timeout=wait_s)
            if error is not None:
                errors.append(f"rank {rank}: {error}")
            results[rank] = None if payload is None else pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("; ".join(errors))
    return [results[r] for r in range(world_size)]
