"""The figures of `moeray bench chaos`, from what the clients, the killer and the placement
sampler recorded (pure numpy: no Ray, no HTTP).

Definitions (all on the client side, over the chunks of every client merged, one wall clock):
- tokens of a chunk: an ok request's M tokens spread evenly over its text chunks (a chunk may carry
  several tokens); a chunk of a failed request counts 1.
- stall: the longest gap between consecutive chunks that ends after the kill and starts within
  `window_s` of it (clipped to start at the kill).
- recovery time: from the kill to the first chunk, at or after the stall's end, from which the
  next `rate_window_s` hold >= 50 % of the steady rate.
- steady: 1 s buckets of the chaos phase that meet no [kill, kill + window_s]; steady rate = their
  tokens / their seconds. Recovering rate = tokens in every [kill, kill + recovery] / their seconds.
- imbalance (from /v1/placement, layer means): realised (rows each worker computed over the
  coordinator's window, which may still hold ranges from before the kill) and current (the current
  placement on the windowed load): the first sample after each recovery, and the first one back at
  the configured worker count after a shrink (the count the sampler saw, so to within its
  period: "full strength"), vs the mean of the samples in steady buckets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moeray.bench.http_clients import StreamingClient


def chunk_timeline(clients: list[StreamingClient], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Every client's chunk times merged (sorted) and each chunk's tokens (see the definitions)."""
    times, weights = [], []
    for r in (r for c in clients for r in c.records):
        times += r.chunk_times_s
        weights += [max_tokens / len(r.chunk_times_s) if r.ok else 1.0] * len(r.chunk_times_s)
    order = np.argsort(times)
    return np.asarray(times)[order], np.asarray(weights)[order]


def tokens_between(times, cum_tokens, a, b) -> float:
    return float(cum_tokens[np.searchsorted(times, b)] - cum_tokens[np.searchsorted(times, a)])


def analyse_kill(kill_t: float, times, cum_tokens, steady_rate: float, window_s: float, rate_window_s: float) -> dict:
    """The stall after one kill and the recovery time (see above)."""
    ends = np.flatnonzero((times > kill_t) & (np.concatenate([[-np.inf], times[:-1]]) < kill_t + window_s))
    if len(ends) == 0:
        return {"stall_s": None, "recovery_s": None}
    starts = np.maximum(np.concatenate([[kill_t], times[:-1]])[ends], kill_t)
    longest = int(np.argmax(times[ends] - starts))
    resume = int(ends[longest])
    stall_s = float(times[resume] - starts[longest])
    later = times[resume:]
    later = later[later + rate_window_s <= times[-1]]  # only windows the run covers
    window_tokens = (cum_tokens[np.searchsorted(times, later + rate_window_s)]
                     - cum_tokens[np.searchsorted(times, later)])
    good = np.flatnonzero(window_tokens / rate_window_s >= 0.5 * steady_rate)
    recovery_s = None if len(good) == 0 else float(later[good[0]] - kill_t)
    return {"stall_s": stall_s, "resumed_after_s": float(times[resume] - kill_t), "recovery_s": recovery_s}


