"""The stuck-rebalance watch is a pure function of (state, pending, now): a fake clock drives it."""

from moeray.rebalance_watch import PendingRebalance, WatchState, watch_rebalance


def test_nothing_pending_is_never_stuck():
    decision, state = watch_rebalance(WatchState(), None, now=1e9, stuck_after_s=1.0)
    assert not decision.abandon and state == WatchState()


def test_a_phase_is_stuck_only_after_the_limit_and_each_abandonment_is_counted():
    state = WatchState()
    prepare = PendingRebalance("prepare", since_s=100.0)
    for now in (100.0, 150.0, 160.0):  # at the limit is not past it
        decision, state = watch_rebalance(state, prepare, now, stuck_after_s=60.0)
        assert not decision.abandon and state.stuck_total == 0
    decision, state = watch_rebalance(state, prepare, 160.5, stuck_after_s=60.0)
    assert decision.abandon and "prepare pending for 60.5s" in decision.reason and "stuck_timeout_s=60" in decision.reason
    assert state.stuck_total == 1 and state.last_stuck["phase"] == "prepare" and state.last_stuck["at_s"] == 160.5

    commit = PendingRebalance("commit", since_s=200.0, version=7)
    decision, state = watch_rebalance(state, commit, 230.0, stuck_after_s=20.0)
    assert decision.abandon and "commit of v7" in decision.reason
    assert state.stuck_total == 2 and state.last_stuck["version"] == 7
    decision, state = watch_rebalance(state, None, 231.0, stuck_after_s=20.0)  # abandoned: nothing pending
    assert not decision.abandon and state.stuck_total == 2
