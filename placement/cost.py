"""Cost model: the predicted time of one step for a layout, from measured kernel and link rates.

Legend (docs/architecture.md): X any number of rows ((batch, layer) pairs), L layers,
S slots (S_w per worker), W workers, T tokens in the step (whole group), K top-k, D hidden size,
F expert FFN width.

Per MoE layer (bulk-synchronous: each phase ends when its slowest worker does):
    compute_w  = max(floor, sum over w's slots with rows of
                     width * max((rows + tile_rows) * 6 D F / flops_rate, 3 D F * weight_bytes / hbm_rate)
                     + slot_s)
    exchange_w = latency + max over link classes of max(bytes sent, bytes received) / bandwidth
    layer      = max_w exchange_w (dispatch) + max_w compute_w + max_w exchange_w (combine: the same
                 rows back, sends and receives swapped)
    step       = sum over the MoE layers.
A shard of width w does w of its rows' flops and streams w of the expert's weights, so both terms
scale with the width. `tile_rows` is the measured cost of a touched slot beyond its rows (tile
padding: scales with the width); `slot_s` the fixed cost of a touched slot whatever its width (a
host loop over slots: the CPU reference; 0 in the GPU table); the weight term is the
memory-bound regime (small batches).

`layer_phases` is the fuller layer the CPU-mode bench checks (`moeray bench cost`): besides the
above, the counts exchange before the rows (one more latency), the host work of the layer beyond
the kernel and the exchanges (`HostRates`: sort, gathers, the weighted combine, the token sum;
fixed + per row, measured on the node's workers together), and workers of one node that share
fewer cores than they are (`parallel_workers`: the CPU mode, W processes on one machine): the
kernel phase, in which every worker is busy at once and whose rates come from one process alone,
then finishes as under processor sharing (m busy workers each run at min(1, parallel_workers / m)
of their speed). The planner's comparisons (placement.sharding) use `layer_seconds` without these.

Exchange rows: tokens are spread evenly over workers (data-parallel attention). A worker computing
`pairs` of the step's T * K (token, k) pairs receives each of their tokens once (`dedup_tokens`:
the dispatch of DeepEP and MoEShard; expected distinct tokens T (1 - (1 - pairs / (T K)) ** K) for
independent picks) or once per pair (moeray's AllToAllDispatcher today). Of what a worker receives,
(W_n - 1) / W comes over its node's links, (W - W_n) / W over inter-node links (W_n workers per node).

Measured inputs (the `source` fields name them): kernel rates fitted to docs/benchmarks/kernel-h200.json
and kernel-deepseek-sweep.json (one H200); intra-node bandwidth and latency fitted to
docs/benchmarks/exchange.json (2 x H200, NVLink). Inter-node bandwidth is NOT measured here (no
multi-node machine): 45 GB/s per GPU, DeepEP's published 43-58 GB/s on H800 + ConnectX-7 400 Gb/s.
`fit_kernel_rates` / `fit_link_rates` re-derive the tables from the bench JSON (tests keep them in step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placement.layout import Topology


@dataclass(frozen=True)
class ExpertShape:
    """One model's expert: hidden D, FFN width F, top-k, bytes per weight and per activation."""

    name: str
    hidden: int
    ffn: int
    top_k: int
    weight_bytes: float = 2.0  # bf16, as the kernel bench
    act_bytes: float = 2.0

    @property
    def flops_per_row(self) -> float:
        return 6.0 * self.hidden * self.ffn  # gate + up (2 x D x 2F) and down (2 x F x D)

    @property
    def expert_bytes(self) -> float:
        return 3.0 * self.hidden * self.ffn * self.weight_bytes

    @property
    def row_bytes(self) -> float:
        return self.hidden * self.act_bytes


SHAPES = {  # the traces' models (config.json of each checkpoint)
    "deepseek-v3": ExpertShape("deepseek-v3", 7168, 2048, 8),
    "olmoe": ExpertShape("olmoe", 2048, 1024, 8),
    "mixtral-8x7b": ExpertShape("mixtral-8x7b", 4096, 14336, 2),
}


