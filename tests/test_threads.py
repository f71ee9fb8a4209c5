"""kdcache.threads: calls made ahead in a shared pool."""

import threading
import time

from kdcache import threads


def test_calls_asked_ahead_do_not_run_once_the_caller_stops_early():
    """A read that failed stopped its caller (verify, export, stats, a bucket's reads), but the reads already asked for
    ahead ran on: up to the window's worth of whole-shard GETs, each a shard's bytes, before the process could exit."""
    started, release = [], threading.Event()

    def call(i: int) -> int:
        started.append(i)
        if i:
            release.wait(5)
        return i

    reads = threads.ahead("test-ahead", 2, call, ((i,) for i in range(20)), window=8)
    assert next(reads).result() == 0
    reads.close()  # the caller's loop left (or raised): the iterator is closed, or dropped
    release.set()
    time.sleep(0.3)
    assert len(started) <= 3, started  # the one waited on and the two the pool's threads had begun, not the window's nine


def test_calls_ahead_keep_their_order_and_window():
    held = []

    def call(i: int) -> int:
        held.append(i)
        return i * i

    got = []
    for future in threads.ahead("test-ahead", 2, call, ((i,) for i in range(10)), window=3):
        got.append(future.result())
        assert len(held) <= len(got) + 3  # never more than the window asked for beyond the one waited on
    assert got == [i * i for i in range(10)]
    assert [f.result() for f in threads.ahead("test-ahead", 2, call, ((i,) for i in range(3)), window=0)] == [0, 1, 4]
