"""Connecting to Ray: the cluster this process should use, or a fresh local one (the embedded mode).

The local cluster listens on 127.0.0.1 only. Ray binds every server (GCS, raylet, workers, agents)
to all interfaces unless its node address is the loopback one, and `ray.init(_node_ip_address=
"127.0.0.1")` is rewritten to the machine's address; Ray picks loopback only where clusters are
off by default (macOS, Windows: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). We use that switch while the
local cluster starts, so a laptop or a shared machine does not expose Ray's ports.
"""

from __future__ import annotations

import os

import ray

# Logical CPUs of the embedded local cluster. Workers run one torch thread each and spend much of
# a step waiting on collectives, so declaring more logical CPUs than cores is safe and lets a
# 2-core machine host a 4-worker group plus the coordinator.
LOCAL_CLUSTER_CPUS = 16
_LOOPBACK_SWITCH_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # read by Ray's processes at start-up


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


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Connect to Ray: `address` if given (an error if it cannot be reached), else an existing
    cluster (see _existing_cluster) with its own resources, else a fresh local cluster on
    127.0.0.1. No-op if this process is connected already."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        return
    address = _existing_cluster()
    if address:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
            return
        except ConnectionError:
            if os.environ.get("RAY_ADDRESS"):
                raise  # asked for explicitly: do not silently serve from a local cluster instead
            # a stale address file from a `ray start` cluster that is gone: start a local one
    _start_local_cluster(num_cpus or max(os.cpu_count() or 1, LOCAL_CLUSTER_CPUS))


def _start_local_cluster(num_cpus: int) -> None:
    from ray._private import ray_constants  # the switch's value in this process (read at import)

    saved_env, saved_switch = os.environ.get(_LOOPBACK_SWITCH_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_SWITCH_ENV] = "0"  # inherited by the raylet, hence by every worker it starts
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            logging_level="WARNING",
            log_to_driver=True,
            configure_logging=True,
        )
    finally:
        # Only the start-up needs it: a later ray.init in this process (another cluster) must
        # find the machine's real address again.
        ray_constants.ENABLE_RAY_CLUSTER = saved_switch
        if saved_env is None:
            os.environ.pop(_LOOPBACK_SWITCH_ENV, None)
        else:
            os.environ[_LOOPBACK_SWITCH_ENV] = saved_env
