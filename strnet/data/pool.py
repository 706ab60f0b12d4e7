"""Per-file work (decode, hash, crop) in a thread pool, results in input order.

Threads, not processes: decoding, hashing and resizing release the GIL, and a forked pool deadlocks when the
parent already holds live OpenCV/OpenMP thread pools (as any caller that decoded an image or imported torch does).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]``, on up to ``workers`` threads (default: the CPUs, at most 8); serial for one
    worker or fewer than 16 items, where a pool costs more than it saves."""
    workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, workers)
    if workers == 1 or len(items) < 16:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))
