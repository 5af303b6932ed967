"""The driver's scheduler: which worker owns each request, and what each worker runs per step.

Pure (no Ray, no torch): the driver loop hands it requests and step results, it hands back one
`StepPlan` per worker. Continuous batching: requests join between steps (prefilled while the
others decode) and leave as they finish.

Admission (FIFO): a waiting request goes to the worker that will process the fewest tokens this
step (prefills already planned + its running decodes: the data-parallel attention stays
balanced), ties broken by the fewest KV blocks reserved, then the lowest rank. It is admitted
only where its KV reservation fits (prompt + max_tokens, capped by the context limit), the worker
runs fewer than `max_num_seqs`, and the step's prefill budget `max_num_batched_tokens` is not
exceeded (a prompt larger than the budget runs alone). When the head of the queue fits nowhere,
it and everything behind it wait (no overtaking: a long request is never starved), so the KV
budget queues work instead of running out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeray.generation.blocks import blocks_needed
from moeray.generation.messages import NewSequence, StepPlan, StepResult
from moeray.generation.sampling import SamplingParams


@dataclass
class ScheduledRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    score: bool = False
    worker: int | None = None
    num_blocks: int = 0


@dataclass
class WorkerLoad:
    blocks_reserved: int = 0
    running: set[str] = field(default_factory=set)


class Scheduler:
    def __init__(self, num_workers: int, blocks_per_worker: int, block_size: int, max_model_len: int,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.blocks_per_worker = blocks_per_worker
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.workers = [WorkerLoad() for _ in range(num_workers)]
        self.waiting: list[ScheduledRequest] = []
        self.running: dict[str, ScheduledRequest] = {}
        self._aborts: list[list[str]] = [[] for _ in range(num_workers)]

    # ---- requests in -------------------------------------------------------------------------
    def reservation_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        return min(prompt_len + params.max_tokens, self.max_model_len)

    def check(self, prompt_len: int, params: SamplingParams, request_id: str = "") -> int:
        """KV blocks the request reserves, or ValueError when no worker could ever hold it."""
        need = blocks_needed(self.reservation_tokens(prompt_len, params), self.block_size)
        if need > self.blocks_per_worker:
            raise ValueError(
                f"request {request_id!r} needs {need} KV blocks ({prompt_len} prompt tokens + max_tokens="
                f"{params.max_tokens}) but a worker has only {self.blocks_per_worker}")
        return need

    def add(self, request_id: str, prompt_ids, params: SamplingParams, score: bool = False) -> None:
        if request_id in self.running or any(r.request_id == request_id for r in self.waiting):
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = tuple(int(t) for t in prompt_ids)
        need = self.check(len(prompt), params, request_id)
        self.waiting.append(ScheduledRequest(request_id, prompt, params, score, num_blocks=need))

    def abort(self, request_id: str) -> None:
        """Drop a request: from the queue, or from its worker at the next step."""
        self.waiting = [r for r in self.waiting if r.request_id != request_id]
        req = self.running.pop(request_id, None)
        if req is not None:
            self._aborts[req.worker].append(request_id)
            self._free(req)

    # ---- one step -----------------------------------------------------------------------------
    def plan(self) -> list[StepPlan]:
        num_workers = len(self.workers)
        new: list[list[NewSequence]] = [[] for _ in range(num_workers)]
        step_tokens = [len(w.running) for w in self.workers]  # one decode token per running sequence
        prefill_budget = self.max_num_batched_tokens
        while self.waiting:
            req = self.waiting[0]
            size = len(req.prompt_ids)
            if size > prefill_budget and prefill_budget < self.max_num_batched_tokens:
                break  # the step's prefill budget is spent: the rest wait for the next step
            fits = [w for w, load in enumerate(self.workers)
                    if load.blocks_reserved + req.num_blocks <= self.blocks_per_worker
                    and len(load.running) < self.max_num_seqs]
            if not fits:
                break
            worker = min(fits, key=lambda w: (step_tokens[w], self.workers[w].blocks_reserved, w))
            self.waiting.pop(0)
            req.worker = worker
            load = self.workers[worker]
            load.blocks_reserved += req.num_blocks
            load.running.add(req.request_id)
            self.running[req.request_id] = req
            new[worker].append(NewSequence(req.request_id, req.prompt_ids, req.params, req.num_blocks, req.score))
            step_tokens[worker] += size
            prefill_budget -= size
        aborts, self._aborts = self._aborts, [[] for _ in range(num_workers)]
        return [StepPlan(tuple(n), tuple(a)) for n, a in zip(new, aborts)]

    def update(self, results: list[StepResult]) -> None:
        """Release the requests that finished in this step (their blocks are free again)."""
        for result in results:
            for update in result.updates:
                if update.finish_reason is not None:
                    req = self.running.pop(update.request_id, None)
                    if req is not None:
                        self._free(req)

    def resize(self, num_workers: int) -> list[ScheduledRequest]:
        """The worker count changes (Engine.scale removes the highest ranks, adds new ones empty):
        requests running on removed workers go back to the front of the queue, oldest first;
        returns them so the driver can extend their prompts (they are re-prefilled elsewhere)."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        moved = [r for r in self.running.values() if r.worker >= num_workers]
        for req in moved:
            self._free(req)
            del self.running[req.request_id]
        self.workers = self.workers[:num_workers] + [WorkerLoad() for _ in range(num_workers - len(self.workers))]
        self._aborts = self._aborts[:num_workers] + [[] for _ in range(num_workers - len(self._aborts))]
        self.waiting = moved + self.waiting
        return moved

    def requeue_all(self) -> list[ScheduledRequest]:
        """After the workers lost their sequences (recovery): every running request goes back to the
        front of the queue, oldest first; returns them so the driver can extend their prompts."""
        lost = list(self.running.values())
        for req in lost:
            self._free(req)
        self.running.clear()
        self._aborts = [[] for _ in self.workers]
        self.waiting = lost + self.waiting
        return lost

    def _free(self, req: ScheduledRequest) -> None:
        load = self.workers[req.worker]
        load.blocks_reserved -= req.num_blocks
        load.running.discard(req.request_id)
        req.worker = None

    # ---- views ----------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or any(self._aborts))

    def kv_usage(self) -> list[float]:
        """Fraction of each worker's KV blocks reserved."""
        return [w.blocks_reserved / self.blocks_per_worker for w in self.workers]
