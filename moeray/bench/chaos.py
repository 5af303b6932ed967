"""`moeray bench chaos`: the HTTP service under streaming clients while its processes are SIGKILLed.

Set-up: the tiny random model (write_tiny_model), W CPU workers, rebalancing on, served by
`run_service`; C streaming clients (moeray/bench/http_clients.py: they never retry, so every
failure is visible) send Zipf-skewed random token-id prompts for D seconds after a 5 s warm-up.
A killer thread SIGKILLs the process of one random Worker actor of this service every
`--kill-every-s` (jittered), and the Coordinator's process instead at the first kill at or after
`--coordinator-kill-at-s`, found in Ray's actor table (owned by this app's replica, same machine),
as a user would. A kill waits until the service is healthy again (/healthz 200, all W workers
alive), so each kill meets one full recovery. Then a scale phase: `POST /v1/scale` to each count
of `--scale-to`, clients still streaming. A sampler polls `GET /v1/placement` throughout.

Recovery time, stall, steady and recovering throughput, imbalance: see moeray/bench/chaos_analysis.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import tempfile
import threading
import time

from moeray.bench import serve as serve_bench
from moeray.bench import standalone, write_json
from moeray.bench.chaos_analysis import analyse, match_server_events
from moeray.bench.http_clients import StreamingClient, free_port, http_json, run_for, start_clients

HEALTHY_WAIT_S = 180.0  # a kill waits at most this long for the last recovery; then it is skipped


def add_arguments(p: argparse.ArgumentParser) -> None:
    serve_bench.add_arguments(p)  # the model, clients, prompt and output sizes, machine / date / json
    p.set_defaults(workers=4, duration_s=180.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--zipf", type=float, default=1.3, help="prompt ids ~ Zipf(a): skewed expert load; 0: uniform")
    p.add_argument("--kill-every-s", type=float, default=20.0, help="mean time between kills (±--jitter)")
    p.add_argument("--jitter", type=float, default=0.25)
    p.add_argument("--coordinator-kill-at-s", type=float, default=None,
                   help="the first kill at or after this kills the coordinator (default: half the duration; <0: never)")
    p.add_argument("--window-s", type=float, default=10.0, help="after a kill: its stall is looked for; not steady")
    p.add_argument("--rate-window-s", type=float, default=1.0, help="the 50%%-of-steady rate is measured over this")
    p.add_argument("--sample-every-s", type=float, default=2.0, help="GET /v1/placement period")
    p.add_argument("--scale-to", default="", help="scale phase worker counts, e.g. 8,4 (default: 2W,W; none: skip)")
    p.add_argument("--scale-settle-s", type=float, default=10.0, help="streaming at each count after a scale")
    p.add_argument("--recovery", choices=("shrink", "replace"), default=None,
                   help="parallel.recovery: go on without a lost worker, or replace it (default: the engine's)")


class ServiceProcesses:
    """The Worker / Coordinator actors of one Serve app: alive, on this node, and owned by that app's
    replica (the engine in the replica creates them, replacements too), so another service on the
    same cluster is never touched.

    From the GCS actor table (`ray._private.state.actors`, Ray's debugging accessor): the public
    state API (`ray.util.state.list_actors`) needs the dashboard, which the local cluster of
    `ensure_ray` does not start, and it does not say who owns an actor."""

    def __init__(self, app_name: str):
        import ray

        self.replica_class = f"ServeReplica:{app_name}:"
        self.node_id = ray.get_runtime_context().get_node_id()

    def alive(self, class_name: str) -> list[dict]:
        from ray._private import state

        actors = list(state.actors(actor_state_name="ALIVE").values())
        owners = {(a["Address"]["IPAddress"], a["Address"]["Port"]) for a in actors
                  if a["ActorClassName"].startswith(self.replica_class)}
        return [{"actor_id": a["ActorID"], "pid": a["Pid"]} for a in actors
                if a["ActorClassName"] == class_name and a["Address"]["NodeID"] == self.node_id and a.get("Pid")
                and (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"]) in owners]


def kill_schedule(duration_s: float, every_s: float, jitter: float, coordinator_at_s: float, window_s: float,
                  rng: random.Random) -> list[tuple[float, str]]:
    """(seconds after the start, "worker" | "coordinator"); no kill in the last window_s, so each
    has its recovery measured inside the phase."""
    schedule, t, coordinator_done = [], 0.0, coordinator_at_s < 0
    while True:
        t += every_s * rng.uniform(1 - jitter, 1 + jitter)
        if t > duration_s - window_s:
            return schedule
        kind = "worker"
        if not coordinator_done and t >= coordinator_at_s:
            kind, coordinator_done = "coordinator", True
        schedule.append((t, kind))


class Killer(threading.Thread):
    """Runs the kill schedule (seconds after t0) until `stop` is set; `kills` is what it did."""

    def __init__(self, port, processes, schedule, workers, t0, stop, rng):
        super().__init__(daemon=True, name="killer")
        self.port, self.processes, self.schedule, self.workers = port, processes, schedule, workers
        self.t0, self.stop, self.rng = t0, stop, rng
        self.kills: list[dict] = []

    def healthy(self) -> bool:
        # The coordinator is not waited for: serving does not need it, the engine rebuilds it when it
        # next finds it gone, and a kill that waited for it would hide how long that takes.
        return (http_json(self.port, "GET", "/healthz", timeout_s=30)[0] == 200
                and len(self.processes.alive("Worker")) == self.workers)

    def run(self) -> None:
        for at_s, kind in self.schedule:
            if self.stop.wait(max(0.0, self.t0 + at_s - time.time())):
                return
            waited_from = time.time()
            while not self.healthy():  # polled: the service offers no event to wait on
                if self.stop.wait(0.25):
                    return
                if time.time() - waited_from > HEALTHY_WAIT_S:
                    self.kills.append({"planned_s": at_s, "kind": kind, "skipped": "not healthy", "t": None})
                    break
            else:
                targets = self.processes.alive("Worker" if kind == "worker" else "Coordinator")
                if not targets:
                    self.kills.append({"planned_s": at_s, "kind": kind, "skipped": f"no live {kind}", "t": None})
                    continue
                target = self.rng.choice(targets)
                kill_t = time.time()
                os.kill(target["pid"], signal.SIGKILL)
                self.kills.append({"planned_s": at_s, "kind": kind, "t": kill_t, "at_s": kill_t - self.t0,
                                   "postponed_s": kill_t - waited_from, **target,
                                   "coordinators_alive": len(self.processes.alive("Coordinator"))})


class PlacementSampler(threading.Thread):
    """GET /v1/placement every `every_s` until `stop` is set; a failed call is a sample too."""

    def __init__(self, port, every_s, stop):
        super().__init__(daemon=True, name="placement-sampler")
        self.port, self.every_s, self.stop = port, every_s, stop
        self.samples: list[dict] = []

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.time()
            status, report = http_json(self.port, "GET", "/v1/placement", timeout_s=60)
            sample = {"t": t, "status": status}
            if status == 200:
                sample.update({k: report.get(k) for k in ("realised_imbalance_mean", "realised_imbalance_worst",
                                                          "imbalance_mean", "imbalance_worst", "epoch",
                                                          "num_workers", "placement_version")})
                sample["recoveries"] = len(report.get("recoveries") or [])
                sample["rebalances"] = len(report.get("rebalances") or [])
            else:
                sample["error"] = str(report)[:200]
            self.samples.append(sample)
            self.stop.wait(self.every_s)


def scale_phase(port: int, counts: list[int], settle_s: float, interrupt: threading.Event) -> list[dict]:
    """POST /v1/scale to each count in turn (timed), then stream `settle_s` at that count
    (`interrupt` set: no more waiting)."""
    events = []
    for n in counts:
        started = time.time()
        status, body = http_json(port, "POST", "/v1/scale", {"num_workers": n}, timeout_s=600)
        ended = time.time()
        events.append({"to_workers": n, "t": started, "ended": ended, "seconds": ended - started, "status": status,
                       "response": body})
        interrupt.wait(settle_s)  # a timer (the clients stream meanwhile), not a wait for an event
    return events


def run(args: argparse.Namespace) -> dict:
    from ray import serve

    from moeray.config import EngineOptions, ParallelConfig, RebalanceConfig
    from moeray.models.tiny import write_tiny_model
    from moeray.ray_cluster import ensure_ray
    from moeray.serving.config import ServeConfig, ServiceConfig
    from moeray.serving.deployment import run_service
    from moeray.streams import zipf_tokens

    coordinator_at = args.duration_s / 2 if args.coordinator_kill_at_s is None else args.coordinator_kill_at_s
    scale_to = ([] if args.scale_to == "none" else [int(n) for n in args.scale_to.split(",")] if args.scale_to
                else [2 * args.workers, args.workers])
    rng = random.Random(args.seed)
    schedule = kill_schedule(args.duration_s, args.kill_every_s, args.jitter, coordinator_at, args.window_s, rng)
    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="moeray-bench-chaos-") as ckpt:
        _, model = write_tiny_model(ckpt, num_experts=args.experts, num_hidden_layers=args.layers,
                                    hidden_size=args.hidden, moe_intermediate_size=args.ffn)
        vocab = model.vocab_size

        def prompt(rng_np, n):  # ids 0-2 are the tiny tokenizer's special tokens
            if args.zipf <= 0:
                return rng_np.integers(3, vocab, n)
            return 3 + zipf_tokens(vocab - 3, n, args.zipf, rng_np)

        parallel = ParallelConfig(num_workers=args.workers, **({"recovery": args.recovery} if args.recovery else {}))
        config = ServiceConfig(
            checkpoint=ckpt,
            engine=EngineOptions(parallel=parallel, rebalance=RebalanceConfig(enabled=True)),
            serve=ServeConfig(port=free_port(), app_name=f"moeray-bench-chaos-{os.getpid()}",
                              max_ongoing_requests=max(64, 2 * args.clients)),
        )
        port = config.serve.port
        processes = ServiceProcesses(config.serve.app_name)
        run_service(config, blocking=False)
        try:
            def clients_of(count, seed0):
                return [StreamingClient(port, seed0 + i, vocab, args.prompt_tokens, args.max_tokens,
                                        args.temperature, prompt) for i in range(count)]

            run_for(clients_of(min(4, args.clients), 10_000), 5.0)  # warm-up
            clients = clients_of(args.clients, 0)
            threads, stop, t0 = start_clients(clients)
            phase_over = threading.Event()  # ends the killer and the sampler, not the clients
            killer = Killer(port, processes, schedule, args.workers, t0, phase_over, rng)
            sampler = PlacementSampler(port, args.sample_every_s, phase_over)
            killer.start()
            sampler.start()
            killer.join()
            phase_over.wait(max(0.0, t0 + args.duration_s - time.time()))  # the phase's end: a timer
            chaos_end = time.time()
            ready_from = time.time()
            while not killer.healthy() and time.time() - ready_from < HEALTHY_WAIT_S:
                stop.wait(0.25)
            scales = scale_phase(port, scale_to, args.scale_settle_s, threading.Event())
            stop.set()
            for th in threads:
                th.join()
            phase_over.set()
            sampler.join()
            final_status, final_report = http_json(port, "GET", "/v1/placement", timeout_s=60)
        finally:
            serve.delete(config.serve.app_name)
            serve.shutdown()
    records = [r for c in clients for r in c.records]
    failed = [r for r in records if not r.ok]
    summary = analyse(clients, killer.kills, sampler.samples, scales, t0, chaos_end, args.max_tokens, args.workers,
                      args.window_s, args.rate_window_s, args.scale_settle_s)
    server = final_report if final_status == 200 else {}
    # `events` (every membership change, coordinator restarts) where the report has it, else the
    # engine's recoveries (older reports).
    server_events = server.get("events") if server.get("events") is not None else server.get("recoveries")
    match_server_events(killer.kills, server_events)
    result = {
        "benchmark": "chaos", "machine": args.machine, "cpus": os.cpu_count(), "date": args.date,
        "command": getattr(args, "command", "python -m moeray.bench.chaos"),
        "config": {k: getattr(args, k) for k in ("workers", "experts", "layers", "hidden", "ffn", "clients",
                                                  "duration_s", "prompt_tokens", "max_tokens", "temperature", "zipf",
                                                  "kill_every_s", "jitter", "window_s", "rate_window_s", "seed")}
        | {"coordinator_kill_at_s": coordinator_at, "scale_to": scale_to, "rebalancing": True,
           "recovery": getattr(parallel, "recovery", None), "rejoin": getattr(parallel, "rejoin", None)},
        "requests_ok": len(records) - len(failed), "requests_failed": len(failed),
        "failures": [{"at_s": r.ended_s - t0, "error": r.error} for r in failed][:50],
        **summary,
        "kills": killer.kills, "scales": scales,
        "placement_samples": [{**s, "t": s["t"] - t0} for s in sampler.samples],
        "placement_errors": sum(1 for s in sampler.samples if s["status"] != 200),
        "final_placement_status": final_status,
        "server_events_source": "events" if server.get("events") is not None else "recoveries",
        "server_events": server_events, "server_epoch": server.get("epoch"),
    }
    print_table(result)
    write_json(args.json, result)
    return result


def _f(value, fmt=".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _pair(imbalance: dict) -> str:
    return f"{_f(imbalance.get('realised_mean'))},{_f(imbalance.get('current_mean'))}"


def print_table(r: dict) -> None:
    c = r["config"]
    print(f"chaos: {c['clients']} streaming clients x {c['duration_s']:g} s, {c['workers']} CPU workers "
          f"(recovery {c['recovery']}), rebalancing on, a kill every ~{c['kill_every_s']:g} s, the coordinator at >= "
          f"{c['coordinator_kill_at_s']:g} s")
    print(f"requests ok {r['requests_ok']}, failed {r['requests_failed']}; /v1/placement samples failed: "
          f"{r['placement_errors']} of {len(r['placement_samples'])}")
    print(f"output tokens/s: steady {_f(r['steady_tokens_per_s'], '.0f')} ({r['steady_seconds']} s), recovering "
          f"{_f(r['recovering_tokens_per_s'], '.0f')}, first {c['window_s']:g} s after a kill "
          f"{_f(r['after_kill_window_tokens_per_s'], '.0f')}")
    print(f"{'kill':>4} {'at s':>6} {'target':>11} {'pid':>7} {'stall s':>8} {'recov s':>8} {'failed':>6} "
          f"{'imb after':>9} {'W':>2} {'full s':>6} {'imb full':>8}  server events (kind mode seconds)")
    print(f"{'':>62}(realised, current)")
    for i, k in enumerate(r["kills"], 1):
        if k["t"] is None:
            print(f"{i:>4} {k['planned_s']:>6.1f} {k['kind']:>11}  skipped: {k['skipped']}")
            continue
        after, full = k.get("imbalance_after") or {}, k.get("imbalance_at_full_strength") or {}
        server = ", ".join(f"{e['kind']} {e.get('mode', '')} {_f(e.get('seconds'))}" for e in k["server_events"])
        print(f"{i:>4} {k['at_s']:>6.1f} {k['kind']:>11} {k['pid']:>7} {_f(k['stall_s']):>8} "
              f"{_f(k['recovery_s']):>8} {k['failed_requests']:>6} {_pair(after):>9} {after.get('workers', '-'):>2} "
              f"{_f(k['full_strength_after_s'], '.1f'):>6} {_pair(full):>8}  {server or '-'}")
    steady = r["steady_imbalance"]
    print(f"worker recovery p50 {_f(r['worker_recovery_p50_s'])} s, max {_f(r['worker_recovery_max_s'])} s "
          f"({r['worker_kills_not_recovered']} not recovered); steady imbalance realised "
          f"{_f(steady['realised_mean'])}, current {_f(steady['current_mean'])} ({steady['samples']} samples)")
    for s in r["scales"]:
        server_s = s["response"].get("seconds") if isinstance(s["response"], dict) else None
        print(f"scale -> {s['to_workers']}: {s['seconds']:.2f} s (HTTP {s['status']}; server {_f(server_s)} s), "
              f"longest gap {s['longest_gap_s']:.2f} s, failed {s['failed_requests']}, "
              f"then {_f(s['tokens_per_s_after'], '.0f')} tok/s")
    if r["failures"]:
        print("failures, e.g.:", *[f"{f['at_s']:.1f} s: {f['error']}" for f in r["failures"][:5]], sep="\n  ")
    events = r["server_events"]
    kinds = collections.Counter(e.get("kind") for e in events or [])
    print(f"server-side ({r['server_events_source']}, final /v1/placement HTTP {r['final_placement_status']}):",
          ", ".join(f"{n} {kind}" for kind, n in kinds.items()) or "none")


if __name__ == "__main__":
    standalone("chaos", __doc__, add_arguments, run)
