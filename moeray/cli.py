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
import os
import sys
from pathlib import Path

from moeray.serving.config import API_KEY_ENV, LOOPBACK_HOSTS  # pydantic + yaml only: light

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
DEFAULT_URL = "http://127.0.0.1:8000"
BUILTIN_MODEL_WORKERS, BUILTIN_MODEL_NAME = 2, "moeray-tiny"  # `moeray serve` with no model: workers, served name


class CliError(Exception):
    """A one-line error for the user; `exit_code` 2 for bad input, 1 for a failure elsewhere."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def parse_bool(text: str) -> bool:
    """`--flag false` must mean False (argparse's type=bool makes any non-empty string True)."""
    if text.strip().lower() not in _BOOLEANS:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return _BOOLEANS[text.strip().lower()]


def read_yaml_mapping(path: str) -> dict:
    """A YAML file's top-level mapping; CliError naming the file (and line) when it is missing,
    unreadable or not YAML."""
    import yaml

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise CliError(f"config file {path} not found") from None
    except OSError as exc:
        raise CliError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise CliError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"{path}: the top level must be a mapping (checkpoint:, engine:, serve:), "
                       f"got a {type(data).__name__}")
    return data


def format_validation_error(exc) -> str:
    """One line per bad field: its dotted path, what is wrong, the value given."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        given = "" if err["type"] == "missing" or isinstance(err.get("input"), dict) else f" (got {err['input']!r})"
        lines.append(f"  {where}: {err['msg']}{given}")
    return "\n".join(lines)


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


def ensure_builtin_model():
    """The built-in tiny model in the user's cache, written on first use into a temporary sibling
    and renamed (a concurrent or interrupted first run never leaves half a model). The name holds
    a hash of its config: a moeray whose tiny model changed never loads a stale copy."""
    import hashlib
    import shutil
    import tempfile

    from moeray.config import tiny_model_config

    digest = hashlib.sha256(tiny_model_config().model_dump_json().encode()).hexdigest()[:12]
    target = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeray" / f"tiny-model-{digest}"
    if all((target / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json")):
        return target
    from moeray.models.tiny import write_tiny_model

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        write_tiny_model(staging)
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
        # another `moeray serve` wrote it first: use theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def service_config_from_args(args: argparse.Namespace):
    """The service config: the YAML (if any), then the flags on top, validated as a whole. An API
    key from the environment goes into the config too: Serve replicas on other nodes do not see
    this shell's environment."""
    from moeray.serving.config import ServiceConfig

    data = read_yaml_mapping(args.config) if args.config else {}
    engine = data["engine"] = dict(data.get("engine") or {})
    parallel = engine["parallel"] = dict(engine.get("parallel") or {})
    serve = data["serve"] = dict(data.get("serve") or {})
    if args.model:
        data["checkpoint"] = args.model
    elif not args.config:
        data["checkpoint"] = str(ensure_builtin_model())
        parallel.setdefault("num_workers", BUILTIN_MODEL_WORKERS)
        serve.setdefault("model_name", BUILTIN_MODEL_NAME)  # not the cache directory's hashed name
    if args.num_workers is not None:
        parallel["num_workers"] = args.num_workers
    flags = (("host", args.host), ("port", args.port), ("num_replicas", args.num_replicas),
             ("model_name", args.served_model_name), ("api_key", args.api_key or os.environ.get(API_KEY_ENV)))
    serve.update({key: value for key, value in flags if value is not None})
    return ServiceConfig.model_validate(data)


