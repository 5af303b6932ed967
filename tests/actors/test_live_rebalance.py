"""Live rebalancing on CPU workers: every slot checked by value after each migration, outputs equal
the reference before, during and after, and a drifting stream gets rebalanced by the policy."""

import numpy as np
import torch

from moeray.config import EngineConfig, ParallelConfig, RebalanceConfig, StatsConfig
from moeray.engine import Engine
from safetensors.torch import load_file, save_file

from moeray.models.checkpoint import CheckpointReader, load_reference_model
from moeray.streams import DriftingStream
from tests.helpers import engine_logits, make_checkpoint, max_rel_error, reference_logits


def encode_layer_expert(ckpt: str, num_layers: int, num_experts: int) -> None:
    """Write (layer, expert) into each expert's down_proj[0, 0] as (1000 * layer + expert) / 1e6
    (Qwen3-MoE checkpoint names: every decoder layer is an MoE layer)."""
    path = f"{ckpt}/model.safetensors"
    tensors = load_file(path)
    for layer in range(num_layers):
        for expert in range(num_experts):
            tensors[f"model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"][0, 0] = (1000 * layer + expert) / 1e6
    save_file(tensors, path, metadata={"format": "pt"})


def decode_layer_expert(w2_DF: np.ndarray) -> tuple[int, int]:
    code = int(round(float(w2_DF[0, 0]) * 1e6))
    return code // 1000, code % 1000


def assert_every_slot_holds_its_expert(engine, reader):
    """Each worker's slot s of layer l decodes to (l, phy2log[l, s]) and holds, bit for bit, the
    checkpoint weights of that expert (so every replica is an exact copy)."""
    import ray

    p = engine.placement()
    for rank, worker in enumerate(engine.workers):
        for layer in range(p.num_layers):
            w13_SHD, w2_SDF = ray.get(worker.slot_weights.remote(layer))
            experts = p.slots_of_worker(rank)[layer]
            want_w13, want_w2 = reader.read_expert_slots(layer, experts, torch.float32)
            for s, expert in enumerate(experts):
                if expert >= 0:
                    assert decode_layer_expert(w2_SDF[s]) == (layer, expert), f"worker {rank} layer {layer} slot {s}"
                    assert np.array_equal(w13_SHD[s], want_w13[s].numpy()), f"worker {rank} layer {layer} slot {s} (expert {expert})"
                    assert np.array_equal(w2_SDF[s], want_w2[s].numpy()), f"worker {rank} layer {layer} slot {s} (expert {expert})"


def test_forced_rebalances_move_weights_exactly_and_never_change_outputs(ray_cluster, tmp_path):
    ckpt, model_cfg, _ = make_checkpoint(tmp_path, seed=5, num_experts=7, top_k=2, num_hidden_layers=3)
    encode_layer_expert(ckpt, model_cfg.num_moe_layers, model_cfg.num_experts)
    reference = load_reference_model(ckpt)
    config = EngineConfig(
        model=model_cfg,
        parallel=ParallelConfig(num_workers=3, redundant_slots_per_worker=2, collective_timeout_s=30),
        stats=StatsConfig(snapshot_interval_steps=2),
        rebalance=RebalanceConfig(enabled=False, window_steps=8),  # forced rebalances only
    )
    reader = CheckpointReader(ckpt)
    versions = []
    with Engine(config, ckpt) as engine:
        for round_, hot_fraction in enumerate((0.9, 0.8, 0.95)):
            stream = DriftingStream(model_cfg.vocab_size, 48, phase_steps=1000, hot_fraction=hot_fraction, seed=round_)
            for _ in range(6):
                ids = stream.next_batch()
                assert max_rel_error(engine_logits(engine, [ids])[0], reference_logits(reference, ids)) <= 1e-5
            version = engine.rebalance(force=True)
            ids = stream.next_batch()  # this step commits the staged version on every worker
            assert max_rel_error(engine_logits(engine, [ids])[0], reference_logits(reference, ids)) <= 1e-5
            assert engine.placement().version == version
            versions.append(version)
            assert_every_slot_holds_its_expert(engine, reader)
        assert versions == [1, 2, 3]
        assert engine.placement().logcnt.max() > 1, "hot experts were replicated"
        stats = engine.stats()
        assert stats["placement_version"] == 3
        assert [r["version"] for r in stats["rebalances"]] == [1, 2, 3]
        assert all(r["committed_at_step"] is not None and r["transfer_ms"] is not None for r in stats["rebalances"])


