"""Topology and planner from the config (moeray/planning.py) and the one Placement that crosses
actors: config validation, topology from config / node ids, the coordinator choosing each planner
(fake clock), saved placements with shard widths. No Ray."""

import pickle

import numpy as np
import pytest
from pydantic import ValidationError

from moeray.config import EngineConfig, ParallelConfig, RebalanceConfig, TopologyConfig, tiny_model_config
from moeray.coordinator_core import CoordinatorCore
from moeray.planning import PlanningSetup, node_layout
from moeray.stats_wire import LoadSnapshot
from placement import Placement
from placement.cost import LinkRates
from placement.policy import PolicyConfig

L, E, W = 2, 8, 4


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("section, values, field", [
    ("parallel", {"workers_per_node": 0}, "workers_per_node"),
    ("parallel", {"workers_per_node": "2"}, "workers_per_node"),
    ("parallel", {"workers_per_node": True}, "workers_per_node"),
    ("parallel", {"workers_per_node": 2.0}, "workers_per_node"),
    ("parallel", {"topology": {"inter_node_bytes_per_s": 0}}, "inter_node_bytes_per_s"),
    ("parallel", {"topology": {"intra_node_bytes_per_s": -5.0}}, "intra_node_bytes_per_s"),
    ("parallel", {"topology": {"inter_node_bytes_per_s": True}}, "inter_node_bytes_per_s"),
    ("parallel", {"topology": {"inter_node_bytes_per_s": "fast"}}, "inter_node_bytes_per_s"),
    ("parallel", {"topology": {"inter_node_bytes_per_s": float("inf")}}, "inter_node_bytes_per_s"),
    ("parallel", {"topology": {"inter_node_gbps": 50}}, "inter_node_gbps"),
    ("rebalance", {"planner": "fancy"}, "planner"),
    ("rebalance", {"planner": 1}, "planner"),
    ("rebalance", {"tokens_per_step": 0}, "tokens_per_step"),
    ("rebalance", {"tokens_per_step": "256"}, "tokens_per_step"),
])
def test_bad_topology_and_planner_values_are_refused_naming_the_field(section, values, field):
    with pytest.raises(ValidationError, match=field):
        EngineConfig.model_validate({"model": tiny_model_config().model_dump(), section: values})


def test_topology_defaults_are_the_cost_models_and_yaml_style_rates_are_read():
    rates = TopologyConfig()
    assert (rates.intra_node_bytes_per_s, rates.inter_node_bytes_per_s) == (
        LinkRates().intra_node_bytes_per_s, LinkRates().inter_node_bytes_per_s)
    assert TopologyConfig(inter_node_bytes_per_s="4.5e10").inter_node_bytes_per_s == 4.5e10  # PyYAML reads 4.5e10 as text
    assert ParallelConfig().workers_per_node is None and RebalanceConfig().planner == "global"


# ---- topology ----------------------------------------------------------------------------------


def test_workers_per_node_from_node_ids_needs_contiguous_equal_nodes():
    assert node_layout(["a", "a", "b", "b"])[0] == 2
    assert node_layout(["a"] * 4)[0] == 4
    per_node, why = node_layout(["a", "b", "a", "b"])
    assert per_node is None and "not contiguous" in why
    per_node, why = node_layout(["a", "a", "a", "b"])
    assert per_node is None and "different numbers" in why


def test_topology_from_config_and_the_flat_fallbacks():
    setup = PlanningSetup(workers_per_node=2, inter_node_bytes_per_s=10e9)
    topology, why = setup.topology(4, 3, 2)
    assert (topology.num_nodes, topology.workers_per_node, topology.slots_per_worker) == (2, 2, 3)
    assert topology.inter_node_gbps == 10.0 and topology.intra_node_gbps == LinkRates().intra_node_bytes_per_s / 1e9
    topology, why = setup.topology(5, 3, 2)
    assert topology.num_nodes == 1 and topology.num_workers == 5 and "no multiple" in why
    assert setup.workers_per_node_for(["a", "b", "a", "b"])[0] == 2  # configured wins over node ids
    assert PlanningSetup().workers_per_node_for(["a", "b", "a", "b"])[0] is None


