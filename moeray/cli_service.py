"""The `moeray` subcommands around the HTTP service: `serve` (the service config from YAML and
flags, the built-in tiny model), `status`, `scale` and `plot` (a running service or a saved
placement report). Each imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moeray.cli_common import DEFAULT_URL, CliError, read_yaml_mapping
from moeray.serving.config import API_KEY_ENV, LOOPBACK_HOSTS  # pydantic + yaml only: light

BUILTIN_MODEL_WORKERS, BUILTIN_MODEL_NAME = 2, "moeray-tiny"  # `moeray serve` with no model: workers, served name


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


def warn_if_exposed(config) -> None:
    """Beyond loopback is a deliberate choice: say so (run_service adds the missing-key warning)."""
    if config.serve.host not in LOOPBACK_HOSTS:
        print(f"moeray serve: listening on {config.serve.host}: reachable from other machines", file=sys.stderr)


def serve_command(args: argparse.Namespace) -> int:
    config = service_config_from_args(args)
    warn_if_exposed(config)
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


def placement_report(args: argparse.Namespace) -> dict:
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


def status_command(args: argparse.Namespace) -> int:
    import json

    from moeray.status import render_status

    report = placement_report(args)
    if args.save:  # what `moeray plot --json` reads later
        Path(args.save).write_text(json.dumps(report))
    print(render_status(report))
    return 0


def scale_command(args: argparse.Namespace) -> int:
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


def plot_command(args: argparse.Namespace) -> int:
    report = placement_report(args)
    try:
        from moeray.plot import plot_report
    except ImportError as exc:
        raise CliError(f"moeray plot needs matplotlib: pip install -e \".[plot]\" ({exc})") from None
    print("\n".join(map(str, plot_report(report, args.out))))
    return 0


def add_report_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--url", default=None, help=f"the service to ask (GET /v1/placement; default {DEFAULT_URL})")
    source.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                        help="a saved placement report (the JSON of GET /v1/placement) instead of a service")
    p.add_argument("--api-key", default=None, help=f"sent as Authorization: Bearer (default: env {API_KEY_ENV})")
