"""The worker's side of a live migration (a mixin of `moeray.worker.Worker`): export live slots,
stage the next version's slots while steps go on, commit them at a step boundary; and the check
every placement passes when it arrives from another actor.

Legend: L MoE layers, S slots in the group, S_w local slots, D hidden, F expert FFN width.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from moeray.comm import p2p
from moeray.config import EngineConfig
from moeray.slot_loading import assemble_next_slots, receipts, sharded
from moeray.slot_transfer import StagedVersion, as_source_tensor, export_slot_weights
from placement import Placement


def accepted_placement(placement: Placement, config: EngineConfig, rank: int) -> Placement:
    """`placement` as it arrived from another actor, checked: its invariants (Placement.validate)
    and that it is a placement for this config and rank. ValueError naming what differs."""
    if not isinstance(placement, Placement):
        raise TypeError(f"a worker takes a placement.Placement, got {type(placement).__name__}")
    placement.validate()
    model = config.model
    want = {"num_experts": model.num_experts, "slots_per_worker": config.slots_per_worker,
            "num_layers": model.num_moe_layers, "num_workers": config.parallel.num_workers}
    have = {name: getattr(placement, name) for name in want}
    differs = [f"{name}={have[name]} (config: {want[name]})" for name in want if have[name] != want[name]]
    if differs:
        raise ValueError(f"placement v{placement.version} does not match the worker's config: {', '.join(differs)}")
    if placement.is_sharded:  # a width that rounds to no column would take tokens and compute nothing
        ffn = model.moe_intermediate_size
        columns_LS2 = placement.shard_columns(ffn)
        empty_LS = (placement.phy2log >= 0) & (columns_LS2[..., 1] <= columns_LS2[..., 0])
        if empty_LS.any():
            layer, slot = map(int, np.argwhere(empty_LS)[0])
            raise ValueError(f"placement v{placement.version}: layer {layer} slot {slot} has width "
                             f"{placement.width_LS[layer, slot]:.6g}, no column of F={ffn}")
    if not 0 <= rank < placement.num_workers:
        raise ValueError(f"rank {rank} is not one of the placement's {placement.num_workers} workers")
    return placement



class SlotMigration:
    """Migration methods of Worker; they use its placement, slots, staging, step lock and transfer pool."""

    def export_slots(self, entries: list[tuple[int, int]]) -> list:
        """(layer, local slot) weights of the current version for other workers: returns [ref] of
        one object-store entry holding the list of (w13_HD, w2_DF).

        The serialisation copy runs on the low-priority transfer thread, so on a busy host it
        yields to steps instead of stretching them.
        """
        experts = self._slot_experts()

        def put():
            views = [export_slot_weights(experts[layer].w13_SHD, experts[layer].w2_SDF, [slot])[0] for layer, slot in entries]
            return [ray.put(views)]

        return self._transfer_pool.submit(put).result()

    def stage(self, placement: Placement, entries: list[tuple[int, int]], sources: list[tuple]) -> float:
        """Receive the slots this worker gains in `placement` (the next version); runs while steps continue.

        sources[i] = ([ref], index): entry i's weights are item `index` of the export behind `ref`
        (wrapped in a list so Ray hands over the reference instead of resolving it here).
        Returns the transfer time in ms.
        """
        self._announced_version = max(self._announced_version, placement.version)  # counted even if this never ends
        placement = accepted_placement(placement, self.config, self.rank)
        live = self.placement  # the version this stage builds on (the commit checks it is still live)
        start = time.perf_counter()
        timeout = self.config.parallel.collective_timeout_s
        refs = list({id(src[0][0]): src[0][0] for src in sources}.values())
        boxes = ray.get(refs, timeout=timeout)  # each export call returned [ref of its slot list]
        fetched = dict(zip([id(r) for r in refs], ray.get([box[0] for box in boxes], timeout=timeout)))
        staged = StagedVersion(placement, routings=self._routings_of(placement, "cpu"), base_version=live.version)
        if sharded(live, placement):
            # entries: (layer, local slot, source global slot, col_start, col_stop); the slots are
            # assembled here, off the step path, from kept columns and the pieces
            pieces: dict = {}
            for (layer, slot, src, c0, c1), (ref_box, index) in zip(entries, sources):
                pieces.setdefault((layer, slot), []).append((*fetched[id(ref_box[0])][index], src))
            staged.slots.update(self._assemble(live, placement, pieces))
        else:
            for (layer, slot, *_), (ref_box, index) in zip(entries, sources):
                w13, w2 = fetched[id(ref_box[0])][index]
                # Read-only views of the object store (zero-copy; Ray keeps them pinned while
                # referenced): the one copy happens at commit, straight into the live slot.
                staged.slots[(layer, slot)] = (w13, w2)
        self.staging.stage(staged, live.version)
        return 1e3 * (time.perf_counter() - start)

    def stage_p2p(self, placement: Placement, copies: list[tuple[int, int, int, int, int]]) -> float:
        """GPU migration: every worker calls this with the same global copy list
        [(layer, src rank, src local slot, dst rank, dst local slot)]; slots move by chunked NCCL
        send/recv on the epoch's transfer group and a side stream while steps continue.
        Returns the transfer time in ms (host sync at the end: the weights are complete when staged)."""
        self._announced_version = max(self._announced_version, placement.version)
        placement = accepted_placement(placement, self.config, self.rank)
        live = self.placement  # the version this stage builds on (the commit checks it is still live)
        start = time.perf_counter()
        experts = self._slot_experts()
        sharded_move = sharded(live, placement)
        if sharded_move:  # whole source slots move once per (source, destination worker)
            slot_copies, numbers = receipts(copies)
        else:
            slot_copies = [p2p.SlotCopy(*c[:5]) for c in copies]
        if self._xfer_stream is None:
            self._xfer_stream = torch.cuda.Stream(self.device)
        # Reading live slots while a step runs is safe: steps only read them and commit (the only
        # writer) waits for this version to be staged everywhere.
        self._xfer_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._xfer_stream):
            received = p2p.transfer_slots(
                None if self.xfer_group is None else self.xfer_group.process_group, self.rank, self.placement.num_workers, slot_copies,
                read=lambda layer, slot: (experts[layer].w13_SHD[slot], experts[layer].w2_SDF[slot]),
                alloc=lambda layer: (torch.empty_like(experts[layer].w13_SHD[0]), torch.empty_like(experts[layer].w2_SDF[0])))
            if sharded_move:
                pieces: dict = {}
                for (layer, src, src_slot, dst, dst_slot, c0, c1), number in zip(copies, numbers):
                    if dst == self.rank:
                        pieces.setdefault((layer, dst_slot), []).append(
                            (*received[(layer, number)], src * placement.slots_per_worker + src_slot))
                received = self._assemble(live, placement, pieces)
        self._xfer_stream.synchronize()  # host sync: off the step path (transfer thread)
        staged = StagedVersion(placement, routings=self._routings_of(placement, "cpu"), base_version=live.version)
        staged.slots.update(received)
        self.staging.stage(staged, live.version)
        return 1e3 * (time.perf_counter() - start)

    def _assemble(self, live: Placement, placement: Placement, pieces: dict) -> dict:
        """The next version's changed slots of a sharded migration (slot_loading.assemble_next_slots).
        Reads live slots while steps run: steps only read them too, and the commit (the only writer)
        waits for this version to be staged."""
        experts = self._slot_experts()
        return assemble_next_slots(live, placement, self.rank,
                                   lambda layer: (experts[layer].w13_SHD.data, experts[layer].w2_SDF.data),
                                   pieces, self.dtype, self.device)

    def _commit(self, version: int) -> None:
        """Switch to the staged version (called at a step boundary, under the step lock)."""
        self._ship_snapshot()  # counts of the old version go out under the old version
        start = time.perf_counter()
        staged = self.staging.take(version)
        if staged.base_version != self.placement.version:  # a reconfigure changed the live slots meanwhile
            raise RuntimeError(f"v{version} was staged on v{staged.base_version}, but v{self.placement.version} is live")
        experts = self._slot_experts()
        for (layer, slot), (w13_HD, w2_DF) in staged.slots.items():
            experts[layer].w13_SHD.data[slot].copy_(as_source_tensor(w13_HD))
            experts[layer].w2_SDF.data[slot].copy_(as_source_tensor(w2_DF))
        self.placement = staged.placement  # checked when it was staged
        # built on the host when it was staged; moved here, under the step lock (a CUDA call from
        # the stage thread could land inside a CUDA-graph capture of a step)
        self._routings = [routing.to(self.device) for routing in staged.routings]
        for layer_experts, routing in zip(experts, self._routings):
            layer_experts.slot_map, layer_experts.width_S = routing.slot_map, routing.width_S
            layer_experts.batch_split = routing.batch_split
        self.runner.invalidate_graphs()
        self._commit_ms = 1e3 * (time.perf_counter() - start)
