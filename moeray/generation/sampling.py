"""Sampling: the request's knobs (`SamplingParams`) and the worker-side `Sampler` that turns a
step's last-position logits into token ids.

The filter, for a non-greedy row: subtract the row max and divide by the temperature, keep the
`top_k` largest, renormalise, keep the smallest set of most likely tokens whose probability sums
to >= `top_p` (always at least the most likely one), renormalise again, draw. Ties in rank go to
the lower token id everywhere (greedy argmax, top-k, top-p), so the filter is a function of the
logits alone. `sample_reference` / `reference_probs` do the same in float64, one row at a time
with numpy; tests hold the fast path to them.

Legend: B sequences in the step, V vocab, X some of the B rows (sampled ones, or ones that asked for logprobs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_LOGPROBS = 20


class SamplingParams(BaseModel):
    """Per-request sampling settings, vLLM's names and defaults. Strict: `max_tokens="5"`,
    `max_tokens=5.5` and `max_tokens=True` are errors; ints are accepted where a float is meant."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = -1  # -1 or 0: off
    seed: int | None = Field(None, ge=0, lt=2**64)  # torch.Generator.manual_seed's range
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top alternatives besides the sampled token

    @field_validator("top_k")
    @classmethod
    def _top_k_off_or_positive(cls, top_k: int) -> int:
        if top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {top_k}")
        return top_k

    @field_validator("stop", mode="before")
    @classmethod
    def _single_stop_string_is_a_list(cls, stop: object) -> object:
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _no_empty_stop_string(cls, stop: list[str]) -> list[str]:
        # an empty stop string would match at once and end every generation with no text
        if any(s == "" for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids_non_negative(cls, ids: list[int]) -> list[int]:
        bad = [i for i in ids if i < 0]
        if bad:
            raise ValueError(f"stop_token_ids must be >= 0, got {bad} in {ids}")
        return ids

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's logprob and the `logprobs` most likely alternatives (most likely first),
    from log_softmax of the raw logits (before temperature, top-k and top-p)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def _top_k_of(params: SamplingParams, vocab_size: int) -> int:
    """The number of tokens top-k keeps: all of them when off or larger than V."""
    return vocab_size if params.top_k <= 0 else min(params.top_k, vocab_size)


class Sampler:
    """Samples one token per row of a step's logits, on the model's device.

    Rows whose request has a seed draw from that request's own generator (`generator_for`), so a
    seed gives the same tokens whatever else shares the batch; the other rows share a generator
    the Sampler owns, seeded once from `seed`.
    """

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def generator_for(self, params: SamplingParams) -> torch.Generator | None:
        """A fresh generator for a request with a seed (keep it for the request's life); None without one."""
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed)

    def filter_probs(self, logits_XV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """probs_XV in vocab order for non-greedy rows, batched: temperature, then top-k and top-p
        (only rows that use either are sorted). Filtered-out tokens have probability exactly 0."""
        vocab_size = logits_XV.shape[1]
        device = logits_XV.device
        temperature_X1 = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)[:, None]
        # Subtracting the row max before dividing keeps a tiny temperature from overflowing to inf
        # (inf - inf would be NaN): every scaled value is <= 0 and the max is exactly 0.
        logits_XV = logits_XV.float()
        scaled_XV = (logits_XV - logits_XV.amax(dim=1, keepdim=True)) / temperature_X1
        probs_XV = torch.softmax(scaled_XV, dim=1)
        truncating = [x for x, p in enumerate(params) if _top_k_of(p, vocab_size) < vocab_size or p.top_p < 1.0]
        if not truncating:
            return probs_XV
        trunc_rows_X = torch.tensor(truncating, device=device)
        kept = [params[x] for x in truncating]  # rows that sort: top-k and/or top-p is on
        trunc_top_k_X1 = torch.tensor([_top_k_of(p, vocab_size) for p in kept], device=device)[:, None]
        trunc_top_p_X1 = torch.tensor([p.top_p for p in kept], dtype=torch.float32, device=device)[:, None]
        # stable descending sort: equal logits keep ascending id order, like the greedy argmax
        trunc_sorted_XV, trunc_order_XV = torch.sort(scaled_XV[trunc_rows_X], dim=1, descending=True, stable=True)
        rank_1V = torch.arange(vocab_size, device=device)[None, :]
        trunc_probs_XV = torch.softmax(trunc_sorted_XV.masked_fill(rank_1V >= trunc_top_k_X1, float("-inf")), dim=1)
        # keep rank r while the probability of the ranks before it is < top_p: the smallest
        # prefix reaching top_p; rank 0 always stays (0 < top_p)
        trunc_before_XV = torch.cumsum(trunc_probs_XV, dim=1) - trunc_probs_XV
        trunc_probs_XV = trunc_probs_XV.masked_fill(trunc_before_XV >= trunc_top_p_X1, 0.0)
        trunc_probs_XV = trunc_probs_XV / trunc_probs_XV.sum(dim=1, keepdim=True)
        probs_XV[trunc_rows_X] = torch.zeros_like(trunc_probs_XV).scatter_(1, trunc_order_XV, trunc_probs_XV)
        return probs_XV

    def filtered_probs(self, logits_BV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """probs_BV in vocab order: what `sample` draws from (greedy rows: one-hot at the argmax)."""
        probs_BV = torch.zeros_like(logits_BV, dtype=torch.float32)
        greedy_rows = [b for b, p in enumerate(params) if p.greedy]
        sampled_rows = [b for b, p in enumerate(params) if not p.greedy]
        if greedy_rows:
            greedy_rows_X = torch.tensor(greedy_rows, device=logits_BV.device)
            probs_BV[greedy_rows_X, logits_BV[greedy_rows_X].argmax(dim=1)] = 1.0
        if sampled_rows:
            rows_X = torch.tensor(sampled_rows, device=logits_BV.device)
            probs_BV[rows_X] = self.filter_probs(logits_BV[rows_X], [params[b] for b in sampled_rows])
        return probs_BV

    def sample(self, logits_BV: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """One token per row of logits_BV (float32, on this Sampler's device). Returns the ids and,
        per row, its TokenLogprobs (None for rows whose params.logprobs is None)."""
        num_rows = logits_BV.shape[0]
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(f"logits have {num_rows} rows but got {len(params)} params "
                             f"and {len(generators)} generators")
        if num_rows == 0:
            return [], []
        device = logits_BV.device
        # one batched argmax for every row (ties -> lowest id); sampled rows overwrite theirs below
        ids_B = logits_BV.argmax(dim=1)
        sampled_rows = [b for b, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows_X = torch.tensor(sampled_rows, device=device)
            # draws are over vocab-order probabilities, so a seeded row's token depends only on its
            # own logits, params and generator (never on how the batch was filtered or sorted)
            probs_XV = self.filter_probs(logits_BV[rows_X], [params[b] for b in sampled_rows])
            drawn_X = torch.empty(len(sampled_rows), dtype=torch.int64, device=device)
            # rows without a generator of their own: one draw from the shared generator, in row order
            shared_x = [x for x, b in enumerate(sampled_rows) if generators[b] is None]
            if shared_x:
                shared_X = torch.tensor(shared_x, device=device)
                drawn_X[shared_X] = torch.multinomial(probs_XV[shared_X], 1, generator=self.generator)[:, 0]
            for x, b in enumerate(sampled_rows):
                if generators[b] is not None:  # a seeded request: its own stream, batch-independent
                    drawn_X[x] = torch.multinomial(probs_XV[x], 1, generator=generators[b])[0]
            ids_B[rows_X] = drawn_X
        # the one device-to-host copy of the ids in this call
        token_ids = ids_B.tolist()
        return token_ids, self._logprobs(logits_BV, ids_B, token_ids, params)

    def _logprobs(self, logits_BV: torch.Tensor, ids_B: torch.Tensor, token_ids: list[int],
                  params: Sequence[SamplingParams]) -> list[TokenLogprobs | None]:
        asked = [b for b, p in enumerate(params) if p.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(params)
        if not asked:
            return out
        asked_rows_X = torch.tensor(asked, device=logits_BV.device)
        logprobs_XV = torch.log_softmax(logits_BV[asked_rows_X].float(), dim=1)
        chosen_X1 = logprobs_XV.gather(1, ids_B[asked_rows_X][:, None])
        top_n = min(max(params[b].logprobs for b in asked), logprobs_XV.shape[1])
        top_lp, top_ids = torch.sort(logprobs_XV, dim=1, descending=True, stable=True)
        top_lp, top_ids = top_lp[:, :top_n], top_ids[:, :top_n]  # [X, top_n]
        # pack into one float64 tensor so the logprobs cost one device-to-host copy; ids < 2**53 are exact
        packed = torch.cat([chosen_X1.double(), top_lp.double(), top_ids.double()], dim=1).tolist()
        for q, b in enumerate(asked):
            row = packed[q]
            n = min(params[b].logprobs, top_n)
            top = tuple((int(row[1 + top_n + i]), row[1 + i]) for i in range(n))
            out[b] = TokenLogprobs(token_ids[b], row[0], top)
        return out


# ---- the slow reference ---------------------------------------------------------------------

def reference_probs(logits_V: Sequence[float] | np.ndarray, params: SamplingParams) -> np.ndarray:
    """The filtered distribution of one row in vocab order, float64, by plain sorting."""
    logits = np.asarray(logits_V, dtype=np.float64)
    vocab_size = len(logits)
    probs = np.zeros(vocab_size)
    # python's sort is stable: key (-logit, id) spells out "most likely first, ties to the lower id"
    ranked = sorted(range(vocab_size), key=lambda i: (-logits[i], i))
    if params.greedy:
        probs[ranked[0]] = 1.0
        return probs
    kept = ranked[:_top_k_of(params, vocab_size)]
    top = logits[kept[0]]
    weights = [math.exp((logits[i] - top) / params.temperature) for i in kept]
    total = sum(weights)
    nucleus, mass = [], 0.0
    for i, w in zip(kept, weights):
        nucleus.append((i, w))
        mass += w / total
        if mass >= params.top_p:
            break
    nucleus_total = sum(w for _, w in nucleus)
    for i, w in nucleus:
        probs[i] = w / nucleus_total
    return probs


def sample_reference(logits_BV: torch.Tensor, params: Sequence[SamplingParams],
                     generators: Sequence[torch.Generator | None]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Row by row in float64: `reference_probs`, then an inverse-CDF draw with one uniform from
    the row's generator (a default CPU generator when None). Same contract as `Sampler.sample`."""
    logits = logits_BV.detach().double().cpu().numpy()
    ids: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    for row, p, gen in zip(logits, params, generators, strict=True):
        probs = reference_probs(row, p)
        if p.greedy:
            token = int(np.argmax(probs))
        else:
            u = float(torch.rand((), dtype=torch.float64, generator=gen))
            cdf = np.cumsum(probs)
            # the first id whose cdf exceeds u: the cdf rises there, so its probability is > 0;
            # the clamp only catches u * total rounding to the very top
            token = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), int(np.flatnonzero(probs)[-1]))
        ids.append(token)
        if p.logprobs is None:
            logprobs.append(None)
            continue
        top = float(row.max())
        log_total = top + math.log(sum(math.exp(float(v) - top) for v in row))
        lp = [float(v) - log_total for v in row]
        ranked = sorted(range(len(row)), key=lambda i: (-lp[i], i))[:p.logprobs]
        logprobs.append(TokenLogprobs(token, lp[token], tuple((i, lp[i]) for i in ranked)))
    return ids, logprobs
