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
           the measured rates (few rows: host; many rows: fetch), weighed by what the layer's own
           steps showed; where it proposes a split and `tier.split_trial` is on (off by default),
           the worker's SplitTrial plays it or fetches everything, by which of the two has
           measured shorter (moeray.tier_calibration).
The device part (the resident slots' kernel, the fetch rounds: moeray.tier_launch.StepLaunches)
is queued before the host math, on this thread, or with `tier.launch_thread` on a GPU worker by
the worker's launch thread while this thread computes the host slots, so neither waits for the
other's CPU time; the results join before the combine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from moeray.host_math import HostMath
from moeray.kernels import expert_mlp
from moeray.tier_calibration import HostCalibration, LayerSpan, SplitTrial
from moeray.tier_config import HostTierConfig
from moeray.tier_counts import TierCounts
from moeray.tier_launch import StepLaunches
from moeray.tier_staging import Prefetch, StagingPool
from placement.tiering import TierRates, split_cold, split_cold_steps


@dataclass(frozen=True)
class PlannedStep:
    """What an auto layer step planned, read back when its measured length is known."""

    modelled_s: float  # the model's length of the step as played
    split: bool  # it leaves experts on the host
    fetch_all_s: float  # the model's length had it fetched every touched slot (the trial's yardstick)
    proposed: bool  # the model proposed a split: the trial's arms compare on this step
    bucket: int = 0  # the split trial's bucket of this step (SplitTrial.bucket of its rows)

    @property
    def overruled(self) -> bool:
        """The trial played fetch-everything where the model proposed a split."""
        return self.proposed and not self.split


@dataclass(frozen=True)
class ColdPath:
    """How one worker serves its host slots (shared by its layers)."""

    mode: str  # "host" | "fetch" | "auto"
    rates: TierRates | None  # measured on this worker (auto needs them)
    fetch_slots: int = 4
    prefetch: bool = False  # auto: queue the next layer's sure fetches behind this layer's copies
    # auto: host anything only where the modelled step is this much shorter than fetch-only
    host_margin: float = HostTierConfig.model_fields["host_margin"].default
    learn_split: bool = True  # auto: weigh host bets by the layer's measured steps (HostCalibration.split_bias)
    split_trial: bool = False  # auto: the worker's SplitTrial plays proposed splits or fetch-everything, by measure

    def __post_init__(self) -> None:
        if self.mode not in ("host", "fetch", "auto"):
            raise ValueError(f"cold path must be 'host', 'fetch' or 'auto', got {self.mode!r}")
        if self.mode == "auto" and self.rates is None:
            raise ValueError("cold path 'auto' needs measured TierRates")
        if not 0.0 <= self.host_margin < 1.0:
            raise ValueError(f"cold path host_margin must be in [0, 1), got {self.host_margin}")


def host_threads(configured: int | None, workers_on_node: int, launch_thread: bool = False) -> int:
    """A GPU worker's host compute threads: configured, else this process's CPUs shared by the
    workers, less one for the worker's launch thread (moeray.tier_launch, if it has one) where the
    share has two or more: with every CPU computing, the launch thread took a core from one of the
    host math's threads, and each parallel region waited for that one (an OLMoE layer step: 8.4 ms
    at 16 host threads against 7.6 ms at 15, one lease; fetch-only 7.7-7.9 ms)."""
    if configured is not None:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cpus // max(1, workers_on_node))
    return share - 1 if launch_thread and share >= 2 else share


class HostSlots:
    """The host slots of one layer: w13_XHD / w2_XDF in host memory, local slots first_slot + x."""

    def __init__(self, w13_XHD: torch.Tensor, w2_XDF: torch.Tensor, first_slot: int, device: torch.device, path: ColdPath,
                 pool: StagingPool | None = None, layer: int | None = None, trial: SplitTrial | None = None):
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
        self.trial = trial if trial is not None else SplitTrial()  # the worker's, shared by its layers; its own without one
        self._math = HostMath()  # its scratch rows: this layer's host math runs on one thread at a time
        self._share_X = None  # moving average of the share of this worker's rows each host slot gets
        if layer is not None:  # known to the pool: the layer before it can prefetch for it
            self.pool.register(layer, self)
        self.layer = layer

    @property
    def path(self) -> ColdPath:
        return self._path

    @path.setter
    def path(self, path: ColdPath) -> None:
        self._path = path
        self._calibration = HostCalibration()  # new rates: what was learnt of the old ones does not carry
        self._span = LayerSpan(self.device)  # a step timed under the old path is not read
        if hasattr(self, "pool"):
            self.pool.drop(self)

    def write(self, x: int, w13_HD: torch.Tensor, w2_DF: torch.Tensor) -> None:
        """Host slot x takes another expert's weights (a commit, between steps)."""
        self.pool.drop(self)  # a prefetch still reading this memory lands first, and is not used
        self.w13_XHD[x].copy_(w13_HD)
        self.w2_XDF[x].copy_(w2_DF)
        if self._share_X is not None:
            self._share_X[x] = 0.0  # another expert now: its share is learnt afresh

    @property
    def num_slots(self) -> int:
        return self.w13_XHD.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13_XHD, self.w2_XDF))

    @property
    def expert_bytes(self) -> int:
        """One slot's weights (what a fetch copies)."""
        return self.nbytes() // self.num_slots

    # ---- the layer step ----------------------------------------------------------------------
    def compute(self, tokens_MD: torch.Tensor, order_M: torch.Tensor, slot_offsets_S1: torch.Tensor,
                w13_BHD: torch.Tensor, w2_BDF: torch.Tensor, impl: str) -> torch.Tensor:
        """y_MD of every slot (device and host), the expert_mlp contract over all S_w slots."""
        first = self.first_slot
        # host sync: the host slots' row counts size the host work (one [S_w + 1] read per layer step)
        offsets = slot_offsets_S1.tolist()
        rows_X = np.diff(offsets[first:])
        cold_Y = order_M[offsets[first]:offsets[-1]]  # rows of the host slots, grouped by slot
        pending = self.pool.take(self)  # always: one queued for another layer is dropped here
        planned_X, busy_s, prefetched = rows_X, 0.0, []
        if pending is not None:
            # prefetched slots are on the device already: their rows run there, whatever the split
            # says, and their copies keep the device part busy (at most as long as fetched now)
            prefetched = [x for x in pending.slots if rows_X[x]]
            planned_X = rows_X.copy()
            planned_X[pending.slots] = 0
            if self.path.rates is not None:  # only auto splits by it
                busy_s = float(self.path.rates.fetch_costs(rows_X[pending.slots]).sum())
        planned = bool(planned_X.sum())
        # a step auto splits is timed, from here (its host sync) to its last result: one that plans
        # nothing (no host rows, or all prefetched) has no modelled length to learn against
        timed = planned and self.path.mode == "auto" and (self.path.learn_split or self.path.split_trial)
        if timed:
            self._span.begin()
        host_slots, fetch_slots, tag = self._plan(planned_X, offsets[first], busy_s) if planned else ([], [], None)
        fetch_slots = prefetched + fetch_slots
        self.counts.add(rows_X, host_slots, fetch_slots, pending.slots if pending is not None else (),
                        proposed=tag is not None and tag.proposed, overruled=tag is not None and tag.overruled)
        if self.path.prefetch:
            self._learn_shares(rows_X, offsets[-1])
        starts_X = np.concatenate([[0], np.cumsum(rows_X)])
        sent = None
        if host_slots:
            # every cold row goes to the host, gathered on the device before the kernels are queued:
            # no index has to come from the host first (a small copy that could queue behind
            # weight copies in the copy engine); the host picks its slots' rows there
            sent = self._send_rows(tokens_MD.index_select(0, cold_Y))
        device_started = time.perf_counter()  # the host part's start cost is counted from here
        rounds = self._fetch_rounds(rows_X, fetch_slots, pending) if fetch_slots or pending is not None else []

        def resident() -> torch.Tensor:
            if first > 0 and offsets[first] > 0:
                return expert_mlp(tokens_MD, w13_BHD, w2_BDF, slot_offsets_S1[:first + 1], order_M[:offsets[first]],
                                  impl=impl)
            return torch.zeros_like(tokens_MD)

        work = StepLaunches(self, resident, tokens_MD, cold_Y, starts_X, rounds, impl)
        launcher = self.pool.launch_thread() if sent is not None else None
        host_results = None  # (positions among the cold rows, y of those rows) of the host slots
        if launcher is None:  # nothing on the host, no launch thread (its default), or a CPU worker
            y_MD = work.run()
            if sent is not None:
                host_results = self._host_part(sent, starts_X, host_slots, device_started)
        else:
            with launcher.beside(work) as queued:  # the launches go on beside the host math
                host_results = self._host_part(sent, starts_X, host_slots, device_started)
            y_MD = queued.result()  # the launch thread is done with the main stream and the pool
        if host_results is not None:
            positions_Y, y_YD = host_results
            self._host_results_join(positions_Y, y_YD)
            y_MD.index_copy_(0, cold_Y.index_select(0, positions_Y), y_YD)
        if timed:
            measured = self._span.end(tag)
            if measured is not None:  # a GPU's: the layer's previous timed step
                seconds, done = measured
                if self.path.learn_split:
                    self._calibration.observe_step(seconds, done.modelled_s, done.split)
                if done.proposed and self.path.split_trial:
                    self.trial.observe(done.bucket, done.split, seconds, done.fetch_all_s)
        # last: behind every copy of this layer (its host rows' results too, which would otherwise
        # wait for the next layer's weights)
        self._prefetch_next(offsets[-1])
        return y_MD

    def _plan(self, rows_X: np.ndarray, device_rows: int, busy_s: float = 0.0) -> tuple[list[int], list[int], PlannedStep | None]:
        """(host slots, fetched slots, what auto planned: None in the other modes), indices into
        the host slots, touched ones only; busy_s: device time already committed this step
        (prefetched slots)."""
        touched = [int(x) for x in np.flatnonzero(rows_X)]
        if self.path.mode == "host":
            return touched, [], None
        if self.path.mode == "fetch":
            return [], touched, None
        rates = self._calibration.rates(self.path.rates)
        device_s = rates.device_floor_s + device_rows * rates.device_row_s + busy_s
        split = split_cold_steps(rows_X, rates, device_s, host_margin=self.path.host_margin, host_bias=self.split_bias)
        fetch_X = split.fetch_X
        proposed = bool(touched) and not fetch_X[touched].all()
        if not proposed:
            self._calibration.fade()  # nothing observed this step: what was learnt fades
        consult = proposed and self.path.split_trial
        bucket = SplitTrial.bucket(device_rows + int(rows_X.sum())) if consult else 0  # read only if consulted
        played = proposed and (not consult or self.trial.play_split(bucket))
        if proposed and not played:
            fetch_X = np.ones_like(fetch_X)  # the trial plays fetch-everything
        # fetch_all_s: the trial's yardstick, whichever arm plays
        return ([x for x in touched if not fetch_X[x]], [x for x in touched if fetch_X[x]],
                PlannedStep(split.step_s if played else split.fetch_all_s, played, split.fetch_all_s, proposed, bucket))

    @property
    def split_bias(self) -> float:
        """What this layer weighs host bets by now (1: nothing learnt, or learn_split off)."""
        return self._calibration.split_bias if self.path.learn_split else 1.0

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

    def _host_part(self, x_cold_host_YD: torch.Tensor, starts_X: np.ndarray, slots: list[int],
                   device_started: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions among the cold rows, y of those rows) of the host slots' rows (in `slots`
        order), computed on this thread (its torch CPU threads) while the device part is queued
        and runs; on a GPU both are on their way to the device on the rows stream (the main
        stream joins them in _host_results_join, once the launches are queued)."""
        rows_X = np.diff(starts_X)
        positions_Y = torch.from_numpy(np.concatenate([np.arange(starts_X[x], starts_X[x + 1]) for x in slots]))
        cuda = self.device.type == "cuda"
        y_host_YD = torch.empty((len(positions_Y), x_cold_host_YD.shape[1]), dtype=x_cold_host_YD.dtype,
                                pin_memory=cuda)
        if cuda:
            self._cuda_streams()[0].synchronize()  # host sync: the rows' copy only (the device kernels go on)
        # what held the host math back: the rows' trip (a CPU worker has none: no start cost there)
        start_s = time.perf_counter() - device_started if cuda else 0.0
        start = time.perf_counter()
        self._host_math(x_cold_host_YD, starts_X, slots, y_host_YD, 0)
        took = time.perf_counter() - start
        self.counts.host_s += took
        if self.path.rates is not None:
            self._calibration.observe(self.path.rates, rows_X[slots], took, start_s)
        if not cuda:
            return positions_Y, y_host_YD
        with torch.cuda.stream(self._cuda_streams()[0]):
            positions_dev_Y = positions_Y.pin_memory().to(self.device, non_blocking=True)
            y_YD = y_host_YD.to(self.device, non_blocking=True)
        return positions_dev_Y, y_YD

    def _host_results_join(self, positions_Y: torch.Tensor, y_YD: torch.Tensor) -> None:
        """The main stream waits for the host results' copy (queued on the rows stream)."""
        if self.device.type != "cuda":
            return
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self._cuda_streams()[0])
        y_YD.record_stream(main)
        positions_Y.record_stream(main)

    def _host_math(self, x_cold_YD: torch.Tensor, starts_X: np.ndarray, slots: list[int], out_YD: torch.Tensor,
                   at: int) -> int:
        """Write y of these host slots' rows (in `slots` order) into out_YD from row `at`, from the
        cold rows (grouped by slot); returns the row after the last written (padded shapes:
        moeray.host_math)."""
        return self._math.run(x_cold_YD, starts_X, slots, self.w13_XHD, self.w2_XDF, out_YD, at)

    def _fetch_rounds(self, rows_X: np.ndarray, slots: list[int], pending) -> list[tuple]:
        """The fetched slots in staging rounds [(slots in staging positions, copies, pending buffer
        or None)], at most a buffer's slots each. A prefetch for this layer is round 0: its
        positions keep their slots, one this step does not touch takes a slot still to fetch."""
        per_round = self.pool.slots
        rounds = []
        rest = [x for x in slots if pending is None or x not in pending.slots]
        if pending is not None:
            group, copies = list(pending.slots), []
            for j, x in enumerate(group):
                if not rows_X[x] and rest:
                    group[j] = rest.pop(0)
                    copies.append((j, group[j]))
            rounds.append((group, copies, pending.buffer))
        return rounds + [(rest[lo:lo + per_round], list(enumerate(rest[lo:lo + per_round])), None)
                         for lo in range(0, len(rest), per_round)]

    # ---- the prefetch for the next layer ------------------------------------------------------
    PREFETCH_TOUCH = 0.9  # prefetch only slots a step touches this surely (a wasted copy delays the next ones)

    def _learn_shares(self, rows_X: np.ndarray, worker_rows: int) -> None:
        share_X = rows_X / max(worker_rows, 1)
        self._share_X = share_X if self._share_X is None else 0.5 * self._share_X + 0.5 * share_X

    def predicted_fetches(self, worker_rows: int) -> list[int]:
        """The host slots this layer will most likely fetch at `worker_rows` rows (its learnt row
        shares; most rows first, at most a staging round): those split_cold fetches from the
        expected rows and that a step touches with probability >= PREFETCH_TOUCH."""
        if self.path.mode != "auto" or not self.path.prefetch or self._share_X is None:
            return []
        rates = self._calibration.rates(self.path.rates)
        mean_X = self._share_X * worker_rows
        device_s = rates.device_floor_s + max(worker_rows - mean_X.sum(), 0.0) * rates.device_row_s
        sure_X = split_cold(mean_X, rates, device_s, expected=True, host_margin=self.path.host_margin,
                            host_bias=self.split_bias) & \
            (-np.expm1(-mean_X) >= self.PREFETCH_TOUCH)
        order = [int(x) for x in np.lexsort((np.arange(len(mean_X)), -mean_X)) if sure_X[x]]
        return order[:self.pool.slots]

    def _prefetch_next(self, worker_rows: int) -> None:
        """Queue the next layer's likely fetches behind this layer's copies (the next layer of one
        step sees about as many rows: one batch)."""
        if self.layer is None or self.path.mode != "auto" or not self.path.prefetch:
            return
        following = self.pool.layer_after(self.layer)
        if following is None or self.pool.prefetched is not None:
            return
        slots = following.predicted_fetches(worker_rows)
        if slots:
            buffer, ready = self.pool.copy_round(following, list(enumerate(slots)))
            self.pool.prefetched = Prefetch(following, slots, buffer, ready)

    def _cuda_streams(self):
        return self.pool.cuda_streams()


