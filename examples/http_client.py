"""Talk to a running `moeray serve` (see examples/service.yaml) with the official `openai` client
(`pip install openai`): a completion, the same streamed, concurrent requests, a bad request
(answered 400 naming the field), then the placement the experts run with.

    python examples/http_client.py --url http://127.0.0.1:8000 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("MOERAY_API_KEY", "unused"))
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0)

    model = client.models.list().data[0].id
    one = client.completions.create(model=model, prompt="The river", max_tokens=16, temperature=0)
    print(f"completion ({one.choices[0].finish_reason}, {one.usage.completion_tokens} tokens): {one.choices[0].text!r}")

    print("streamed: ", end="")
    for chunk in client.completions.create(model=model, prompt="The river", max_tokens=16, temperature=0, stream=True):
        print(chunk.choices[0].text, end="", flush=True)
    print()

    def call(i: int) -> bool:
        prompt = [(i * 7 + j) % 256 + 3 for j in range(1 + i % 16)]  # token ids
        return client.completions.create(model=model, prompt=prompt, max_tokens=8).choices[0].finish_reason is not None

    with ThreadPoolExecutor(args.concurrency) as pool:
        answered = sum(pool.map(call, range(2 * args.concurrency)))
    print(f"{answered} concurrent requests answered")

    try:
        client.completions.create(model=model, prompt=[1, 10**6], max_tokens=4)
    except openai.BadRequestError as exc:
        print(f"invalid: {exc.status_code} param={exc.body['param']!r}: {exc.body['message']}")

    request = urllib.request.Request(f"{args.url}/v1/placement", headers={"Authorization": f"Bearer {args.api_key}"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        report = json.load(resp)
    print(f"placement v{report['placement_version']} on {report['num_workers']} workers, imbalance per layer:",
          [round(layer["imbalance"], 2) for layer in report["layers"]])
    return {"model": model, "text": one.choices[0].text, "answered": answered, "report": report}


if __name__ == "__main__":
    main()
