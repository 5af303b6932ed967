"""`moeray demo`: the local mode end to end on CPU workers, generating text.

Writes the built-in tiny model (a Qwen3-MoE-family model with random weights, in HF format, with a
byte-level BPE tokenizer) to a temporary directory, starts a local Ray cluster and the worker group,
and generates for many concurrent requests (continuous batching). Prompts are skewed (Zipf-
distributed token ids, so some experts run hot), which the coordinator sees in the live routing
statistics and rebalances while generation goes on. Checks the first prompt's greedy output
against the single-process reference, then prints the text of a few requests, throughput and
per-worker / per-expert load.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from moeray.generation.reference import greedy_generate
from moeray.generation.sampling import SamplingParams
from moeray.llm import LLM
from moeray.models.checkpoint import load_reference_model
from moeray.models.tiny import write_tiny_model
from moeray.streams import zipf_tokens

TEXT_PROMPTS = ["The experts of a mixture", "Ray actors own the slots", "Balance the load while serving"]


class DemoOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    workers: int = Field(default=4, ge=1, le=64)
    experts: int = Field(default=16, ge=1)
    top_k: int = Field(default=2, ge=1)
    layers: int = Field(default=4, ge=1)
    requests: int = Field(default=48, ge=1, description="generation requests")
    prompt_tokens: int = Field(default=48, ge=1, description="tokens per skewed prompt")
    max_tokens: int = Field(default=24, ge=1, description="tokens generated per request")
    zipf: float = Field(default=1.2, gt=1.0, description="prompt token-id skew; larger is more skewed")
    redundant_slots: int = Field(default=1, ge=0)
    rebalance: bool = Field(default=True, description="live rebalancing by the coordinator")
    seed: int = 0


def _bar(value: float, peak: float, width: int = 30) -> str:
    filled = int(round(width * value / peak)) if peak > 0 else 0
    return "#" * filled + "." * (width - filled)


def run_demo(opts: DemoOptions) -> dict:
    rng = np.random.default_rng(opts.seed)
    with tempfile.TemporaryDirectory(prefix="moeray-demo-") as ckpt:
        _, model_cfg = write_tiny_model(ckpt, seed=opts.seed, num_experts=opts.experts, top_k=opts.top_k,
                                        num_hidden_layers=opts.layers)
        t0 = time.perf_counter()
        with LLM(ckpt, num_workers=opts.workers, redundant_slots_per_worker=opts.redundant_slots, seed=opts.seed,
                 stats={"snapshot_interval_steps": 4},
                 rebalance={"enabled": opts.rebalance, "window_steps": 16, "check_interval_steps": 4,
                            "cooldown_s": 1.0, "min_tokens": 500}) as llm:
            startup_s = time.perf_counter() - t0
            print(f"started {opts.workers} workers ({llm.engine.config.slots_per_worker} slots each) in {startup_s:.1f}s")
            check = llm.generate(TEXT_PROMPTS[0], SamplingParams(max_tokens=opts.max_tokens, temperature=0.0))[0]
            want = greedy_generate(load_reference_model(ckpt), list(check.prompt_token_ids), opts.max_tokens,
                                   model_cfg.eos_token_ids)
            matches = list(check.outputs[0].token_ids) == want
            if not matches:
                raise AssertionError(f"engine generation differs from the reference: {check.outputs[0].token_ids} "
                                     f"vs {want}")
            prompts = [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] if i < len(TEXT_PROMPTS) else
                       zipf_tokens(model_cfg.vocab_size, opts.prompt_tokens, opts.zipf, rng).tolist()
                       for i in range(opts.requests)]
            params = SamplingParams(max_tokens=opts.max_tokens, temperature=0.8, top_p=0.95, seed=opts.seed)
            t = time.perf_counter()
            steps_before = llm.engine.steps
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - t
            steps = llm.engine.steps - steps_before
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
            load_LE = llm.engine.load()
            worker_load_LW = llm.engine.worker_load(load_LE)
            imbalance_L = llm.engine.imbalance(load_LE)
            stats = llm.stats()

    print(f"\ngreedy output of {TEXT_PROMPTS[0]!r} equals the single-process reference: {matches}")
    for out in outs[:len(TEXT_PROMPTS)]:
        print(f"  {out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")
    ttft = [o.metrics["first_token_s"] - o.metrics["arrival_s"] for o in outs]
    print(f"\n{opts.requests} requests, {generated} tokens generated in {elapsed:.1f}s over {steps} steps: "
          f"{generated / elapsed:.0f} tok/s; time to first token median {1e3 * np.median(ttft):.0f} ms")
    print("\nper-worker load (routed pairs, all layers):")
    per_worker = worker_load_LW.sum(axis=0)
    for w, value in enumerate(per_worker):
        print(f"  worker {w:2d} {_bar(value, per_worker.max())} {int(value):8d}")
    total = load_LE.sum(axis=0)
    print("\nper-expert load (routed pairs, all layers):")
    for e, value in enumerate(total):
        print(f"  expert {e:3d} {_bar(value, total.max())} {int(value):8d}")
    print(f"\nimbalance of the final placement (v{stats['placement_version']}) on the whole run's load, per layer: "
          f"{np.round(imbalance_L, 2).tolist()}  mean {imbalance_L.mean():.2f}, worst {imbalance_L.max():.2f}")
    if stats["rebalances"]:
        print("\nlive rebalances during generation (imbalance predicted on the coordinator's window; "
              "realised = rows computed):")
        for r in stats["rebalances"]:
            realised = "-" if r["realised_after"] is None else f"{r['realised_after']:.2f}"
            print(f"  v{r['version']} at step {r['committed_at_step']}: {r['predicted_before']:.2f} -> predicted "
                  f"{r['predicted_after']:.2f}, realised {realised}; {r['slots_moved']} slots / "
                  f"{r['bytes_moved'] / 1e6:.1f} MB moved; plan {r['planning_ms']:.0f} ms, transfer "
                  f"{(r['transfer_ms'] or 0):.0f} ms, stall {(r['stall_ms'] or 0):.1f} ms")
    return {
        "matches_reference": matches,
        "generated_tokens": generated,
        "tokens_per_s": generated / elapsed,
        "imbalance_mean": float(imbalance_L.mean()),
        "imbalance_worst": float(imbalance_L.max()),
        "load_LE": load_LE,
        "rebalances": stats["rebalances"],
        "outputs": outs,
    }
