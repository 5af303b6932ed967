"""`moeray bench generate`: end-to-end generation throughput, time to first token, the HBM roofline,
and where a decode step's time goes.

For each batch size B: B prompts of `--prompt-tokens` random ids join at once (one prefill step),
then decode with greedy sampling, EOS ignored, for `--decode-steps` steps. Reported per B:
- prefill time and prefill tokens/s: B prompts added at once until each has its first token
  (median of `--prefill-repeats` rounds; with `--step-loop driver`: the first step);
- decode step time (median over the decode steps, driver wall clock) and decode tokens/s = B / step;
- the roofline of a decode step: bytes that must cross HBM (every dense weight once, the experts
  the batch touches (expected number under uniform routing: E * (1 - (1 - K/E)^B) per layer), the
  KV cache read) over `--hbm-tb-s`, and the fraction of it reached;
- the split of a step outside the model. With the workers' own step loops (the default): the
  worker's step time against the wall time per step (the rest is the loop's agreement, messages
  and output hand-off). With `--step-loop driver`: driver planning, the Ray round trip (engine
  step minus the worker's own step time), the worker's batch preparation and forward + sampling.

`--phases` adds a per-phase GPU breakdown of one decode step and of one prefill step at each B, measured in this process
on a copy of the worker's model (CUDA events: attention, router + slot map, dispatch + experts,
combine, other dense work, LM head, sampling). `--hf` times transformers `generate` on the same
checkpoint and GPU at the same B for comparison.

The model is an HF checkpoint directory (`--model`) or a preset written with random weights
(`--preset mixtral-4l`: d=4096, F=14336, 8 experts, top-2, GQA 32/8 heads, 4 layers, bf16).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from moeray.bench import standalone, write_json

PRESETS = {
    "mixtral-4l": dict(family="mixtral", vocab_size=32000, hidden_size=4096, moe_intermediate_size=14336,
                       num_hidden_layers=4, num_experts=8, top_k=2, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=4096, dtype="bfloat16"),
    "tiny": dict(family="qwen3_moe", dtype="float32"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="an HF checkpoint directory (default: the preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="mixtral-4l")
    p.add_argument("--cache-dir", default="/tmp/moeray-bench-models", help="where presets are written")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prefill-repeats", type=int, default=5, help="prefill rounds per B (the median is reported)")
    p.add_argument("--hbm-tb-s", type=float, default=4.3, help="HBM bandwidth for the roofline (H200: 4.3)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager decode steps (the v1 path)")
    p.add_argument("--step-loop", choices=["workers", "driver"], default="workers",
                   help="workers step on their own loops (default), or the driver steps them (the v2 path)")
    p.add_argument("--phases", action="store_true", help="per-phase GPU breakdown of a decode step")
    p.add_argument("--hf", action="store_true", help="also time transformers generate on the same model")
    p.add_argument("--hf-batches", default="1,64")
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)


def model_dir(args) -> str:
    if args.model:
        return args.model
    from moeray.config import tiny_model_config
    from moeray.models.random_weights import write_random_checkpoint

    path = Path(args.cache_dir) / args.preset
    if not (path / "config.json").exists():
        cfg = tiny_model_config(**PRESETS[args.preset])
        t0 = time.perf_counter()
        write_random_checkpoint(cfg, path, seed=args.seed, device=args.device)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return str(path)


def decode_bytes(cfg, batch: int, context: float) -> float:
    """Bytes a decode step must read from HBM: dense weights, touched experts, the KV cache."""
    itemsize = 4 if cfg.dtype == "float32" else 2
    D, A, J, Y = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attention = cfg.num_hidden_layers * (D * A * Y * 2 + D * J * Y * 2) * itemsize  # GQA q, o and k, v
    head = cfg.vocab_size * D * itemsize  # the LM head is read whole; the embedding only gathers B rows
    router = cfg.num_moe_layers * cfg.num_experts * D * itemsize
    touched = cfg.num_experts * (1 - (1 - cfg.top_k / cfg.num_experts) ** batch)
    experts = cfg.num_moe_layers * touched * cfg.expert_bytes
    kv = batch * context * cfg.kv_bytes_per_token
    return attention + head + router + experts + kv


def _time_batch_worker_loops(llm, batch: int, args, rng) -> dict:
    """The workers step on their own: time to the last first token (the prefill), then wall time
    per decode step over the decode phase; the workers' own step times come with their reports."""
    from moeray.generation.sampling import SamplingParams

    driver = llm.driver
    vocab = llm.engine.config.model.vocab_size
    # Prefill: B prompts joining at once until each has its first token, median of a few rounds.
    prefill_s = []
    first_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for _ in range(args.prefill_repeats):
        start = time.perf_counter()
        ids = [driver.add_request(rng.integers(3, vocab, args.prompt_tokens).tolist(), first_token)
               for _ in range(batch)]
        driver.run_to_completion(ids)
        prefill_s.append(time.perf_counter() - start)
    prefill = float(np.median(prefill_s))
    params = SamplingParams(max_tokens=args.decode_steps + 1, temperature=0.0, ignore_eos=True)
    prompts = [rng.integers(3, vocab, args.prompt_tokens).tolist() for _ in range(batch)]
    start = time.perf_counter()
    pending_first = {driver.add_request(p, params) for p in prompts}
    prefilled_s = None
    worker_ms, worker_steps = 0.0, 0
    while driver.has_unfinished():
        outs = driver.step()
        now = time.perf_counter()
        if prefilled_s is not None and outs:
            worker_ms += driver.last_step["worker_step_ms_total"]
            worker_steps += driver.last_step["worker_steps"]
        for out in outs:
            if out.outputs[0].token_ids:
                pending_first.discard(out.request_id)
        if prefilled_s is None and not pending_first:
            prefilled_s = now
    end = time.perf_counter()
    step_ms = 1e3 * (end - prefilled_s) / args.decode_steps
    inside_ms = worker_ms / worker_steps if worker_steps else float("nan")  # mean over the decode steps
    cfg = llm.engine.config.model
    roofline_ms = 1e3 * decode_bytes(cfg, batch, args.prompt_tokens + args.decode_steps / 2) / (args.hbm_tb_s * 1e12)
    return {
        "batch": batch,
        "step_loop": "workers",
        "prefill_step_ms": 1e3 * prefill,  # add_request to the last first token (median of rounds)
        "prefill_tokens_per_s": batch * args.prompt_tokens / prefill,
        "prefill_rounds_ms": [1e3 * t for t in prefill_s],
        "decode_step_ms": step_ms,
        "decode_tokens_per_s": batch / (step_ms / 1e3),
        "roofline_step_ms": roofline_ms,
        "roofline_fraction": roofline_ms / step_ms,
        "worker_step_ms": inside_ms,
        # Between two steps of the worker's loop: agreement, messages, the output hand-off.
        "outside_model_ms": {"worker_loop": step_ms - inside_ms},
    }


