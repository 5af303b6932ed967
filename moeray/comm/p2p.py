"""Chunked point-to-point slot transfer for migrations on GPUs (NCCL send/recv, no host copies).

Legend: H = 2F gate+up rows, D hidden, F expert ffn width; a slot's weights are (w13_HD, w2_DF).

A migration is a list of `SlotCopy` (src rank/slot -> dst rank/slot), identical on every rank.
NCCL hangs or fails on very large groups of p2p ops, so the list is cut into chunks of at most
`max_ops` send/recv ops and `max_bytes` per rank, and each chunk is one grouped launch
(ncclGroupStart/End through c10d coalescing). The cut is computed from the *global* list, so every
rank's group boundaries line up with its peers' (a send in chunk j always meets its recv in chunk j:
mismatched boundaries could leave two groups waiting on each other).

Runs on the caller's current CUDA stream and returns without a host sync; the caller synchronises
that stream before publishing the received weights. Run it over a group of its own (not the
step's all-to-all group): the step thread and the transfer thread would otherwise post ops to one
communicator in different orders on different ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_MAX_OPS = 64  # send + recv ops per rank per grouped launch
DEFAULT_MAX_BYTES = 1 << 30  # bytes sent + received per rank per grouped launch


@dataclass(frozen=True)
class SlotCopy:
    """Copy local slot `src_slot` of rank `src` into local slot `dst_slot` of rank `dst` (one layer)."""

    layer: int
    src: int
    src_slot: int
    dst: int
    dst_slot: int


def plan_chunks(copies: Sequence[SlotCopy], tensors_per_slot: int, bytes_per_slot: int, world_size: int,
                max_ops: int = DEFAULT_MAX_OPS, max_bytes: int = DEFAULT_MAX_BYTES) -> list[list[int]]:
    """Cut the global copy list into chunks (lists of indices, in order) so that no rank posts more
    than `max_ops` ops or moves more than `max_bytes` in one chunk. Same answer on every rank."""
    chunks: list[list[int]] = []
    current: list[int] = []
    ops = [0] * world_size
    moved = [0] * world_size
    for i, c in enumerate(copies):
        if c.src == c.dst:
            current.append(i)  # a local copy posts no op
            continue
        fits = all(ops[r] + tensors_per_slot <= max_ops and moved[r] + bytes_per_slot <= max_bytes for r in (c.src, c.dst))
        if current and not fits and any(ops):
            chunks.append(current)
            current, ops, moved = [], [0] * world_size, [0] * world_size
        current.append(i)
        for r in (c.src, c.dst):
            ops[r] += tensors_per_slot
            moved[r] += bytes_per_slot
    if current:
        chunks.append(current)
    return chunks


def _grouped(pg, device: torch.device, posts: list[tuple[str, torch.Tensor, int]]) -> None:
    """Post one chunk's ops on `pg` as one grouped launch (stream-ordered wait, no host sync)."""
    if not posts:
        return
    if hasattr(pg, "_start_coalescing") and device.type == "cuda":
        pg._start_coalescing()  # on the c10d backend object these take no device (torch 2.11)
        for kind, tensor, peer in posts:
            (pg.send if kind == "send" else pg.recv)([tensor], peer, 0)
        pg._end_coalescing().wait()
        return
    # No grouped p2p (Gloo): post in the global order and wait each op. Every rank walks the same
    # total order and each op involves exactly its two parties, so the lowest pending op can always
    # complete: no deadlock.
    for kind, tensor, peer in posts:
        (pg.send if kind == "send" else pg.recv)([tensor], peer, 0).wait()


def transfer_slots(pg, rank: int, world_size: int, copies: Sequence[SlotCopy],
                   read: Callable[[int, int], tuple[torch.Tensor, ...]],
                   alloc: Callable[[int], tuple[torch.Tensor, ...]],
                   max_ops: int = DEFAULT_MAX_OPS, max_bytes: int = DEFAULT_MAX_BYTES,
                   stage_local: Callable[[int, int, int], tuple[torch.Tensor, ...]] | None = None,
                   ) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
    """Run this rank's part of `copies`; returns {(layer, dst_slot): tensors} of the slots it received.

    read(layer, slot) -> this rank's live tensors of a local slot (sent as they are: contiguous);
    alloc(layer)      -> fresh, uninitialised receive buffers of one slot of that layer;
    stage_local(layer, src_slot, dst_slot) -> a fresh copy of a local slot for a copy within this
                         rank, kept where dst_slot lives (a host tier's demotion: host memory);
                         default: a clone of read(layer, src_slot).
    """
    if not copies:
        return {}
    sample = alloc(copies[0].layer)  # every slot of a model has the same tensor shapes
    device = sample[0].device
    received: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    bytes_per_slot = sum(t.numel() * t.element_size() for t in sample)
    for chunk in plan_chunks(copies, len(sample), bytes_per_slot, world_size, max_ops, max_bytes):
        posts: list[tuple[str, torch.Tensor, int]] = []
        for i in chunk:
            c = copies[i]
            if c.src == rank and c.dst == rank:
                received[(c.layer, c.dst_slot)] = (tuple(t.clone() for t in read(c.layer, c.src_slot)) if stage_local is None
                                                   else stage_local(c.layer, c.src_slot, c.dst_slot))
            elif c.src == rank:
                posts += [("send", t.contiguous(), c.dst) for t in read(c.layer, c.src_slot)]
            elif c.dst == rank:
                bufs = alloc(c.layer)
                received[(c.layer, c.dst_slot)] = bufs
                posts += [("recv", t, c.src) for t in bufs]
        _grouped(pg, device, posts)
    return received
