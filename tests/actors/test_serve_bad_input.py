"""Bad input to the HTTP service: every malformed, mistyped or out-of-range body is a 4xx in
OpenAI's error shape naming the field, and the next good request still succeeds; unknown routes
answer in the same shape; a client that goes away (streaming or not) aborts its request and frees
its KV cache. Talks to the session's `service` app (tests/actors/conftest.py)."""

from __future__ import annotations

import http.client
import json

import pytest

serve = pytest.importorskip("ray.serve", reason="needs ray[serve] (pip install -e '.[serve]')")
requests = pytest.importorskip("requests")

from tests.actors.serving_app import CONTEXT, wait_for  # noqa: E402


BAD_BODIES = [
    # (raw body or JSON, status, param, words in the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b"", 400, None, "empty"),
    (b"[1, 2, 3]", 400, None, "JSON object, got a JSON array"),
    ({}, 400, "prompt", "field required"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus", "unknown field"),
    ({"prompt": 5}, 400, "prompt", "got 5"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "context holds 1024 tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature", "greater than or equal to 0"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite number"),
    (b'{"prompt": "x", "top_p": Infinity}', 400, "top_p", "finite number"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"prompt": [1, 600, 2]}, 400, "prompt", "token id 600 is outside the vocabulary [0, 512)"),
    ({"prompt": [-3]}, 400, "prompt", "token id -3"),
    ({"prompt": [1, 10**20]}, 400, "prompt", "token id 100000000000000000000"),
    ({"prompt": [1, 2.0]}, 400, "prompt", "prompt[1] = 2.0 is not a token id"),
    ({"prompt": [1, "7"]}, 400, "prompt", "prompt[1] = '7' is not a token id"),
    ({"prompt": [1, True]}, 400, "prompt", "prompt[1] = True is not a token id"),
    ({"prompt": [[1, 2], [3, 2.0]]}, 400, "prompt", "prompt[1][1] = 2.0"),
    ({"prompt": list(range(1, CONTEXT + 1))}, 400, "prompt", "1024 tokens"),
    ({"prompt": "x", "n": 2}, 400, "n", "only n=1"),
    ({"prompt": "x", "echo": True}, 400, "echo", "echo=true is not supported"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "only with stream=true"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "'gpt-4' does not exist"),
]


@pytest.mark.parametrize("body,status,param,words", BAD_BODIES,
                         ids=[f"{i}-{param or 'body'}" for i, (_, _, param, _) in enumerate(BAD_BODIES)])
def test_bad_input_is_a_4xx_naming_the_field_and_the_service_keeps_serving(service, body, status, param, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = requests.post(f"{service.url}/v1/completions", data=raw, headers={"content-type": "application/json"},
                         timeout=60)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error["message"]
    ok = service.complete(max_tokens=2, temperature=0)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == service.greedy([5, 6, 7], 2)[1]


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_chat_input_is_a_400_naming_the_field(service, body, param):
    resp = requests.post(f"{service.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_unknown_routes_and_methods_answer_in_the_openai_error_shape(service):
    for resp, status in ((requests.get(f"{service.url}/v1/nothing", timeout=60), 404),
                         (requests.get(f"{service.url}/v1/completions", timeout=60), 405)):
        assert resp.status_code == status and set(resp.json()["error"]) == {"message", "type", "param", "code"}


# ---- clients that go away -----------------------------------------------------------------------

def _open_completion(service, body: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    return conn


@pytest.mark.parametrize("streaming,read_first", [(True, True), (True, False), (False, False)],
                         ids=["streaming", "streaming-unread", "plain"])
def test_a_client_that_disconnects_aborts_its_request_and_frees_its_kv(service, streaming, read_first):
    """Also a streaming client that leaves without reading a byte (its response may not have
    started: the SSE generator is primed in the handler, so its close still aborts)."""
    running = lambda: service.metric("moeray:num_requests_running")
    before = service.metrics()
    max_tokens = CONTEXT - 8  # minutes of decoding if nobody stopped it
    conn = _open_completion(service, {"prompt": [5, 6, 7], "max_tokens": max_tokens, "ignore_eos": True,
                                      "stream": streaming})
    if read_first:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: {")  # it is generating
    else:
        wait_for(lambda: running() == 1, "the request to run")
    conn.sock.shutdown(2)  # the client goes away mid-request
    conn.close()
    wait_for(lambda: running() == 0, "the aborted request to leave the scheduler", timeout=30)
    after = service.metrics()
    generated = after[("moeray:generation_tokens_total", ())] - before[("moeray:generation_tokens_total", ())]
    assert generated < max_tokens, "the request ran to completion: it was not aborted"
    aborts = [("moeray:request_success_total", (("finished_reason", "abort"),))]
    assert after[aborts[0]] - before.get(aborts[0], 0) == 1
    assert all(v == 0 for (name, _), v in after.items() if name == "moeray:kv_cache_usage_perc"), "KV not freed"
    assert service.complete().status_code == 200
