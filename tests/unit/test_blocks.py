import pytest

from moeray.generation.blocks import BlockAllocator, blocks_needed


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_allocate_lowest_first_free_and_errors():
    alloc = BlockAllocator(5)
    assert alloc.allocate(2) == [0, 1] and alloc.allocate(1) == [2]
    alloc.free([0])
    assert alloc.allocate(2) == [0, 3] and (alloc.num_used, alloc.num_free) == (4, 1)
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks with 1 free of 5"):
        alloc.allocate(2)
    alloc.free([1])
    with pytest.raises(RuntimeError, match="KV block 1 is freed but was not allocated"):
        alloc.free([1])
