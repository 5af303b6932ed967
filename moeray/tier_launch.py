"""A host-tier layer step's device work (issue 13): the resident slots' kernel and the fetch
rounds (copies into staging, kernels) as launches in queue order, and the thread that queues them
on a GPU worker while the calling thread computes the host slots.

Legend: M rows this worker received, D hidden, X host slots of the layer, Y rows of the host slots,
G staging slots of a round, R rows of a round's slots.

Why a thread: queueing one fetch round is ~0.65 ms of CPU time (eight copies, two Triton
launches, offsets, an add; profiled on one H200), about what the host math of two or three
OLMoE experts costs. On one thread the two add up: an OLMoE decode layer step with 12 host and 17
fetched experts took 8.5 ms against 7.55 ms for fetching all 29 (measured at 03e9168: about
1.5 ms before the host math, 4.4 ms of host math, 2.7 ms of launches, one after another). On the
launch thread the launches leave the host math's thread; the host math itself stays on the
calling thread, whose torch CPU threads it uses (on a second thread the host math ran at half
speed, measured at 7271b80). The launch thread's work is the small CPU ops of the launches and
the CUDA calls; torch releases the GIL inside its ops, so the two threads interleave there. But a
thread that wants the GIL back after an op waits until the holder releases it in one of its own
ops, or until Python's switch interval (5 ms) forces a switch; at 5 ms the host math of an OLMoE
decode step slowed about 6x and the first weight copy came 2-4 ms after the host math began
(profiled at e649918). So while a step's launches run, the switch interval is short
(`switch_interval_s`), and restored after. The thread is optional (`tier.launch_thread`, off
by default): it shortened the isolated layer step on one lease, and its one whole-run comparison
was confounded (docs/benchmarks/tier.md).
"""

from __future__ import annotations

import contextlib
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from moeray.kernels import expert_mlp


def index_to_device(index_X: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host index on the device without waiting: a copy from pageable memory would first
    synchronise the stream (CUDA's rule), and the host could not compute its rows until every
    fetch queued before had landed. From pinned memory it is queued like a kernel."""
    if device.type != "cuda":
        return index_X
    return index_X.pin_memory().to(device, non_blocking=True)


class StepLaunches:
    """One layer step's device work as launches in queue order (`run()` queues them all), and
    y_MD once queued.

    Order: the first two rounds' copies (the staging pool's two buffers), so the PCIe link starts
    at once; the resident slots' kernel, which makes y_MD; then each round's kernel followed by the
    copies of the round two after it, which may be queued only once that kernel is (it last read
    their buffer: StagingPool). `host` is the layer's HostSlots (its pool, its device); `rounds`
    are HostSlots._fetch_rounds'."""

    def __init__(self, host, resident, tokens_MD: torch.Tensor, cold_Y: torch.Tensor, starts_X: np.ndarray,
                 rounds: list, impl: str):
        self.host, self.resident, self.tokens_MD, self.cold_Y = host, resident, tokens_MD, cold_Y
        self.starts_X, self.rounds, self.impl = starts_X, rounds, impl
        self.y_MD = None
        self.queued = {}  # round -> (staging buffer, ready event or None) of its queued copies
        self.in_order = [lambda r=r: self._copies(r) for r in range(min(2, len(rounds)))] + [self._resident]
        for r in range(len(rounds)):
            self.in_order.append(lambda r=r: self._kernel(r))
            if r + 2 < len(rounds):
                self.in_order.append(lambda r=r: self._copies(r + 2))

    def run(self) -> torch.Tensor:
        for launch in self.in_order:
            launch()
        return self.y_MD

    def _resident(self) -> None:
        self.y_MD = self.resident()

    def _copies(self, r: int) -> None:
        _, copy_list, buffer = self.rounds[r]
        # on a GPU `ready` follows every copy queued before on the weights stream: a prefetch's too
        self.queued[r] = self.host.pool.copy_round(self.host, copy_list, buffer)

    def _kernel(self, r: int) -> None:
        host, group, (buffer, ready) = self.host, self.rounds[r][0], self.queued[r]
        starts_X = self.starts_X
        order_R = torch.cat([self.cold_Y[int(starts_X[x]):int(starts_X[x + 1])] for x in group])
        if order_R.numel():  # a prefetch none of whose slots this step touches: no kernel, no wait
            if ready is not None:
                torch.cuda.current_stream(host.device).wait_event(ready)
            w13_2GHD, w2_2GDF = host.pool.buffers
            counts = [0] + [int(starts_X[x + 1] - starts_X[x]) for x in group]  # an untouched prefetched slot: 0
            offsets_G1 = index_to_device(torch.tensor(np.cumsum(counts), dtype=torch.int64), host.device)
            self.y_MD += expert_mlp(self.tokens_MD, w13_2GHD[buffer, :len(group)], w2_2GDF[buffer, :len(group)],
                                    offsets_G1, order_R, impl=self.impl)
        host.pool.read_by_main(buffer)


class LaunchThread:
    """One thread per worker that runs a step's launches (StepLaunches.run) on the caller's
    stream, device, grad and inference mode (all four are per thread in torch), one step at a
    time. The caller waits for the returned future before it touches y_MD, the staging pool or
    the main stream again: until then the launches own them. Python's switch interval is per
    process: `beside` sets and restores it, so one threaded pool per process (a worker is one)."""

    # Python's switch interval while launches run beside the host math; an OLMoE layer step at 15
    # host threads (one lease, one sample each, ~0.5 ms of noise): 6.8 ms at 1e-5, 8.3 at 1e-4,
    # 7.7 at Python's 5e-3, 8.6 inline; fetch-only 7.7
    SWITCH_INTERVAL_S = 1e-5

    def __init__(self, device: torch.device, switch_interval_s: float | None = SWITCH_INTERVAL_S):
        self.device = device
        self.switch_interval_s = switch_interval_s  # None: leave Python's as it is
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeray-tier-launch")

    def start(self, launches: StepLaunches) -> Future:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if cuda else None
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def run() -> torch.Tensor:
            with contextlib.ExitStack() as modes:
                modes.enter_context(torch.inference_mode(inference))
                modes.enter_context(torch.set_grad_enabled(grad))
                if cuda:
                    modes.enter_context(torch.cuda.device(self.device))
                    modes.enter_context(torch.cuda.stream(stream))
                return launches.run()

        return self._executor.submit(run)

    @contextlib.contextmanager
    def beside(self, launches: StepLaunches):
        """`with thread.beside(work) as queued:` the launches run while the body does (the host
        math); leaving waits for them (their errors raise there), and the switch interval is
        Python's again. `queued.result()` is y_MD."""
        previous = sys.getswitchinterval()
        if self.switch_interval_s is not None:
            sys.setswitchinterval(self.switch_interval_s)
        try:
            queued = self.start(launches)
            try:
                yield queued
            finally:
                queued.result()
        finally:
            sys.setswitchinterval(previous)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
