"""The README's tour as a script: the built-in tiny model (Qwen3-MoE family, random weights, HF
format, with a tokenizer) on 4 local CPU workers (Gloo).

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile

from moeray import LLM, SamplingParams
from moeray.models.tiny import write_tiny_model


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="moeray-quickstart-") as model_dir:
        write_tiny_model(model_dir, family="qwen3_moe", num_experts=8, top_k=2)  # or point at a real HF checkpoint
        with LLM(model=model_dir, num_workers=4, redundant_slots_per_worker=1) as llm:
            outs = llm.generate(["some text", [1, 2, 3]], SamplingParams(max_tokens=16, temperature=0.0))
            for out in outs:
                completion = out.outputs[0]
                print(f"{out.prompt_token_ids} -> {completion.token_ids} {completion.text!r} ({completion.finish_reason})")
            print("routed pairs per expert, layer 0:", llm.engine.load()[0])
            print("imbalance per layer (max/mean worker load):", llm.engine.imbalance().round(3))
            staged = llm.rebalance(force=True)  # plan + stage v+1 while serving...
            llm.generate("more text", SamplingParams(max_tokens=4))  # ...committed at the next step boundary
            print(f"placement v{llm.placement().version} (staged v{staged}), "
                  f"{len(llm.stats()['rebalances'])} rebalance(s)")


if __name__ == "__main__":
    main()
