"""The KV blocks of one worker's cache: which block ids are free and which are held.

The driver's scheduler reserves blocks by count at admission, so `allocate` failing means the
admission accounting is wrong (a bug), never that a request arrived at a busy moment.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks of `block_size` tokens that hold `num_tokens` tokens (ceil division; 0 tokens -> 0)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Block ids 0..num_blocks-1. Invariant: every id is in exactly one of the free heap and the
    used set. The free ids sit in a min-heap, so `allocate` always hands out the lowest free ids
    (the order depends only on the sequence of calls, never on timing)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # ascending = already a valid heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        """The n lowest free block ids, ascending, now held."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of KV blocks: {n}")
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks but only {len(self._free)} of {self.num_blocks} are free: "
                               "the scheduler admitted more than the KV budget")
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, block_ids: Iterable[int]) -> None:
        """Give held blocks back. All-or-nothing: a bad id (not held, repeated) raises before any is freed."""
        blocks = list(block_ids)
        seen: set[int] = set()
        for block in blocks:
            if block not in self._used or block in seen:
                raise ValueError(f"KV block {block} is freed but is not held (double free or never allocated)")
            seen.add(block)
        for block in blocks:
            self._used.remove(block)
            heapq.heappush(self._free, block)
