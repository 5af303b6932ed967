"""The members of our Ray collective groups: each rank's private torch c10d process group behind
Ray's `BaseGroup`, with all-to-all and every op bounded by the group's timeout.

`TorchCollectiveGroup` holds the ops and turns every c10d failure into a `CollectiveError` naming
the op; `GlooGroup` (CPU) and `NcclGroup` (CUDA, stream-ordered waits, the watchdog's bound) are
the two backends moeray.comm.group registers with Ray. Forming, joining and leaving a group is
moeray.comm.group's part; Ray constructs a member from (world_size, rank, group_name) only, so the
rest of its `GroupSpec` is handed over through a process-local table (`spec_handed_over`).
"""

from __future__ import annotations

import datetime
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from ray.util.collective.collective_group.base_collective_group import BaseGroup
from ray.util.collective.types import ReduceOp

from moeray.errors import CollectiveError

# Environment every NCCL process needs before torch reads it (set in the worker's runtime_env).
NCCL_SAFETY_ENV = {
    # NVLink multicast (NVLS) off: it can take a shared host's GPUs out of service.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    # A timed-out collective aborts the communicator and ends the process (never a hang).
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    # Without these the watchdog waits ~60 s for a debug dump before ending the process
    # (seen on 2 H200: timeout detected at 5.05 s, process ended at 69-71 s).
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
    "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "1000",
}

GLOO_BACKEND = "MOERAY_GLOO"
NCCL_BACKEND = "MOERAY_NCCL"

_REDUCE_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT,
    ReduceOp.MIN: dist.ReduceOp.MIN,
    ReduceOp.MAX: dist.ReduceOp.MAX,
}


@dataclass(frozen=True)
class GroupSpec:
    """Everything a rank needs to join one epoch's group."""

    group_name: str
    world_size: int
    rank: int
    master_addr: str  # "host:port" of rank 0's TCPStore
    timeout_s: float
    backend: str = GLOO_BACKEND


# Process-local state. Ray constructs a backend class with (world_size, rank, group_name) only, so
# the rest of the spec (address, timeout) is handed over through this table, keyed by (group, rank).
_pending_specs: dict[tuple[str, int], GroupSpec] = {}
_master_stores: dict[str, dist.TCPStore] = {}  # the rendezvous stores this process opened (rank 0)
_lock = threading.Lock()


@contextmanager
def spec_handed_over(spec: GroupSpec):
    """While inside, the member of spec's group and rank that this process builds (through Ray's
    group manager or directly) finds its spec; afterwards nothing of it is left in the table."""
    with _lock:
        _pending_specs[(spec.group_name, spec.rank)] = spec
    try:
        yield
    finally:
        with _lock:
            _pending_specs.pop((spec.group_name, spec.rank), None)


def keep_master_store(group_name: str, store: dist.TCPStore) -> None:
    """Hold rank 0's rendezvous store until the group is left: dropping it would close the
    rendezvous, and this process's member uses it as its store instead of connecting as a client."""
    with _lock:
        _master_stores[group_name] = store


def release_master_store(group_name: str) -> None:
    """Drop this process's rendezvous store of the group, if it holds one (closed with its last reference)."""
    with _lock:
        _master_stores.pop(group_name, None)


