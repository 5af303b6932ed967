"""Baselines: DeepSeek's EPLB (reimplemented from its published description) and static contiguous.

Legend (docs/architecture.md): L MoE layers (rows), E logical experts, S physical experts (slots,
EPLB's "replicas"), G expert groups, W GPUs (workers), X rows of a packing problem with n items
each (n: a count, not an axis letter). Nodes are spelled out (`num_nodes`).

EPLB in three steps (its README):
  Step 1  pack expert groups onto nodes so every node gets the same number of groups and the
          nodes' loads are balanced (greedy: heaviest group first, to the lightest non-full node);
  Step 2  inside each node, create replicas: repeatedly give one more replica to the expert with
          the largest load per replica;
  Step 3  pack the node's replicas (load = expert load / replica count) onto its GPUs with the
          same balanced packing.
Global policy = the hierarchical one with a single group and a single node.

Every step is vectorised over rows; ties break as a sequential loop would (first index wins),
so results are identical to the per-row reference (tests/unit/test_placement_eplb.py).
EPLB ignores the previous placement and may put two replicas of one expert on one GPU.
"""

from __future__ import annotations

import numpy as np

from placement.layout import Placement, Topology


def balanced_packing(weight_Xn: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n weighted items of each row into `num_packs` packs of n / num_packs items each.

    Items go in descending weight order (stable) to the lightest pack that still has room.
    Returns (pack_index_Xn, rank_in_pack_Xn), both int64.
    """
    weight_Xn = np.asarray(weight_Xn, dtype=np.float64)
    num_rows, num_items = weight_Xn.shape
    if num_items % num_packs:
        raise ValueError(f"{num_items} items do not split evenly into {num_packs} packs")
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_index = np.tile(np.arange(num_items, dtype=np.int64), (num_rows, 1))
        return pack_index, np.zeros_like(pack_index)
    order_Xn = np.argsort(-weight_Xn, axis=1, kind="stable")
    rows = np.arange(num_rows)
    pack_weight_XW = np.zeros((num_rows, num_packs))
    pack_items_XW = np.zeros((num_rows, num_packs), dtype=np.int64)
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    for k in range(num_items):
        item_X = order_Xn[:, k]
        masked_XW = np.where(pack_items_XW < items_per_pack, pack_weight_XW, np.inf)
        pack_X = np.argmin(masked_XW, axis=1)
        pack_index[rows, item_X] = pack_X
        rank_in_pack[rows, item_X] = pack_items_XW[rows, pack_X]
        pack_weight_XW[rows, pack_X] += weight_Xn[rows, item_X]
        pack_items_XW[rows, pack_X] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight_Xn: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn n logical experts into `num_physical` replicas, minimising the max load per replica.

    Returns phy2log_XS (logical expert of each replica), rank_XS (replica index of its expert)
    and logcnt_Xn (replicas per logical expert).
    """
    weight_Xn = np.asarray(weight_Xn, dtype=np.float64)
    num_rows, num_logical = weight_Xn.shape
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical experts cannot hold {num_logical} logical experts")
    rows = np.arange(num_rows)
    phy2log = np.tile(np.arange(num_physical, dtype=np.int64), (num_rows, 1))
    rank = np.zeros((num_rows, num_physical), dtype=np.int64)
    logcnt = np.ones((num_rows, num_logical), dtype=np.int64)
    for phy in range(num_logical, num_physical):
        hottest_X = np.argmax(weight_Xn / logcnt, axis=1)
        phy2log[:, phy] = hottest_X
        rank[:, phy] = logcnt[rows, hottest_X]
        logcnt[rows, hottest_X] += 1
    return phy2log, rank, logcnt


def _inverse(perm_Xn: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm_Xn)
    np.put_along_axis(inv, perm_Xn, np.broadcast_to(np.arange(perm_Xn.shape[1]), perm_Xn.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight_LE: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's hierarchical policy. Returns (phy2log_LS, rank_LS, logcnt_LE)."""
    weight_LE = np.asarray(weight_LE, dtype=np.float64)
    num_layers, num_logical = weight_LE.shape
    if num_logical % num_groups or num_groups % num_nodes or num_gpus % num_nodes:
        raise ValueError(f"E={num_logical}, groups={num_groups}, nodes={num_nodes}, gpus={num_gpus} do not nest")
    if num_physical % num_gpus:
        raise ValueError(f"{num_physical} physical experts do not split over {num_gpus} GPUs")
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical // num_gpus
    log_per_node = num_logical // num_nodes

    # Step 1: pack groups onto nodes; "mlog" numbers experts node by node.
    tokens_per_group_LG = weight_LE.reshape(num_layers, num_groups, group_size).sum(axis=2)
    group_pack_LG, group_rank_LG = balanced_packing(tokens_per_group_LG, num_nodes)
    log2mlog_LE = (
        ((group_pack_LG * groups_per_node + group_rank_LG) * group_size)[:, :, None] + np.arange(group_size)
    ).reshape(num_layers, num_logical)
    mlog2log_LE = _inverse(log2mlog_LE)

    # Step 2: replicas inside each node (rows = layer x node).
    tokens_per_mlog = np.take_along_axis(weight_LE, mlog2log_LE, axis=1).reshape(-1, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes)

    # Step 3: pack each node's replicas onto its GPUs.
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, axis=1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    node_offset = np.arange(0, num_logical, log_per_node)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + node_offset).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log_LE, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog_LE, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB entry point. Hierarchical when groups divide over nodes, else global.

    Returns (phy2log_LS, log2phy_LER -1 padded, logcnt_LE).
    """
    weight_LE = np.asarray(weight_LE, dtype=np.float64)
    num_layers, num_logical = weight_LE.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight_LE, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight_LE, num_replicas, 1, 1, num_gpus)
    max_replicas = num_replicas - num_logical + 1
    log2phy = np.full((num_layers, num_logical, max_replicas), -1, dtype=np.int64)
    layer_idx = np.repeat(np.arange(num_layers), num_replicas)
    log2phy[layer_idx, phy2log.ravel(), phyrank.ravel()] = np.tile(np.arange(num_replicas), num_layers)
    return phy2log, log2phy, logcnt


def eplb_placement(
    load_LE: np.ndarray, topology: Topology, hierarchical: bool = False, num_groups: int | None = None
) -> Placement:
    """EPLB's plan as a Placement filling every slot. Global unless `hierarchical`, which packs
    `num_groups` expert groups onto nodes (default: `default_num_groups`).

    May break the no-duplicate-on-one-worker invariant (EPLB's own behaviour); not validated here.
    """
    load_LE = np.asarray(load_LE, dtype=np.float64)
    num_experts = load_LE.shape[1]
    if hierarchical:
        groups = num_groups or default_num_groups(num_experts, topology.num_nodes)
        phy2log, _, _ = rebalance_experts_hierarchical(
            load_LE, topology.num_slots, groups, topology.num_nodes, topology.num_workers
        )
    else:
        phy2log, _, _ = rebalance_experts_hierarchical(load_LE, topology.num_slots, 1, 1, topology.num_workers)
    return Placement(phy2log, num_experts, topology.slots_per_worker)


def default_num_groups(num_experts: int, num_nodes: int) -> int:
    """Smallest multiple of `num_nodes` that divides E, at least 8 when possible (DeepSeek-V3: 8)."""
    for groups in range(max(num_nodes, 8), num_experts + 1):
        if groups % num_nodes == 0 and num_experts % groups == 0:
            return groups
    for groups in range(num_nodes, num_experts + 1):
        if groups % num_nodes == 0 and num_experts % groups == 0:
            return groups
    raise ValueError(f"no group count nests {num_experts} experts into {num_nodes} nodes")


def static_placement(num_layers: int, num_experts: int, topology: Topology) -> Placement:
    """Contiguous baseline: expert e on worker e // (E / W); any extra slots stay free."""
    return Placement.contiguous(num_layers, num_experts, topology.num_workers, topology.slots_per_worker)