def _time_batch(llm, batch: int, args, rng) -> dict:
    from moeray.generation.sampling import SamplingParams

    if llm.engine.config.parallel.step_loop == "workers":
        return _time_batch_worker_loops(llm, batch, args, rng)
    driver = llm.driver
    vocab = llm.engine.config.model.vocab_size
    params = SamplingParams(max_tokens=args.decode_steps + 1, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        driver.add_request(rng.integers(3, vocab, args.prompt_tokens).tolist(), params)
    step_s, breakdown = [], []
    while driver.has_unfinished():
        t0 = time.perf_counter()
        driver.step()
        step_s.append(time.perf_counter() - t0)
        breakdown.append(driver.last_step)
    prefill_s, decode_s = step_s[0], step_s[1:]
    decode_parts = breakdown[1:]

    def median(key):
        return float(np.median([b[key] for b in decode_parts]))

    worker_prepare = float(np.median([b["workers"][0].get("prepare", 0.0) for b in decode_parts]))
    worker_forward = float(np.median([b["workers"][0].get("forward+sample", 0.0) for b in decode_parts]))
    step_ms = 1e3 * float(np.median(decode_s))
    cfg = llm.engine.config.model
    roofline_ms = 1e3 * decode_bytes(cfg, batch, args.prompt_tokens + args.decode_steps / 2) / (args.hbm_tb_s * 1e12)
    return {
        "batch": batch,
        "prefill_step_ms": 1e3 * prefill_s,
        "prefill_tokens_per_s": batch * args.prompt_tokens / prefill_s,
        "decode_step_ms": step_ms,
        "decode_tokens_per_s": batch / (step_ms / 1e3),
        "roofline_step_ms": roofline_ms,
        "roofline_fraction": roofline_ms / step_ms,
        "outside_model_ms": {
            "driver_plan": median("plan_ms"),
            "driver_absorb": median("absorb_ms"),
            "ray_round_trip": median("engine_ms") - worker_prepare - worker_forward,
            "worker_prepare_batch": worker_prepare,
        },
        "worker_forward_and_sample_ms": worker_forward,
    }


def run(args: argparse.Namespace) -> dict:
    from moeray.llm import LLM

    directory = model_dir(args)
    batches = [int(b) for b in args.batches.split(",")]
    longest = args.prompt_tokens + args.decode_steps + 2
    cache = {"block_size": 16, "kv_tokens_per_worker": int(max(batches) * longest * 1.1) + 64,
             "max_num_seqs": max(batches), "max_num_batched_tokens": max(batches) * args.prompt_tokens}
    rng = np.random.default_rng(args.seed)
    results = []
    with LLM(directory, num_workers=args.workers, device=args.device, cache=cache,
             parallel={"cuda_graphs": not args.no_cuda_graphs, "step_loop": args.step_loop},
             rebalance={"enabled": False}) as llm:
        cfg = llm.engine.config.model
        for batch in sorted(set(batches)):  # warm-up: kernels compiled and autotuned at every size
            _time_batch(llm, batch, argparse.Namespace(**{**vars(args), "decode_steps": 3, "prefill_repeats": 1}), rng)
        for batch in batches:
            res = _time_batch(llm, batch, args, rng)
            results.append(res)
            print(f"B={batch:4d}  prefill {res['prefill_step_ms']:8.1f} ms ({res['prefill_tokens_per_s']:9.0f} tok/s)"
                  f"  decode {res['decode_step_ms']:7.2f} ms/step ({res['decode_tokens_per_s']:8.0f} tok/s)"
                  + (f"  roofline {res['roofline_step_ms']:.2f} ms ({100 * res['roofline_fraction']:.0f}%)"
                     if args.device == "cuda" else "") +
                  "  outside the model " + ", ".join(f"{k} {v:.2f} ms" for k, v in res["outside_model_ms"].items()),
                  flush=True)
    phases = None
    if args.phases and args.device == "cuda":
        from moeray.bench.generate_phases import decode_phases, prefill_phases

        phases = decode_phases(directory, batches, args.prompt_tokens + args.decode_steps // 2, args.seed)
        for b, ph in phases.items():
            print(f"B={b:4d} phases (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()), flush=True)
        prefill = prefill_phases(directory, batches, args.prompt_tokens, args.seed)
        for b, ph in prefill.items():
            print(f"B={b:4d} prefill phases (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()), flush=True)
        phases = {"decode": phases, "prefill": prefill}
    hf = None
    if args.hf:
        from moeray.bench.generate_hf import time_hf_generate

        hf = {b: time_hf_generate(directory, b, args.prompt_tokens, args.decode_steps, args.device, args.seed)
              for b in [int(x) for x in args.hf_batches.split(",")]}
        for b, r in hf.items():
            print(f"transformers B={b:4d}: {r}", flush=True)
    result = {"command": getattr(args, "command", ""), "machine": platform.node(), "model": directory,
              "config": cfg.model_dump(), "prompt_tokens": args.prompt_tokens, "decode_steps": args.decode_steps,
              "workers": args.workers, "device": args.device, "step_loop": args.step_loop, "results": results, "phases_ms": phases,
              "transformers": hf}
    if args.device == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name(0)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    standalone("generate", __doc__, add_arguments, run)