@dataclass(frozen=True)
class KernelRates:
    flops_per_s: float = 565e12
    tile_rows: float = 130.0
    weight_bytes_per_s: float = 3.9e12
    floor_s: float = 46e-6
    source: str = ("fit (fit_kernel_rates) to docs/benchmarks/kernel-h200.json (mixtral/olmoe/qwen3, T=16..16384, impl auto) "
                   "and kernel-deepseek-sweep.json (DeepSeek-V3 EP2 T=4096/16384, triton), one H200; floor: T=1 cases "
                   "(launch-bound, 46-49 us)")
    slot_s: float = 0.0  # seconds per touched slot, not scaled by width (placement.cost_fit fits it)


@dataclass(frozen=True)
class LinkRates:
    intra_node_bytes_per_s: float = 297e9
    inter_node_bytes_per_s: float = 45e9
    latency_s: float = 23e-6
    source: str = ("intra-node and latency: fit (fit_link_rates) to docs/benchmarks/exchange.json (2 x H200 NVLink, ours "
                   "all-to-all 64 KiB..512 MiB); inter-node: not measured, DeepEP docs (H800 + CX7 400 Gb/s, 43-58 GB/s)")


@dataclass(frozen=True)
class HostRates:
    """A worker's host work per MoE layer beyond the kernel and the exchanges: fixed + per row."""

    fixed_s: float = 0.0
    per_row_s: float = 0.0
    source: str = "not measured (0): the planner's comparisons leave the layer's host work out"


