"""The `moeray` command.

    moeray demo [--workers 4 --requests 48 ...]  local mode: CPU workers on Gloo, the built-in tiny model
    moeray generate --model DIR --prompt TEXT    generate from an HF checkpoint directory
    moeray check-checkpoint DIR                  config + every tensor's name and shape, from the headers
    moeray tiny-model DIR [--family qwen3_moe]   write the built-in tiny model (random weights, HF format)
    moeray bench kernel|...                      benchmarks (print a table, write JSON)
    moeray validate-config FILE.yaml             check a service config, naming bad values
    moeray serve [--model DIR | --config FILE]   HTTP service on Ray Serve (no arguments: the tiny model
                                                 on http://127.0.0.1:8000, local Ray, CPU workers)
    moeray status [--url URL | --json FILE]      placement, load and imbalance of a service, as tables
    moeray scale N [--url URL]                   change a running service's worker count
    moeray plot [--url URL | --json FILE] --out DIR   PNGs: expert-load heatmap, worker load, imbalance over time
"""

# Each subcommand imports what it needs: --help, validate-config, status never pay for torch / Ray.
from __future__ import annotations

import argparse
import importlib
import sys

from moeray.cli_common import DEFAULT_URL, CliError, format_validation_error, parse_bool, read_yaml_mapping
from moeray.cli_service import (
    BUILTIN_MODEL_WORKERS,
    add_report_source,
    plot_command,
    scale_command,
    serve_command,
    status_command,
)
from moeray.serving.config import API_KEY_ENV  # pydantic + yaml only: light

# `moeray bench NAME` -> moeray.bench.NAME, which provides add_arguments(parser) and run(args).
BENCHMARKS = {
    "kernel": "grouped SwiGLU expert kernel vs per-expert loop vs torch._grouped_mm",
    "rebalance": "live rebalancing on local CPU workers: drift recovery, stall, stats overhead",
    "exchange": "NCCL all-to-all: ours (NcclGroup) vs raw all_to_all_single, 64 KiB .. 512 MiB (GPUs)",
    "layer": "one EP MoE layer on GPUs: static vs our placement under DeepSeek-V3 skew vs uniform routing",
    "serve": "the HTTP service under concurrent clients (CPU workers)",
    "chaos": "the HTTP service while workers and the coordinator are SIGKILLed; scale up / down (CPU workers)",
    "kvmove": "a moved sequence: its KV cache through the object store vs re-prefilling it (CPU workers)",
    "generate": "end-to-end generation: prefill / decode tokens/s, time to first token, HBM roofline, phases",
    "memory": "a worker's resident memory after loading vs dense + its slots (CPU, a 1-2 GB checkpoint)",
    "cost": "the cost model calibrated here, its predicted vs measured kernel, exchange and layer times (CPU or one GPU)",
    "tier": "MoE layers over a GPU slot budget: all on GPU vs on-demand fetch vs host compute vs live tiering (one GPU)",
}


# ---- subcommands ---------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from moeray.demo import DemoOptions, run_demo

    run_demo(DemoOptions(**{k: getattr(args, k) for k in DemoOptions.model_fields if getattr(args, k) is not None}))
    return 0


def _add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    from moeray.demo import DemoOptions

    for name, field in DemoOptions.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        help_text = f"{field.description or name} (default {field.default})"
        if isinstance(field.default, bool):
            demo.add_argument(flag, dest=name, type=parse_bool, nargs="?", const=True, default=None,
                              metavar="true|false", help=help_text)
            demo.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false", default=None,
                              help=f"same as {flag} false")
        else:
            demo.add_argument(flag, dest=name, type=type(field.default), default=None, help=help_text)


def _bench_runner(module):
    def run(args: argparse.Namespace) -> int:
        args.command = "moeray bench " + " ".join(sys.argv[2:])
        module.run(args)
        return 0

    return run


def _validate_config(args: argparse.Namespace) -> int:
    from moeray.serving.config import ServiceConfig

    cfg = ServiceConfig.model_validate(read_yaml_mapping(args.path))
    print(f"{args.path}: ok ({cfg.engine.parallel.num_workers} workers, checkpoint {cfg.checkpoint})")
    return 0


