"""A worker's device staging slots for fetched host experts (issue 13), shared by its layers, and
the one prefetch in flight: copies queued for the next layer's likely fetches before its routing
is known, so the PCIe link does not idle through a layer's host sync and kernels.

Legend: G staging slots of one buffer, H = 2F, D hidden, F expert FFN width.

Invariants (a copy never overwrites weights a kernel may still read, a kernel never reads a copy
that has not landed): copies run on one weights stream, in queue order; each of the two buffers
keeps the event after the last kernel that read it (`freed`), and a round's copies into a buffer
wait for it; a kernel waits for its round's `ready` event. A pending prefetch is used only by the
layer it was queued for; any other layer that fetches first drops it (its copies into the same
buffer queue after the prefetch's, so nothing tears), and a write into the owner's host weights
first waits for the prefetch's copies to leave host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeray.tier_launch import LaunchThread


@dataclass
class Prefetch:
    owner: object  # the HostSlots (one layer) the copies are for
    slots: list  # host slot indices, in staging positions 0, 1, ...
    buffer: int
    ready: object  # torch.cuda.Event after the copies (None on a CPU worker: copies are done)


class StagingPool:
    """Two buffers of `slots` device experts (allocated at the first fetch), their freed events,
    the streams, the layers' host slots by layer index, and the pending prefetch."""

    def __init__(self, slots: int, device: torch.device, launch_thread: bool = False):
        self.slots, self.device = slots, device
        # a step's launches on their own thread (moeray.tier_launch; tier.launch_thread). A CPU
        # worker's launches are compute that would compete with the host math: only tests thread them
        self.threaded = launch_thread
        self._launcher = None
        self.buffers = None  # (w13 [2, G, H, D], w2 [2, G, D, F])
        self.freed = [None, None]
        self.streams = None  # (rows stream, weights stream) on a GPU
        self.next_buffer = 0  # the buffer the next round (or prefetch) copies into
        self.layers: dict = {}  # layer index -> HostSlots (a rebuilt layer replaces its old one)
        self.prefetched: Prefetch | None = None

    def get(self, w13_HD: torch.Tensor, w2_DF: torch.Tensor):
        if self.buffers is None:
            self.buffers = (torch.empty((2, self.slots) + tuple(w13_HD.shape), dtype=w13_HD.dtype, device=self.device),
                            torch.empty((2, self.slots) + tuple(w2_DF.shape), dtype=w2_DF.dtype, device=self.device))
        return self.buffers

    def nbytes(self) -> int:
        return 0 if self.buffers is None else sum(t.numel() * t.element_size() for t in self.buffers)

    def launch_thread(self):
        """The worker's LaunchThread (started at the first step that needs it), or None: launch inline."""
        if self.threaded and self._launcher is None:
            self._launcher = LaunchThread(self.device)
        return self._launcher

    def close(self) -> None:
        """Stop the launch thread (if one started) and let go of the layers and the staging
        buffers: the layers point at their pool and the pool at its layers, so a pool replaced
        by a rebuilt tier would otherwise keep every old layer's host slots until a garbage
        collection. A layer that still steps on it launches inline and stages afresh."""
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        self.threaded = False
        if self.prefetched is not None and self.prefetched.ready is not None:
            self.prefetched.ready.synchronize()  # host sync: its copies still read the old host slots
        self.prefetched, self.layers, self.buffers, self.freed = None, {}, None, [None, None]

    def cuda_streams(self):
        if self.streams is None:
            self.streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self.streams

    # ---- layers and the prefetch ----------------------------------------------------------------
    def register(self, layer: int, host) -> None:
        self.layers[layer] = host

    def layer_after(self, layer: int):
        """The host slots of the next registered layer (after the last: the first, the next step's)."""
        later = [index for index in self.layers if index > layer]
        index = min(later) if later else min(self.layers, default=None)
        return None if index is None else self.layers[index]

    def take(self, owner) -> Prefetch | None:
        """The pending prefetch if it was queued for `owner` (then no longer pending); one queued
        for another layer is dropped: the caller's rounds may reuse its buffer."""
        pending, self.prefetched = self.prefetched, None
        return pending if pending is not None and pending.owner is owner else None

    def drop(self, owner) -> None:
        """Forget `owner`'s pending prefetch after its copies have left host memory (its host
        weights are about to be written; host sync, only on a slot write)."""
        if self.prefetched is not None and self.prefetched.owner is owner:
            if self.prefetched.ready is not None:
                self.prefetched.ready.synchronize()
            self.prefetched = None

    # ---- copies -----------------------------------------------------------------------------
    def copy_round(self, src, copies: list, buffer: int | None = None):
        """Queue copies [(staging position, host slot of src)] into `buffer` (None: the next one,
        after the last kernel that read it); returns (buffer, ready event or None)."""
        w13_2GHD, w2_2GDF = self.get(src.w13_XHD[0], src.w2_XDF[0])
        if buffer is None:
            buffer, self.next_buffer = self.next_buffer, 1 - self.next_buffer
            wait = self.freed[buffer]
        else:
            wait = None  # the pending prefetch's buffer: its copies already waited, no kernel read it since
        if self.device.type != "cuda":
            for j, x in copies:
                w13_2GHD[buffer, j].copy_(src.w13_XHD[x])
                w2_2GDF[buffer, j].copy_(src.w2_XDF[x])
            return buffer, None
        weights_stream = self.cuda_streams()[1]
        with torch.cuda.stream(weights_stream):
            if wait is not None:
                weights_stream.wait_event(wait)
            for j, x in copies:
                w13_2GHD[buffer, j].copy_(src.w13_XHD[x], non_blocking=True)
                w2_2GDF[buffer, j].copy_(src.w2_XDF[x], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(weights_stream)
        return buffer, ready

    def read_by_main(self, buffer: int) -> None:
        """After the kernel that read `buffer` was queued on the current stream."""
        if self.device.type == "cuda":
            self.freed[buffer] = torch.cuda.Event()
            self.freed[buffer].record(torch.cuda.current_stream(self.device))
