"""A node is removed from a simulated multi-node cluster (`ray.cluster_utils.Cluster`): run as
its own process by tests/actors/test_multinode.py, so its cluster never meets the session's.

Three worker nodes of 1 CPU each hold one engine worker each (the placement group cannot pack two
on a node). The node of rank 1 goes away with requests in flight: the survivors shrink to 2 and
the experts only that node held come back from the checkpoint; the lost bundle waits for room.
A new node joins the cluster: the placement group re-places the bundle, the replacement worker
starts there and the engine grows back to 3. Prints one JSON line with what happened."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import get_actor  # noqa: E402

from moeray.generation.reference import greedy_generate  # noqa: E402
from moeray.generation.sampling import SamplingParams  # noqa: E402
from moeray.llm import LLM  # noqa: E402
from tests.helpers import make_checkpoint  # noqa: E402

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    result: dict = {}
    try:
        ckpt, _, reference = make_checkpoint(Path(tempfile.mkdtemp()), seed=9, family="mixtral", num_experts=8, top_k=2)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 200, int(n)).tolist() for n in rng.integers(1, 20, 5)]
        with LLM(ckpt, num_workers=3, parallel={"collective_timeout_s": 5, "placement_timeout_s": 60},
                 rebalance={"enabled": False}) as llm:
            driver, engine = llm.driver, llm.engine
            node_of = [get_actor(w._actor_id.hex()).node_id for w in engine.workers]
            result["worker_nodes"] = len(set(node_of))
            ids = [driver.add_request(p, PARAMS) for p in prompts]
            for _ in range(2):
                driver.step()
            victim = next(n for n in nodes if n.node_id == node_of[1])
            cluster.remove_node(victim)
            outs = driver.run_to_completion(ids)
            result["equal_after_loss"] = all(
                list(outs[rid].outputs[0].token_ids) == greedy_generate(reference, p, PARAMS.max_tokens)
                for rid, p in zip(ids, prompts))
            result["recovery"] = {k: engine.recoveries[-1][k] for k in
                                  ("mode", "lost_ranks", "to_workers", "slots_from_checkpoint", "requests_rerun")}
            # No node has room for the lost bundle: the joiner waits, serving goes on at 2.
            for _ in range(20):
                driver.step()
            result["workers_while_no_room"] = len(engine.workers)
            cluster.add_node(num_cpus=1)
            deadline = time.monotonic() + 120
            while len(engine.workers) < 3 and time.monotonic() < deadline:
                driver.step()
                if engine.joiners is not None:
                    engine.joiners.wait(0.1)
            result["workers_after_new_node"] = len(engine.workers)
            ids = [driver.add_request(p, PARAMS) for p in prompts]
            outs = driver.run_to_completion(ids)
            result["equal_after_rejoin"] = all(
                list(outs[rid].outputs[0].token_ids) == greedy_generate(reference, p, PARAMS.max_tokens)
                for rid, p in zip(ids, prompts))
            result["rejoin"] = {k: engine.scale_events[-1][k] for k in ("from_workers", "to_workers", "joiners_prestarted")} \
                if engine.scale_events else None
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
