"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` calls.

    ``sync`` (e.g. a CUDA device synchronize) runs before starting and before stopping
    each timer, so asynchronous GPU work is inside the measurement.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
