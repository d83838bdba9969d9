"""Ending a private Ray instance with its driver: ``python -m bitstorm.ray_reaper PID``.

Why: when a driver is killed (SIGKILL, an OOM kill, a closed terminal), Ray's raylet and GCS go
with it, but its dashboard and runtime-env agents notice and then linger for about a minute,
ignoring SIGTERM. The driver starts this watcher in its own session. While the driver lives, the
watcher keeps a record of the driver's descendants (Ray's processes, and the agents and workers
they start); when the driver is gone it SIGKILLs every recorded process still running, then
exits. A process is recognised by its pid and its start time, so a reused pid is never hit.
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
Process = tuple[int, int]  # (pid, start time in clock ticks since boot)


def watch_driver() -> subprocess.Popen | None:
    """Watch this process on behalf of the Ray instance it started (no-op off Linux)."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "bitstorm.ray_reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # neither a terminal's SIGINT nor the driver's group kill it
    )


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of ``pid``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def running(process: Process) -> bool:
    """Whether ``process`` still runs (a zombie has exited; a new start time is another)."""
    stat = process_stat(process[0])
    return stat is not None and stat[0] != "Z" and stat[2] == process[1]


def descendants(*roots: int) -> set[Process]:
    """Every running process below ``roots`` in the process tree (the roots not included)."""
    children: dict[int, list[Process]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := process_stat(int(entry.name))) and stat[0] != "Z":
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child[0])
    return found


def reap(family: set[Process], within_s: float = 10.0) -> None:
    """SIGKILL ``family`` and whatever they started, until none runs (or ``within_s``)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        family |= descendants(*(pid for pid, _ in family))
        alive = [p for p in family if running(p)]
        if not alive:
            return
        for pid, _ in alive:
            with contextlib.suppress(OSError):  # gone already
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL_S)


def main(argv: list[str]) -> int:
    driver = int(argv[0])
    stat = process_stat(driver)
    if stat is None:
        return 0
    watched, family = (driver, stat[2]), set()
    myself = (os.getpid(), process_stat(os.getpid())[2])
    while running(watched):
        family |= descendants(driver) - {myself}
        time.sleep(POLL_S)
    reap(family)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
