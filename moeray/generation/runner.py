"""The worker side of generation: the sequences a worker owns, their KV cache, one step of them.

Each step the worker runs every sequence it owns together in one forward: the prompts of the
sequences that joined (prefill) and one token of each running sequence (decode), concatenated
into T rows. With nothing to run it still runs the model with T = 0, so every MoE layer's
exchange stays in lockstep with the other workers.

A sequence's tokens are prompt + generated; `num_cached` of them have keys/values in the cache,
so the next step feeds `tokens[num_cached:]` (the whole prompt at first, then the last sampled
token). Stops checked here (so the KV blocks are freed at once): EOS (unless `ignore_eos`), stop
token ids, `max_tokens`, the context limit. Stop strings need text and are checked by the driver,
which aborts the sequence in its next plan.

Legend: T tokens in the step, B sequences in the step, D hidden, V vocab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from moeray.generation.blocks import BlockAllocator
from moeray.generation.messages import NewSequence, SequenceUpdate, StepPlan, StepResult
from moeray.generation.sampling import Sampler, SamplingParams
from moeray.models.kv_cache import AttentionBatch, PagedKVCache, SeqSpan


@dataclass
class RunningSequence:
    request_id: str
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    block_ids: list[int]
    generator: torch.Generator | None
    score: bool = False
    num_cached: int = 0
    stop_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class SequenceRunner:
    """Owns one worker's sequences and KV cache; `step(plan)` runs them once through `model`."""

    def __init__(self, model, cache: PagedKVCache, max_model_len: int, eos_token_ids: tuple[int, ...],
                 device: torch.device, seed: int = 0, cuda_graphs: bool = False, max_num_seqs: int = 256):
        self.model = model
        self.cache = cache
        # The cache's last block is never handed out: padding rows of captured decode steps write
        # there (moeray/generation/cuda_graphs.py), so no sequence's cache is ever touched by them.
        if cache.num_blocks < 2:
            raise ValueError(f"the KV cache needs >= 2 blocks (one is the padding sink), has {cache.num_blocks}")
        self.allocator = BlockAllocator(cache.num_blocks - 1)
        self.max_num_seqs = max_num_seqs
        self.graphs = None
        self.set_cuda_graphs(cuda_graphs)
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = device
        self.sampler = Sampler(device=device, seed=seed)
        self.sequences: dict[str, RunningSequence] = {}  # insertion order = step order

    # ---- membership of sequences -----------------------------------------------------------
    def _admit(self, new: NewSequence) -> None:
        if new.request_id in self.sequences:
            raise ValueError(f"request {new.request_id!r} is already running on this worker")
        params = new.params
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        self.sequences[new.request_id] = RunningSequence(
            new.request_id, list(new.prompt_ids), len(new.prompt_ids), params, self.allocator.allocate(new.num_blocks),
            self.sampler.generator_for(params), score=new.score, stop_ids=stop_ids)

    def _release(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.allocator.free(seq.block_ids)

    def set_cuda_graphs(self, enabled: bool) -> None:
        """Replay decode steps as CUDA graphs (one GPU worker) or not (several: an all-to-all
        needs its split sizes on the host); captured graphs are dropped either way."""
        if enabled and self.graphs is None:
            from moeray.generation.cuda_graphs import CudaGraphDecoder

            self.graphs = CudaGraphDecoder(self.model, self.cache, sink_block=self.cache.num_blocks - 1,
                                           max_batch=self.max_num_seqs)
        elif not enabled:
            self.graphs = None
        self.invalidate_graphs()

    def apply(self, plan: StepPlan) -> None:
        """Drop the plan's aborted sequences and admit its new ones (they run from the next step)."""
        for request_id in plan.abort:
            self._release(request_id)
        for new in plan.new:
            self._admit(new)

    def invalidate_graphs(self) -> None:
        """Captured steps hold the addresses of the slot maps and of the stats switch as they were:
        after a commit, a placement reload or a stats toggle they must be captured again."""
        if self.graphs is not None:
            self.graphs.invalidate()

    def reset(self) -> None:
        """Forget every sequence (after a failed step: the driver re-submits what was in flight)."""
        for request_id in list(self.sequences):
            self._release(request_id)

    # ---- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        self.apply(plan)
        seqs = list(self.sequences.values())
        if self.graphs is not None and self.graphs.applies(seqs):  # every sequence decodes one token
            prepared = time.perf_counter()
            logits_BV = self.graphs.run(seqs)
            for s in seqs:
                s.num_cached = len(s.tokens)
            updates = self._sample_rows(seqs, logits_BV)
            num_tokens = len(seqs)
        else:
            spans = [SeqSpan(tuple(s.block_ids), s.num_cached, len(s.tokens) - s.num_cached) for s in seqs]
            batch = AttentionBatch.build(spans, self.cache.block_size, self.device)
            ids_T = torch.tensor([t for s in seqs for t in s.tokens[s.num_cached:]], dtype=torch.int64,
                                 device=self.device)
            prepared = time.perf_counter()
            h_TD = self.model(ids_T, batch, self.cache)
            for s in seqs:
                s.num_cached = len(s.tokens)
            updates = self._sample(seqs, batch, h_TD)
            num_tokens = int(ids_T.numel())
        for update in updates:
            if update.finish_reason is not None:
                self._release(update.request_id)
        done = time.perf_counter()
        return StepResult(tuple(updates), len(self.sequences), self.allocator.num_used, num_tokens,
                          {"prepare": 1e3 * (prepared - start), "forward+sample": 1e3 * (done - prepared)})

    def _sample(self, seqs: list[RunningSequence], batch: AttentionBatch, h_TD: torch.Tensor) -> list[SequenceUpdate]:
        updates: list[SequenceUpdate] = []
        generating = [b for b, s in enumerate(seqs) if not s.score]
        for b, s in enumerate(seqs):
            if s.score:  # every prompt position's logits go back (host copy), then the sequence ends
                rows = slice(batch.query_start_B1[b], batch.query_start_B1[b + 1])
                logits_TV = self.model.compute_logits(h_TD[rows]).cpu().numpy()
                updates.append(SequenceUpdate(s.request_id, finish_reason="length", prompt_logits_TV=logits_TV))
        if not generating:
            return updates
        # The rows come with the batch's one host-to-device copy: a fresh copy here would block the
        # host until the whole forward has run, serialising it with the GPU once more per step.
        rows_B = batch.last_row_B
        if len(generating) < len(seqs):  # scoring requests in the step (rare): keep the others' rows
            rows_B = rows_B[torch.tensor(generating, device=rows_B.device)]
        logits_BV = self.model.compute_logits(h_TD.index_select(0, rows_B))
        return updates + self._sample_rows([seqs[b] for b in generating], logits_BV)

    def _sample_rows(self, chosen: list[RunningSequence], logits_BV: torch.Tensor) -> list[SequenceUpdate]:
        """Sample row b for sequence chosen[b], append the token, check the stops by id and length."""
        updates = []
        token_ids, logprobs = self.sampler.sample(logits_BV, [s.params for s in chosen], [s.generator for s in chosen])
        for s, token, lp in zip(chosen, token_ids, logprobs):
            s.tokens.append(token)
            finish = None
            if token in s.stop_ids:
                finish = "stop"
            elif s.num_generated >= s.params.max_tokens or len(s.tokens) >= self.max_model_len:
                finish = "length"
            updates.append(SequenceUpdate(s.request_id, (token,), () if lp is None else (lp,), finish))
        return updates
