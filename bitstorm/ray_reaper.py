"""Ending a private Ray instance with its driver: ``python -m bitstorm.ray_reaper PID NODE_ID``.

Why: when a driver is killed (SIGKILL, an OOM kill, a closed terminal), Ray's raylet and GCS go
with it, but its dashboard and runtime-env agents notice and then linger for about a minute,
ignoring SIGTERM. The driver starts this watcher in its own session; when the driver's process
is gone it SIGKILLs every process that still carries the instance's node id, then exits.
Linux only (it reads ``/proc``); elsewhere Ray's own clean-up is all there is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.2


def watch_driver(node_id: str) -> subprocess.Popen | None:
    """Watch this process on behalf of the private instance ``node_id`` (no-op off Linux)."""
    if not Path("/proc/self/environ").exists():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "bitstorm.ray_reaper", str(os.getpid()), node_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # neither a terminal's SIGINT nor the driver's group kill it
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent has not read its status yet


def instance_processes(node_id: str) -> list[int]:
    """Processes whose environment names ``node_id`` (Ray sets ``RAY_NODE_ID`` in each)."""
    marker = f"RAY_NODE_ID={node_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def reap(node_id: str, within_s: float = 10.0) -> None:
    """SIGKILL the instance's processes until none is left (or ``within_s`` passed): one that
    was mid-start when the first sweep ran is caught by the next."""
    deadline = time.monotonic() + within_s
    while (pids := instance_processes(node_id)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(OSError):  # gone already
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL_S)


def main(argv: list[str]) -> int:
    driver, node_id = int(argv[0]), argv[1]
    while alive(driver):
        time.sleep(POLL_S)
    reap(node_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
