"""What the service does with requests, without the web framework.

`EngineLoop` owns the generation driver on one thread: it admits requests between steps, runs
steps while any request is in flight (continuous batching: a request joins at the next step and
leaves when it finishes), and runs other engine calls (placement, metrics, rebalance, health)
between steps, so the engine is never entered twice. The event loop only queues work and reads
`RequestStream`s, which the loop thread feeds with each step's outputs.

`StreamCursor` turns the driver's cumulative outputs into the deltas a streaming client gets
(chat messages become a prompt in serving/chat_template.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError

from moeray.errors import CollectiveError, WorkerLost
from moeray.generation.driver import GenerationDriver
from moeray.generation.outputs import CompletionOutput, RequestOutput
from moeray.generation.sampling import SamplingParams

log = logging.getLogger(__name__)

_MEMBERSHIP_POLL_S = 0.05  # how often an idle loop looks at workers that are starting (a scale up)
_ADMITTED = object()  # the first item of a stream whose requests all joined the scheduler


class RequestRejected(Exception):
    """A request the service will not run; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class PortInUse(RuntimeError):
    pass


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUse when something listens on host:port. Serve's proxy binds with SO_REUSEPORT,
    so a second service would bind anyway and the kernel would split connections between the two;
    this probe binds without it and so fails on any listener (SO_REUSEADDR only passes sockets
    left in TIME_WAIT)."""
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                               flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(f"port {port} is in use on {host}: another service (another `moeray serve`?) "
                                    "listens there; stop it or choose another port (--port)") from None
                raise


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string. A stream holds
    them back: if the stop string completes at the next step, the driver cuts the text before it,
    and text already sent cannot be taken back."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class StreamCursor:
    """What one streamed choice has sent: turns cumulative outputs into (new text, new tokens)."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self.text_sent = 0
        self.tokens_sent = 0

    def advance(self, completion: CompletionOutput) -> tuple[str, slice]:
        """The text not sent yet (less what might still become a stop string, unless finished) and
        the slice of token ids / logprobs not sent yet."""
        text = completion.text
        end = len(text) if completion.finish_reason is not None else len(text) - held_back(text, self.stops)
        delta = text[self.text_sent:end] if end > self.text_sent else ""
        self.text_sent = max(self.text_sent, end)
        tokens = slice(self.tokens_sent, len(completion.token_ids))
        self.tokens_sent = len(completion.token_ids)
        return delta, tokens


