"""The worker's slot changes (a mixin of `moeray.worker.Worker`): a resize (`reconfigure`: new
rank, worker count and placement), and a live migration (export live slots, stage the next
version's slots while steps go on, commit them at a step boundary); and the check every placement
passes when it arrives from another actor.

Legend: L MoE layers, S slots in the group, S_w local slots, D hidden, F expert FFN width.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from moeray.comm import p2p
from moeray.config import EngineConfig
from moeray.comm.dispatcher import LocalDispatcher
from moeray.slot_loading import assemble_next_slots, read_slots, receipts, sharded
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
    if placement.is_sharded and config.tier.enabled:
        raise ValueError(f"placement v{placement.version} shards experts, but a host tier (tier.device_slots="
                         f"{config.tier.device_slots}) holds whole experts only")
    return placement



class SlotMigration:
    """Migration methods of Worker; they use its placement, slots, staging, step lock and transfer pool."""

    def reconfigure(self, rank: int, config: EngineConfig, placement: Placement, sources: dict | None = None) -> dict:
        """Take part in a resized group (Engine.scale, a recovery that shrinks): a new rank, worker
        count, slots per worker and placement. The sequences and their KV cache stay. A slot whose
        expert this worker already holds is copied locally; one in `sources` ({(layer, expert):
        ([ref], index)}, another worker's live copy exported to the object store) is fetched from
        there; any other is read from the checkpoint. The group is left: the engine forms the new
        epoch's next. Returns how many slots came from where."""
        placement = accepted_placement(placement, config, rank)  # before anything changes
        # before the lock: steps go on while it arrives (not used when shards force checkpoint reads)
        fetched = {} if sharded(self.placement, placement) else self._fetch_sources(sources or {})
        with self._step_lock:
            self.staging.discard()
            self.leave_group()
            old_mine_LS = self.placement.slots_of_worker(self.rank)
            # shards in either version: every slot comes from the checkpoint (a live copy or a held
            # slot may hold other columns than the new slot needs)
            from_checkpoint = sharded(self.placement, placement)
            self.rank, self.config = rank, config
            if config.parallel.num_workers != self.tier_set_up_for:
                # the host tier's threads are a share of the CPUs per worker, and its rates were
                # measured with them: both again for the new count (every layer is rebuilt below,
                # on the new cold path and staging pool)
                self._cold_path = self._host_tier_setup()
            self.placement = placement
            self.dispatcher = LocalDispatcher(self.placement.num_slots) if self.placement.num_workers == 1 else None
            self._routings = self._routings_of(placement)
            mine_LS = self.placement.slots_of_worker(rank)
            copied = read = from_replicas = 0
            for layer, block in enumerate(self.model.moe_blocks):
                old = block.experts
                if from_checkpoint:
                    w13, w2 = read_slots(self.reader, placement, layer, rank, self.dtype)
                    read += int((mine_LS[layer] >= 0).sum())
                    self._replace_layer_experts(layer, block, w13.to(self.device), w2.to(self.device))
                    continue
                held = {int(e): j for j, e in enumerate(old_mine_LS[layer]) if e >= 0}
                missing = [int(e) for e in mine_LS[layer] if e >= 0 and int(e) not in held]
                fresh = {e: fetched[(layer, e)] for e in missing if (layer, e) in fetched}
                from_replicas += len(fresh)
                unread = [e for e in missing if e not in fresh]
                fresh.update(zip(unread, zip(*self.reader.read_expert_slots(layer, np.array(unread), self.dtype))))
                # with a host tier the new slots are assembled in host memory (they need not fit the
                # device); _slot_experts_of moves the device ones there
                where = "cpu" if self._cold_path is not None else self.device
                w13_0, w2_0 = old.slot_weights(0)
                w13 = torch.zeros((len(mine_LS[layer]),) + tuple(w13_0.shape), dtype=self.dtype, device=where)
                w2 = torch.zeros((len(mine_LS[layer]),) + tuple(w2_0.shape), dtype=self.dtype, device=where)
                for slot, expert in enumerate(int(e) for e in mine_LS[layer]):
                    if expert < 0:
                        continue
                    if expert in held:
                        w13_HD, w2_DF = old.slot_weights(held[expert])
                        w13[slot].copy_(w13_HD)
                        w2[slot].copy_(w2_DF)
                        copied += 1
                    else:
                        w13[slot].copy_(as_source_tensor(fresh[expert][0]))
                        w2[slot].copy_(as_source_tensor(fresh[expert][1]))
                        read += 1
                self._replace_layer_experts(layer, block, w13, w2)
            self._mark_shipped()  # the rebuilt layers count from zero (their host tiers too)
            self._commit_ms = None
            self.runner.set_cuda_graphs(self._graphs_apply())
        return {"rank": rank, "slots_copied": copied, "slots_from_replicas": from_replicas,
                "slots_read": read - from_replicas}

    def _replace_layer_experts(self, layer: int, block, w13_SHD: torch.Tensor, w2_SDF: torch.Tensor) -> None:
        old = block.experts
        experts = self._slot_experts_of(layer, w13_SHD, w2_SDF)
        experts.load_E.copy_(old.load_E)  # routed pairs since start-up (engine.load()) carry on
        experts.record_load = self.stats_recording
        block.experts = experts

    def _fetch_sources(self, sources: dict) -> dict:
        """{(layer, expert): (w13_HD, w2_DF)} of other workers' exported live copies (read-only
        object-store views; copied into the new slot tensors by reconfigure)."""
        if not sources:
            return {}
        timeout = self.config.parallel.collective_timeout_s
        refs = list({src[0][0].hex(): src[0][0] for src in sources.values()}.values())  # [ref of a slot list]
        try:
            lists = dict(zip([r.hex() for r in refs], ray.get(refs, timeout=timeout)))
        except Exception:  # a source died with its export: every such slot is read from the checkpoint
            return {}
        return {key: lists[ref_box[0].hex()][index] for key, (ref_box, index) in sources.items()}

    def export_slots(self, entries: list[tuple[int, int]]) -> list:
        """(layer, local slot) weights of the current version for other workers: returns [ref] of
        one object-store entry holding the list of (w13_HD, w2_DF).

        The serialisation copy runs on the low-priority transfer thread, so on a busy host it
        yields to steps instead of stretching them.
        """
        experts = self._slot_experts()

        def put():
            views = [export_slot_weights(*experts[layer].slot_weights(slot)) for layer, slot in entries]
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
                # a host-tier slot goes to the device first (NCCL sends device memory)
                read=lambda layer, slot: tuple(t.to(self.device, non_blocking=True) for t in experts[layer].slot_weights(slot)),
                alloc=lambda layer: tuple(torch.empty_like(t, device=self.device) for t in experts[layer].slot_weights(0)),
                # sharded moves number their receipts in place of destination slots
                stage_local=None if sharded_move else lambda layer, src, dst: self._stage_local_copy(experts[layer], src, dst))
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

    def _stage_local_copy(self, experts, src_slot: int, dst_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of local slot src_slot staged where dst_slot lives, on the current (transfer)
        stream: bound for a host slot (a tier demotion), in pinned host memory, so a tier swap
        needs device room for the promoted expert only (it took room for both); bound for a
        device slot, on the device (one copy, also from a host slot). Complete at the caller's
        stream sync."""
        src = experts.slot_weights(src_slot)
        if experts.host is not None and dst_slot >= experts.host.first_slot:
            return tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in src)
        return tuple(t.to(self.device, non_blocking=True, copy=True) for t in src)

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
            experts[layer].write_slot(slot, as_source_tensor(w13_HD), as_source_tensor(w2_DF))  # device or host tier
        self.placement = staged.placement  # checked when it was staged
        # built on the host when it was staged; moved here, under the step lock (a CUDA call from
        # the stage thread could land inside a CUDA-graph capture of a step)
        self._routings = [routing.to(self.device) for routing in staged.routings]
        for layer_experts, routing in zip(experts, self._routings):
            layer_experts.slot_map, layer_experts.width_S = routing.slot_map, routing.width_S
            layer_experts.batch_split = routing.batch_split
        self.runner.invalidate_graphs()
        self._commit_ms = 1e3 * (time.perf_counter() - start)
