"""Slot weights of sharded experts: packing a column range of an expert into a slot, and the
columns each local slot holds.

Legend: S_w local slots, X any number of slots, D hidden, F expert FFN width, H = 2F.

Layout of a slot holding columns [c0, c1) of its expert (w = c1 - c0; a whole slot is [0, F)):
gate rows [0, w) and up rows [F, F + w) of w13_XHD, down columns [0, w) of w2_XDF, zeros after.
Columns first keeps one slot shape for every width (the grouped kernel takes `width_S` and does
only w columns' work), and SwiGLU is separable by column, so the shards' partial outputs add up
to the whole expert's output exactly in real arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch

from moeray.slot_transfer import as_source_tensor


def pack_columns(w13_XHD: torch.Tensor, w2_XDF: torch.Tensor, columns_X2: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole experts' weights -> slots holding columns [c0, c1) of each, packed first, zeros after.
    Rows of whole slots ([0, F)) and free slots ([0, 0) of zeros) are returned as they are."""
    ffn = w2_XDF.shape[2]
    columns_X2 = np.asarray(columns_X2, dtype=np.int64).reshape(-1, 2)
    if len(columns_X2) != w13_XHD.shape[0]:
        raise ValueError(f"{len(columns_X2)} column ranges for {w13_XHD.shape[0]} slots")
    out13, out2 = w13_XHD.clone(), w2_XDF.clone()
    for slot, (start, stop) in enumerate(columns_X2.tolist()):
        if not 0 <= start <= stop <= ffn:
            raise ValueError(f"slot {slot}: columns [{start}, {stop}) are outside [0, {ffn})")
        if start == 0 and stop == ffn:
            continue
        width = stop - start
        out13[slot].zero_()
        out2[slot].zero_()
        out13[slot, :width] = w13_XHD[slot, start:stop]
        out13[slot, ffn:ffn + width] = w13_XHD[slot, ffn + start:ffn + stop]
        out2[slot, :, :width] = w2_XDF[slot, :, start:stop]
    return out13, out2


def columns_of_worker(placement, layer: int, worker: int, ffn: int) -> np.ndarray:
    """[S_w, 2] column range of each of the worker's slots in one layer ([0, F) whole, [0, 0) free)."""
    lo = worker * placement.slots_per_worker
    columns_S2 = placement.shard_columns(ffn)[layer, lo:lo + placement.slots_per_worker]
    held_S = placement.phy2log[layer, lo:lo + placement.slots_per_worker] >= 0
    return np.where(held_S[:, None], columns_S2, 0)


def width_of_worker(placement, layer: int, worker: int, ffn: int, device) -> torch.Tensor | None:
    """int32 [S_w] columns each of the worker's slots holds, on `device`; None when the layer's
    slots of this worker are all whole or free (the kernels' plain path)."""
    if not placement.is_sharded:
        return None
    columns_S2 = columns_of_worker(placement, layer, worker, ffn)
    width_S = columns_S2[:, 1] - columns_S2[:, 0]
    held_S = placement.slots_of_worker(worker)[layer] >= 0
    if (width_S[held_S] == ffn).all():
        return None
    return torch.as_tensor(np.where(held_S, width_S, ffn), dtype=torch.int32, device=device)  # the kernel's dtype


def take_columns(w13_HD: torch.Tensor, w2_DF: torch.Tensor, have: tuple[int, int], want: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """From a slot holding columns `have` = [a0, a1) (packed first), the piece `want` = [b0, b1)
    inside it, as (gate_up [2, b1 - b0, D] rows, down [D, b1 - b0] columns): what a migration ships."""
    (a0, a1), (b0, b1) = have, want
    if not a0 <= b0 <= b1 <= a1:
        raise ValueError(f"columns [{b0}, {b1}) are not inside the slot's [{a0}, {a1})")
    ffn = w2_DF.shape[1]
    lo, hi = b0 - a0, b1 - a0
    gate_up = torch.stack([w13_HD[lo:hi], w13_HD[ffn + lo:ffn + hi]])
    return gate_up, w2_DF[:, lo:hi].clone()


def put_columns(w13_HD: torch.Tensor, w2_DF: torch.Tensor, slot_columns: tuple[int, int], piece_columns: tuple[int, int],
                gate_up_2XD: torch.Tensor, down_DX: torch.Tensor) -> None:
    """Write a piece holding columns `piece_columns` into a slot that will hold `slot_columns`
    (both [start, stop) of F), at its packed position; in place."""
    (s0, s1), (p0, p1) = slot_columns, piece_columns
    if not s0 <= p0 <= p1 <= s1:
        raise ValueError(f"piece columns [{p0}, {p1}) are not inside the slot's [{s0}, {s1})")
    ffn = w2_DF.shape[1]
    lo, hi = p0 - s0, p1 - s0
    w13_HD[lo:hi] = gate_up_2XD[0]
    w13_HD[ffn + lo:ffn + hi] = gate_up_2XD[1]
    w2_DF[:, lo:hi] = down_DX


def assemble_slot(new_columns: tuple[int, int], shape_13: tuple, shape_2: tuple, dtype, device,
                  kept: tuple | None = None, pieces: list = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot's weights for the next placement version: columns `new_columns` of its expert,
    packed first, from what the worker already holds and what other slots send.

    kept: (w13_HD, w2_DF, columns) of the live slot when it holds the same expert (its overlap
    with new_columns is kept); pieces: [(w13_HD, w2_DF, source columns, piece columns)], whole
    source slots (as exported) and the columns to take from each. Raises ValueError unless every
    new column comes from exactly one place (a migration that misses or repeats a column)."""
    s0, s1 = new_columns
    w13_HD = torch.zeros(shape_13, dtype=dtype, device=device)
    w2_DF = torch.zeros(shape_2, dtype=dtype, device=device)
    covered = np.zeros(s1 - s0, dtype=np.int64)
    sources = list(pieces)
    if kept is not None:
        k0, k1 = max(s0, kept[2][0]), min(s1, kept[2][1])
        if k0 < k1:
            sources.append((kept[0], kept[1], kept[2], (k0, k1)))
    for src13, src2, have, want in sources:
        src13, src2 = as_source_tensor(src13), as_source_tensor(src2)  # object-store views are only read
        piece = take_columns(src13, src2, tuple(have), tuple(want))
        put_columns(w13_HD, w2_DF, new_columns, tuple(want), piece[0].to(device, dtype), piece[1].to(device, dtype))
        covered[want[0] - s0:want[1] - s0] += 1
    if (covered != 1).any():
        column = s0 + int(np.flatnonzero(covered != 1)[0])
        raise ValueError(f"column {column} of the slot's [{s0}, {s1}) comes from {int(covered[column - s0])} sources, not 1")
    return w13_HD, w2_DF