def analyse(clients, kills: list[dict], samples: list[dict], scales: list[dict], t0: float, chaos_end: float,
            max_tokens: int, workers: int, window_s: float, rate_window_s: float, settle_s: float) -> dict:
    """The run's figures; adds each kill's (`kills`: the killer's records) and each scale's to them.
    `samples`: the placement sampler's; `t0` .. `chaos_end`: the chaos phase (wall clock)."""
    times, weights = chunk_timeline(clients, max_tokens)
    cum_tokens = np.concatenate([[0.0], np.cumsum(weights)])
    failed_ends = [r.ended_s for c in clients for r in c.records if not r.ok]
    done = [k for k in kills if k["t"] is not None]
    steady_buckets = [(a, a + 1.0) for a in np.arange(t0, chaos_end - 1.0 + 1e-9, 1.0)
                      if not any(a < k["t"] + window_s and k["t"] < a + 1.0 for k in done)]
    steady_rate = sum(tokens_between(times, cum_tokens, a, b) for a, b in steady_buckets) / max(len(steady_buckets), 1)
    ok_samples = [s for s in samples if s["status"] == 200]
    in_steady = [s for s in ok_samples if any(a <= s["t"] < b for a, b in steady_buckets)]

    def mean_of(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    recovering_tokens = recovering_s = 0.0
    for k, following in zip(done, done[1:] + [None]):
        k.update(analyse_kill(k["t"], times, cum_tokens, steady_rate, window_s, rate_window_s))
        k["failed_requests"] = sum(1 for t in failed_ends if k["t"] <= t < k["t"] + window_s)
        k["window_tokens_per_s"] = tokens_between(times, cum_tokens, k["t"], k["t"] + window_s) / window_s
        until = float("inf") if following is None else following["t"]
        later = [s for s in ok_samples if k["t"] < s["t"] < until]  # this kill's, not the next one's
        # Back to the configured count, as the sampler saw it (a shrinking recovery grows back later).
        shrunk = next((i for i, s in enumerate(later) if s["num_workers"] < workers), None)
        full = None if shrunk is None else next((s for s in later[shrunk:] if s["num_workers"] == workers), None)
        k["full_strength_after_s"] = None if full is None else full["t"] - k["t"]
        k["imbalance_at_full_strength"] = _imbalance(full, k["t"])
        if k["recovery_s"] is None:
            continue
        recovering_tokens += tokens_between(times, cum_tokens, k["t"], k["t"] + k["recovery_s"])
        recovering_s += k["recovery_s"]
        k["imbalance_after"] = _imbalance(next((s for s in later if s["t"] >= k["t"] + k["recovery_s"]), None), k["t"])
    for s in scales:
        during = times[(times >= s["t"]) & (times <= s["ended"])]
        s["longest_gap_s"] = float(np.diff(np.concatenate([[s["t"]], during, [s["ended"]]])).max())
        s["failed_requests"] = sum(1 for t in failed_ends if s["t"] <= t <= s["ended"] + settle_s)
        s["tokens_per_s_after"] = tokens_between(times, cum_tokens, s["ended"], s["ended"] + settle_s) / \
            settle_s
    recoveries = [k["recovery_s"] for k in done if k["kind"] == "worker" and k["recovery_s"] is not None]
    seconds = np.arange(t0, times[-1] + 1.0, 1.0) if len(times) else np.array([t0])
    return {
        "steady_tokens_per_s": steady_rate, "steady_seconds": len(steady_buckets),
        "recovering_tokens_per_s": recovering_tokens / recovering_s if recovering_s else None,
        "after_kill_window_tokens_per_s": float(np.mean([k["window_tokens_per_s"] for k in done])) if done else None,
        "worker_recovery_p50_s": float(np.median(recoveries)) if recoveries else None,
        "worker_recovery_max_s": max(recoveries) if recoveries else None,
        "worker_kills_not_recovered": sum(1 for k in done if k["kind"] == "worker" and k["recovery_s"] is None),
        "steady_imbalance": {"realised_mean": mean_of(in_steady, "realised_imbalance_mean"),
                             "current_mean": mean_of(in_steady, "imbalance_mean"), "samples": len(in_steady)},
        "tokens_per_s_by_second": [round(float(x), 1) for x in np.diff(cum_tokens[np.searchsorted(times, seconds)])],
    }


def _imbalance(sample: dict | None, kill_t: float) -> dict | None:
    return None if sample is None else {
        "at_s": sample["t"] - kill_t, "workers": sample["num_workers"],
        "realised_mean": sample["realised_imbalance_mean"], "current_mean": sample["imbalance_mean"]}


SERVER_EVENT_KEYS = ("kind", "mode", "seconds", "from_workers", "to_workers", "experts_from_replicas",
                     "slots_from_checkpoint", "requests_rerun", "reason")


def match_server_events(kills: list[dict], events: list[dict] | None) -> None:
    """Each kill's server-side events: those detected between it and the next kill (events without
    a detection time, e.g. scale events, cannot be attributed and stay in the server's list only)."""
    done = [k for k in kills if k["t"] is not None]
    for k, following in zip(done, done[1:] + [None]):
        end = float("inf") if following is None else following["t"]
        k["server_events"] = [{**{key: e[key] for key in SERVER_EVENT_KEYS if key in e},
                               "detected_after_kill_s": e["detected_at_s"] - k["t"]}
                              for e in events or [] if k["t"] <= (e.get("detected_at_s") or 0) < end]
