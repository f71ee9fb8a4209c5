"""Journeys through the Python API, as a team that embeds kdcache in its own code runs them (not the CLI's: those are
``test_journeys.py`` and ``test_environments.py``): a training loop of its own over ``TransferSet`` and a DataLoader, a
notebook holding an opened ``Store``, several extracts and a train in one process, pipelines built as dicts in code.
Each sample's values name it (``tests/fixtures/journeys.py``), so a row served with another sample's targets shows at once."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import kdcache
from conftest import FIXTURES
from kdcache.errors import KdcacheError, PipelineError, StoreError, StoreMismatchError, StoreReplacedError
from kdcache.pipeline import from_dict
from kdcache.stats import stats
from kdcache.verify import verify
from test_journeys import NUMBERS

sys.path.insert(0, str(FIXTURES))
from journeys import CLASSES, dataset  # noqa: E402

PIPELINE = NUMBERS.replace("topk = 3", "topk = 0").replace("epochs = 3", "epochs = 1")  # 96 samples, 6 shards, logits and "body"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, kdcache.Pipeline]:
    folder = tmp_path_factory.mktemp("api")
    (folder / "p.toml").write_text(PIPELINE)
    pipeline = kdcache.load_pipeline(folder / "p.toml")
    kdcache.extract(pipeline, folder / "s.zarr")
    return folder / "s.zarr", pipeline


def paired(batch: dict) -> list[int]:
    """The batch's rows, once every part of it is found to be its samples' (sample i's values name i)."""
    index = batch["index"]
    assert torch.equal(batch["rows"], index) and torch.equal(batch["inputs"][:, 0], index.float())
    assert torch.equal(batch["targets"]["targets/logits"].argmax(1), index % CLASSES)
    assert torch.equal(batch["targets"]["targets/layers/body"][:, 0], index.float())
    assert torch.equal(batch["label"], index % CLASSES)
    return index.tolist()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_kinds() -> set[str]:
    """The kinds of thread running: a pool's (zarr's event loop's executor, kdcache's read-ahead) may grow by a thread
    on demand, up to its bound; a thread of a new kind left behind is a leak."""
    return {re.sub(r"\d+", "N", thread.name) for thread in threading.enumerate()}


def settled(done, seconds: float = 10.0) -> bool:
    """Whether ``done()`` comes true within ``seconds``: a dropped DataLoader's queues close their pipes from their own
    feeder threads, a moment after it is gone; a leak stays."""
    end = time.monotonic() + seconds
    while not done() and time.monotonic() < end:
        gc.collect()
        time.sleep(0.05)
    return done()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("budget", [2048, 0], ids=["in-ram", "streamed"])
def test_an_own_loop_over_a_dataloader_serves_each_sample_its_targets_epoch_after_epoch(made, workers: int, budget: int):
    """A loop of one's own (README): DataLoader workers (persistent), set_epoch, an epoch left by ``break`` and the next
    one whole; every batch is its samples', each whole epoch serves every row once in its own order, and nothing is left
    open (files, threads) once the loader is dropped."""
    store, _ = made

    def loop() -> None:
        transfer = kdcache.TransferSet(store, dataset("train"), ["logits", "body"], batch_size=8,
                                       memory_budget_mb=budget, buffer_shards=2)
        loader = DataLoader(transfer, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
        orders = []
        for epoch in range(4):
            transfer.set_epoch(epoch)
            rows = []
            for i, batch in enumerate(loader):
                rows += paired(batch)
                if epoch == 1 and i == 2:
                    break
            if epoch != 1:
                assert sorted(rows) == list(range(96))
                orders.append(rows)
        assert orders[0] != orders[1] != orders[2]

    loop()  # the first run in a process also makes what lives as long as it: zarr's event loop, multiprocessing's heap
    fds, threads = open_fds(), thread_kinds()
    loop()
    assert settled(lambda: open_fds() <= fds and thread_kinds() <= threads), (open_fds(), fds, thread_kinds() - threads)


@pytest.mark.slow  # two processes importing torch: about 20 s on 2 cores
def test_a_loop_under_two_gloo_ranks_serves_each_rank_its_own_rows(made, tmp_path: Path):
    """DistributedSampler does not take an IterableDataset: ``streams=world_size, stream=rank`` (README) gives each rank
    its own rows, the two ranks' batches the epoch's rows once, in as many steps each."""
    store, _ = made
    script = tmp_path / "ranks.py"
    script.write_text(RANKS.format(fixtures=str(FIXTURES), store=str(store), rendezvous=str(tmp_path / "rendezvous")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)  # 120 s: tight for a loaded box
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = [eval(line) for line in r.stdout.splitlines()]  # noqa: S307 - our own script's lists
    for epoch in range(2):
        mine, theirs = (dict(ranks)[rank][epoch] for rank in (0, 1))
        assert len(mine) == len(theirs)  # a step each: no rank waits on the other in its all-reduce
        assert sorted(row for batch in mine + theirs for row in batch) == list(range(96))


RANKS = """
import os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.utils.data import DataLoader
sys.path.insert(0, {fixtures!r})

def rank_loop(rank):
    # a file to meet at, not a port found free and bound later by rank 0 (another process may take it meanwhile)
    dist.init_process_group("gloo", init_method="file://" + {rendezvous!r}, rank=rank, world_size=2)
    import kdcache
    from journeys import dataset, CLASSES
    transfer = kdcache.TransferSet({store!r}, dataset("train"), ["logits"], batch_size=8, buffer_shards=1, memory_budget_mb=0,
                                   streams=2, stream=rank)
    loader, epochs = DataLoader(transfer, batch_size=None, num_workers=1), []
    for epoch in range(2):
        transfer.set_epoch(epoch)
        epochs.append([])
        for batch in loader:
            assert torch.equal(batch["targets"]["targets/logits"].argmax(1), batch["index"] % CLASSES)
            assert torch.equal(batch["inputs"][:, 0], batch["index"].float()) and batch["scale"] == 1.0
            epochs[-1].append(batch["rows"].tolist())
            dist.all_reduce(torch.zeros(1))  # a training step's
    print((rank, epochs), flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(rank_loop, nprocs=2)
"""


def test_extracts_and_a_train_in_one_process_each_error_leaving_it_usable(made, tmp_path: Path):
    """Two extracts of different pipelines, a train, verify and stats in one process; a KdcacheError of each (a store of
    other targets, a store missing, an output folder taken) leaves no lock, signal handler or thread behind: the same
    calls then run."""
    _, pipeline = made
    other = kdcache.load_pipeline(made[0].parent / "p.toml", ["targets.layers=[]", "extract.rows_per_shard=32", 'targets.dtype="float16"'])
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    kdcache.extract(pipeline, a)
    kdcache.extract(other, b)
    assert (kdcache.open_store(a).rows_per_shard, kdcache.open_store(b).rows_per_shard) == (16, 32)
    assert kdcache.open_store(b).read("targets/logits", 0, 96).dtype == np.float16
    kdcache.train(pipeline, a, tmp_path / "run")
    threads = threading.active_count()
    for call, error in [(lambda: kdcache.extract(other, a), StoreMismatchError), (lambda: kdcache.train(pipeline, a, tmp_path / "run"), StoreError),
                        (lambda: verify(str(tmp_path / "none.zarr")), StoreError), (lambda: stats(str(tmp_path / "none.zarr")), StoreError)]:
        with pytest.raises(error):
            call()
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers and threading.active_count() <= threads + 2
    assert kdcache.extract(pipeline, a, overwrite=True)["complete"]  # its writer lock was let go
    assert verify(str(a))["ok"] and stats(str(a))["labeled_rows"] == 96
    kdcache.train(pipeline, a, tmp_path / "run", overwrite=True)


def test_the_modules_the_readme_names_for_a_pipeline_in_code_verify_and_stats_are_reached_from_a_bare_import():
    """README (and the TypeError of a dict given as a pipeline) names ``kdcache.pipeline.from_dict``, and
    ``kdcache.verify.verify`` and ``kdcache.stats.stats``: after ``import kdcache`` alone each was "module 'kdcache' has no
    attribute ..." (a fresh process: the suite's imports bind them)."""
    code = ("import sys, kdcache\n"
            "assert kdcache.pipeline.from_dict({'train': {'lr': 0.5}}).train.lr == 0.5\n"
            "assert callable(kdcache.verify.verify) and callable(kdcache.stats.stats) and 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# -- the API's types: what a program passes where the README says an int, a list or a location -------------------


def test_read_shards_takes_a_numpy_array_of_shards(made):
    """``store.read_shards(path, np.flatnonzero(store.done()))`` failed with numpy's 'truth value of an array ... is
    ambiguous'; one shard number alone with 'int object is not iterable'."""
    store = kdcache.open_store(made[0])
    body = store.read_shards("targets/layers/body", np.flatnonzero(store.done())[::-1])
    assert body[:, 0].tolist() == [r for s in range(5, -1, -1) for r in range(16 * s, 16 * s + 16)]
    assert store.read_shards("targets/logits", np.array([], dtype=np.int64)).shape == (0, CLASSES)
    for one in (1, np.int64(1), np.array(1)):  # a 0-d array (np.asarray of one number) failed in numpy: 'iteration over a 0-d array'
        with pytest.raises(StoreError, match=r"^shards must be a list of shard numbers, got 1; pass e.g. \[1\]"):
            store.read_shards("targets/logits", one)


def test_from_dict_takes_numpy_scalars_and_tuples_as_toml_values():
    """A pipeline built in code from a sweep (``np.arange``, ``np.float32``) was refused: 'extract.batch_size must be a whole
    number >= 1, got np.int64(8)'; a tuple of layers as 'must be a list of names'. A dict of other values names its key."""
    raw = {"extract": {"batch_size": np.int64(8)}, "train": {"lr": np.float32(0.5), "drop_last": np.bool_(True)},
           "targets": {"layers": ("body",)}}
    p = from_dict(raw)
    assert (p.extract.batch_size, p.train.lr, p.train.drop_last, p.targets.layers) == (8, 0.5, True, ("body",))
    assert type(p.extract.batch_size) is int and type(p.train.drop_last) is bool
    with pytest.raises(PipelineError, match=r"^<dict>: extract\.batch_size must be a whole number >= 1, got -1$"):
        from_dict({"extract": {"batch_size": np.int64(-1)}})
    with pytest.raises(TypeError, match=r"^raw must be a dict of pipeline sections .*, got list \["):
        from_dict([("train", {})])


def test_set_epoch_refuses_what_is_not_an_epoch(made):
    """``set_epoch(1.5)`` was RawValue's TypeError, ``set_epoch(-1)`` taken and then numpy's ValueError in the next loop."""
    transfer = kdcache.TransferSet(made[0], dataset("train"), ["logits"], batch_size=8)
    transfer.set_epoch(np.int64(2))
    for epoch, skip in [(1.5, 0), (-1, 0), (0, -2)]:
        with pytest.raises(PipelineError, match=r"^set_epoch's (epoch|skip) must be an integer >= 0, got "):
            transfer.set_epoch(epoch, skip)
    assert transfer.epoch == 2


def test_a_held_store_replaced_at_its_location_is_named_as_replaced_not_damaged(made, tmp_path: Path):
    """A notebook's Store, the store replaced under it by an ``extract --overwrite`` of another pipeline: reading an array
    the new store lacks was 'is damaged: shard 0 of targets/layers/body ... is missing; ... rerun kdcache extract'."""
    _, pipeline = made
    kdcache.extract(pipeline, tmp_path / "s.zarr")
    held = kdcache.open_store(tmp_path / "s.zarr")
    assert held.read("targets/layers/body", 0, 16)[:, 0].tolist() == list(range(16))
    kdcache.extract(kdcache.load_pipeline(made[0].parent / "p.toml", ["targets.layers=[]"]), tmp_path / "s.zarr", overwrite=True)
    for read in (lambda: held.read("targets/layers/body", 16, 32), lambda: held.read_shards("targets/layers/body", [2])):
        with pytest.raises(StoreReplacedError, match=r"s\.zarr' was replaced since kdcache.open_store opened it: its manifest's "):
            read()
    assert isinstance(StoreReplacedError("x"), StoreError) and issubclass(StoreReplacedError, KdcacheError)
    assert list(kdcache.open_store(tmp_path / "s.zarr").targets) == ["logits"]
