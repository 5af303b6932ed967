"""The driver's side of the worker step loops (moeray/worker_loop.py).

    loops = LoopClient(engine)
    loops.start()                          # every worker starts its own loop thread
    loops.send(plans)                      # admissions / aborts, one numbered message to every worker
    reports = loops.poll(timeout_s)        # what the workers produced meanwhile (long-poll drains)
    loops.stop()                           # leave the loops (recovery, shutdown)

The driver is off the per-token path: the workers step while any of them has work, and the driver
collects their output whenever it comes. One drain call per worker is always outstanding; a drain
that fails means the worker died (WorkerLost), a report with an error means its loop ended on it
(CollectiveError when a peer is gone).

Placement commits go through the loops as well: a placement staged on every worker is sent as a
commit request, the workers switch at the same step once all of them hold it, and the engine
adopts it at the first report of the switch (the all-reduce makes it one decision for all).
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError

from moeray.errors import WorkerLost
from moeray.generation.messages import StepPlan
from moeray.worker_loop import LoopMessage, LoopReport

_DRAIN_WAIT_S = 1.0  # a worker's drain returns at least this often, with or without output
_STOP_MARGIN_S = 10.0


class LoopClient:
    def __init__(self, engine):
        self.engine = engine
        self.running = False
        self._number = 0
        self._generation = 0  # one per start(): messages and drains of an earlier loop are ignored
        self._drains: dict[int, ray.ObjectRef] = {}
        self._buffer: list[LoopReport] = []
        self._flushes_sent = 0
        self._commit: dict | None = None  # the staged placement a commit request went out for

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        engine = self.engine
        if not engine.healthy:
            raise WorkerLost("a previous step failed: call recover() before starting the worker loops")
        self._generation += 1
        self.running = True  # from here on stop() must run even if a worker fails to start its loop
        engine._get([w.start_loop.remote(self._generation) for w in engine.workers], 60, "start worker loops")
        self._number = 0
        self._flushes_sent = 0
        self._buffer = []
        self._commit = None
        self._drains = {rank: w.loop_drain.remote(self._generation, _DRAIN_WAIT_S) for rank, w in enumerate(engine.workers)}

    def stop(self) -> None:
        """Leave every loop now (bounded by the collective timeout: a loop inside a collective
        leaves when it raises). Errors are ignored: a dead worker has no loop to stop."""
        timeout = self.engine.config.parallel.collective_timeout_s + _STOP_MARGIN_S
        refs = [w.stop_loop.remote(timeout) for w in self.engine.workers]
        for ref in refs:
            try:
                ray.get(ref, timeout=timeout + _STOP_MARGIN_S)
            except Exception:
                pass
        self.running = False
        self._drains = {}
        self._buffer = []
        self._commit = None  # its switch was never reported: recover() adopts it (engine._committing)

    def finish(self) -> list[LoopReport]:
        """Every loop leaves at the same step (a stop message, agreed like a commit), so the
        sequences stay consistent on their workers; returns all output not collected yet."""
        self.send(stop=True)
        reports, self._buffer = self._buffer, []
        timeout = self.engine.config.parallel.collective_timeout_s + _STOP_MARGIN_S
        for rank in range(len(self.engine.workers)):
            while True:
                report = self._collect_one(rank, timeout, final=True)
                reports.append(report)
                if report.ended:
                    break
        self.stop()
        return reports

    # ---- messages out -----------------------------------------------------------------------------
    def send(self, plans: list[StepPlan] | None = None, commit_version: int | None = None, flush: bool = False,
             stop: bool = False) -> None:
        """One numbered message to every worker (worker w gets plans[w])."""
        self._number += 1
        workers = self.engine.workers
        plans = plans if plans is not None else [StepPlan()] * len(workers)
        if len(plans) != len(workers):
            raise ValueError(f"{len(plans)} plans for {len(workers)} workers")
        for worker, plan in zip(workers, plans):
            worker.loop_submit.remote(LoopMessage(self._number, plan, commit_version=commit_version, flush=flush, stop=stop,
                                                 generation=self._generation))

    def send_step(self, plans: list[StepPlan]) -> None:
        """The scheduler's admissions and aborts, and a commit request for a placement the engine
        has staged; nothing when there is neither."""
        engine = self.engine
        commit_version = None
        if engine._staged is not None and self._commit is None:
            self._commit = engine.take_staged()
            commit_version = self._commit["version"]
        if commit_version is not None or any(p.new or p.abort for p in plans):
            self.send(plans, commit_version)

    # ---- output in --------------------------------------------------------------------------------
    def poll(self, timeout_s: float) -> list[LoopReport]:
        """Reports that arrived within timeout_s (returns at the first one; [] if none)."""
        reports, self._buffer = self._buffer, []
        if not reports:
            reports = self._collect(timeout_s)
        return reports

    def _collect(self, timeout_s: float) -> list[LoopReport]:
        refs = list(self._drains.values())
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready:  # everything else that is ready too, without waiting
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready_ids = {ref.hex() for ref in ready}
        reports = [self._collect_one(rank) for rank, ref in list(self._drains.items()) if ref.hex() in ready_ids]
        if reports and self.engine.coordinator is not None and self.engine.config.coordinator_ticks:
            self.engine.poll_rebalance()  # once per collection, not per report
        return reports

    def _bookkeep(self, rank: int, report: LoopReport) -> None:
        engine = self.engine
        engine.steps = max(engine.steps, report.steps)
        for version, step in report.commits:
            # The switch is agreed by the all-reduce (every worker commits in the same iteration),
            # so one worker's report stands for all; a worker lost before switching is replaced on
            # the adopted placement by recover().
            if self._commit is not None and version == self._commit["version"]:
                staged, self._commit = self._commit, None
                engine.committed(staged, step)

    def flush(self) -> None:
        """Every worker ships its statistics at the same step; returns once the coordinator has
        them. Reports that arrive meanwhile are kept for the next poll."""
        self.send(flush=True)
        self._flushes_sent += 1
        target, done = self._flushes_sent, set()
        deadline = time.monotonic() + self.engine.config.parallel.collective_timeout_s + _STOP_MARGIN_S
        snapshot_refs = []
        while len(done) < len(self.engine.workers):
            if time.monotonic() > deadline:
                raise WorkerLost("statistics flush: not every worker answered within the collective timeout")
            ranks = {ref.hex(): rank for rank, ref in self._drains.items()}
            ready, _ = ray.wait(list(self._drains.values()), num_returns=1, timeout=1.0)
            for ref in ready:
                rank = ranks[ref.hex()]
                report = self._collect_one(rank)
                self._buffer.append(report)
                snapshot_refs += list(report.snapshot_refs)
                if report.flushes_done >= target:
                    done.add(rank)
        ray.get(snapshot_refs, timeout=60)

    def _collect_one(self, rank: int, timeout_s: float | None = None, final: bool = False) -> LoopReport:
        """Worker `rank`'s ready (or, with timeout_s, awaited) report; the next drain is issued
        unless the loop ended. A dead worker or a loop that ended on an error (or, unless `final`,
        at all) marks the engine unhealthy and raises."""
        try:
            report = ray.get(self._drains[rank], timeout=timeout_s)
        except RayActorError as exc:
            self.engine.healthy = False
            raise WorkerLost(f"worker {rank} died: {str(exc)[:200]}") from exc
        if report.error is not None or (report.ended and not final):
            self.engine.healthy = False
            raise report.error if report.error is not None else WorkerLost(f"worker {rank}'s step loop ended")
        if not report.ended:
            self._drains[rank] = self.engine.workers[rank].loop_drain.remote(self._generation, _DRAIN_WAIT_S)
        self._bookkeep(rank, report)
        return report
