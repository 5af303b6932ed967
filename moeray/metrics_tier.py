"""Prometheus families of the host tier (issue 13), from the coordinator's view: each worker's slots
per tier, and where the rows routed to its host-slot experts ran (computed in host memory, or the
expert fetched to the device), with the bytes those fetches copied and the host math's time.
Counters are summed by the coordinator from the workers' snapshots since it started (a rebuilt
coordinator starts again: Prometheus sees a reset). Labels: model_name, worker.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# (counts key, metric name, doc) of the per-worker counters
_COUNTERS = (
    ("host_rows", "moeray:tier_host_rows", "Rows routed to host-slot experts and computed in host memory."),
    ("fetched_rows", "moeray:tier_fetched_rows",
     "Rows routed to host-slot experts whose weights were fetched to the device for them."),
    ("host_experts", "moeray:tier_host_expert_steps",
     "Layer steps of host-slot experts computed in host memory (one per touched expert and layer step)."),
    ("fetched_experts", "moeray:tier_fetched_expert_steps",
     "Layer steps of host-slot experts fetched to the device (one per touched expert and layer step)."),
    ("copied_bytes", "moeray:tier_copied_bytes",
     "Expert weight bytes fetched from host memory to the device (unused prefetches included)."),
    ("host_s", "moeray:tier_host_seconds", "Wall time of the host tier's expert math."),
    ("proposed", "moeray:tier_split_proposals",
     "Layer steps whose step model proposed leaving touched host-slot experts on the host (cold_path auto)."),
    ("overruled", "moeray:tier_split_trial_fetches",
     "Layer steps whose proposed host split the split trial played as fetch-everything (tier.split_trial)."),
)


def tier_families(m: str, tier: dict, committed: list[dict]) -> list:
    """The families of the coordinator's tier view (CoordinatorCore.view()["tier"]) for model `m`;
    `committed`: its committed rebalance records. One label beyond model_name at most (worker)."""
    from moeray.metrics import _family  # metrics imports this module

    device = _family(GaugeMetricFamily, "moeray:tier_device_slots", "Device-memory expert slots per layer of a worker.")
    device.add_metric([m], tier["device_slots"])
    host = _family(GaugeMetricFamily, "moeray:tier_host_slots", "Host-memory expert slots per layer of a worker.")
    host.add_metric([m], tier["slots_per_worker"] - tier["device_slots"])
    families = [device, host]
    for key, name, doc in _COUNTERS:
        family = _family(CounterMetricFamily, name, doc, ("worker",))
        for rank, counts in tier["counts_by_worker"].items():
            family.add_metric([m, str(rank)], counts.get(key, 0))  # a key a worker's snapshots lack: none counted
        families.append(family)
    swaps = _family(CounterMetricFamily, "moeray:tier_swap_commits",
                    "Committed placement changes of the live tiering (each swaps experts between device and host slots).")
    swaps.add_metric([m], sum(r["planner"] == "tiering" for r in committed))
    return [*families, swaps]
