"""The Ray Serve deployment: one `Engine` (its workers and coordinator) per replica, behind FastAPI.

    POST /v1/forward    {"token_ids": [...], "top_logprobs": 0..20} -> greedy next token per
                        position (+ top log-probs), the placement version that computed it
    GET  /v1/stats      steps, placement version, imbalance, the rebalance log
    POST /v1/rebalance  plan and stage a new placement now (committed at the next step)
    GET  /healthz       200 while the engine's workers answer

Requests become requests of the generation driver (`core.EngineLoop`): they join the next engine
step and share it with everything else in flight (continuous batching). Each request is checked on
its own before it is queued: a bad one gets a 4xx naming the bad value and never fails the others.
When a worker dies, the step recovers the engine (replace the worker, new group epoch) and
re-runs what was in flight; only if recovery fails do those requests get 503.

The engine is driven from one thread; the event loop stays free for health checks and new
requests while a step runs.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at
# runtime, and through Serve's ingress wrapper string annotations do not resolve to the models.
import asyncio
from typing import Optional

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from moeray.engine import Engine
from moeray.errors import CollectiveError, WorkerLost
from moeray.generation.driver import GenerationDriver
from moeray.generation.sampling import SamplingParams
from moeray.generation.tokenizer import Tokenizer
from moeray.llm import engine_config_for
from moeray.serving.config import ServiceConfig
from moeray.serving.core import EngineLoop, RequestRejected, check_request_size, forward_result

app = FastAPI(title="moeray", description="Expert-parallel MoE serving with live expert placement")


class ForwardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_ids: list[int] = Field(min_length=1, description="token ids, each in [0, vocab_size)")
    top_logprobs: int = Field(default=0, ge=0, le=20)


class ForwardResponse(BaseModel):
    next_token_ids: list[int]
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    placement_version: int


class RebalanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = True


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class MoEService:
    def __init__(self, service_config: dict):
        self.config = ServiceConfig.model_validate(service_config)
        self.engine = Engine(engine_config_for(self.config.checkpoint, self.config.engine), self.config.checkpoint)
        self.loop = EngineLoop(GenerationDriver(self.engine, Tokenizer.from_dir(self.config.checkpoint)))
        self._recovery: asyncio.Future | None = None  # a recovery started by check_health
        self._failed_recoveries = 0

    async def _on_engine(self, fn, *args):
        """fn(*args) on the engine loop's thread, between steps."""
        return await self.loop.call(fn, *args)

    @app.post("/v1/forward", response_model=ForwardResponse)
    async def forward(self, request: ForwardRequest) -> ForwardResponse:
        try:
            check_request_size(request.token_ids, self.config.serve.max_tokens_per_request)
            out = await self.loop.submit(request.token_ids, SamplingParams(max_tokens=1), score=True)
        except RequestRejected as exc:
            raise HTTPException(status_code=exc.status, detail=exc.detail) from None
        except (WorkerLost, CollectiveError) as exc:
            raise HTTPException(status_code=503, detail=f"engine unavailable: {exc}") from None
        logits_TV = out.prompt_logits_TV
        result = forward_result(logits_TV, request.top_logprobs)
        return ForwardResponse(next_token_ids=result.next_token_ids, top_logprobs=result.top_logprobs,
                               placement_version=out.metrics["placement_version"])

    @app.get("/v1/stats")
    async def stats(self) -> dict:
        out = {
            "steps": self.engine.steps,
            "placement_version": self.engine.placement().version,
            "largest_step_requests": self.loop.largest_step,
            "recoveries": self.engine.recoveries,
        }
        if self.engine.coordinator is not None:
            try:
                summary = await self._on_engine(self.engine.stats)
            except WorkerLost as exc:
                raise HTTPException(status_code=503, detail=f"engine unavailable: {exc}") from None
            out.update({k: summary[k] for k in ("imbalance_mean", "imbalance_worst", "last_decision", "rebalances")})
            out["imbalance_per_layer"] = np.asarray(summary["imbalance_per_layer"]).tolist()
        return out

    @app.post("/v1/rebalance")
    async def rebalance(self, request: RebalanceRequest) -> dict:
        if self.engine.coordinator is None:
            raise HTTPException(status_code=409, detail="rebalancing needs engine.stats.enabled=true")
        try:
            version = await self._on_engine(self.engine.rebalance, request.force)
        except WorkerLost as exc:
            raise HTTPException(status_code=503, detail=f"engine unavailable: {exc}") from None
        errors = self.engine.rebalance_errors
        return {"staged_version": version, "last_error": errors[-1] if version is None and errors else None}

    @app.get("/healthz")
    async def healthz(self) -> dict:
        if not self.engine.healthy:
            raise HTTPException(status_code=503, detail="engine recovering from a lost worker")
        try:
            await self._on_engine(self.engine.load)  # every worker answers
        except Exception as exc:
            raise HTTPException(status_code=503, detail=f"engine unavailable: {exc}") from None
        return {"status": "ok", "workers": len(self.engine.workers)}

    async def check_health(self) -> None:
        """Serve's periodic probe. A dead worker (or a failed step) starts a recovery in the
        background, so the probe itself stays short (Serve times it out); the probe fails only when
        a recovery has failed, and after a few such failures Serve replaces this replica."""
        if self._recovery is not None and self._recovery.done():
            recovery, self._recovery = self._recovery, None
            if recovery.cancelled() or recovery.exception() is not None:
                self._failed_recoveries += 1
        if self._recovery is None:
            if await self._on_engine(self.engine.probe):
                self._failed_recoveries = 0
            else:
                self._recovery = asyncio.ensure_future(self._on_engine(self.engine.recover))
        if self._failed_recoveries:
            raise RuntimeError(f"{self._failed_recoveries} engine recoveries in a row failed")

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def build_app(config: ServiceConfig):
    """The bound Serve application for `serve.run`."""
    return MoEService.options(max_ongoing_requests=config.serve.max_ongoing_requests).bind(config.model_dump())


def run_service(config: ServiceConfig, blocking: bool = True):
    """Start Serve's HTTP proxy on config.serve.host:port and deploy the service."""
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    handle = serve.run(build_app(config), name=config.serve.app_name, route_prefix=config.serve.route_prefix,
                       blocking=False)
    if blocking:
        import time

        print(f"moeray: serving on http://{config.serve.host}:{config.serve.port}{config.serve.route_prefix} "
              f"(Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)  # the proxy and replica serve from their own actors
        except KeyboardInterrupt:
            serve.delete(config.serve.app_name)
    return handle
