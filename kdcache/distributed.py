"""Scale-out: extraction on dask.distributed workers or torchrun ranks, and data-parallel training ranks.

Extraction, either way, keeps the single-process invariants (docs/CLUSTER.md):

- the driver (dask) or rank 0 (torchrun) probes the teacher and creates the arrays once
  (``store.create_or_resume``), before any shard is written;
- every pending shard is handed whole to exactly one worker, which runs ``extract.extract_shards``
  on it (the same loop as ``kdcache extract``) and marks it done after writing it;
- the driver / rank 0 finishes the manifest once every shard is done.

So a store is byte-identical whatever the number of workers, and a dask job, a torchrun job and a
single process can resume each other's stores. dask: a task that raises (anything but a
``KdcacheError``, which would fail again) or whose worker dies is resubmitted, up to ``attempts``
times; a shard half-written by a killed worker is not done, and is rewritten whole.

Training under torchrun: ``ranks()`` reads RANK/WORLD_SIZE; ``cache.TransferSet`` gives rank r the
r-th of ``world`` disjoint streams of the epoch's plan; every rank starts from rank 0's student and
heads (``broadcast_parameters``) and takes each step with the ranks' mean gradient (``average_gradients``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from kdcache import errors, locking, storage, store as layout
from kdcache.errors import JoinError, KdcacheError, LaunchError, PipelineError, StoreError, StoreMismatchError, count, need, one_line, short, transient
from kdcache.extract import Run, check_done_rows, complete_read_only, extract_shards, say_headless, setup, written
from kdcache.pipeline import Pipeline, check_pipeline
from kdcache.progress import Progress

ATTEMPTS = 3  # tries per shard on dask (a task that raises, or whose worker keeps dying)
# torch.distributed: ranks wait at most this long for each other in extract's collectives (its last barrier waits for the
# slowest rank's shards) and, training, wherever one rank may work while the others wait (joining, start-up, rank 0's
# checkpoints and final weights: ``barrier``, ``broadcast``, ``gather``); a training step's collectives (``average_gradients``,
# ``sum_over_ranks``) wait train.rank_timeout_s, so that a hung or lost rank stops the others soon (``join_training``)
TIMEOUT = datetime.timedelta(hours=12)
# training under torchrun (``join_training``): the default group they were made with, the gloo group of the collectives
# that may wait up to TIMEOUT, and the group of a step's collectives (gloo, or nccl on GPUs), which waits train.rank_timeout_s
_GROUPS: tuple[Any, Any, Any] = (None, None, None)
REACH = ("every worker and rank must reach --out where the driver or rank 0 created it: a path on a filesystem they share, "
         "or an object store URL (s3://...); fix that, then rerun to resume")  # docs/CLUSTER.md


# -- dask.distributed ----------------------------------------------------------------------------
def extract_distributed(pipeline: Pipeline, out: str | os.PathLike[str], *, workers: int | None = None, scheduler: str | None = None,
                        overwrite: bool = False, progress: bool = False, storage_options: dict[str, Any] | None = None,
                        attempts: int = ATTEMPTS) -> dict[str, Any]:
    """``extract`` with the shards spread over dask workers: a new ``LocalCluster`` (one worker per GPU
    when there are GPUs, otherwise ``workers`` single-threaded processes, 2 by default) or the cluster at ``scheduler``
    (``tcp://host:port``; its workers must import kdcache and reach ``out`` and the pipeline's files), not both."""
    need("distributed", "dask", "kdcache extract --workers/--scheduler")
    pipeline, out = check_pipeline(pipeline), storage.location_arg(out, "out")
    storage.options_arg(storage_options)
    overwrite, progress = storage.flag_arg(overwrite, "overwrite"), storage.flag_arg(progress, "progress")
    if scheduler is not None:
        if workers is not None:  # the CLI's --workers beside --scheduler is a usage error; here workers was dropped unsaid
            raise TypeError(f"extract_distributed takes workers (a local dask cluster) or scheduler (an existing one), not both: "
                            f"got workers={short(workers)} and scheduler={short(scheduler)}; pass one of them")
        _check_address(scheduler)
    else:
        workers = 2 if workers is None else workers
        _check_count(workers, "workers", "CPU worker processes of a local dask cluster")
    _check_count(attempts, "attempts", "tries of each shard before the job stops")
    locking.refuse_if_being_written(out, storage_options)  # before the teacher is built
    layout.refuse_replacing(out, overwrite, storage_options)
    # an existing cluster is reached first: one that does not answer is named before anything is built or written
    with _connect(scheduler) if scheduler is not None else contextlib.nullcontext() as remote:
        run = setup(pipeline)  # the driver probes shapes for the manifest; workers build their own teachers
        say_headless(pipeline, run)
        if (complete := complete_read_only(out, run, pipeline, overwrite, storage_options)) is not None:
            return written(complete, [])
        with locking.writer_lock(out, storage_options, helpers=True):  # held by the driver for the whole job: its workers write, no other job does
            store = layout.create_or_resume(out, run.manifest_for(pipeline), overwrite=overwrite, storage_options=storage_options)
            pending = store.resume_pending()  # done shards whose objects are missing too
            check_done_rows(run.dataset, store, pending)
            del run
            if torch.cuda.is_available() and torch.cuda.is_initialized():  # the driver's teacher and probe: GPU 0's memory is the workers'
                torch.cuda.empty_cache()
            if pending:
                with contextlib.nullcontext(remote) if remote is not None else _local_cluster(pipeline, workers) as client:
                    _run_shards(client, pipeline, store, pending, progress, attempts)
                unwritten = [int(s) for s in np.flatnonzero(~store.done()) if s in pending]
                if unwritten:  # every task succeeded, yet the driver's store lacks their shards: the workers wrote another
                    raise ShardError(f"the dask workers reported shards {_shard_list(unwritten)} written, but {out!r} does not have them: "
                                     f"they wrote another store at that location; {REACH}")
            store.finish()
    return written(store, pending)


def _check_count(value: Any, name: str, what: str) -> None:
    """Refuse a count argument ``name`` (``workers``: the CLI's ``--workers``, at least 1 there; ``attempts``) that is not
    an int of at least 1, before the teacher is built or the store created (``attempts=0`` said 'shard 0 failed 0 times')."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int ({what}), got {type(value).__name__} {short(value)}")
    if value < 1:
        raise PipelineError(f"{name} must be >= 1 ({what}), got {value}")


def _shard_list(shards: list[int]) -> str:
    return ", ".join(map(str, shards[:5])) + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")


def _run_shards(client: Any, pipeline: Pipeline, store: layout.Store, pending: list[int], progress: bool, attempts: int) -> None:
    """Hand each shard to a worker, resubmit failures, and show the whole job's progress."""
    from distributed import as_completed

    row_bytes = sum(int(np.prod(store.array(p).shape[1:], dtype=np.int64)) * store.array(p).dtype.itemsize for p in store.paths())
    rows = {s: store.shard_rows(s)[1] - store.shard_rows(s)[0] for s in pending}
    bar = Progress(sum(rows.values()), "extract", enabled=progress)
    token, tries = uuid.uuid4().hex[:8], {s: 1 for s in pending}

    location = store.location  # a relative path is the driver's: a worker started in another folder would find another store
    if storage.location_kind(location) == "local":
        location = str(Path(storage.local_path(location)).absolute())

    # the workers check the job's lock before each shard they write: still ours (a remote cluster's worker runs on after
    # its driver stopped and released the lock, and must not write into a store another job has made there since)
    lock_token = getattr(store.lease, "token", None) or locking.local_token(location)

    def submit(shard: int) -> Any:
        return client.submit(_extract_shard, pipeline, location, shard, store.storage_options, lock_token, errors.COMMAND_LINE,
                             key=f"kdcache-shard-{shard}-{tries[shard]}-{token}", pure=False)

    _say_if_no_workers(client)
    futures = {submit(s): s for s in pending}
    done, workers = 0, set()
    queue = as_completed(list(futures))
    for future in queue:
        shard = futures.pop(future)
        try:
            if store.lease is not None:  # the job's S3 lock taken over: no shard more is run
                store.lease.check(store.location)
        except KdcacheError:
            client.cancel(list(futures))
            raise
        try:
            result = future.result()
        except Exception as e:  # noqa: BLE001 - an error in the task, or KilledWorker after repeated worker deaths
            # A KdcacheError is the pipeline's fault and would fail the same way again, unless it is transient
            # (the dataset's read, a batch out of device memory); anything else may be the machine's and is retried.
            final = isinstance(e, KdcacheError) and not transient(e)
            if final or tries[shard] >= attempts:
                client.cancel(list(futures))
                if isinstance(e, KdcacheError):
                    raise
                hint = " (a worker that keeps dying is often out of memory: lower extract.batch_size)" if type(e).__name__ == "KilledWorker" else ""
                raise ShardError(f"shard {shard} failed {attempts} times; last error: {type(e).__name__}: {one_line(e)}{hint}; "
                                 "fix its cause, then run the same command again to resume the missing shards") from e
            tries[shard] += 1
            retry = submit(shard)
            futures[retry] = shard
            queue.add(retry)
            continue
        done += 1
        workers.add(result["worker"])
        bar.what = f"extract [{done}/{count(len(pending), 'shard')}, {count(len(workers), 'worker')}]"
        bar.update(rows[shard], rows[shard] * row_bytes)
    bar.close()


def _say_if_no_workers(client: Any) -> None:
    """A note on stderr where no worker has joined the scheduler (yet: a batch queue's workers, or ones started with
    another address): the shards wait for one, which looked like a hang."""
    if client.nthreads():  # worker address -> threads, asked of the scheduler now
        return
    address = client.scheduler.address
    print(f"note: no dask worker is connected to the scheduler at {address!r}; the shards wait for one to join (start one: "
          f"dask worker {address} --nworkers 1 --nthreads 1)", file=sys.stderr, flush=True)


class ShardError(KdcacheError, RuntimeError):
    """A shard's task failed on every try (its worker kept dying, or it kept raising)."""


class SchedulerError(KdcacheError, ConnectionError):
    """The dask scheduler address does not parse, or no scheduler answers there."""


def _check_address(scheduler: str) -> None:
    """Refuse a scheduler address with no host and port (``inproc://`` addresses name no port and pass)."""
    from distributed.comm.addressing import get_address_host_port

    if scheduler.startswith("inproc://"):
        return
    try:
        get_address_host_port(scheduler)
    except ValueError as e:
        raise _bad_address(scheduler, e) from None


def _bad_address(scheduler: str, e: Exception) -> SchedulerError:
    return SchedulerError(f"scheduler address {scheduler!r} is not valid ({e}); "
                          "pass the address dask scheduler prints (tcp://HOST:PORT), or use --workers N for a local cluster")


@contextlib.contextmanager
def _connect(scheduler: str) -> Iterator[Any]:
    """A client of the dask scheduler at ``scheduler`` (waits ``distributed.comm.timeouts.connect``, 30 s by default)."""
    from distributed import Client

    local = "or use --workers N for a local cluster"
    try:
        _handshake(scheduler)
        client = Client(scheduler)
    except SchedulerError:
        raise
    except ValueError as e:
        raise _bad_address(scheduler, e) from e
    except OSError as e:
        raise SchedulerError(f"no dask scheduler answered at {scheduler!r} ({e}); "
                             f"start one there (dask scheduler --port PORT), {local}") from e
    with client:
        yield client


def _handshake(scheduler: str) -> None:
    """Connect to ``scheduler`` and wait for dask's handshake, each within ``distributed.comm.timeouts.connect``. dask's own
    ``Client`` waits for the handshake for good: a server there that is not a dask scheduler (the dashboard's HTTP port,
    another service) accepted the connection and the job hung, silent, until it was killed. At a ``tcp://`` address
    what answers is looked at first (``_first_words``): one that answers otherwise than dask is named at once (it was
    dask's read of a text answer as the length of a message: "MemoryError: Unable to allocate 3.01 EiB"), one that says
    nothing within the timeout is named then (it was twice the timeout). Ctrl-C stops the wait at once."""
    import asyncio

    import dask
    from dask.utils import parse_timedelta
    from distributed.comm.addressing import parse_address
    from distributed.comm.core import connect
    from distributed.security import Security

    if scheduler.startswith("inproc://"):  # this process's own scheduler
        return
    timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")
    scheme, loc = parse_address(scheduler)

    async def shake() -> float:
        """0.0, or the seconds waited for an answer that did not come."""
        if scheme == "tcp":
            silent = await _first_words(scheduler, loc, timeout)
            if silent:
                return silent
        try:
            comm = await asyncio.wait_for(connect(scheduler, timeout=timeout, **Security().get_connection_args("client")), 2 * timeout)
        except TimeoutError:  # ours, on the handshake: where nothing answers, connect's own is an OSError
            return 2 * timeout
        await comm.close()
        return 0.0

    silent = _run_stoppable(shake())  # a loop of its own: the caller's may run one
    if silent:
        raise SchedulerError(f"something at {scheduler!r} accepted the connection but did not answer as a dask scheduler within "
                             f"{silent:g} s (the dashboard's HTTP port, 8787 by default, or another service); pass the address "
                             "dask scheduler prints (tcp://HOST:PORT), or use --workers N for a local cluster")


async def _first_words(scheduler: str, loc: str, timeout: float) -> float | None:
    """Look at what answers at ``scheduler``, a ``tcp://`` address (``loc``: its host and port): dask's client handshake
    is sent (by dask's own comm, as ``Client`` sends it) and the first 8 bytes of the answer read, within ``timeout``. A
    dask scheduler's begin with its handshake's length (a uint64 of a few hundred); text (``HTTP/1.1 400 Bad Request``,
    a banner) or a closed connection is a SchedulerError naming it. Returns ``timeout`` when nothing answered within it,
    0.0 when a dask scheduler did, None when the connection was refused (dask's ``connect`` retries it and names it)."""
    import asyncio

    from distributed.comm.core import CommClosedError
    from distributed.comm.registry import get_backend
    from tornado.iostream import StreamClosedError

    try:
        comm = await asyncio.wait_for(get_backend("tcp").get_connector().connect(loc, deserialize=False), timeout)
    except OSError as e:
        # accepted, then closed or reset before the comm was made: dask's CommClosedError of no socket error, or of a reset
        if isinstance(e, CommClosedError) and (e.__cause__ is None or isinstance(e.__cause__, ConnectionResetError | ConnectionAbortedError)):
            raise _not_a_scheduler(scheduler, "closed the connection") from None
        return None  # refused (ConnectionRefusedError), unreachable, a name that does not resolve: dask's connect retries and names it
    except TimeoutError:  # as dask's connect says it (an OSError: no dask scheduler answered)
        raise OSError(f"Timed out trying to connect to {scheduler} after {timeout:g} s") from None
    try:
        await comm.write(comm.handshake_info())
        stream, head = comm.stream, b""
        while len(head) < 8:  # what has come, at least 8 bytes: an answer's first line, to name it
            head += await asyncio.wait_for(stream.read_bytes(256, partial=True), timeout)
        if struct.unpack("Q", head[:8])[0] < 2**24:  # a dask message: its frames' length first (as dask's TCP.read reads it)
            return 0.0
        said = "answered " + repr(head.split(b"\n")[0].strip().decode("latin-1")[:80])
    except TimeoutError:
        return timeout
    except (OSError, StreamClosedError):  # dask's CommClosedError is an OSError
        said = "closed the connection"
    finally:
        comm.abort()
    raise _not_a_scheduler(scheduler, said)


def _not_a_scheduler(scheduler: str, said: str) -> SchedulerError:
    return SchedulerError(f"something at {scheduler!r} accepted the connection but {said}, not a dask scheduler's handshake (the "
                          "dashboard's HTTP port, 8787 by default, or another service); pass the address dask scheduler prints "
                          "(tcp://HOST:PORT), or use --workers N for a local cluster")


def _run_stoppable(coroutine: Any) -> Any:
    """Run ``coroutine`` on an event loop of its own in a thread and return what it returns (raise what it raises). A
    KeyboardInterrupt while it runs cancels it and is raised at once: a ThreadPoolExecutor's shutdown waited for the
    handshake's timeout (2 x 30 s by default) before Ctrl-C took effect."""
    import asyncio

    loop = asyncio.new_event_loop()
    task = loop.create_task(coroutine)

    def run() -> None:  # as asyncio.run does, on this loop
        try:
            loop.run_until_complete(asyncio.wait([task]))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())  # getaddrinfo's thread
            loop.close()

    thread = threading.Thread(target=run, name="kdcache-handshake", daemon=True)
    thread.start()
    try:
        thread.join()
    except BaseException:
        with contextlib.suppress(RuntimeError):  # the loop closed already: it had just finished
            loop.call_soon_threadsafe(task.cancel)
        thread.join(1.0)  # cancelled, it ends within moments; a daemon thread never holds up the exit
        raise
    return task.result()


