"""Several simulated nodes (ray.cluster_utils.Cluster, in its own process: see
multinode_scenario.py): a removed node's experts come back from the checkpoint, serving goes on
at the smaller count, and a new node brings the engine back to its configured count."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_removed_node_shrinks_the_engine_and_a_new_node_restores_it():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # its own cluster, never the session's
    proc = subprocess.run([sys.executable, "-m", "tests.actors.multinode_scenario"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=280)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["worker_nodes"] == 3, result
    recovery = result["recovery"]
    assert (recovery["mode"], recovery["lost_ranks"], recovery["to_workers"]) == ("shrink", [1], 2), result
    assert recovery["slots_from_checkpoint"] == 2 * 3, result  # rank 1's experts had no other copy
    assert result["equal_after_loss"] and result["workers_while_no_room"] == 2, result
    assert result["workers_after_new_node"] == 3 and result["equal_after_rejoin"], result
    assert result["rejoin"] == {"from_workers": 2, "to_workers": 3, "joiners_prestarted": 1}, result
