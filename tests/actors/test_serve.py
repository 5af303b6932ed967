"""The HTTP service on Ray Serve, end to end on the session's local cluster (2 CPU workers).

Checks: answers equal the single-process reference; concurrent requests share engine steps
(continuous batching) and each still gets its own answer; bad requests get a 4xx that names the bad value
and the service keeps serving; rebalancing over HTTP changes the placement version.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve", reason="needs ray[serve] (pip install -e '.[serve]')")
requests = pytest.importorskip("requests")

from moeray.config import EngineOptions, ParallelConfig, RebalanceConfig  # noqa: E402
from moeray.serving.config import ServeConfig, ServiceConfig  # noqa: E402

from tests.helpers import make_checkpoint, reference_logits  # noqa: E402

VOCAB = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from moeray.serving.deployment import run_service

    ckpt, model_cfg, reference = make_checkpoint(tmp_path_factory.mktemp("serve"), seed=5, vocab_size=VOCAB,
                                                 num_experts=8, top_k=2)
    config = ServiceConfig(
        checkpoint=ckpt,
        engine=EngineOptions(parallel=ParallelConfig(num_workers=2, redundant_slots_per_worker=1, collective_timeout_s=30),
                             rebalance=RebalanceConfig(enabled=False, min_tokens=0)),
        serve=ServeConfig(port=_free_port(), max_tokens_per_request=64, app_name="moeray-test"),
    )
    run_service(config, blocking=False)
    yield f"http://127.0.0.1:{config.serve.port}", reference
    serve.delete(config.serve.app_name)
    serve.shutdown()


def _forward(url, ids, top_logprobs=0):
    return requests.post(f"{url}/v1/forward", json={"token_ids": [int(i) for i in ids], "top_logprobs": top_logprobs},
                         timeout=60)


def test_forward_matches_reference(service):
    url, reference = service
    ids = np.random.default_rng(0).integers(0, VOCAB, 23)
    resp = _forward(url, ids, top_logprobs=3)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    want_TV = reference_logits(reference, ids).astype(np.float64)
    assert body["next_token_ids"] == want_TV.argmax(1).tolist()
    want_logprobs_TV = want_TV - np.log(np.exp(want_TV - want_TV.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - want_TV.max(1, keepdims=True)
    for t, top in enumerate(body["top_logprobs"]):
        assert [tok for tok, _ in top] == np.argsort(-want_logprobs_TV[t], kind="stable")[:3].tolist()
        np.testing.assert_allclose([lp for _, lp in top], want_logprobs_TV[t, [tok for tok, _ in top]], atol=1e-4)


def test_concurrent_requests_share_steps_and_get_their_own_answers(service):
    url, reference = service
    before = requests.get(f"{url}/v1/stats", timeout=60).json()
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, VOCAB, int(n)) for n in rng.integers(1, 20, 8)]
    answers: dict[int, list[int]] = {}
    start = threading.Barrier(len(batches))

    def call(i):
        start.wait()
        resp = _forward(url, batches[i])
        answers[i] = resp.json()["next_token_ids"] if resp.status_code == 200 else resp.text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    for i, ids in enumerate(batches):
        assert answers[i] == reference_logits(reference, ids).argmax(1).tolist(), f"request {i}"
    after = requests.get(f"{url}/v1/stats", timeout=60).json()
    assert after["steps"] - before["steps"] < len(batches), "no two requests shared an engine step"
    assert after["largest_step_requests"] >= 2


@pytest.mark.parametrize("payload,status,names", [
    ({"token_ids": [1, 600, 2]}, 400, "token id 600 is outside the vocabulary [0, 512)"),
    ({"token_ids": [-3]}, 400, "token id -3"),
    ({"token_ids": [1, 10**20]}, 400, "token id 100000000000000000000"),
    ({"token_ids": []}, 422, "token_ids"),
    ({"token_ids": ["abc"]}, 422, "abc"),
    ({"token_ids": [1], "top_logprobs": 21}, 422, "top_logprobs"),
    ({"token_ids": [1], "temperature": 0.5}, 422, "temperature"),
    ({"token_ids": list(range(65))}, 413, "65 tokens > max_tokens_per_request=64"),
])
def test_bad_request_is_named_and_service_keeps_serving(service, payload, status, names):
    url, reference = service
    resp = requests.post(f"{url}/v1/forward", json=payload, timeout=60)
    assert resp.status_code == status, resp.text
    assert names in resp.text
    ok = _forward(url, [7, 8])
    assert ok.status_code == 200
    assert ok.json()["next_token_ids"] == reference_logits(reference, np.array([7, 8])).argmax(1).tolist()


def test_not_json_is_a_4xx(service):
    url, _ = service
    resp = requests.post(f"{url}/v1/forward", data=b"{not json", headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 422, resp.text
    assert _forward(url, [1]).status_code == 200


def test_rebalance_over_http_commits_at_the_next_step(service):
    url, reference = service
    version = requests.get(f"{url}/v1/stats", timeout=60).json()["placement_version"]
    resp = requests.post(f"{url}/v1/rebalance", json={"force": True}, timeout=120)
    assert resp.status_code == 200, resp.text
    staged = resp.json()["staged_version"]
    assert staged == version + 1
    ids = np.arange(40) % VOCAB
    body = _forward(url, ids).json()  # this step commits the staged placement
    assert body["next_token_ids"] == reference_logits(reference, ids).argmax(1).tolist()
    assert requests.get(f"{url}/v1/stats", timeout=60).json()["placement_version"] == staged
    assert requests.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"


def test_a_killed_worker_is_replaced_and_requests_still_succeed(service):
    """SIGKILL one engine worker process (the service's engine is the only live one in this
    module): the next request triggers Engine.recover() and still gets the reference answer."""
    import os
    import signal

    import psutil

    url, reference = service
    # Ray titles actor processes "ray::<Class>..."; the service's engine is the only live one here
    # (the dashboard, and with it the state API, is off in tests).
    workers = [p for p in psutil.process_iter(["pid", "cmdline"])
               if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::Worker")]
    assert len(workers) == 2, [p.info for p in workers]
    os.kill(workers[0].pid, signal.SIGKILL)  # a process this test session's service started
    ids = np.arange(30) % VOCAB
    resp = _forward(url, ids)
    assert resp.status_code == 200, resp.text
    assert resp.json()["next_token_ids"] == reference_logits(reference, ids).argmax(1).tolist()
    recoveries = requests.get(f"{url}/v1/stats", timeout=60).json()["recoveries"]
    assert len(recoveries) == 1 and len(recoveries[0]["replaced"]) == 1