@dataclass(frozen=True)
class StepCostModel:
    shape: ExpertShape
    kernel: KernelRates = KernelRates()
    links: LinkRates = LinkRates()
    dedup_tokens: bool = True
    host: HostRates = HostRates()
    parallel_workers: float | None = None  # workers of a node that run at full speed at once; None: all

    # ---- compute ---------------------------------------------------------------------------------
    def slot_seconds(self, rows_XS: np.ndarray, width_XS) -> np.ndarray:
        """[X, S] kernel time of each slot (0 for slots without rows)."""
        rows_XS = np.asarray(rows_XS, dtype=np.float64)
        compute = (rows_XS + self.kernel.tile_rows) * (self.shape.flops_per_row / self.kernel.flops_per_s)
        stream = self.shape.expert_bytes / self.kernel.weight_bytes_per_s
        return np.where(rows_XS > 0, np.asarray(width_XS) * np.maximum(compute, stream) + self.kernel.slot_s, 0.0)

    def compute_seconds(self, rows_XS: np.ndarray, width_XS, slots_per_worker: int) -> np.ndarray:
        """[X, W] expert-kernel time of each worker (one grouped launch over its slots)."""
        per_slot = self.slot_seconds(rows_XS, width_XS)
        per_worker = per_slot.reshape(*per_slot.shape[:-1], -1, slots_per_worker).sum(axis=-1)
        return np.maximum(per_worker, self.kernel.floor_s)

    # ---- exchange --------------------------------------------------------------------------------
    def received_rows(self, pairs_XW: np.ndarray, tokens: int) -> np.ndarray:
        """[X, W] rows each worker receives for the pairs it computes (see the module docstring)."""
        pairs_XW = np.asarray(pairs_XW, dtype=np.float64)
        if not self.dedup_tokens or tokens <= 0:
            return pairs_XW
        top_k = self.shape.top_k
        fraction = np.clip(pairs_XW / (tokens * top_k), 0.0, 1.0)
        return np.minimum(pairs_XW, tokens * (1.0 - (1.0 - fraction) ** top_k))

    def exchange_seconds(self, pairs_XW: np.ndarray, tokens: int, topology: Topology) -> np.ndarray:
        """[X, W] time of one exchange (dispatch, or combine) for each worker."""
        rows_XW = self.received_rows(pairs_XW, tokens)
        num_workers, per_node = topology.num_workers, topology.workers_per_node
        intra_bw = (topology.intra_node_gbps * 1e9) if topology.intra_node_gbps else self.links.intra_node_bytes_per_s
        inter_bw = (topology.inter_node_gbps * 1e9) if topology.inter_node_gbps else self.links.inter_node_bytes_per_s
        node_XN = rows_XW.reshape(*rows_XW.shape[:-1], topology.num_nodes, per_node).sum(axis=-1)
        node_total_XW = np.repeat(node_XN, per_node, axis=-1)
        all_total_X1 = rows_XW.sum(axis=-1, keepdims=True)
        # a worker's rows come evenly from every worker; it sends each worker its share of that worker's rows
        recv_intra, recv_inter = rows_XW * (per_node - 1) / num_workers, rows_XW * (num_workers - per_node) / num_workers
        send_intra, send_inter = (node_total_XW - rows_XW) / num_workers, (all_total_X1 - node_total_XW) / num_workers
        row_bytes = self.shape.row_bytes
        intra = np.maximum(recv_intra, send_intra) * row_bytes / intra_bw
        inter = np.maximum(recv_inter, send_inter) * row_bytes / inter_bw
        return self.links.latency_s + np.maximum(intra, inter)

    # ---- a layer, a step --------------------------------------------------------------------------
    @staticmethod
    def layer_seconds(compute_XW: np.ndarray, exchange_XW: np.ndarray) -> np.ndarray:
        """[X] layer time: dispatch, compute, combine, each as slow as its slowest worker."""
        return compute_XW.max(axis=-1) + 2.0 * exchange_XW.max(axis=-1)

    @staticmethod
    def mean_worker_seconds(compute_XW: np.ndarray, exchange_XW: np.ndarray) -> np.ndarray:
        """[X] what the layer would take if every worker did the mean worker's work (perfect balance)."""
        return compute_XW.mean(axis=-1) + 2.0 * exchange_XW.mean(axis=-1)

    def shared_seconds(self, work_XW: np.ndarray, workers_per_node: int) -> np.ndarray:
        """[X, W] when each worker ends `work_XW` (its seconds alone) if a node's workers run it at
        once on `parallel_workers` workers' worth of cores, shared equally (processor sharing)."""
        work_XW = np.asarray(work_XW, dtype=np.float64)
        parallel = self.parallel_workers
        if parallel is None or parallel >= workers_per_node:
            return work_XW
        node = work_XW.reshape(*work_XW.shape[:-1], -1, workers_per_node)  # [X, nodes, W_n]
        order = np.argsort(node, axis=-1, kind="stable")
        sorted_work = np.take_along_axis(node, order, axis=-1)
        step = np.diff(sorted_work, axis=-1, prepend=0.0)  # work done between two workers' ends
        busy = workers_per_node - np.arange(workers_per_node)  # workers still busy in each interval
        ends = np.cumsum(step * np.maximum(1.0, busy / parallel), axis=-1)
        out = np.empty_like(node)
        np.put_along_axis(out, order, ends, axis=-1)
        return out.reshape(work_XW.shape)

    def host_seconds(self, sent_XW: np.ndarray, received_XW: np.ndarray) -> np.ndarray:
        """[X, W] host work of each worker: fixed + per row of the mean of rows sent and received."""
        rows_XW = (np.asarray(sent_XW, dtype=np.float64) + np.asarray(received_XW, dtype=np.float64)) / 2
        return self.host.fixed_s + self.host.per_row_s * rows_XW

    def layer_phases(self, rows_XS: np.ndarray, width_XS, slots_per_worker: int, tokens: int,
                     topology: Topology) -> dict:
        """{phase: [X] seconds} of one layer: compute (shared cores), exchange (the counts' latency +
        rows there and back), host, total. Tokens are spread evenly: each worker sends 1/W of the rows."""
        pairs_XW = np.asarray(rows_XS, dtype=np.float64).reshape(*np.shape(rows_XS)[:-1], -1, slots_per_worker).sum(-1)
        received_XW = self.received_rows(pairs_XW, tokens)
        sent_XW = np.broadcast_to(received_XW.mean(axis=-1, keepdims=True), received_XW.shape)
        per_node = topology.workers_per_node
        compute = self.shared_seconds(self.compute_seconds(rows_XS, width_XS, slots_per_worker), per_node).max(axis=-1)
        exchange = self.links.latency_s + 2.0 * self.exchange_seconds(pairs_XW, tokens, topology).max(axis=-1)
        host = self.host_seconds(sent_XW, received_XW).max(axis=-1)
        return {"compute": compute, "exchange": exchange, "host": host, "total": compute + exchange + host}

    def memory_bytes(self, width_LS: np.ndarray, slots_per_worker: int) -> np.ndarray:
        """[L, W] expert weight bytes each worker holds (a shard holds its width of the expert)."""
        width_LS = np.asarray(width_LS, dtype=np.float64)
        return width_LS.reshape(width_LS.shape[0], -1, slots_per_worker).sum(axis=2) * self.shape.expert_bytes