@contextlib.contextmanager
def _local_cluster(pipeline: Pipeline, workers: int) -> Iterator[Any]:
    """A client of a new LocalCluster: one worker per GPU when the pipeline uses GPUs, else ``workers`` processes."""
    import dask
    from distributed import Client, LocalCluster

    gpus = torch.cuda.device_count() if pipeline.extract.device in ("auto", "cuda") else 0
    n = gpus or workers  # workers >= 1: _check_count
    # daemon=False: a worker may start DataLoader processes (extract.num_workers > 0)
    with dask.config.set({"distributed.worker.daemon": False}), _quiet_driver():
        with _ctrl_c_to_driver():
            # no dashboard; the scheduler's HTTP routes (health, metrics) on a free loopback port, not dask's default
            # 8787, taken by any other cluster on the machine (a second extract warned "Port 8787 is already in use")
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.CRITICAL,
                                   scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, preload=[__name__])
        with cluster, Client(cluster) as client:
            yield client


# dask's own logging says nothing to a LocalCluster's user: its messages (a worker's comm closed as the job stops) are
# not theirs to act on, and the one line a command prints is. silence_logs lowers the level of the handler only while
# each scheduler, nanny and worker lives and puts it back as it closes, before the connections it was using are done:
# a SIGTERM that ended the workers printed "Batched Comm Closed" and a traceback above that line (seen once in CI).
# So the "distributed" logger itself is set to CRITICAL, in the driver for the cluster's whole life, its close
# included, and in each worker process from its start (dask_setup, a preload: also in one its nanny restarts).
def dask_setup(worker: Any) -> None:
    """dask's preload hook (``preload=["kdcache.distributed"]``), run in each worker process as it starts."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _quiet_driver() -> Iterator[None]:
    logger = logging.getLogger("distributed")
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _ctrl_c_to_driver() -> Iterator[None]:
    """Ignore SIGINT while the block starts worker processes: an ignored signal stays ignored in a child, so they
    never see Ctrl-C, which a terminal sends to its whole process group; only the driver answers it (one line)
    and stops them. A Ctrl-C in the few seconds the workers take to start is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_RUNS: dict[str, tuple[Run, dict[str, Any]]] = {}  # per worker process: the teacher and dataset a pipeline built, and their manifest
