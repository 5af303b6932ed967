"""A worker's host tier (issue 13): the expert slots of one layer that live in host memory, and
how the rows routed to them are computed while the device computes its own slots.

Legend: M rows this worker received, D hidden, F expert FFN width, H = 2F, B device slots of a
layer, X host slots of a layer (local slots B .. B + X - 1), Y rows of the host slots.

Local slots [0, B) are device slots (SlotExperts' parameters), [B, S_w) host slots: pinned host
tensors on a GPU worker (so copies to the device are asynchronous), plain ones on a CPU worker,
where "device" is the same memory and the budget only picks the path (the tests run all paths).
Per layer step, for the rows of each touched host slot, the cold path is
    host   the rows go to the host, the slot's expert runs there (torch on the CPU, its threads),
           and the results come back: small activations move, the weights stay;
    fetch  the slot's weights are copied into a device staging slot (rounds of `fetch_slots`,
           two rounds in flight) and the device kernel runs them;
    auto   per slot and step, whichever `placement.tiering.split_cold` predicts is shorter from
           the measured rates (few rows: host; many rows: fetch).
The device kernel of the resident slots is launched before the host waits for anything, so the
host part runs beside it; the results join before the combine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from moeray.kernels import expert_mlp
from moeray.kernels.reference import swiglu
from placement.tiering import TierRates, split_cold


@dataclass(frozen=True)
class ColdPath:
    """How one worker serves its host slots (shared by its layers)."""

    mode: str  # "host" | "fetch" | "auto"
    rates: TierRates | None  # measured on this worker (auto needs them)
    fetch_slots: int = 4

    def __post_init__(self) -> None:
        if self.mode not in ("host", "fetch", "auto"):
            raise ValueError(f"cold path must be 'host', 'fetch' or 'auto', got {self.mode!r}")
        if self.mode == "auto" and self.rates is None:
            raise ValueError("cold path 'auto' needs measured TierRates")


@dataclass
class TierCounts:
    """What one layer's host slots did since the last reset (mutable, read by benches and reports)."""

    steps: int = 0
    host_experts: int = 0  # touched host slots computed on the host
    fetched_experts: int = 0  # touched host slots fetched to the device
    host_rows: int = 0
    fetched_rows: int = 0
    host_s: float = 0.0  # wall time of the host math

    def add(self, rows_X: np.ndarray, host_slots: list[int], fetch_slots: list[int]) -> None:
        self.steps += 1
        self.host_experts += len(host_slots)
        self.fetched_experts += len(fetch_slots)
        self.host_rows += int(rows_X[host_slots].sum()) if host_slots else 0
        self.fetched_rows += int(rows_X[fetch_slots].sum()) if fetch_slots else 0


class HostCalibration:
    """The host's measured time over the model's (TierRates.host_scale), learnt from the steps
    that ran host math: the rates are measured once, alone, and a step's host math runs beside
    fetch copies and the device's launches, with other threads on the machine. A moving average
    of the ratio, clipped so that one odd step (a page fault, a preemption) cannot flip the split."""

    def __init__(self, weight: float = 0.25, lowest: float = 0.25, highest: float = 16.0):
        self.scale, self.weight, self.lowest, self.highest = 1.0, weight, lowest, highest
        self._scaled = None  # (scale, rates) last handed out

    def observe(self, rates: TierRates, rows_X: np.ndarray, seconds: float) -> None:
        modelled = float(rates.host_expert_seconds(rows_X).sum())
        if modelled > 0:
            ratio = min(max(seconds / modelled, self.lowest), self.highest)
            self.scale += self.weight * (ratio - self.scale)

    def rates(self, rates: TierRates) -> TierRates:
        """`rates` with the learnt scale (rebuilt only when the scale moved by over 5%)."""
        if self._scaled is None or self._scaled[1] is not rates or abs(self.scale / self._scaled[0] - 1) > 0.05:
            self._scaled = (self.scale, rates, replace(rates, host_scale=rates.host_scale * self.scale))
        return self._scaled[2]


def host_threads(configured: int | None, workers_on_node: int) -> int:
    """A GPU worker's host compute threads: configured, else this process's CPUs shared by the workers."""
    if configured is not None:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, workers_on_node))


class StagingPool:
    """A worker's device staging slots for fetches, shared by its layers (allocated at the first
    fetch): two buffers of `slots` experts, and per buffer the event after the last kernel that
    read it, kept across layers and steps so a copy never overwrites weights still being read."""

    def __init__(self, slots: int, device: torch.device):
        self.slots, self.device = slots, device
        self.buffers = None  # (w13 [2, slots, H, D], w2 [2, slots, D, F])
        self.freed = [None, None]
        self.streams = None  # (rows stream, weights stream) on a GPU

    def get(self, w13_HD: torch.Tensor, w2_DF: torch.Tensor):
        if self.buffers is None:
            self.buffers = (torch.empty((2, self.slots) + tuple(w13_HD.shape), dtype=w13_HD.dtype, device=self.device),
                            torch.empty((2, self.slots) + tuple(w2_DF.shape), dtype=w2_DF.dtype, device=self.device))
        return self.buffers

    def nbytes(self) -> int:
        return 0 if self.buffers is None else sum(t.numel() * t.element_size() for t in self.buffers)

    def cuda_streams(self):
        if self.streams is None:
            self.streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self.streams


