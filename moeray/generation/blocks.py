"""The KV blocks of one worker's cache: who holds which. The driver's scheduler reserves blocks by
count at admission, so `allocate` failing means the admission accounting is wrong (a bug), never
that a request arrived at a busy moment."""

from __future__ import annotations

import heapq


def blocks_needed(num_tokens: int, block_size: int) -> int:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return -(-max(0, num_tokens) // block_size)


class BlockAllocator:
    """Free block ids in a min-heap: allocation order is deterministic (lowest ids first)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free of {self.num_blocks}: "
                               "the scheduler admitted more than the budget")
        out = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, block_ids) -> None:
        for block in block_ids:
            if block not in self._used:
                raise RuntimeError(f"KV block {block} is freed but was not allocated")
            self._used.remove(block)
            heapq.heappush(self._free, block)
