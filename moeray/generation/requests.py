"""A request as the driver tracks it (prompt ids checked against the vocabulary, what it generated,
its text and timings) and the RequestOutput it reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeray.generation.outputs import CompletionOutput, RequestOutput
from moeray.generation.sampling import SamplingParams, TokenLogprobs
from moeray.generation.tokenizer import IncrementalDetokenizer


def check_token_ids(input_ids_T, vocab_size: int) -> np.ndarray:
    """ids_T as int64, or ValueError naming the first id outside [0, vocab_size)."""
    try:
        ids_T = np.asarray(input_ids_T, dtype=np.int64).reshape(-1)
    except (OverflowError, TypeError, ValueError):  # e.g. 10**20 does not fit int64; "a" is no id
        values = np.asarray(input_ids_T, dtype=object).reshape(-1)
        bad = next((v for v in values if not isinstance(v, (int, np.integer)) or not 0 <= v < vocab_size), values)
        raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab_size})") from None
    if ids_T.size and (ids_T.min() < 0 or ids_T.max() >= vocab_size):
        bad = ids_T[(ids_T < 0) | (ids_T >= vocab_size)][0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size})")
    return ids_T


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    arrival_s: float
    score: bool = False
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    prompt_logits_TV: np.ndarray | None = None
    resubmissions: int = 0

    def output(self, placement_version: int) -> RequestOutput:
        cumulative = sum(lp.logprob for lp in self.logprobs) if self.params.logprobs is not None else None
        completion = CompletionOutput(
            index=0, text=self.text, token_ids=tuple(self.output_ids), cumulative_logprob=cumulative,
            logprobs=tuple(self.logprobs) if self.params.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, (completion,), self.finish_reason is not None,
                             metrics={"arrival_s": self.arrival_s, "first_token_s": self.first_token_s,
                                      "finished_s": self.finished_s, "placement_version": placement_version},
                             prompt_logits_TV=self.prompt_logits_TV)
