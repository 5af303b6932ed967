"""A Serve replica's death is survivable (issue 11): two replicas behind one endpoint, one of them
killed (`ray.kill`, no cleanup, as a SIGKILL) while clients send requests.

- the other replica keeps answering: Serve's router stops sending to the dead one;
- requests in flight on the killed replica fail (Serve retries no started request): counted, as is
  the longest time no request was answered;
- the `openai` client's default retries (max_retries=2 on 5xx / connection errors) carry a
  non-streaming request across the kill: every one of them gets the reference answer;
- Serve restarts the replica under the same rank, and the new one resumes from the placement its
  predecessor saved (moeray/serving/persist.py): same version, same slots, the old rebalance log
  shown in /v1/placement as from a previous replica.

Uses the session's Ray cluster, and the Serve instance already running there (test_serve.py's app)
or one of its own, shut down at the end.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve", reason="needs ray[serve] (pip install -e '.[serve]')")
requests = pytest.importorskip("requests")
openai = pytest.importorskip("openai")

from moeray.config import EngineOptions, ParallelConfig, RebalanceConfig  # noqa: E402
from moeray.generation.reference import greedy_generate  # noqa: E402
from moeray.serving import persist  # noqa: E402
from moeray.serving.config import ServeConfig, ServiceConfig  # noqa: E402
from placement import Placement  # noqa: E402
from tests.actors.serving_app import CONTEXT, VOCAB, Service, free_port, wait_for  # noqa: E402

APP, PREFIX = "moeray-replica-death", "/death"
LONG = 96  # tokens of the requests that must still be running when the replica dies


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.helpers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("replica-death"), seed=5, vocab_size=VOCAB, num_experts=8, top_k=2)


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, checkpoint):
    from moeray.serving.deployment import MoEService, _running_serve_address

    running = _running_serve_address()
    port = free_port() if running is None else running[1]
    if running is None:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    ckpt, model_cfg, reference = checkpoint
    config = ServiceConfig(
        checkpoint=ckpt,
        engine=EngineOptions(parallel=ParallelConfig(num_workers=2, redundant_slots_per_worker=1, cpus_per_worker=0.5,
                                                     collective_timeout_s=30),
                             rebalance=RebalanceConfig(enabled=False, min_tokens=0)),
        serve=ServeConfig(port=port, app_name=APP, route_prefix=PREFIX, model_name="tiny-moe",
                          max_tokens_per_request=CONTEXT))
    persist.clear_app(APP)
    # Serve's health check every second (default 10 s): it is what notices the dead replica and
    # starts its replacement; the survivor's answers do not depend on it.
    app = MoEService.options(num_replicas=2, max_ongoing_requests=config.serve.max_ongoing_requests,
                             health_check_period_s=1, health_check_timeout_s=20,
                             graceful_shutdown_timeout_s=2).bind(config.model_dump())
    serve.run(app, name=APP, route_prefix=PREFIX, blocking=False)
    helper = Service(port, ckpt, model_cfg, reference, "tiny-moe")
    helper.url = f"{helper.url}{PREFIX}"
    try:
        yield helper
    finally:
        serve.delete(APP)
        persist.clear_app(APP)
        if running is None:
            serve.shutdown()


def _get(url: str, path: str) -> dict:
    resp = requests.get(f"{url}{path}", timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _complete(url: str, prompt, max_tokens: int, **body) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                        **body}, timeout=120)


def _replica_actor(replica_id: str):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and APP in a["name"] and a["name"].endswith(replica_id)]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def _alive(class_name: str) -> int:
    """Live actors of a class on the cluster (GCS table; no dashboard needed)."""
    import ray

    return sum(a["State"] == "ALIVE" and a["ActorClassName"] == class_name
               for a in ray._private.state.actors().values())


def _placement_groups() -> int:
    import ray

    return sum(pg["state"] == "CREATED" for pg in ray.util.placement_group_table().values())


def test_a_killed_replica_leaves_the_service_up_and_its_replacement_resumes_its_placement(two_replicas):
    svc = two_replicas
    url = svc.url
    rng = np.random.default_rng(3)

    # ---- both replicas serve; each rebalances once and saves its placement ---------------------
    ranks: dict[str, int] = {}

    def both_answer():
        health = _get(url, "/healthz")
        ranks[health["replica"]] = health["rank"]
        return len(ranks) == 2

    wait_for(both_answer, "both replicas answering /healthz", timeout=30, interval=0)
    assert sorted(ranks.values()) == [0, 1], ranks
    skewed = [(rng.integers(3, 40, 12)).tolist() for _ in range(6)]  # a narrow vocabulary: skewed routing
    for prompt in skewed:
        assert _complete(url, prompt, 4).status_code == 200
    staged: dict[str, int] = {}

    def both_staged():
        resp = requests.post(f"{url}/v1/rebalance", json={"force": True}, timeout=60)
        assert resp.status_code == 200, resp.text
        if resp.json()["staged_version"] is not None:
            staged[resp.json()["replica"]] = resp.json()["staged_version"]
        else:  # this replica has no load yet (every request went to the other one)
            assert _complete(url, skewed[0], 2).status_code == 200
        return len(staged) == 2

    wait_for(both_staged, "a forced rebalance staged on both replicas", timeout=30, interval=0)
    reports: dict[str, dict] = {}

    def both_committed_and_saved():
        assert _complete(url, skewed[1], 2).status_code == 200  # the next step on a replica commits
        report = _get(url, "/v1/placement")
        reports[report["service"]["replica"]] = report
        return len(reports) == 2 and all(
            r["placement_version"] == staged[rid] and r["service"]["state"]["saved_version"] == staged[rid]
            for rid, r in reports.items())

    wait_for(both_committed_and_saved, "both replicas committed and saved their placement", timeout=30, interval=0)
    victim = max(ranks, key=ranks.get)  # rank 1
    rank = ranks[victim]
    saved = persist.load_record(APP, rank)
    assert saved is not None and saved["replica"] == victim and saved["version"] == staged[victim]
    before = reports[victim]
    assert saved["phy2log"] == [layer["phy2log"] for layer in before["layers"]]
    contiguous = Placement.contiguous(len(before["layers"]), 8, 2, before["slots_per_worker"])
    assert saved["phy2log"] != contiguous.phy2log.tolist(), "the rebalance kept the contiguous slots: nothing to resume"
    assert [r["version"] for r in before["rebalances"]] == [staged[victim]]

    owned = (_alive("Worker"), _alive("Coordinator"), _placement_groups())  # the engines' actors and bundles

    # ---- the kill, with traffic ------------------------------------------------------------------
    prompt = svc.tokenizer.encode("The river begins as a thin stream")
    want_long = svc.tokenizer.decode(greedy_generate(svc.reference, prompt, LONG))
    want_short = svc.greedy(prompt, 2)[1]
    stop = threading.Event()
    answered: list[float] = []  # when each short request was answered (monotonic)
    short_failures: list[str] = []
    lock = threading.Lock()

    def short_requests():  # back to back, as a client that never gives up would
        while not stop.is_set():
            try:
                resp = _complete(url, prompt, 2)
                ok = resp.status_code == 200 and resp.json()["choices"][0]["text"] == want_short
                detail = f"{resp.status_code} {resp.text[:80]} from {resp.headers.get('x-moeray-replica')}"
            except requests.RequestException as exc:
                ok, detail = False, f"{type(exc).__name__}"
            with lock:
                (answered.append(time.monotonic()) if ok else short_failures.append(detail))

    streamed: dict[int, str] = {}
    stream_replica: dict[int, str] = {}
    first_chunk = [threading.Event() for _ in range(4)]

    def long_stream(i):  # raw HTTP, no retries: what a started stream gets when its replica dies
        try:
            with requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": LONG, "temperature": 0,
                                                               "ignore_eos": True, "stream": True},
                               stream=True, timeout=120) as resp:
                stream_replica[i] = resp.headers.get("x-moeray-replica")
                if resp.status_code != 200:
                    streamed[i] = f"status {resp.status_code}"
                    return
                events = []
                for line in resp.iter_lines():
                    if line:
                        events.append(line.decode())
                        first_chunk[i].set()
                done = events and events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
                streamed[i] = "ok" if done else f"cut after {len(events)} events"
        except requests.RequestException as exc:
            streamed[i] = f"{type(exc).__name__}"
        finally:
            first_chunk[i].set()

    retrying = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, timeout=120)
    through_openai: dict[int, tuple] = {}

    def openai_request(i):  # non-streaming, the openai package's default retries
        try:
            raw = retrying.completions.with_raw_response.create(model="tiny-moe", prompt=prompt, max_tokens=LONG,
                                                                temperature=0, extra_body={"ignore_eos": True})
            through_openai[i] = (raw.parse().choices[0].text, raw.retries_taken, raw.headers.get("x-moeray-replica"))
        except openai.APIError as exc:
            through_openai[i] = (f"{type(exc).__name__}: {exc}", None, None)

    threads = [threading.Thread(target=openai_request, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=long_stream, args=(i,)) for i in range(4)]
    poller = threading.Thread(target=short_requests)
    for th in threads:
        th.start()
    poller.start()
    try:
        for event in first_chunk:  # every stream is generating: both replicas are busy
            assert event.wait(timeout=30), "a long request never started"
        actor = _replica_actor(victim)
        import ray

        killed_at = time.monotonic()
        ray.kill(actor, no_restart=True)
        for th in threads:
            th.join(timeout=90)
        assert not any(th.is_alive() for th in threads), "a request did not end"
        wait_for(lambda: any(t > killed_at + 1.0 for t in answered), "an answer after the kill", timeout=30)
    finally:
        stop.set()
        poller.join(timeout=60)

    stream_failures = sorted(i for i, outcome in streamed.items() if outcome != "ok")
    times = [killed_at] + sorted(t for t in answered if t > killed_at)
    gap = max(b - a for a, b in zip(times, times[1:]))  # the longest time without an answer, from the kill on
    on_victim = sorted(i for i, rid in stream_replica.items() if rid == victim)
    print(f"\nreplica {victim} killed: {len(stream_failures)}/4 streams cut ({len(on_victim)} were on it), "
          f"{len(short_failures)} short requests failed {short_failures}, openai retries "
          f"{[r for _, r, _ in through_openai.values()]}, longest time without an answer {gap:.2f} s")
    # the survivor answered on: every stream it served finished, those cut were the victim's
    assert stream_failures == on_victim, (streamed, stream_replica)
    assert all(outcome.startswith("ChunkedEncodingError") or outcome.startswith("cut")
               for i, outcome in streamed.items() if i in on_victim), streamed
    assert gap < 5.0, f"{gap:.2f} s without an answer"
    assert len(short_failures) <= 2, short_failures  # the one in flight on the victim, one routed there before
    # every openai request got the reference answer, from the survivor when it was retried
    assert sorted(through_openai) == [0, 1, 2, 3]
    assert all(text == want_long for text, _, _ in through_openai.values()), through_openai
    assert all(rid != victim for _, retries, rid in through_openai.values() if retries), through_openai
    retried = sum(bool(retries) for _, retries, _ in through_openai.values())
    assert on_victim or retried, "no request was in flight on the killed replica: the kill was not exercised"

    # ---- Serve restarts it, under the same rank, on the saved placement --------------------------
    new_ranks: dict[str, int] = {}

    def replacement_answers():
        health = _get(url, "/healthz")
        new_ranks[health["replica"]] = health["rank"]
        return any(rid not in ranks for rid in new_ranks)

    wait_for(replacement_answers, "the replacement replica answering", timeout=45, interval=0.1)
    print(f"replacement answering {time.monotonic() - killed_at:.1f} s after the kill")
    (successor,) = [rid for rid in new_ranks if rid not in ranks]
    assert new_ranks[successor] == rank
    assert victim not in new_ranks  # nothing was answered by the dead replica after the kill

    def successor_report():
        assert _complete(url, skewed[2], 3).status_code == 200
        report = _get(url, "/v1/placement")
        # one from the replacement, once it has served a request (on the resumed placement)
        return report if report["service"]["replica"] == successor and report["service"]["driver_steps"] else None

    after = wait_for(successor_report, "a placement report of the replacement", timeout=30, interval=0)
    assert after["placement_version"] == saved["version"]
    assert [layer["phy2log"] for layer in after["layers"]] == saved["phy2log"]
    resumed = after["service"]["state"]["resumed_from"]
    assert resumed["replica"] == victim and resumed["placement_resumed"], resumed
    carried = [r for r in after["rebalances"] if r.get("from_previous_replica")]
    assert [(r["version"], r["replica"]) for r in carried] == [(saved["version"], victim)], after["rebalances"]
    # its own record carries the chain on: same slots and replica split weights, the log with it
    resaved = wait_for(lambda: (r := persist.load_record(APP, rank)) and r["replica"] == successor and r,
                       "the replacement's own saved record", timeout=10)
    assert saved["replica_weights"] is not None and resaved["replica_weights"] == saved["replica_weights"]
    assert (resaved["version"], resaved["phy2log"]) == (saved["version"], saved["phy2log"])
    assert [(r["version"], r["replica"]) for r in resaved["rebalances"]] == [(saved["version"], victim)]
    # the dead replica's engine (workers, coordinator, placement group) went with it: nothing leaked
    assert (_alive("Worker"), _alive("Coordinator"), _placement_groups()) == owned
    # it answers like everyone else (reference outputs on its resumed placement)
    for _ in range(4):
        resp = _complete(url, prompt, 6)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == svc.greedy(prompt, 6)[1]


def test_a_saved_placement_for_another_worker_count_is_not_resumed(checkpoint):
    """The replacement starts contiguous (and says why) when the saved placement does not fit."""
    from moeray.llm import engine_config_for

    ckpt = checkpoint[0]
    two = engine_config_for(ckpt, EngineOptions(parallel=ParallelConfig(num_workers=2, redundant_slots_per_worker=1)))
    three = engine_config_for(ckpt, EngineOptions(parallel=ParallelConfig(num_workers=3, slots_per_worker=5)))
    p = Placement.contiguous(two.model.num_moe_layers, 8, 2, two.slots_per_worker)
    flipped = np.array(p.phy2log)[:, ::-1].copy()
    record = {"schema": persist.SCHEMA, "replica": "old", "version": 4, "num_workers": 2, "phy2log": flipped.tolist(),
              "replica_weights": None, "fingerprint": persist.fingerprint(two, ckpt), "saved_at": 0}
    placement, why = persist.resume_placement(record, two, ckpt)
    assert placement is not None and placement.version == 4 and np.array_equal(placement.phy2log, flipped), why
    placement, why = persist.resume_placement(record, three, ckpt)
    assert placement is None and "has 2 workers, the config asks for 3: contiguous placement" in why
    placement, why = persist.resume_placement({**record, "phy2log": [[9] * 10] * len(flipped)}, two, ckpt)
    assert placement is None and "not valid" in why
    assert persist.resume_placement(None, two, ckpt) == (None, "no saved state: contiguous placement")
