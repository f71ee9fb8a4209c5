"""kdcache.cache.TransferSet against real stores: every batch pairs each row with its own dataset item.

The ``numbered`` store (tests/fixtures/numbered.py) makes alignment visible: the input of dataset
item ``i`` is filled with ``i``, the stored logits are ``i + (0, 1, 2, 3)`` and the label is ``i % 4``,
so one wrong pairing anywhere shows up as a number in the wrong place.
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from kdcache import store as layout
from kdcache.cache import Check, ShardGroups, TransferSet, done_rows
from kdcache.data import Prefetch, stop_making
from kdcache.errors import AlignmentError, PipelineError, StoreError, StoreReplacedError
from numbered import Numbered

N, ROWS_PER_SHARD, BATCH = 100, 16, 8
SUBSET = np.sort(np.random.default_rng(3).permutation(N)[:37])
# Datasets that differ from the store's only between its first and last items, whose fingerprints the manifest records
# and every reader checks at the start: what they show is the check of the rows served.
INNER_REVERSED = [0, *range(N - 2, 0, -1), N - 1]
INNER_SHUFFLED = [0, *(1 + np.random.default_rng(0).permutation(N - 2)).tolist(), N - 1]
ROW = re.compile(r"store row (\d+) \(dataset index (\d+)\)")


def transfer(location: str, dataset=None, **kwargs) -> TransferSet:
    kwargs.setdefault("batch_size", BATCH)
    return TransferSet(location, dataset if dataset is not None else Numbered(N), [layout.LOGITS], **kwargs)


def serve(ts: TransferSet, epoch: int, workers: int = 0) -> list[dict]:
    ts.set_epoch(epoch)
    if workers:  # its workers stopped however it ends, as train stops them (a failed iterator's, left to the garbage
        batches = iter(DataLoader(ts, batch_size=None, num_workers=workers))  # collector, cost the next test torch's 5 s join)
        try:
            return list(batches)
        finally:
            stop_making(batches)
    return list(ts)


def check_aligned(batch: dict) -> None:
    """Inputs, targets and labels of every row all name the row's own dataset item."""
    rows, index = batch["rows"], batch["index"]
    assert torch.equal(index, rows)  # the numbered store holds dataset item r in row r
    x = batch["inputs"]
    assert x.shape == (len(rows), 1, 4, 4)
    assert torch.equal(x, index.float()[:, None, None, None].expand_as(x))
    expected = index.float()[:, None] + torch.arange(4.0)
    assert batch["targets"][layout.LOGITS].dtype == torch.float32
    assert torch.equal(batch["targets"][layout.LOGITS], expected)
    assert torch.equal(batch["label"], index % 4)


