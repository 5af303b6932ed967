"""`moeray status`: a placement report (GET /v1/placement, or a saved one) as plain-text tables.

    report = fetch_report("http://127.0.0.1:8000", api_key=None)   # or placement_report.read_report(path)
    print(render_status(report))

Standard library only (urllib), so the command starts in a blink and needs no extra install.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from moeray.serving.placement_report import ReportError, check_report

_HOT_EXPERTS_SHOWN = 3


class ServiceError(RuntimeError):
    """The service could not be asked (down, refused the key, answered an error)."""


def call_service(url: str, path: str, api_key: str | None = None, body: dict | None = None,
                 timeout_s: float = 30.0) -> bytes:
    """GET (or POST `body` as JSON to) {url}{path} with `Authorization: Bearer <api_key>` when
    given; the answer's bytes, or ServiceError with one readable line."""
    endpoint = url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(endpoint, data=data, headers={"Accept": "application/json",
                                                                   "Content-Type": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            hint = "a valid API key (--api-key or MOERAY_API_KEY)" if api_key else "an API key (--api-key or MOERAY_API_KEY)"
            raise ServiceError(f"{endpoint}: HTTP {exc.code}: the service needs {hint}") from None
        raise ServiceError(f"{endpoint}: HTTP {exc.code}: {_error_message(exc.read())}") from None
    except urllib.error.URLError as exc:
        raise ServiceError(f"cannot reach {endpoint} ({exc.reason}); is `moeray serve` running there?") from None
    except TimeoutError:
        raise ServiceError(f"{endpoint} did not answer within {timeout_s:g} s") from None


def fetch_report(url: str, api_key: str | None = None, timeout_s: float = 30.0) -> dict:
    """GET {url}/v1/placement, checked."""
    body = call_service(url, "/v1/placement", api_key, timeout_s=timeout_s)
    endpoint = url.rstrip("/") + "/v1/placement"
    try:
        return check_report(json.loads(body))
    except (json.JSONDecodeError, ReportError) as exc:
        raise ServiceError(f"{endpoint} did not answer with a placement report: {exc}") from None


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}) or FastAPI's
    {"detail": ...}; else the start of the body."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body[:200].decode(errors="replace")
    if isinstance(data, dict):
        if isinstance(data.get("error"), dict) and "message" in data["error"]:
            return str(data["error"]["message"])
        if "detail" in data:
            return str(data["detail"])
    return str(data)[:200]


def _num(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *map(line, rows)]


def _layer_rows(report: dict) -> list[list[str]]:
    rows = []
    for layer in report["layers"]:
        load = layer["expert_load"]
        total = sum(load) or 1.0
        hot = sorted(range(len(load)), key=lambda e: -load[e])[:_HOT_EXPERTS_SHOWN]
        hot_text = "  ".join(f"e{e} {100 * load[e] / total:.0f}%" + (f" x{layer['replicas'][e]}"
                                                                      if layer["replicas"][e] > 1 else "")
                             for e in hot if load[e] > 0)
        workers = layer["worker_load"]
        mean = sum(workers) / len(workers) if workers else 0.0
        busiest = max(range(len(workers)), key=lambda w: workers[w]) if workers else None
        busiest_text = "-" if not mean else f"w{busiest} {workers[busiest] / mean:.2f}x"
        rows.append([str(layer["layer"]), _num(layer["imbalance"]), _num(layer["realised_imbalance"]),
                     busiest_text, f"{sum(load):.0f}", hot_text or "-"])
    return rows


def _rebalance_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["rebalances"]:
        step = "-" if r.get("committed_at_step") is None else str(r["committed_at_step"])
        rows.append([f"v{r['version']}", step, _num(r["predicted_before"]), _num(r["predicted_after"]),
                     _num(r.get("realised_after")), str(r["slots_moved"]), _bytes(r["bytes_moved"]),
                     _num(r.get("planning_ms"), ".0f"), _num(r.get("stall_ms"), ".1f"), r.get("reason", "")])
    return rows


def _tier_line(tier: dict) -> str:
    """The host tier in one line: its slots, and where the rows of host-slot experts ran."""
    line = (f"host tier: {tier['device_slots']} device + {tier['slots_per_worker'] - tier['device_slots']} host slots "
            f"per layer and worker (cold path {tier['cold_path']}, tiering {tier['tiering']})")
    counts = list((tier.get("counts_by_worker") or {}).values())
    host, fetched = (sum(c[key] for c in counts) for key in ("host_rows", "fetched_rows"))
    if host + fetched:
        line += (f"; rows of host-slot experts: {100 * host / (host + fetched):.0f}% computed on the host, "
                 f"{100 * fetched / (host + fetched):.0f}% fetched ({_bytes(sum(c['copied_bytes'] for c in counts))} "
                 f"copied), host math {sum(c['host_s'] for c in counts):.1f} s")
    return line


def render_status(report: dict) -> str:
    """Header, one row per layer, the rebalance log."""
    model = report["model"]
    source = (f"window of the last {report['window_steps']} steps" if report.get("load_source") == "window"
              else "since start-up")
    lines = [
        f"{model.get('name', '?')} ({model.get('architecture', '?')}): placement v{report['placement_version']}, "
        f"epoch {report.get('epoch', '-')}, step {report.get('steps', '-')}, {report['num_workers']} workers x "
        f"{report['slots_per_worker']} slots, {report['num_experts']} experts, top-{model.get('top_k', '?')}",
        f"imbalance (max / mean worker load; 1.00 is even), load {source}: current placement mean "
        f"{_num(report['imbalance_mean'])}, worst {_num(report['imbalance_worst'])}; realised mean "
        f"{_num(report.get('realised_imbalance_mean'))}, worst {_num(report.get('realised_imbalance_worst'))}",
    ]
    surviving = report.get("surviving_load_after_worker_loss")
    if surviving:
        worst = min(range(len(surviving)), key=lambda w: surviving[w])
        lines.append(f"after losing one worker, the load whose expert keeps a live copy: worst {100 * surviving[worst]:.0f}% "
                     f"(worker {worst}), best {100 * max(surviving):.0f}% (the rest reloads from the checkpoint)")
    if report.get("tier"):
        lines.append(_tier_line(report["tier"]))
    if report.get("last_decision"):
        lines.append(f"last policy decision: {report['last_decision']}")
    if report.get("in_flight_version") is not None:
        lines.append(f"migration to v{report['in_flight_version']} in flight")
    lines.append("")
    lines += _table(["layer", "imbalance", "realised", "busiest", "routed", "hottest experts (share, replicas)"],
                    _layer_rows(report), right={0, 1, 2, 4})
    lines.append("")
    if report["rebalances"]:
        lines.append("rebalances (imbalance: mean over layers; predicted on the window, realised over the first "
                     "window after the commit)")
        lines += _table(["version", "step", "before", "predicted", "realised", "slots", "moved", "plan ms", "stall ms",
                         "reason"], _rebalance_rows(report), right={1, 2, 3, 4, 5, 6, 7, 8})
    else:
        lines.append("no rebalance yet" if report.get("load_source") == "window"
                     else "no rebalancing: the engine runs without a coordinator (stats disabled)")
    if report.get("recoveries"):
        lines.append(f"{len(report['recoveries'])} recoveries, the last at step {report['recoveries'][-1].get('step')}")
    return "\n".join(lines)
