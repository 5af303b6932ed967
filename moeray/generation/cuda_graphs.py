"""Captured decode steps on one GPU: the whole model forward + LM head of a step in which every
sequence adds one token, replayed as one CUDA graph.

Why: an eager decode step launches a few hundred small kernels; on an H200 a 4-layer
Mixtral-shaped step spent ~10 ms of host time launching work the GPU finishes in ~3 ms
(docs/benchmarks/generate.md). A graph replay launches it all at once.

Shapes are static per graph: the batch is padded to a bucket of B_pad sequences and the block
tables to P_pad blocks (a power of two). Padding rows read and write only the cache's sink block
(the runner keeps the cache's last block out of the allocator for this), carry weight 0 in the
experts' load counters, and their logits are dropped. Graphs are captured on first use of a
(B_pad, P_pad) and share one memory pool (never replayed concurrently).

Applies only where the step has no host sync: one worker (the local dispatcher; an all-to-all
needs the split sizes on the host) and no overlapped chunks.

Legend: B sequences, T = B tokens (one each), P blocks per sequence, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeray.models.kv_cache import AttentionBatch, PagedKVCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def bucket(value: int, buckets) -> int | None:
    return next((b for b in buckets if b >= value), None)


def block_bucket(blocks: int) -> int:
    return 1 << max(0, int(blocks - 1).bit_length())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None on a CPU: the padded step runs eagerly
    host_BX: torch.Tensor  # pinned int64 staging of every per-step input, packed
    device_BX: torch.Tensor  # its device twin; the batch's tensors are views of it
    logits_BV: torch.Tensor  # the captured output
    num_seqs: int
    num_blocks: int
    batch: AttentionBatch
    ids_T: torch.Tensor
    weight_T: torch.Tensor


class CudaGraphDecoder:
    def __init__(self, model, cache: PagedKVCache, sink_block: int, max_batch: int):
        self.model = model
        self.cache = cache
        self.sink_block = sink_block
        self.buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (bucket(max_batch, BATCH_BUCKETS) or max_batch,)
        self.device = cache.k[0].device
        self.graphs: dict[tuple[int, int], _Graph] = {}
        # On a CPU the same padded static-shape step runs eagerly (no graph): the padding logic is
        # tested without a GPU (tests/unit/test_cuda_graphs_padding.py).
        self.capture = self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0

    def invalidate(self) -> None:
        """Drop every captured graph (their addresses are stale) and start a fresh memory pool:
        capturing into the pool of graphs that were all freed trips the caching allocator
        ("use_count > 0" internal assert, seen with torch 2.11 on an H200)."""
        self.graphs.clear()
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()

    def applies(self, seqs) -> bool:
        return bool(seqs) and len(seqs) <= self.buckets[-1] and all(
            len(s.tokens) - s.num_cached == 1 and not s.score for s in seqs)

    @torch.no_grad()
    def run(self, seqs) -> torch.Tensor:
        """float32 [B, V] logits of each sequence's next token (the step's K/V written to the cache)."""
        num_seqs = len(seqs)
        padded = bucket(num_seqs, self.buckets)
        blocks = block_bucket(max(len(s.block_ids) for s in seqs))
        key = (padded, blocks)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(padded, blocks)
        self._fill(g, seqs)
        # A blocking copy: the stream is idle here (the last step's sampling synced), so it costs no
        # wait, and the pinned buffer can never be rewritten while a copy out of it is pending.
        g.device_BX.copy_(g.host_BX)
        if g.graph is None:
            g.logits_BV = self._forward(g.batch, g.ids_T, g.weight_T)
        else:
            g.graph.replay()
        self.replays += 1
        return g.logits_BV[:num_seqs]

    # ---- inputs -------------------------------------------------------------------------------
    # Packed layout (int64): ids [B], positions [B], cache index [B], context lens [B],
    # row weights [B] (1 real, 0 padding), block table [B * P].

    def _fill(self, g: _Graph, seqs) -> None:
        """Write this step's inputs into the pinned staging buffer; padding rows point at the sink.
        The previous step's copy out of this buffer is complete (it was a blocking copy)."""
        B, P, Z = g.num_seqs, g.num_blocks, self.cache.block_size
        host = g.host_BX.numpy()
        n = len(seqs)
        ids, pos, index, ctx, weight = (host[i * B:(i + 1) * B] for i in range(5))
        table = host[5 * B:].reshape(B, P)
        ids[n:], pos[n:], index[n:], ctx[n:], weight[n:] = 0, 0, self.sink_block * Z, 1, 0
        table[:] = self.sink_block
        for b, s in enumerate(seqs):
            position = len(s.tokens) - 1
            ids[b], pos[b], ctx[b], weight[b] = s.tokens[-1], position, position + 1, 1
            index[b] = s.block_ids[position // Z] * Z + position % Z
            table[b, :len(s.block_ids)] = s.block_ids

    def _views(self, device_BX: torch.Tensor, B: int, P: int):
        parts = [device_BX[i * B:(i + 1) * B] for i in range(5)]
        return (*parts, device_BX[5 * B:].view(B, P))

    def _forward(self, batch: AttentionBatch, ids_T: torch.Tensor, weight_T: torch.Tensor) -> torch.Tensor:
        experts = [block.experts for block in self.model.moe_blocks]
        for e in experts:
            e.row_weight_T = weight_T
        try:
            batch._derived.clear()  # the causal mask is recomputed from the static inputs every time
            return self.model.compute_logits(self.model(ids_T, batch, self.cache))
        finally:
            for e in experts:
                e.row_weight_T = None

    def _capture(self, B: int, P: int) -> _Graph:
        host = torch.zeros(5 * B + B * P, dtype=torch.int64)
        if self.capture:
            host = host.pin_memory()
        device_BX = torch.zeros_like(host, device=self.device)
        ids, pos, index, ctx, weight, table = self._views(device_BX, B, P)
        arange_B = torch.arange(B, device=self.device)
        batch = AttentionBatch(
            starts=(0,) * B, num_new=(1,) * B, block_size=self.cache.block_size, positions_T=pos,
            cache_index_T=index, block_table_BP=table, context_lens_B=ctx, query_start_B1=tuple(range(B + 1)),
            rows_BN=arange_B.view(B, 1), cell_of_T=arange_B, query_pos_BN=pos.view(B, 1), last_row_B=arange_B)
        if not self.capture:
            return _Graph(None, host, device_BX, None, B, P, batch, ids, weight)
        # All padding while warming up and capturing: only the sink block is written.
        host.zero_()
        host_view = host.numpy()
        host_view[2 * B:3 * B] = self.sink_block * self.cache.block_size
        host_view[3 * B:4 * B] = 1
        host_view[5 * B:] = self.sink_block
        device_BX.copy_(host)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: kernels compiled / autotuned outside the capture
            for _ in range(2):
                self._forward(batch, ids, weight)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits_BV = self._forward(batch, ids, weight)
        return _Graph(graph, host, device_BX, logits_BV, B, P, batch, ids, weight)