# A worker started with several threads (``dask worker``'s default: one per core) runs one shard at a time: its tasks share
# one teacher, whose forward hooks saw every thread's batches (a hooked layer "ran more than once", or held another
# shard's rows), and factories seeded the one global RNG at once (their weights differed from the store's)
_ONE_SHARD_AT_A_TIME = threading.Lock()


def _extract_shard(pipeline: Pipeline, location: str, shard: int, storage_options: dict[str, Any] | None,
                   lock_token: str | None = None, command_line: bool = False) -> dict[str, Any]:
    """A dask task: extract one whole shard into the existing store (a no-op if it is already done). ``lock_token``: of
    the job's S3 writer lock (its driver's), which must still be the job's when the shard is written. ``command_line``:
    the driver runs a ``kdcache`` command, whose flags the worker's messages name (``errors.option``)."""
    with _ONE_SHARD_AT_A_TIME, errors.command_line() if command_line else contextlib.nullcontext():  # a global: set by one task at a time
        return _extract_one(pipeline, location, shard, storage_options, lock_token)


def _extract_one(pipeline: Pipeline, location: str, shard: int, storage_options: dict[str, Any] | None,
                 lock_token: str | None) -> dict[str, Any]:
    from distributed import get_worker

    start = time.perf_counter()
    worker = _worker_index()
    pipeline = _on_device(pipeline, worker)
    key = json.dumps([pipeline.to_dict(), str(pipeline.root)], sort_keys=True)
    store = _open_created(location, storage_options, f"dask worker {worker} (pid {os.getpid()} on {socket.gethostname()})")
    store.lease = locking.borrowed_lease(location, storage_options, lock_token)
    # the weights hashed once per worker, not per task; but a cluster outlives jobs, and one kept from an earlier job may
    # be out of date (its checkpoint file replaced since, the pipeline the same): rebuilt before it is called different
    if key not in _RUNS or layout.difference(store.manifest, _RUNS[key][1]) is not None:
        _RUNS.clear()
        try:
            run = setup(pipeline)
        except KdcacheError as e:  # the driver built them: this worker's machine lacks a file, a package, a GPU...
            # its args: dask hands every task's exception to the driver pickled, rebuilt from them (a MissingDependencyError's
            # str(), its msg, too)
            e.args = (f"dask worker {worker} (pid {os.getpid()} on {socket.gethostname()}): {e}",)
            raise
        _RUNS[key] = (run, run.manifest_for(pipeline)(store.manifest))
    run, manifest = _RUNS[key]
    mismatch = _mismatch(store, manifest, f"dask worker {worker} (pid {os.getpid()})")  # every task: a cluster outlives jobs
    if mismatch is not None:
        raise mismatch
    if not store.array(layout.DONE)[shard]:  # a resubmitted task whose first try finished after all
        extract_shards(run, pipeline, store, [shard], Progress(0, "", enabled=False))
    # the worker by its name, which a nanny's restart keeps (a LocalCluster's 0..N-1): counted by pid, a restarted worker was two
    return {"shard": shard, "worker": str(get_worker().name), "seconds": time.perf_counter() - start}