class HostSlots:
    """The host slots of one layer: w13_XHD / w2_XDF in host memory, local slots first_slot + x."""

    def __init__(self, w13_XHD: torch.Tensor, w2_XDF: torch.Tensor, first_slot: int, device: torch.device, path: ColdPath,
                 pool: StagingPool | None = None):
        pin = device.type == "cuda"
        self.w13_XHD = w13_XHD.cpu().contiguous()
        self.w2_XDF = w2_XDF.cpu().contiguous()
        if pin:
            self.w13_XHD, self.w2_XDF = self.w13_XHD.pin_memory(), self.w2_XDF.pin_memory()
        self.first_slot = first_slot
        self.device = device
        self.path = path
        # the worker's pool (one per worker: L layers must not each hold staging slots); its own without one
        self.pool = pool if pool is not None else StagingPool(min(path.fetch_slots, self.num_slots), device)
        self.counts = TierCounts()
        self._calibration = HostCalibration()

    @property
    def path(self) -> ColdPath:
        return self._path

    @path.setter
    def path(self, path: ColdPath) -> None:
        self._path = path
        self._calibration = HostCalibration()  # new rates: what was learnt of the old ones does not carry

    @property
    def num_slots(self) -> int:
        return self.w13_XHD.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13_XHD, self.w2_XDF))

    # ---- the layer step ----------------------------------------------------------------------
    def compute(self, tokens_MD: torch.Tensor, order_M: torch.Tensor, slot_offsets_S1: torch.Tensor,
                w13_BHD: torch.Tensor, w2_BDF: torch.Tensor, impl: str) -> torch.Tensor:
        """y_MD of every slot (device and host), the expert_mlp contract over all S_w slots."""
        first = self.first_slot
        # host sync: the host slots' row counts size the host work (one [S_w + 1] read per layer step)
        offsets = slot_offsets_S1.tolist()
        rows_X = np.diff(offsets[first:])
        cold_Y = order_M[offsets[first]:offsets[-1]]  # rows of the host slots, grouped by slot
        host_slots, fetch_slots = self._plan(rows_X, offsets[first]) if rows_X.sum() else ([], [])
        self.counts.add(rows_X, host_slots, fetch_slots)
        sent = None
        if host_slots:
            # gathered and on their way to the host before the device kernel is queued: the copy
            # then waits for nothing but this gather
            starts_X = np.concatenate([[0], np.cumsum(rows_X)])
            positions_Y = torch.cat([torch.arange(int(starts_X[x]), int(starts_X[x + 1])) for x in host_slots])
            rows_Y = cold_Y.index_select(0, self._to_device(positions_Y))
            sent = (rows_Y, self._send_rows(tokens_MD.index_select(0, rows_Y)))
        if first > 0 and offsets[first] > 0:
            y_MD = expert_mlp(tokens_MD, w13_BHD, w2_BDF, slot_offsets_S1[:first + 1], order_M[:offsets[first]], impl=impl)
        else:
            y_MD = torch.zeros_like(tokens_MD)
        if fetch_slots:
            self._add_fetched(y_MD, tokens_MD, cold_Y, rows_X, fetch_slots, impl)
        if sent is not None:
            rows_Y, x_host_YD = sent
            y_MD.index_copy_(0, rows_Y, self._back_from_host(x_host_YD, rows_X, host_slots))
        return y_MD

    def _plan(self, rows_X: np.ndarray, device_rows: int) -> tuple[list[int], list[int]]:
        """(host slots, fetched slots), indices into the host slots, touched ones only."""
        touched = [int(x) for x in np.flatnonzero(rows_X)]
        if self.path.mode == "host":
            return touched, []
        if self.path.mode == "fetch":
            return [], touched
        rates = self._calibration.rates(self.path.rates)
        fetch_X = split_cold(rows_X, rates, rates.device_floor_s + device_rows * rates.device_row_s)
        return [x for x in touched if not fetch_X[x]], [x for x in touched if fetch_X[x]]

    def _send_rows(self, x_YD: torch.Tensor) -> torch.Tensor:
        """The rows' copy in host memory (on a GPU: a pinned buffer filled on the rows stream, which
        waits only for what the main stream queued so far: the gather)."""
        if self.device.type != "cuda":
            return x_YD
        rows_stream, _ = self._cuda_streams()
        rows_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(rows_stream):
            x_host_YD = torch.empty(x_YD.shape, dtype=x_YD.dtype, pin_memory=True)
            x_host_YD.copy_(x_YD, non_blocking=True)
        x_YD.record_stream(rows_stream)
        return x_host_YD

    def _back_from_host(self, x_host_YD: torch.Tensor, rows_X: np.ndarray, slots: list[int]) -> torch.Tensor:
        """y_YD on the device of the host slots' rows (in `slots` order), computed on the host while
        the device runs the kernels queued before."""
        if self.device.type != "cuda":
            return self._host_math(x_host_YD, rows_X, slots)
        rows_stream, _ = self._cuda_streams()
        rows_stream.synchronize()  # host sync: the rows' copy only (the device kernel goes on)
        y_host_YD = self._host_math(x_host_YD, rows_X, slots, pin=True)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(rows_stream):
            y_YD = y_host_YD.to(self.device, non_blocking=True)
        main.wait_stream(rows_stream)
        y_YD.record_stream(main)
        return y_YD

    def _host_math(self, x_YD: torch.Tensor, rows_X: np.ndarray, slots: list[int], pin: bool = False) -> torch.Tensor:
        y_YD = torch.empty(x_YD.shape, dtype=x_YD.dtype, pin_memory=pin)
        start = time.perf_counter()
        at = 0
        for x in slots:
            n = int(rows_X[x])
            y_YD[at:at + n] = swiglu(x_YD[at:at + n], self.w13_XHD[x], self.w2_XDF[x])
            at += n
        took = time.perf_counter() - start
        self.counts.host_s += took
        if self.path.rates is not None:
            self._calibration.observe(self.path.rates, rows_X[slots], took)
        return y_YD

    def _add_fetched(self, y_MD: torch.Tensor, tokens_MD: torch.Tensor, cold_Y: torch.Tensor, rows_X: np.ndarray,
                     slots: list[int], impl: str) -> None:
        """Add to y_MD the fetched slots' rows: their weights copied to staging slots in rounds,
        round r + 1's copies in flight while round r computes."""
        w13_2GHD, w2_2GDF = self.pool.get(self.w13_XHD[0], self.w2_XDF[0])
        per_round = w13_2GHD.shape[1]
        starts_X = np.concatenate([[0], np.cumsum(rows_X)])
        cuda = self.device.type == "cuda"
        main = torch.cuda.current_stream(self.device) if cuda else None
        weights_stream = self._cuda_streams()[1] if cuda else None
        freed = self.pool.freed  # per buffer: the event after the last kernel that read it (any layer)
        for r, lo in enumerate(range(0, len(slots), per_round)):
            group = slots[lo:lo + per_round]
            buf = r % 2
            if cuda:
                with torch.cuda.stream(weights_stream):
                    if freed[buf] is not None:
                        weights_stream.wait_event(freed[buf])
                    for j, x in enumerate(group):
                        w13_2GHD[buf, j].copy_(self.w13_XHD[x], non_blocking=True)
                        w2_2GDF[buf, j].copy_(self.w2_XDF[x], non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(weights_stream)
                main.wait_event(ready)
            else:
                for j, x in enumerate(group):
                    w13_2GHD[buf, j].copy_(self.w13_XHD[x])
                    w2_2GDF[buf, j].copy_(self.w2_XDF[x])
            order_G = torch.cat([cold_Y[int(starts_X[x]):int(starts_X[x + 1])] for x in group])
            counts = [0] + [int(rows_X[x]) for x in group]
            offsets_G1 = self._to_device(torch.tensor(np.cumsum(counts), dtype=torch.int64))
            y_MD += expert_mlp(tokens_MD, w13_2GHD[buf, :len(group)], w2_2GDF[buf, :len(group)], offsets_G1, order_G, impl=impl)
            if cuda:
                freed[buf] = torch.cuda.Event()
                freed[buf].record(main)

    def _to_device(self, index_X: torch.Tensor) -> torch.Tensor:
        """A small host index on the device without waiting: a copy from pageable memory would
        first synchronise the stream (CUDA's rule), and the host could not compute its rows
        until every fetch queued before had landed. From pinned memory it is queued like a kernel."""
        if self.device.type != "cuda":
            return index_X
        return index_X.pin_memory().to(self.device, non_blocking=True)

    def _cuda_streams(self):
        return self.pool.cuda_streams()


def split_tiers(w13_SHD: torch.Tensor, w2_SDF: torch.Tensor, budget: int, device: torch.device,
                path: ColdPath | None, pool: StagingPool | None = None) -> tuple[torch.Tensor, torch.Tensor, HostSlots | None]:
    """A layer's S_w slot weights (any device) as (device w13_BHD, device w2_BDF, host slots or
    None): the first `budget` slots go to `device`, the rest to host memory. path None: no host tier."""
    if path is None or budget >= w13_SHD.shape[0]:
        return w13_SHD.to(device), w2_SDF.to(device), None
    host = HostSlots(w13_SHD[budget:], w2_SDF[budget:], budget, device, path, pool)
    return w13_SHD[:budget].to(device).clone(), w2_SDF[:budget].to(device).clone(), host
