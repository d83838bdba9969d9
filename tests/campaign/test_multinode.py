"""Multi-node Ray for real, on one machine (issue 15): a campaign's actors land on different nodes,
and a worker node removed mid-campaign loses nothing: every planned trial is recorded exactly
once and the rows equal an unbroken run's, with the node replaced (as an autoscaler would) and
without (the campaign finishes on the nodes that remain). tests/campaign/multinode.py runs the
cluster in a process of its own, apart from this session's Ray."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_campaign_spreads_over_nodes_and_survives_losing_one(checkpoints, tmp_path):
    # Its own Ray temp folder (short: Ray's socket paths must fit in 107 bytes), so the cluster's
    # address file never points later ray.init() calls at it.
    temp = tempfile.mkdtemp(prefix="bs-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": temp}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.campaign.multinode",
            checkpoints["linear"],
            checkpoints["text_random"],
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {
        run["run"]: run
        for run in map(json.loads, (line for line in done.stdout.splitlines() if line[:1] == "{"))
    }
    assert list(runs) == ["unbroken", "replaced", "lost"], done.stdout[-2000:]
    assert len(runs["unbroken"]["nodes"]) == 2  # two actors, one on each worker node
    for run in runs.values():
        assert run["exactly_once"] and run["equal_to_unbroken"], run
    replaced, lost = runs["replaced"], runs["lost"]
    # The node added mid-campaign joins the cluster for good: the next campaign uses it (whether
    # it takes work in the campaign it joined depends on how fast this machine builds an actor).
    assert lost["nodes"].get(replaced["added"][0], 0) > 0
    # ... and that campaign finished on the node left after the second loss
    assert set(lost["nodes"]) <= {lost["removed"][0], *replaced["nodes"], *replaced["added"]}
