"""One entry of the coordinator's rebalance log (`Engine.stats()["rebalances"]`, /v1/placement)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RebalanceRecord:
    """One rebalance, as logged. Imbalances are means over layers (worst layer in *_worst)."""

    version: int
    started_at: float
    reason: str
    predicted_before: float
    predicted_after: float
    predicted_after_worst: float
    slots_moved: int
    bytes_moved: int
    planning_ms: float
    transfer_ms: float | None = None
    committed_at_step: int | None = None
    stall_ms: float | None = None          # longest commit pause of any worker
    realised_after: float | None = None    # rows each worker computed over the first window after commit
    realised_after_worst: float | None = None
    realised_steps: int = 0
    planner: str | None = None  # which planner ran: global | hierarchical | layout (moeray/planning.py), or requested (Engine.rebalance(placement=...))
    planner_reason: str | None = None  # why (planner "auto": the modelled layer times)

    def as_dict(self) -> dict:
        return asdict(self)
