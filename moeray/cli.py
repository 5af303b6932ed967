"""The `moeray` command.

    moeray demo [--workers 4 --requests 48 ...]  local mode: CPU workers on Gloo, the built-in tiny model
    moeray generate --model DIR --prompt TEXT    generate from an HF checkpoint directory
    moeray check-checkpoint DIR                  config + every tensor's name and shape, from the headers
    moeray tiny-model DIR [--family qwen3_moe]   write the built-in tiny model (random weights, HF format)
    moeray bench kernel|...                      benchmarks (print a table, write JSON)
    moeray validate-config FILE.yaml             check a service config, naming bad values
    moeray serve --config service.yaml           HTTP service on Ray Serve (pip install -e ".[serve]")
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pydantic import ValidationError


# `moeray bench NAME` -> moeray.bench.NAME, which provides add_arguments(parser) and run(args).
BENCHMARKS = {
    "kernel": "grouped SwiGLU expert kernel vs per-expert loop vs torch._grouped_mm",
    "rebalance": "live rebalancing on local CPU workers: drift recovery, stall, stats overhead",
    "exchange": "NCCL all-to-all: ours (NcclGroup) vs raw all_to_all_single, 64 KiB .. 512 MiB (GPUs)",
    "layer": "one EP MoE layer on GPUs: static vs our placement under DeepSeek-V3 skew vs uniform routing",
    "serve": "the HTTP service under concurrent clients (CPU workers)",
    "generate": "end-to-end generation: prefill / decode tokens/s, time to first token, HBM roofline, phases",
    "memory": "a worker's resident memory after loading vs dense + its slots (CPU, a 1-2 GB checkpoint)",
}


def _demo(args: argparse.Namespace) -> int:
    from moeray.demo import DemoOptions, run_demo

    fields = DemoOptions.model_fields
    opts = DemoOptions(**{k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})
    run_demo(opts)
    return 0


def _bench_runner(module):
    def run(args: argparse.Namespace) -> int:
        args.command = "moeray bench " + " ".join(sys.argv[2:])
        module.run(args)
        return 0

    return run


def _validate_config(args: argparse.Namespace) -> int:
    from moeray.serving.config import ServiceConfig

    cfg = ServiceConfig.from_yaml(args.path)
    print(f"{args.path}: ok ({cfg.engine.parallel.num_workers} workers, checkpoint {cfg.checkpoint})")
    return 0


def _check_checkpoint(args: argparse.Namespace) -> int:
    from moeray.errors import CheckpointError
    from moeray.models.checkpoint import check_checkpoint

    try:
        cfg = check_checkpoint(args.directory)
    except CheckpointError as exc:
        print(f"moeray check-checkpoint: {exc}", file=sys.stderr)
        return 2
    print(f"{args.directory}: ok ({cfg.architecture}, {cfg.num_hidden_layers} layers, {cfg.num_moe_layers} MoE layers, "
          f"{cfg.num_experts} experts, top-{cfg.top_k}, hidden {cfg.hidden_size}, vocab {cfg.vocab_size})")
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from moeray.models.tiny import write_tiny_model

    overrides = {k: v for k, v in (("num_experts", args.experts), ("top_k", args.top_k),
                                   ("num_hidden_layers", args.layers)) if v is not None}
    path, cfg = write_tiny_model(args.directory, family=args.family, seed=args.seed, **overrides)
    print(f"{path}: random {cfg.architecture} ({cfg.num_hidden_layers} layers, {cfg.num_experts} experts, "
          f"top-{cfg.top_k}) with a tokenizer")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moeray.errors import CheckpointError
    from moeray.generation.sampling import SamplingParams
    from moeray.llm import LLM

    prompts: list = list(args.prompt or [])
    for ids in args.prompt_ids or []:
        prompts.append([int(t) for t in ids.split(",") if t.strip()])
    if not prompts:
        print("moeray generate: give --prompt TEXT or --prompt-ids 1,2,3", file=sys.stderr)
        return 2
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    try:
        llm = LLM(args.model, num_workers=args.workers, device=args.device, dtype=args.dtype)
    except CheckpointError as exc:
        print(f"moeray generate: {exc}", file=sys.stderr)
        return 2
    with llm:
        try:
            outs = llm.generate(prompts, params)
        except ValueError as exc:
            print(f"moeray generate: {exc}", file=sys.stderr)
            return 2
    for out in outs:
        completion = out.outputs[0]
        shown = completion.text if llm.tokenizer is not None else list(completion.token_ids)
        print(f"{out.prompt if out.prompt is not None else list(out.prompt_token_ids)!r} -> {shown!r} "
              f"[{completion.finish_reason}, {len(completion.token_ids)} tokens]")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from moeray.serving.config import ServiceConfig

    config = ServiceConfig.from_yaml(args.config)
    overrides = {k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None}
    if overrides:  # validated like the YAML values
        config = ServiceConfig.model_validate({**config.model_dump(), "serve": {**config.serve.model_dump(), **overrides}})
    try:
        from moeray.serving.deployment import run_service
    except ImportError as exc:
        print(f"moeray serve needs Ray Serve: pip install -e \".[serve]\" ({exc})", file=sys.stderr)
        return 2
    from moeray.ray_cluster import ensure_ray

    ensure_ray()
    run_service(config, blocking=True)
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate with the built-in tiny model on local CPU workers, rebalancing live")
    from moeray.demo import DemoOptions

    for name, field in DemoOptions.model_fields.items():
        demo.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(field.default), default=None,
                          help=f"{field.description or name} (default {field.default})")
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="generate from an HF checkpoint directory")
    gen.add_argument("--model", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
    gen.add_argument("--prompt", action="append", help="prompt text (needs tokenizer.json); repeat for several")
    gen.add_argument("--prompt-ids", action="append", help="prompt as comma-separated token ids")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string; repeat for several")
    gen.add_argument("--workers", type=int, default=1)
    gen.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    gen.set_defaults(func=_generate)

    check = sub.add_parser("check-checkpoint", help="check an HF checkpoint directory from its headers")
    check.add_argument("directory")
    check.set_defaults(func=_check_checkpoint)

    tiny = sub.add_parser("tiny-model", help="write the built-in tiny model (random weights, HF format, tokenizer)")
    tiny.add_argument("directory")
    tiny.add_argument("--family", default="qwen3_moe",
                      choices=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
    tiny.add_argument("--experts", type=int, default=None)
    tiny.add_argument("--top-k", type=int, default=None)
    tiny.add_argument("--layers", type=int, default=None)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny_model)

    validate = sub.add_parser("validate-config", help="validate a service config YAML")
    validate.add_argument("path")
    validate.set_defaults(func=_validate_config)

    serve_p = sub.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve")
    serve_p.add_argument("--config", required=True, help="service YAML (see examples/service.yaml)")
    serve_p.add_argument("--port", type=int, default=None, help="override serve.port")
    serve_p.add_argument("--host", default=None, help="override serve.host (0.0.0.0 to listen on every interface)")
    serve_p.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="benchmarks: print a table and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[1] if len(argv) > 1 and argv[0] == "bench" else None
    for name, help_text in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=help_text)
        if name == chosen:  # only the benchmark being run is imported (they import torch and more)
            module = importlib.import_module(f"moeray.bench.{name}")
            module.add_arguments(p)
            p.set_defaults(func=_bench_runner(module))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:
        print(f"moeray {args.command}: invalid input:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
