"""The host tier's configuration (issue 13): how many of a worker's expert slots live in device
memory, how cold experts are served, and how the coordinator moves experts between the tiers.

A worker's local slots [0, device_slots) are in device memory and [device_slots, S_w) in host
memory (pinned on a GPU worker). On a CPU worker both are host memory and the budget only
decides which path computes a slot (the tests run every path that way).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class HostTierConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device_slots: int | None = Field(
        default=None, ge=0, strict=True,
        description="expert slots per MoE layer each worker keeps in device memory (at most: a worker with fewer "
                    "slots keeps all of them there); the rest of its slots live in host memory. None: every slot on "
                    "the device (no host tier)")
    cold_path: Literal["host", "fetch", "auto"] = Field(
        default="auto",
        description="how rows routed to a host-memory slot are computed: on the host beside the device (host), by "
                    "copying the expert's weights to a device staging slot on demand (fetch), or per slot and step, "
                    "whichever the measured rates predict is shorter (auto). On one H200, auto won Mixtral-sized "
                    "experts' decode and fetch (with live tiering) OLMoE's small experts (docs/benchmarks/tier.md)")
    tiering: Literal["live", "static"] = Field(
        default="live",
        description="live: the coordinator swaps hot host-memory experts into device slots from the routing "
                    "statistics (staged migrations); static: the experts stay in the slots the placement gave them")
    host_threads: int | None = Field(
        default=None, ge=1, strict=True,
        description="CPU threads of a GPU worker's host compute; None: the CPUs this process may run on, shared "
                    "by the workers, less one for the launch thread where launch_thread is on (a CPU worker uses "
                    "parallel.torch_threads_per_worker)")
    launch_thread: bool = Field(
        default=False, strict=True,
        description="a GPU worker queues a step's device launches (resident kernel, fetch rounds) on its own "
                    "thread while the calling thread computes the host slots. Off by default (the simpler path): "
                    "its one whole-run comparison on an H200 was confounded, and faster only for the isolated "
                    "layer step (docs/benchmarks/tier.md)")
    fetch_slots: int = Field(default=4, ge=1, strict=True,
                             description="device staging slots per round of on-demand fetches (two rounds in flight)")
    prefetch: bool = Field(
        default=False, strict=True,
        description="cold_path auto: each layer queues the next layer's likely fetches (one staging round of the "
                    "experts its recent routing touches almost surely) behind its own copies. Off by default: on one "
                    "H200 it cost up to 22% at decode and gained at most 3% at prefill (docs/benchmarks/tier.md)")
    host_margin: float = Field(
        default=0.1, ge=0, lt=1, allow_inf_nan=False,
        description="cold_path auto: a step leaves experts on the host only where the rates (measured, then "
                    "calibrated by the steps) predict it this fraction shorter than fetching them all (the host's "
                    "speed varies more than the copies')")
    learn_split: bool = Field(
        default=True, strict=True,
        description="cold_path auto: each layer times its own steps and weighs a split that leaves experts on the "
                    "host by how much longer than modelled such steps ran, against steps that fetched everything "
                    "(the rates alone miss how host math and launches share the CPU)")
    split_trial: bool = Field(
        default=False, strict=True,
        description="cold_path auto: where a layer's model proposes leaving experts on the host, the worker plays "
                    "that split or fetches everything, and keeps to whichever has run shorter against the model's "
                    "fetch-everything length of the same steps (trying the other now and then). Off by default: on "
                    "one H100 it learnt to fetch at OLMoE decode and to split at Mixtral's, and gained nothing over "
                    "playing every split (OLMoE 1.01x and 0.99x, two runs; Mixtral 0.96x: its learning steps; "
                    "docs/benchmarks/tier.md)")
    margin: float = Field(default=0.2, ge=0, allow_inf_nan=False,
                          description="a host-memory expert must carry (1 + margin) x the load of the device expert it replaces")
    max_swaps: int = Field(default=2, ge=1, strict=True, description="promotions per layer, worker and decision")
    cooldown_s: float = Field(default=5.0, ge=0, allow_inf_nan=False, description="between two tier changes")
    min_gain: float = Field(
        default=0.02, ge=0, allow_inf_nan=False,
        description="a tier change must shorten the modelled step (measured rates) by this fraction on some worker")
    payback_steps: float = Field(
        default=0.0, ge=0, allow_inf_nan=False,
        description="a worker's tier swaps must repay their PCIe copies (an expert each way) within this many "
                    "steps of the modelled gain; 0: no such check (not yet measured against the default)")

    @property
    def enabled(self) -> bool:
        return self.device_slots is not None

    def live(self, slots_per_worker: int) -> bool:
        """Whether the coordinator swaps experts between the tiers of workers with this many slots."""
        return self.tiering == "live" and self.device_slots_of(slots_per_worker) < slots_per_worker

    def device_slots_of(self, slots_per_worker: int) -> int:
        """Device slots per layer of a worker with `slots_per_worker` slots."""
        return slots_per_worker if self.device_slots is None else min(self.device_slots, slots_per_worker)
