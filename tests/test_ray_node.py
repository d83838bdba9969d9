"""bitstorm.ray_node stops the processes of one Ray temp dir, with what they started, and no
other: not a Ray of a neighbouring folder, nor the command that asks."""

import subprocess
import sys
import time

from bitstorm import ray_node
from bitstorm.ray_reaper import descendants

# Stands in for a Ray process: its command line names the temp dir, and it starts a child whose
# command line does not (as a raylet starts its workers).
NODE = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"


def start(option: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", NODE, option])
    deadline = time.monotonic() + 10
    while not descendants(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def test_stop_ends_the_temp_dirs_processes_and_their_children_only(tmp_path):
    folder = tmp_path / "ray"
    node, neighbour = start(f"--temp-dir={folder}"), start(f"--temp-dir={folder}-other")
    try:
        assert len(ray_node.node_processes(folder)) == 2  # the process and its child
        done = subprocess.run(
            [sys.executable, "-m", "bitstorm.ray_node", "stop", str(folder)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0 and f"stopped 2 Ray processes of {folder}" in done.stdout
        assert node.wait(10) is not None and not ray_node.node_processes(folder)
        assert neighbour.poll() is None and len(ray_node.node_processes(f"{folder}-other")) == 2
    finally:
        for process in (node, neighbour):
            ray_node.stop(process.args[-1].partition("=")[2])