def _open_created(location: str, storage_options: dict[str, Any] | None, who: str) -> layout.Store:
    """The store the driver / rank 0 created at ``location``, opened for writing by a worker or another rank; where there
    is none (a folder on another machine's disk, a ``memory://`` URL: another process's memory) the error says so."""
    try:
        return layout.open_store(location, mode="r+", storage_options=storage_options)
    except StoreError:
        if storage.exists(location, storage_options):
            raise
    raise StoreError(f"{who} finds no store at {location!r}, where the job created it; {REACH}")


def _mismatch(store: layout.Store, manifest: dict[str, Any], who: str) -> StoreMismatchError | None:
    """The error for a process whose teacher or dataset (its ``manifest``) is not the store's, else None. A factory
    that gives other weights in another process (unseeded initialisation, a checkpoint that differs between
    machines) would mix two teachers' targets in one store under one manifest."""
    different = layout.difference(store.manifest, manifest)
    if different is None:
        return None
    return StoreMismatchError(f"{who} cannot write {store.location!r}: its teacher and dataset give {different}; make "
                              "teacher.factory and data.factory give the same model and data in every process (seed the "
                              "initialisation, load the same checkpoint), then rerun to resume")


def _worker_index() -> int:
    """This dask worker's index in a LocalCluster (its name), else 0."""
    from distributed import get_worker

    name = get_worker().name
    return name if isinstance(name, int) else 0


def _on_device(pipeline: Pipeline, index: int) -> Pipeline:
    """On a machine with several GPUs, worker/rank ``index`` uses GPU ``index % count`` (device auto or cuda)."""
    count = torch.cuda.device_count()
    if pipeline.extract.device not in ("auto", "cuda") or count < 2:
        return pipeline
    return dataclasses.replace(pipeline, extract=dataclasses.replace(pipeline.extract, device=f"cuda:{index % count}"))


