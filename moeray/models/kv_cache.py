"""The paged KV cache of one worker and the attention metadata of one step.

A worker owns the sequences assigned to it and their cache. The cache is a pool of fixed-size
blocks per layer; a sequence holds a list of block ids (its block table), handed out by the
generation side (`moeray.generation.blocks.BlockAllocator`), which reserves every block a request
can need at admission, so a step never runs out of cache.

One step runs B sequences; each contributes `num_new` tokens at positions
`[start, start + num_new)` (prefill: the prompt, decode: 1). Their tokens are concatenated in
sequence order into the step's T rows. A worker with nothing to do runs B = T = 0 (it still joins
every MoE layer's exchange).

Legend: T tokens in the step, B sequences in the step, P blocks per sequence (padded),
Z tokens per block, J key/value heads, Y key head dim, U value head dim, L decoder layers,
N query cells per sequence in the padded grid, C = P * Z cache positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's part of a step: its blocks, tokens already cached, tokens added now."""

    block_ids: tuple[int, ...]
    start: int
    num_new: int

    @property
    def context_len(self) -> int:
        return self.start + self.num_new


@dataclass(frozen=True)
class AttentionBatch:
    """Per-step metadata shared by every attention layer (built once per step).

    Host lists (`starts`, `num_new`, `context_lens`) drive loops and shapes; device tensors drive
    gathers. `cache_index_T[t]` = block * Z + offset: where token t's key/value is written. For the
    batched attention path the step's queries are laid out as a padded [B, N] grid (N = the most
    new tokens of any sequence): `rows_BN` are the rows of T each cell reads (padding repeats the
    sequence's last row), `cell_of_T` is the flat cell (b * N + n) of each real token (an index, not
    a boolean mask: masking would need a device-to-host sync to size its result), `query_pos_BN`
    the cells' positions.

    All of the batch's device tensors arrive in ONE host-to-device copy (packed, then split): a copy
    from pageable host memory blocks the host until the stream reaches it, so one per layer would
    serialise the host with the GPU every layer.
    """

    starts: tuple[int, ...]
    num_new: tuple[int, ...]
    block_size: int
    positions_T: torch.Tensor  # int64 [T]
    cache_index_T: torch.Tensor  # int64 [T]
    block_table_BP: torch.Tensor  # int64 [B, P], padded with block 0 (masked by context_lens_B)
    context_lens_B: torch.Tensor  # int64 [B]
    query_start_B1: tuple[int, ...]  # offsets of each sequence's rows in T, len B + 1
    rows_BN: torch.Tensor  # int64 [B, N]
    cell_of_T: torch.Tensor  # int64 [T]
    query_pos_BN: torch.Tensor  # int64 [B, N]
    last_row_B: torch.Tensor  # int64 [B]: the row of each sequence's last new token (its next token's logits)
    _derived: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.starts)

    @property
    def num_tokens(self) -> int:
        return self.query_start_B1[-1]

    @property
    def context_lens(self) -> tuple[int, ...]:
        return tuple(s + n for s, n in zip(self.starts, self.num_new))

    def visible_BNC(self) -> torch.Tensor:
        """bool [B, N, C] (C = P * Z): key position c is visible to query cell (b, n) when it is
        causal and inside b's context. Built on the device once per step, shared by the layers."""
        mask = self._derived.get("visible_BNC")
        if mask is None:
            key_pos_C = torch.arange(self.block_table_BP.shape[1] * self.block_size, device=self.rows_BN.device)
            mask = (key_pos_C[None, None, :] <= self.query_pos_BN[:, :, None]) & (
                key_pos_C[None, None, :] < self.context_lens_B[:, None, None])
            self._derived["visible_BNC"] = mask
        return mask

    @classmethod
    def build(cls, spans: Sequence[SeqSpan], block_size: int, device: torch.device | str = "cpu") -> AttentionBatch:
        starts = tuple(s.start for s in spans)
        num_new = tuple(s.num_new for s in spans)
        for i, s in enumerate(spans):
            if s.num_new < 1:
                raise ValueError(f"sequence {i} of the step adds num_new={s.num_new} tokens; each must add >= 1")
            if s.context_len > len(s.block_ids) * block_size:
                raise ValueError(f"sequence {i}: {s.context_len} tokens do not fit its {len(s.block_ids)} blocks "
                                 f"of {block_size}")
        num_seqs = len(spans)
        query_start = [0]
        positions, cache_index = [], []
        for s in spans:
            query_start.append(query_start[-1] + s.num_new)
            for pos in range(s.start, s.context_len):
                positions.append(pos)
                cache_index.append(s.block_ids[pos // block_size] * block_size + pos % block_size)
        width = max((len(s.block_ids) for s in spans), default=0)
        table = [list(s.block_ids) + [0] * (width - len(s.block_ids)) for s in spans]
        grid = max(num_new, default=0)
        rows, cells, query_pos = [], [], []
        for b, s in enumerate(spans):
            for n in range(grid):
                rows.append(query_start[b] + min(n, s.num_new - 1))
                query_pos.append(s.start + n)
            cells.extend(range(b * grid, b * grid + s.num_new))
        parts = [positions, cache_index, [x for row in table for x in row], [s.context_len for s in spans],
                 rows, cells, query_pos, [end - 1 for end in query_start[1:]]]
        packed = torch.tensor([x for part in parts for x in part], dtype=torch.int64).to(device)  # the one copy
        views, offset = [], 0
        for part in parts:
            views.append(packed[offset:offset + len(part)])
            offset += len(part)
        positions_T, cache_index_T, table_flat, context_B, rows_flat, cell_of_T, query_pos_flat, last_row_B = views
        return cls(
            starts=starts, num_new=num_new, block_size=block_size,
            positions_T=positions_T, cache_index_T=cache_index_T,
            block_table_BP=table_flat.view(num_seqs, width), context_lens_B=context_B,
            query_start_B1=tuple(query_start),
            rows_BN=rows_flat.view(num_seqs, grid), cell_of_T=cell_of_T,
            query_pos_BN=query_pos_flat.view(num_seqs, grid), last_row_B=last_row_B,
        )


class PagedKVCache:
    """Per layer: keys `[num_blocks, Z, J, Y]` and values `[num_blocks, Z, J, U]`.

    Attention layers call `write` with the step's new keys/values, then read what they need
    (`gather_sequence` for one sequence, `gather_batch` for a padded batch).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, k_head_dim: int,
                 v_head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape_k = (num_blocks, block_size, num_kv_heads, k_head_dim)
        shape_v = (num_blocks, block_size, num_kv_heads, v_head_dim)
        self.k = [torch.zeros(shape_k, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape_v, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, k_head_dim: int, v_head_dim: int, itemsize: int) -> int:
        return num_layers * num_kv_heads * (k_head_dim + v_head_dim) * itemsize

    def write(self, layer: int, k_TJY: torch.Tensor, v_TJU: torch.Tensor, batch: AttentionBatch) -> None:
        if k_TJY.shape[0] == 0:
            return
        k_flat = self.k[layer].view(-1, *self.k[layer].shape[2:])
        v_flat = self.v[layer].view(-1, *self.v[layer].shape[2:])
        k_flat.index_copy_(0, batch.cache_index_T, k_TJY.to(k_flat.dtype))
        v_flat.index_copy_(0, batch.cache_index_T, v_TJU.to(v_flat.dtype))

    def gather_sequence(self, layer: int, batch: AttentionBatch, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_CJY, v_CJU) of sequence `seq`: its whole context, C = context length."""
        context = batch.context_lens[seq]
        blocks = batch.block_table_BP[seq, : -(-context // self.block_size)]
        k = self.k[layer].index_select(0, blocks).flatten(0, 1)[:context]
        v = self.v[layer].index_select(0, blocks).flatten(0, 1)[:context]
        return k, v

    def gather_batch(self, layer: int, batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_BCJY, v_BCJU) padded to C = P * Z positions; positions >= context_lens_B are garbage
        and must be masked."""
        table = batch.block_table_BP
        k = self.k[layer][table].flatten(1, 2)
        v = self.v[layer][table].flatten(1, 2)
        return k, v
