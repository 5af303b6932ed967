"""Prometheus metrics of a serving engine: vLLM's request metrics plus the expert-placement ones.

    metrics = ServingMetrics(model_name)
    metrics.request_added(request_id, num_prompt_tokens)   # when a request is queued
    metrics.observe(driver.step())                         # engine-loop thread, every step
    text = metrics.render(driver, engine)                  # GET /metrics (CONTENT_TYPE)

Request metrics are derived from the step outputs, which are cumulative per request (all tokens
so far): a request's prompt tokens count once its first output arrives (it was prefilled), new
tokens are the growth of its token list, its latencies come from the driver's timestamps (arrival,
first token, finish; `time.perf_counter`). Engine and expert metrics are read when rendering:
scheduler queues and KV use, workers / epoch / recoveries / placement version from the engine,
and the coordinator's compact view (CoordinatorCore.view) for the realised imbalance per layer and
the rebalance log. Cardinality stays bounded: labels are model_name, layer, worker, finished_reason
(never layer x worker x expert).

Inside a Ray process the request metrics also go to Ray's metrics export (ray.util.metrics), one
call per metric per observe() (counters get the step's sum); engine gauges go there when render()
runs. Best effort: a failing Ray metric is dropped, serving is never affected.
"""

from __future__ import annotations

import bisect
import logging
import sys
import threading
import time
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest

from moeray.metrics_tier import tier_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
log = logging.getLogger(__name__)

# Buckets (seconds) as vLLM's, so dashboards built for vLLM read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
# A weight migration's commit pause and a planner run: milliseconds to seconds.
CONTROL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Requests whose end we never see (a client gone without request_aborted) must not grow the table
# forever; past this many the oldest are forgotten.
_MAX_TRACKED_REQUESTS = 65536
_COORDINATOR_TIMEOUT_S = 10.0


class Histogram:
    """Fixed buckets, cumulative on render (Prometheus `le` semantics: value <= bound)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @classmethod
    def of(cls, bounds: tuple[float, ...], values) -> Histogram:
        hist = cls(bounds)
        for value in values:
            hist.observe(value)
        return hist

    def buckets(self) -> list[tuple[str, int]]:
        cumulative, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            cumulative += count
            out.append((bound, cumulative))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class _Tracked:
    """What observe() remembers of a request between its outputs."""

    num_prompt_tokens: int | None
    prefilled: bool = False
    tokens_seen: int = 0
    last_token_s: float | None = None


def fetch_coordinator_view(engine, timeline: bool) -> dict | None:
    """The coordinator's compact view (CoordinatorCore.view); None without a coordinator."""
    return engine.coordinator_view(timeline, _COORDINATOR_TIMEOUT_S)