def _warn_if_exposed(config) -> None:
    """Beyond loopback is a deliberate choice: say so (run_service adds the missing-key warning)."""
    if config.serve.host not in LOOPBACK_HOSTS:
        print(f"moeray serve: listening on {config.serve.host}: reachable from other machines", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    config = service_config_from_args(args)
    _warn_if_exposed(config)
    try:
        from moeray.serving.deployment import run_service
    except ImportError as exc:
        raise CliError(f"moeray serve needs Ray Serve: pip install -e \".[serve]\" ({exc})") from None
    from moeray.ray_cluster import ensure_ray

    ensure_ray(address=args.address)
    try:
        run_service(config, blocking=True)
    except RuntimeError as exc:  # the port is taken, an app of that name runs already, ...
        raise CliError(str(exc), exit_code=1) from None
    except KeyboardInterrupt:  # a second Ctrl-C during the clean-up: the local cluster ends with us anyway
        print("moeray serve: stopped", file=sys.stderr)
        return 130
    return 0


def _placement_report(args: argparse.Namespace) -> dict:
    """The report a status / plot command shows: a saved file or the service's answer."""
    from moeray.serving.placement_report import ReportError, read_report
    from moeray.status import ServiceError, fetch_report

    try:
        if args.json_path:
            return read_report(args.json_path)
        return fetch_report(args.url or DEFAULT_URL, args.api_key or os.environ.get(API_KEY_ENV))
    except ReportError as exc:
        raise CliError(str(exc)) from None
    except ServiceError as exc:
        raise CliError(str(exc), exit_code=1) from None


def _status(args: argparse.Namespace) -> int:
    import json

    from moeray.status import render_status

    report = _placement_report(args)
    if args.save:  # what `moeray plot --json` reads later
        Path(args.save).write_text(json.dumps(report))
    print(render_status(report))
    return 0


def _scale(args: argparse.Namespace) -> int:
    import json

    from moeray.status import ServiceError, call_service

    try:
        event = json.loads(call_service(args.url, "/v1/scale", args.api_key or os.environ.get(API_KEY_ENV),
                                        {"num_workers": args.num_workers}, timeout_s=600))
    except ServiceError as exc:
        raise CliError(str(exc), exit_code=1) from None
    if event.get("changed") is False:
        print(f"already {event['to_workers']} workers: nothing changed")
        return 0
    print(f"{event['from_workers']} -> {event['to_workers']} workers in {event['seconds']:.1f} s: epoch {event['epoch']}, "
          f"placement v{event['placement_version']}, {event['requests_moved']} requests moved, "
          f"{event['slots_from_replicas']} slots from live workers, "
          f"{event['slots_read_from_checkpoint']} read from the checkpoint")
    return 0


def _plot(args: argparse.Namespace) -> int:
    report = _placement_report(args)
    try:
        from moeray.plot import plot_report
    except ImportError as exc:
        raise CliError(f"moeray plot needs matplotlib: pip install -e \".[plot]\" ({exc})") from None
    print("\n".join(map(str, plot_report(report, args.out))))
    return 0


# ---- the parser ----------------------------------------------------------------------------------
def _add_report_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--url", default=None, help=f"the service to ask (GET /v1/placement; default {DEFAULT_URL})")
    source.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                        help="a saved placement report (the JSON of GET /v1/placement) instead of a service")
    p.add_argument("--api-key", default=None, help=f"sent as Authorization: Bearer (default: env {API_KEY_ENV})")


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
    serve_p.set_defaults(func=_serve)

    status = sub.add_parser("status", help="placement, load and imbalance of a running service (or a saved report)")
    _add_report_source(status)
    status.add_argument("--save", default=None, metavar="FILE", help="also write the report as JSON (for moeray plot)")
    status.set_defaults(func=_status)
    scale = sub.add_parser("scale", help="change a running service's worker count (POST /v1/scale)")
    scale.add_argument("num_workers", type=int)
    scale.add_argument("--url", default=DEFAULT_URL)
    scale.add_argument("--api-key", default=None, help=f"sent as Authorization: Bearer (default: env {API_KEY_ENV})")
    scale.set_defaults(func=_scale)

    plot = sub.add_parser("plot", help="PNGs: expert-load heatmap, worker load, imbalance over time")
    _add_report_source(plot)
    plot.add_argument("--out", default="moeray-plots", metavar="DIR", help="where the PNGs go (default %(default)s)")
    plot.set_defaults(func=_plot)

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
