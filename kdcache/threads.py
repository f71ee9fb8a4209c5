"""Thread pools shared by a process, for work that releases the GIL (hashing, compression).

One pool per name and process, made on first use; a forked child (a DataLoader worker) starts
without its parent's threads, so it makes its own.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
MAX_PARALLEL = max(64, 4 * CORES)  # threads or worker processes beyond this are a typo, and hang or exhaust the machine
_POOLS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def pool(name: str, threads: int) -> ThreadPoolExecutor:
    """The process's pool called ``name`` (threads named ``kdcache-<name>_<i>``), with ``threads`` threads."""
    with _LOCK:
        if name not in _POOLS:
            _POOLS[name] = ThreadPoolExecutor(threads, thread_name_prefix=f"kdcache-{name}")
        return _POOLS[name]


def _forget() -> None:
    global _LOCK
    _POOLS.clear()
    _LOCK = threading.Lock()  # the parent's may have been held by another thread at the fork


os.register_at_fork(after_in_child=_forget)
