"""The chaos benchmark's schedule and figures on synthetic timelines (no Ray, no HTTP)."""

import random

import numpy as np
import pytest

from moeray.bench.chaos import kill_schedule
from moeray.bench.chaos_analysis import analyse, analyse_kill, match_server_events
from moeray.bench.http_clients import RequestRecord


def test_kill_schedule_jitters_kills_kills_the_coordinator_once_and_leaves_the_last_window_free():
    schedule = kill_schedule(180, 20, 0.25, 90, 10, random.Random(0))
    times = [t for t, _ in schedule]
    assert all(b - a >= 15 - 1e-9 and b - a <= 25 + 1e-9 for a, b in zip([0.0] + times, times))
    assert times[-1] <= 170
    assert [kind for _, kind in schedule].count("coordinator") == 1
    assert next(t for t, kind in schedule if kind == "coordinator") == min(t for t in times if t >= 90)
    assert "coordinator" not in [kind for _, kind in kill_schedule(180, 20, 0.25, -1, 10, random.Random(0))]


def _timeline(pieces):
    """Chunk times at `rate` chunks/s (1 token each) over [start, end) for each piece."""
    times = np.concatenate([np.arange(a, b, 1.0 / rate) for a, b, rate in pieces])
    return times, np.concatenate([[0.0], np.arange(1, len(times) + 1, dtype=float)])


def test_a_stall_then_full_rate_recovers_at_the_end_of_the_stall():
    times, cum = _timeline([(0, 10.2, 100), (12.0, 30, 100)])
    k = analyse_kill(10.0, times, cum, steady_rate=100, window_s=10, rate_window_s=1.0)
    assert k["stall_s"] == pytest.approx(1.8, abs=0.02)  # from the last chunk before, 10.19, to 12.0
    assert k["resumed_after_s"] == pytest.approx(2.0, abs=1e-9)
    assert k["recovery_s"] == pytest.approx(2.0, abs=1e-9)


def test_a_slow_restart_recovers_when_a_window_reaches_half_the_steady_rate():
    times, cum = _timeline([(0, 10, 100), (11.0, 14.0, 20), (14.0, 30, 100)])
    k = analyse_kill(10.0, times, cum, steady_rate=100, window_s=10, rate_window_s=1.0)
    assert k["stall_s"] == pytest.approx(1.01, abs=0.02)
    # [t, t + 1) holds 20 (14 - t) + 100 (t + 1 - 14) >= 50 from t = 13.375
    assert k["recovery_s"] == pytest.approx(3.375, abs=0.06)


def test_a_kill_that_never_recovers_to_half_the_rate_has_no_recovery_time():
    times, cum = _timeline([(0, 10, 100), (12.0, 30, 20)])
    assert analyse_kill(10.0, times, cum, 100, 10, 1.0)["recovery_s"] is None


class _Client:
    def __init__(self, records):
        self.records = records


def test_analyse_steady_and_recovering_rates_and_the_imbalance_after_recovery():
    # One client: requests of 10 tokens, 10 chunks each, every 0.1 s, except for a stall at 20-21 s.
    chunks = [t for t in np.arange(0, 60, 0.1) if not 20.0 <= t < 21.0]
    records = [RequestRecord(sent_s=chunks[i], chunk_times_s=chunks[i:i + 10], ended_s=chunks[i + 9],
                             completion_tokens=10) for i in range(0, len(chunks) - 9, 10)]
    kills = [{"kind": "worker", "t": 20.0}, {"kind": "coordinator", "t": None, "planned_s": 40, "skipped": "x"}]
    samples = [{"t": t, "status": 200, "num_workers": 1 if 20 < t < 30 else 2, "realised_imbalance_mean": 1.5 if t < 25
                else 1.1, "imbalance_mean": 1.2} for t in np.arange(0, 60, 2.0)]
    scales = [{"t": 50.0, "ended": 52.0}]
    figures = analyse([_Client(records)], kills, samples, scales, 0.0, 45.0, 10, 2, 10.0, 1.0, 5.0)
    assert figures["steady_tokens_per_s"] == pytest.approx(10, rel=0.05)
    assert figures["worker_recovery_p50_s"] == pytest.approx(1.0, abs=0.11)
    k = kills[0]
    assert k["failed_requests"] == 0 and k["imbalance_after"]["realised_mean"] == 1.5
    assert k["full_strength_after_s"] == pytest.approx(10.0)
    assert k["imbalance_at_full_strength"] == {"at_s": 10.0, "workers": 2, "realised_mean": 1.1, "current_mean": 1.2}
    assert figures["steady_imbalance"]["realised_mean"] == pytest.approx(1.2, abs=0.15)
    assert scales[0]["longest_gap_s"] == pytest.approx(0.1, abs=0.01)
    assert scales[0]["tokens_per_s_after"] == pytest.approx(10, rel=0.05)


def test_server_events_are_matched_to_the_kill_before_them():
    kills = [{"t": 100.0}, {"t": None}, {"t": 200.0}]
    events = [{"kind": "recovery", "mode": "shrink", "seconds": 0.1, "detected_at_s": 100.2},
              {"kind": "scale", "seconds": 0.5},  # no time: not attributed
              {"kind": "coordinator_restart", "seconds": 2.0, "detected_at_s": 203.0}]
    match_server_events(kills, events)
    assert [e["kind"] for e in kills[0]["server_events"]] == ["recovery"]
    assert kills[0]["server_events"][0]["detected_after_kill_s"] == pytest.approx(0.2)
    assert [e["kind"] for e in kills[2]["server_events"]] == ["coordinator_restart"]
    match_server_events(kills, None)
    assert kills[0]["server_events"] == []
