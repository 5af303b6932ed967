"""The OpenAI-compatible HTTP service on Ray Serve, end to end on the session's local cluster.

One app (the built-in tiny model, 2 CPU workers; the session's `service` fixture, shared with
test_serve_bad_input.py) that every test talks to over HTTP,
through the official `openai` client and raw requests: answers equal the single-process greedy
reference (plain, streamed, token-id and batched prompts), concurrent requests share engine steps,
placement / rebalance / scale / metrics / health,
the README's curl lines, and a killed worker replaced transparently. One more app, started and
deleted inside its test: two replicas (two engines) behind one endpoint, with an API key and a
chat template. Each test sends the traffic it checks, so the tests pass alone and in any order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve", reason="needs ray[serve] (pip install -e '.[serve]')")
requests = pytest.importorskip("requests")
openai = pytest.importorskip("openai")


from moeray.config import EngineOptions, ParallelConfig, RebalanceConfig, StatsConfig
from moeray.serving.config import ServeConfig, ServiceConfig
from moeray.serving.core import PortInUse, check_port_free
from tests.actors.serving_app import CHAT_TEMPLATE, CONTEXT, PROMPT, REPO, VOCAB, free_port, wait_for

# ---- the OpenAI API ---------------------------------------------------------------------------------

def test_completion_through_the_openai_client_equals_the_greedy_reference(service):
    ids = service.tokenizer.encode(PROMPT)
    want_ids, want_text, want_finish = service.greedy(ids, 12)
    got = service.client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=12, temperature=0,
                                            logprobs=2)
    choice = got.choices[0]
    assert (choice.text, choice.finish_reason) == (want_text, want_finish)
    assert got.object == "text_completion" and got.model == "tiny-moe" and got.id.startswith("cmpl-")
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(want_ids)
    assert got.usage.total_tokens == len(ids) + len(want_ids)
    assert choice.logprobs.tokens == [service.tokenizer.decode([t], skip_special_tokens=False) for t in want_ids]
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        # greedy: nothing is more likely than the chosen token (keys may collide: partial UTF-8 decodes to U+FFFD)
        assert logprob <= 0 and 1 <= len(top) <= 2 and max(top.values()) <= logprob + 1e-5


def test_streamed_completion_equals_the_plain_one_and_holds_back_stop_strings(service):
    ids = service.tokenizer.encode(PROMPT)
    _, full_text, _ = service.greedy(ids, 24)
    stop = full_text[7:10]  # three characters in the middle: usually spans a token boundary
    want = full_text[:full_text.find(stop)]
    chunks = list(service.client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=24, temperature=0,
                                                    stop=stop, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want, (text, want, stop)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)
    plain = service.client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop)
    assert plain.choices[0].text == want
    # the wire format itself: server-sent events, the last one `data: [DONE]`
    raw = requests.post(f"{service.url}/v1/completions", json={"prompt": ids, "max_tokens": 4, "stream": True},
                        timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_token_id_prompts_and_a_batch_of_prompts_get_their_own_answers(service):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, int(n)).tolist() for n in (5, 17, 2)]
    body = {"prompt": prompts, "max_tokens": 9, "temperature": 0}
    got = requests.post(f"{service.url}/v1/completions", json=body, timeout=120).json()
    assert [c["index"] for c in got["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, got["choices"]):
        _, text, finish = service.greedy(prompt, 9)
        assert (choice["text"], choice["finish_reason"]) == (text, finish)
    assert got["usage"]["prompt_tokens"] == sum(map(len, prompts))
    # the same batch streamed: each choice's deltas add up to its text
    texts = ["", "", ""]
    for chunk in service.client.completions.create(model="tiny-moe", prompt=prompts, max_tokens=9, temperature=0,
                                                   stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c["text"] for c in got["choices"]]


def test_concurrent_requests_share_engine_steps_and_get_their_own_answers(service):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, int(n)).tolist() for n in rng.integers(1, 20, 8)]
    answers: dict[int, str] = {}
    start = threading.Barrier(len(prompts))

    def call(i):
        start.wait()
        resp = requests.post(f"{service.url}/v1/completions",
                             json={"prompt": prompts[i], "max_tokens": 16, "temperature": 0}, timeout=120)
        answers[i] = resp.json()["choices"][0]["text"] if resp.status_code == 200 else resp.text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    for i, prompt in enumerate(prompts):
        assert answers[i] == service.greedy(prompt, 16)[1], f"request {i}"
    served = requests.get(f"{service.url}/v1/placement", timeout=60).json()["service"]
    assert served["most_requests_in_flight"] >= 2, "no two requests were in flight (sharing engine steps) at once"


def test_chat_without_a_chat_template_is_a_400_naming_it(service):
    with pytest.raises(openai.BadRequestError) as err:
        service.client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "no_chat_template" and err.value.body["param"] == "messages"
    assert "no chat template" in err.value.body["message"]
    assert service.complete().status_code == 200


def test_models_lists_the_served_model(service):
    models = service.client.models.list().data
    assert [m.id for m in models] == ["tiny-moe"]
    assert models[0].owned_by == "moeray" and models[0].model_extra["max_model_len"] == CONTEXT



# ---- placement, rebalance, metrics, health ---------------------------------------------------------

def test_placement_report_is_json_naming_layers_load_and_workers(service):
    assert service.complete(max_tokens=4).status_code == 200  # some routed load to report
    report = requests.get(f"{service.url}/v1/placement", timeout=60).json()
    cfg = service.cfg
    assert report["num_workers"] == 2 and report["num_experts"] == cfg.num_experts
    assert report["model"]["name"] == "tiny-moe" and len(report["layers"]) == cfg.num_moe_layers
    for layer in report["layers"]:
        assert len(layer["phy2log"]) == 2 * report["slots_per_worker"]
        assert sorted(set(layer["phy2log"]) - {-1}) == list(range(cfg.num_experts))
        assert len(layer["worker_load"]) == 2 and layer["imbalance"] >= 1.0
    assert report["epoch"] >= 0 and isinstance(report["rebalances"], list)
    assert report["service"]["driver_steps"] >= 1 and report["service"]["replica"]


def test_rebalance_over_http_commits_at_the_next_step(service):
    assert service.complete(max_tokens=8).status_code == 200  # load for the planner: this test's own
    version = requests.get(f"{service.url}/v1/placement", timeout=60).json()["placement_version"]
    resp = requests.post(f"{service.url}/v1/rebalance", json={"force": True}, timeout=120)
    assert resp.status_code == 200, resp.text
    staged = resp.json()["staged_version"]
    assert staged == version + 1, resp.json()
    prompt = (np.arange(40) % VOCAB).tolist()
    got = requests.post(f"{service.url}/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0},
                        timeout=120).json()  # this step commits the staged placement
    assert got["choices"][0]["text"] == service.greedy(prompt, 6)[1]
    assert requests.get(f"{service.url}/v1/placement", timeout=60).json()["placement_version"] == staged
    assert service.metric("moeray:placement_version") == staged
    assert requests.post(f"{service.url}/v1/rebalance", json={"force": "yes"}, timeout=60).status_code == 400


def test_metrics_after_traffic_have_vllm_names_and_sane_values(service):
    before = service.metrics()
    got = service.complete(max_tokens=20, ignore_eos=True).json()  # > stats.snapshot_interval_steps steps
    assert got["usage"]["completion_tokens"] == 20

    def with_realised_imbalance():  # workers ship routing snapshots to the coordinator asynchronously
        scrape = service.metrics()
        return scrape if any(name == "moeray:expert_imbalance" for name, _ in scrape) else None

    m = wait_for(with_realised_imbalance, "the coordinator's first routing snapshot", timeout=30)

    def grew(name, by=None):
        delta = m[(name, ())] - before.get((name, ()), 0)
        return delta == by if by is not None else delta > 0

    assert grew("moeray:prompt_tokens_total", 3) and grew("moeray:generation_tokens_total", 20)
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert grew(f"moeray:{hist}_count") and m[(f"moeray:{hist}_sum", ())] > 0
    assert m[("moeray:num_requests_running", ())] == 0 and m[("moeray:num_requests_waiting", ())] == 0
    assert m[("moeray:workers", ())] == 2 and m[("moeray:epoch", ())] >= 0
    kv = [v for (name, _), v in m.items() if name == "moeray:kv_cache_usage_perc"]
    assert len(kv) == 2 and all(0 <= v <= 1 for v in kv)
    layers = [v for (name, _), v in m.items() if name == "moeray:expert_imbalance"]
    assert len(layers) == service.cfg.num_moe_layers and all(v >= 1.0 for v in layers)
    for counter in ("rebalances_total", "recoveries_total", "rebalance_slots_moved_total"):
        assert m[(f"moeray:{counter}", ())] >= 0


def test_readme_curl_lines_run_as_written(service):
    """Every `curl ... localhost:8000 ...` line of the README (curl -d sends a form content type)."""
    lines = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()
             if ln.strip().startswith("curl ") and "localhost:8000" in ln]
    assert len(lines) >= 3
    outputs = []
    for line in lines:
        proc = subprocess.run(line.replace("localhost:8000", f"127.0.0.1:{service.port}"), shell=True,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0 and proc.stdout.strip(), (line, proc.stdout, proc.stderr)
        assert '"error"' not in proc.stdout, (line, proc.stdout)
        outputs.append(proc.stdout)
    assert any(out.rstrip().endswith("data: [DONE]") for out in outputs), "no streamed completion in the README"
    assert any('"text_completion"' in out for out in outputs)


def test_the_http_client_example_runs(service, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_http_client", REPO / "examples" / "http_client.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--url", service.url, "--concurrency", "4"])
    assert out["model"] == "tiny-moe" and out["answered"] == 8 and out["report"]["num_workers"] == 2
    assert "invalid: 400 param='prompt'" in capsys.readouterr().out


def test_a_second_service_on_a_busy_port_is_refused(service):
    from moeray.serving.deployment import run_service

    with pytest.raises(PortInUse, match=f"port {service.port} is in use"):
        check_port_free("127.0.0.1", service.port)  # Serve's proxy binds with SO_REUSEPORT: still seen
    same = ServiceConfig(checkpoint=service.ckpt, serve=ServeConfig(port=service.port, app_name="moeray-test"))
    with pytest.raises(RuntimeError, match="'moeray-test' already runs"):
        run_service(same, blocking=False)
    other_port = ServiceConfig(checkpoint=service.ckpt, serve=ServeConfig(port=free_port(), app_name="x"))
    with pytest.raises(RuntimeError, match=f"already runs on this cluster at 127.0.0.1:{service.port}"):
        run_service(other_port, blocking=False)


def test_two_replicas_behind_one_endpoint_with_an_api_key_and_a_chat_template(service, tmp_path):
    """A second app on the same Serve: two replicas, each its own engine (1 CPU worker), an API key,
    and a copy of the checkpoint with a chat template."""
    from moeray.serving.deployment import run_service

    ckpt = tmp_path / "with-chat"
    shutil.copytree(service.ckpt, ckpt)
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": CHAT_TEMPLATE}))
    config = ServiceConfig(
        checkpoint=str(ckpt),
        engine=EngineOptions(parallel=ParallelConfig(num_workers=1, cpus_per_worker=0.5),
                             stats=StatsConfig(enabled=False), rebalance=RebalanceConfig(enabled=False)),
        serve=ServeConfig(port=service.port, app_name="moeray-two", route_prefix="/two", num_replicas=2,
                          api_key="sekret", model_name="chat-moe"))
    run_service(config, blocking=False)
    try:
        base = f"{service.url}/two"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0, timeout=120)
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        assert err.value.body["code"] == "invalid_api_key"
        assert requests.get(f"{base}/metrics", timeout=60).status_code == 401
        assert requests.get(f"{base}/healthz", timeout=60).status_code == 200  # open without a key

        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The river"}]
        rendered = "<s><|system|>\nBe brief.\n<|user|>\nThe river\n<|assistant|>\n"  # the template, by hand
        ids = service.tokenizer.encode(rendered, add_special_tokens=False)
        want_ids, want_text, want_finish = service.greedy(ids, 10)
        got = client.chat.completions.create(model="chat-moe", messages=messages, max_tokens=10, temperature=0)
        assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
        assert (got.choices[0].message.content, got.choices[0].finish_reason) == (want_text, want_finish)
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(want_ids)
        chunks = list(client.chat.completions.create(model="chat-moe", messages=messages, max_tokens=10,
                                                     temperature=0, stream=True, logprobs=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want_text
        assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs) == len(want_ids)

        # both engines answer behind the one endpoint (Serve spreads concurrent requests)
        replicas: set[str] = set()

        def answer_and_note_replica():
            resp = requests.post(f"{base}/v1/completions", headers={"Authorization": "Bearer sekret"},
                                 json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0}, timeout=120)
            assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == \
                service.greedy(service.tokenizer.encode(PROMPT), 4)[1]
            replicas.add(requests.get(f"{base}/healthz", timeout=60).json()["replica"])
            return len(replicas) == 2

        wait_for(answer_and_note_replica, "requests answered by both replicas", timeout=60, interval=0)
    finally:
        serve.delete("moeray-two")


# ---- recovery (last: it replaces a worker) ----------------------------------------------------------

def test_a_killed_worker_is_replaced_and_requests_still_succeed(service):
    """SIGKILL one engine worker process of a serving engine: the next request triggers
    Engine.recover() and still gets the reference answer."""
    import os
    import signal

    import psutil

    def engine_workers():
        # Ray titles actor processes "ray::<Class>..."; of this session's cluster (the raylet is
        # this process's child, the actors its children) the service owns the only engine left (an
        # app deleted just before may take a moment to end its workers)
        found = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.cmdline() and proc.cmdline()[0].startswith("ray::Worker"):
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        return found if len(found) == 2 else None

    assert service.complete(max_tokens=2).status_code == 200  # the engine is serving when the worker dies
    recoveries_before = len(requests.get(f"{service.url}/v1/placement", timeout=60).json()["recoveries"])
    os.kill(wait_for(engine_workers, "exactly the service's 2 worker processes")[0].pid, signal.SIGKILL)
    prompt = (np.arange(30) % VOCAB).tolist()
    resp = requests.post(f"{service.url}/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0},
                         timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == service.greedy(prompt, 5)[1]
    recoveries = requests.get(f"{service.url}/v1/placement", timeout=60).json()["recoveries"]
    assert len(recoveries) == recoveries_before + 1 and len(recoveries[-1]["lost_ranks"]) == 1
    assert requests.get(f"{service.url}/healthz", timeout=60).json()["status"] == "ok"


def test_scale_over_http_keeps_serving_and_refuses_bad_counts(service):
    """POST /v1/scale changes the worker count between steps: answers stay equal to the reference
    at 3 workers and back at 2; bad counts are 400s naming num_workers and change nothing."""
    for bad in ({"num_workers": 0}, {"num_workers": "3"}, {"num_workers": 2.0}, {}, {"num_workers": 3, "x": 1}):
        resp = requests.post(f"{service.url}/v1/scale", json=bad, timeout=60)
        assert resp.status_code == 400, (bad, resp.text)
        assert resp.json()["error"]["param"] in ("num_workers", "x"), resp.json()
    prompt = (np.arange(23) * 7 % VOCAB).tolist()
    for workers in (3, 2):
        if workers == 3:
            resp = requests.post(f"{service.url}/v1/scale", json={"num_workers": workers}, timeout=300)
            assert resp.status_code == 200, resp.text
            assert resp.json()["to_workers"] == workers
        else:  # the CLI's way in
            from moeray.cli import main

            assert main(["scale", str(workers), "--url", service.url]) == 0
        got = requests.post(f"{service.url}/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0},
                            timeout=120).json()
        assert got["choices"][0]["text"] == service.greedy(prompt, 6)[1]
        assert requests.get(f"{service.url}/v1/placement", timeout=60).json()["num_workers"] == workers