def _check_checkpoint(args: argparse.Namespace) -> int:
    from moeray.errors import CheckpointError
    from moeray.models.checkpoint import check_checkpoint

    try:
        cfg = check_checkpoint(args.directory)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
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

    prompts = [*(args.prompt or []), *([int(t) for t in ids.split(",") if t.strip()] for ids in args.prompt_ids or [])]
    if not prompts:
        raise CliError("give --prompt TEXT or --prompt-ids 1,2,3")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    try:
        llm = LLM(args.model, num_workers=args.workers, device=args.device, dtype=args.dtype)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    with llm:
        try:
            outs = llm.generate(prompts, params)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    for out in outs:
        completion = out.outputs[0]
        shown = completion.text if llm.tokenizer is not None else list(completion.token_ids)
        print(f"{out.prompt if out.prompt is not None else list(out.prompt_token_ids)!r} -> {shown!r} "
              f"[{completion.finish_reason}, {len(completion.token_ids)} tokens]")
    return 0


# ---- the parser ----------------------------------------------------------------------------------
def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv else None  # only the chosen command's heavy modules are imported

    demo = sub.add_parser("demo", help="generate with the built-in tiny model on local CPU workers, rebalancing live")
    if chosen == "demo":  # its flags come from DemoOptions, which lives with torch-importing code
        _add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="generate from an HF checkpoint directory")
    gen.add_argument("--model", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
    gen.add_argument("--prompt", action="append", help="prompt text (needs tokenizer.json); repeat for several")
    gen.add_argument("--prompt-ids", action="append", help="prompt as comma-separated token ids")
    for flag, kind, default in (("--max-tokens", int, 32), ("--temperature", float, 0.0), ("--top-p", float, 1.0),
                                ("--top-k", int, -1), ("--seed", int, None), ("--workers", int, 1)):
        gen.add_argument(flag, type=kind, default=default)
    gen.add_argument("--stop", action="append", help="stop string; repeat for several")
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
    for flag, default in (("--experts", None), ("--top-k", None), ("--layers", None), ("--seed", 0)):
        tiny.add_argument(flag, type=int, default=default)
    tiny.set_defaults(func=_tiny_model)

    validate = sub.add_parser("validate-config", help="validate a service config YAML")
    validate.add_argument("path")
    validate.set_defaults(func=_validate_config)

    serve_p = sub.add_parser("serve", help="HTTP service on Ray Serve (no arguments: the tiny model, 127.0.0.1:8000)")
    serve_p.add_argument("--config", help="service YAML (see examples/service.yaml); flags override it")
    serve_p.add_argument("--model", help="HF checkpoint directory (default: the built-in tiny model)")
    serve_p.add_argument("--host", help="default 127.0.0.1; anything else is reachable from other machines")
    serve_p.add_argument("--port", type=int, help="default 8000")
    serve_p.add_argument("--api-key", help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV})")
    serve_p.add_argument("--num-workers", type=int, help=f"workers (tiny model: {BUILTIN_MODEL_WORKERS})")
    serve_p.add_argument("--num-replicas", type=int, help="Serve replicas, each with its own engine (default 1)")
    serve_p.add_argument("--served-model-name", help="the `model` clients send (default: the checkpoint's name)")
    serve_p.add_argument("--address", help="a Ray cluster (default: RAY_ADDRESS, else a local cluster on 127.0.0.1)")
    serve_p.set_defaults(func=serve_command)

    status = sub.add_parser("status", help="placement, load and imbalance of a running service (or a saved report)")
    add_report_source(status)
    status.add_argument("--save", default=None, metavar="FILE", help="also write the report as JSON (for moeray plot)")
    status.set_defaults(func=status_command)
    scale = sub.add_parser("scale", help="change a running service's worker count (POST /v1/scale)")
    scale.add_argument("num_workers", type=int)
    scale.add_argument("--url", default=DEFAULT_URL)
    scale.add_argument("--api-key", default=None, help=f"sent as Authorization: Bearer (default: env {API_KEY_ENV})")
    scale.set_defaults(func=scale_command)

    plot = sub.add_parser("plot", help="PNGs: expert-load heatmap, worker load, imbalance over time")
    add_report_source(plot)
    plot.add_argument("--out", default="moeray-plots", metavar="DIR", help="where the PNGs go (default %(default)s)")
    plot.set_defaults(func=plot_command)

    bench = sub.add_parser("bench", help="benchmarks: print a table and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bench_chosen = argv[1] if len(argv) > 1 and chosen == "bench" else None
    for name, help_text in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=help_text)
        if name == bench_chosen:  # only the benchmark being run is imported (they import torch and more)
            module = importlib.import_module(f"moeray.bench.{name}")
            module.add_arguments(p)
            p.set_defaults(func=_bench_runner(module))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    name = args.command
    from pydantic import ValidationError

    try:
        return args.func(args)
    except CliError as exc:
        print(f"moeray {name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValidationError as exc:
        print(f"moeray {name}: invalid {exc.title}:\n{format_validation_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