class RequestStream:
    """The requests of one HTTP call (one per prompt) as the loop thread advances them. Created by
    `EngineLoop.open` on the event loop that reads it.

    `async for batch in stream` yields {index: latest cumulative RequestOutput} for the requests
    that moved since the last batch (a slow reader skips intermediate states: outputs are
    cumulative) and ends when all have finished. `close()` aborts whatever has not finished: call
    it when the client goes away (it is a no-op afterwards)."""

    def __init__(self, engine_loop: EngineLoop, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]):
        if len(prompts) != len(params) or not prompts:
            raise ValueError(f"{len(prompts)} prompts for {len(params)} sampling params")
        self.prompts = [list(p) for p in prompts]
        self.params = list(params)
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self.request_ids: list[str | None] = [None] * len(prompts)  # written by the loop thread
        self.closed = False  # set on the event loop, read by the loop thread
        self._engine_loop = engine_loop
        self._event_loop = asyncio.get_running_loop()
        self._updates: asyncio.Queue = asyncio.Queue()
        self._unfinished = len(prompts)

    @property
    def finished(self) -> bool:
        return self._unfinished == 0

    # ---- the loop thread's side --------------------------------------------------------------------
    def _deliver(self, item) -> None:
        try:
            self._event_loop.call_soon_threadsafe(self._updates.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody reads this stream any more
            pass

    # ---- the reader's side ---------------------------------------------------------------------------
    async def _next_item(self):
        item = await self._updates.get()
        if isinstance(item, BaseException):
            self._unfinished = 0
            raise item
        return item

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict[int, RequestOutput]:
        if self.finished:
            raise StopAsyncIteration
        batch: dict[int, RequestOutput] = {}
        item = await self._next_item()
        while True:
            index, out = item
            batch[index] = out
            if self._updates.empty():
                break
            item = await self._next_item()
        for index, out in batch.items():
            self.latest[index] = out
        self._unfinished = sum(o is None or not o.finished for o in self.latest)
        return batch

    async def final(self) -> list[RequestOutput]:
        """Every request's finished output, in prompt order."""
        async for _ in self:
            pass
        return list(self.latest)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if not self.finished:
                self._engine_loop._inbox.put(("abort", self, None))


class EngineLoop:
    """The one thread that touches the engine. `open(prompts, params)` admits requests and returns
    their RequestStream; `call(fn)` runs fn(*args) between steps. `metrics` (a
    moeray.metrics.ServingMetrics, optional) sees every admitted request and every step's outputs."""

    def __init__(self, driver: GenerationDriver, metrics=None, after_step=None):
        """`after_step()` runs on the loop thread after every step (the replica's saved-state check:
        commits, recoveries and scales all change the placement inside a step)."""
        self.driver = driver
        self.metrics = metrics
        self._after_step = after_step
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[RequestStream, int]] = {}  # request id -> its stream and index
        self._stopped = threading.Event()
        self._scale_waiter: tuple[int, float, Future] | None = None  # (count, deadline, future) of a scale in progress
        self.steps = 0  # driver steps taken
        self.most_in_flight = 0  # most requests in flight at one driver step (> 1: they shared engine steps)
        self._thread = threading.Thread(target=self._run, name="moeray-engine-loop", daemon=True)
        self._thread.start()

    async def open(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> RequestStream:
        """Queue the requests (token ids) of one HTTP call; returns once all joined the scheduler,
        or raises RequestRejected (none of them runs then)."""
        stream = RequestStream(self, prompts, params)
        self._inbox.put(("open", stream, None))
        try:
            await stream._next_item()  # _ADMITTED, or the rejection raised
        except asyncio.CancelledError:  # the client went away before its requests were admitted
            stream.close()
            raise
        return stream

    async def call(self, fn, *args):
        future: Future = Future()
        self._inbox.put(("call", (fn, args), future))
        return await asyncio.wrap_future(future)

    async def scale(self, num_workers: int) -> dict:
        """Change the worker count; returns the scale event once it is done. Steps go on while new
        workers load (GenerationDriver.request_scale); ValueError for a bad count, RuntimeError when
        the cluster cannot place the workers within placement_timeout_s (nothing changed)."""
        future: Future = Future()
        self._inbox.put(("scale", num_workers, future))
        return await asyncio.wrap_future(future)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def stop(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop", None, None))
        self._thread.join(timeout=30)

    # ---- the loop thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            busy = self.driver.has_unfinished()
            changing = self.driver.membership_pending
            try:
                # idle: wait for work; busy: take what is there and step (never wait); a membership
                # change in progress (new workers loading): look again soon
                item = (self._inbox.get_nowait() if busy else
                        self._inbox.get(timeout=_MEMBERSHIP_POLL_S if changing else 1.0))
            except queue.Empty:
                item = None
            while item is not None:  # everything that arrived during the last step joins the next one
                try:
                    self._handle(item)
                except Exception:  # a bug in one item must not stop the service's only engine thread
                    log.exception("engine loop: handling %s failed", item[0])
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if self.driver.has_unfinished() or self.driver.membership_pending:
                self._step()
                if self._after_step is not None:
                    try:
                        self._after_step()
                    except Exception:  # saving state is best-effort: serving goes on
                        log.exception("engine loop: after_step failed")
            if self._scale_waiter is not None:
                try:
                    self._check_scale()
                except Exception:  # the only engine thread must survive a bug here
                    log.exception("engine loop: checking the scale in progress failed")

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
        if kind == "open":
            self._admit(payload)
        elif kind == "abort":
            self._abort(payload)
        elif kind == "scale":
            self._start_scale(payload, future)
        elif kind == "call":
            fn, args = payload
            try:
                self._resolve(future, fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                self._resolve(future, error=exc)

    def _start_scale(self, num_workers: int, future: Future) -> None:
        if self._scale_waiter is not None:
            self._resolve(future, error=RuntimeError(
                f"a scale to {self._scale_waiter[0]} workers is in progress; try again when it is done"))
            return
        try:
            self.driver.request_scale(num_workers)
        except ValueError as exc:
            self._resolve(future, error=exc)
            return
        self._scale_errors_before = len(self.driver.scale_errors)
        deadline = time.monotonic() + self.driver.engine.config.parallel.placement_timeout_s
        self._scale_waiter = (num_workers, deadline, future)

    def _check_scale(self) -> None:
        """After each step: resolve the scale in progress once the engine has its workers, or fail
        it (and give up the joiners) once placement_timeout_s has passed."""
        num_workers, deadline, future = self._scale_waiter
        engine = self.driver.engine
        if len(self.driver.scale_errors) > self._scale_errors_before:
            self._scale_waiter = None
            engine.target_workers = len(engine.workers)  # a requested scale that failed is not retried
            self._resolve(future, error=RuntimeError(f"scale to {num_workers} workers failed: "
                                                     f"{self.driver.scale_errors[-1]}"))
        elif len(engine.workers) == num_workers and engine.healthy:
            self._scale_waiter = None
            event = self.driver.last_scale_event or {"kind": "scale", "from_workers": num_workers,
                                                     "to_workers": num_workers, "changed": False}
            self._resolve(future, event)
        elif time.monotonic() > deadline or future.cancelled():
            self._scale_waiter = None
            try:
                self.driver.give_up_scale(num_workers)
            except RuntimeError as exc:
                self._resolve(future, error=exc)

    def _admit(self, stream: RequestStream) -> None:
        if stream.closed:  # the client went away before its requests were admitted
            return
        for index, (prompt, params) in enumerate(zip(stream.prompts, stream.params)):
            try:
                request_id = self.driver.add_request(prompt, params)
            except (ValueError, TypeError) as exc:  # all of the call's requests run, or none
                self._abort(stream)
                where = f"prompt {index}: " if len(stream.prompts) > 1 else ""
                stream._deliver(RequestRejected(400, where + str(exc)))
                return
            stream.request_ids[index] = request_id
            self._streams[request_id] = (stream, index)
        for request_id, prompt in zip(stream.request_ids, stream.prompts):
            self._observe("request_added", request_id, len(prompt))
        stream._deliver(_ADMITTED)

    def _abort(self, stream: RequestStream) -> None:
        for request_id in stream.request_ids:
            if request_id is not None and self._streams.pop(request_id, None) is not None:
                self.driver.abort(request_id)  # its KV blocks are freed at the next step
                self._observe("request_aborted", request_id)

    def _step(self) -> None:
        engine = self.driver.engine
        try:
            if not engine.healthy:  # an earlier recovery failed: try again (loops stopped, requests re-queued)
                self.driver.recover()
            outputs = self.driver.step()
        except Exception as exc:  # noqa: BLE001 - the step or its recovery failed: fail what is in flight, keep serving
            error = exc if isinstance(exc, (WorkerLost, CollectiveError)) else WorkerLost(
                f"engine step failed: {type(exc).__name__}: {exc}")
            failed = {id(stream): stream for stream, _ in self._streams.values()}
            for request_id in list(self._streams):
                self.driver.abort(request_id)
                self._observe("request_aborted", request_id)
            self._streams.clear()
            for stream in failed.values():
                stream._deliver(error)
            return
        self.steps += 1
        self.most_in_flight = max(self.most_in_flight, len(self._streams))
        self._observe("observe", outputs)
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:  # aborted while its step ran
                continue
            stream, index = entry
            stream._deliver((index, out))
            if out.finished:
                del self._streams[out.request_id]

    def _observe(self, method: str, *args) -> None:
        """Tell the metrics; a failure there is logged and never fails a request."""
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, method)(*args)
        except Exception:  # metrics are best-effort by design
            log.exception("serving metrics: %s failed", method)
