"""Connecting to Ray: the cluster this process should use, or a fresh local one (the embedded mode)."""

from __future__ import annotations

import os

import ray


# Logical CPUs of the embedded local cluster. Workers run one torch thread each and spend much of
# a step waiting on collectives, so declaring more logical CPUs than cores is safe and lets a
# 2-core machine host a 4-worker group plus the coordinator.
LOCAL_CLUSTER_CPUS = 16


def _existing_cluster() -> str | None:
    """The cluster `ray.init()` would join: RAY_ADDRESS (set by `ray job submit`), else the one the
    last `ray start` on this machine made (e.g. a head node from `ray up`); None if neither."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.utils import read_ray_address  # Ray's own lookup of `ray start` (private API)

        return read_ray_address()
    except Exception:
        return None


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to Ray: an existing cluster (see _existing_cluster) with its own resources, else a
    fresh local cluster. No-op if this process is connected already."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = _existing_cluster()
    if address:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
            return
        except ConnectionError:
            if os.environ.get("RAY_ADDRESS"):
                raise  # asked for explicitly: do not silently serve from a local cluster instead
            # a stale address file from a `ray start` cluster that is gone: start a local one
    ray.init(
        address="local",
        num_cpus=num_cpus or max(os.cpu_count() or 1, LOCAL_CLUSTER_CPUS),
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=True,
        configure_logging=True,
    )