# -- torchrun ------------------------------------------------------------------------------------
def ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` outside it. A variable that is not a
    count, a rank outside ``0 .. WORLD_SIZE - 1``, or (WORLD_SIZE > 1, both set) a local rank outside ``0 .. LOCAL_WORLD_SIZE - 1``,
    is a ``LaunchError`` (it was int()'s ValueError, a traceback)."""
    world = _launch_count("WORLD_SIZE", os.environ.get("WORLD_SIZE"), 1, least=1)
    rank, local = _launch_count("RANK", os.environ.get("RANK"), 0), _launch_count("LOCAL_RANK", os.environ.get("LOCAL_RANK"), 0)
    if rank >= world:
        raise LaunchError(f"the environment variable RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); {_LAUNCH_FIX}")
    if world > 1:
        together = _launch_count("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_WORLD_SIZE"), 1, least=1)  # cache.local_ranks, training_device read it
        if "LOCAL_RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ and local >= together:  # by hand: its GPU (LOCAL_RANK) another rank's
            raise LaunchError(f"the environment variable LOCAL_RANK={local} is outside 0..{together - 1} (LOCAL_WORLD_SIZE={together}); "
                              f"{_LAUNCH_FIX}")
    return rank, world, local


def refuse_torchrun(command: str, then: str = "") -> None:
    """Refuse torchrun's environment (WORLD_SIZE > 1) for ``command``, which runs in one process (``kdcache demo``,
    ``extract --dry-run``, ``verify --teacher-check``; ``pack``, ``export`` and ``import``): under torchrun each rank ran it
    whole, building its own teacher (every one on the same GPU) and printing its own report, or writing the same file. ``then``: what follows the fix (what does run under torchrun).
    A variable that is not a count is refused as ``ranks`` refuses it."""
    world = ranks()[1]
    if world > 1:
        raise LaunchError(f"{command} runs in one process, but the environment variable WORLD_SIZE={world} asks for {world} "
                          f"(torchrun's); run {command} without torchrun, with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, "
                          f"MASTER_ADDR and MASTER_PORT unset{then}")


# how every LaunchError ends: torchrun sets these variables for each process it starts
_LAUNCH_FIX = ("torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process it "
               "starts: launch kdcache with torchrun (torchrun --nproc-per-node N -m kdcache.cli ...), or unset them to run one process")


def _check_rendezvous() -> None:
    """Refuse to join torchrun's process group where RANK, MASTER_ADDR or MASTER_PORT is not set (WORLD_SIZE set by hand, not
    by torchrun): torch's env:// rendezvous raised a ValueError naming the first (a traceback)."""
    given = {"RANK": os.environ.get("RANK"), "MASTER_ADDR": os.environ.get("MASTER_ADDR"), "MASTER_PORT": os.environ.get("MASTER_PORT")}
    unset = [name for name, value in given.items() if not value]
    if unset:
        raise LaunchError(f"WORLD_SIZE={ranks()[1]} asks for that many processes joined by torch.distributed, but "
                          f"{' and '.join(unset).replace(' and ', ', ', len(unset) - 2)} {'is' if len(unset) == 1 else 'are'} not set; "
                          f"{_LAUNCH_FIX}")


_BEGUN_JOINING = False  # the kdcache command running now has begun joining torchrun's process group (``_joining``; ``new_command``)
FAILED_POLL_S = 0.2  # how often a rank waiting for the others to join looks for a rank that failed before joining
AGENT_STORE_S = 10.0  # how long a rank tries to reach torchrun's store, up before the ranks start, for that (``_agent_store``)


@contextlib.contextmanager
def _joining() -> Iterator[None]:
    """The block joins torchrun's process group (``init_process_group``, which waits up to ``TIMEOUT`` for every rank):
    it ends at once on SIGTERM or Ctrl-C (``_ended_at_once_while_joining``), or where another rank ended before it
    joined (``_stopped_if_a_rank_failed_before_joining``). Where torchrun's store at MASTER_ADDR:MASTER_PORT does not
    answer or goes away (the first machine's torchrun ended), a ``JoinError`` says so in one line (``_could_not_join``)."""
    import torch.distributed as dist

    global _BEGUN_JOINING

    _BEGUN_JOINING = True
    try:
        with _ended_at_once_while_joining(), _stopped_if_a_rank_failed_before_joining():
            yield
    except dist.DistNetworkError as e:  # torchrun's store went away while this rank joined: torch's traceback, the reason in its
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # last line; rank 0's own store (launched otherwise) is
            raise  # another matter (its port taken: EADDRINUSE)
        raise JoinError(_could_not_join(_torch_reason(e))) from e


def new_command() -> None:
    """A kdcache command starts in this process (the CLI's ``train`` or ``extract``): it has not begun joining torchrun's
    process group, whatever an earlier command in the process did (``extract`` leaves the group it joined), so its failure
    before joining is said to the ranks waiting for it (``say_failed_before_joining``)."""
    global _BEGUN_JOINING

    _BEGUN_JOINING = False


def _could_not_join(reason: str) -> str:
    """The line of a rank that could not reach torchrun's store at MASTER_ADDR:MASTER_PORT to join the others, or lost it
    while it joined (``JoinError``)."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return (f"rank {os.environ.get('RANK', '?')} (on {socket.gethostname()}) could not join the other ranks at MASTER_ADDR:MASTER_PORT "
            f"{where} ({reason}): torchrun's store there, which the first machine's torchrun serves, has gone (it ends once a rank of "
            "its own fails: its output names that rank and its error) or is not reachable from this machine; fix that, then run "
            "the same command again on every machine (nothing was written)")


def _torch_reason(e: BaseException) -> str:
    """torch's message of a store's failure without the C++ frames it may carry (``Exception raised from …``)."""
    return one_line(str(e).split("Exception raised from")[0].strip() or type(e).__name__, 160)


def _failed_key() -> str:
    """The key in torchrun's store of the line of a rank that failed before joining (this attempt's: torchrun may restart the ranks)."""
    return f"kdcache/failed-before-joining/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _agent_store(timeout_s: float) -> Any:
    """A client of torchrun's own store, which its agent on the first machine serves at MASTER_ADDR:MASTER_PORT from before
    the ranks start (TORCHELASTIC_USE_AGENT_STORE=True), reached within ``timeout_s``; None where the ranks have none (launched
    otherwise: rank 0 serves theirs once it joins, or MASTER_ADDR or MASTER_PORT unset). A ``JoinError`` where it does not
    answer within ``timeout_s``: that machine's torchrun has ended (one of its ranks failed), and torch's
    ``init_process_group`` tried to reach it for ``TIMEOUT`` (12 hours), silent. What answers is looked at with a plain
    connection first: torch's own client prints its retries, C++ frames and all, on stderr."""
    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())).close()
            break
        except OSError as e:  # refused (nothing listens there now), unreachable, timed out, a name that does not resolve
            if time.monotonic() + FAILED_POLL_S >= deadline:
                raise JoinError(_could_not_join(f"no answer within {timeout_s:g} s: {one_line(e, 120)}")) from e
            time.sleep(FAILED_POLL_S)
    try:
        return TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())),
                        wait_for_workers=False)
    except RuntimeError as e:  # gone since (torch's DistNetworkError), or it did not answer as a store does (DistStoreError)
        raise JoinError(_could_not_join(_torch_reason(e))) from e


def say_failed_before_joining(line: str) -> None:
    """Under torchrun, for a rank whose ``train`` or ``extract`` ended with ``line`` (its own error line) before it began
    joining the others: put the line in torchrun's store, where the ranks waiting for this one to join see it and stop
    with it (``_stopped_if_a_rank_failed_before_joining``). On one machine torchrun stops them once this rank ends; across
    machines the other machines' torchrun never did, and their ranks waited for this one for ``TIMEOUT`` (12 hours): a rank
    whose ``--out`` or ``train.device`` its machine cannot give, a pipeline file its machine lacks. A no-op where this rank
    has begun joining (the ranks' collectives then tell the others), or runs alone or not under torchrun."""
    import torch.distributed as dist

    try:
        alone = ranks()[1] == 1
    except LaunchError:  # torchrun's variables set otherwise: it does not run this rank
        return
    if alone or _BEGUN_JOINING or dist.is_initialized():
        return
    try:
        store = _agent_store(AGENT_STORE_S)
    except JoinError:  # the first machine's torchrun has ended: its output names the rank that failed there
        return
    if store is None:
        return
    with contextlib.suppress(RuntimeError):
        store.set(_failed_key(), f"rank {os.environ.get('RANK', '?')} (on {socket.gethostname()}) stopped before joining the other "
                                 f"ranks: {line}")
        if os.environ.get("GROUP_RANK") == "0" and os.environ.get("LOCAL_WORLD_SIZE") != os.environ["WORLD_SIZE"]:
            time.sleep(3 * FAILED_POLL_S)  # the first machine's torchrun ends its store as this rank ends: the other machines' look first


@contextlib.contextmanager
def _stopped_if_a_rank_failed_before_joining() -> Iterator[None]:
    """While the block joins torchrun's process group, a thread looks in torchrun's store every ``FAILED_POLL_S`` seconds
    for the line of a rank that failed before it joined (``say_failed_before_joining``): one seen ends this process, exit
    1, each machine's first rank (LOCAL_RANK 0) printing ``Error: rank R (on HOST) stopped before joining the other ranks:
    ITS LINE``. Without it, where that rank ran on another machine, this one waited for it for ``TIMEOUT`` (12 hours):
    only the failed rank's own torchrun saw it end. A rank that works long before it joins (a large checkpoint read)
    is still waited for. Where torchrun serves no store of its own (``_agent_store``), the block just runs; where its store
    does not answer, this rank cannot join: a ``JoinError`` (``_agent_store``; ``_joining``: where it goes away later)."""
    store = _agent_store(AGENT_STORE_S)
    if store is None:
        yield
        return
    stop, key = threading.Event(), _failed_key()

    def look() -> None:
        while not stop.wait(FAILED_POLL_S):
            try:
                if not store.check([key]):
                    continue
                said = store.get(key).decode("utf-8", "replace")
            except RuntimeError:  # the store is gone (its machine's torchrun ended): init_process_group's DistNetworkError, a JoinError
                return
            if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
                sys.stderr.write(f"Error: {said}\n")
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(1)

    thread = threading.Thread(target=look, name="kdcache-failed-ranks", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _ended_at_once_while_joining() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit or preemption, torchrun stopping its ranks) and Ctrl-C end the process at once
    while the block joins torch's process group. kdcache's handlers of them (the command's, which stops it as Ctrl-C
    does) are Python's, which run only once torch's ``init_process_group`` returns: rank 0 waited there for a rank that
    never came until ``TIMEOUT`` (12 hours), SIGTERM and Ctrl-C ignored. Nothing is written before the ranks have joined,
    so nothing is lost: the process exits 143 (SIGTERM) or 130 (Ctrl-C), rank 0 saying so in one line. Python's own C
    handler still takes each signal and writes its number to the wakeup fd, which a thread of ours reads, not held up by
    the main thread's wait. A signal ignored, or left to the system's default (which ends the process at once: the ranks
    but 0 under the kdcache command), is left as it is; the handlers are given back once joined. Main thread only."""
    taken = {s for s in (signal.SIGTERM, signal.SIGINT) if callable(signal.getsignal(s))}
    if threading.current_thread() is not threading.main_thread() or not taken:
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)  # as set_wakeup_fd asks
    handlers = {s: signal.signal(s, _left_to_the_thread) for s in taken}  # one that came between C calls does nothing either
    wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    thread = threading.Thread(target=_end_on_signal, args=(read, taken), name="kdcache-joining", daemon=True)
    thread.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(wakeup)
        os.write(write, b"\0")  # the thread's end: read after any signal's number written before
        thread.join()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        os.close(read), os.close(write)


def _left_to_the_thread(signum: int, frame: Any) -> None:
    """``_ended_at_once_while_joining``'s handler: ``_end_on_signal`` ends the process."""


def _end_on_signal(read: int, taken: set[int]) -> None:
    """Read signal numbers from the wakeup fd ``read`` until 0; at one of ``taken``, end the process, rank 0 saying why."""
    while (signum := os.read(read, 1)[0]) not in taken:
        if signum == 0:
            return
    if os.environ.get("RANK", "0") in ("", "0"):  # the other ranks end silently, as the kdcache command's do
        said = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
        sys.stderr.write(f"Error: {said} while waiting for the other ranks to join (WORLD_SIZE={os.environ.get('WORLD_SIZE')}, "
                         f"MASTER_ADDR:MASTER_PORT {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}); nothing was "
                         "written: run the same command again\n")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)  # as a process ended by the signal says (the kdcache command's 143 and 130)


def _launch_count(name: str, given: str | None, default: int, least: int = 0) -> int:
    """The environment variable ``name``'s value ``given`` as a whole number >= ``least`` (``default`` where it is not set)."""
    if given is None:
        return default
    if not re.fullmatch(r"\s*\d+\s*", given) or int(given) < least:
        raise LaunchError(f"the environment variable {name}={given!r} is not a whole number >= {least}; {_LAUNCH_FIX}")
    return int(given)


@contextlib.contextmanager
def process_group(device: torch.device | None = None) -> Iterator[None]:
    """Join torchrun's process group for the block (gloo; nccl for CUDA devices), unless one is already up."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    _check_rendezvous()
    with _joining():
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def extract_torchrun(pipeline: Pipeline, out: str, *, overwrite: bool = False, progress: bool = False,
                     storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``extract`` as one of ``torchrun``'s WORLD_SIZE ranks: rank 0 creates the arrays, rank r writes the
    pending shards r, r+K, ..., rank 0 finishes the manifest after all are done. Every rank returns ``info()`` with
    ``shards_written``, the job's (``written``)."""
    import torch.distributed as dist

    overwrite, progress = storage.flag_arg(overwrite, "overwrite"), storage.flag_arg(progress, "progress")
    rank, world, local = ranks()
    pipeline = _on_device(pipeline, local)
    locking.refuse_if_being_written(out, storage_options)  # every rank, before its teacher is built (rank 0's lock below decides)
    with process_group(), contextlib.ExitStack() as lock:
        refusal = None
        if rank == 0:
            try:
                layout.refuse_replacing(out, overwrite, storage_options)  # before any rank builds its teacher
            except Exception as e:  # noqa: BLE001 - said to every rank (_from_rank_0), raised on rank 0 as it is
                refusal = e
        _from_rank_0(refusal)
        run = setup(pipeline)  # every rank builds its teacher (in parallel with rank 0's store creation)
        made: Any = None  # stays None where the store is complete and the job may not lock it (complete_read_only)
        if rank == 0:
            say_headless(pipeline, run)
            try:
                if complete_read_only(out, run, pipeline, overwrite, storage_options) is None:  # a read-only mount's: no lock to take
                    lock.enter_context(locking.writer_lock(out, storage_options, helpers=world > 1))  # held by rank 0 for the whole job
                    store = layout.create_or_resume(out, run.manifest_for(pipeline), overwrite=overwrite, storage_options=storage_options)
                    # the job's lock, which the other ranks check before each shard: its S3 token, or what the local lock file says
                    made = (store.resume_pending(), getattr(store.lease, "token", None) or locking.local_token(out))
                    check_done_rows(run.dataset, store, made[0])
            except Exception as e:  # noqa: BLE001 - as above
                made = e
        if (shared := _from_rank_0(made)) is None:
            return written(layout.open_store(out, storage_options=storage_options), [])  # every rank: nothing was left to write
        pending, token = shared
        if rank != 0:
            store = _open_created(out, storage_options, f"rank {rank} (on {socket.gethostname()})")
            store.lease = locking.borrowed_lease(out, storage_options, token, f"rank {rank}")  # rank 0's lock: still the job's
            if isinstance(store.lease, locking.LocalBorrowed):  # rank 0 holds it now: a flock this rank cannot see is not checked
                store.lease.flock = store.lease.sees_flock()
        manifest = run.manifest_for(pipeline)(store.manifest)  # as rank 0 resumed or created it: the store's fingerprint algorithm
        mismatches: list[Any] = [None] * world  # every rank's teacher and dataset must be the store's; all stop if one is not
        dist.all_gather_object(mismatches, _mismatch(store, manifest, f"rank {rank}"))
        first = next((m for m in mismatches if m is not None), None)
        if first is not None:
            raise first
        total = sum(store.shard_rows(s)[1] - store.shard_rows(s)[0] for s in pending)
        with _watch(store, pending, Progress(total, f"extract [{world} ranks]", enabled=progress and rank == 0)):
            extract_shards(run, pipeline, store, pending[rank::world], Progress(0, "", enabled=False))
            dist.barrier()
        if rank == 0:
            store.finish()
        dist.barrier()  # the manifest is final before any rank reports
        return written(layout.open_store(out, storage_options=storage_options), pending)


def _from_rank_0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank; where it is an error, raised on every rank: the others stop with rank 0's line
    (another exception than kdcache's, a bug or an OSError: ``rank 0 failed: TYPE: MESSAGE``) instead of waiting for it
    or saying only that rank 0 ended. Rank 0 raises its own, traceback and all."""
    import torch.distributed as dist

    shared = [value]
    if isinstance(value, Exception) and not isinstance(value, KdcacheError):  # its class may not unpickle on the others
        shared = [KdcacheError(f"rank 0 failed: {type(value).__name__}: {one_line(value)} (rank 0 prints its traceback)")]
    dist.broadcast_object_list(shared, src=0)
    if isinstance(value, BaseException):
        raise value
    if isinstance(shared[0], BaseException):
        raise shared[0]
    return shared[0]


PROGRESS_READS_PER_S = 100.0  # done markers the torchrun bar reads a second, at most on average (S3: GETs)


@contextlib.contextmanager
def _watch(store: layout.Store, shards: list[int], bar: Progress, every: float = 1.0,
           reads_per_s: float = PROGRESS_READS_PER_S) -> Iterator[None]:
    """Show the whole job's progress (its ``shards`` done by every rank, read from the store) while the block runs.
    Each look reads only the markers not yet seen done (within a run a marker only goes from not done to done, FORMAT.md
    §12.3; a resuming writer clears one before the run, §12.4), and looks come ``every`` seconds or, where more markers
    wait, as often as ``reads_per_s`` markers a second allow: on S3 a 10,000-shard job's bar made 10,000 GETs a second."""
    if not bar.enabled:
        yield
        return
    stop, waiting = threading.Event(), list(shards)

    def look() -> None:
        nonlocal waiting
        with contextlib.suppress(KdcacheError):  # a read that failed (an S3 request on the way): the next look tells
            newly = {s for s, d in zip(waiting, store.done(waiting)) if d} if waiting else set()
            bar.update(sum(store.shard_rows(s)[1] - store.shard_rows(s)[0] for s in newly))
            waiting = [s for s in waiting if s not in newly]

    def poll() -> None:
        while not stop.wait(max(every, len(waiting) / reads_per_s)):
            look()

    thread = threading.Thread(target=poll, name="kdcache-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        look()  # never hides the block's error
        bar.close()


# -- data-parallel training ----------------------------------------------------------------------
def broadcast_parameters(modules: list[torch.nn.Module]) -> None:
    """Rank 0's parameters and buffers on every rank: every rank starts from the same student and heads."""
    import torch.distributed as dist

    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            dist.broadcast(t.data, src=0, group=_group(steps=True))


def broadcast_buffers(modules: list[torch.nn.Module]) -> None:
    """Rank 0's buffers of its state dict on every rank (no-op outside torch.distributed): each rank updates BatchNorm's
    running statistics from its own rows, so an evaluation would otherwise score another student on each rank than the
    one rank 0 saves. Non-persistent buffers (masks, caches a forward may size by its batch) are left as they are."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    for m in modules:
        params = {id(p) for p in m.parameters()}
        for t in m.state_dict(keep_vars=True).values():
            if isinstance(t, torch.Tensor) and id(t) not in params:
                dist.broadcast(t.data, src=0, group=_group(steps=True))


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """After ``backward`` on every rank: each gradient becomes the mean over the ranks (what DDP gives), in one flat
    all-reduce per parameter dtype (one for the usual float32 student; a float64 head or bfloat16 weights beside it get
    their own: one buffer would promote every gradient to the widest dtype, which a parameter refuses as its grad). A
    parameter no rank's loss reached (an auxiliary output, a features-only run's classifier) keeps no gradient, so the
    optimizer skips it, as in one process; one that some rank reached gets the mean on every rank (zeros from the
    others), so the ranks never diverge. Unlike ``DistributedDataParallel``, whose reducer stops a run at the first
    parameter a step leaves unused, and which cannot see the projection heads used outside its forward."""
    import torch.distributed as dist

    local = [p.grad is not None for p in params]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    reached, views = local, {}
    for k, dtype in enumerate(dict.fromkeys(g.dtype for g in grads)):  # the parameters' order: the same on every rank
        members = [i for i, g in enumerate(grads) if g.dtype == dtype]
        flags = [torch.tensor(local, dtype=dtype, device=grads[0].device)] if k == 0 else []  # which parameters each rank reached
        flat = torch.cat([grads[i].reshape(-1) for i in members] + flags)
        dist.all_reduce(flat, group=_group(steps=True))
        flat /= world
        # what this rank reached, every rank reached in part: only a rank that left a parameter unreached reads the flags
        # (a wait for the all-reduce on a GPU; the common step, every parameter reached, queues the optimizer's kernels behind it)
        if flags and not all(local):
            reached = flat[-len(params):].tolist()
        offset = 0
        for i in members:  # views of one buffer, as DDP's gradient_as_bucket_view
            views[i], offset = flat[offset : offset + grads[i].numel()].view_as(params[i]), offset + grads[i].numel()
    for i, p in enumerate(params):
        p.grad = views[i] if reached[i] else None


def join_training(streams: int, device: torch.device, timeout_s: float = TIMEOUT.total_seconds()) -> int:
    """The number of streams (``cache.TransferSet``) to train with; under torchrun, join its process group first: its
    collectives (a step's all-reduce) wait ``timeout_s`` for a rank, those of a second, gloo group (``barrier``,
    ``broadcast``, ``gather``: where one rank may work long while the others wait) ``TIMEOUT``."""
    import atexit

    import torch.distributed as dist

    global _GROUPS

    _, world, _ = ranks()
    if world > 1 and streams not in (1, world):  # below 1: refused with the pipeline (train.streams must be >= 1)
        raise PipelineError(f"train.streams = {streams}; use 1 (or the number of ranks, {world}, under torchrun): "
                            "streams = K in one process reproduces a K-rank torchrun run")
    if world == 1:
        return streams
    if not dist.is_initialized():
        if device.type == "cuda":  # NCCL's object collectives use the current device: every rank's would be cuda:0
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        _check_rendezvous()
        with _joining():  # nothing to save yet: SIGTERM, or a rank that failed before joining, ends a rank still waiting for the others
            dist.init_process_group(backend, timeout=TIMEOUT)  # joining waits for every rank's start (a large checkpoint read)
            # nccl: the default group runs no collective, so makes no communicator; the steps' group is the one
            _GROUPS = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=TIMEOUT),
                       dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s)))
        atexit.register(dist.destroy_process_group)
    return world


def _group(steps: bool = False) -> Any:
    """``join_training``'s group of a step's collectives (``steps``) or of those that may wait long; None (the default
    group) where it made none, or the process group was made again since."""
    import torch.distributed as dist

    world, waits, step = _GROUPS
    return (step if steps else waits) if world is not None and world is dist.group.WORLD else None


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself outside torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0, group=_group())
    return shared[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank (``[value]`` outside torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_group())
    return values


def barrier() -> None:
    """Wait for every rank (no-op outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=_group())


def sum_over_ranks(values: torch.Tensor, waits: bool = False) -> torch.Tensor:
    """``values`` summed element-wise over every rank (``values`` itself outside torch.distributed): in the steps' group
    (on the training device), or (``waits``: where ranks may finish their work far apart, as an evaluation) in the
    gloo group that waits ``TIMEOUT``, for CPU tensors."""
    import torch.distributed as dist

    if dist.is_initialized():
        group = _group(steps=not waits)
        if group is None and dist.get_backend() == "nccl" and values.device.type == "cpu":  # a caller's own NCCL group (no
            reduced = values.to(f"cuda:{torch.cuda.current_device()}")  # gloo group of kdcache's): reduced on the device
            dist.all_reduce(reduced)
            return reduced.cpu()
        values = values.clone()
        dist.all_reduce(values, group=group)
    return values


def my_part(n: int) -> np.ndarray:
    """The items ``0 .. n-1`` this rank takes of work the ranks share out (an evaluation): a contiguous ``1 / world``
    of them, in rank order (all of them outside torchrun)."""
    rank, world, _ = ranks()
    return np.array_split(np.arange(n), world)[rank]


def training_device(name: str) -> str:
    """Rank ``LOCAL_RANK`` trains on GPU ``LOCAL_RANK`` when the pipeline asks for auto/cuda and GPUs exist."""
    _, world, local = ranks()
    if world > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local % torch.cuda.device_count()}"
    together = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world > 1 and together > 1 and name.startswith("cuda:"):  # NCCL takes one rank per GPU ("Duplicate GPU detected")
        raise PipelineError(f"train.device = {name!r} under torchrun puts all {together} ranks of this machine on one GPU; use "
                            "\"cuda\" or \"auto\" (rank LOCAL_RANK trains on GPU LOCAL_RANK), or CUDA_VISIBLE_DEVICES to choose the GPUs")
    return name
