"""What the service does with requests, without the web framework.

`EngineLoop` owns the generation driver on one thread: it admits requests between steps and runs
steps while any request is in flight (continuous batching: a request joins at the next step and
leaves when it finishes), and runs other engine calls (stats, rebalance, health) between steps, so
the engine is never entered twice. The event loop only queues work and awaits futures.

Legend: T tokens of one request, V vocabulary, P top log-probs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np

from moeray.errors import CollectiveError, WorkerLost
from moeray.generation.driver import GenerationDriver
from moeray.generation.outputs import RequestOutput
from moeray.generation.sampling import SamplingParams


class RequestRejected(Exception):
    """A request the service will not run; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def check_request_size(token_ids: list[int], max_tokens: int) -> None:
    if len(token_ids) > max_tokens:
        raise RequestRejected(413, f"{len(token_ids)} tokens > max_tokens_per_request={max_tokens}")


@dataclass(frozen=True)
class ForwardResult:
    next_token_ids: list[int]
    top_logprobs: list[list[tuple[int, float]]] | None


def forward_result(logits_TV: np.ndarray, top_logprobs: int) -> ForwardResult:
    """Greedy next token per position, and optionally the P most likely with log-probabilities."""
    logits_TV = logits_TV.astype(np.float64)
    next_ids = logits_TV.argmax(axis=1).tolist()
    if top_logprobs == 0:
        return ForwardResult(next_ids, None)
    shifted_TV = logits_TV - logits_TV.max(axis=1, keepdims=True)
    logprobs_TV = shifted_TV - np.log(np.exp(shifted_TV).sum(axis=1, keepdims=True))
    top_TP = np.argsort(-logprobs_TV, axis=1, kind="stable")[:, :top_logprobs]
    rows = [[(int(v), float(logprobs_TV[t, v])) for v in top_TP[t]] for t in range(len(top_TP))]
    return ForwardResult(next_ids, rows)


class EngineLoop:
    """The one thread that touches the engine. `submit` queues a request and resolves with its
    final RequestOutput; `call(fn)` runs fn(engine) between steps."""

    def __init__(self, driver: GenerationDriver):
        self.driver = driver
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: dict[str, Future] = {}
        self._stopped = threading.Event()
        self.steps = 0
        self.largest_step = 0  # most requests in flight in one step
        self._thread = threading.Thread(target=self._run, name="moeray-engine-loop", daemon=True)
        self._thread.start()

    async def submit(self, prompt, params: SamplingParams, score: bool = False) -> RequestOutput:
        future: Future = Future()
        self._inbox.put(("request", (prompt, params, score), future))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client went away: free its sequence
            if getattr(future, "request_id", None) is not None:
                self._inbox.put(("abort", future.request_id, Future()))
            raise

    async def call(self, fn, *args):
        future: Future = Future()
        self._inbox.put(("call", (fn, args), future))
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop", None, Future()))
        self._thread.join(timeout=30)

    # ---- the loop thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            busy = self.driver.has_unfinished()
            try:
                # idle: wait for work; busy: take what is there and step (never wait)
                item = self._inbox.get(timeout=1.0) if not busy else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            if item is not None:
                self._handle(item)
                while True:  # everything that arrived during the last step joins the next one
                    try:
                        self._handle(self._inbox.get_nowait())
                    except queue.Empty:
                        break
            if self.driver.has_unfinished():
                self._step()

    @staticmethod
    def _resolve(future: Future, result=None, error: BaseException | None = None) -> None:
        """Hand a result over unless the caller gave up (a cancelled future refuses results)."""
        if future.done():
            return
        try:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        except InvalidStateError:  # cancelled between the check and the set
            pass

    def _handle(self, item) -> None:
        kind, payload, future = item
        if kind == "request":
            if future.cancelled():  # the client went away before its request was admitted
                return
            prompt, params, score = payload
            try:
                request_id = self.driver.add_request(prompt, params, score=score)
            except (ValueError, TypeError) as exc:
                self._resolve(future, error=RequestRejected(400, str(exc)))
                return
            future.request_id = request_id
            self._waiting[request_id] = future
        elif kind == "abort":
            self.driver.abort(payload)
            self._waiting.pop(payload, None)
        elif kind == "call":
            fn, args = payload
            try:
                self._resolve(future, fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                self._resolve(future, error=exc)

    def _step(self) -> None:
        engine = self.driver.engine
        try:
            if not engine.healthy:  # an earlier recovery failed: try again before stepping
                engine.recover()
            outputs = self.driver.step()
        except Exception as exc:  # noqa: BLE001 - the step or its recovery failed: fail what is in flight, keep serving
            error = exc if isinstance(exc, (WorkerLost, CollectiveError)) else WorkerLost(
                f"engine step failed: {type(exc).__name__}: {exc}")
            for request_id, future in list(self._waiting.items()):
                self.driver.abort(request_id)
                self._resolve(future, error=error)
            self._waiting.clear()
            return
        self.steps += 1
        self.largest_step = max(self.largest_step, len(self._waiting))
        for out in outputs:
            if out.finished:
                future = self._waiting.pop(out.request_id, None)
                if future is not None:
                    self._resolve(future, out)
