"""The `moeray` command.

    moeray demo [--workers 4 --steps 40 ...]     local mode: CPU workers on Gloo, a small model
    moeray bench kernel|...                      benchmarks (print a table, write JSON)
    moeray validate-config FILE.yaml             check an engine config, naming bad values
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