# ---- the coordinator choosing a planner (fake clock) ---------------------------------------------


def config_for(planner="global", workers_per_node=2, inter=None, **model):
    parallel = {"num_workers": W, "workers_per_node": workers_per_node, "redundant_slots_per_worker": 1}
    if inter is not None:
        parallel["topology"] = {"inter_node_bytes_per_s": inter}
    return EngineConfig(model=tiny_model_config(num_experts=E, **model), parallel=parallel,
                        rebalance={"planner": planner, "tokens_per_step": 4096})


def make_core(config, node_ids=None):
    placement = Placement.contiguous(L, E, W, config.slots_per_worker)
    return CoordinatorCore(placement=placement, bytes_per_expert=100, window_steps=8,
                           policy_config=PolicyConfig(min_gain=1.05, cooldown_s=5, min_tokens=10, confirmations=1),
                           planning=PlanningSetup.from_config(config), node_ids=node_ids)


def skewed_load():
    load = np.full((L, E), 40, dtype=np.int64)
    load[0, 0], load[1, 5] = 2000, 1200
    load[:, 3] = 400
    return load * W


def feed(core, load_LE):
    spw = core.placement.slots_per_worker
    for w in range(W):
        core.ingest(LoadSnapshot(w, core.epoch, 0, 8, 0, load_LE // W, np.zeros((L, spw), dtype=np.int64)))


def planned(core, now=100.0):
    feed(core, skewed_load())
    new = core.maybe_plan(now=now)
    assert new is not None, core.last_decision
    new.placement.validate()
    record = core.records[-1]
    assert (record.planner, record.planner_reason) == (core.last_choice.planner, core.last_choice.reason)
    view = core.view(timeline=False)["planner"]
    assert view["last"] == record.planner and view["last_reason"] == record.planner_reason
    assert core.summary()["planner"] == view
    return new, record


def test_global_is_the_default_and_plans_as_before():
    from placement.planner import plan

    core = make_core(config_for("global"))
    assert (core.topology.num_nodes, core.topology.workers_per_node) == (2, 2)
    new, record = planned(core)
    assert record.planner == "global"
    before = Placement.contiguous(L, E, W, core.topology.slots_per_worker)
    expected = plan(core.planning_load_LE, core.topology, before, 100)
    np.testing.assert_array_equal(new.placement.phy2log, expected.placement.phy2log)


def test_hierarchical_runs_the_planners_hierarchical_mode():
    from placement.planner import PlannerOptions, plan

    core = make_core(config_for("hierarchical"))
    before = core.placement
    new, record = planned(core)
    assert record.planner == "hierarchical" and "2 expert groups on 2 nodes" in record.planner_reason
    expected = plan(core.planning_load_LE, core.topology, before, 100, PlannerOptions(hierarchical=True, num_groups=2))
    np.testing.assert_array_equal(new.placement.phy2log, expected.placement.phy2log)
    np.testing.assert_allclose(new.placement.replica_weights, expected.placement.replica_weights)


def test_hierarchical_on_one_node_is_global_with_the_reason():
    core = make_core(config_for("hierarchical", workers_per_node=None))
    _, record = planned(core)
    assert record.planner == "global" and "one node" in record.planner_reason


def test_auto_takes_hierarchical_when_the_cost_model_says_it_pays():
    # group-limited routing (each token in 1 of 2 groups) over a slow inter-node link: fewer nodes
    # per token pays more than the balance it costs
    slow = config_for("auto", inter=1e6, n_group=2, topk_group=1)
    _, record = planned(make_core(slow))
    assert record.planner == "hierarchical" and "hierarchical pays" in record.planner_reason
    assert "modelled layer time" in record.planner_reason
    # without routing groups a token reaches as many nodes either way: only the balance counts
    _, record = planned(make_core(config_for("auto", inter=1e6)))
    assert record.planner == "global" and "does not pay" in record.planner_reason


def test_layout_on_a_skewed_load_returns_a_valid_placement_with_weights():
    core = make_core(config_for("layout"))
    new, record = planned(core)
    assert record.planner == "layout" and "per layer:" in record.planner_reason
    placement = new.placement
    assert placement.version == 1 and placement.replica_weights is not None
    assert placement.num_workers == W and placement.num_experts == E
    assert (placement.logcnt > 0).all()
    assert new.predicted_imbalance_LAYERS.shape == (L,)


def test_node_ids_give_the_topology_and_a_resize_keeps_workers_per_node():
    config = config_for("global", workers_per_node=None)
    core = make_core(config, node_ids=("n1", "n1", "n2", "n2"))
    assert (core.topology.num_nodes, core.topology.workers_per_node) == (2, 2)
    assert "node ids" in core.view(timeline=False)["planner"]["topology_reason"]
    core.resize(Placement.contiguous(L, E, 6, config.slots_per_worker).validate(), epoch=1)
    assert (core.topology.num_nodes, core.topology.workers_per_node) == (3, 2)
    core.resize(Placement.contiguous(L, E, 3, config.slots_per_worker).validate(), epoch=2)
    assert core.topology.num_nodes == 1 and "no multiple" in core.topology_reason
    interleaved = make_core(config, node_ids=("n1", "n2", "n1", "n2"))
    assert interleaved.topology.num_nodes == 1 and "not contiguous" in interleaved.topology_reason


def test_commit_and_resync_take_the_placement_with_its_weights():
    core = make_core(config_for("global"))
    new, _ = planned(core)
    core.committed(new.placement.version, step=8)
    assert core.placement is new.placement and core.replica_weights_LS is new.placement.replica_weights
    core.resync(new.placement, epoch=1, step=9)
    np.testing.assert_array_equal(core.replica_weights_LS, new.placement.replica_weights)


# ---- the Placement that crosses actors ------------------------------------------------------------


def test_a_pickled_placement_arrives_read_only_without_its_derived_maps():
    p = Placement.contiguous(L, E, W, 3)
    weights = np.where(p.phy2log >= 0, 1.0, 0.0)
    p = Placement(p.phy2log, E, 3, 7, replica_weights=weights).validate()
    p.log2phy  # noqa: B018  (cached)
    back = pickle.loads(pickle.dumps(p))
    assert back.version == 7 and "log2phy" not in back.__dict__
    for array in (back.phy2log, back.replica_weights):
        assert not array.flags.writeable
    np.testing.assert_array_equal(back.log2phy, p.log2phy)


def test_a_worker_refuses_a_placement_for_another_config():
    from moeray.worker import accepted_placement

    config = config_for("global")
    good = Placement.contiguous(L, E, W, config.slots_per_worker)
    assert accepted_placement(good, config, rank=3) is good
    with pytest.raises(ValueError, match=r"slots_per_worker=4 \(config: 3\)"):
        accepted_placement(Placement.contiguous(L, E, W, 4), config, rank=0)
    with pytest.raises(ValueError, match=r"num_workers=8 \(config: 4\)"):
        accepted_placement(Placement.contiguous(L, E, 8, config.slots_per_worker), config, rank=0)
    with pytest.raises(ValueError, match="has no slot"):
        accepted_placement(Placement(np.full((L, W * 3), -1), E, 3), config, rank=0)
    with pytest.raises(TypeError, match="placement.Placement"):
        accepted_placement(good.phy2log, config, rank=0)


def test_a_saved_state_keeps_shard_widths_and_one_without_them_still_loads():
    from moeray.serving import persist

    config = config_for("global")
    spw = config.slots_per_worker
    slots = Placement.contiguous(L, E, W, spw).phy2log
    record = {"schema": persist.SCHEMA, "version": 3, "num_workers": W, "phy2log": slots.tolist(),
              "replica_weights": None, "fingerprint": persist.fingerprint(config, "ckpt"), "saved_at": 0}
    placement, why = persist.resume_placement(record, config, "ckpt")  # an old record: no shard_width key
    assert placement.version == 3 and placement.shard_width is None, why
    widths = np.where(slots >= 0, 1.0, 0.0)
    placement, why = persist.resume_placement({**record, "shard_width": widths.tolist()}, config, "ckpt")
    np.testing.assert_array_equal(placement.shard_width, widths)
    placement, why = persist.resume_placement({**record, "shard_width": [[0.5]]}, config, "ckpt")
    assert placement is None and "not valid" in why