def split_tiers(w13_SHD: torch.Tensor, w2_SDF: torch.Tensor, budget: int, device: torch.device,
                path: ColdPath | None, pool: StagingPool | None = None, layer: int | None = None,
                trial: SplitTrial | None = None) -> tuple[torch.Tensor, torch.Tensor, HostSlots | None]:
    """A layer's S_w slot weights (any device) as (device w13_BHD, device w2_BDF, host slots or
    None): the first `budget` slots go to `device`, the rest to host memory. path None: no host
    tier. `layer` registers the host slots with the pool, for the previous layer's prefetch;
    `trial`: the worker's split trial (the layer's own without one)."""
    if path is None or budget >= w13_SHD.shape[0]:
        return w13_SHD.to(device), w2_SDF.to(device), None
    host = HostSlots(w13_SHD[budget:], w2_SDF[budget:], budget, device, path, pool, layer, trial)
    w13_BHD, w2_BDF = w13_SHD[:budget].to(device).clone(), w2_SDF[:budget].to(device).clone()
    if device.type == "cuda" and budget > 0:
        # the resident kernel's tiles at B slots, compiled now (once a process per shape: Triton
        # caches them): live tiering makes the device slots the hot ones, and a tile first picked
        # mid-run costs about a second of one step (measured: OLMoE, budget 16, decode 64 ran at
        # 0.38-0.43 of fetch over the run and 0.87-0.99 in its second half on four leases)
        from moeray.kernels.triton_swiglu import compile_tiles

        compile_tiles(w13_BHD, w2_BDF)
    return w13_BHD, w2_BDF, host
