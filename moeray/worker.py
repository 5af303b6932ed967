"""The worker: one per device. Owns the dense weights, its expert slots, and its group membership.

`Worker` is a plain class (unit-testable without Ray); the engine wraps it with `ray.remote`.
Legend: T local tokens, V vocab, L layers, E experts, S slots in the group, S_w local slots.
"""

from __future__ import annotations

import numpy as np
import torch

from moeray.comm import group as collective
from moeray.comm.dispatcher import AllToAllDispatcher, LocalDispatcher
from moeray.comm.slot_map import DeviceSlotMap
from moeray.config import EngineConfig
from moeray.expert_parallel import SlotExperts
from moeray.models.checkpoint import CheckpointReader
from moeray.models.moe_model import MoEModel
from placement import Placement


class Worker:
    def __init__(self, rank: int, config: EngineConfig, checkpoint_dir: str, phy2log_LS: np.ndarray, version: int = 0):
        torch.set_num_threads(config.parallel.torch_threads_per_worker)
        collective.register_backends()
        self.rank = rank
        self.config = config
        self.device = torch.device("cuda", torch.cuda.current_device()) if config.parallel.device == "cuda" else torch.device("cpu")
        self.reader = CheckpointReader(checkpoint_dir)
        if self.reader.cfg != config.model:
            raise ValueError(f"checkpoint {checkpoint_dir} holds model {self.reader.cfg}, config asks for {config.model}")
        self.dtype = getattr(torch, config.model.dtype)
        self.placement = Placement(phy2log_LS, config.model.num_experts, config.slots_per_worker, version).validate()
        self.group_name: str | None = None
        self.dispatcher = LocalDispatcher(self.placement.num_slots) if self.placement.num_workers == 1 else None
        self.model = self._build_model()
        self.steps = 0

    # ---- construction ------------------------------------------------------------------------
    def _build_model(self) -> MoEModel:
        cfg = self.config.model
        mine_LS = self.placement.slots_of_worker(self.rank)

        def experts_factory(layer: int) -> SlotExperts:
            w13, w2 = self.reader.read_expert_slots(layer, mine_LS[layer], self.dtype)
            return SlotExperts(
                w13.to(self.device), w2.to(self.device), self._slot_map(layer), self.dispatcher, cfg.num_experts
            )

        model = MoEModel(cfg, experts_factory)
        # Dense parameters were allocated by the constructor; fill them from the checkpoint.
        for name, param in model.named_parameters():
            if ".experts." not in name:
                param.data = param.data.to(self.device, self.dtype)
        self.reader.load_dense_into(model)
        return model.eval()

    def _slot_map(self, layer: int) -> DeviceSlotMap:
        return DeviceSlotMap.from_numpy(self.placement.log2phy[layer], self.placement.num_slots, device=self.device)

    def _slot_experts(self) -> list[SlotExperts]:
        return [layer.experts for layer in self.model.layers]

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
        for experts in self._slot_experts():
            experts.dispatcher = self.dispatcher

    def leave_group(self) -> None:
        if self.group_name is not None:
            collective.leave_group(self.group_name)
            self.group_name = None

    # ---- serving -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, input_ids_T: np.ndarray) -> np.ndarray:
        """One lockstep forward of this worker's share of the batch (may be empty) -> logits [T, V]."""
        if self.dispatcher is None:
            raise RuntimeError(f"worker {self.rank}: no collective group joined yet")
        ids_T = torch.as_tensor(np.array(input_ids_T, dtype=np.int64), device=self.device)  # writable copy
        logits_TV = self.model(ids_T)
        self.steps += 1
        return logits_TV.cpu().numpy()

    def load_counts(self, reset: bool = False) -> np.ndarray:
        """[L, E] pairs routed by this worker's tokens since the last reset (one host sync)."""
        experts = self._slot_experts()
        counts_LE = torch.stack([e.load_E for e in experts]).cpu().numpy()
        if reset:
            for e in experts:
                e.load_E.zero_()
        return counts_LE

    def slot_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(w13_SHD, w2_SDF) of this worker's slots in one layer, for checks and migrations."""
        experts = self._slot_experts()[layer]
        return experts.w13_SHD.detach().cpu().numpy(), experts.w2_SDF.detach().cpu().numpy()

    def ping(self) -> int:
        return self.rank
