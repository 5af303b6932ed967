"""Metrics, the placement report and its plots from a real engine (the built-in tiny model on two
CPU workers, skewed prompts, a forced rebalance), and what the local cluster listens on."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moeray.generation.sampling import SamplingParams
from moeray.llm import LLM
from moeray.metrics import ServingMetrics
from moeray.models.tiny import write_tiny_model
from moeray.plot import plot_report
from moeray.serving.placement_report import placement_report, read_report
from moeray.status import render_status
from moeray.streams import zipf_tokens
from tests.unit.test_plot import PLOTS, assert_png

MODEL_NAME = "tiny"
REQUESTS_PER_ROUND = 6
MAX_TOKENS = 6
REQUIRED_METRICS = (
    "moeray:prompt_tokens", "moeray:generation_tokens", "moeray:time_to_first_token_seconds",
    "moeray:inter_token_latency_seconds", "moeray:e2e_request_latency_seconds", "moeray:num_requests_running",
    "moeray:num_requests_waiting", "moeray:kv_cache_usage_perc", "moeray:request_success", "moeray:expert_imbalance",
    "moeray:rebalances", "moeray:rebalance_slots_moved", "moeray:rebalance_bytes_moved",
    "moeray:migration_stall_seconds", "moeray:planner_seconds", "moeray:workers", "moeray:epoch", "moeray:recoveries",
    "moeray:placement_version",
)


def generate_observed(llm: LLM, metrics: ServingMetrics, prompts: list, params: SamplingParams) -> int:
    """Run the prompts through the driver as the service's engine loop does, every step's outputs
    to the metrics; returns the tokens generated."""
    ids = []
    for prompt in prompts:
        request_id = llm.driver.add_request(prompt, params)
        metrics.request_added(request_id, len(prompt))
        ids.append(request_id)
    pending, generated = set(ids), 0
    while pending:
        outputs = llm.driver.step()
        metrics.observe(outputs)
        for out in outputs:
            if out.finished:
                pending.discard(out.request_id)
                generated += len(out.outputs[0].token_ids)
    return generated


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """One engine for the module: skewed traffic, a forced rebalance, more traffic on v1."""
    ckpt = tmp_path_factory.mktemp("observe") / MODEL_NAME
    _, model_cfg = write_tiny_model(ckpt)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(str(ckpt), num_workers=2, redundant_slots_per_worker=1, stats={"snapshot_interval_steps": 2},
             rebalance={"enabled": False, "window_steps": 16}) as llm:  # only the forced rebalance happens
        metrics = ServingMetrics(MODEL_NAME)

        def skewed_round() -> int:
            prompts = [zipf_tokens(model_cfg.vocab_size, 24, 1.3, rng).tolist() for _ in range(REQUESTS_PER_ROUND)]
            return generate_observed(llm, metrics, prompts, params)

        generated = skewed_round()
        llm.stats()  # flush: the coordinator plans from every step served so far
        staged = llm.rebalance(force=True)
        generated += skewed_round()
        llm.stats()  # flush the ranges served on v1
        yield {"llm": llm, "metrics": metrics, "generated": generated, "staged": staged}


def test_metrics_of_a_real_engine_parse_and_hold_sane_values(served):
    llm, metrics = served["llm"], served["metrics"]
    assert metrics._ray is not None, "inside a Ray driver the metrics also go to Ray's export"
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(llm.driver, llm.engine))}
    missing = [name for name in REQUIRED_METRICS if name not in families]
    assert not missing, f"missing metrics: {missing}"

    def value(name, suffix="", **labels):
        return next(s.value for s in families[name].samples
                    if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))

    requests = 2 * REQUESTS_PER_ROUND
    assert value("moeray:generation_tokens", "_total") == served["generated"] == requests * MAX_TOKENS
    assert value("moeray:prompt_tokens", "_total") == requests * 24
    assert value("moeray:request_success", "_total", finished_reason="length") == requests
    assert value("moeray:time_to_first_token_seconds", "_count") == requests
    assert value("moeray:inter_token_latency_seconds", "_count") == requests * (MAX_TOKENS - 1)
    e2e_sum = value("moeray:e2e_request_latency_seconds", "_sum")
    assert value("moeray:e2e_request_latency_seconds", "_count") == requests and 0 < e2e_sum < 120
    assert value("moeray:num_requests_running") == 0 and value("moeray:num_requests_waiting") == 0
    assert [value("moeray:kv_cache_usage_perc", worker=str(w)) for w in range(2)] == [0.0, 0.0]
    assert value("moeray:workers") == 2 and value("moeray:epoch") == 0 and value("moeray:recoveries", "_total") == 0
    assert served["staged"] == 1 and value("moeray:placement_version") == 1
    assert value("moeray:rebalances", "_total") == 1
    record = llm.stats()["rebalances"][-1]
    assert value("moeray:rebalance_slots_moved", "_total") == record["slots_moved"]
    assert value("moeray:rebalance_bytes_moved", "_total") == record["bytes_moved"]
    assert value("moeray:planner_seconds", "_count") == 1
    num_layers = llm.engine.config.model.num_moe_layers
    imbalance = [value("moeray:expert_imbalance", layer=str(layer)) for layer in range(num_layers)]
    assert all(1.0 <= v <= 2.0 for v in imbalance), imbalance  # 2 workers: max/mean is at most 2


def test_placement_report_of_a_real_engine_plots_and_prints(served, tmp_path):
    llm = served["llm"]
    report = placement_report(llm.engine, MODEL_NAME)
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(report))
    report = read_report(path)
    model = llm.engine.config.model
    assert report["model"]["name"] == MODEL_NAME and report["model"]["architecture"] == model.architecture
    assert report["placement_version"] == 1 and report["num_workers"] == 2 and report["epoch"] == 0
    assert len(report["layers"]) == model.num_moe_layers
    for layer, phy2log in zip(report["layers"], llm.placement().phy2log.tolist()):
        assert layer["phy2log"] == phy2log and sum(layer["expert_load"]) > 0 and layer["imbalance"] >= 1.0
    last = report["last_rebalance"]
    assert last["version"] == 1 and last["before_version"] == 0
    assert last["before_steps"] > 0 and last["after_steps"] > 0, "ranges served before and after the commit"
    timeline = report["timeline"]
    assert len(timeline["step_hi"]) >= 4 and set(timeline["version"]) == {0, 1}
    commit = last["committed_at_step"]
    assert all(v == (1 if lo >= commit else 0) for lo, v in zip(timeline["step_lo"], timeline["version"]))
    written = plot_report(report, tmp_path / "plots")
    assert [p.name for p in written] == list(PLOTS)
    for p in written:
        assert_png(p)
    text = render_status(report)
    assert f"{MODEL_NAME} ({model.architecture}): placement v1" in text and "\nv1 " in text
    surviving = report["surviving_load_after_worker_loss"]
    assert len(surviving) == report["num_workers"] and all(0.0 <= s <= 1.0 for s in surviving)
    assert "after losing one worker" in text


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """{socket inode: (address, port)} of every TCP listener in this network namespace."""
    out = {}
    for table, ipv6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            if ipv6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                import ipaddress

                addr = ipaddress.IPv6Address(raw)
                address = str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
            else:
                address = ".".join(str(b) for b in raw[::-1])
            out[int(fields[9])] = (address, int(hex_port, 16))
    return out


def _descendants(roots: set[int]) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:  # the process ended meanwhile
        pass
    return inodes


def _session_listeners(llm: LLM) -> tuple[set, set]:
    """(listeners of the worker group's processes, listeners of every other process of this Ray
    session: GCS, raylet, agents, coordinator, idle workers, this driver)."""
    import ray

    node = ray._private.worker._global_node  # this session's node (private, but the only handle on its processes)
    if node is None or node.node_ip_address != "127.0.0.1":
        pytest.skip("this session joined an existing cluster; only the local one is bound to loopback")
    roots = {info.process.pid for infos in node.all_processes.values() for info in infos if info.process is not None}
    session = _descendants(roots) | {os.getpid()}
    group = set(ray.get([w.__ray_call__.remote(lambda self: os.getpid()) for w in llm.engine.workers]))
    listeners = _listening_sockets()

    def of(pids):
        return {listeners[i] for pid in pids for i in _socket_inodes(pid) if i in listeners}

    return of(group), of(session - group)


def _beyond_loopback(addresses) -> list:
    return sorted(a for a in addresses if a[0] not in ("127.0.0.1", "::1"))


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")


@needs_proc
def test_the_local_ray_cluster_listens_on_loopback_only(served):
    _, ray_processes = _session_listeners(served["llm"])
    assert len(ray_processes) >= 5, f"expected the GCS, raylet, agents, coordinator among {ray_processes}"
    assert not _beyond_loopback(ray_processes), f"listening beyond loopback: {_beyond_loopback(ray_processes)}"


@needs_proc
def test_the_worker_group_listens_on_loopback_only(served):
    group, _ = _session_listeners(served["llm"])
    assert group, "the workers listen (gRPC, Gloo, the rendezvous store)"
    assert not _beyond_loopback(group), f"listening beyond loopback: {_beyond_loopback(group)}"


def test_cluster_job_gives_up_at_once_without_gpus_on_a_local_cluster(served):
    import ray

    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this cluster has GPUs")
    spec = importlib.util.spec_from_file_location("example_cluster_job",
                                                  Path(__file__).resolve().parents[2] / "examples" / "cluster_job.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.cluster_is_loopback_only()
    start = time.monotonic()
    with pytest.raises(SystemExit, match="needs 2 GPUs; the local Ray cluster on this machine has 0") as info:
        # a short timeout: were the local cluster not recognised, this fails on the timeout's message
        job.wait_for_gpus(2, timeout_s=3, can_grow=not job.cluster_is_loopback_only(), progress_every_s=1)
    assert "--device cpu" in str(info.value) and time.monotonic() - start < 5
