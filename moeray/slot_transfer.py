"""Worker-side migration state: weights for the next placement version, staged while serving.

Prepare (concurrent with steps, on another actor thread): the coordinator asks source workers to
export slots of the *current* version and destination workers to `stage` them for version v+1.
Staged weights live beside the live slots, never in them, so a step running meanwhile reads only
version v. Commit (at a step boundary, inside `Worker.step`): the staged slots are copied into
the live slot tensors and the slot maps switch to v+1 together on every worker.

On CPU the bytes travel through the Ray object store; exporting takes host copies, so a source
slot that is overwritten at commit has already been read.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from placement import Placement


@dataclass
class StagedVersion:
    placement: Placement  # the version to switch to (slot map, split weights, shard widths)
    # (layer, local slot) -> (w13_HD, w2_DF) for every slot whose expert changes: tensors (GPU p2p)
    # or read-only numpy views of the object store (CPU; copied once, at commit)
    slots: dict[tuple[int, int], tuple] = field(default_factory=dict)
    # per layer: the slot map, widths and split units of `placement` (slot_loading.LayerRouting),
    # built at stage time so that the commit pause only swaps them in
    routings: list | None = None
    base_version: int | None = None  # the live version the slots were assembled from

    @property
    def version(self) -> int:
        return self.placement.version


class SlotStaging:
    """Holds at most one staged version; thread-safe between the stage and step threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._staged: StagedVersion | None = None
        self._newest = -1  # the newest version ever staged here (kept across discards)

    def stage(self, staged: StagedVersion, live_version: int) -> None:
        """Versions only grow (the coordinator never reuses one), so a stage that is not newer than
        the live version and everything staged before is a late arrival of an abandoned migration."""
        with self._lock:
            floor = max(live_version, self._newest)
            if staged.version <= floor:
                raise ValueError(f"cannot stage v{staged.version}: not newer than v{floor} (a late, abandoned migration)")
            self._staged = staged
            self._newest = staged.version

    def take(self, version: int) -> StagedVersion:
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is None or staged.version != version:
            have = None if staged is None else staged.version
            raise RuntimeError(f"commit of placement v{version} but v{have} is staged")
        return staged

    @property
    def newest(self) -> int:
        """The newest version ever staged here (-1: none)."""
        return self._newest

    def discard(self) -> None:
        with self._lock:
            self._staged = None


def export_slot_weights(w13_HD: torch.Tensor, w2_DF: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Host views of one slot's weights (on GPU: one device-to-host copy; host tier: none).

    No copy on CPU: Ray serialises the return value into the object store before the call
    completes, and the live slots change only at a commit, which waits for the migration.
    """
    return w13_HD.detach().cpu().numpy(), w2_DF.detach().cpu().numpy()


def lower_thread_priority(niceness: int = 10) -> None:
    """Run the calling thread at a lower CPU priority (Linux: nice is per thread). Migration work
    then yields to steps on a busy host. Best effort: a no-op where the OS refuses."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def lower_process_priority(niceness: int = 10) -> None:
    """Lower every current thread of this process (threads started later inherit it)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [threading.get_native_id()]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (AttributeError, OSError):
            pass


def as_source_tensor(weights) -> torch.Tensor:
    """A tensor to copy from: staged slots are torch tensors (GPU p2p) or read-only numpy views
    of the object store (CPU), which are only ever read."""
    if isinstance(weights, torch.Tensor):
        return weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write to it
        return torch.from_numpy(weights)
