"""The engine on GPUs (Ray actors, NCCL) equals the single-process reference, generation included,
and a migration on GPUs (chunked NCCL p2p) keeps it so. The reference runs the same math on GPU 0
in the same dtype, so routing decisions match and only the summation order differs.

Legend: T tokens, V vocab.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeray.generation.sampling import SamplingParams
from tests.helpers import engine_logits, make_checkpoint, reference_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {"float32": 1e-2, "bfloat16": 3e-2}  # per position: max |diff| / max |ref| over the logits
# bf16: a near-tie in the router can flip one expert of a token between two summation orders (seen on
# 2 H200: one token in a few hundred off by ~0.13); through attention such a flip also moves the
# positions after it a little. bf16 allows that for at most 5% of positions; float32 allows none.
FLIPS = {"float32": 0.0, "bfloat16": 0.05}
MODEL = dict(hidden_size=256, moe_intermediate_size=512, num_experts=16, top_k=4, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def assert_close(got, want, dtype):
    scale = max(float(np.abs(want).max()), 1e-30)
    err_T = np.abs(got - want).max(axis=1) / scale
    bad = float((err_T > TOL[dtype]).mean())
    assert bad <= FLIPS[dtype], f"{bad:.1%} of positions off by > {TOL[dtype]} (worst {err_T.max():.3g}, median {np.median(err_T):.2g})"


def _llm(ckpt, gpus, dtype, **kw):
    from moeray.llm import LLM

    parallel = {"collective_timeout_s": kw.pop("timeout", 60), "overlap_chunks": kw.pop("chunks", 1)}
    return LLM(ckpt, num_workers=gpus, device="cuda", dtype=dtype, parallel=parallel, **kw)


@pytest.mark.parametrize("dtype,chunks", [("float32", 1), ("bfloat16", 1), ("bfloat16", 3)])
@pytest.mark.parametrize("gpus", [1, 2])
def test_engine_matches_reference(ray_cluster, tmp_path, gpus, dtype, chunks):
    """chunks > 1: the overlapped layer step (exchanges in flight under the expert kernels)."""
    if gpus == 1 and chunks > 1:
        pytest.skip("one GPU has no exchange to overlap")
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    ckpt, cfg, model = make_checkpoint(tmp_path, family="mixtral", dtype=dtype, **MODEL)
    model = model.to("cuda")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n) for n in (333, 1, 57)]  # one worker may get none
    with _llm(ckpt, gpus, dtype, chunks=chunks, stats={"enabled": False}, rebalance={"enabled": False}) as llm:
        for got, ids in zip(engine_logits(llm.engine, prompts), prompts):
            assert_close(got, reference_logits(model, ids), dtype)
        if dtype == "float32":  # greedy generation token for token (bf16 near-ties may legitimately differ)
            from moeray.generation.reference import greedy_generate

            outs = llm.generate([p.tolist() for p in prompts], SamplingParams(max_tokens=16, temperature=0.0))
            for out, ids in zip(outs, prompts):
                assert list(out.outputs[0].token_ids) == greedy_generate(model, ids.tolist(), 16, cfg.eos_token_ids)


def test_migration_on_gpus(ray_cluster, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    ckpt, cfg, model = make_checkpoint(tmp_path, family="mixtral", dtype="bfloat16", **MODEL)
    model = model.to("cuda")
    rng = np.random.default_rng(1)
    probs = np.r_[np.full(4, 10.0), np.ones(cfg.vocab_size - 4)]
    ids_T = rng.choice(cfg.vocab_size, size=512, p=probs / probs.sum())  # skewed tokens -> skewed routing
    want = reference_logits(model, ids_T)
    with _llm(ckpt, 2, "bfloat16", redundant_slots_per_worker=2, stats={"snapshot_interval_steps": 1},
              rebalance={"enabled": False, "min_tokens": 0}) as llm:
        engine = llm.engine
        before = engine_logits(engine, [ids_T])[0]
        engine.stats(flush=True)
        version = engine.rebalance(force=True)
        assert version == 1
        during = engine_logits(engine, [ids_T])[0]  # commits v1 at this step boundary
        after = engine_logits(engine, [ids_T])[0]
        summary = engine.stats(flush=True)
        record = summary["rebalances"][-1]
        print(f"migration: {record['slots_moved']} slots, {record['bytes_moved']} bytes, transfer {record['transfer_ms']:.1f} ms")
        assert record["committed_at_step"] is not None and record["slots_moved"] > 0
        for got in (before, during, after):
            assert_close(got, want, "bfloat16")


def test_recover_after_a_gpu_worker_dies(ray_cluster, tmp_path):
    """Kill one GPU worker: the step fails within the timeout, recover() restarts the workers
    (all of them on GPUs) under a new epoch, and the engine equals the reference again."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import ray

    from moeray.errors import CollectiveError, WorkerLost
    from moeray.generation.messages import StepPlan

    ckpt, cfg, model = make_checkpoint(tmp_path, family="mixtral", dtype="bfloat16", **MODEL)
    ids_T = np.random.default_rng(3).integers(0, cfg.vocab_size, size=200)
    want = reference_logits(model.to("cuda"), ids_T)
    with _llm(ckpt, 2, "bfloat16", timeout=10, stats={"snapshot_interval_steps": 1},
              rebalance={"enabled": False}) as llm:
        engine = llm.engine
        assert_close(engine_logits(engine, [ids_T])[0], want, "bfloat16")
        ray.kill(engine.workers[1])
        with pytest.raises((WorkerLost, CollectiveError)):
            engine.step([StepPlan(), StepPlan()])
        done = engine.recover()
        assert done["replaced"] == [0, 1] and done["epoch"] == 1
        assert_close(engine_logits(engine, [ids_T])[0], want, "bfloat16")
        assert engine.stats()["placement_version"] == 0
