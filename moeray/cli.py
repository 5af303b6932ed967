"""The `moeray` command.

    moeray demo [--workers 4 --steps 40 ...]     local mode: CPU workers on Gloo, a small model
    moeray bench kernel|...                      benchmarks (print a table, write JSON)
    moeray validate-config FILE.yaml             check an engine config, naming bad values
    moeray serve --config service.yaml           HTTP service on Ray Serve (pip install -e ".[serve]")
    moeray random-checkpoint --config service.yaml   random weights for the service's model (tests, demos)
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
    "serve": "the HTTP service under concurrent clients, with and without dynamic batching (CPU workers)",
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
    from moeray.config import EngineConfig

    cfg = EngineConfig.from_yaml(args.path)
    print(f"{args.path}: ok ({cfg.parallel.num_workers} workers x {cfg.slots_per_worker} slots, "
          f"{cfg.model.num_experts} experts, top-{cfg.model.top_k})")
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


def _random_checkpoint(args: argparse.Namespace) -> int:
    from moeray.models.checkpoint import save_checkpoint
    from moeray.models.moe_model import MoEModel, init_random_
    from moeray.serving.config import ServiceConfig

    config = ServiceConfig.from_yaml(args.config)
    out = args.out or config.checkpoint
    model_cfg = config.engine.model
    save_checkpoint(init_random_(MoEModel(model_cfg), seed=args.seed), out)
    print(f"{out}: random {model_cfg.num_layers}-layer model, {model_cfg.num_experts} experts, top-{model_cfg.top_k}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="serve a small random MoE model on local CPU workers")
    from moeray.demo import DemoOptions

    for name, field in DemoOptions.model_fields.items():
        demo.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(field.default), default=None,
                          help=f"{field.description or name} (default {field.default})")
    demo.set_defaults(func=_demo)

    validate = sub.add_parser("validate-config", help="validate an engine config YAML")
    validate.add_argument("path")
    validate.set_defaults(func=_validate_config)

    serve_p = sub.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve")
    serve_p.add_argument("--config", required=True, help="service YAML (see examples/service.yaml)")
    serve_p.add_argument("--port", type=int, default=None, help="override serve.port")
    serve_p.add_argument("--host", default=None, help="override serve.host (0.0.0.0 to listen on every interface)")
    serve_p.set_defaults(func=_serve)

    ckpt = sub.add_parser("random-checkpoint", help="write random weights for a service config's model")
    ckpt.add_argument("--config", required=True, help="service YAML; its model and checkpoint path are used")
    ckpt.add_argument("--out", default=None, help="directory (default: the config's checkpoint)")
    ckpt.add_argument("--seed", type=int, default=0)
    ckpt.set_defaults(func=_random_checkpoint)

    bench = sub.add_parser("bench", help="benchmarks: print a table and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"moeray.bench.{name}")
        p = bench_sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=_bench_runner(module))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:
        print(f"moeray {args.command}: invalid input:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
