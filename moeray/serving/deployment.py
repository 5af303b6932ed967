"""The Ray Serve deployment: one `Engine` (its workers and coordinator) per replica, behind FastAPI,
speaking the OpenAI-compatible subset vLLM serves.

    POST /v1/completions        text or token-id prompts (one or several), plain or streamed (SSE)
    POST /v1/chat/completions   the checkpoint's chat template (400 when it has none), plain or streamed
    GET  /v1/models             the served model
    GET  /v1/placement          placement per layer, load and imbalance, rebalance log, epoch, workers
    POST /v1/rebalance          plan and stage a new placement now (committed at the next step)
    GET  /metrics               Prometheus text (moeray.metrics)
    GET  /healthz               200 while the engine's workers answer (never needs the API key)

Every answer carries `x-moeray-replica: <Serve replica id>`: which replica (engine) gave it.

Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} naming the field.
Bodies are read as JSON whatever the content type (curl -d sends a form type, as vLLM allows).
Requests become requests of the generation driver (`core.EngineLoop`): they join the next engine
step and share it with everything else in flight; each is checked on its own before it is queued,
so a bad one never fails the others. A client that goes away (streaming or not) aborts its
requests: Serve cancels the handler, and the stream's `close()` frees their KV blocks. When a
worker dies, the step recovers the engine and re-runs what was in flight; only if recovery fails
do those requests get 503.

A replica's committed placement and rebalance log outlive it (moeray/serving/persist.py): saved
in Ray's KV under its app and replica rank whenever the placement changes, read back by the
replica Serve starts in its place, which builds its engine on that placement.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at
# runtime, and through Serve's ingress wrapper string annotations do not resolve.
import asyncio
import hmac
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeray.engine import Engine
from moeray.generation.driver import GenerationDriver
from moeray.generation.sampling import SamplingParams
from moeray.generation.tokenizer import Tokenizer
from moeray.llm import engine_config_for
from moeray.metrics import CONTENT_TYPE, ServingMetrics
from moeray.serving import openai_api as oa
from moeray.serving import openai_responses as resp
from moeray.serving import persist
from moeray.serving.chat_template import load_chat_template, render_chat
from moeray.serving.config import ServiceConfig
from moeray.serving.core import EngineLoop, RequestRejected, RequestStream
from moeray.serving.launch import _running_serve_address, app_builder, build_app, run_service  # re-exported
from moeray.serving.placement_report import placement_report
from moeray.serving.replica import NameTheReplica, replica_identity
from moeray.serving.sse import ENGINE_ERRORS as _ENGINE_ERRORS
from moeray.serving.sse import chat_events, completion_events, sse_response
from moeray.serving.sse import unavailable as _unavailable
from placement import Placement

__all__ = ["MoEService", "_running_serve_address", "app", "app_builder", "build_app", "run_service"]
app = FastAPI(title="moeray", description="Expert-parallel MoE serving with live expert placement (OpenAI API)")
app.add_middleware(NameTheReplica)
_PROBE = SamplingParams(max_tokens=1)  # checks a prompt on its own, before its max_tokens is known
_log = logging.getLogger("ray.serve")  # Serve's logger: lines carry the replica's app, deployment and id


def _start_engine(engine_config, checkpoint: str, placement: Placement | None) -> Engine:
    return Engine(engine_config, checkpoint, placement=placement)


def _error_response(error: oa.OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@app.exception_handler(oa.OpenAIError)
async def _openai_error(request: Request, exc: oa.OpenAIError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # bodies are parsed by hand (oa.parse_request); this covers query and path parameters
    errors = [{**e, "loc": tuple(e["loc"][1:]) if e["loc"][:1] in (("query",), ("path",), ("body",)) else e["loc"]}
              for e in exc.errors()]
    return _error_response(oa.validation_error(errors))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405, ...
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(oa.OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                          code=code))


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(oa.OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}"))


# Serve serializes the class when the decorator runs: everything its methods use is defined above.
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class MoEService:
    def __init__(self, service_config: dict):
        self.config = ServiceConfig.model_validate(service_config)
        checkpoint = self.config.checkpoint
        self.replica, self.rank, app_name = replica_identity()
        engine_config = engine_config_for(checkpoint, self.config.engine)
        # What the replica this one replaces left (same app, same rank): its placement and log.
        record = persist.load_record(app_name, self.rank) if app_name and self.rank is not None else None
        placement, self.resume_note = persist.resume_placement(record, engine_config, checkpoint)
        if record is not None:
            (_log.info if placement is not None else _log.warning)("moeray: replica rank %s: %s", self.rank,
                                                                  self.resume_note)
        self.resumed_from = None if record is None else {
            "replica": record.get("replica"), "version": record.get("version"), "saved_at": record.get("saved_at"),
            "placement_resumed": placement is not None, "note": self.resume_note}
        self.engine = _start_engine(engine_config, checkpoint, placement)
        carried = [] if record is None else [{**entry, "from_previous_replica": True}
                                             for entry in record.get("rebalances", [])]
        self.state = (persist.StateSaver(app_name, self.rank, self.replica, checkpoint, carried)
                      if app_name and self.rank is not None else None)
        self.tokenizer = Tokenizer.from_dir(checkpoint)
        self.driver = GenerationDriver(self.engine, self.tokenizer)
        self.model_name = self.config.serve.model_name or Path(checkpoint).name
        self.metrics = ServingMetrics(self.model_name)
        self.loop = EngineLoop(self.driver, self.metrics, after_step=self._note_placement)
        self.chat_template = load_chat_template(checkpoint, self.tokenizer)
        self.api_key = self.config.serve.resolved_api_key()
        self.max_model_len = self.engine.config.max_model_len
        self.started = int(time.time())
        self._token_texts: dict[int, str] = {}
        self._recovery: asyncio.Future | None = None  # a recovery started by check_health
        self._noting: asyncio.Future | None = None  # the saved-state check check_health queued
        self._failed_recoveries = 0

    # ---- the OpenAI API --------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req = oa.parse_request(oa.CompletionRequest, oa.parse_json_body(await request.body()))
        self._check_model(req.model)
        params = oa.sampling_params(req, req.max_tokens or oa.COMPLETION_DEFAULT_MAX_TOKENS, req.logprobs)
        several = len(req.prompt) > 1
        prompts = [self._encode(p, f"prompt[{i}]" if several else "prompt") for i, p in enumerate(req.prompt)]
        for ids in prompts:
            self._check_fits(ids, params)
        stream = await self._open(prompts, [params] * len(prompts))
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await sse_response(completion_events(stream, req, response_id, created, self.model_name,
                                                        self._token_text))
        outs = await self._final(stream)
        choices = [resp.CompletionChoice(
            index=i, text=out.outputs[0].text, finish_reason=out.outputs[0].finish_reason,
            logprobs=None if req.logprobs is None else resp.completion_logprobs(out.outputs[0].logprobs, self._token_text, 0))
            for i, out in enumerate(outs)]
        return resp.CompletionResponse(id=response_id, created=created, model=self.model_name, choices=choices,
                                     usage=resp.usage_of(outs)).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        req = oa.parse_request(oa.ChatCompletionRequest, oa.parse_json_body(await request.body()))
        self._check_model(req.model)
        if self.chat_template is None or self.tokenizer is None:
            raise oa.OpenAIError(400, f"the model {self.model_name!r} has no chat template (tokenizer_config.json "
                                      "has no chat_template): use /v1/completions", param="messages",
                                 code="no_chat_template")
        try:
            text = render_chat(self.chat_template, [m.model_dump(exclude_none=True) for m in req.messages],
                               *self._special_tokens())
        except ValueError as exc:  # the template's raise_exception, e.g. roles that must alternate
            raise oa.OpenAIError(400, str(exc), param="messages") from None
        ids = self._encode(self.tokenizer.encode(text, add_special_tokens=False), "messages")  # BOS is in the template
        max_tokens = req.requested_max_tokens
        if max_tokens is None:  # OpenAI's chat has no default limit: what is configured, as the context allows
            room = min(self.max_model_len, self.config.serve.max_tokens_per_request) - len(ids)
            max_tokens = max(1, min(self.config.serve.default_chat_max_tokens, room))
        params = oa.sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        self._check_fits(ids, params)
        stream = await self._open([ids], [params])
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await sse_response(chat_events(stream, req, response_id, created, self.model_name,
                                                  self._token_text))
        (out,) = await self._final(stream)
        completion = out.outputs[0]
        choice = resp.ChatChoice(index=0, message=resp.AssistantMessage(content=completion.text),
                               finish_reason=completion.finish_reason,
                               logprobs=resp.chat_logprobs(completion.logprobs, self._token_text) if req.logprobs else None)
        return resp.ChatCompletionResponse(id=response_id, created=created, model=self.model_name, choices=[choice],
                                         usage=resp.usage_of([out])).model_dump()

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        card = resp.ModelCard(id=self.model_name, created=self.started, root=self.config.checkpoint,
                            max_model_len=self.max_model_len)
        return resp.ModelList(data=[card]).model_dump()

    # ---- ours ------------------------------------------------------------------------------------
    @app.get("/v1/placement")
    async def placement(self, request: Request):
        self._authorize(request)
        try:
            report = await self.loop.call(placement_report, self.engine, self.model_name)
        except _ENGINE_ERRORS as exc:
            raise _unavailable(exc) from None
        report["service"] = {"replica": self.replica, "rank": self.rank, "driver_steps": self.loop.steps,
                             "most_requests_in_flight": self.loop.most_in_flight,
                             "requests_in_flight": self.loop.in_flight, "state": self._state_summary()}
        if self.state is not None and self.state.carried_log:  # the log of the replicas this one replaced
            report["rebalances"] = self.state.carried_log + report["rebalances"]
        return report

    @app.post("/v1/rebalance")
    async def rebalance(self, request: Request):
        self._authorize(request)
        raw = await request.body()
        force = oa.parse_request(oa.RebalanceRequest, oa.parse_json_body(raw) if raw.strip() else {}).force
        if self.engine.coordinator is None:
            raise oa.OpenAIError(409, "rebalancing needs engine.stats.enabled=true", code="rebalancing_disabled")
        try:
            version = await self.loop.call(self.engine.rebalance, force)
        except _ENGINE_ERRORS as exc:
            raise _unavailable(exc) from None
        errors = self.engine.rebalance_errors
        return {"staged_version": version, "last_error": errors[-1] if version is None and errors else None,
                "replica": self.replica}

    @app.post("/v1/scale")
    async def scale(self, request: Request):
        """Change the engine's worker count between steps; requests in flight carry on."""
        self._authorize(request)
        num_workers = oa.parse_request(oa.ScaleRequest, oa.parse_json_body(await request.body())).num_workers
        try:
            return await self.loop.scale(num_workers)
        except ValueError as exc:  # e.g. too few slots for every expert at that count
            raise oa.OpenAIError(400, str(exc), param="num_workers") from None
        except (*_ENGINE_ERRORS, RuntimeError) as exc:  # RuntimeError: the cluster cannot place more workers
            raise _unavailable(exc) from None

    @app.get("/metrics")
    async def metrics_text(self, request: Request):
        self._authorize(request)
        text = await self.loop.call(self.metrics.render, self.driver, self.engine)
        return Response(content=text, headers={"content-type": CONTENT_TYPE})

    @app.get("/healthz")
    async def healthz(self):
        if not self.engine.healthy:
            raise oa.OpenAIError(503, "engine recovering from a lost worker", code="engine_unavailable")
        try:
            await self.loop.call(self.engine.load)  # every worker answers
            rebalancing = await self.loop.call(self.engine.rebalance_health)
        except Exception as exc:  # noqa: BLE001 - any failure here means: not healthy
            raise _unavailable(exc) from None
        # Serving works, so 200; "degraded" says rebalancing has stopped (no coordinator answers)
        # or one is stuck past stuck_timeout_s and not abandoned yet.
        degraded = rebalancing["state"] in ("stopped", "restarting") or rebalancing["stuck"]
        return {"status": "degraded" if degraded else "ok", "workers": len(self.engine.workers),
                "target_workers": self.engine.target_workers, "epoch": self.engine.epoch,
                "rebalancing": rebalancing, "replica": self.replica, "rank": self.rank}

    async def check_health(self) -> None:
        """Serve's periodic probe. A dead worker (or a failed step) starts a recovery in the
        background, so the probe itself stays short (Serve times it out); the probe fails only when
        a recovery has failed, and after a few such failures Serve replaces this replica."""
        if self._recovery is not None and self._recovery.done():
            recovery, self._recovery = self._recovery, None
            if recovery.cancelled() or recovery.exception() is not None:
                self._failed_recoveries += 1
        if self._recovery is None:
            if await self.loop.call(self.engine.probe):
                self._failed_recoveries = 0
            else:
                # Through the driver: it stops the worker loops and re-runs what was in flight.
                self._recovery = asyncio.ensure_future(self.loop.call(self.driver.recover))
        # The saved state: a placement change the step hook missed, or log entries that gained
        # their realised imbalance since the last save (the saver writes only what changed).
        # Queued, not awaited: behind a recovery on the loop thread it would stall the probe.
        if self._recovery is None and (self._noting is None or self._noting.done()):
            self._noting = asyncio.ensure_future(self.loop.call(self._note_placement, True))
        if self._failed_recoveries:
            raise RuntimeError(f"{self._failed_recoveries} engine recoveries in a row failed")

    # ---- the state that outlives this replica (persist.py) ---------------------------------------
    def _note_placement(self, refresh_log: bool = False) -> None:
        """On the engine-loop thread: save the placement if its version moved since the last note."""
        if self.state is not None:
            self.state.note(self.engine, refresh_log)

    def _state_summary(self) -> dict | None:
        if self.state is None:
            return None
        return {"key": self.state.key, "saved_version": self.state.saved_version, "saves": self.state.saves,
                "last_error": self.state.last_error, "resumed_from": self.resumed_from}

    # ---- helpers ---------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise oa.OpenAIError(401, "missing or incorrect API key: send it as `Authorization: Bearer <key>`",
                                 code="invalid_api_key")

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, self.config.checkpoint):
            raise oa.OpenAIError(404, f"the model {name!r} does not exist: this service serves {self.model_name!r}",
                                 param="model", code="model_not_found")

    def _encode(self, prompt, param: str) -> list[int]:
        """A prompt's token ids, or a 400 naming `param`: out-of-vocabulary ids, an empty prompt, a
        prompt that leaves no room in the context, text without a tokenizer."""
        if isinstance(prompt, str) and self.tokenizer is not None:
            prompt = self.tokenizer.encode(prompt)
        if not isinstance(prompt, str) and len(prompt) >= self.max_model_len:
            raise oa.OpenAIError(400, f"{param}: the prompt has {len(prompt)} tokens, but this model's context holds "
                                      f"{self.max_model_len} (prompt + at least one generated token)",
                                 param=param, code="context_length_exceeded")
        try:
            _, ids = self.driver.check_request(prompt, _PROBE)
        except ValueError as exc:
            raise oa.OpenAIError(400, f"{param}: {exc}", param=param) from None
        return list(ids)

    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        """prompt + max_tokens fits the context, the per-request limit and one worker's KV budget."""
        oa.check_context(len(ids), params.max_tokens, self.max_model_len, self.config.serve.max_tokens_per_request)
        try:
            self.driver.check_request(ids, params)
        except ValueError as exc:
            raise oa.OpenAIError(400, f"max_tokens: {exc}", param="max_tokens") from None

    async def _open(self, prompts: list[list[int]], params: list[SamplingParams]) -> RequestStream:
        try:
            return await self.loop.open(prompts, params)
        except RequestRejected as exc:
            raise oa.OpenAIError(exc.status, exc.detail, param="prompt") from None

    @staticmethod
    async def _final(stream: RequestStream):
        """Every request's final output; a client that goes away (Serve cancels this) aborts them."""
        try:
            return await stream.final()
        except _ENGINE_ERRORS as exc:
            raise _unavailable(exc) from None
        finally:
            stream.close()

    def _special_tokens(self) -> tuple[str, str]:
        tok = self.tokenizer
        texts = [tok.backend.id_to_token(i) if i is not None else None for i in (tok.bos_token_id, tok.eos_token_id)]
        return texts[0] or "", texts[1] or ""

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = (f"token_id:{token_id}" if self.tokenizer is None
                    else self.tokenizer.decode([token_id], skip_special_tokens=False))
            self._token_texts[token_id] = text
        return text

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.stop()
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

