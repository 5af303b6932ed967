"""Where a B=1 prefill's time goes on one GPU: the runner's own step in this process (stats on and
off) against the same step inside a Ray worker's loop (the step time the worker reports).
usage: python scripts/diagnose_prefill.py MODEL_DIR"""
import sys
import time

import numpy as np
import torch

from moeray.config import EngineOptions
from moeray.generation.messages import NewSequence, StepPlan
from moeray.generation.sampling import SamplingParams
from moeray.llm import LLM, engine_config_for
from moeray.worker import Worker
from placement import Placement

directory = sys.argv[1]
rng = np.random.default_rng(0)
params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
cache = {"block_size": 16, "kv_tokens_per_worker": 8192, "max_num_seqs": 64, "max_num_batched_tokens": 8192}


def prompt():
    return tuple(rng.integers(3, 32000, 128).tolist())


for stats in (True, False):
    config = engine_config_for(directory, EngineOptions(parallel={"device": "cuda"}, rebalance={"enabled": False},
                                                        stats={"enabled": stats}, cache=cache))
    cfg = config.model
    worker = Worker(0, config, directory, Placement.contiguous(cfg.num_moe_layers, cfg.num_experts, 1,
                                                               config.slots_per_worker))
    times = []
    for i in range(8):
        plan = StepPlan(new=(NewSequence(f"r{i}", prompt(), params, 10),))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        worker.run_step(plan)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
        worker.runner.reset()
    print(f"in-process runner prefill B=1 stats={stats}: " + " ".join(f"{t:.1f}" for t in times), flush=True)
    del worker
    torch.cuda.empty_cache()

with LLM(directory, device="cuda", cache=cache, rebalance={"enabled": False}) as llm:
    driver = llm.driver
    for i in range(6):
        t0 = time.perf_counter()
        rid = driver.add_request(list(prompt()), params)
        seen = []
        while driver.has_unfinished():
            outs = driver.step()
            if outs:
                seen.append((round(1e3 * (time.perf_counter() - t0), 1), driver.last_step["worker_steps"],
                             round(driver.last_step["worker_step_ms_total"], 1)))
        print(f"LLM request {i}: (ms since add, steps in report, worker step ms) {seen}", flush=True)
