"""Thread pools shared by a process, for work that releases the GIL (hashing, compression).

One pool per name and process, made on first use; a forked child (a DataLoader worker) starts
without its parent's threads, so it makes its own.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

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


def ahead(name: str, threads: int, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]], window: int) -> Iterator[Future[Any]]:
    """``fn(*args)`` of each of ``calls`` in turn, as futures, run by the pool ``name`` (of ``threads``): up to ``window``
    beyond the one the caller waits on are started ahead, so at most ``window`` + 1 results are held. Calls that wait on
    the network (an object store's GETs) overlap their latency. ``window`` 0: each made in the caller's thread (``now``)
    when its turn comes. A caller that stops early (an error, a loop left) by closing the iterator, or dropping it,
    cancels the calls asked for that have not started: they neither run nor keep the process from exiting."""
    if window <= 0:
        yield from (now(fn, *args) for args in calls)
        return
    running, asked = pool(name, threads), collections.deque()
    try:
        for args in calls:
            asked.append(running.submit(fn, *args))
            if len(asked) > window:
                yield asked.popleft()
        while asked:
            yield asked.popleft()
    finally:
        for future in asked:
            future.cancel()


def now(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """``fn(*args)`` made in this thread, as a future holding its result or the error it raised (``ahead``'s, in turn)."""
    made: Future[Any] = Future()
    try:
        made.set_result(fn(*args))
    except Exception as e:  # noqa: BLE001 - the caller's to handle, as from ``ahead``
        made.set_exception(e)
    return made


READS = ("read-ahead", "read", "shards", "fetch")  # the pools whose calls only read (a store's objects, a stream's buffers)
EXIT_READ_WAIT = 1.0  # seconds an ending process waits for a read still under way (``reads_stuck``, data's producers): it may hang


def reads_stuck(seconds: float = EXIT_READ_WAIT) -> bool:
    """Whether a read (a call of a pool named in ``READS``) is still under way ``seconds`` after the process's pools are
    shut down (their calls not started cancelled; the other pools' threads waited for, as the interpreter's exit waits
    for them): one that hangs (a stalled network mount, an object store or HTTP server that stopped answering) would
    keep the process from exiting, for ever or until its timeout (minutes), the interpreter waiting for every pool's
    threads. A command stopped by Ctrl-C or SIGTERM then ends without them (``cli``); reading, they change nothing."""
    with _LOCK:
        pools = dict(_POOLS)
        _POOLS.clear()
    for running in pools.values():
        running.shutdown(wait=False, cancel_futures=True)
    for name, running in pools.items():
        if name not in READS:
            running.shutdown(wait=True)
    deadline = time.monotonic() + seconds
    readers = [t for name, running in pools.items() if name in READS for t in list(running._threads)]  # no public way to them
    for thread in readers:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return any(thread.is_alive() for thread in readers)


def _forget() -> None:
    global _LOCK
    _POOLS.clear()
    _LOCK = threading.Lock()  # the parent's may have been held by another thread at the fork


os.register_at_fork(after_in_child=_forget)
