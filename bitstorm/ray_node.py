"""Stopping one Ray node, not every Ray on the machine: ``python -m bitstorm.ray_node stop DIR``.

Why: ``ray stop`` kills every Ray process it can see (other users' clusters, a test suite's
private instance), and Ray's ``local`` provider starts its nodes by SSH on machines that may run
other Ray instances. A node started with ``ray start --temp-dir=DIR`` names ``DIR`` (or a path
below it) in the command lines of its GCS, raylet, dashboard and monitors; its agents and
workers, whose command lines Ray rewrites, are their descendants (``bitstorm.ray_reaper``).
Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bitstorm.ray_reaper import Process, descendants, process_stat, reap


def _names(arg: str, folder: str) -> bool:
    """Whether the command-line argument ``arg`` is ``folder``, a path below it, or
    ``--option=`` either."""
    path = arg.rpartition("=")[2]
    return path == folder or path.startswith(folder + "/")


def _ancestors() -> set[int]:
    """This process and the ones above it (the shell that runs ``stop DIR`` names DIR too)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids and (stat := process_stat(pid)):
        pids.add(pid)
        pid = stat[1]
    return pids


def node_processes(temp_dir: str | Path) -> set[Process]:
    """The running processes of the Ray node whose temp dir is ``temp_dir``."""
    folder = os.path.realpath(temp_dir)
    spared = _ancestors()
    roots: set[Process] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone, or not ours to read
            continue
        stat = process_stat(int(entry.name))
        if stat and stat[0] != "Z" and any(_names(arg, folder) for arg in args):
            roots.add((int(entry.name), stat[2]))
    return roots | descendants(*(pid for pid, _ in roots))


def stop(temp_dir: str | Path) -> int:
    """SIGKILL the Ray node of ``temp_dir`` and its workers; returns how many processes."""
    family = node_processes(temp_dir)
    reap(set(family))
    return len(family)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "stop":
        print("usage: python -m bitstorm.ray_node stop TEMP_DIR", file=sys.stderr)
        return 2
    print(f"stopped {stop(argv[1])} Ray processes of {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
