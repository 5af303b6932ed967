"""The host tier through the engine on CPU workers (issue 13): 2 workers x 5 slots per layer, 2 of
them "device" slots, the other 3 in host memory (on a CPU worker the budget only picks the path,
so every path runs). Outputs equal the reference through requested tier swaps (promotions and
demotions), through live tiering from a skewed stream and its drift, and through a planner
rebalance rearranged into the tiers; every slot holds its expert bit for bit after each commit."""

import numpy as np
import pytest
import ray

from moeray.config import EngineConfig, ParallelConfig, RebalanceConfig, StatsConfig
from moeray.engine import Engine
from moeray.generation.driver import GenerationDriver
from moeray.models.checkpoint import CheckpointReader, load_reference_model
from moeray.streams import DriftingStream
from moeray.tier_config import HostTierConfig
from placement.tiering import slot_loads, swap_slots
from tests.actors.test_live_rebalance import assert_every_slot_holds_its_expert, encode_layer_expert
from tests.helpers import engine_logits, make_checkpoint, max_rel_error, reference_logits

BUDGET, SPW = 2, 5


@pytest.fixture(scope="module")
def tiered(ray_cluster, tmp_path_factory):
    ckpt, model_cfg, _ = make_checkpoint(tmp_path_factory.mktemp("tier"), seed=11, num_experts=8, top_k=2,
                                         num_hidden_layers=2)
    encode_layer_expert(ckpt, model_cfg.num_moe_layers, model_cfg.num_experts)
    config = EngineConfig(
        model=model_cfg,
        parallel=ParallelConfig(num_workers=2, redundant_slots_per_worker=1, collective_timeout_s=30),
        stats=StatsConfig(snapshot_interval_steps=2),
        # the rebalance policy off: live tier swaps run on their own (check_interval_steps apart)
        rebalance=RebalanceConfig(enabled=False, window_steps=8, check_interval_steps=2),
        tier=HostTierConfig(device_slots=BUDGET, cold_path="auto", tiering="live", margin=0.2, cooldown_s=0,
                            min_gain=0, max_swaps=2, split_trial=True),
    )
    assert config.slots_per_worker == SPW
    with Engine(config, ckpt) as engine:
        yield engine, load_reference_model(ckpt), CheckpointReader(ckpt), model_cfg


def serve_checked(engine, reference, stream, steps):
    for _ in range(steps):
        ids = stream.next_batch()
        assert max_rel_error(engine_logits(engine, [ids])[0], reference_logits(reference, ids)) <= 1e-5


def tier_records(engine) -> list[dict]:
    return [r for r in engine.stats()["rebalances"] if r["planner"] == "tiering" and r["committed_at_step"] is not None]


def test_the_workers_hold_three_host_slots_per_layer(tiered):
    engine, _, _, cfg = tiered
    for report in ray.get([w.memory_report.remote() for w in engine.workers]):
        expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4  # float32
        assert report["host_slot_bytes"] == cfg.num_moe_layers * (SPW - BUDGET) * expert_bytes
        assert report["slot_bytes"] == cfg.num_moe_layers * BUDGET * expert_bytes
    rates = ray.get(engine.workers[0].tier_rates.remote())
    assert rates is not None and rates.host_row_s > 0 and rates.pcie_bytes_per_s > 0


def test_requested_tier_swaps_keep_outputs_exact(tiered):
    engine, reference, reader, cfg = tiered
    stream = DriftingStream(cfg.vocab_size, 24, phase_steps=1000, hot_fraction=0.5, seed=1)
    serve_checked(engine, reference, stream, 2)
    for round_ in range(3):
        for _ in range(5):  # live tiering may have staged a swap of its own: commit it first
            p = engine.placement()
            # a device slot of each worker swapped with a host slot, per layer
            swaps = [(layer, a, b) for layer in range(p.num_layers)
                     for a, b in [(round_ % BUDGET, BUDGET + round_), (SPW + 1, SPW + BUDGET + (round_ + 1) % 3)]]
            try:
                version = engine.rebalance(placement=swap_slots(p, swaps))
                break
            except RuntimeError as exc:
                assert "is staged" in str(exc)
                serve_checked(engine, reference, stream, 1)
        serve_checked(engine, reference, stream, 1)  # this step commits it
        assert engine.placement().version == version
        assert_every_slot_holds_its_expert(engine, reader)
        serve_checked(engine, reference, stream, 1)


