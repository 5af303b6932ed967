"""The driver's generation loop: requests in, token streams out, over an `Engine`.

    driver = GenerationDriver(engine, tokenizer)
    driver.add_request("some text" | [1, 2, 3], SamplingParams(...))   # validated here, named errors
    while driver.has_unfinished():
        for out in driver.step():          # one lockstep engine step; outputs of requests that moved
            ...

Per step: the scheduler plans what each worker runs, the engine runs it, the driver appends the
sampled ids, detokenizes incrementally and checks stop strings (a hit truncates the text and aborts
the sequence on its worker at the next step). A step that meets a dead worker recovers the engine
and re-submits every request in flight with what it had generated appended to its prompt
(re-prefilled; greedy outputs are unchanged), so no request is lost.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import ray

from moeray.errors import CollectiveError, WorkerLost
from moeray.generation.loop_client import LoopClient
from moeray.generation.messages import StepResult
from moeray.generation.outputs import RequestOutput
from moeray.generation.requests import RequestState, check_token_ids
from moeray.generation.sampling import SamplingParams
from moeray.generation.scheduler import Scheduler
from moeray.generation.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop

_REJOIN_BACKOFF_S = 10.0  # after a failed rejoin, wait this long before starting another


class GenerationDriver:
    def __init__(self, engine, tokenizer: Tokenizer | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        cfg = engine.config
        self.model_cfg = cfg.model
        self.max_model_len = cfg.max_model_len
        self.scheduler = Scheduler(cfg.parallel.num_workers, cfg.cache.blocks_per_worker, cfg.cache.block_size,
                                   self.max_model_len, cfg.cache.max_num_seqs, cfg.cache.max_num_batched_tokens)
        self.requests: dict[str, RequestState] = {}
        self._ids = itertools.count()
        self.last_step: dict = {}
        self._held_outputs: list[RequestOutput] = []  # collected outside step() (a scale), returned by it
        self.last_scale_event: dict | None = None
        self.scale_errors: list[str] = []  # membership changes that failed between steps
        self.poll_timeout_s = 0.005  # how long step() waits for worker output (new requests wait at most this)

    # ---- requests in -------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> tuple[str | None, tuple[int, ...]]:
        """(text or None, token ids): text needs the checkpoint's tokenizer; ids are checked."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: send the prompt as token ids")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            ids, text = check_token_ids(prompt, self.model_cfg.vocab_size).tolist(), None
        if not ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds max_model_len={self.max_model_len}, "
                             "so a prompt may have at most max_model_len - 1 tokens")
        return text, tuple(int(t) for t in ids)

    def check_request(self, prompt, params: SamplingParams) -> tuple[str | None, tuple[int, ...]]:
        """Everything add_request checks, without queueing: (text, ids) or ValueError naming the value."""
        text, ids = self.encode_prompt(prompt)
        self.scheduler.check(len(ids), params)
        return text, ids

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    score: bool = False) -> str:
        """Queue a request (text or token ids); raises ValueError naming the bad value and queues
        nothing. Returns its id."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.encode_prompt(prompt)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.scheduler.add(request_id, ids, params, score)
        state = RequestState(request_id, text, ids, params, time.perf_counter(), score)
        if self.tokenizer is not None and not score:
            state.detokenizer = IncrementalDetokenizer(self.tokenizer)
        self.requests[request_id] = state
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away): its KV blocks are freed at the next step."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        """Work in flight, or outputs collected outside step() (a scale) not returned yet."""
        return self.scheduler.has_work or bool(self._held_outputs)

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Outputs of the requests that got tokens or finished since the last call (a finished
        request is forgotten once returned).

        With `parallel.step_loop = "workers"` (the default) the workers step on their own: this
        sends what the scheduler admitted or aborted and collects what the workers produced
        meanwhile (waiting up to a few ms for it). With "driver" it runs one lockstep engine step
        (the simple reference path), unless no worker has anything to do and the step would
        neither commit a staged placement nor meet a lost worker (it recovers then)."""
        if self.engine.target_workers != len(self.engine.workers) and self.engine.healthy:
            try:
                self._advance_membership()
            except Exception as exc:  # noqa: BLE001 - a failed change must not fail the requests
                self._membership_failed(exc)  # recovers if it was left part-way (what was in flight re-runs)
        if self.engine.config.parallel.step_loop == "workers":
            return self._step_with_loops()
        start = time.perf_counter()
        plans = self.scheduler.plan()
        planned = time.perf_counter()
        idle = not self.scheduler.running and not any(plan.new or plan.abort for plan in plans)
        if idle and self.engine.healthy and not self.engine.has_staged:
            # Nothing on any worker, nothing to commit: no lockstep step (the worker loops idle so
            # too). It would run empty exchanges only and count a step of zero load into the
            # statistics window (a driver stepping while new workers started filled it with zeros).
            outputs, self._held_outputs = self._held_outputs, []
            return outputs
        try:
            results = self.engine.step(plans)
        except (WorkerLost, CollectiveError):
            self._recover()
            return []
        except Exception:
            # Any other step failure: the plan's admissions and aborts may have reached some workers
            # and not others, so every worker drops its sequences and everything in flight is
            # queued again (no KV block can leak); the caller sees the error.
            self.engine.reset_sequences()
            self._requeue_in_flight()
            raise
        stepped = time.perf_counter()
        self.scheduler.update(results)
        outputs, self._held_outputs = self._held_outputs, []
        outputs += self._absorb(results, stepped)
        self.last_step = {"plan_ms": 1e3 * (planned - start), "engine_ms": 1e3 * (stepped - planned),
                          "absorb_ms": 1e3 * (time.perf_counter() - stepped),
                          "tokens": sum(r.num_tokens for r in results),
                          "workers": [r.timings_ms for r in results]}
        return outputs

    def _step_with_loops(self) -> list[RequestOutput]:
        engine = self.engine
        if engine.loops is None:
            engine.loops = LoopClient(engine)
        loops = engine.loops
        plans = self.scheduler.plan()
        try:
            if not loops.running:
                loops.start()
            loops.send_step(plans)
            # Wait for output only while something is in flight; an idle driver returns at once.
            reports = loops.poll(self.poll_timeout_s if self.scheduler.running else 0.0)
        except (WorkerLost, CollectiveError):
            self._recover()
            return []
        except Exception:
            # A loop ended on another error: the workers may disagree on what they ran, so the
            # engine recovers as after a lost worker (loops stopped, a new group, sequences dropped,
            # everything in flight queued again); the caller sees the error.
            self._recover()
            raise
        results = [r.result for r in reports]
        now = time.perf_counter()
        self.scheduler.update(results)
        outputs, self._held_outputs = self._held_outputs, []
        outputs += self._absorb(results, now, [r.version for r in reports])
        if reports:
            self.last_step = {"reports": len(reports), "steps": engine.steps,
                              "worker_step_ms_total": sum(r.step_ms for r in reports),
                              "worker_steps": sum(r.steps_run for r in reports),
                              "tokens": sum(len(u.token_ids) for r in results for u in r.updates)}
        return outputs

    def request_scale(self, num_workers: int) -> None:
        """Change the worker count without waiting (the serving loop's way): a scale down happens
        at the next step(); a scale up starts the new workers now and they join at the first
        step() after they have loaded, while requests keep flowing. ValueError naming a bad count."""
        from moeray.scaling import scaled_config

        scaled_config(self.engine.config, num_workers)
        engine = self.engine
        engine.target_workers = num_workers
        engine.rejoin_not_before_s = 0.0  # asked for now: no back-off from an earlier failure
        if engine.joiners is not None and engine.joiners.target != num_workers:
            engine.joiners.cancel(engine)
            engine.joiners = None
        self.last_scale_event = None

    def scale(self, num_workers: int) -> dict:
        """Change the worker count and wait for it (Engine.scale): serving goes on while new
        workers load; then the worker loops end at one step (their output is kept for the next
        step()), requests on leaving workers are re-prefilled elsewhere with what they generated,
        the others keep their KV cache. RuntimeError naming the resources when the cluster cannot
        place the new workers within placement_timeout_s (nothing changed)."""
        self.request_scale(num_workers)
        engine = self.engine
        deadline = time.monotonic() + engine.config.parallel.placement_timeout_s
        collected: list[RequestOutput] = []
        errors_before = len(self.scale_errors)
        try:
            while len(engine.workers) != num_workers or not engine.healthy:
                if time.monotonic() > deadline:
                    self.give_up_scale(num_workers)
                if len(self.scale_errors) > errors_before:
                    engine.target_workers = len(engine.workers)  # a requested scale that failed is not retried
                    raise RuntimeError(f"scale to {num_workers} workers failed: {self.scale_errors[-1]}")
                if not self.scheduler.running and engine.joiners is not None:
                    ray_wait_s = min(0.05, max(deadline - time.monotonic(), 0.0))
                    engine.joiners.wait(ray_wait_s)
                collected += self.step()
            if len(self.scale_errors) > errors_before:  # it failed and the engine recovered at another count
                engine.target_workers = len(engine.workers)
                raise RuntimeError(f"scale to {num_workers} workers failed: {self.scale_errors[-1]}")
        finally:  # outputs collected meanwhile are returned by the next step(), even if this raised
            self._held_outputs = collected + self._held_outputs
        return self.last_scale_event or {"kind": "scale", "from_workers": num_workers, "to_workers": num_workers,
                                         "changed": False}

    @property
    def membership_pending(self) -> bool:
        """A scale (or a rejoin after a shrink) waits for workers to start or to be let go."""
        return self.engine.target_workers != len(self.engine.workers)

    def give_up_scale(self, num_workers: int) -> None:
        engine = self.engine
        engine.target_workers = len(engine.workers)
        if engine.joiners is not None:
            engine.joiners.cancel(engine)
            engine.joiners = None
        par = engine.config.parallel
        raise RuntimeError(f"cannot place {num_workers - len(engine.workers)} more workers within placement_timeout_s="
                           f"{par.placement_timeout_s:g}; the cluster has {ray.available_resources()} available")

    def _membership_failed(self, exc: Exception) -> None:
        """A scale or rejoin that failed between steps: recorded; the engine recovers if it was left
        part-way; an automatic rejoin is retried after a back-off, a requested scale is not."""
        self.scale_errors.append(f"{type(exc).__name__}: {exc}")
        self.engine.events.append({"kind": "scale_failed", "error": self.scale_errors[-1], "step": self.engine.steps,
                                   "to_workers": self.engine.target_workers, "detected_at_s": time.time()})
        if not self.engine.healthy:
            self._recover()
        self.engine.rejoin_not_before_s = time.time() + _REJOIN_BACKOFF_S

    def _advance_membership(self) -> None:
        """Between steps: scale down now to a lower target; scale up once the joiners started."""
        engine = self.engine
        if time.time() < engine.rejoin_not_before_s:
            return
        if engine.target_workers > len(engine.workers) and not engine.poll_rejoin():
            return
        self._scale_now(engine.target_workers)

    def _scale_now(self, num_workers: int) -> dict:
        loops = self.engine.loops
        if loops is not None and loops.running:
            reports = loops.finish()
            results = [r.result for r in reports]
            self.scheduler.update(results)
            self._held_outputs += self._absorb(results, time.perf_counter(), [r.version for r in reports])
        try:
            event = self.engine.scale(num_workers)
        except Exception:
            if not self.engine.healthy:  # it failed part-way: recover() re-forms what is left
                self._requeue_in_flight()
                self.scheduler.resize(len(self.engine.workers))
            raise
        # The leaving workers (the highest ranks) are gone: their requests run again elsewhere.
        moved = self.scheduler.resize(num_workers)
        self._extend_prompts(moved)
        event["requests_moved"] = len(moved)
        self.last_scale_event = event
        return event

    def _absorb(self, results: list[StepResult], now: float, versions: list[int] | None = None) -> list[RequestOutput]:
        """`versions[i]`: the placement results[i] ran with (default: the engine's, as of this step)."""
        outputs = []
        if versions is None:
            versions = [self.engine.placement().version] * len(results)
        for result, version in zip(results, versions):
            for update in result.updates:
                state = self.requests.get(update.request_id)
                if state is None:  # aborted while its step ran
                    continue
                if update.prompt_logits_TV is not None:
                    state.prompt_logits_TV = update.prompt_logits_TV
                state.output_ids.extend(update.token_ids)
                state.logprobs.extend(update.logprobs)
                if update.token_ids and state.first_token_s is None:
                    state.first_token_s = now
                finish = update.finish_reason
                if finish == "stop" and update.token_ids:
                    last = update.token_ids[-1]
                    state.stop_reason = last if last in state.params.stop_token_ids else None
                if state.detokenizer is not None and update.token_ids:
                    if finish == "stop":
                        # EOS / stop token ids end the text without being part of it (as vLLM does).
                        state.detokenizer.push(list(update.token_ids[:-1]))
                    else:
                        state.detokenizer.push(list(update.token_ids))
                    full_text = state.detokenizer.text
                    stop_at = find_stop(full_text, state.params.stop, len(state.text))
                    if stop_at is not None:
                        state.stop_reason = next(s for s in state.params.stop if full_text.startswith(s, stop_at))
                        if finish is None:
                            self.scheduler.abort(update.request_id)  # frees its blocks at the next step
                        finish = "stop"
                    state.text = full_text if stop_at is None else full_text[:stop_at]
                stopped_by_text = isinstance(state.stop_reason, str)
                if finish is not None and state.detokenizer is not None and not stopped_by_text:
                    state.detokenizer.finish()  # emit bytes held back for a character that never completed
                    state.text = state.detokenizer.text
                if finish is not None:
                    state.finish_reason = finish
                    state.finished_s = now
                    del self.requests[update.request_id]
                outputs.append(state.output(version))
        return outputs

    def recover(self) -> None:
        """Recover the engine (a dead worker) and re-run everything in flight; what a step does on
        its own when it meets a dead worker. For health checks that find one between steps."""
        self._recover()

    def _recover(self) -> None:
        """The step met a dead worker: recover the engine, then re-run everything that was in
        flight, each request's generated tokens appended to its prompt."""
        detected_at_s = time.time()
        self.engine.healthy = False  # e.g. a worker found dead while its loop started: recover() must act
        if self.engine.loops is not None and self.engine.loops.running:
            self.engine.loops.stop()
        try:
            event = self.engine.recover(detected_at_s=detected_at_s)
            self.engine.reset_sequences()
        finally:  # whatever recovery managed, the scheduler matches the engine's workers
            requeued = self._requeue_in_flight()
            # A recovery that shrank the group renumbered the survivors: every sequence was
            # re-queued above, so the scheduler only needs the new count.
            self.scheduler.resize(len(self.engine.workers))
        if event is not None:
            event["requests_rerun"] = len(requeued)

    def _requeue_in_flight(self) -> list:
        """Every running request back to the queue with its generated tokens appended to its prompt
        (re-prefilled: greedy outputs are unchanged; a seeded request's draws restart from its seed).
        Returns them."""
        requeued = self.scheduler.requeue_all()
        self._extend_prompts(requeued)
        return requeued

    def _extend_prompts(self, requests) -> None:
        for req in requests:
            state = self.requests[req.request_id]
            state.resubmissions += 1
            req.prompt_ids = state.prompt_ids + tuple(state.output_ids)
            req.params = state.params.model_copy(update={"max_tokens": state.params.max_tokens - len(state.output_ids)})

    # ---- blocking helpers ---------------------------------------------------------------------
    def run_to_completion(self, request_ids: list[str]) -> dict[str, RequestOutput]:
        """Step until every request finished; their final outputs by id. A request that is not in
        flight (unknown, or its final output was already returned by step()) is an error: waiting
        for it would never end."""
        held = {o.request_id for o in self._held_outputs if o.finished}
        unknown = [rid for rid in request_ids if rid not in self.requests and rid not in held]
        if unknown:
            raise ValueError(f"requests {unknown} are not in flight (unknown, or already finished and returned)")
        pending, done = set(request_ids), {}
        while pending:
            for out in self.step():
                if out.finished and out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
        return done

    def prompt_logits(self, prompts) -> list[np.ndarray]:
        """[T, V] float32 logits of every prompt position (a scoring request per prompt, batched in
        one step where the scheduler's limits allow). For checks and scoring, not generation."""
        ids = [self.add_request(p, SamplingParams(max_tokens=1), score=True) for p in prompts]
        done = self.run_to_completion(ids)
        return [done[rid].prompt_logits_TV for rid in ids]

