"""KV block accounting: ceil division, lowest-first allocation, errors that name what went wrong."""

import random

import pytest

from moeray.generation.blocks import BlockAllocator, blocks_needed


@pytest.mark.parametrize("tokens, size, want", [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (5, 1, 5),
                                                (33, 8, 5)])
def test_blocks_needed(tokens, size, want):
    assert blocks_needed(tokens, size) == want


@pytest.mark.parametrize("tokens, size, match", [(4, 0, "block_size"), (-1, 4, "num_tokens")])
def test_blocks_needed_rejects_bad_input(tokens, size, match):
    with pytest.raises(ValueError, match=match):
        blocks_needed(tokens, size)


def test_allocation_is_lowest_first_and_reuses_freed_ids():
    alloc = BlockAllocator(8)
    a, b = alloc.allocate(3), alloc.allocate(2)
    assert (a, b) == ([0, 1, 2], [3, 4])
    alloc.free([1, 0])
    assert (alloc.num_free, alloc.num_used) == (5, 3)
    assert alloc.allocate(3) == [0, 1, 5]
    assert alloc.allocate(0) == []


def test_not_enough_blocks_names_the_request_and_the_free_count():
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    with pytest.raises(RuntimeError, match=r"asked for 2 KV blocks but only 1 of 4 are free"):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a failed allocate takes nothing


def test_double_free_names_the_block_and_frees_nothing():
    alloc = BlockAllocator(4)
    held = alloc.allocate(3)
    alloc.free([held[1]])
    with pytest.raises(ValueError, match="KV block 1 "):
        alloc.free([held[0], held[1]])
    assert alloc.num_used == 2  # block 0 was not freed by the failed call
    with pytest.raises(ValueError, match="KV block 2 "):
        alloc.free([2, 2])
    with pytest.raises(ValueError, match="KV block 7 "):
        alloc.free([7])
    with pytest.raises(ValueError, match="negative"):
        alloc.allocate(-1)


def test_random_operations_keep_the_invariant():
    rng = random.Random(0)
    alloc = BlockAllocator(32)
    held: list[list[int]] = []
    for _ in range(500):
        if held and rng.random() < 0.5:
            blocks = held.pop(rng.randrange(len(held)))
            alloc.free(blocks)
        else:
            n = rng.randint(0, 6)
            if n > alloc.num_free:
                continue
            used = {b for group in held for b in group}
            got = alloc.allocate(n)
            assert got == sorted(set(range(32)) - used)[:n]
            held.append(got)
        used = [b for group in held for b in group]
        assert len(used) == len(set(used)) == alloc.num_used
        assert alloc.num_free + alloc.num_used == 32
