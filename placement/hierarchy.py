"""Cost model: does hierarchical (node-local) placement pay on a given cluster?

Legend: L MoE layers, E logical experts, W workers, K top-k; n is the number of nodes (a count).

Hierarchical placement packs expert groups onto nodes (every group on one node) and balances
inside each node; global placement balances over all workers. With group-limited routing
(each token's top-k experts lie in at most `groups_per_token` groups, as in DeepSeek-V3) and
dispatch that sends a token once per destination node, a token crosses to
    global:        (n - 1) * (1 - (1 - 1/n) ** top_k)           other nodes on average,
    hierarchical:  (n - 1) * (1 - (1 - 1/n) ** groups_per_token)
(experts, resp. groups, land on uniformly random nodes). Step time per MoE layer is modelled as
    compute = imbalance * tokens * top_k / W * expert_us_per_token      (the busiest worker)
    network = 2 * tokens / n * remote_nodes * token_bytes / inter_node_bandwidth   (dispatch + combine)
and hierarchical pays when its compute + network is lower. It trades a little balance (smaller
bins) for less inter-node traffic, so it pays on slow inter-node links and large hidden sizes.
`ClusterCostModel.measured` takes the per-pair compute from the measured kernel rates and the
inter-node bandwidth from the topology (else placement.cost's documented default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.layout import Topology


@dataclass(frozen=True)
class ClusterCostModel:
    tokens_per_step: int = 16_384  # tokens in one step over the whole group
    top_k: int = 8
    groups_per_token: int = 4
    token_bytes: int = 7168  # hidden size x bytes per element of the dispatched activation
    inter_node_gbps: float = 50.0  # GB/s per node (e.g. 400 Gb/s InfiniBand)
    expert_us_per_token: float = 0.05  # compute per (token, expert) pair on one worker

    @classmethod
    def measured(cls, shape, topology: Topology, tokens_per_step: int, groups_per_token: int = 4) -> ClusterCostModel:
        """Inputs from placement.cost: compute per pair at the measured flops rate (compute-bound
        rows; the tile overhead is per slot, not per pair), activation bytes of `shape`, and the
        topology's inter-node GB/s or the cost model's default."""
        from placement.cost import KernelRates, LinkRates

        inter = topology.inter_node_gbps or LinkRates().inter_node_bytes_per_s / 1e9
        return cls(tokens_per_step=tokens_per_step, top_k=shape.top_k, groups_per_token=groups_per_token,
                   token_bytes=int(shape.row_bytes), inter_node_gbps=float(inter),
                   expert_us_per_token=shape.flops_per_row / KernelRates().flops_per_s * 1e6)


@dataclass(frozen=True)
class HierarchyVerdict:
    pays: bool
    global_us: float  # modelled time per MoE layer
    hierarchical_us: float
    global_imbalance: float  # mean over layers
    hierarchical_imbalance: float


def remote_nodes_per_token(num_nodes: int, spread: int) -> float:
    """Expected other nodes a token reaches when its `spread` destinations pick nodes uniformly."""
    return (num_nodes - 1) * (1 - (1 - 1 / num_nodes) ** spread)


def layer_time_us(mean_imbalance: float, remote_nodes: float, topology: Topology, model: ClusterCostModel) -> float:
    compute = mean_imbalance * model.tokens_per_step * model.top_k / topology.num_workers * model.expert_us_per_token
    network_bytes = 2 * model.tokens_per_step / topology.num_nodes * remote_nodes * model.token_bytes
    return compute + network_bytes / (model.inter_node_gbps * 1e3)  # GB/s = 1e3 bytes/us


def hierarchical_pays(
    load_LE: np.ndarray, topology: Topology, model: ClusterCostModel = ClusterCostModel(), num_groups: int | None = None
) -> HierarchyVerdict:
    """Plan both ways with our planner and compare modelled layer times."""
    from placement.planner import PlannerOptions, plan

    groups = num_groups or topology.num_nodes
    flat = plan(load_LE, topology, options=PlannerOptions(hierarchical=False)).predicted_imbalance_LAYERS.mean()
    nested = plan(
        load_LE, topology, options=PlannerOptions(hierarchical=True, num_groups=groups)
    ).predicted_imbalance_LAYERS.mean()
    spread_global = model.top_k
    spread_nested = min(model.groups_per_token, model.top_k)
    t_global = layer_time_us(float(flat), remote_nodes_per_token(topology.num_nodes, spread_global), topology, model)
    t_nested = layer_time_us(float(nested), remote_nodes_per_token(topology.num_nodes, spread_nested), topology, model)
    return HierarchyVerdict(t_nested < t_global, t_global, t_nested, float(flat), float(nested))
