"""Is a rebalance stuck? A pure watch over what the engine has pending (no Ray, no clock of its
own: `now` comes in, so tests use a fake clock).

    decision, state = watch_rebalance(state, pending, now, stuck_after_s)

A rebalance is pending in one of two phases: "prepare" (the coordinator plans and every worker
stages the new slots; the engine holds the policy check's reference) and "commit" (staged on every
worker, waiting for the step that switches them). Either one taking longer than `stuck_after_s`
is stuck: the engine abandons it (a fresh coordinator, the workers drop their staging), serving
stays on the current placement, and health says so. The state counts what was abandoned, so
`/healthz`, `stats()` and the metrics report it after the fact too (vLLM's asynchronous EPLB can
stop rebalancing while its health check stays green; this is the check that it has not).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PendingRebalance:
    phase: str  # "prepare" | "commit"
    since_s: float  # when the phase began
    version: int | None = None  # the placement version, once known (commit phase)


@dataclass(frozen=True)
class WatchState:
    stuck_total: int = 0
    last_stuck: dict | None = None  # {"phase", "version", "pending_s", "at_s"} of the last one abandoned


@dataclass(frozen=True)
class WatchDecision:
    abandon: bool
    reason: str


def watch_rebalance(state: WatchState, pending: PendingRebalance | None, now: float,
                    stuck_after_s: float) -> tuple[WatchDecision, WatchState]:
    """Abandon the pending rebalance when its phase has lasted more than stuck_after_s."""
    if pending is None:
        return WatchDecision(False, "nothing pending"), state
    waited = now - pending.since_s
    if waited <= stuck_after_s:
        return WatchDecision(False, f"{pending.phase} pending for {waited:.1f}s"), state
    version = "" if pending.version is None else f" of v{pending.version}"
    reason = f"rebalance stuck: {pending.phase}{version} pending for {waited:.1f}s > stuck_timeout_s={stuck_after_s:g}"
    record = {"phase": pending.phase, "version": pending.version, "pending_s": waited, "at_s": now, "reason": reason}
    return WatchDecision(True, reason), replace(state, stuck_total=state.stuck_total + 1, last_stuck=record)
