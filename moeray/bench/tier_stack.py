"""The layer stack `moeray bench tier` runs (issue 13): L SlotExperts layers of one shape with a
host tier at one budget, reset per mode to a placement and a cold path, and the live tiering
between its steps (the coordinator's TierControl, in this process). The modes are in
moeray.bench.tier's docstring."""

from __future__ import annotations

import time

import numpy as np
import torch

from moeray.tier_config import HostTierConfig
from moeray.tier_counts import tier_totals

# mode: (its host slots' cold path, tiered from live statistics); "all" has no host slots
MODE_PATHS = {"all": ("host", False), "fetch": ("fetch", False), "host": ("host", False), "profiled": ("host", False),
              "ours": ("auto", True), "ours_no_prefetch": ("auto", True), "ours_unlearnt": ("auto", True),
              "ours_trial": ("auto", True),
              "fetch_live": ("fetch", True)}
MODES = tuple(MODE_PATHS)
AUTO_MODES = tuple(m for m, (cold, _) in MODE_PATHS.items() if cold == "auto")
HOST_MARGIN = HostTierConfig.model_fields["host_margin"].default  # the engine's default


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stack:
    """L SlotExperts layers over one set of random weights, rebuilt per budget; `reset` puts every
    layer back to a given placement (slot writes, as a commit does) and cold path."""

    def __init__(self, w13_LEHD, w2_LEDF, budget: int, rates, fetch_slots: int, device: torch.device,
                 host_margin: float = HOST_MARGIN, launch: str = "inline", switch_interval_s: float | None = None):
        from moeray.comm.dispatcher import LocalDispatcher
        from moeray.comm.slot_map import DeviceSlotMap
        from moeray.expert_parallel import SlotExperts
        from moeray.host_tier import ColdPath, split_tiers
        from moeray.tier_staging import StagingPool
        from placement import Placement

        self.cuda = device
        self.w13_LEHD, self.w2_LEDF = w13_LEHD, w2_LEDF  # host masters
        L, E = len(w13_LEHD), w13_LEHD[0].shape[0]
        self.budget, self.rates, self.fetch_slots, self.host_margin = budget, rates, fetch_slots, host_margin
        self.placement = Placement(np.tile(np.arange(E), (L, 1)), E, E)
        path = ColdPath("host", None, fetch_slots)
        # one for all layers, as on a worker; launch "thread": tier.launch_thread
        pool = StagingPool(max(1, min(fetch_slots, E - budget)), device, launch == "thread" and device.type == "cuda")
        if pool.threaded and switch_interval_s is not None:
            pool.launch_thread().switch_interval_s = switch_interval_s
        self.pool = pool
        self.layers = []
        for layer in range(L):
            w13_BHD, w2_BDF, host = split_tiers(w13_LEHD[layer], w2_LEDF[layer], budget, self.cuda,
                                                path if budget < E else None, pool, layer)
            self.layers.append(SlotExperts(w13_BHD, w2_BDF, DeviceSlotMap.from_placement(self.placement, layer, self.cuda),
                                           LocalDispatcher(E), E, host=host))

    def reset(self, phy2log_LS: np.ndarray, mode: str) -> None:
        from moeray.comm.slot_map import DeviceSlotMap
        from moeray.host_tier import ColdPath
        from moeray.tier_calibration import SplitTrial
        from placement import Placement

        E = self.placement.num_experts
        self.placement = Placement(np.asarray(phy2log_LS), E, E)
        trial = SplitTrial()  # one for all layers (a worker's), learnt afresh each run
        for layer, experts in enumerate(self.layers):
            for slot, expert in enumerate(self.placement.phy2log[layer]):
                experts.write_slot(slot, self.w13_LEHD[layer][expert], self.w2_LEDF[layer][expert])
            experts.slot_map = DeviceSlotMap.from_placement(self.placement, layer, self.cuda)
            experts.load_E.zero_()
            if experts.host is not None:
                cold = MODE_PATHS[mode][0]
                experts.host.path = ColdPath(cold, self.rates if cold == "auto" else None, self.fetch_slots,
                                             prefetch=mode == "ours", host_margin=self.host_margin,
                                             learn_split=mode != "ours_unlearnt", split_trial=mode == "ours_trial")
                experts.host.trial = trial
        sync(self.cuda)


class LiveTiers:
    """The coordinator's tier control in this process: decayed routing counts in, slot swaps out."""

    def __init__(self, stack: Stack, args, rates, cold_path: str = "auto"):
        from moeray.tier_control import TierControl
        from placement.stats import DecayedLoad

        E = stack.placement.num_experts
        config = HostTierConfig(device_slots=stack.budget, cold_path=cold_path, tiering="live", margin=args.margin,
                                max_swaps=args.max_swaps, cooldown_s=0.0, min_gain=0.02, fetch_slots=args.fetch_slots,
                                payback_steps=args.payback_steps)
        self.stack, self.control = stack, TierControl(config, E, rates=rates)
        self.recent = DecayedLoad(2.0 * args.check_every)
        self.last_LE = np.zeros((len(stack.layers), E), dtype=np.int64)
        self.last_totals = {}  # the layers' tier counts at the last decision (a worker's shipped snapshot)
        self.swaps, self.swap_s = 0, 0.0

    def after(self, steps: int, now: float) -> None:
        from moeray.comm.slot_map import DeviceSlotMap
        from placement.migration import migration_between

        start = time.perf_counter()
        load_LE = torch.stack([e.load_E for e in self.stack.layers]).cpu().numpy()  # host sync
        self.recent = self.recent.update(load_LE - self.last_LE, steps=steps)
        self.last_LE = load_LE
        totals = tier_totals([e.host for e in self.stack.layers if e.host is not None])
        self.control.observe(0, {k: v - self.last_totals.get(k, 0) for k, v in totals.items()})  # as a snapshot's range
        self.last_totals = totals
        current = self.stack.placement
        new = self.control.decide(current, self.recent.load_LE, self.recent.effective_steps, now)
        if new is None:
            return
        mig = migration_between(current, new)
        # every source read before any slot is written: a swap reads both slots first
        sources = [(int(layer), int(dst), tuple(t.to(self.stack.cuda, copy=True) for t in
                                                self.stack.layers[layer].slot_weights(int(src))))
                   for layer, dst, src in zip(mig.layer, mig.dst_slot, mig.src_slot)]
        for layer, dst, (w13_HD, w2_DF) in sources:
            self.stack.layers[layer].write_slot(dst, w13_HD, w2_DF)
        self.stack.placement = new
        for layer, experts in enumerate(self.stack.layers):
            experts.slot_map = DeviceSlotMap.from_placement(new, layer, self.stack.cuda)
        sync(self.stack.cuda)
        self.swaps += mig.num_copies // 2
        self.swap_s += time.perf_counter() - start