# ---- the measured tables and the fits --------------------------------------------------------------


@dataclass(frozen=True)
class KernelCase:
    name: str
    tokens: int
    hidden: int
    ffn: int
    top_k: int
    touched: int  # slots with rows (uniform routing: rows per touched slot = tokens * top_k / touched)
    seconds: float


def kernel_cases(paths) -> list[KernelCase]:
    """Every measured case of the kernel bench JSON files (impl auto, else triton)."""
    cases = []
    for path in paths:
        for case in json.loads(Path(path).read_text())["cases"]:
            impl = case["impls"].get("auto") or case["impls"]["triton"]
            cases.append(KernelCase(case["shape"], case["T"], case["D"], case["F"], case["K"], case["touched"], impl["ms"] * 1e-3))
    return cases


def predict_kernel_case(case: KernelCase, rates: KernelRates) -> float:
    shape = ExpertShape(case.name, case.hidden, case.ffn, case.top_k)
    rows = np.full((1, case.touched), case.tokens * case.top_k / case.touched)
    model = StepCostModel(shape, rates)
    return float(model.compute_seconds(rows, 1.0, case.touched)[0, 0])


def fit_kernel_rates(cases: list[KernelCase]) -> KernelRates:
    """Grid fit of flops rate (5 TFLOP/s steps), tile rows (5) and HBM rate (0.1 TB/s) minimising the
    mean |log(predicted / measured)| over the cases with T > 1; the floor is the fastest T = 1
    case (launch-bound). Vectorised over the grid: the same formula as `StepCostModel.slot_seconds`."""
    floor = min(c.seconds for c in cases if c.tokens == 1)
    fitted = [c for c in cases if c.tokens > 1]
    flops = np.arange(450e12, 650e12 + 1, 5e12)[:, None, None, None]
    tile = np.arange(0.0, 301.0, 5.0)[None, :, None, None]
    hbm = np.arange(3.6e12, 4.4e12 + 1, 0.1e12)[None, None, :, None]
    fpr = np.array([6.0 * c.hidden * c.ffn for c in fitted])
    weight = np.array([3.0 * c.hidden * c.ffn * 2.0 for c in fitted])
    rows = np.array([c.tokens * c.top_k / c.touched for c in fitted])
    touched = np.array([c.touched for c in fitted])
    measured = np.array([c.seconds for c in fitted])
    predicted = np.maximum(touched * np.maximum((rows + tile) * fpr / flops, weight / hbm), floor)
    error = np.abs(np.log(predicted / measured)).mean(axis=3)
    i, j, k = np.unravel_index(np.argmin(error), error.shape)
    return KernelRates(float(flops.ravel()[i]), float(tile.ravel()[j]), float(hbm.ravel()[k]), float(floor))


def exchange_rows(path) -> list[tuple[int, float]]:
    """(bytes per rank, seconds) of the exchange bench (2 ranks, even splits: half stays local)."""
    data = json.loads(Path(path).read_text())
    return [(row["bytes"], row["ours_us"] * 1e-6) for row in data["rows"]]


def predict_exchange(bytes_per_rank: int, rates: LinkRates) -> float:
    return rates.latency_s + bytes_per_rank / 2 / rates.intra_node_bytes_per_s


def fit_link_rates(rows: list[tuple[int, float]]) -> LinkRates:
    """Grid fit of latency and intra-node bandwidth (mean |log error|) to the 2-rank exchange bench."""
    best = None
    for latency in np.arange(15e-6, 30.01e-6, 0.5e-6):
        for bandwidth in np.arange(250e9, 350.1e9, 1e9):
            rates = LinkRates(float(bandwidth), LinkRates.inter_node_bytes_per_s, float(latency))
            error = np.mean([abs(np.log(predict_exchange(b, rates) / t)) for b, t in rows])
            if best is None or error < best[0]:
                best = (error, rates)
    return best[1]
