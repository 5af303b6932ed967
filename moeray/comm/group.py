"""Our Ray collective backend: a torch c10d process group with all-to-all and bounded timeouts.

Ray 2.60's `ray.util.collective` has no all-to-all, its NCCL group has no timeout or abort, and its
Gloo group lives in the per-process default group (one per process, 30-minute timeout). This module
registers `MOERAY_GLOO` (and, on GPUs, `MOERAY_NCCL`) with
`ray.util.collective.backend_registry.register_collective_backend`; each group owns a private
c10d process group built on its own TCPStore, so:

- every epoch gets a fresh group name and a fresh communicator (NCCL cannot change membership,
  and a name reused after a crash would meet stale state);
- every collective is bounded by the group's timeout: a dead peer makes the survivors raise
  `CollectiveError` (Gloo: the peer's socket closes or the op times out), never hang.

This module is a group's life: registration, rendezvous, joining, lookup, leaving. The members
themselves (the ops, Gloo and NCCL) are in moeray.comm.c10d_group; their names are re-exported
here, the one import path callers use.

Set-up is two calls per group, driven by the engine (the rendezvous needs rank 0's address):
    addr = rank0: open_rendezvous(group_name)            -> "host:port"
    every rank:   join_group(spec) with that address      -> registers + ray.util.collective.init
Registration must happen in the driver and in every actor: `register_backends()` is idempotent.
"""

from __future__ import annotations

import datetime
import socket
import threading

import torch.distributed as dist
from ray.util import collective as ray_collective
from ray.util.collective.backend_registry import _global_registry, register_collective_backend

from moeray.comm.c10d_group import (
    GLOO_BACKEND,
    NCCL_BACKEND,
    NCCL_SAFETY_ENV,
    GlooGroup,
    GroupSpec,
    NcclGroup,
    PendingOp,
    TorchCollectiveGroup,
    keep_master_store,
    node_ip,
    release_master_store,
    spec_handed_over,
)
from moeray.errors import CollectiveError

__all__ = [
    "GLOO_BACKEND", "NCCL_BACKEND", "NCCL_SAFETY_ENV", "GlooGroup", "GroupSpec", "NcclGroup", "PendingOp",
    "TorchCollectiveGroup", "create_group", "get_group", "join_group", "leave_group", "open_rendezvous",
    "register_backends",
]

_registration_lock = threading.Lock()


def register_backends() -> None:
    """Register our backends with Ray in this process (driver and every actor). Idempotent."""
    with _registration_lock:
        for name, cls in ((GLOO_BACKEND, GlooGroup), (NCCL_BACKEND, NcclGroup)):
            if not _global_registry.is_registered(name):
                register_collective_backend(name, cls)


def open_rendezvous(group_name: str, timeout_s: float) -> str:
    """On rank 0: start the group's TCPStore on a free port and return its "host:port".

    TCPStore would bind its own socket to every interface; it gets one bound to this node's
    address instead (127.0.0.1 on moeray's local cluster), so the store is reachable only where
    the group's ranks connect from."""
    host = node_ip()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family, backlog=128)  # port 0: the OS picks a free one
    store = dist.TCPStore(
        host,
        listener.getsockname()[1],
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        use_libuv=True,
        master_listen_fd=listener.detach(),  # the store owns the socket from here on (and closes it)
    )
    keep_master_store(group_name, store)
    return f"{host}:{store.port}"


def join_group(spec: GroupSpec) -> None:
    """In each actor: create this rank's member of the group (blocks until all ranks joined)."""
    register_backends()
    with spec_handed_over(spec):
        ray_collective.init_collective_group(
            spec.world_size, spec.rank, backend=spec.backend, group_name=spec.group_name
        )


def create_group(spec: GroupSpec) -> TorchCollectiveGroup:
    """Build this rank's member directly, outside Ray's group manager (threads in one process,
    plain subprocesses). `join_group` is the path for Ray actors."""
    with spec_handed_over(spec):
        cls = {GLOO_BACKEND: GlooGroup, NCCL_BACKEND: NcclGroup}[spec.backend]
        return cls(spec.world_size, spec.rank, spec.group_name)


def get_group(group_name: str) -> TorchCollectiveGroup:
    from ray.util.collective.collective import _group_mgr

    group = _group_mgr.get_group_by_name(group_name)
    if group is None:
        raise CollectiveError(f"collective group {group_name!r} is not initialized in this process")
    return group


def leave_group(group_name: str) -> None:
    """Destroy this process's member of the group (safe to call on a broken group)."""
    if ray_collective.is_group_initialized(group_name):
        ray_collective.destroy_collective_group(group_name)
    release_master_store(group_name)
