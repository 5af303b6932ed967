"""Starting the service: the bound Serve application of the deployment (`build_app`), the app
builder `serve deploy` imports (`app_builder`), and `run_service` (`moeray serve`): Serve's HTTP
proxy on the configured address, or the Serve already running there, and the app deployed on it.

Kept apart from deployment.py (the replica and its routes): this runs where the service is started
(the CLI, or Serve building the app for `serve deploy`), never in a replica. deployment.py
re-exports these names: `serve deploy` configs (`moeray.serving.deployment:app_builder`), the CLI
and the tests import them from there.
"""

from __future__ import annotations

import sys
import time

from pydantic import SecretStr
from ray import serve

from moeray.serving import persist
from moeray.serving.config import API_KEY_ENV, LOOPBACK_HOSTS, ServiceConfig
from moeray.serving.core import check_port_free


def build_app(config: ServiceConfig):
    """The bound Serve application (for `serve.run`). An API key from $MOERAY_API_KEY is resolved
    here, where the service is configured, so the replicas need not share this environment."""
    # deployment.py re-exports this module: imported here, not at the top, so either import order works
    from moeray.serving.deployment import MoEService

    serve_cfg = config.serve
    key = serve_cfg.resolved_api_key()
    if serve_cfg.api_key is None and key is not None:
        config = config.model_copy(update={"serve": serve_cfg.model_copy(update={"api_key": SecretStr(key)})})
    return MoEService.options(num_replicas=serve_cfg.num_replicas,
                              max_ongoing_requests=serve_cfg.max_ongoing_requests).bind(config.model_dump())


def app_builder(args: dict):
    """The app builder `serve deploy` / `serve run` import (examples/serve_config.yaml:
    `import_path: moeray.serving.deployment:app_builder`); `args` is a service config mapping
    (checkpoint, engine, serve), validated like a service YAML. The HTTP address comes from the
    Serve config's http_options there, not from args.serve.host/port."""
    return build_app(ServiceConfig.model_validate(args))


def _running_serve_address() -> tuple[str, int] | None:
    """(host, port) of the Serve instance already running on this Ray cluster, None if none."""
    from ray.serve.context import _get_global_client  # Serve's own lookup; no public API gives the address

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else (client.http_config.host, client.http_config.port)


def run_service(config: ServiceConfig, blocking: bool = True):
    """Start Serve's HTTP proxy on config.serve.host:port (or join the Serve already running on this
    cluster at that address) and deploy the service. Fails with a clear error when the port is
    taken by anything else, or when an app of the same name already runs."""
    s = config.serve
    running = _running_serve_address()
    if running is None:
        check_port_free(s.host, s.port)
        serve.start(http_options={"host": s.host, "port": s.port})
    elif running != (s.host, s.port):
        raise RuntimeError(f"Ray Serve already runs on this cluster at {running[0]}:{running[1]} (one HTTP address "
                           f"per cluster): serve there, or `serve shutdown` first")
    elif s.app_name in serve.status().applications:
        raise RuntimeError(f"an application named {s.app_name!r} already runs on this cluster's Serve at "
                           f"{s.host}:{s.port}: choose another serve.app_name, or `serve delete {s.app_name}`")
    if s.host not in LOOPBACK_HOSTS and s.resolved_api_key() is None:
        print(f"moeray: warning: listening on {s.host} without an API key: anyone who can reach this machine can use "
              f"the service (set serve.api_key or ${API_KEY_ENV})", file=sys.stderr)
    # A new app: no replica of it ran before, so a record left under its name (an app deleted
    # earlier) is not state to resume from. (`serve deploy` keeps it: a redeploy resumes.)
    persist.clear_app(s.app_name)
    handle = serve.run(build_app(config), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    if blocking:
        print(f"moeray: serving {config.checkpoint} on http://{s.host}:{s.port}{s.route_prefix} (Ctrl-C to stop)",
              flush=True)
        try:
            while True:
                time.sleep(3600)  # the proxy and replicas serve from their own actors
        except KeyboardInterrupt:
            serve.delete(s.app_name)
            persist.clear_app(s.app_name)
    return handle