class ServingMetrics:
    def __init__(self, model_name: str, *, coordinator_view=fetch_coordinator_view, ray_export: bool | None = None):
        """`coordinator_view(engine, timeline)` reads the coordinator (replaceable for tests that
        have no Ray); `ray_export` None: on when this process is connected to Ray."""
        self.model_name = model_name
        self._coordinator_view = coordinator_view
        self._lock = threading.Lock()  # observe() runs on the engine-loop thread, render() may not
        self._tracked: dict[str, _Tracked] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self._ray = _RayExport.create(model_name) if ray_export is not False else None
        if ray_export and self._ray is None:
            raise RuntimeError("ray_export=True needs a process connected to Ray")

    # ---- requests (engine-loop thread) ----------------------------------------------------------
    def request_added(self, request_id: str, num_prompt_tokens: int) -> None:
        with self._lock:
            self._track(request_id, num_prompt_tokens)

    def request_aborted(self, request_id: str) -> None:
        """A request that will never finish (its client went away): counted as finished_reason
        "abort", as vLLM does, and forgotten."""
        with self._lock:
            if self._tracked.pop(request_id, None) is not None:
                self.finished["abort"] = self.finished.get("abort", 0) + 1

    def observe(self, outputs, now: float | None = None) -> None:
        """Account one step's outputs (RequestOutput, cumulative per request)."""
        now = time.perf_counter() if now is None else now
        prompt = generated = 0
        ttfts, itls, e2es, reasons = [], [], [], []
        with self._lock:
            for out in outputs:
                tracked = self._tracked.get(out.request_id) or self._track(out.request_id, None)
                completion = out.outputs[0]
                new_tokens = len(completion.token_ids) - tracked.tokens_seen
                if not tracked.prefilled and (new_tokens > 0 or out.finished):  # its prompt went through
                    tracked.prefilled = True
                    prompt += tracked.num_prompt_tokens if tracked.num_prompt_tokens is not None else len(out.prompt_token_ids)
                    first, arrival = out.metrics.get("first_token_s"), out.metrics.get("arrival_s")
                    if first is not None and arrival is not None:
                        ttfts.append(first - arrival)
                    if new_tokens > 1:  # the tokens after the first, arrived with it: they share its gap
                        since = max(now - first, 0.0) if first is not None else 0.0
                        itls.extend([since / (new_tokens - 1)] * (new_tokens - 1))
                elif new_tokens > 0 and tracked.last_token_s is not None:
                    # Tokens that arrived together share the gap since the previous ones.
                    itls.extend([(now - tracked.last_token_s) / new_tokens] * new_tokens)
                if new_tokens > 0:
                    generated += new_tokens
                    tracked.tokens_seen += new_tokens
                    tracked.last_token_s = now
                if out.finished:
                    del self._tracked[out.request_id]
                    reason = completion.finish_reason or "unknown"
                    reasons.append(reason)
                    self.finished[reason] = self.finished.get(reason, 0) + 1
                    arrival, finished = out.metrics.get("arrival_s"), out.metrics.get("finished_s")
                    if arrival is not None:
                        e2es.append((finished if finished is not None else now) - arrival)
            self.prompt_tokens += prompt
            self.generation_tokens += generated
            for hist, values in ((self.ttft, ttfts), (self.itl, itls), (self.e2e, e2es)):
                for value in values:
                    hist.observe(value)
        if self._ray is not None:
            self._ray.requests(prompt, generated, ttfts, itls, e2es, reasons)

    def _track(self, request_id: str, num_prompt_tokens: int | None) -> _Tracked:
        if len(self._tracked) >= _MAX_TRACKED_REQUESTS:
            del self._tracked[next(iter(self._tracked))]
        tracked = self._tracked[request_id] = _Tracked(num_prompt_tokens)
        return tracked

    # ---- exposition ---------------------------------------------------------------------------
    def render(self, driver, engine) -> str:
        """Prometheus text exposition (format 0.0.4) of every metric."""
        families = self._request_families() + self._engine_families(driver, engine)
        return generate_latest(_Families(families)).decode()

    def _request_families(self) -> list:
        m = self.model_name
        with self._lock:
            prompt = _family(CounterMetricFamily, "moeray:prompt_tokens", "Prefilled prompt tokens.")
            prompt.add_metric([m], self.prompt_tokens)
            generation = _family(CounterMetricFamily, "moeray:generation_tokens", "Generated tokens.")
            generation.add_metric([m], self.generation_tokens)
            success = _family(CounterMetricFamily, "moeray:request_success", "Finished requests by reason.",
                                   ("finished_reason",))
            for reason, count in sorted(self.finished.items()):
                success.add_metric([m, reason], count)
            histograms = []
            for name, doc, hist in (
                    ("moeray:time_to_first_token_seconds", "Arrival to first generated token.", self.ttft),
                    ("moeray:inter_token_latency_seconds", "Time between a request's consecutive tokens.", self.itl),
                    ("moeray:e2e_request_latency_seconds", "Arrival to finish of a request.", self.e2e)):
                family = _family(HistogramMetricFamily, name, doc)
                family.add_metric([m], hist.buckets(), hist.sum)
                histograms.append(family)
        return [prompt, generation, success, *histograms]

    def _engine_families(self, driver, engine) -> list:
        m = self.model_name
        scheduler = driver.scheduler
        values = {
            "num_requests_running": len(scheduler.running),
            "num_requests_waiting": len(scheduler.waiting),
            "workers": len(engine.workers),
            "target_workers": engine.target_workers,
            "epoch": engine.epoch,
            "placement_version": engine.placement().version,
        }
        docs = {
            "num_requests_running": "Requests with a sequence on a worker.",
            "num_requests_waiting": "Requests queued for admission.",
            "workers": "Workers in the expert-parallel group.",
            "target_workers": "Workers the group should have (more than `workers` after a loss, until a replacement joins).",
            "epoch": "Group epoch (increases at every recovery).",
            "placement_version": "Version of the committed expert placement.",
        }
        families = []
        for key, value in values.items():
            family = _family(GaugeMetricFamily, f"moeray:{key}", docs[key])
            family.add_metric([m], value)
            families.append(family)
        kv = _family(GaugeMetricFamily, "moeray:kv_cache_usage_perc",
                          "Fraction of a worker's KV-cache blocks reserved (0..1).", ("worker",))
        kv_usage = scheduler.kv_usage()
        for worker, usage in enumerate(kv_usage):
            kv.add_metric([m, str(worker)], usage)
        recoveries = _family(CounterMetricFamily, "moeray:recoveries", "Engine recoveries from a lost worker.")
        recoveries.add_metric([m], len(engine.recoveries))
        errors = _family(CounterMetricFamily, "moeray:rebalance_errors", "Migrations abandoned after an error.")
        errors.add_metric([m], len(engine.rebalance_errors))
        events = engine.events
        last_recovery = next((e for e in reversed(events) if e["kind"] == "recovery"), None)
        health = engine.rebalance_health()
        counters = {
            "scale_events": ("Worker-count changes (requested scales and rejoins after a loss).", "scale"),
            "coordinator_restarts": ("Coordinators rebuilt after a death or a stuck rebalance.", "coordinator_restart"),
            "rebalances_stuck": ("Rebalances abandoned because a phase outlasted stuck_timeout_s.", "rebalance_stuck"),
        }
        for name, (doc, kind) in counters.items():
            family = _family(CounterMetricFamily, f"moeray:{name}", doc)
            family.add_metric([m], sum(e["kind"] == kind for e in events))
            families.append(family)
        last = _family(GaugeMetricFamily, "moeray:last_recovery_seconds",
                       "Detection to recovered, of the last recovery from a lost worker (0: none yet).")
        last.add_metric([m], 0.0 if last_recovery is None else last_recovery["recovered_at_s"] - last_recovery["detected_at_s"])
        stopped = _family(GaugeMetricFamily, "moeray:rebalancing_stopped",
                          "1 while rebalancing is on but no coordinator serves, or a rebalance is stuck.")
        stopped.add_metric([m], float(health["state"] in ("stopped", "restarting") or health["stuck"]))
        families += [kv, recoveries, errors, last, stopped]
        view = None
        if engine.coordinator is not None:
            try:
                view = self._coordinator_view(engine, False)
            except Exception as exc:  # noqa: BLE001 - a coordinator being replaced must not fail the scrape
                log.warning("metrics: no expert metrics this scrape, the coordinator did not answer: %s", exc)
        if view is not None:
            families += self._expert_families(view)
        if self._ray is not None:
            self._ray.gauges(values, kv_usage)
        return families

    def _expert_families(self, view: dict) -> list:
        m = self.model_name
        imbalance = _family(GaugeMetricFamily, "moeray:expert_imbalance",
                                 "Realised max/mean worker load of a layer over the stats window (1 is even).",
                                 ("layer",))
        if view["realised_imbalance_per_layer"] is not None:
            for layer, value in enumerate(view["realised_imbalance_per_layer"]):
                imbalance.add_metric([m, str(layer)], float(value))
        committed = [r for r in view["rebalances"] if r["committed_at_step"] is not None]
        totals = (
            ("moeray:rebalances", "Committed placement changes.", len(committed)),
            ("moeray:rebalance_slots_moved", "Expert slots copied by committed rebalances.",
             sum(r["slots_moved"] for r in committed)),
            ("moeray:rebalance_bytes_moved", "Expert weight bytes copied by committed rebalances.",
             sum(r["bytes_moved"] for r in committed)),
        )
        families = [imbalance]
        for name, doc, value in totals:
            family = _family(CounterMetricFamily, name, doc)
            family.add_metric([m], value)
            families.append(family)
        # Rebuilt from the coordinator's log at every render (it keeps every record), so they stay
        # cumulative; a replaced coordinator starts a new log, which Prometheus sees as a reset.
        stall = Histogram.of(CONTROL_BUCKETS, [r["stall_ms"] / 1e3 for r in committed if r["stall_ms"] is not None])
        planner = Histogram.of(CONTROL_BUCKETS, [r["planning_ms"] / 1e3 for r in view["rebalances"]])
        for name, doc, hist in (
                ("moeray:migration_stall_seconds", "Longest worker pause to switch placement, per rebalance.", stall),
                ("moeray:planner_seconds", "Planner time per planned rebalance.", planner)):
            family = _family(HistogramMetricFamily, name, doc)
            family.add_metric([m], hist.buckets(), hist.sum)
            families.append(family)
        if view.get("tier") is not None:
            families += tier_families(self.model_name, view["tier"], committed)
        return families