def test_live_tiering_promotes_the_hot_experts_and_follows_a_drift(tiered):
    engine, reference, reader, cfg = tiered
    before = len(tier_records(engine))
    stream = DriftingStream(cfg.vocab_size, 48, phase_steps=24, hot_tokens=2, hot_fraction=0.95, seed=7)
    serve_checked(engine, reference, stream, 24)
    first_phase = tier_records(engine)
    assert len(first_phase) > before, engine.stats()["last_decision"]
    serve_checked(engine, reference, stream, 24)  # the hot tokens (and experts) move
    second_phase = tier_records(engine)
    assert len(second_phase) > len(first_phase), (engine.stats()["last_decision"], engine.stats()["load_LE"],
                                                  engine.placement())
    assert_every_slot_holds_its_expert(engine, reader)
    stats = engine.stats()
    assert stats["tier"]["device_slots"] == BUDGET
    assert stats["tier"]["rates"] is None  # CPU workers: the margin alone decides (no step model)
    # the split trial's counts reach the coordinator with the rest (what it played, every step exact)
    counts = stats["tier"]["counts_by_worker"]
    assert sorted(counts) == [0, 1] and all(0 <= c["overruled"] <= c["proposed"] <= c["steps"] for c in counts.values())
    proposed, overruled = (sum(c[k] for c in counts.values()) for k in ("proposed", "overruled"))
    # the trial was consulted: its learning phase plays each arm at even odds, so some were overruled
    # (how many the model proposes rests on the CPU rates the workers measured: 35 of 192 layer steps here)
    assert proposed > 0 and (overruled > 0 or proposed < 10), counts
    assert_device_slots_carry_more(engine)


def assert_device_slots_carry_more(engine):
    """On every worker and layer a device slot carries more of the recent load than a host slot
    does, on average (the skewed stream's hot experts are on the device)."""
    stats = engine.stats()
    load_LE, p = np.asarray(stats["load_LE"], dtype=np.float64), engine.placement()
    for worker in range(p.num_workers):
        for layer, row in enumerate(slot_loads(p, load_LE, worker)):
            assert row[:BUDGET].mean() > row[BUDGET:].mean(), (worker, layer, row, stats["last_decision"])


def test_a_planner_rebalance_is_rearranged_into_the_tiers(tiered):
    engine, reference, reader, cfg = tiered
    stream = DriftingStream(cfg.vocab_size, 48, phase_steps=1000, hot_fraction=0.9, seed=9)
    serve_checked(engine, reference, stream, 6)
    version = engine.rebalance(force=True)
    serve_checked(engine, reference, stream, 1)
    assert engine.placement().version == version
    assert_every_slot_holds_its_expert(engine, reader)
    record = [r for r in engine.stats()["rebalances"] if r["version"] == version][0]
    assert record["planner"] != "tiering" and record["reason"] == "forced"
    assert_device_slots_carry_more(engine)


def test_the_workers_host_tier_counts_reach_the_coordinator(tiered):
    """Every row routed to a host slot so far was counted once, on the host or fetched, by the
    worker whose slot it was (the slots' own row counters agree), and shipped with the snapshots."""
    engine, _, _, _ = tiered
    by_worker = engine.stats()["tier"]["counts_by_worker"]  # flushed: every step served so far
    host_rows = ray.get([w.__ray_call__.remote(lambda self: int(self._read_counters()[1][:, BUDGET:].sum()))
                         for w in engine.workers])
    assert sorted(by_worker) == list(range(len(engine.workers)))
    for rank, rows in enumerate(host_rows):
        counts = by_worker[rank]
        assert rows > 0 and counts["host_rows"] + counts["fetched_rows"] == rows, (rank, counts)
        assert counts["host_experts"] + counts["fetched_experts"] > 0 and counts["steps"] > 0


def test_a_scale_sets_the_host_tier_up_again_for_the_new_worker_count(tiered):
    """The host tier's threads are a share of the CPUs per worker and its rates were measured with
    them: a reconfigure to another count sets both up again (a joiner starts with the new count);
    outputs stay exact on the rebuilt tiers. Last in the module: it leaves the engine at 2 again."""
    engine, reference, reader, cfg = tiered
    stream = DriftingStream(cfg.vocab_size, 48, phase_steps=1000, hot_fraction=0.9, seed=13)

    def set_up():
        """Per worker: (count it is set up for, id of its rates, every layer on its cold path and pool)."""
        return ray.get([w.__ray_call__.remote(lambda self: (
            self.tier_set_up_for, id(self.tier_rates_measured),
            all(e.host.path is self._cold_path and e.host.pool is self._staging_pool
                and self._cold_path.rates is self.tier_rates_measured for e in self._slot_experts())))
            for w in engine.workers])

    before = set_up()
    assert [(count, current) for count, _, current in before] == [(2, True)] * 2
    GenerationDriver(engine).scale(1)  # it ends the worker loops first
    (count, rates_id, current), = set_up()
    assert (count, current) == (1, True) and rates_id != before[0][1]  # measured again (the old ones lived on)
    serve_checked(engine, reference, stream, 2)
    GenerationDriver(engine).scale(2)
    assert [(count, current) for count, _, current in set_up()] == [(2, True)] * 2
    serve_checked(engine, reference, stream, 2)
    assert_every_slot_holds_its_expert(engine, reader)
