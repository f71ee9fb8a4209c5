"""Costs at scale: the work a command does per object, shard or epoch must not grow with the store's size or its number
of targets. Measured by counting calls or reads, never by time (benchmarks/RESULTS.md, session 34, has the timings)."""

from __future__ import annotations

import contextlib
import cProfile
import importlib
import os
import pstats
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import kdcache
from kdcache import interop, storage, store as layout
from kdcache.errors import StoreError
from kdcache.pipeline import from_dict
from conftest import served_folder
from test_remote import SwallowingProxy

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def deep_pipeline(depth: int, rows_per_shard: int = 2, **train: Any) -> Any:
    """scaled.py's teacher of ``depth`` layers, each layer a stored target beside the logits (``train``: train's values)."""
    return from_dict({
        "teacher": {"factory": "scaled.py:teacher"},
        "data": {"factory": "scaled.py:dataset", "split": "train"},
        "targets": {"logits": True, "layers": [f"layers.{i}" for i in range(depth)], "dtype": "float32"},
        "extract": {"batch_size": 2, "device": "cpu", "rows_per_shard": rows_per_shard},
        "student": {"factory": "scaled.py:student"},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu", **train},
    }, root=FIXTURES)


def calls_from(module: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """(calls made from the file ``module`` while ``fn(*args, **kwargs)`` runs, counted by cProfile, builtins too; fn's result)."""
    profile = cProfile.Profile()
    result = profile.runcall(fn, *args, **kwargs)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return sum(counts[0] for *_, callers in stats.values() for caller, counts in callers.items() if caller[0].endswith(module)), result


def test_pack_and_verify_look_up_each_objects_array_in_steps_that_do_not_grow_with_the_arrays(tmp_path: Path, zoo_env):
    """pack and verify's added-arrays check found each object's array by trying every array of the store: objects x
    arrays (0.6 s of pack's 7.2 s at 200 layers of 100 shards, growing with the square of the targets)."""
    per_object = {}
    for depth in (8, 32):
        zoo_env(DEPTH=depth, N=4)
        store = str(tmp_path / f"deep{depth}.zarr")
        kdcache.extract(deep_pipeline(depth), store)
        packed, result = calls_from("interop.py", interop.pack, store, str(tmp_path / f"deep{depth}.zarr.zip"))
        checked, _ = calls_from("interop.py", interop.check_added_arrays, kdcache.open_store(store))
        per_object[depth] = (packed / result["objects"], checked / result["objects"])
    # 4x the arrays: per object, old code made 1.3x (pack) and 1.7x (the check) the calls, new 1.05x and 1.04x
    assert per_object[32][0] < 1.15 * per_object[8][0], per_object
    assert per_object[32][1] < 1.15 * per_object[8][1], per_object


def count_done_reads(monkeypatch) -> list[str]:
    """Each ``Store.done()`` call (every done marker read, one object per shard) from now on, by the store's location."""
    seen: list[str] = []
    done = layout.Store.done

    def counted(self: layout.Store, shards: list[int] | None = None) -> Any:
        seen.append(self.location)
        return done(self, shards)

    monkeypatch.setattr(layout.Store, "done", counted)
    return seen


def test_train_reads_each_stores_done_markers_once_per_opening(tmp_path: Path, zoo_env, monkeypatch):
    """A run's setup read every done marker of the store four times (its completeness, the shards it trains on, the
    rows' check and the rows' read), five on --resume, and the eval store's three times: 1.2 s each at 4,000 shards.
    Now once per store: the reader (TransferSet) is handed the store the run's setup opened, not opening it again."""
    zoo_env(N=16)
    store, evals = str(tmp_path / "s.zarr"), str(tmp_path / "e.zarr")
    kdcache.extract(deep_pipeline(1), store)
    kdcache.extract(deep_pipeline(1), evals)
    seen = count_done_reads(monkeypatch)
    kdcache.train(deep_pipeline(1, eval_cache=evals, eval_split="train"), store, str(tmp_path / "run"))
    assert seen.count(store) == 1 and seen.count(evals) == 1, seen
    seen.clear()
    kdcache.train(deep_pipeline(1, eval_cache=evals, eval_split="train", epochs=2), store, str(tmp_path / "run"), resume=True)
    assert seen.count(store) == 1 and seen.count(evals) == 1, seen


def test_import_looks_up_a_datasets_digest_column_and_the_topk_classes_once_per_file(tmp_path: Path, zoo_env):
    """import sorted the store's data arrays (``digest_paths``) to find a dataset's digest column, and looked through its
    targets for top-k logits (``topk_classes``), for every shard of every dataset: shards x arrays x arrays (with
    --overwrite, twice: the file is read whole first). Now each is done once per file."""
    pytest.importorskip("h5py")
    zoo_env(DEPTH=8, N=8)
    store, h5, back = str(tmp_path / "deep.zarr"), str(tmp_path / "deep.h5"), str(tmp_path / "back.zarr")
    kdcache.extract(deep_pipeline(8), store)
    interop.export_hdf5(store, h5)
    for overwrite in (False, True):  # 4 shards x 12 datasets each time
        profile = cProfile.Profile()
        profile.runcall(interop.import_hdf5, h5, back, overwrite=overwrite)
        calls = {name: n for (_, _, name), (_, n, *_) in pstats.Stats(profile).stats.items()}  # type: ignore[attr-defined]
        # digest_paths: once per shard written (the writer's digest row) and the lookup's one; topk_classes: once per read of
        # the file (twice with --overwrite). Old: 52 and 48
        seen = (calls.get("digest_paths", 0), calls.get("topk_classes", 0))
        assert seen[0] <= 4 + 1 and seen[1] <= 2, (overwrite, seen)


def zarr_gets(monkeypatch) -> list[str]:
    """The keys zarr reads from a folder store from now on (its store's ``get``, run in zarr's own event loop thread)."""
    seen: list[str] = []
    get = storage._LocalStore.get

    async def counted(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(storage._LocalStore, "get", counted)
    return seen


def test_done_reads_a_folders_markers_without_zarr(tmp_path: Path, zoo_env, monkeypatch):
    """``Store.done()`` read each done marker of a folder store through zarr, ~170 µs a marker (8.5 s at 50,000 shards,
    paid by every command opening a store): now each one-byte file is read straight, zarr reading none."""
    zoo_env(N=16)
    location = str(tmp_path / "s.zarr")
    kdcache.extract(deep_pipeline(1), location)
    store = kdcache.open_store(location)
    store.array(layout.DONE)  # its metadata: read once, by any command
    gets = zarr_gets(monkeypatch)
    assert store.done().tolist() == [True] * 8 and store.done([5, 1]).tolist() == [True, True]
    assert gets == [], gets  # old: each marker, 8 then 2


def _marker(raw: bytes) -> Callable[[Path], None]:
    return lambda f: f.write_bytes(raw)


def _linked(inside: bool) -> Callable[[Path], None]:
    def damage(f: Path) -> None:
        target = f.parent / "0" if inside else f.parents[4] / "elsewhere"
        if not inside:
            target.write_bytes(b"\x01")
        f.unlink()
        f.symlink_to(target)
    return damage


def _replaced(make: Callable[[Path], Any]) -> Callable[[Path], None]:
    def damage(f: Path) -> None:
        f.unlink()
        make(f)
    return damage


MARKERS = {  # what shard 2's marker becomes: every case the direct read must answer as zarr does
    "not-done": _marker(b"\x00"), "missing": lambda f: f.unlink(), "byte-2": _marker(b"\x02"), "two-bytes": _marker(b"\x01\x01"),
    "empty": _marker(b""), "too-large": _marker(b"\x01" * 200), "fifo": _replaced(os.mkfifo), "folder": _replaced(Path.mkdir),
    "link-inside": _linked(True), "link-out": _linked(False),
}


def _outcome(store: layout.Store, shards: list[int] | None) -> tuple[Any, ...]:
    try:
        return "done", store.done(shards).tolist(), store.damaged_markers
    except StoreError as e:
        return type(e).__name__, str(e), store.damaged_markers


@pytest.mark.parametrize("verifying", [False, True], ids=["reader", "verify"])
@pytest.mark.parametrize("case", list(MARKERS))
def test_done_read_straight_is_zarrs_answer_for_every_marker(tmp_path: Path, zoo_env, monkeypatch, case: str, verifying: bool):
    """The direct read of a folder's markers answers as zarr's read does, damage included (named by zarr's path):
    for a reader and for verify (``damaged_markers``), all markers or some (a negative shard counts from the end)."""
    zoo_env(N=8)
    location = tmp_path / "s.zarr"
    kdcache.extract(deep_pipeline(1), str(location))
    MARKERS[case](location / "progress/done/c/2")
    seen = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(layout.Store, "_straight_markers", lambda *a: None)
        store = kdcache.open_store(str(location))
        store.damaged_markers = {} if verifying else None
        seen.append([_outcome(store, shards) for shards in (None, [2, 0], [-1, 2], [3])])
    assert seen[0] == seen[1], seen


def test_digests_reads_a_folders_rows_without_zarr(tmp_path: Path, zoo_env, monkeypatch):
    """``Store.digests()`` read each shard's digest row (FORMAT.md §7.1, one object a shard) through zarr, ~300 µs a row
    (2.5 s at 8,000 shards, paid by every reader: train, stats, export, verify): now each file is read straight."""
    zoo_env(N=16)
    location = str(tmp_path / "s.zarr")
    kdcache.extract(deep_pipeline(1), location)
    store = kdcache.open_store(location)
    store.has_digests() and store.array(layout.DIGEST)  # its metadata: read once, by any reader
    gets = zarr_gets(monkeypatch)
    rows = store.digests()
    assert gets == [], gets  # old: each row, 8
    monkeypatch.setattr(layout.Store, "_progress_rows", lambda *a: None)
    assert rows.dtype == "uint32" and rows.tolist() == store.digests().tolist() and rows.all()


def _row(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda f: f.write_bytes(change(f.read_bytes()))


def _row_linked(inside: bool) -> Callable[[Path], None]:
    def damage(f: Path) -> None:
        target = f.parents[1] / "1" / "0" if inside else f.parents[5] / "elsewhere"  # shard 1's row, or one out of the store
        if not inside:
            target.write_bytes(f.read_bytes())
        f.unlink()
        f.symlink_to(target)
    return damage


DIGEST_ROWS = {  # what shard 2's digest row becomes: every case the direct read must answer as zarr does
    "missing": lambda f: f.unlink(), "zeros": _row(lambda b: bytes(len(b))), "short": _row(lambda b: b[:10]),
    "long": _row(lambda b: b + b"\0\0\0\0"), "empty": _row(lambda b: b""), "too-large": _row(lambda b: b * 100),
    "fifo": _replaced(os.mkfifo), "folder": _replaced(Path.mkdir), "link-inside": _row_linked(True), "link-out": _row_linked(False),
}


def _digests_outcome(location: Path) -> tuple[Any, ...]:
    from kdcache.verify import verify

    report = verify(str(location))
    checks = [(c["name"], c["problems"]) for c in report["checks"]]
    try:
        return "read", kdcache.open_store(str(location)).digests().tolist(), checks
    except StoreError as e:
        return type(e).__name__, str(e), checks


@pytest.mark.parametrize("case", list(DIGEST_ROWS))
def test_digests_read_straight_are_zarrs_answer_for_every_row(tmp_path: Path, zoo_env, monkeypatch, case: str):
    """The direct read of a folder's digest rows answers as zarr's read does, damage included (named by zarr's path,
    ``Store._bad_digest_rows``): for a reader (``digests()``) and for verify."""
    zoo_env(N=8)
    location = tmp_path / "s.zarr"
    kdcache.extract(deep_pipeline(1), str(location))
    DIGEST_ROWS[case](location / "progress/digest/c/2/0")
    direct = _digests_outcome(location)
    monkeypatch.setattr(layout.Store, "_progress_rows", lambda *a: None)
    assert direct == _digests_outcome(location)


def test_a_subset_in_ram_reads_only_the_shards_holding_its_rows(tmp_path: Path, zoo_env, monkeypatch):
    """``train.subset`` with the targets in RAM read every shard of the store (each array whole), however few shards its
    rows lie in: now those shards only. Every row served is still checked against its input's fingerprint."""
    zoo_env(N=32)
    store = str(tmp_path / "s.zarr")
    kdcache.extract(deep_pipeline(1), store)  # 16 shards of 2 rows
    reads: list[tuple[str, int]] = []
    whole = layout._read_whole_shard

    def counted(array: Any, shard: int, *args: Any, **kwargs: Any) -> Any:
        reads.append((array.path, shard))
        return whole(array, shard, *args, **kwargs)

    monkeypatch.setattr(layout, "_read_whole_shard", counted)
    kdcache.train(deep_pipeline(1, subset=3, fingerprint_check=1.0), store, str(tmp_path / "run"))
    read = {path: sorted(s for p, s in reads if p == path) for path, _ in reads}
    assert read and all(len(shards) <= 3 for shards in read.values()), read  # old: all 16 of each array


def test_a_subsets_ram_check_counts_the_shards_it_reads(tmp_path: Path, zoo_env, monkeypatch):
    """A ``train.subset``'s RAM check (RAM or streaming under ``memory_budget_mb``, and the refusal past half the machine's
    memory) counted every row of the store though only the shards holding its rows are read: a few rows of a large
    store streamed, or were refused. Now the rows of those shards are counted."""
    import numpy as np

    from kdcache import cache
    monkeypatch.syspath_prepend(str(FIXTURES))
    zoo_env(N=32)
    location = str(tmp_path / "s.zarr")
    kdcache.extract(deep_pipeline(1), location)  # 16 shards of 2 rows
    import scaled

    rows = np.array([0, 1, 5])  # shards 0 and 2: 4 rows of the store's 32
    made = lambda **kw: cache.TransferSet(location, scaled.dataset(), ["logits"], batch_size=2, rows=rows, **kw)  # noqa: E731
    row_bytes = made().row_bytes
    subset = made(memory_budget_mb=5 * row_bytes / 2**20)
    assert subset.in_memory and sorted(subset.memory) == sorted(subset.paths), "streamed"  # old: 32 rows counted, streamed
    monkeypatch.setattr(cache, "memory_limit", lambda: 10 * row_bytes)  # room for the 4 rows, not the store's 32
    assert made().in_memory  # old: refused, "take 1.5 KiB in RAM"
    monkeypatch.setattr(cache, "memory_limit", lambda: 6 * row_bytes)
    with pytest.raises(kdcache.errors.PipelineError, match=rf"take {4 * row_bytes} B in RAM"):
        made()


def test_stats_graph_does_not_grow_with_the_shards(tmp_path: Path, zoo_env, monkeypatch):
    """``kdcache stats`` made a dask block per shard of every column read: ~60 KB of graph a shard, held while it ran (504 MB
    at 8,000 shards). Now ``stats.BLOCKS`` tasks share the shards, each reading one at a time: as many tasks at 4x the shards."""
    import dask

    from kdcache import stats

    monkeypatch.setattr(stats, "BLOCKS", 4, raising=False)  # tasks of a few shards each, at these sizes
    compute, tasks = dask.compute, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        tasks.append(sum(len(dict(a.__dask_graph__())) for a in args if dask.is_dask_collection(a)))
        return compute(*args, **kwargs)

    monkeypatch.setattr(dask, "compute", counted)
    per_size = {}
    for shards in (16, 64):
        zoo_env(N=2 * shards, DEPTH=2)
        location = str(tmp_path / f"s{shards}.zarr")
        kdcache.extract(deep_pipeline(2), location)
        tasks.clear()
        assert stats.stats(location)["shards_done"] == shards
        per_size[shards] = sum(tasks)
    assert 0 < per_size[64] <= 1.1 * per_size[16], per_size  # old: 936 and 3,720 tasks


class LatencyProxy(SwallowingProxy):
    """test_remote's proxy, holding each request ``delay`` seconds before passing it on (a round trip to a bucket far
    away), counting the most held at once (``peak``; of the requests whose first line matches ``counted`` where given)
    and keeping each request's first line (``requests``)."""

    def __init__(self, target: tuple[str, int], delay: float, counted: str | None = None):
        import re
        import threading

        self.delay, self.held, self.peak, self.lock, self.requests = delay, 0, 0, threading.Lock(), []
        self.counted = re.compile(counted or "")
        super().__init__(target)

    def _pump(self, src: Any, dst: Any) -> None:
        import time

        try:
            request = src.getsockname() == self.server.getsockname()  # the client's side of the proxy (closed: OSError)
            while data := src.recv(65536):
                if request:
                    line = data.split(b"\r\n", 1)[0].decode("latin-1")
                    counted = self.counted.search(line) is not None
                    with self.lock:
                        self.held += counted
                        self.peak = max(self.peak, self.held)
                        self.requests.append(line)
                    time.sleep(self.delay)
                    with self.lock:
                        self.held -= counted
                dst.sendall(data)
        except OSError:
            pass


def test_an_s3_stores_markers_and_digest_rows_are_asked_for_more_than_ten_at_once(s3, tmp_path: Path, zoo_env):
    """``done()`` and ``digests()`` of an S3 store sent one GET a shard at zarr's ``async.concurrency``, 10 at once, and
    s3fs's pool (``max_pool_connections``, 10) held them there too: at ~20 ms a GET, 100 s at 50,000 shards for every
    command opening the store. Now ``PROGRESS_READS_AT_ONCE`` at once, through a pool as large, zarr's config untouched."""
    import zarr
    from urllib.parse import urlparse

    from conftest import S3_BUCKET

    zoo_env(N=80)
    url = f"s3://{S3_BUCKET}/many.zarr"
    kdcache.extract(deep_pipeline(1), url, storage_options=s3)  # 40 shards
    endpoint = urlparse(s3["endpoint_url"])
    proxy = LatencyProxy((endpoint.hostname, endpoint.port), delay=0.05)
    try:
        store = kdcache.open_store(url, storage_options={**s3, "endpoint_url": proxy.url})
        for read in (store.done, store.digests):
            proxy.peak = 0
            assert read().all()
            assert proxy.peak > 10, (read.__name__, proxy.peak)  # old: 10
    finally:
        proxy.close()
    assert zarr.config.get("async.concurrency") == 10


def test_a_failed_get_of_an_s3_stores_markers_stops_the_gets_not_yet_sent(s3, tmp_path: Path, zoo_env, monkeypatch):
    """``done()`` of an S3 store asks for its markers ``PROGRESS_READS_AT_ONCE`` at a time; where one GET fails (here a
    marker larger than a marker can be) zarr reads them all again and names the damage. The GETs not yet sent went on
    being sent meanwhile, every shard's (a store of 50,000 shards: 50,000 GETs for nothing, beside zarr's): now they
    are called off."""
    import time
    from urllib.parse import urlparse

    import s3fs
    from conftest import S3_BUCKET

    zoo_env(N=300)
    location = tmp_path / "s.zarr"
    kdcache.extract(deep_pipeline(1, rows_per_shard=1), str(location))  # 300 shards
    (location / "progress/done/c/0").write_bytes(b"\1" * 200)
    # done() reads the markers alone: the bucket gets them and every zarr.json, not the other arrays' 1,800 objects (their
    # PUTs to the S3 server, which shares this process, took 16 of the test's 28 s)
    objects = {f"{S3_BUCKET}/failed.zarr/{f.relative_to(location).as_posix()}": f.read_bytes() for f in location.rglob("*")
               if f.is_file() and (f.name == "zarr.json" or f.parent == location / "progress/done/c")}
    assert len(objects) == 300 + 12, len(objects)  # the markers and 12 metadata documents
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).pipe(objects)
    endpoint = urlparse(s3["endpoint_url"])
    proxy = LatencyProxy((endpoint.hostname, endpoint.port), delay=0.05)
    gets = {}
    try:
        for way in ("direct", "zarr"):
            store = kdcache.open_store(f"s3://{S3_BUCKET}/failed.zarr", storage_options={**s3, "endpoint_url": proxy.url})
            proxy.requests.clear()
            with pytest.raises(StoreError, match="progress/done/c/0' holds 200 bytes"):
                store.done()
            seen = -1
            while seen != len(proxy.requests):  # GETs still sent after done() has answered count too (zarr's go on as well)
                seen = len(proxy.requests)
                time.sleep(0.5)
            gets[way] = sum("/progress/done/c/" in r for r in proxy.requests)
            monkeypatch.setattr(layout.Store, "_remote_rows", lambda *a: None)
    finally:
        proxy.close()
    assert gets["direct"] - gets["zarr"] < 200, gets  # old: 300, every marker's; now ~100


def test_stats_over_s3_asks_for_a_shards_columns_and_the_next_shards_at_once(s3, tmp_path: Path, zoo_env, monkeypatch):
    """``kdcache stats`` read each column of each shard in turn, one request after another (dask's threads, one per core,
    each on its share of the shards): at ~50 ms a GET, a store of 100 shards of 4 columns took 15 s over S3 on 2 cores,
    now 5 s. Now each shard's columns are asked for at once, with the next shard's, while its sums are added; the
    figures are those of the same store written to a folder."""
    from urllib.parse import urlparse

    from conftest import S3_BUCKET
    from kdcache import stats as stats_module
    from kdcache.stats import stats

    monkeypatch.setattr(stats_module, "BLOCKS", 2)  # 4 shards a block, as a store of 256 shards has at 64
    zoo_env(N=16, DEPTH=2)
    url = f"s3://{S3_BUCKET}/stats-ahead.zarr"
    kdcache.extract(deep_pipeline(2, rows_per_shard=2), url, storage_options=s3)  # 8 shards: logits, 2 layers, labels
    kdcache.extract(deep_pipeline(2, rows_per_shard=2), str(tmp_path / "here.zarr"))
    endpoint = urlparse(s3["endpoint_url"])
    proxy = LatencyProxy((endpoint.hostname, endpoint.port), delay=0.05, counted=r"/(targets|samples)/.*/c/")
    try:
        remote = stats(url, storage_options={**s3, "endpoint_url": proxy.url}, num_workers=1)
    finally:
        proxy.close()
    here = stats(str(tmp_path / "here.zarr"))
    assert proxy.peak > 4, proxy.peak  # more than one shard's 4 columns in flight (old: 1), from one dask thread
    assert {k: v for k, v in remote.items() if k != "location"} == {k: v for k, v in here.items() if k != "location"}


def test_an_extract_to_s3_puts_a_shards_columns_at_once_and_asks_for_none_first(s3, tmp_path: Path, zoo_env, monkeypatch):
    """zarr wrote each column of a shard to object storage by asking for its object first (a GET finding nothing), then
    PUT it, one column after another: 12 round trips for a shard of 6 columns, a bucket's latency each (20 shards at 50
    ms a request: 15.1 s, 3.1 s without the latency). Now a whole shard's columns are encoded as the local writer
    encodes them and PUT at once (9.5 s); the objects are byte for byte those of the same store written to a folder
    (the last shard, not whole, as zarr writes it in both)."""
    import re
    from urllib.parse import urlparse

    import s3fs
    from conftest import S3_BUCKET

    monkeypatch.setattr(importlib.import_module("kdcache.extract"), "WRITE_THREADS", 1)  # old: one PUT in flight
    zoo_env(N=15, DEPTH=2)
    endpoint = urlparse(s3["endpoint_url"])
    shard_object = r"/(targets|samples)/.*/c/"
    proxy = LatencyProxy((endpoint.hostname, endpoint.port), delay=0.05, counted=rf"^PUT .*{shard_object}")
    try:
        kdcache.extract(deep_pipeline(2, rows_per_shard=2), f"s3://{S3_BUCKET}/put.zarr", storage_options={**s3, "endpoint_url": proxy.url})
    finally:
        proxy.close()
    kdcache.extract(deep_pipeline(2, rows_per_shard=2), str(tmp_path / "here.zarr"))
    asked = [r for r in proxy.requests if r.startswith("GET") and re.search(shard_object, r)]
    assert asked and all(re.search(r"/c/7[ /]", r) for r in asked), asked  # only the last shard's, which zarr writes
    assert proxy.peak >= 6, proxy.peak  # a shard's 6 columns at once
    fs, here = s3fs.S3FileSystem(**s3, skip_instance_cache=True), tmp_path / "here.zarr"
    written = sorted(str(f.relative_to(here)) for f in here.rglob("*") if f.is_file() and re.search(shard_object, f"/{f.relative_to(here)}"))
    assert len(written) == 6 * 8 and all(fs.cat(f"{S3_BUCKET}/put.zarr/{key}") == (here / key).read_bytes() for key in written)


def test_an_extract_to_s3_puts_a_shards_digest_row_with_its_columns_and_its_marker_after_both(s3, tmp_path: Path, zoo_env, monkeypatch):
    """A shard's write to object storage waited for its columns' PUTs, then PUT its digest row (FORMAT.md §7.1), one
    round trip more in turn, then read the manifest back and PUT the done marker. The digest row now goes with the
    columns (at 50 ms a request, 7 requests held at once for a shard of 6 columns, was 6); the marker still comes
    last, after every PUT of its shard and the manifest's second read; the digest objects are those of a folder's."""
    import re
    from urllib.parse import urlparse

    import s3fs
    from conftest import S3_BUCKET

    from kdcache.verify import verify

    monkeypatch.setattr(importlib.import_module("kdcache.extract"), "WRITE_THREADS", 1)  # one shard at a time
    zoo_env(N=15, DEPTH=2)
    endpoint = urlparse(s3["endpoint_url"])
    proxy = LatencyProxy((endpoint.hostname, endpoint.port), delay=0.05, counted=r"^PUT .*/((targets|samples)/.*|progress/digest)/c/")
    try:
        kdcache.extract(deep_pipeline(2, rows_per_shard=2), f"s3://{S3_BUCKET}/digest.zarr", storage_options={**s3, "endpoint_url": proxy.url})
    finally:
        proxy.close()
    assert proxy.peak >= 7, proxy.peak  # a shard's 6 columns and its digest row at once (old: 6, the row after them)
    mine = [r for r in proxy.requests if f"/{S3_BUCKET}/digest.zarr/" in r]
    for shard in range(8):
        digest = next(i for i, r in enumerate(mine) if r.startswith(f"PUT /{S3_BUCKET}/digest.zarr/progress/digest/c/{shard}/0 "))
        marker = [i for i, r in enumerate(mine) if r.startswith(f"PUT /{S3_BUCKET}/digest.zarr/progress/done/c/{shard} ")][-1]
        columns = [i for i, r in enumerate(mine) if r.startswith("PUT ") and re.search(rf"/(targets|samples)/.*/c/{shard}[/ ]", r)]
        looks = [i for i, r in enumerate(mine) if r.startswith(f"GET /{S3_BUCKET}/digest.zarr/zarr.json")]
        assert columns and max(columns) < marker and digest < marker, (shard, mine)
        assert any(max(columns + [digest]) < i < marker for i in looks), (shard, mine)  # the store's look at the commit point
    kdcache.extract(deep_pipeline(2, rows_per_shard=2), str(tmp_path / "here.zarr"))
    fs, here = s3fs.S3FileSystem(**s3, skip_instance_cache=True), tmp_path / "here.zarr"
    rows = sorted((here / "progress/digest/c").rglob("*"))
    rows = [str(f.relative_to(here)) for f in rows if f.is_file()]
    assert len(rows) == 8 and all(fs.cat(f"{S3_BUCKET}/digest.zarr/{key}") == (here / key).read_bytes() for key in rows)
    assert verify(f"s3://{S3_BUCKET}/digest.zarr", storage_options=s3)["ok"]


class HoldingProxy(SwallowingProxy):
    """test_remote's proxy, passing every request on but those whose first line matches ``held``: it keeps those, and
    whatever follows on their connection, unanswered (PUTs still on their way when their writer is killed)."""

    def __init__(self, target: tuple[str, int], held: str):
        import re

        self.held, self.holding = re.compile(held), []
        super().__init__(target)

    def _pump(self, src: Any, dst: Any) -> None:
        request, held = src.getsockname() == self.server.getsockname(), False  # the client's side of the proxy
        try:
            while data := src.recv(65536):
                if request and not held and self.held.search(line := data.split(b"\r\n", 1)[0].decode("latin-1")):
                    held = True
                    self.holding.append(line)
                if not held:
                    dst.sendall(data)
        except OSError:
            pass


@pytest.mark.slow
def test_an_extract_to_s3_killed_with_a_shards_digest_row_written_and_its_columns_not_resumes_to_the_uninterrupted_store(
        s3, tmp_path: Path, zoo_env):
    """A shard's digest row is PUT with its columns, not after them: ``kill -9`` can now land with the row written and
    the columns not. The shard is not done (its marker waits for every PUT of it), and the rerun writes it whole again,
    the row too: here the row left behind is made another one (a teacher that is not bit-for-bit deterministic computes
    other rows on the next try), and the resumed store verifies and equals an uninterrupted one byte for byte."""
    import re
    import time
    from urllib.parse import urlparse

    import s3fs
    from click.testing import CliRunner
    from conftest import S3_BUCKET
    from reference import slow_extract, write_toml

    from kdcache.cli import main
    from kdcache.verify import verify

    url, key = f"s3://{S3_BUCKET}/held.zarr", f"{S3_BUCKET}/held.zarr"
    toml = write_toml(tmp_path / "p.toml")  # 240 rows in 15 shards of 16
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    endpoint = urlparse(s3["endpoint_url"])
    proxy = HoldingProxy((endpoint.hostname, endpoint.port), held=rf"^PUT /{key}/(samples|targets)/\S*/c/5[/ ]")  # shard 5's columns
    row = f"{key}/progress/digest/c/5/0"
    try:
        proc = slow_extract(toml, url, shards=1, storage_options={**s3, "endpoint_url": proxy.url})
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline and not (fs.invalidate_cache() or fs.exists(row)):
                time.sleep(0.05)
            landed = fs.exists(row)
        finally:
            proc.kill()  # SIGKILL, and waited for (its lock is then taken over at once)
            proc.wait(timeout=30)
    finally:
        proxy.close()
    assert proxy.holding and landed, f"shard 5's digest row was not written while its columns' PUTs were held ({len(proxy.holding)} held)"
    store = layout.open_store(url, storage_options=s3)
    assert not store.done()[5] and not [k for k in fs.find(key) if re.search(r"/(samples|targets)/\S*/c/5(/|$)", k)]
    fs.pipe_file(row, np.full(len(store.digest_paths()), 0x5EED, dtype="<u4").tobytes())  # another try's row
    zoo_env(N=240)
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    resumed = CliRunner().invoke(main, ["extract", str(toml), "--out", url, "--no-progress", *options])
    assert resumed.exit_code == 0 and "resumed" in resumed.output, resumed.output
    here = tmp_path / "here.zarr"
    assert CliRunner().invoke(main, ["extract", str(toml), "--out", str(here), "--no-progress"]).exit_code == 0
    assert verify(url, storage_options=s3)["ok"]
    files = [str(f.relative_to(here)) for f in sorted(here.rglob("*")) if f.is_file() and f.name != "zarr.json"]
    assert row.removeprefix(f"{key}/") in files
    fs.invalidate_cache()  # its listing above, of the store before the rerun
    assert {f: fs.cat(f"{key}/{f}") for f in files} == {f: (here / f).read_bytes() for f in files}


def _one_store_in_s3_and_a_folder(s3: dict[str, Any], tmp_path: Path, name: str) -> tuple[str, Path]:
    """The same store (``deep_pipeline(2)``'s, of the ``zoo_env`` set) extracted to ``s3://BUCKET/name`` and to a folder."""
    from conftest import S3_BUCKET

    url, here = f"s3://{S3_BUCKET}/{name}", tmp_path / "here.zarr"
    kdcache.extract(deep_pipeline(2, rows_per_shard=2), url, storage_options=s3)
    kdcache.extract(deep_pipeline(2, rows_per_shard=2), str(here))
    return url, here


@contextlib.contextmanager
def _far_s3(s3: dict[str, Any], counted: str = r"/(targets|samples)/.*/c/") -> Iterator[tuple[LatencyProxy, dict[str, Any]]]:
    """Storage options reaching ``s3``'s endpoint through a ``LatencyProxy`` holding each request 50 ms, with the proxy
    (counting the shard objects' requests held at once)."""
    from urllib.parse import urlparse

    endpoint = urlparse(s3["endpoint_url"])
    proxy = LatencyProxy((endpoint.hostname, endpoint.port), delay=0.05, counted=counted)
    try:
        yield proxy, {**s3, "endpoint_url": proxy.url}
    finally:
        proxy.close()


def test_verify_over_s3_asks_for_the_next_shards_while_it_checks_one(s3, tmp_path: Path, zoo_env):
    """``kdcache verify`` read each array's shards one after another: a bucket's latency per array and shard (a store of
    10,000 shards of 6 arrays at 20 ms a GET: 20 minutes of waiting). Now the next reads are asked for while one is
    checked (``storage.REMOTE_READS`` ahead); the report is the one the same store in a folder gets, a damaged shard's too."""
    import re

    import s3fs
    from conftest import S3_BUCKET
    from kdcache.verify import verify

    zoo_env(N=16, DEPTH=2)
    url, here = _one_store_in_s3_and_a_folder(s3, tmp_path, "verify-ahead.zarr")
    key = "targets/layers/layers.1/c/5/0"
    damaged = bytearray((here / key).read_bytes())
    damaged[3] ^= 0xFF
    (here / key).write_bytes(bytes(damaged))
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).pipe(f"{S3_BUCKET}/verify-ahead.zarr/{key}", bytes(damaged))
    with _far_s3(s3) as (proxy, far):
        remote = verify(url, storage_options=far)
    local = verify(str(here))
    assert proxy.peak > 1, proxy.peak  # old: 1
    said = [[re.sub(re.escape(url) + "|" + re.escape(str(here)), "STORE", p) for p in c["problems"]] for c in remote["checks"]]
    assert not remote["ok"] and said == [[re.sub(re.escape(str(here)), "STORE", p) for p in c["problems"]] for c in local["checks"]]
    assert any("layers.1" in p and "shard 5" in p for p in sum(said, [])), said


def test_export_over_s3_asks_for_the_next_shards_while_it_writes_one(s3, tmp_path: Path, zoo_env):
    """``kdcache export`` of an S3 store read each array's shards one after another, a bucket's latency each; now the
    next are asked for while one is written to the HDF5 file, which holds what the same store in a folder exports."""
    import h5py
    from kdcache.interop import export_hdf5

    zoo_env(N=16, DEPTH=2)
    url, here = _one_store_in_s3_and_a_folder(s3, tmp_path, "export-ahead.zarr")
    with _far_s3(s3) as (proxy, far):
        export_hdf5(url, tmp_path / "remote.h5", storage_options=far)
    export_hdf5(str(here), tmp_path / "here.h5")
    assert proxy.peak > 1, proxy.peak  # old: 1
    with h5py.File(tmp_path / "remote.h5") as remote, h5py.File(tmp_path / "here.h5") as local:
        paths = []
        local.visititems(lambda name, item: paths.append(name) if isinstance(item, h5py.Dataset) else None)
        assert len(paths) >= 6 and all(np.array_equal(remote[p][:], local[p][:]) for p in paths), paths


def test_pack_of_an_s3_store_asks_for_the_next_objects_while_it_copies_one(s3, tmp_path: Path, zoo_env):
    """``kdcache pack`` of an S3 store read its objects one after another, a bucket's latency each; now the next are asked
    for while one is copied into the zip, whose members are those of the same store in a folder packed."""
    import zipfile

    zoo_env(N=16, DEPTH=2)
    url, here = _one_store_in_s3_and_a_folder(s3, tmp_path, "pack-ahead.zarr")
    with _far_s3(s3) as (proxy, far):
        interop.pack(url, tmp_path / "remote.zip", storage_options=far)
    interop.pack(str(here), tmp_path / "here.zip")
    assert proxy.peak > 1, proxy.peak  # old: 1
    with zipfile.ZipFile(tmp_path / "remote.zip") as remote, zipfile.ZipFile(tmp_path / "here.zip") as local:
        names = [n for n in local.namelist() if n != "zarr.json"]  # the manifest names its location: not compared
        assert len(names) > 6 * 8 and remote.namelist() == local.namelist()
        assert all(remote.read(n) == local.read(n) for n in names)


def test_a_read_of_many_shards_holds_their_rows_once(tmp_path: Path, zoo_env):
    """``Store.read`` of whole shards (training's in-memory load reads a complete store in one call per column) decoded
    each shard into an array of its own and joined them: twice the rows held at the end of the read. Now they are
    decoded into the one array returned (numpy's allocations, counted by tracemalloc)."""
    import tracemalloc

    zoo_env(N=4096, DEPTH=1)
    kdcache.extract(deep_pipeline(1, rows_per_shard=256), str(tmp_path / "s.zarr"))  # 16 shards
    store = kdcache.open_store(str(tmp_path / "s.zarr"))
    expected = np.concatenate([store.read(layout.LOGITS, *store.shard_rows(s)) for s in range(store.num_shards)])
    store.read(layout.LOGITS, 0, 256)  # the first read's snapshot and metadata, not counted
    tracemalloc.start()
    try:
        rows = store.read(layout.LOGITS, 0, store.num_samples)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(rows, expected)
    assert peak < 1.5 * rows.nbytes, peak / rows.nbytes  # old: 2.3


def traced(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and tracemalloc's peak during it (numpy's allocations are counted)."""
    import tracemalloc

    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def relu_map_pipeline(rows_per_shard: int) -> Any:
    """extract_zoo's first_pixel teacher storing its ReLU map ``act`` (3x4x4 float32, 192 bytes a row: most of a row read)."""
    return from_dict({
        "teacher": {"factory": "extract_zoo.py:first_pixel"}, "data": {"factory": "extract_zoo.py:images", "split": "train"},
        "targets": {"logits": True, "layers": ["act"], "dtype": "float32"},
        "extract": {"batch_size": 256, "device": "cpu", "rows_per_shard": rows_per_shard},
    }, root=FIXTURES)


SCATTERED = [12, 3, 8, 1, 9]  # shards of a buffer, or of a train.subset: not consecutive


@pytest.mark.parametrize("read", ["read_shards", "in_memory"])
def test_shards_not_consecutive_are_read_into_one_array(tmp_path: Path, zoo_env, read):
    """``Store.read_shards`` (the streaming reader's call, a buffer's shards of a column) read each shard into an array of
    its own and joined them, as training's in-memory load (``cache._read_whole``) did with each run of consecutive shards
    of a ``train.subset``: twice the rows held at the end of the read. Now they are decoded into the one array returned."""
    from kdcache import cache

    zoo_env(N=8192)
    kdcache.extract(relu_map_pipeline(512), str(tmp_path / "s.zarr"))  # 16 shards
    store, act = kdcache.open_store(str(tmp_path / "s.zarr")), layout.layer_path("act")
    expected = np.concatenate([store.read(act, *store.shard_rows(s)) for s in SCATTERED])
    store.read_shards(act, [0])  # the first read's snapshot and metadata, not counted
    if read == "read_shards":
        rows, peak = traced(lambda: store.read_shards(act, SCATTERED))
    else:
        rows, peak = traced(lambda: cache._read_whole(store, [act], np.array(sorted(SCATTERED)), 192, 2048, "s.zarr"))
        rows, expected = rows[act], expected[np.argsort(np.repeat(SCATTERED, 512), kind="stable")]
    assert np.array_equal(rows, expected)
    assert peak < 1.5 * rows.nbytes, peak / rows.nbytes  # old: 2.0


@pytest.fixture(scope="module")
def http_folder(tmp_path_factory):
    """A folder served by ``python -m http.server`` in a process of its own: ``(folder, base_url)``."""
    yield from served_folder(tmp_path_factory.mktemp("www"), "http.server")


def joined(pieces) -> dict[str, np.ndarray]:
    """The columns of a buffer ``TransferSet._read`` returned in pieces, joined."""
    return {p: np.concatenate([piece.columns[p] for piece in pieces]) for p in pieces[0].columns}


def test_a_streaming_buffer_over_http_holds_its_shards_once_and_asks_for_every_column_at_once(http_folder, tmp_path: Path, zoo_env):
    """The streaming reader's buffer from object storage or http (``TransferSet._read``) kept every shard of every column
    in an array of its own, then joined a column's and put them in the buffer's order: three copies of the largest
    column at once. Now each column's shards are decoded into one array (``Store.read_shards``), as from a folder, while
    every column's and shard's object is still asked for at once: the rows those of the folder. (A server in a process
    of its own: tracemalloc counts this one's allocations only.)"""
    import shutil
    from urllib.parse import urlparse

    from kdcache.cache import TransferSet

    root, base = http_folder
    zoo_env(N=13 * 2048)  # a buffer of 1.3 MB: asyncio's socket reads of 256 KiB, which tracemalloc sees, are a small part
    kdcache.extract(relu_map_pipeline(2048), str(tmp_path / "here.zarr"))  # 13 shards
    shutil.copytree(tmp_path / "here.zarr", Path(root) / "buffer.zarr")
    dataset = relu_map_pipeline(2048).resolve("extract_zoo.py:images")("train")
    served = urlparse(base)
    proxy = LatencyProxy((served.hostname, served.port), delay=0.05, counted=r"/(targets|samples)/.*/c/")
    buffer = np.random.default_rng(0).permutation(np.concatenate([np.arange(s * 2048, s * 2048 + 2048) for s in SCATTERED[:3]]))
    ts = TransferSet(f"{base}/buffer.zarr", dataset, ["act"], batch_size=64, memory_budget_mb=0)
    ts._read(buffer[:1])  # the store's opening, markers and digests: not counted
    pieces, peak = traced(lambda: ts._read(buffer))  # the server straight: the proxy's own reads would be counted
    try:
        TransferSet(f"{proxy.url}/buffer.zarr", dataset, ["act"], batch_size=64, memory_budget_mb=0)._read(buffer)
    finally:
        proxy.close()
    here = joined(TransferSet(str(tmp_path / "here.zarr"), dataset, ["act"], batch_size=64, memory_budget_mb=0)._read(buffer))
    columns = joined(pieces)
    assert columns.keys() == here.keys() and all(np.array_equal(columns[p], here[p]) for p in here)
    # more than one column's 3 shards at once, and more than one shard of each of the 4 columns: both overlapped (old too)
    assert proxy.peak > max(3, len(columns)), proxy.peak
    returned = sum(c.nbytes for c in columns.values())
    assert peak < 2.5 * returned, peak / returned  # the shards decoded once and the shuffled copy; old: 2.9


def test_a_read_of_many_shards_of_an_s3_store_asks_for_the_next_while_it_decodes_one(s3, tmp_path: Path, zoo_env):
    """``Store.read`` of whole shards of an S3 store (training's in-memory load of a store in a bucket) fetched each
    shard's object in turn; now the next are asked for while one is decoded, the rows those of the folder copy."""
    from urllib.parse import urlparse

    from conftest import S3_BUCKET

    zoo_env(N=16, DEPTH=1)
    url = f"s3://{S3_BUCKET}/many-ahead.zarr"
    kdcache.extract(deep_pipeline(1, rows_per_shard=2), url, storage_options=s3)
    kdcache.extract(deep_pipeline(1, rows_per_shard=2), str(tmp_path / "here.zarr"))
    endpoint = urlparse(s3["endpoint_url"])
    proxy = LatencyProxy((endpoint.hostname, endpoint.port), delay=0.05, counted=r"/targets/.*/c/")
    try:
        store = kdcache.open_store(url, storage_options={**s3, "endpoint_url": proxy.url})
        rows = store.read(layout.LOGITS, 0, store.num_samples)
    finally:
        proxy.close()
    assert proxy.peak > 1, proxy.peak  # old: 1
    assert np.array_equal(rows, kdcache.open_store(str(tmp_path / "here.zarr")).read(layout.LOGITS, 0, 16))


def test_an_s3_stores_arrays_are_listed_at_once_where_done_shards_are_looked_for_objects_they_lack(s3, tmp_path: Path, zoo_env):
    """Train's look for done shards lacking objects before its run (and extract's resume, pack's and verify's) listed
    each array's objects one array after another: a listing's pages follow one another (10 of 1,000 keys an array at
    10,000 shards), and the arrays' listings waited on each other too, 60 round trips of a bucket far away for 6 arrays
    there. Now the arrays are listed at once (``layout.LISTINGS``); a lost object is found as before."""
    import s3fs
    from conftest import S3_BUCKET

    zoo_env(N=16, DEPTH=2)
    url, _ = _one_store_in_s3_and_a_folder(s3, tmp_path, "listed-at-once.zarr")
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).rm(f"{S3_BUCKET}/listed-at-once.zarr/targets/layers/layers.1/c/5/0")
    with _far_s3(s3, counted=r"list-type=2") as (proxy, far):
        lost = layout.open_store(url, storage_options=far).unbacked_shards()
    assert lost == {5: "object 'targets/layers/layers.1/c/5/0' is missing (deleted, or an incomplete copy)"}, lost
    assert sum("list-type=2" in r for r in proxy.requests) == 7, proxy.requests  # 6 data arrays and progress/digest
    assert proxy.peak > 1, proxy.peak  # old: 1