MODES = {
    # name: (memory_budget_mb, buffer_shards, DataLoader workers, rows)
    "memory": (2048.0, 4, 0, None),
    "memory-subset-workers": (2048.0, 4, 2, SUBSET),
    "stream-buffer1": (0.0, 1, 0, None),
    "stream-buffer3-subset": (0.0, 3, 0, SUBSET),
    "stream-buffer3-workers": (0.0, 3, 2, None),
    "stream-buffer1-subset-workers": (0.0, 1, 2, SUBSET),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_batch_pairs_rows_with_their_items(numbered_store, mode):
    budget, buffer_shards, workers, rows = MODES[mode]
    ts = transfer(numbered_store, seed=7, rows=rows, memory_budget_mb=budget, buffer_shards=buffer_shards)
    assert ts.in_memory == (budget > 0)
    expected = np.arange(N) if rows is None else rows
    orders = []
    for epoch in range(3):
        batches = serve(ts, epoch, workers)
        assert len(batches) == ts.batches_per_epoch(epoch)
        for batch in batches:
            check_aligned(batch)
            assert 1 <= len(batch["rows"]) <= BATCH
            if not ts.in_memory:  # a batch comes from one buffer: at most buffer_shards shards
                assert len(np.unique(batch["rows"].numpy() // ROWS_PER_SHARD)) <= buffer_shards
        order = np.concatenate([b["rows"].numpy() for b in batches])
        assert np.array_equal(np.sort(order), expected), "an epoch serves every row exactly once"
        assert not np.array_equal(order, expected), "shuffled"
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])

    # Same (seed, epoch): the same order, from a fresh reader (as a resumed run would have).
    again = transfer(numbered_store, seed=7, rows=rows, memory_budget_mb=budget, buffer_shards=buffer_shards)
    assert np.array_equal(np.concatenate([b["rows"].numpy() for b in serve(again, 1, workers)]), orders[1])
    other = transfer(numbered_store, seed=8, rows=rows, memory_budget_mb=budget, buffer_shards=buffer_shards)
    assert not np.array_equal(np.concatenate([b["rows"].numpy() for b in serve(other, 1)]), orders[1])


def test_the_public_transfer_set_takes_target_names_and_serves_a_loop_of_ones_own(numbered_store):
    """kdcache.TransferSet, as the README's own-loop example uses it: targets by name, a DataLoader with workers,
    set_epoch per epoch; an unknown name lists the store's targets."""
    import kdcache

    assert kdcache.TransferSet is TransferSet
    ts = kdcache.TransferSet(numbered_store, Numbered(N), ["logits"], batch_size=BATCH, seed=1)
    assert ts.paths[-1] == layout.LOGITS
    loader = DataLoader(ts, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in range(2):
        ts.set_epoch(epoch)
        served = []
        for batch in loader:
            check_aligned(batch)
            served.append(batch["rows"].numpy())
        assert np.array_equal(np.sort(np.concatenate(served)), np.arange(N))
    with pytest.raises(StoreError, match=re.escape(f"{numbered_store!r} stores no target 'features.3'; name one of its targets: 'logits'")):
        kdcache.TransferSet(numbered_store, Numbered(N), ["features.3"], batch_size=BATCH)


@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_a_pathlib_location_serves_as_its_string_does(numbered_store, budget):
    """A location may be a ``pathlib.Path``: streaming read it as a string (``location_kind``) and raised TypeError."""
    from pathlib import Path

    ts = transfer(Path(numbered_store), memory_budget_mb=budget)
    assert ts.location == numbered_store
    batches = serve(ts, 0)
    for batch in batches:
        check_aligned(batch)
    assert np.array_equal(np.sort(np.concatenate([b["rows"].numpy() for b in batches])), np.arange(N))


@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_unshuffled_serves_store_order(numbered_store, budget):
    ts = transfer(numbered_store, shuffle=False, memory_budget_mb=budget, buffer_shards=2)
    batches = serve(ts, 0)
    for batch in batches:
        check_aligned(batch)
    assert np.array_equal(np.concatenate([b["rows"].numpy() for b in batches]), np.arange(N))


def reference_plan(rows: np.ndarray, rows_per_shard: int, buffer_shards: int, shuffle: bool, seed: int, epoch: int) -> list[np.ndarray]:
    """The streaming plan as specified: shards in a seeded order, ``buffer_shards`` at a time; a buffer is the
    rows of its shards in the rows' own order, then permuted (the plan of earlier releases, row for row)."""
    rng = np.random.default_rng([seed, epoch])
    shard_of = rows // rows_per_shard
    shards = np.unique(shard_of)
    shards = rng.permutation(shards) if shuffle else shards
    buffers = [rows[np.isin(shard_of, shards[i : i + buffer_shards])] for i in range(0, len(shards), buffer_shards)]
    return [rng.permutation(b) if shuffle else b for b in buffers]


def streaming_reader(rows: np.ndarray, rows_per_shard: int, buffer_shards: int, shuffle: bool, seed: int) -> TransferSet:
    """A TransferSet's planning state alone (no store): plan() reads nothing else."""
    ts = TransferSet.__new__(TransferSet)
    ts.rows, ts.rows_per_shard, ts.buffer_shards, ts.shuffle, ts.seed = rows, rows_per_shard, buffer_shards, shuffle, seed
    ts.in_memory, ts.groups = False, ShardGroups.of(rows, rows_per_shard)
    return ts


def test_streaming_plan_equals_its_specification_for_any_rows():
    rng = np.random.default_rng(11)
    for trial in range(300):
        n, rows_per_shard, buffer_shards = int(rng.integers(0, 400)), int(rng.integers(1, 40)), int(rng.integers(1, 6))
        rows = [np.arange(n), np.sort(rng.permutation(n)[: n // 2]), rng.permutation(n)[: n // 2]][trial % 3].astype(np.int64)
        shuffle, seed, epoch = bool(trial % 2), trial, int(rng.integers(0, 5))
        reader = streaming_reader(rows, rows_per_shard, buffer_shards, shuffle, seed)
        plan = list(reader.plan(epoch))
        expected = reference_plan(rows, rows_per_shard, buffer_shards, shuffle, seed, epoch)
        assert len(plan) == len(expected), (trial, n)
        for got, want in zip(plan, expected):
            assert np.array_equal(got, want), (trial, n, rows_per_shard, buffer_shards)
        assert reader.buffer_sizes(epoch) == [len(b) for b in expected]  # what step counts use, without the shuffles
        reader.in_memory, reader.batch_size, reader.streams = True, int(rng.integers(1, 9)), int(rng.integers(1, 3))
        assert reader.buffer_sizes(epoch) == [len(b) for b in reader.plan(epoch)]


def test_streaming_plan_time_grows_linearly_with_rows():
    """Each buffer used to scan every row (np.isin per buffer): quadratic, 2.4 s per plan at 1.28M rows.

    Timed in this thread's CPU seconds: by the wall clock, a loaded machine that took the CPU away during the longer
    plan made it look 35x the shorter one (1 in 4 runs beside a busy process)."""
    def seconds(n: int) -> float:
        ts = streaming_reader(np.arange(n, dtype=np.int64), 64, 4, True, 0)
        best = float("inf")
        for _ in range(3):
            start = time.thread_time()
            list(ts.plan(0))
            best = min(best, time.thread_time() - start)
        return best

    small, large = seconds(80_000), seconds(640_000)  # 8x the rows: ~8x the time if linear, ~64x if quadratic
    assert large / small < 32, f"plan time grew {large / small:.1f}x for 8x the rows ({small:.4f} s -> {large:.4f} s)"


def reference_stream_steps(plan: list[np.ndarray], streams: int, stream: int | None, batch: int, drop_last: bool,
                           k: int, me: int) -> list[tuple[list[int], float]]:
    """Each step's rows and share as specified, from the whole plan: buffer i goes to stream i % streams, step j
    is batch j of every stream (joined, or stream ``stream``'s alone, else the plan's first row with share 0);
    DataLoader worker ``me`` of ``k`` serves steps me, me + k, ..."""
    batches: list[list[np.ndarray]] = [[] for _ in range(streams)]
    for i, rows in enumerate(plan):
        for lo in range(0, len(rows), batch):
            if not (drop_last and lo + batch > len(rows)):
                batches[i % streams].append(rows[lo : lo + batch])
    steps = []
    for j in range(me, max(len(b) for b in batches), k):
        parts = [b[j] for b in batches if j < len(b)]
        own = parts if stream is None else [batches[stream][j]] if j < len(batches[stream]) else []
        share = sum(map(len, own)) / sum(map(len, parts))
        steps.append(([int(r) for p in own for r in p] if own else [int(plan[0][0])], share))
    return steps


@pytest.mark.parametrize("subset", [False, True], ids=["all", "subset"])
def test_stream_steps_follow_the_whole_plan(numbered_store, subset):
    """Streams make the plan's buffers one at a time, in order; what each stream (or the joined streams) serves
    at each step must be what the whole plan specifies, for every rank and DataLoader worker."""
    rng = np.random.default_rng(5)
    for trial in range(12):
        streams, buffer_shards, drop_last = int(rng.integers(2, 5)), int(rng.integers(1, 3)), bool(trial % 2)
        batch, k = int(rng.integers(3, 12)), 1 + trial % 3
        kw = dict(seed=trial, memory_budget_mb=0, buffer_shards=buffer_shards, drop_last=drop_last, batch_size=batch,
                  rows=SUBSET if subset else None, fingerprint_check=0.5)
        for stream in [None, *range(streams)]:
            ts = transfer(numbered_store, streams=streams, stream=stream, **kw)
            plan = list(ts.plan(trial))
            served = 0
            for me in range(k):
                steps = list(ts._stream_steps(trial, k, me, Check(0.5, np.random.default_rng(0))))
                want = reference_stream_steps(plan, streams, stream, batch, drop_last, k, me)
                assert [(b["rows"].tolist(), b["share"]) for b in steps] == want, (trial, stream, me)
                served += len(steps)
                for b in steps:
                    check_aligned(b)
                    assert b["scale"] == (1.0 if stream is None else streams * b["share"])
            assert served == ts.batches_per_epoch(trial), (trial, stream)  # what train counts its steps with


def test_streaming_plan_memory_is_one_buffer_not_every_row():
    """An epoch's plan is made buffer by buffer: a sort of every row per epoch cost 24 bytes per row
    (240 MB per DataLoader worker at 10M rows); now the peak is a buffer and the shard order."""
    n, rows_per_shard, buffer_shards = 1_000_000, 1000, 4
    ts = streaming_reader(np.arange(n, dtype=np.int64), rows_per_shard, buffer_shards, True, 0)
    tracemalloc.start()
    try:
        served = sum(len(rows) for rows in ts.plan(3))
        sizes = ts.buffer_sizes(3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert served == n and sum(sizes) == n and len(sizes) == n // (rows_per_shard * buffer_shards)
    assert peak < 2 * 2**20, f"making a plan of {n} rows peaked at {peak / n:.1f} bytes per row"


@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_reversed_dataset_is_an_alignment_error_naming_row_and_index(numbered_store, budget):
    ts = transfer(numbered_store, Numbered(N, order=INNER_REVERSED), seed=1, memory_budget_mb=budget, buffer_shards=2)
    first = next(ts.plan(0))[0]  # the first row served is the first one checked
    with pytest.raises(AlignmentError, match=rf"store row {first} \(dataset index {first}\)"):
        serve(ts, 0)


@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_one_changed_sample_is_found_in_whichever_batch_it_falls(numbered_store, budget):
    ts = transfer(numbered_store, Numbered(N, changed=(37,)), seed=2, memory_budget_mb=budget, buffer_shards=3)
    with pytest.raises(AlignmentError, match=r"store row 37 \(dataset index 37\).*re-extract"):
        serve(ts, 0)


def test_a_quarter_of_rows_checked_still_catches_a_shuffled_dataset(numbered_store):
    perm = INNER_SHUFFLED
    ts = transfer(numbered_store, Numbered(N, order=perm), fingerprint_check=0.25)
    with pytest.raises(AlignmentError) as info:
        serve(ts, 0)
    row, index = map(int, ROW.search(str(info.value)).groups())
    assert row == index and perm[index] != index


def test_fingerprint_check_zero_checks_no_row(numbered_store):
    """The rows' check is what catches a changed dataset: switched off, a dataset shuffled between its first and last
    items (the two the manifest records, checked at the start) is served (wrongly)."""
    ts = transfer(numbered_store, Numbered(N, order=INNER_SHUFFLED), fingerprint_check=0)
    assert sum(len(b["rows"]) for b in serve(ts, 0)) == N


def test_first_epoch_checks_every_row_later_epochs_the_recheck_fraction(numbered_store, monkeypatch):
    """The first epoch set (a run's first, resumed or not) hashes all rows; later ones a seeded fraction."""
    from kdcache import data

    hashed: list[int] = []
    real = data.fingerprint_rows
    monkeypatch.setattr(data, "fingerprint_rows", lambda batch, rows: hashed.append(len(rows)) or real(batch, rows))
    ts = transfer(numbered_store, fingerprint_recheck=0.25)
    counts = []
    for epoch in (3, 4, 5, 3):  # 3 first (as after a resume), and again later: still the first epoch set
        hashed.clear()
        serve(ts, epoch)
        counts.append(sum(hashed))
    assert counts[0] == counts[3] == N
    assert 0 < counts[1] < N / 2 and 0 < counts[2] < N / 2 and counts[1] != counts[2]  # seeded per epoch


def test_items_of_mixed_dtypes_are_checked_as_they_were_hashed(tmp_path):
    """A batch holding a float64 item among float32 ones is stacked as float64: its rows' bytes are not the
    items' bytes, so the fingerprints are recomputed item by item (a false 'dataset changed' otherwise)."""
    import kdcache
    from kdcache.pipeline import from_dict

    from conftest import FIXTURES, NUMBERED

    store = str(tmp_path / "mixed.zarr")
    kdcache.extract(from_dict({**NUMBERED, "data": {"factory": "numbered.py:numbered_mixed"}}, root=FIXTURES), store)
    for workers in (0, 2):
        batches = serve(transfer(store, Numbered(N, float64_every=7)), 0, workers)
        assert sorted(r for b in batches for r in b["rows"].tolist()) == list(range(N))
        assert any(b["inputs"].dtype == torch.float64 for b in batches)
    for changed in (14, 15):  # a float64 item and a float32 one
        with pytest.raises(AlignmentError, match=rf"store row {changed} "):
            list(transfer(store, Numbered(N, float64_every=7, changed=(changed,))))
    # Checking a fraction looks at the checked items' dtypes only: a checked float32 item in a batch another
    # (unchecked) float64 item promoted is hashed by itself, and a changed item among the checked ones is found.
    for fraction in (0.1, 0.5):
        checked = serve(transfer(store, Numbered(N, float64_every=7), fingerprint_check=fraction, batch_size=16), 0)
        assert sorted(r for b in checked for r in b["rows"].tolist()) == list(range(N))
    with pytest.raises(AlignmentError, match=r"store row \d+ "):
        serve(transfer(store, Numbered(N, float64_every=7, changed=tuple(range(1, N - 1, 7))), fingerprint_check=0.5, batch_size=16), 0)


def test_without_set_epoch_every_pass_checks_every_row(numbered_store):
    ts = transfer(numbered_store, Numbered(N, changed=(61,)), fingerprint_recheck=0.0)
    for _ in range(2):
        with pytest.raises(AlignmentError, match=r"store row 61 "):
            list(ts)


def test_dataset_that_changes_after_the_first_epoch_is_caught_by_the_recheck(numbered_store):
    dataset = Numbered(N)
    ts = transfer(numbered_store, dataset, fingerprint_recheck=0.05)
    serve(ts, 0)
    dataset.order = np.random.default_rng(1).permutation(N).tolist()  # e.g. the data files were rewritten
    with pytest.raises(AlignmentError):
        serve(ts, 1)
    assert len(serve(transfer(numbered_store, Numbered(N), fingerprint_recheck=0.0), 1)) > 0


@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_persistent_workers_follow_set_epoch(numbered_store, budget):
    """One DataLoader for the whole run (its worker processes live across epochs) serves each epoch's own plan."""
    def batches(served: list[dict]) -> list[tuple[int, ...]]:
        return sorted(tuple(b["rows"].tolist()) for b in served)

    ts = transfer(numbered_store, memory_budget_mb=budget, buffer_shards=2, seed=5)
    loader = DataLoader(ts, batch_size=None, num_workers=2, persistent_workers=True)
    seen = []
    for epoch in (0, 1, 2):
        ts.set_epoch(epoch)
        served = list(loader)
        for batch in served:
            check_aligned(batch)
        seen.append(batches(served))
        alone = transfer(numbered_store, memory_budget_mb=budget, buffer_shards=2, seed=5)
        assert seen[-1] == batches(serve(alone, epoch))
    assert seen[0] != seen[1] != seen[2]


@pytest.mark.parametrize("batch_size", [0, -8, 2.5])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused_at_once(numbered_store, batch_size):
    """Not at the first batch as range()'s ValueError (0), nor as epochs of no batches (negative)."""
    with pytest.raises(PipelineError, match=re.escape(f"batch_size must be an integer >= 1, got {batch_size!r}")):
        transfer(numbered_store, batch_size=batch_size)


def test_targets_given_as_one_string_or_a_store_with_storage_options_are_refused(numbered_store):
    """``TransferSet(loc, ds, "logits", ...)`` read each character as a target (``stores no target 'l'``). An opened Store
    is read through (``test_a_reader_handed_an_opened_store_…``), with its own storage options: others given beside it are
    refused, not dropped unsaid."""
    with pytest.raises(PipelineError, match=r"^paths is the string 'logits', not a list of targets' names or array paths; pass \['logits'\]$"):
        TransferSet(numbered_store, Numbered(N), "logits", batch_size=BATCH)
    with pytest.raises(PipelineError, match=r"^storage_options were given with an opened Store, which has its own \(\{}\); drop them, "
                                            r"or pass the store's location with them$"):
        TransferSet(layout.open_store(numbered_store), Numbered(N), ["logits"], batch_size=BATCH, storage_options={"anon": True})


@pytest.mark.parametrize("arguments, said", [
    (dict(fingerprint_check=2), r"^fingerprint_check is a fraction of rows, from 0 to 1, got 2; use e.g. 1.0 \(every row\) or 0.05$"),
    (dict(fingerprint_recheck=-0.5), r"^fingerprint_recheck is a fraction of rows, from 0 to 1, got -0.5;"),
    (dict(fingerprint_check=float("nan")), r"^fingerprint_check is a fraction of rows, from 0 to 1, got nan;"),
    (dict(fingerprint_check="0.5"), r"^fingerprint_check is a fraction of rows, from 0 to 1, got '0.5';"),
    (dict(memory_budget_mb=-1), r"^memory_budget_mb must be a number of MiB >= 0, got -1; use e.g. 2048 .* or 0 to stream them$"),
    (dict(memory_budget_mb=float("nan")), r"^memory_budget_mb must be a number of MiB >= 0, got nan;"),
    (dict(buffer_shards=0), r"^buffer_shards must be an integer >= 1, got 0$"),
    (dict(streams=0), r"^streams must be an integer >= 1, got 0$"),
    (dict(streams=2, stream=2), r"^stream must be None \(every stream\) or a stream from 0 to 1, got 2$"),
    (dict(seed=None), r"^seed must be an integer >= 0, got None;"),
    (dict(seed=-1), r"^seed must be an integer >= 0, got -1;"),
])
def test_values_outside_their_range_are_refused_at_once(numbered_store, arguments, said):
    """A fraction above 1 checked every row and one below 0 (or NaN) none, a negative budget streamed, buffer_shards and
    streams of 0 were taken as 1, all without a word; a stream outside the streams (IndexError) and a seed of None or
    below 0 (TypeError, ValueError) failed at the first batch."""
    with pytest.raises(PipelineError, match=said):
        transfer(numbered_store, **arguments)


def test_targets_given_as_none_are_refused_and_none_serves_inputs_and_labels(numbered_store):
    """``paths=None`` was a TypeError (``'NoneType' object is not iterable``); ``[]`` is a labels-only loop's reader
    (``kdcache train`` with train.loss.ce alone builds one)."""
    with pytest.raises(PipelineError, match=r"^paths must be a list of targets' names or array paths, got None; pass e.g. \['logits'\]"):
        TransferSet(numbered_store, Numbered(N), None, batch_size=BATCH)
    for batch in serve(TransferSet(numbered_store, Numbered(N), [], batch_size=BATCH), 0):
        assert batch["targets"] == {} and torch.equal(batch["label"], batch["index"] % 4)


@pytest.mark.parametrize("n", [90, 120])
def test_dataset_of_another_length_is_refused(numbered_store, n):
    """The error names what the store was extracted from (another split or factory is the usual mistake). A longer
    dataset is refused too, though each store row finds an item at its index (here even its own, checks all pass): a
    split that grew since is not the dataset the store was made from."""
    with pytest.raises(StoreError, match=rf"^the dataset has {n} samples but '.*' has 100 \(extracted from numbered\.py:numbered\('train'\)\); "
                                         r"use the dataset the store was made from$"):
        transfer(numbered_store, Numbered(n))


def test_a_dataset_that_is_not_map_style_is_refused(numbered_store):
    """An IterableDataset was a bare ``TypeError: object of type ... has no len()``; a dict of splits "has 1 samples"."""
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    for dataset, kind in ((Stream(), "an IterableDataset"), ({"train": Numbered(N)}, "dict")):
        with pytest.raises(PipelineError, match=rf"^dataset is {kind}, not a map-style dataset; return an object with __len__ and __getitem__"):
            transfer(numbered_store, dataset)


def record_reads(monkeypatch) -> list[tuple[str, int, int]]:
    """A list that each store read made from now on adds itself to, as ``(path, start, stop)``: a ``Store.read`` as it is
    asked, a ``Store.read_shards`` (the streaming reader's: a column's shards of a buffer in one call) as each shard's rows."""
    calls: list[tuple[str, int, int]] = []
    read, read_shards = layout.Store.read, layout.Store.read_shards

    def recording_read(self, path, start, stop, **kwargs):
        calls.append((path, start, stop))
        return read(self, path, start, stop, **kwargs)

    def recording_read_shards(self, path, shards, **kwargs):
        calls.extend((path, *self.shard_rows(s)) for s in shards)
        return read_shards(self, path, shards, **kwargs)

    monkeypatch.setattr(layout.Store, "read", recording_read)
    monkeypatch.setattr(layout.Store, "read_shards", recording_read_shards)
    return calls


@pytest.mark.parametrize("buffer_shards", [1, 3])
def test_streaming_reads_only_whole_shards(numbered_store, monkeypatch, buffer_shards):
    """Every read (Store.read, or Store.read_shards: a column's shards of a buffer in one call) is of whole shards of one
    array, and each shard is read once per array per epoch."""
    calls = record_reads(monkeypatch)
    ts = transfer(numbered_store, seed=4, rows=SUBSET, memory_budget_mb=0, buffer_shards=buffer_shards)
    store = layout.open_store(numbered_store)
    for epoch in range(2):
        calls.clear()
        for batch in serve(ts, epoch):
            check_aligned(batch)
        for _path, start, stop in calls:
            assert start % ROWS_PER_SHARD == 0 and (start, stop) == store.shard_rows(start // ROWS_PER_SHARD)
        shards = sorted(set(SUBSET // ROWS_PER_SHARD))
        paths = [layout.INDEX, layout.FINGERPRINT, layout.LABEL, layout.LOGITS]
        assert sorted(calls) == sorted((p, *store.shard_rows(s)) for p in paths for s in shards)


def test_in_memory_reads_each_array_once_up_front(numbered_store, monkeypatch):
    calls: list[tuple] = []
    ts = transfer(numbered_store, memory_budget_mb=2048)  # reads every array whole, through Store.read
    monkeypatch.setattr(layout.Store, "read", lambda self, *a: calls.append(a))
    for batch in serve(ts, 0):
        check_aligned(batch)
    assert ts.in_memory and calls == []


@pytest.mark.parametrize("shards", [range(7), [0, 1], [1, 2], [0, 3, 6]])
def test_in_memory_rows_are_served_from_their_shards_place_in_ram(numbered_store, shards):
    """The targets in RAM hold the shards of the rows back to back: a row's place there is its shard's place among them
    plus its place in the shard. Every row served, the store's partial last shard's too (96..99), is its own dataset item,
    with its own targets and label, whether the shards held are the store's first ones or not."""
    rows = np.concatenate([np.arange(*layout.open_store(numbered_store).shard_rows(s)) for s in shards])
    ts = transfer(numbered_store, rows=rows, memory_budget_mb=2048, fingerprint_check=1.0)
    assert ts.in_memory
    for epoch in (0, 1):
        batches = serve(ts, epoch)
        for batch in batches:
            check_aligned(batch)
        assert sorted(np.concatenate([b["rows"].numpy() for b in batches]).tolist()) == rows.tolist()


def test_incomplete_store_serves_done_shards_only(numbered_store, tmp_path):
    location = str(tmp_path / "partial.zarr")
    shutil.copytree(numbered_store, location)
    zarr.open_group(location, mode="r+")[layout.DONE][2] = False  # rows 32..47
    store = layout.open_store(location)
    assert not store.complete and store.samples_done() == N - 16
    expected = np.setdiff1d(np.arange(N), np.arange(32, 48))
    assert np.array_equal(done_rows(store), expected)
    for budget in (2048.0, 0.0):
        ts = transfer(location, memory_budget_mb=budget)
        served = np.concatenate([b["rows"].numpy() for b in serve(ts, 0)])
        assert np.array_equal(np.sort(served), expected)


@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_rows_of_a_shard_not_done_are_refused_when_asked_for(numbered_store, tmp_path, budget):
    """rows= naming rows of a shard not yet written (a store still being extracted): in RAM they read as the fill values,
    index 0 and zero logits, and were served as dataset item 0's targets (fingerprint_check = 0: without a word; else an
    AlignmentError blaming a changed dataset); streamed, the first read of the shard failed. Refused up front now."""
    location = tmp_path / "partial.zarr"
    shutil.copytree(numbered_store, location)
    zarr.open_group(location, mode="r+")[layout.DONE][2] = False  # rows 32..47, never written:
    for chunk in [*location.glob("samples/*/c/2"), *location.glob("targets/*/c/2"), location / "progress" / "digest" / "c" / "2"]:
        shutil.rmtree(chunk) if chunk.is_dir() else chunk.unlink()
    with pytest.raises(StoreError, match=r"^rows include row 32 of shard 2 \(rows 32-47\), which is not done: .* is incomplete "
                                         r"\(6/7 shards done\).*pass rows of done shards only"):
        transfer(str(location), rows=np.arange(N), memory_budget_mb=budget, fingerprint_check=0.0)
    ok = np.setdiff1d(np.arange(0, N, 3), np.arange(32, 48))
    for batch in serve(transfer(str(location), rows=ok, memory_budget_mb=budget), 0):
        check_aligned(batch)


@pytest.mark.parametrize("rows, said", [([5, N], rf"store rows from 0 to {N - 1} .*, got {N}$"), ([-1, 5], r"got -1$"),
                                        ([2.7, 5.0], r"integer store rows, got \[2\.7, 5\.0\]"),
                                        (np.arange(N) % 3 == 0, r"integer store rows, got array\(\[ True"), ([[1, 2]], r"1-D")])
@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_rows_that_are_not_store_rows_are_refused(numbered_store, rows, said, budget):
    """Out of range was an IndexError at the first batch; -1 was the last row in RAM and left out streamed; 2.7 was row 2;
    a boolean mask (the labeled rows) was rows 0 and 1 over and over."""
    with pytest.raises(PipelineError, match=said):
        transfer(numbered_store, rows=rows, memory_budget_mb=budget)


@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_an_epoch_started_early_keeps_its_own_plan_and_check(numbered_store, budget):
    """``train`` starts epoch e+1's batches before it saves epoch e, then sets no epoch until they are
    served; an iterator made before a later ``set_epoch`` must still serve its own epoch, fully checked."""
    ts = transfer(numbered_store, memory_budget_mb=budget, buffer_shards=2, seed=5)
    ts.set_epoch(0)
    early = iter(ts)
    ts.set_epoch(1)
    served = list(early)
    for batch in served:
        check_aligned(batch)
    alone = transfer(numbered_store, memory_budget_mb=budget, buffer_shards=2, seed=5)
    assert [b["rows"].tolist() for b in served] == [b["rows"].tolist() for b in serve(alone, 0)]

    # epoch 0 is the first epoch set: every row checked, even after set_epoch(1) (recheck 0) and even
    # for the last batch, which the producer (two batches ahead) cannot have made before set_epoch
    ts = transfer(numbered_store, Numbered(N, changed=(N - 2,)), memory_budget_mb=budget, shuffle=False, fingerprint_recheck=0.0)
    ts.set_epoch(0)
    early = iter(ts)
    ts.set_epoch(1)
    with pytest.raises(AlignmentError, match=rf"store row {N - 2} "):
        list(early)


def reads_logged(ts: TransferSet, fail_at: int = -1) -> list[tuple[int, str]]:
    """Log each buffer read of ``ts`` (its first row, the reading thread's name); read ``fail_at`` raises."""
    log: list[tuple[int, str]] = []
    real = ts._read

    def read(rows):
        log.append((int(rows[0]), threading.current_thread().name))
        if len(log) - 1 == fail_at:
            raise StoreError(f"read {fail_at} failed")
        return real(rows)

    ts._read = read
    return log


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_streaming_reads_the_next_buffer_while_this_one_is_served(numbered_store):
    """The store's buffers are read in a thread of their own from the moment the epoch's iterator is made (the first
    while the last epoch is saved), one ahead of the buffer batches are being made from: nothing asked for, batches
    0-2 are made ahead (buffers 0 and 1) and buffer 2 is read, no more."""
    ts = transfer(numbered_store, memory_budget_mb=0, buffer_shards=1)  # 7 buffers of one shard (16 rows, 2 batches each)
    log = reads_logged(ts)
    it = iter(ts)
    wait_for(lambda: len(log) == 3)
    time.sleep(0.3)
    assert len(log) == 3 and all(name.startswith("kdcache-read-ahead") for _, name in log)
    batches = list(it)
    assert len(log) == 7 and sorted(r for b in batches for r in b["rows"].tolist()) == list(range(N))


def most_held(ts: TransferSet, workers: int = 0, step: float = 0.02) -> int:
    """The most bytes of what ``ts``'s reads returned (weak references to their arrays) alive at once in one reader, over
    an epoch served to a loop slower than the batches are made (each step ``step`` seconds: the batches made ahead wait),
    looked at as each read returns and as each batch is taken. A DataLoader worker (forked) keeps its own figure."""
    import multiprocessing
    import weakref

    most = multiprocessing.RawValue("q", 0)  # shared with a forked worker
    reads: list[list[weakref.ref]] = []
    lock = threading.Lock()
    real = ts._read

    def look() -> None:
        with lock:
            most.value = max(most.value, sum(a.nbytes for refs in reads for a in (r() for r in refs) if a is not None))

    def read(rows):
        pieces = real(rows)
        with lock:
            reads.append([weakref.ref(c) for piece in pieces for c in piece.columns.values()])  # a buffer's pieces (_pieces)
        look()
        return pieces

    ts._read = read
    ts.set_epoch(0)
    batches = iter(DataLoader(ts, batch_size=None, num_workers=workers)) if workers else iter(ts)
    try:
        for _ in batches:
            time.sleep(step)
            look()
    finally:
        stop_making(batches)
    return most.value


@pytest.mark.parametrize("batch, streams, workers", [(16, 1, 0), (8, 1, 0), (6, 1, 0), (2, 1, 0), (16, 1, 1), (16, 2, 0)],
                         ids=["1-batch-a-buffer", "2-batches", "3-batches", "8-batches", "1-batch-a-worker", "2-streams"])
def test_streaming_holds_no_more_of_its_buffers_than_its_memory_check_counts(numbered_store, batch, streams, workers):
    """A buffer's batches are views of it: where one makes fewer batches than are made ahead and handed on (the step's,
    PREFETCH made ahead; a DataLoader worker's until copied to shared memory), the batches alive spanned up to 4
    buffers beside the one served and the next, read ahead, and 3 buffers where it makes many (its last batches still
    held as the next buffer's read ends), where the memory check counted 2: a store of small shards and large rows
    (activation maps) was OOM-killed hours in. A buffer's last batches now hold rows of their own (``_pieces``) and
    the check counts them: what is alive never exceeds ``footprint``, which is 2 buffers and those batches. Joined
    streams' batches are copies: K + 1 buffers, no batches counted. (7 buffers of one shard of 16 rows, the last of 4.)"""
    from kdcache.cache import TAIL

    ts = transfer(numbered_store, batch_size=batch, memory_budget_mb=0, buffer_shards=1, streams=streams)
    f, buffer = ts.footprint(workers), ROWS_PER_SHARD * ts.row_bytes
    held = most_held(ts, workers)
    assert held <= f.nbytes, (held / buffer, f)
    if streams == 1:  # 2 buffers a reader, and the last batches of the one before: for many batches a buffer, little more
        assert (f.buffers, f.batches, f.nbytes) == (2, TAIL, 2 * buffer + TAIL * min(batch, ROWS_PER_SHARD) * ts.row_bytes), f
    else:
        assert (f.buffers, f.batches, f.nbytes) == (3, 0, 3 * buffer), f
    if (batch, streams) == (16, 1):  # one batch a buffer: more than 2 buffers alive, as counted now (the old count was 2)
        assert held > 2 * buffer, held / buffer


@pytest.mark.parametrize("streams", [1, 2])
def test_a_failed_buffer_read_is_raised_where_the_batches_are_asked_for(numbered_store, streams):
    ts = transfer(numbered_store, memory_budget_mb=0, buffer_shards=1, streams=streams)
    reads_logged(ts, fail_at=3)
    with pytest.raises(StoreError, match="read 3 failed"):
        list(ts)


def test_prefetch_serves_in_order_then_reraises_the_producers_error():
    def items():
        yield from range(5)
        raise ValueError("boom at 5")

    it = Prefetch(items(), depth=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    with pytest.raises(ValueError, match="boom at 5"):
        next(it)
    assert list(it) == []  # finished: no hang on a second look


def test_prefetch_starts_making_items_before_the_first_is_asked_for():
    made = threading.Event()

    def items():
        made.set()
        yield 1

    it = Prefetch(items(), depth=2)
    assert made.wait(10)
    assert list(it) == [1]


EXIT_MID_ITEM = """
import sys, time
from pathlib import Path
from kdcache.data import Prefetch

def items():
    for i in range(100):
        time.sleep(1.0)  # a batch being made (in a run: collated in torch's C++ code)
        Path(sys.argv[1], f"made{i}").touch()
        yield i

next(Prefetch(items(), depth=1))
"""


def test_the_interpreter_exits_only_after_a_producer_has_stopped(tmp_path):
    """A run that stops mid-epoch leaves a producer making its next batch; exiting under it (a daemon thread in torch's
    C++ code) aborted `kdcache demo` now and then at exit (exit 134). The exit stops it and waits for that item."""
    r = subprocess.run([sys.executable, "-c", EXIT_MID_ITEM, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made[:2] == ["made0", "made1"] and len(made) <= 3, made  # the item in the making was finished, no more begun


@pytest.mark.parametrize("how", ["close", "drop"])
def test_prefetch_stops_its_thread_when_closed_or_dropped(how):
    count = itertools.count()

    def endless():
        while True:
            yield next(count)

    before = {t for t in threading.enumerate() if t.name == "kdcache-prefetch"}
    it = Prefetch(endless(), depth=2)
    assert next(it) == 0
    if how == "close":
        it.close()
        assert list(it) == []
    else:
        del it
        gc.collect()
    deadline = time.monotonic() + 60  # a generous bound: a loaded box may not run the thread for seconds
    while {t for t in threading.enumerate() if t.name == "kdcache-prefetch"} - before:
        assert time.monotonic() < deadline, "the prefetch thread still runs"
        time.sleep(0.02)
    made = next(count)
    time.sleep(0.3)
    assert next(count) == made + 1  # nothing consumes the generator any more


def test_in_memory_the_batch_order_does_not_depend_on_the_dataloader_workers(numbered_store):
    """In RAM each buffer is one batch, so k DataLoader workers taking turns serve the plan's own order for any k:
    a run (or a resumed one) with other train.num_workers trains on the same batches in the same order."""
    ts = transfer(numbered_store, seed=5, memory_budget_mb=2048.0, batch_size=3)  # 34 batches
    assert ts.in_memory
    for epoch in range(2):
        orders = {k: [b["rows"].tolist() for b in serve(ts, epoch, k)] for k in (0, 1, 2)}
        assert orders[0] == orders[1] == orders[2]
        assert sorted(r for batch in orders[0] for r in batch) == list(range(N)) and len(orders[0]) == ts.batches_per_epoch(epoch) == 34


def serve_from(ts: TransferSet, epoch: int, skip: int, workers: int = 0) -> list[list[int]]:
    ts.set_epoch(epoch, skip)
    batches = DataLoader(ts, batch_size=None, num_workers=workers) if workers else ts
    return [b["rows"].tolist() for b in batches]


@pytest.mark.parametrize("mode", ["memory", "stream", "stream-drop-last", "stream-joined"])
def test_an_epoch_resumed_after_its_first_batches_serves_exactly_the_rest(numbered_store, mode):
    """set_epoch(e, skip): a run resumed mid-epoch must train on the batches the uninterrupted epoch had left, in their
    order, for any DataLoader worker count (workers take turns, so the batches already served are not the plan's
    first ones of each worker) and any skip: inside a buffer, at its end, the whole epoch."""
    kw = dict(seed=11, rows=SUBSET if mode == "stream" else None, batch_size=5, memory_budget_mb=2048.0 if mode == "memory" else 0.0,
              buffer_shards=2 if mode == "stream" else 1, drop_last=mode == "stream-drop-last", streams=2 if mode == "stream-joined" else 1)
    for workers in (0, 1, 3):
        ts = transfer(numbered_store, **kw)
        whole = serve_from(ts, 2, 0, workers)
        assert len(whole) == ts.batches_per_epoch(2) > 6
        for skip in sorted({1, 2, 3, len(whole) // 2, len(whole) - 1, len(whole), len(whole) + 4}):
            assert serve_from(ts, 2, skip, workers) == whole[skip:], (workers, skip)
        assert serve_from(ts, 3, 0, workers) != whole, "set_epoch without skip serves a whole epoch again"


def test_taken_in_turn_is_a_dataloaders_round_robin():
    from kdcache.cache import taken_in_turn

    rng = np.random.default_rng(2)
    for _ in range(200):
        totals = rng.integers(0, 6, size=int(rng.integers(1, 5))).tolist()
        turns = [w for r in range(max(totals, default=0)) for w in range(len(totals)) if r < totals[w]]
        for n in range(len(turns) + 2):
            taken, following = taken_in_turn(totals, n)
            assert taken == [turns[:n].count(w) for w in range(len(totals))], (totals, n)
            # the turns go on from the reader after the last one served: the rest of the epoch from there, passing
            # over those that have run out, is what is left of it
            k = len(totals)
            rest = [w for r in range(max(totals, default=0) + 1) for w in [(following + i) % k for i in range(k)] if taken[w] + r < totals[w]]
            assert rest == turns[n:], (totals, n)


@pytest.mark.parametrize("batch_size, drop_last", [(4, False), (5, True)])
def test_a_resumed_epoch_does_not_read_the_buffers_it_skips(numbered_store, monkeypatch, batch_size, drop_last):
    """Buffers whose batches were all served before the interruption are not read again; with drop_last such a buffer
    still holds rows (a shard's 16th row, in no batch of 5), which must not bring its read back either."""
    reads = record_reads(monkeypatch)
    whole = np.arange(96) if drop_last else None  # drop_last: whole shards only, 3 batches each (the last shard's 4 rows make none)
    ts = transfer(numbered_store, seed=3, memory_budget_mb=0.0, buffer_shards=1, batch_size=batch_size, drop_last=drop_last, rows=whole)
    plan = [np.unique(rows // ROWS_PER_SHARD).tolist() for rows in ts.plan(0)]  # a buffer: one shard
    ends = np.cumsum(ts._batch_counts(0))  # batch_size 4: 4 batches a shard, 1 for the last (rows 96-99)
    for skip in (ends[0], ends[1] + 1, ends[2], ends[2] + 3):
        unread = int(np.searchsorted(ends, skip, side="right"))  # buffers wholly served
        reads.clear()
        served = serve_from(ts, 0, int(skip))
        assert sorted({start // ROWS_PER_SHARD for _, start, _ in reads}) == sorted(s for shards in plan[unread:] for s in shards), skip
        assert len(served) == ts.batches_per_epoch(0) - skip


def reads_finished(ts: TransferSet) -> list[int]:
    """The first row of each buffer ``ts`` has read, appended as its read ends."""
    finished: list[int] = []
    real = ts._read

    def read(rows):
        buffer = real(rows)
        finished.append(int(rows[0]))
        return buffer

    ts._read = read
    return finished


def _edit_manifest(location: str, **values) -> None:
    """Set manifest keys of the store at ``location`` in its root zarr.json, as a replaced store would hold them."""
    import json
    from pathlib import Path

    meta_file = Path(location, "zarr.json")
    meta = json.loads(meta_file.read_text())
    meta["attributes"][layout.ATTRS].update(values)
    meta_file.write_text(json.dumps(meta))


def test_a_store_replaced_while_a_streaming_reader_reads_it_is_named_as_replaced_not_damaged(numbered_store, tmp_path):
    """Another extract --overwrite (here of float16 logits) replaced the store while a streaming reader served it: its
    next shards, read by the arrays' metadata and shard digests of the store it opened, failed as damage ("does not
    decode", "holds other rows than its writer wrote there"), whose fix was to delete a done marker of the new store
    and re-extract that shard. It is named as the replacement it is."""

    import kdcache
    from conftest import FIXTURES, NUMBERED
    from kdcache.pipeline import from_dict

    location = tmp_path / "s.zarr"
    shutil.copytree(numbered_store, location)
    ts = transfer(str(location), memory_budget_mb=0, buffer_shards=1, batch_size=ROWS_PER_SHARD, shuffle=False)
    finished = reads_finished(ts)
    batches = iter(ts)
    check_aligned(next(batches))
    wait_for(lambda: len(finished) >= 2, 60)  # the next buffer, read ahead meanwhile, is of the first store (a fixed 0.3 s:
    # a loaded box's read-ahead came after the replacement, and the test did not test what it says)
    other = {**NUMBERED, "targets": {**NUMBERED["targets"], "dtype": "float16"}}
    kdcache.extract(from_dict(other, root=FIXTURES), str(tmp_path / "new.zarr"))
    location.rename(tmp_path / "old.zarr")
    (tmp_path / "new.zarr").rename(location)
    with pytest.raises(StoreError, match=r"s\.zarr' was replaced while this reader used it: its manifest's ") as raised:
        for batch in batches:
            check_aligned(batch)
    assert "damaged" not in str(raised.value)

def test_a_streaming_reader_handed_a_store_leaves_its_callers_words_for_a_replacement(numbered_store, tmp_path):
    """A streaming reader handed an opened Store (train's setup's) names a replacement found by its reads in its own
    words, and the caller's reads of that Store in the caller's. Was: the reader set its words on the caller's Store,
    whose later reads named the replacement "while this reader used it", of a reader the caller never made."""
    import kdcache
    from conftest import FIXTURES, NUMBERED
    from kdcache.pipeline import from_dict

    location = tmp_path / "s.zarr"
    shutil.copytree(numbered_store, location)
    held = layout.open_store(str(location))
    ts = transfer(held, memory_budget_mb=0, buffer_shards=1, batch_size=ROWS_PER_SHARD, shuffle=False)
    for batch in serve(ts, 0):  # read through the caller's Store
        check_aligned(batch)
    other = {**NUMBERED, "targets": {**NUMBERED["targets"], "dtype": "float16"}}
    kdcache.extract(from_dict(other, root=FIXTURES), str(tmp_path / "new.zarr"))
    location.rename(tmp_path / "old.zarr")
    (tmp_path / "new.zarr").rename(location)
    with pytest.raises(StoreReplacedError, match=r"s\.zarr' was replaced since kdcache.open_store opened it: its manifest's "):
        held.read(layout.LOGITS, 0, ROWS_PER_SHARD)
    with pytest.raises(StoreReplacedError, match=r"s\.zarr' was replaced while this reader used it: its manifest's "):
        serve(ts, 1)
    with pytest.raises(StoreReplacedError, match=r"s\.zarr' was replaced since kdcache.open_store opened it: its manifest's "):
        held.read_shards(layout.LOGITS, [1])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_store_replaced_under_a_streaming_reader_is_refused(numbered_store, tmp_path, workers):
    """Streaming opens the store again at its first read (in each DataLoader worker, and in the process itself): a store
    replaced at the location since the reader was made (another extract --overwrite, made later) would have served its
    rows beside the first's. Refused, naming what changed; a store being written that is finished meanwhile (only its
    ``completed`` set) is the same store, and serves."""
    location = str(tmp_path / "s.zarr")
    shutil.copytree(numbered_store, location)
    _edit_manifest(location, completed=None)  # being written when the reader was made
    ts = transfer(location, memory_budget_mb=0)
    _edit_manifest(location, completed="2030-01-01T00:00:01+00:00")  # finished since: the same store
    for batch in serve(ts, 0, workers):
        check_aligned(batch)
    replaced = transfer(location, memory_budget_mb=0)
    _edit_manifest(location, created="2030-01-02T00:00:00+00:00")
    with pytest.raises(StoreError) as raised:
        serve(replaced, 0, workers)
    assert re.search(r"s\.zarr' was replaced while this reader used it: its manifest's created was '[^']+' when the reader was "
                     r"made and is '2030-01-02T00:00:00\+00:00' now \(another kdcache extract --overwrite, or a copy over it\?\); "
                     "rerun against the store as it is now", str(raised.value)), str(raised.value)


def test_a_store_removed_while_a_streaming_reader_reads_it_is_named_as_removed(numbered_store, tmp_path):
    """The store deleted (or mid-replacement, not opening) while a streaming reader served it: the Store named it
    "removed or replaced", then the reader's own look at the location replaced that line with open_store's "no store
    at …; run kdcache extract … first", a fix that makes a new store rather than waiting for the one in use."""

    location = tmp_path / "s.zarr"
    shutil.copytree(numbered_store, location)
    ts = transfer(str(location), memory_budget_mb=0, buffer_shards=1, batch_size=ROWS_PER_SHARD, shuffle=False)
    finished = reads_finished(ts)
    batches = iter(ts)
    check_aligned(next(batches))
    wait_for(lambda: len(finished) >= 2, 60)  # the next buffer, read ahead meanwhile, is of the store
    # removed at once (renamed away, then deleted): an rmtree in place lets the reading thread look at a store half
    # deleted (its root zarr.json there, targets/zarr.json gone), which it names as damaged, not as no store
    location.rename(tmp_path / "deleted.zarr")
    shutil.rmtree(tmp_path / "deleted.zarr")
    with pytest.raises(StoreReplacedError, match=r"s\.zarr' was removed or replaced while this reader used it: it does not open "
                       r"now \(no store at .*\); rerun once the store is in place again"):
        for batch in batches:
            check_aligned(batch)


def test_a_reader_handed_an_opened_store_reads_it_and_refuses_one_replaced_or_removed_since(numbered_store, tmp_path):
    """TransferSet(store, ...): the Store a caller opened (kdcache train's setup, whose reader opened the store again: its
    manifest, every group's and array's metadata and every done marker read twice over http or S3) is read through, and
    the store at its location looked at once (its root zarr.json) to be it still: one replaced since it was opened is
    refused, and a streaming reader looks again at its first read, finding one removed meanwhile."""
    location = str(tmp_path / "s.zarr")
    shutil.copytree(numbered_store, location)
    for budget in (2048.0, 0.0):
        want = serve(transfer(location, memory_budget_mb=budget), 0)
        got = serve(transfer(layout.open_store(location), memory_budget_mb=budget), 0)
        assert [b["rows"].tolist() for b in got] == [b["rows"].tolist() for b in want] and len(got) == len(want) > 1
        for a, b in zip(got, want):
            assert torch.equal(a["targets"][layout.LOGITS], b["targets"][layout.LOGITS])
    opened = layout.open_store(location)
    _edit_manifest(location, created="2030-01-02T00:00:00+00:00")
    with pytest.raises(StoreReplacedError, match=r"s\.zarr' was replaced between its first opening and this reader's: its manifest's "
                       r"created was '[^']+' when first opened and is '2030-01-02T00:00:00\+00:00' now \(another kdcache extract"):
        transfer(opened)
    ts = transfer(layout.open_store(location), memory_budget_mb=0)
    shutil.rmtree(location)
    with pytest.raises(StoreReplacedError, match=r"s\.zarr' was removed or replaced while this reader used it: no store manifest is at "
                       r"its root now; rerun once the store is in place again$"):
        serve(ts, 0)


@pytest.mark.parametrize("how", ["renamed", "copied"])
def test_a_reader_handed_an_opened_zip_store_refuses_one_put_at_its_path_since(numbered_store, tmp_path, how):
    """A zip store's Store holds its file open, and a reader handed it looked at the store's manifest through that file:
    a zip renamed over the path since (another kdcache pack, a sync) was not refused, its reads served from the file
    opened first, and one copied over it (the same file, rewritten) was named as a damaged zip member ("run kdcache
    verify"). The zip at the path now is looked at: refused as replaced, before the reader is made or at its first read."""
    from kdcache.interop import pack

    folder, first, second, location = (str(tmp_path / name) for name in ("s.zarr", "first.zip", "second.zip", "s.zarr.zip"))
    shutil.copytree(numbered_store, folder)
    pack(folder, first)
    _edit_manifest(folder, created="2030-01-02T00:00:00+00:00")
    pack(folder, second)

    def put_second() -> None:
        if how == "renamed":
            shutil.copy(second, location + ".part")
            os.replace(location + ".part", location)
        else:
            with open(location, "r+b") as f:
                f.write(open(second, "rb").read())
                f.truncate()

    shutil.copy(first, location)
    opened = layout.open_store(location)
    put_second()
    with pytest.raises(StoreReplacedError, match=r"s\.zarr\.zip' was replaced between its first opening and this reader's: its "
                       r"manifest's created was '[^']+' when first opened and is '2030-01-02T00:00:00\+00:00' now"):
        transfer(opened)
    shutil.copy(first, location)
    ts = transfer(layout.open_store(location), memory_budget_mb=0)
    put_second()
    with pytest.raises(StoreReplacedError, match=r"s\.zarr\.zip' was replaced while this reader used it: its manifest's created "
                       r"was '[^']+' when the reader was made and is '2030-01-02T00:00:00\+00:00' now"):
        serve(ts, 0)
    os.remove(location)
    ts = transfer(layout.open_store(second), memory_budget_mb=0)
    os.rename(second, str(tmp_path / "moved.zip"))
    with pytest.raises(StoreReplacedError, match=r"second\.zip' was removed or replaced while this reader used it: no store manifest"):
        serve(ts, 0)


def test_a_reader_holding_its_store_serves_a_dataloader_worker_started_by_spawn(numbered_store):
    """A TransferSet holds the Store it was made from (its streaming reads in this process go through it), which holds
    locks and cannot be pickled: a DataLoader worker started by spawn (macOS's default) is sent the reader without it,
    and opens the store itself."""
    ts = transfer(layout.open_store(numbered_store), memory_budget_mb=0)
    ts.set_epoch(0)
    batches = iter(DataLoader(ts, batch_size=None, num_workers=1, multiprocessing_context="spawn"))
    try:
        served = list(batches)
    finally:
        stop_making(batches)
    assert sorted(r for b in served for r in b["rows"].tolist()) == list(range(N))
    for batch in served:
        check_aligned(batch)


@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
@pytest.mark.parametrize("rows", [[], np.zeros(0, dtype=np.float64)], ids=["list", "float-array"])
def test_no_rows_serve_no_batches(numbered_store, budget, rows):
    """rows= an empty selection (a filter that kept nothing): no batches and a length of 0, in RAM or streamed; an empty
    float array (numpy's default dtype for []) is no float row to refuse."""
    ts = transfer(numbered_store, rows=rows, memory_budget_mb=budget)
    assert len(ts) == 0 and ts.batches_per_epoch(0) == 0
    assert serve(ts, 0) == [] and serve(ts, 1) == []