def test_policy_rebalances_a_drifting_stream_while_outputs_stay_exact(ray_cluster, tmp_path):
    ckpt, model_cfg, reference = make_checkpoint(tmp_path, seed=6, num_experts=8, top_k=2, num_hidden_layers=2)
    config = EngineConfig(
        model=model_cfg,
        parallel=ParallelConfig(num_workers=4, redundant_slots_per_worker=2, collective_timeout_s=30),
        stats=StatsConfig(snapshot_interval_steps=2),
        rebalance=RebalanceConfig(window_steps=8, check_interval_steps=2, cooldown_s=0, min_tokens=100),
    )
    stream = DriftingStream(model_cfg.vocab_size, 64, phase_steps=30, hot_fraction=0.9, seed=3)
    with Engine(config, ckpt) as engine:
        for _ in range(60):  # two phases: the hot experts move at step 30
            ids = stream.next_batch()
            assert max_rel_error(engine_logits(engine, [ids])[0], reference_logits(reference, ids)) <= 1e-5
        stats = engine.stats()  # flushes the workers' last counts to the coordinator first
        assert engine.rebalance_errors == [], engine.rebalance_errors
    committed = [r for r in stats["rebalances"] if r["committed_at_step"] is not None]
    assert committed, (stats["last_decision"], stats["rebalances"], stats["reports"], stats["window_steps"])
    assert any(r["committed_at_step"] < 30 for r in committed), stats["rebalances"]
    assert any(r["committed_at_step"] > 30 for r in committed), "the drift triggered a new placement"
    assert stats["imbalance_mean"] < 1.15, stats["imbalance_per_layer"]
    first = committed[0]
    assert first["predicted_before"] > 1.5 and first["predicted_after"] < first["predicted_before"]


def test_a_hierarchical_plan_on_two_nodes_of_two_workers_keeps_outputs_exact(ray_cluster, tmp_path):
    """rebalance.planner="hierarchical" with parallel.workers_per_node=2: the coordinator plans on
    2 nodes x 2 workers, the log names the planner, the migration lands slot by slot."""
    ckpt, model_cfg, _ = make_checkpoint(tmp_path, seed=8, num_experts=8, top_k=2, num_hidden_layers=2)
    encode_layer_expert(ckpt, model_cfg.num_moe_layers, model_cfg.num_experts)
    reference = load_reference_model(ckpt)
    config = EngineConfig(
        model=model_cfg,
        parallel=ParallelConfig(num_workers=4, redundant_slots_per_worker=1, collective_timeout_s=30, workers_per_node=2),
        stats=StatsConfig(snapshot_interval_steps=2),
        rebalance=RebalanceConfig(enabled=False, window_steps=8, planner="hierarchical"),
    )
    stream = DriftingStream(model_cfg.vocab_size, 48, phase_steps=1000, hot_fraction=0.9, seed=4)
    with Engine(config, ckpt) as engine:
        for _ in range(6):
            ids = stream.next_batch()
            assert max_rel_error(engine_logits(engine, [ids])[0], reference_logits(reference, ids)) <= 1e-5
        version = engine.rebalance(force=True)
        ids = stream.next_batch()  # commits it
        assert max_rel_error(engine_logits(engine, [ids])[0], reference_logits(reference, ids)) <= 1e-5
        assert engine.placement().version == version == 1
        assert_every_slot_holds_its_expert(engine, CheckpointReader(ckpt))
        stats = engine.stats()
    assert (stats["planner"]["configured"], stats["planner"]["nodes"], stats["planner"]["workers_per_node"]) == (
        "hierarchical", 2, 2)
    record = stats["rebalances"][-1]
    assert record["planner"] == "hierarchical" and "2 nodes" in record["planner_reason"], record
