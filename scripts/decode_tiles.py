"""Captured decode step time on one GPU worker (in process) for expert-kernel tile variants.
Prediction: at B=64 (Mixtral-shaped, 8 experts, top-2) a slot gets 16 rows on average but up to
~30, so with BM=16 tiles the busiest slots stream their weights twice; BM=32 should cut the
experts' part of the step (up to ~1 ms of 5.6) and cost nothing at B=1.
usage: python scripts/decode_tiles.py [MODEL_DIR]   (default: bench generate's mixtral-4l preset, written if missing)"""
import argparse
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from moeray.config import EngineOptions
from moeray.generation.messages import NewSequence, StepPlan
from moeray.generation.sampling import SamplingParams
from moeray.kernels import triton_swiglu
from moeray.llm import engine_config_for
from moeray.worker import Worker
from placement import Placement

from moeray.bench.generate import model_dir

directory = sys.argv[1] if len(sys.argv) > 1 else model_dir(argparse.Namespace(
    model=None, preset="mixtral-4l", cache_dir="/tmp/moeray-bench-models", seed=0, device="cuda"))
batches = [1, 16, 64, 128, 256]
config = engine_config_for(directory, EngineOptions(
    parallel={"device": "cuda"}, rebalance={"enabled": False}, stats={"enabled": True},
    cache={"block_size": 16, "kv_tokens_per_worker": 256 * 220, "max_num_seqs": 256, "max_num_batched_tokens": 65536}))
cfg = config.model
worker = Worker(0, config, directory, Placement.contiguous(cfg.num_moe_layers, cfg.num_experts, 1,
                                                           config.slots_per_worker))
runner = worker.runner
default_table = list(triton_swiglu._TABLE)


def with_decode_bm(bm, stages=None):
    table = list(default_table)
    r_max, f_min, up, down = table[0]
    if stages is not None:
        up, down = replace(up, num_stages=stages), replace(down, num_stages=stages)
    table[0] = (r_max, f_min, replace(up, BM=bm), replace(down, BM=bm))
    return table


# BM=64 with 3 stages needs 240 KB of shared memory for the gate/up tiles (limit 227 KB): 2 stages.
variants = {"default (BM16)": default_table, "decode BM32": with_decode_bm(32),
            "decode BM64 2st": with_decode_bm(64, stages=2)}
rng = np.random.default_rng(0)
params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
print("B  " + "  ".join(f"{name:>16s}" for name in variants), flush=True)
for batch in batches:
    row = []
    for name, table in variants.items():
        triton_swiglu._TABLE[:] = table
        runner.reset()
        runner.invalidate_graphs()
        new = tuple(NewSequence(f"s{b}", tuple(rng.integers(3, cfg.vocab_size, 128).tolist()), params, 13)
                    for b in range(batch))
        runner.step(StepPlan(new=new))
        times = []
        for i in range(40):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            worker.run_step(StepPlan())
            times.append(1e3 * (time.perf_counter() - t0))
        row.append(float(np.median(times[8:])))
        torch.cuda.synchronize()
    print(f"{batch:<3d}" + "  ".join(f"{t:16.3f}" for t in row), flush=True)
triton_swiglu._TABLE[:] = default_table
