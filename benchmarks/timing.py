"""Wall-clock timing shared by the benchmark scripts, with GPU work synchronised.

The scripts run as ``python benchmarks/x.py``, so this folder is ``sys.path[0]`` and they import
this module as ``timing`` (no installed top-level module has that name).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[float, T]:
    """Seconds one call of ``fn`` takes, and its result; on a CUDA ``device`` the clock starts
    after and stops after all queued GPU work."""
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, result


def best_seconds(
    fn: Callable[[], object], repeats: int, device: torch.device | str | None = None
) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    return min(timed(fn, device)[0] for _ in range(repeats))
