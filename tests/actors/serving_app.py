"""What the HTTP service tests share: the tiny model's constants, polling, and `Service`, the
client side of the one app (`service` fixture, tests/actors/conftest.py) the serve tests talk to."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import requests
from prometheus_client.parser import text_string_to_metric_families

from moeray.generation.reference import greedy_generate
from moeray.generation.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512
CONTEXT = 1024  # the tiny model's max_position_embeddings
PROMPT = "The river begins as a thin stream"
CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token if loop.first else '' }}<|{{ m.role }}|>\n{{ m.content }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 60.0, interval: float = 0.05):
    """Poll `condition()` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Service:
    def __init__(self, port: int, ckpt: str, cfg, reference, model_name: str):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ckpt, self.cfg, self.reference, self.model_name = ckpt, cfg, reference, model_name
        self.tokenizer = Tokenizer.from_dir(ckpt)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str, str]:
        """The reference's (token ids, text, finish_reason), as the service reports them: an EOS
        ends the output and is not part of its text."""
        ids = greedy_generate(self.reference, prompt_ids, max_tokens, self.cfg.eos_token_ids)
        if ids and ids[-1] in self.cfg.eos_token_ids:
            return ids, self.tokenizer.decode(ids[:-1]), "stop"
        return ids, self.tokenizer.decode(ids), "length"

    def complete(self, max_tokens: int = 1, **body) -> requests.Response:
        return requests.post(f"{self.url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": max_tokens,
                                                                 **body}, timeout=120)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels without model_name): value} of one /metrics scrape."""
        resp = requests.get(f"{self.url}/metrics", timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = {}
        for family in text_string_to_metric_families(resp.text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                samples[(s.name, labels)] = s.value
        return samples

    def metric(self, name: str, **labels) -> float:
        return self.metrics()[(name, tuple(sorted(labels.items())))]
