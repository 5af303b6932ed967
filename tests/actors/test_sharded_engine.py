"""Sharded experts on the engine (CPU workers on Gloo): logits equal the reference (fp32) with
shards of 2 and 3 uneven widths mixed with replicas and whole slots, on 1-4 workers, with the
planned split and the per-batch split, before / at / after migrations that turn a replicated
expert into shards, move shards between workers (column pieces) and make them whole again; every
slot holds, bit for bit, the packed columns of its expert.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from moeray.config import EngineConfig, ParallelConfig, RebalanceConfig, StatsConfig
from moeray.engine import Engine
from moeray.models.checkpoint import CheckpointReader
from moeray.shard_slots import columns_of_worker, pack_columns
from placement import Placement

from tests.helpers import (engine_logits, make_checkpoint, max_rel_error, random_replicated_placement,
                           random_sharded_placement, reference_logits)

EXPERTS, TOP_K, LAYERS = 6, 3, 2
PROMPTS = [[5, 17, 33, 9, 100, 250, 3], [42], list(range(60, 83))]


@pytest.fixture(scope="module")
def model(ray_cluster, tmp_path_factory):
    ckpt, cfg, reference = make_checkpoint(tmp_path_factory.mktemp("sharded"), seed=9, num_experts=EXPERTS,
                                           top_k=TOP_K, num_hidden_layers=LAYERS, moe_intermediate_size=37)
    return ckpt, cfg, reference, [reference_logits(reference, p) for p in PROMPTS]


def config_for(model_cfg, workers: int, spw: int, split: str) -> EngineConfig:
    return EngineConfig(
        model=model_cfg,
        parallel=ParallelConfig(num_workers=workers, slots_per_worker=spw, collective_timeout_s=30, replica_split=split),
        stats=StatsConfig(snapshot_interval_steps=2),
        rebalance=RebalanceConfig(enabled=False, window_steps=8),  # placements given by the test only
    )


def assert_matches_reference(engine, want):
    for got, ref in zip(engine_logits(engine, PROMPTS), want):
        assert max_rel_error(got, ref) <= 1e-4


def assert_slots_hold_their_columns(engine, ckpt):
    """Each worker's slot holds its expert's columns packed first and zeros after, bit for bit."""
    reader = CheckpointReader(ckpt)
    p = engine.placement()
    ffn = engine.config.model.moe_intermediate_size
    for rank, worker in enumerate(engine.workers):
        for layer in range(p.num_layers):
            w13_SHD, w2_SDF = ray.get(worker.slot_weights.remote(layer))
            experts = p.slots_of_worker(rank)[layer]
            whole13, whole2 = reader.read_expert_slots(layer, experts, torch.float32)
            want13, want2 = pack_columns(whole13, whole2, columns_of_worker(p, layer, rank, ffn))
            held = experts >= 0
            assert np.array_equal(w13_SHD[held], want13.numpy()[held]), f"worker {rank} layer {layer}"
            assert np.array_equal(w2_SDF[held], want2.numpy()[held]), f"worker {rank} layer {layer}"


def as_sharded(placement: Placement, seed: int) -> Placement:
    """The same slots with each replicated expert's first 2 or 3 slots made one replica of shards
    (uneven widths in 1/16ths): replicated experts become sharded ones and no expert moves."""
    rng = np.random.default_rng(seed)
    width_LS = (placement.phy2log >= 0).astype(np.float64)
    for layer in range(placement.num_layers):
        for expert in range(placement.num_experts):
            slots = np.flatnonzero(placement.phy2log[layer] == expert)
            if len(slots) >= 2:
                k = min(len(slots), int(rng.choice([2, 3])))
                cuts = np.sort(rng.choice(np.arange(1, 16), size=k - 1, replace=False))
                width_LS[layer, slots[:k]] = np.diff(np.r_[0, cuts, 16]) / 16.0
    return Placement(placement.phy2log, placement.num_experts, placement.slots_per_worker, placement.version,
                     shard_width=width_LS).validate()


CASES = [  # (workers, slots per worker, split)
    (3, 4, "planned"),      # shards of 2 and 3 with replicas and whole slots
    (2, 4, "per_batch"),    # shards of 2 and replicas, the per-batch split
    (4, 3, "per_batch"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"W{c[0]}-{c[2]}" for c in CASES])
def test_sharded_engine_equals_reference_through_migrations(model, case):
    ckpt, model_cfg, _, want = model
    workers, spw, split = case
    start = random_sharded_placement(LAYERS, EXPERTS, workers, spw, seed=workers, weighted=True)
    assert start.is_sharded
    with Engine(config_for(model_cfg, workers, spw, split), ckpt, placement=start) as engine:
        assert_matches_reference(engine, want)
        assert_slots_hold_their_columns(engine, ckpt)
        replicated = random_replicated_placement(LAYERS, EXPERTS, workers, spw, seed=workers + 20)
        targets = [
            replicated,                         # shards -> whole slots and replicas (pieces reassembled)
            as_sharded(replicated, seed=31),    # replicated -> sharded in place (a local repack)
            random_sharded_placement(LAYERS, EXPERTS, workers, spw, seed=workers + 40),  # shards move
        ]
        for target in targets:
            version = engine.rebalance(force=True, placement=target)
            assert version is not None, engine.rebalance_errors
            assert_matches_reference(engine, want)  # the step that commits the new version
            assert engine.placement().version == version
            assert np.array_equal(engine.placement().phy2log, target.phy2log)
            assert np.allclose(engine.placement().width_LS, target.width_LS)
            assert_matches_reference(engine, want)
            assert_slots_hold_their_columns(engine, ckpt)
        assert engine.rebalance_errors == []


def test_one_worker_with_the_per_batch_split_equals_reference(model):
    ckpt, model_cfg, _, want = model
    with Engine(config_for(model_cfg, 1, EXPERTS, "per_batch"), ckpt) as engine:
        assert_matches_reference(engine, want)


def test_a_lost_worker_with_shards_is_recovered_and_outputs_stay_exact(model):
    """A worker holding shards dies: the survivors shrink to a whole-expert placement for the new
    count (the recovery planners do not shard), reading every slot they need from the checkpoint,
    and the engine equals the reference again (the generation driver recovers and re-runs the
    requests in flight); so does a later migration back to shards."""
    ckpt, model_cfg, _, want = model
    start = random_sharded_placement(LAYERS, EXPERTS, 4, 3, seed=4, weighted=True)
    config = config_for(model_cfg, 4, 3, "per_batch").model_copy(
        update={"parallel": ParallelConfig(num_workers=4, slots_per_worker=3, collective_timeout_s=10,
                                           replica_split="per_batch", rejoin=False)})
    with Engine(config, ckpt, placement=start) as engine:
        assert_matches_reference(engine, want)
        ray.kill(engine.workers[1])
        assert_matches_reference(engine, want)  # the driver recovers (shrinks) and re-runs the requests
        assert len(engine.workers) == 3 and not engine.placement().is_sharded
        assert_matches_reference(engine, want)
        assert_slots_hold_their_columns(engine, ckpt)
        target = random_sharded_placement(LAYERS, EXPERTS, 3, engine.placement().slots_per_worker, seed=8)
        assert engine.rebalance(force=True, placement=target) is not None
        assert_matches_reference(engine, want)
        assert engine.placement().is_sharded
        assert_slots_hold_their_columns(engine, ckpt)


def test_scaling_up_from_shards_starts_joiners_on_whole_copies_only(model):
    """A scale from a sharded placement: joiners take live copies only of whole slots (a shard is
    no copy of its expert) and read the rest from the checkpoint; outputs stay exact."""
    from moeray.generation.driver import GenerationDriver

    ckpt, model_cfg, _, want = model
    start = random_sharded_placement(LAYERS, EXPERTS, 2, 4, seed=2)
    config = config_for(model_cfg, 2, 4, "planned")
    with Engine(config, ckpt, placement=start) as engine:
        assert_matches_reference(engine, want)
        GenerationDriver(engine).scale(3)
        assert len(engine.workers) == 3
        assert_matches_reference(engine, want)
        assert_slots_hold_their_columns(engine, ckpt)
