"""What a finished (or streaming) request looks like to users: vLLM's shapes, so code ports over.

    outs = llm.generate(prompts, SamplingParams(...))
    outs[0].outputs[0].token_ids, outs[0].outputs[0].text, outs[0].outputs[0].finish_reason
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeray.generation.sampling import TokenLogprobs


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float | None
    logprobs: tuple[TokenLogprobs, ...] | None
    finish_reason: str | None  # "stop" | "length" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    metrics: dict = field(default_factory=dict)  # perf_counter seconds (arrival, first token, finished), placement version
    prompt_logits_TV: np.ndarray | None = None  # scoring requests only