def node_ip() -> str:
    """The address Ray knows this node by: where the rendezvous listens and Gloo binds."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside a Ray process (unit tests): loopback is enough
        return "127.0.0.1"


class PendingOp:
    """A launched collective. `wait()` completes it (host-blocking on Gloo, stream-ordered on NCCL)
    and raises CollectiveError on failure; waiting twice is harmless."""

    def __init__(self, group: TorchCollectiveGroup, op_name: str, work):
        self._group, self._op_name, self._work = group, op_name, work

    def wait(self) -> None:
        if self._work is None:
            return
        work, self._work = self._work, None
        try:
            self._group._wait(work)
        except Exception as exc:
            raise self._group._error(self._op_name, exc) from exc


class TorchCollectiveGroup(BaseGroup):
    """A Ray collective group backed by a private c10d ProcessGroup.

    Tensors may be passed bare or wrapped in a one-element list (Ray's API wraps them).
    All ops are synchronous: they return when this rank's part is complete, or raise
    `CollectiveError` within the group's timeout; `all_to_all_start` launches one without waiting
    (the overlapped layer step, moeray.expert_parallel).
    """

    DEVICE = "cpu"

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        with _lock:
            spec = _pending_specs.get((group_name, rank))
            master = _master_stores.get(group_name)
        if spec is None:
            raise CollectiveError(
                f"group {group_name!r}: no GroupSpec in this process; create it with moeray.comm.group.join_group"
            )
        self.timeout_s = spec.timeout_s
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        host, port = spec.master_addr.rsplit(":", 1)
        if master is None:
            try:
                store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout, use_libuv=True)
            except Exception as exc:
                raise CollectiveError(f"group {group_name!r} rank {rank}: cannot reach rendezvous {spec.master_addr}: {exc}") from exc
        else:
            store = master
        self._store = store
        self._pg = self._make_process_group(dist.PrefixStore(group_name, store), rank, world_size, timeout)
        # The first collective completes the connection set-up of all ranks, so a rank that never
        # arrives surfaces here, within the timeout, rather than in the first model step.
        self.barrier()

    # ---- backend plumbing ----------------------------------------------------------------------
    def _make_process_group(self, store, rank, world_size, timeout):
        raise NotImplementedError

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available()

    def destroy_group(self) -> None:
        try:
            self._pg.shutdown()
        except Exception:  # a group broken by a dead peer may refuse a clean shutdown
            pass

    def _error(self, op_name: str, exc: Exception) -> CollectiveError:
        return CollectiveError(
            f"{op_name} failed in group {self.group_name!r} (rank {self.rank}/{self.world_size}, "
            f"timeout {self.timeout_s:g}s): {exc}"
        )

    def _wait(self, work) -> None:
        """Complete one launched op (the host blocks, bounded by the group timeout)."""
        work.wait(datetime.timedelta(seconds=self.timeout_s))

    def _start(self, op_name: str, launch) -> PendingOp:
        """Launch a c10d op without waiting; every failure becomes a CollectiveError naming the op."""
        try:
            return PendingOp(self, op_name, launch())
        except Exception as exc:  # c10d raises RuntimeError/DistBackendError for timeouts and lost peers
            raise self._error(op_name, exc) from exc

    def _run(self, op_name: str, launch) -> None:
        self._start(op_name, launch).wait()

    @staticmethod
    def _unwrap(tensor):
        if isinstance(tensor, (list, tuple)):
            if len(tensor) != 1:
                raise ValueError(f"expected one tensor, got a list of {len(tensor)}")
            tensor = tensor[0]
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        return tensor

    # ---- collectives ---------------------------------------------------------------------------
    def all_to_all(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> torch.Tensor:
        """Uneven-split all-to-all along dim 0. Split sizes are host ints (one host sync upstream)."""
        self.all_to_all_start(output, input, output_split_sizes, input_split_sizes).wait()
        return output

    def all_to_all_start(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> PendingOp:
        """`all_to_all` without the wait: `output` is valid after the returned op's `wait()`, and
        `input` must not be written before then. Ops of one group complete in launch order."""
        out_splits = list(output_split_sizes) if output_split_sizes is not None else []
        in_splits = list(input_split_sizes) if input_split_sizes is not None else []
        return self._start(
            "all_to_all",
            lambda: self._pg.alltoall_base(output, input, out_splits, in_splits, dist.AllToAllOptions()),
        )

    def allreduce(self, tensor, allreduce_options=None):
        tensor = self._unwrap(tensor)
        opts = dist.AllreduceOptions()
        opts.reduceOp = _REDUCE_OPS[getattr(allreduce_options, "reduceOp", ReduceOp.SUM)]
        self._run("allreduce", lambda: self._pg.allreduce([tensor], opts))
        return tensor

    def barrier(self, barrier_options=None):
        # A tiny allreduce, not c10d's barrier: Gloo's barrier ignores the per-op timeout on some
        # versions, and NCCL's barrier needs a device id.
        token = torch.zeros(1, device=self.DEVICE)
        self.allreduce(token)

    def reduce(self, tensor, reduce_options=None):
        tensor = self._unwrap(tensor)
        opts = dist.ReduceOptions()
        opts.reduceOp = _REDUCE_OPS[getattr(reduce_options, "reduceOp", ReduceOp.SUM)]
        opts.rootRank = getattr(reduce_options, "root_rank", 0)
        self._run("reduce", lambda: self._pg.reduce([tensor], opts))
        return tensor

    def allgather(self, tensor_list, tensor, allgather_options=None):
        tensor = self._unwrap(tensor)
        if tensor_list and isinstance(tensor_list[0], (list, tuple)):
            tensor_list = tensor_list[0]
        self._run("allgather", lambda: self._pg.allgather([list(tensor_list)], [tensor]))
        return tensor_list

    def broadcast(self, tensor, broadcast_options=None):
        tensor = self._unwrap(tensor)
        opts = dist.BroadcastOptions()
        opts.rootRank = getattr(broadcast_options, "root_rank", 0)
        self._run("broadcast", lambda: self._pg.broadcast([tensor], opts))
        return tensor

    def reducescatter(self, tensor, tensor_list, reducescatter_options=None):
        tensor = self._unwrap(tensor)
        if tensor_list and isinstance(tensor_list[0], (list, tuple)):
            tensor_list = tensor_list[0]
        # Gloo has no reduce_scatter: reduce everything, keep this rank's chunk.
        stacked = torch.stack(list(tensor_list))
        self.allreduce(stacked, reducescatter_options)
        tensor.copy_(stacked[self.rank])
        return tensor

    def send(self, tensor, send_options):
        tensor = self._unwrap(tensor)
        self._run("send", lambda: self._pg.send([tensor], send_options.dst_rank, 0))

    def recv(self, tensor, recv_options):
        tensor = self._unwrap(tensor)
        self._run("recv", lambda: self._pg.recv([tensor], recv_options.src_rank, 0))


class GlooGroup(TorchCollectiveGroup):
    """CPU tensors over Gloo."""

    DEVICE = "cpu"

    @classmethod
    def backend(cls):
        return GLOO_BACKEND

    def _make_process_group(self, store, rank, world_size, timeout):
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # Bind to the address Ray knows this node by: the hostname may not resolve, and a second
        # construction attempt on the same store keys would wedge the rendezvous.
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=node_ip())]
        return dist.ProcessGroupGloo(store, rank, world_size, opts)


class NcclGroup(TorchCollectiveGroup):
    """CUDA tensors over NCCL (torch's ProcessGroupNCCL: per-op timeouts, watchdog, abort).

    Waiting is stream-ordered: `work.wait()` makes the caller's current CUDA stream wait for the
    NCCL stream and returns at once; the host blocks only where it reads a result (the dispatcher's
    split-size `.tolist()`). Passing a timeout to `wait` would instead block the host, polling, until
    the op completes, which costs more than a small exchange takes, so the bound on a dead or silent peer comes from
    the process group instead: its watchdog thread sees an op older than `timeout_s`, aborts the
    communicator (the hung kernel then exits) and, with TORCH_NCCL_ASYNC_ERROR_HANDLING=3, ends
    the process. A Ray worker therefore dies within about timeout_s (+ the watchdog's poll period)
    and the engine reports `WorkerLost`; it never hangs.
    """

    DEVICE = "cuda"

    @classmethod
    def backend(cls):
        return NCCL_BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()

    def _make_process_group(self, store, rank, world_size, timeout):
        # Read by NCCL / ProcessGroupNCCL when the communicator is created, so set them before.
        # NVLink multicast (NVLS) stays off: it can take a shared host's GPUs out of service.
        # Too late if torch read them already: processes we start get NCCL_SAFETY_ENV up front
        # (Ray runtime_env for workers); this covers plain processes that import us first.
        for key, value in NCCL_SAFETY_ENV.items():
            os.environ.setdefault(key, value)
        if not torch.cuda.is_available():
            raise CollectiveError(f"group {self.group_name!r}: NCCL needs a CUDA device, none is visible")
        # The communicator binds to the current device: the caller (Worker) set it already; this
        # makes the binding explicit for plain processes too.
        torch.cuda.set_device(torch.cuda.current_device())
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)  # ends with a barrier (an allreduce)
        # NCCL connects the peer-to-peer channels an all-to-all uses lazily, at its first call; a
        # peer that died before then surfaced only after NCCL's own connect timeout (~60 s seen on
        # 2 H200). One tiny all-to-all here connects them while every rank is known to be alive.
        probe_W = torch.zeros(world_size, device=self.DEVICE)
        self.all_to_all(torch.empty_like(probe_W), probe_W)
        probe_W.sum().item()  # host sync: formation ends only when the exchange has completed

    def _wait(self, work) -> None:
        work.wait()  # stream-ordered: no host wait here (see the class docstring)

    def barrier(self, barrier_options=None):
        # host sync: a real barrier (group formation relies on it); the watchdog bounds it.
        token = torch.zeros(1, device=self.DEVICE)
        self.allreduce(token)
        token.item()

    @property
    def process_group(self):
        """The c10d ProcessGroupNCCL (for moeray.comm.p2p and the benchmarks)."""
        return self._pg

    def destroy_group(self) -> None:
        try:
            self._pg.abort()  # never block on a communicator a dead peer left half-finished
        except Exception:
            pass
