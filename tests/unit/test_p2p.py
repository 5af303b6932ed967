"""Chunked slot transfer (moeray/comm/p2p.py): chunk boundaries, and a transfer over real Gloo groups.

Legend: H = 2F, D hidden, F ffn width; a slot is (w13_HD, w2_DF).
"""

from __future__ import annotations

import torch

from moeray.comm.p2p import SlotCopy, plan_chunks, transfer_slots

from moeray.comm.local_ranks import run_ranks


def test_chunks_bound_ops_and_bytes_per_rank():
    copies = [SlotCopy(0, i % 3, i, (i + 1) % 3, i) for i in range(20)] + [SlotCopy(1, 2, 0, 2, 1)]
    chunks = plan_chunks(copies, tensors_per_slot=2, bytes_per_slot=10, world_size=3, max_ops=6, max_bytes=25)
    assert [i for c in chunks for i in c] == list(range(len(copies)))  # order kept, nothing lost
    for chunk in chunks:
        for r in range(3):
            n = sum(1 for i in chunk if copies[i].src != copies[i].dst and r in (copies[i].src, copies[i].dst))
            assert 2 * n <= 6 and 10 * n <= 25


def _slot(layer, rank, slot):
    w13_HD = torch.full((4, 3), float(100 * layer + 10 * rank + slot))
    return w13_HD, -w13_HD[:, :2].clone()


def _transfer(group, rank, copies):
    got = transfer_slots(group._pg, rank, 3, copies, read=lambda l, s: _slot(l, rank, s),
                         alloc=lambda l: (torch.empty(4, 3), torch.empty(4, 2)), max_ops=2)
    # flatten into one tensor: (layer, dst_slot, first value of w13, first value of w2) per slot
    rows = [[l, s, w13[0, 0].item(), w2[0, 0].item()] for (l, s), (w13, w2) in sorted(got.items())]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def test_transfer_over_gloo_in_chunks():
    copies = [SlotCopy(0, 0, 1, 1, 0), SlotCopy(0, 2, 0, 0, 2), SlotCopy(1, 1, 1, 2, 1),
              SlotCopy(1, 0, 0, 0, 1), SlotCopy(2, 1, 2, 0, 0), SlotCopy(2, 2, 2, 1, 2)]
    out = run_ranks(3, _transfer, (copies,))
    for rank in range(3):
        want = sorted((c.layer, c.dst_slot, float(100 * c.layer + 10 * c.src + c.src_slot)) for c in copies if c.dst == rank)
        got = [(int(r[0]), int(r[1]), r[2]) for r in out[rank].tolist()]
        assert got == want
        assert all(r[3] == -r[2] for r in out[rank].tolist())


def test_copies_within_a_rank_are_staged_by_stage_local_else_cloned():
    """No group needed for copies inside one rank; stage_local (the host tier: a demotion staged in
    host memory) replaces the clone, and a clone never aliases the live slot."""
    copies = [SlotCopy(0, 0, 1, 0, 0), SlotCopy(1, 0, 0, 0, 2), SlotCopy(1, 0, 2, 0, 0)]
    live = {(layer, slot): _slot(layer, 0, slot) for layer in range(2) for slot in range(3)}
    cloned = transfer_slots(None, 0, 1, copies, read=lambda l, s: live[(l, s)],
                            alloc=lambda l: (torch.empty(4, 3), torch.empty(4, 2)))
    for c in copies:
        got, src = cloned[(c.layer, c.dst_slot)], live[(c.layer, c.src_slot)]
        assert all(torch.equal(g, t) and g.data_ptr() != t.data_ptr() for g, t in zip(got, src))
    asked = []

    def stage_local(layer, src_slot, dst_slot):
        asked.append((layer, src_slot, dst_slot))
        return tuple(t + 0.5 for t in live[(layer, src_slot)])

    staged = transfer_slots(None, 0, 1, copies, read=lambda l, s: live[(l, s)],
                            alloc=lambda l: (torch.empty(4, 3), torch.empty(4, 2)), stage_local=stage_local)
    assert asked == [(c.layer, c.src_slot, c.dst_slot) for c in copies]
    assert staged[(1, 0)][0][0, 0].item() == 100 + 2 + 0.5
