"""The worker's own step loop: each worker steps its sequences without waiting for the driver.

With the driver on the per-token path, every decode step paid a Ray round trip (driver -> every
worker -> driver: 2.0-2.5 ms on one H200, more than the whole captured step at batch 1; see
docs/benchmarks/generate.md). Here the driver only sends numbered messages (admissions, aborts, a
commit or a statistics flush request, a stop) and long-polls for output; the workers keep
stepping while any of them has work.

Lockstep with several workers: every iteration starts with ONE small all-reduce (MAX) of

    [has_work, seen, -seen, -commit_version, -flushes_requested, -stop]

where `seen` is the highest message number this worker holds without a gap. Every worker gets the
same answer, so all decide alike: step (some worker has work; an idle one joins with zero rows),
commit a staged placement (once EVERY worker holds the request: the minimum), ship a statistics
snapshot at the same step (the coordinator pairs snapshots by step range), stop, or go idle. A
worker goes idle only when no worker has work and all have seen the same messages; the driver sends
every message to every worker, so the next message wakes all of them and none is left waiting
alone in a collective. One worker needs no collective.

Messages may run out of order on the actor's threads: they are numbered and taken without gaps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from ray.util.collective.types import ReduceOp

from moeray.comm import group as collective
from moeray.generation.messages import NewSequence, SequenceUpdate, StepPlan, StepResult

_IDLE_WAKE_S = 1.0  # an idle loop re-checks for an abandon request at least this often


@dataclass(frozen=True)
class LoopMessage:
    """One driver message; message `number` goes to every worker (with that worker's plan)."""

    number: int
    plan: StepPlan = StepPlan()
    commit_version: int | None = None  # commit this staged placement once every worker holds the request
    flush: bool = False  # ship the statistics counted so far, at the same step on every worker
    stop: bool = False  # leave the loop once every worker holds it
    generation: int = 0  # which of the driver's loop starts it belongs to


@dataclass(frozen=True)
class LoopReport:
    """What a worker produced since the driver's last drain."""

    result: StepResult  # updates merged per sequence (token ids in order)
    steps: int  # steps this worker has run in all
    version: int  # placement version it runs now
    commits: tuple[tuple[int, int], ...] = ()  # (version, step it was committed before)
    flushes_done: int = 0
    snapshot_refs: tuple = ()  # coordinator reports shipped by flushes, to wait on
    step_ms: float = 0.0  # time inside steps since the last drain (benchmarks)
    steps_run: int = 0  # steps since the last drain
    error: BaseException | None = None  # the loop ended with this
    ended: bool = False


def merge_updates(updates: list[SequenceUpdate]) -> tuple[SequenceUpdate, ...]:
    """Consecutive steps' updates of one sequence as one (token ids and logprobs in order)."""
    merged: dict[str, SequenceUpdate] = {}
    for u in updates:
        prev = merged.get(u.request_id)
        if prev is None:
            merged[u.request_id] = u
            continue
        merged[u.request_id] = SequenceUpdate(
            u.request_id, prev.token_ids + u.token_ids, prev.logprobs + u.logprobs, u.finish_reason,
            u.prompt_logits_TV if u.prompt_logits_TV is not None else prev.prompt_logits_TV)
    return tuple(merged.values())


@dataclass
class _Outbox:
    updates: list[SequenceUpdate] = field(default_factory=list)
    commits: list[tuple[int, int]] = field(default_factory=list)
    snapshot_refs: list = field(default_factory=list)
    step_ms: float = 0.0
    steps_run: int = 0
    flushed: bool = False  # a flush was done (it may have had nothing to ship)

    def __bool__(self) -> bool:
        return bool(self.updates or self.commits or self.snapshot_refs or self.flushed)

    def add(self, other: _Outbox) -> None:
        self.updates += other.updates
        self.commits += other.commits
        self.snapshot_refs += other.snapshot_refs
        self.step_ms += other.step_ms
        self.steps_run += other.steps_run
        self.flushed = self.flushed or other.flushed


class WorkerLoop:
    """Runs on its own thread inside a Worker; the actor's other threads call submit / drain / stop."""

    def __init__(self, worker, generation: int = 0):
        self.worker = worker
        self.generation = generation
        self._group = collective.get_group(worker.group_name) if worker.placement.num_workers > 1 else None
        self._cond = threading.Condition()
        self._inbox: dict[int, LoopMessage] = {}
        self._seen = 0
        self._pending_new: list[NewSequence] = []
        self._pending_abort: list[str] = []
        self._commit_requested = worker.placement.version
        self._flushes_requested = 0
        self._flushes_done = 0
        self._stop_requested = False
        self._abandon = False  # leave at once, without agreement (recovery: a peer is gone)
        self._outbox = _Outbox()
        self._error: BaseException | None = None
        self._ended = False
        self._thread = threading.Thread(target=self._run, name=f"moeray-loop-{worker.rank}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- called from other actor threads ----------------------------------------------------
    def submit(self, message: LoopMessage) -> None:
        with self._cond:
            self._inbox[message.number] = message
            self._cond.notify_all()

    def drain(self, timeout_s: float) -> LoopReport:
        """Everything since the last drain; waits up to timeout_s for something to report."""
        with self._cond:
            self._cond.wait_for(lambda: self._outbox or self._ended, timeout_s)
            box, self._outbox = self._outbox, _Outbox()
            worker = self.worker
            result = StepResult(merge_updates(box.updates), len(worker.runner.sequences), worker.runner.allocator.num_used,
                                0)
            return LoopReport(result, worker.steps, worker.placement.version, tuple(box.commits), self._flushes_done,
                              tuple(box.snapshot_refs), box.step_ms, box.steps_run, self._error, self._ended)

    def abandon(self, timeout_s: float) -> bool:
        """Leave now, without the others (a peer is gone); True once the loop thread has ended.
        A loop inside a collective leaves when it raises (a dead peer: at once; a silent one: by
        the collective timeout)."""
        with self._cond:
            self._abandon = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.worker.device.type == "cuda":
            torch.cuda.set_device(self.worker.device)  # the current device is per thread
        agreed_stop = False
        try:
            while self._iterate():
                pass
            agreed_stop = not self._abandon
        except BaseException as exc:  # reported to the driver by the next drain
            self._error = exc
        finally:
            if not agreed_stop and self._group is not None:
                # Leaving alone (an error, or abandoned for a recovery): the peers may be waiting in
                # a collective for this worker; ending the group makes them raise at once instead
                # of after the collective timeout. recover() forms the next epoch's group.
                try:
                    self.worker.leave_group()
                except Exception:
                    pass
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _take_messages(self) -> None:
        """Apply messages in number order, without gaps (the caller holds the condition)."""
        while self._seen + 1 in self._inbox:
            self._seen += 1
            message = self._inbox.pop(self._seen)
            # In message order: an abort of a sequence that has not joined yet cancels its
            # admission (it never runs); any other abort reaches the runner before the admissions
            # that came after it (a request id may be reused after its abort).
            for request_id in message.plan.abort:
                waiting = [n for n in self._pending_new if n.request_id == request_id]
                if waiting:
                    self._pending_new.remove(waiting[0])
                else:
                    self._pending_abort.append(request_id)
            self._pending_new.extend(message.plan.new)
            if message.commit_version is not None:
                self._commit_requested = max(self._commit_requested, message.commit_version)
            self._flushes_requested += int(message.flush)
            self._stop_requested = self._stop_requested or message.stop

    def _agree(self, local: list[int]) -> list[int]:
        """The element-wise MAX over workers (one tiny all-reduce; host sync on GPUs: its result
        decides what every worker does next)."""
        if self._group is None:
            return local
        tensor = torch.tensor(local, dtype=torch.int64, device=self._group.DEVICE)
        self._group.allreduce(tensor, _MaxOptions)
        return tensor.tolist()

    def _iterate(self) -> bool:
        worker = self.worker
        with self._cond:
            if self._abandon:
                return False
            self._take_messages()
            has_work = bool(worker.runner.sequences or self._pending_new or self._pending_abort)
            local = [int(has_work), self._seen, -self._seen, -self._commit_requested, -self._flushes_requested,
                     -int(self._stop_requested)]
        agreed = self._agree(local)
        any_work, all_seen = agreed[0] > 0, agreed[1] == -agreed[2]
        commit_version, flushes, stop = -agreed[3], -agreed[4], -agreed[5] > 0
        box = _Outbox()
        with worker._step_lock:
            if commit_version > worker.placement.version:
                worker._commit(commit_version)
                box.commits.append((commit_version, worker.steps))
            if flushes > self._flushes_done:
                box.flushed = True
                ref = worker._ship_snapshot() if worker.coordinator is not None else None
                if ref is not None:
                    box.snapshot_refs.append(ref)
            if any_work and not stop:
                start = time.perf_counter()
                result = worker.run_step(self._take_plan())
                box.updates.extend(result.updates)
                box.step_ms, box.steps_run = 1e3 * (time.perf_counter() - start), 1
        with self._cond:
            self._flushes_done = max(self._flushes_done, flushes)
            self._outbox.add(box)
            if box:
                self._cond.notify_all()
            if stop:
                plan = StepPlan(tuple(self._pending_new), tuple(self._pending_abort))
                self._pending_new, self._pending_abort = [], []
        if stop:
            self._keep_pending(plan)
            return False
        with self._cond:
            if not any_work and all_seen:  # everyone idle and up to date: wait for the next message
                while self._seen + 1 not in self._inbox and not self._abandon:
                    self._cond.wait(_IDLE_WAKE_S)
        return True

    def _keep_pending(self, plan: StepPlan) -> None:
        """Leaving on an agreed stop (a scale): admissions and aborts that arrived but did not run
        yet go to the runner now, so the next loop prefills those sequences (the driver counts
        them as running on this worker)."""
        with self.worker._step_lock:
            self.worker.runner.apply(plan)

    def _take_plan(self) -> StepPlan:
        """Aborts, and the admissions that fit the step's prefill budget (the first always does)."""
        budget = self.worker.config.cache.max_num_batched_tokens
        with self._cond:
            aborts, self._pending_abort = self._pending_abort, []  # applied before the admissions
            admit: list[NewSequence] = []
            while self._pending_new:
                size = len(self._pending_new[0].prompt_ids)
                if admit and size > budget:
                    break
                admit.append(self._pending_new.pop(0))
                budget -= size
        return StepPlan(tuple(admit), tuple(aborts))


class _MaxOptions:
    reduceOp = ReduceOp.MAX
