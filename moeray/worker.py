"""The worker: one per device. Owns the dense weights, its expert slots, and its group membership.

`Worker` is a plain class (unit-testable without Ray); the engine wraps it with `ray.remote`.
The worker owns the sequences the driver assigned to it and their KV cache
(`moeray.generation.runner.SequenceRunner`): attention runs data-parallel here, the MoE layers
exchange rows with every other worker.

Legend: L MoE layers, E experts, S slots in the group, S_w local slots.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch

from moeray.comm import group as collective
from moeray.comm.dispatcher import AllToAllDispatcher, LocalDispatcher
from moeray.config import EngineConfig
from moeray.expert_parallel import SlotExperts
from moeray.generation.messages import StepPlan, StepResult
from moeray.generation.runner import SequenceRunner
from moeray.host_tier import ColdPath, host_threads, split_tiers
from moeray.models.checkpoint import CheckpointReader
from moeray.models.decoder import MoECausalLM
from moeray.models.kv_cache import PagedKVCache
from moeray.slot_loading import layer_routings, read_slots
from moeray.slot_transfer import SlotStaging, lower_thread_priority
from moeray.tier_calibration import SplitTrial
from moeray.tier_measure import measure_rates
from moeray.tier_staging import StagingPool
from moeray.worker_loop import LoopMessage, LoopReport, WorkerLoop
from moeray.worker_migration import SlotMigration, accepted_placement
from moeray.worker_stats import StatsShipping
from placement import Placement


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Worker(SlotMigration, StatsShipping):
    def __init__(self, rank: int, config: EngineConfig, checkpoint_dir: str, placement: Placement):
        self._rss_before_load = resident_bytes()
        torch.set_num_threads(config.parallel.torch_threads_per_worker)
        collective.register_backends()
        self.rank = rank
        self.config = config
        self.device = torch.device("cuda", torch.cuda.current_device()) if config.parallel.device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # before any NCCL communicator binds to a device
        self._xfer_stream = None
        self.xfer_group = None  # cuda: a second NCCL group per epoch for migration p2p
        self.reader = CheckpointReader(checkpoint_dir)  # the driver checked it against config.model
        self.dtype = getattr(torch, config.model.dtype)
        self._cold_path = self._host_tier_setup()
        # A replacement worker (Engine.recover) starts on the committed placement's split weights.
        self.placement = accepted_placement(placement, config, rank)
        self.group_name: str | None = None
        self.dispatcher = LocalDispatcher(self.placement.num_slots) if self.placement.num_workers == 1 else None
        self._routings = self._routings_of(self.placement)
        self.model = self._build_model()
        self.runner = self._build_runner()
        self.steps = 0
        self.staging = SlotStaging()
        self._announced_version = -1  # the newest version a stage call began for (it may never complete)
        # Migration copies run here, below the step threads' priority (see export_slots).
        self._transfer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeray-transfer",
                                                 initializer=lower_thread_priority)
        # Steps run one at a time; migrations stage on other actor threads meanwhile.
        self._step_lock = threading.Lock()
        self.coordinator = None
        self.epoch = 0
        self.snapshot_interval = config.stats.snapshot_interval_steps
        self._mark_shipped()
        self._commit_ms: float | None = None
        self.stats_recording = False
        self.set_stats_recording(config.stats.enabled)
        self.loop: WorkerLoop | None = None

    # ---- construction ------------------------------------------------------------------------
    def _build_model(self) -> MoECausalLM:
        """The family's model with this worker's slots in every MoE layer (the experts factory seam:
        the model code itself never sees the distribution). Reads only dense + own slots."""
        cfg = self.config.model

        def experts_factory(layer: int) -> SlotExperts:
            w13, w2 = read_slots(self.reader, self.placement, layer, self.rank, self.dtype)  # on the host
            return self._slot_experts_of(layer, w13, w2)

        model = MoECausalLM(cfg, experts_factory)
        # Dense parameters were allocated by the constructor; filled from the checkpoint below.
        for name, param in model.named_parameters():
            if ".experts." not in name:
                param.data = param.data.to(self.device, self.dtype)
        for name, buf in model.named_buffers():
            if ".experts." not in name and buf.is_floating_point():
                buf.data = buf.data.to(self.device)
        self.reader.load_dense_into(model)
        return model.eval()

    def _build_runner(self) -> SequenceRunner:
        cfg, cache_cfg = self.config.model, self.config.cache
        num_kv_heads, k_dim, v_dim = cfg.kv_cache_spec
        # + 1: the runner keeps the last block as the sink for padding rows of captured steps
        cache = PagedKVCache(cfg.num_hidden_layers, cache_cfg.blocks_per_worker + 1, cache_cfg.block_size, num_kv_heads,
                             k_dim, v_dim, self.dtype, self.device)
        return SequenceRunner(self.model, cache, self.config.max_model_len, cfg.eos_token_ids, self.device,
                              seed=self.config.seed + self.rank, cuda_graphs=self._graphs_apply(),
                              max_num_seqs=cache_cfg.max_num_seqs)

    def _host_tier_setup(self) -> ColdPath | None:
        """The cold path of this worker's host tier (None: no host tier). On a GPU worker the host
        compute gets its share of the node's CPUs; the rates the auto path and the coordinator's
        tiering decide by are measured here, once, for this model's expert shape (about a second)."""
        tier = self.config.tier
        if getattr(self, "_staging_pool", None) is not None:
            self._staging_pool.close()  # a rebuilt tier (reconfigure) replaces it: its thread ends
            self._staging_pool = None
        self._split_trial = None
        if not tier.enabled or tier.device_slots_of(self.config.slots_per_worker) >= self.config.slots_per_worker:
            self.tier_rates_measured = None
            self.tier_set_up_for = self.config.parallel.num_workers
            return None
        if self.device.type == "cuda":
            torch.set_num_threads(host_threads(tier.host_threads, self.config.parallel.num_workers, tier.launch_thread))
        cfg = self.config.model
        self.tier_rates_measured = measure_rates(cfg.hidden_size, cfg.moe_intermediate_size, self.dtype, self.device)
        host_slots = self.config.slots_per_worker - tier.device_slots_of(self.config.slots_per_worker)
        # one for all layers; a CPU worker never threads its launches (they are its compute)
        self._staging_pool = StagingPool(min(tier.fetch_slots, host_slots), self.device,
                                         tier.launch_thread and self.device.type == "cuda")
        self.tier_set_up_for = self.config.parallel.num_workers  # threads and rates hold for this many workers
        self._split_trial = SplitTrial(seed=self.rank)  # one for all layers, as the pool
        return ColdPath(tier.cold_path, self.tier_rates_measured, tier.fetch_slots, tier.prefetch, tier.host_margin,
                        tier.learn_split, tier.split_trial)

    def tier_rates(self):
        """The measured TierRates of this worker's host tier (None without one), for the coordinator."""
        return self.tier_rates_measured

    def _slot_experts_of(self, layer: int, w13_SHD: torch.Tensor, w2_SDF: torch.Tensor) -> SlotExperts:
        """One MoE layer's experts module over these S_w slot weights (anywhere: the device slots
        are moved to the device, host-tier slots to host memory), under the current placement."""
        routing = self._routings[layer]
        budget = self.config.tier.device_slots_of(self.config.slots_per_worker)
        w13_BHD, w2_BDF, host = split_tiers(w13_SHD, w2_SDF, budget, self.device, self._cold_path,
                                            self._staging_pool if self._cold_path is not None else None, layer,
                                            self._split_trial if self._cold_path is not None else None)
        return SlotExperts(w13_BHD, w2_BDF, routing.slot_map, self.dispatcher, self.config.model.num_experts,
                           overlap_chunks=self.config.parallel.overlap_chunks, width_S=routing.width_S,
                           batch_split=routing.batch_split, host=host)

    def _routings_of(self, placement: Placement, device=None) -> list:
        """Every layer's slot map, slot widths and per-batch split units of `placement` here
        (on `device`, default this worker's)."""
        return layer_routings(placement, self.rank, self.config.model.moe_intermediate_size,
                              self.config.parallel.replica_split == "per_batch", self.device if device is None else device)

    def _slot_experts(self) -> list[SlotExperts]:
        return [block.experts for block in self.model.moe_blocks]

    # ---- group membership --------------------------------------------------------------------
    def open_rendezvous(self, group_name: str) -> str:
        return collective.open_rendezvous(group_name, self.config.parallel.collective_timeout_s)

    def join_group(self, spec: collective.GroupSpec) -> None:
        """Join this epoch's group and route every layer's exchange through it."""
        if self.group_name is not None:
            self.leave_group()
        collective.join_group(spec)
        self.group_name = spec.group_name
        self.dispatcher = AllToAllDispatcher(collective.get_group(spec.group_name), self.config.slots_per_worker)
        if self.device.type == "cuda":
            # Same rendezvous store, own communicator: migrations never interleave with the steps'
            # all-to-alls on one communicator (see moeray/comm/p2p.py).
            self.xfer_group = collective.create_group(dataclasses.replace(spec, group_name=spec.group_name + "-xfer"))
        for experts in self._slot_experts():
            experts.dispatcher = self.dispatcher

    def step_thread_free(self, timeout_s: float) -> bool:
        """Whether the step lock can be taken within timeout_s (Engine.recover's liveness probe)."""
        if not self._step_lock.acquire(timeout=timeout_s):
            return False
        self._step_lock.release()
        return True

    def placement_version(self) -> int:
        return self.placement.version

    def held_slots(self) -> np.ndarray:
        """[L, S_w] the expert each of this worker's slots holds whole now (-1: free, or a shard:
        a shard is no copy of its expert for another worker to start from)."""
        experts_LS = self.placement.slots_of_worker(self.rank)
        if not self.placement.is_sharded:
            return experts_LS
        lo = self.rank * self.placement.slots_per_worker
        whole_LS = self.placement.width_LS[:, lo:lo + self.placement.slots_per_worker] >= 1.0
        return np.where(whole_LS, experts_LS, -1)

    def discard_staging(self) -> None:
        """Drop a staged version (its coordinator died: it can never commit)."""
        self.staging.discard()

    def newest_version(self) -> int:
        """The newest placement version this worker ran or staged (a coordinator rebuilt after a
        death counts from above it, so no version is ever reused)."""
        return max(self.placement.version, self.staging.newest, self._announced_version)

    def _graphs_apply(self) -> bool:
        par = self.config.parallel
        # a host tier reads its row counts on the host every layer step: no graph can hold that
        return (par.cuda_graphs and self.device.type == "cuda" and par.num_workers == 1 and par.overlap_chunks == 1
                and self._cold_path is None)

    def resync_steps(self, step: int) -> None:
        """Start counting from the engine's step (after a recovery, a replacement starts at 0 and the
        coordinator pairs snapshots by step range); counts not yet shipped are dropped."""
        with self._step_lock:
            self.steps = step
            self._mark_shipped()

    def reset_membership(self) -> None:
        """After a peer died: drop the broken group and any staged (never to be committed) version.
        The live slots stay: they hold the committed placement."""
        self.staging.discard()
        self.leave_group()

    def leave_group(self) -> None:
        if self.xfer_group is not None:
            self.xfer_group.destroy_group()
            self.xfer_group = None
        if self.group_name is not None:
            collective.leave_group(self.group_name)
            self.group_name = None
            self.dispatcher = None  # no exchange until the next join_group (step() refuses meanwhile)

    # ---- serving -----------------------------------------------------------------------------
    def step(self, plan: StepPlan, version: int | None = None) -> StepResult:
        """One lockstep step of this worker's sequences (the plan may be empty: the worker still
        joins every MoE layer's exchange with zero rows).

        `version` is the placement version every worker runs this step with; a newer one than the
        current commits the staged migration first, so a step never mixes versions.
        """
        if self.dispatcher is None:
            raise RuntimeError(f"worker {self.rank}: no collective group joined yet")
        if self.loop is not None and self.loop.running:
            raise RuntimeError(f"worker {self.rank}: its own step loop is running; steps come from it")
        with self._step_lock:
            if version is not None and version != self.placement.version:
                self._commit(version)
            return self.run_step(plan)

    def run_step(self, plan: StepPlan) -> StepResult:
        """One step of the runner, counted; ships a snapshot every snapshot_interval steps. The
        caller holds the step lock."""
        result = self.runner.step(plan)
        self.steps += 1
        if self.coordinator is not None and self.steps - self._shipped_step >= self.snapshot_interval:
            self._ship_snapshot()
        return result

    # ---- the worker's own step loop (moeray/worker_loop.py) ---------------------------------------
    def start_loop(self, generation: int) -> None:
        """Step from this worker's own loop thread from now on (the driver sends messages).
        `generation` numbers the driver's loop starts: a message or drain of an earlier loop that
        Ray runs late (threaded actors run calls out of order) never reaches this one."""
        if self.dispatcher is None:
            raise RuntimeError(f"worker {self.rank}: no collective group joined yet")
        if self.loop is not None and self.loop.running:
            raise RuntimeError(f"worker {self.rank}: its step loop is already running")
        self.loop = WorkerLoop(self, generation)
        self.loop.start()

    def loop_submit(self, message: LoopMessage) -> None:
        if self.loop is None or message.generation != self.loop.generation:
            return  # for a loop that has ended: nothing may act on it
        self.loop.submit(message)

    def loop_drain(self, generation: int, timeout_s: float) -> LoopReport:
        if self.loop is None or generation != self.loop.generation:
            raise RuntimeError(f"worker {self.rank}: no step loop of generation {generation} runs")
        return self.loop.drain(timeout_s)

    def stop_loop(self, timeout_s: float) -> bool:
        """Leave the loop now, without the other workers (recovery, shutdown); True once it ended."""
        if self.loop is None:
            return True
        ended = self.loop.abandon(timeout_s)
        if ended:
            self.loop = None
        return ended

    def reset_sequences(self) -> None:
        with self._step_lock:
            self.runner.reset()

    def slot_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(w13_SHD, w2_SDF) of this worker's slots in one layer, for checks and migrations."""
        with self._step_lock:
            w13_SHD, w2_SDF = self._slot_experts()[layer].all_slot_weights()
            return w13_SHD.numpy(), w2_SDF.numpy()

    def memory_report(self) -> dict:
        """Resident memory against what this worker must hold: dense weights, its slots, its KV cache."""
        slot_bytes = dense_bytes = 0
        for name, param in self.model.named_parameters():
            size = param.numel() * param.element_size()
            if ".experts." in name:
                slot_bytes += size
            else:
                dense_bytes += size
        cache = self.runner.cache
        kv_bytes = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        hosts = [e.host for e in self._slot_experts() if e.host is not None]
        return {"rank": self.rank, "pid": os.getpid(), "rss_before_load": self._rss_before_load,
                "rss_now": resident_bytes(), "dense_bytes": dense_bytes, "slot_bytes": slot_bytes, "kv_bytes": kv_bytes,
                # the host tier: slots in (pinned) host memory, and the device staging slots of fetches
                "host_slot_bytes": sum(h.nbytes() for h in hosts), "staging_bytes": hosts[0].pool.nbytes() if hosts else 0}

    def ping(self) -> int:
        return self.rank

    def node_id(self) -> str:
        """The Ray node this worker runs on (the engine reads it once, for the planner's topology)."""
        return ray.get_runtime_context().get_node_id()
