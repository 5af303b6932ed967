"""What crosses between the driver's scheduler and the workers each step (one object per concept).

Only token ids, requested logprobs and (for scoring requests only) prompt logits leave a worker;
generation never ships `[T, V]` logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeray.generation.sampling import SamplingParams, TokenLogprobs


@dataclass(frozen=True)
class NewSequence:
    """A request the driver admitted to a worker: the worker caches it from this step on.

    `num_blocks` KV blocks are reserved for it (prompt + every token it may generate), so the
    worker can never run out of cache while it runs. `score=True`: return the logits of every
    prompt position and end the sequence (no generation; prompt scoring and equality checks).
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    num_blocks: int
    score: bool = False


@dataclass(frozen=True)
class StepPlan:
    """One worker's share of a step: sequences that join, sequences dropped before it runs."""

    new: tuple[NewSequence, ...] = ()
    abort: tuple[str, ...] = ()


@dataclass(frozen=True)
class SequenceUpdate:
    """What one sequence produced in a step."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: str | None = None  # "stop" (EOS or a stop token id), "length", or None (running)
    prompt_logits_TV: np.ndarray | None = None  # score requests only


@dataclass(frozen=True)
class StepResult:
    """One worker's answer to a StepPlan."""

    updates: tuple[SequenceUpdate, ...]
    num_running: int
    blocks_used: int
    num_tokens: int  # rows this worker ran through the model in the step
    timings_ms: dict = field(default_factory=dict)