def _family(kind, name: str, doc: str, extra_labels: tuple[str, ...] = ()):
    """A metric family whose every sample carries model_name (first) and `extra_labels`."""
    return kind(name, doc, labels=("model_name", *extra_labels))


class _Families:
    """The collector interface generate_latest() reads: metric families made for one render."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return iter(self.families)


class _RayExport:
    """The same request metrics through Ray's metrics agent (names without the colon prefix:
    Ray adds its own `ray_`)."""

    def __init__(self, model_name: str):
        from ray.util import metrics as ray_metrics

        tags = {"model_name": model_name}
        self._tags = tags

        def make(kind, name, doc, **kwargs):
            metric = kind(f"moeray_{name}", doc, tag_keys=tuple(kwargs.pop("tag_keys", ("model_name",))), **kwargs)
            metric.set_default_tags(tags)
            return metric

        self.prompt_tokens = make(ray_metrics.Counter, "prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = make(ray_metrics.Counter, "generation_tokens", "Generated tokens.")
        self.success = make(ray_metrics.Counter, "request_success", "Finished requests by reason.",
                            tag_keys=("model_name", "finished_reason"))
        self.ttft = make(ray_metrics.Histogram, "time_to_first_token_seconds", "TTFT.", boundaries=list(TTFT_BUCKETS))
        self.itl = make(ray_metrics.Histogram, "inter_token_latency_seconds", "ITL.", boundaries=list(ITL_BUCKETS))
        self.e2e = make(ray_metrics.Histogram, "e2e_request_latency_seconds", "E2E.", boundaries=list(E2E_BUCKETS))
        self.gauge = {key: make(ray_metrics.Gauge, key, key.replace("_", " "))
                      for key in ("num_requests_running", "num_requests_waiting", "workers", "epoch", "placement_version")}
        self.kv = make(ray_metrics.Gauge, "kv_cache_usage_perc", "KV use per worker", tag_keys=("model_name", "worker"))

    @classmethod
    def create(cls, model_name: str) -> _RayExport | None:
        ray = sys.modules.get("ray")  # never import Ray just for this
        if ray is None or not ray.is_initialized():
            return None
        try:
            return cls(model_name)
        except Exception:  # noqa: BLE001 - Ray's export is optional; /metrics still has everything
            return None

    def requests(self, prompt: int, generated: int, ttfts, itls, e2es, reasons) -> None:
        try:
            if prompt:
                self.prompt_tokens.inc(prompt)
            if generated:
                self.generation_tokens.inc(generated)
            for hist, values in ((self.ttft, ttfts), (self.itl, itls), (self.e2e, e2es)):
                for value in values:
                    hist.observe(value)
            for reason in reasons:
                self.success.inc(1, tags={"finished_reason": reason})
        except Exception:  # noqa: BLE001 - see create()
            pass

    def gauges(self, values: dict, kv_usage: list[float]) -> None:
        try:
            for key, value in values.items():
                self.gauge[key].set(value)
            for worker, usage in enumerate(kv_usage):
                self.kv.set(usage, tags={"worker": str(worker)})
        except Exception:  # noqa: BLE001 - see create()
            pass
