"""A campaign on a Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster: a
head without CPUs and worker nodes of one CPU each, so actors must land on the workers), run
three times: unbroken; with a fresh node added mid-campaign (as an autoscaler would) and a
worker node then removed; and with a worker node removed and none added. Run as a script by
test_multinode.py (a cluster of its own, apart from the test session's Ray); prints one JSON
line per run.

    python -m tests.campaign.multinode LINEAR_CHECKPOINT TEXT_CHECKPOINT OUTPUT
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from campaign.runner import run_campaign
from tests.campaign.runs import planned, shard_files, tiny_spec, trial_rows

ORDER = ["model", "kind", "layer", "shard", "index", "bit", "image", "format"]


def main() -> None:
    linear, text, output = sys.argv[1:4]
    checkpoints = {"linear": linear, "text_random": text}
    # A dead node is declared dead after a second (Ray's default waits ~30 s, and until then
    # schedules a replacement actor onto the node that is gone).
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health}
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    unbroken = None
    for run in ("unbroken", "replaced", "lost"):
        folder = Path(output) / run
        # 2 models x 2 kinds x 5 layers x 32 bits x 320: enough work left after a node dies for
        # a replacement to be built and take part
        spec = tiny_spec(
            checkpoints,
            folder,
            formats=["fp32"],
            bits=None,
            trials_per_stratum=320,
            shard_size=640,
            resources={"actors": 2, "cpus_per_actor": 1},
        )
        outcome: dict = {}
        campaign = threading.Thread(target=_run, args=(spec, outcome))
        started = time.perf_counter()
        campaign.start()
        removed, added = [], []
        if run != "unbroken":  # a worker node dies with work in flight on it
            while len(shard_files(folder)) < 12 and campaign.is_alive():  # both actors at work
                time.sleep(0.05)
            if run == "replaced":  # a fresh node, as an autoscaler adds (node starts need
                added.append(cluster.add_node(num_cpus=1))  # this thread: before the loss)
            victim = workers.pop(0)
            removed.append(victim.node_id)
            cluster.remove_node(victim, allow_graceful=False)
            workers += added
        campaign.join()
        seconds = time.perf_counter() - started
        store = outcome["store"]
        plan, images, _ = planned(spec)
        rows = trial_rows(folder).sort_values(ORDER).reset_index(drop=True)
        expected = {s.id: s.size(len(images.indices)) for s in plan}
        unbroken = rows if unbroken is None else unbroken
        print(
            json.dumps(
                {
                    "run": run,
                    "seconds": round(seconds, 1),
                    "nodes": store.read_json(store.manifest_path)["nodes"],
                    "removed": removed,
                    "added": [node.node_id for node in added],
                    "exactly_once": rows.groupby("shard").size().to_dict() == expected,
                    "equal_to_unbroken": rows.equals(unbroken),
                }
            ),
            flush=True,
        )


def _run(spec, outcome: dict) -> None:
    outcome["store"] = run_campaign(spec, progress=False)


if __name__ == "__main__":
    main()
