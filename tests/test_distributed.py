"""Scale-out with real processes: a LocalCluster, a ``dask scheduler`` + ``dask worker`` pair on loopback,
a worker SIGKILLed mid-shard, ``torchrun`` ranks (extract and DDP train). Every store must equal the
single-process store (arrays byte-equal, manifest equal but for timestamps)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from click.testing import CliRunner

import kdcache
from kdcache.cli import main
from kdcache.distributed import extract_distributed
from kdcache.errors import PipelineError, StoreError
from kdcache.locking import writer_lock
from kdcache.store import open_store
from conftest import FIXTURES, S3_BUCKET as BUCKET
from reference import done_at_least, make_pipeline, mount_to_make_read_only, shards_done, without_times, write_toml

pytest.importorskip("distributed")
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def assert_same_store(a: str, b: str, options_a=None, options_b=None) -> None:
    sa, sb = open_store(a, storage_options=options_a), open_store(b, storage_options=options_b)
    assert sa.complete and sb.complete
    assert without_times(sa.manifest) == without_times(sb.manifest)
    assert sa.paths() == sb.paths()
    for path in sa.paths() + ["progress/done", "progress/digest"]:
        x, y = sa.array(path)[:], sb.array(path)[:]
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), path


@pytest.fixture(scope="module")
def toml(tmp_path_factory) -> str:
    """The extract tests' pipeline (50 samples, 4 shards of 16 rows) as a file, factory paths absolute."""
    return str(write_toml(tmp_path_factory.mktemp("pipeline") / "p.toml"))


@pytest.fixture(scope="module")
def single(toml, tmp_path_factory) -> str:
    """The reference: ``toml`` extracted by one process, this one."""
    out = str(tmp_path_factory.mktemp("single") / "single.zarr")
    kdcache.extract(kdcache.load_pipeline(toml), out)
    return out


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill each process's whole group (each started in a session of its own: a ``dask worker``'s worker processes
    with it). A graceful stop is no part of what is tested here: SIGTERM took 1-3 s a cluster (``dask worker`` outlived
    a 3 s wait and was then killed anyway, its worker processes left running)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


def _two_machines(command: str, toml: Path, tmp_path: Path, request: Any) -> tuple[Path, str | None, int]:
    """For two torchrun launchers on loopback as two machines: the pipeline file (train's: the tiny one, its factories
    by absolute path), train's store, and a port let go for machine 0's torchrun to serve its store on."""
    from conftest import TINY_TOML

    tiny_store = None
    if command == "train":
        tiny_store, toml = request.getfixturevalue("tiny_store"), tmp_path / "tiny.toml"
        toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return toml, tiny_store, s.getsockname()[1]


def _end_launchers(procs: list[subprocess.Popen]) -> None:
    """End the torchrun launchers still running: SIGTERM first (torchrun then stops its rank, which a SIGKILL of
    torchrun would leave waiting), SIGKILL after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("workers", [1, 3])  # 2: the SIGKILL and S3 tests
def test_local_cluster_store_equals_single_process(toml, single, tmp_path, workers):
    out = str(tmp_path / "dask.zarr")
    info = extract_distributed(kdcache.load_pipeline(toml), out, workers=workers)
    assert info["complete"] and info["completed"]
    assert_same_store(out, single)


@pytest.fixture(scope="module")
def workers_folder(tmp_path_factory) -> Path:
    """The folder ``scheduler``'s workers run in: not the driver's (a relative --out must not resolve there)."""
    return tmp_path_factory.mktemp("workers")


@pytest.fixture(scope="module")
def scheduler(workers_folder):
    """``dask scheduler`` and ``dask worker`` (2 single-threaded processes) as subprocesses on 127.0.0.1, shared by the
    module's tests (a cluster outlives jobs: each job's store and pipeline are its own; started per test, 0.8-1.3 s
    each). The workers run in ``workers_folder``."""
    with _dask_cluster(workers_folder, 2) as address:
        yield address


@pytest.fixture(scope="module")
def slow_scheduler(workers_folder):
    """As ``scheduler``, one worker, whose zoo datasets have 240 items of 10 ms each (30 shards of 8 rows: a job long
    enough to be stopped midway), for the tests of a job that loses its lock: one cluster for them all, not a
    LocalCluster each (4-6 s to start and close)."""
    with _dask_cluster(workers_folder, 1, N="240", SLEEP="0.01") as address:
        yield address


@contextlib.contextmanager
def _dask_cluster(folder: Path, workers: int, **zoo: str) -> Iterator[str]:
    """The address of ``dask scheduler`` and ``dask worker`` (``workers`` single-threaded processes, run in ``folder``,
    with the ``ZOO_*`` knobs ``zoo`` and no other) started as subprocesses on 127.0.0.1; killed at the block's end."""
    from distributed import Client

    log = open(folder.parent / f"{folder.name}-dask-{workers}.log", "w")
    # started before any test's zoo_env: no knob leaks in but those given
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")} | {f"ZOO_{k}": v for k, v in zoo.items()}
    scheduler, address = _scheduler(folder.parent / f"{folder.name}-dask-{workers}.json", stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env)
    procs = [scheduler]
    try:
        procs.append(subprocess.Popen([BIN / "dask", "worker", address, "--nworkers", str(workers), "--nthreads", "1",
                                       "--no-dashboard", "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT,
                                      cwd=folder, start_new_session=True, env=env))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(workers, timeout=60)
        yield address
    finally:
        _stop(procs[::-1])
        log.close()


def _scheduler(file: Path, **popen: Any) -> tuple[subprocess.Popen, str]:
    """``dask scheduler`` on 127.0.0.1, on the port it binds (0: any free one), and its address, read from the scheduler
    file it writes: not a port found free here and bound later, which under pytest-xdist another worker may take meanwhile
    (this scheduler then fails to start, and the test runs on the other worker's). Its HTTP server, on even without the
    dashboard, on a free port too: 8787 is left to the module's LocalClusters."""
    file.unlink(missing_ok=True)  # a file of an earlier scheduler's would give its address
    proc = subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", str(file),
                             "--no-dashboard", "--dashboard-address", "127.0.0.1:0"], **popen)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError, KeyError):  # not written yet, or half
            return proc, json.loads(file.read_text())["address"]
        time.sleep(0.05)
    _stop([proc])
    pytest.fail(f"dask scheduler did not write its address to {file} (exit status {proc.poll()})")


def test_a_tests_dask_cluster_is_the_one_it_started(tmp_path):
    """``_dask_cluster`` took a port found free for its scheduler to bind later: under pytest-xdist another worker may
    take it meanwhile, and the scheduler did not start (the test then waited on the other's port). Its scheduler binds
    port 0 and writes the address it got; here a port that was free a moment ago is held while the cluster starts."""
    from distributed import Client

    held = socket.create_server(("127.0.0.1", 0))
    (tmp_path / "w").mkdir()
    try:
        with _dask_cluster(tmp_path / "w", 1) as address, Client(address, timeout=30) as client:
            assert client.submit(sum, [1, 2]).result() == 3
            assert not address.endswith(f":{held.getsockname()[1]}")
    finally:
        held.close()


def test_cli_on_an_existing_scheduler_resumes_a_partial_store(toml, single, scheduler, tmp_path, zoo_env):
    out = str(tmp_path / "resumed.zarr")
    zoo_env(FAIL_AT=40)  # a single process stops in shard 2: shards 0 and 1 are done
    with pytest.raises(RuntimeError, match="simulated crash"):
        kdcache.extract(kdcache.load_pipeline(toml), out)
    zoo_env(FAIL_AT=None)
    assert open_store(out).done().tolist() == [True, True, False, False]
    result = CliRunner().invoke(main, ["extract", toml, "--out", out, "--scheduler", scheduler])
    assert result.exit_code == 0, result.output
    assert "4/4 shards" in result.output
    assert f"resumed {out}: 2 of 4 shards were already done; this run wrote the others" in result.stderr, result.stderr  # the driver's count
    assert_same_store(out, single)


def test_a_scheduler_without_workers_is_said_and_the_job_waits_for_one(toml, single, tmp_path):
    """A scheduler no worker has joined (yet: a batch queue's, or a worker started with a wrong address): the job waited
    for one with no word (exit 124 under timeout, nothing printed); it now says so on stderr, then runs once one joins."""
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    scheduler, address = _scheduler(tmp_path / "scheduler.json", **quiet)
    procs = [scheduler]
    try:
        out = str(tmp_path / "late.zarr")
        job = subprocess.Popen([sys.executable, "-m", "kdcache", "extract", toml, "--out", out, "--scheduler", address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(job)
        ready, _, _ = select.select([job.stderr], [], [], 90)  # the old job said nothing, ever
        line = job.stderr.readline() if ready else "(nothing within 90 s)"
        assert line == (f"note: no dask worker is connected to the scheduler at {address!r}; the shards wait for one to join (start "
                        f"one: dask worker {address} --nworkers 1 --nthreads 1)\n"), line
        procs.append(subprocess.Popen([BIN / "dask", "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                                       "--host", "127.0.0.1"], **quiet))
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        assert_same_store(out, single)
    finally:
        _stop(procs[::-1])


def test_dask_workers_redo_a_done_shard_whose_object_is_missing(toml, single, scheduler, tmp_path):
    """The driver clears the marker of a done shard that lost an object before handing out the pending shards: a worker
    skips a shard marked done (a resubmitted task's), so that shard would stay damaged."""
    out = tmp_path / "lost.zarr"
    shutil.copytree(single, out)
    (out / "targets" / "logits" / "c" / "1" / "0").unlink()
    result = CliRunner().invoke(main, ["extract", toml, "--out", str(out), "--scheduler", scheduler])
    assert result.exit_code == 0, result.output
    assert "shard 1 (rows 16-31) was marked done but its object 'targets/logits/c/1/0' is missing" in result.output, result.output
    assert_same_store(str(out), single)


def test_a_relative_out_is_the_drivers_folder_not_the_workers(toml, single, scheduler, workers_folder, tmp_path, monkeypatch):
    """Workers started in another folder than the driver's resolved a relative --out there: they found no store
    ("no store at 'rel.zarr'; run kdcache extract ... first", after the driver had created it), or wrote another one."""
    (tmp_path / "driver").mkdir()
    monkeypatch.chdir(tmp_path / "driver")
    result = CliRunner().invoke(main, ["extract", toml, "--out", "rel.zarr", "--scheduler", scheduler])
    assert result.exit_code == 0, result.output
    assert_same_store(str(tmp_path / "driver" / "rel.zarr"), single)
    assert workers_folder.is_dir() and not (workers_folder / "rel.zarr").exists()


def test_extract_distributed_refuses_a_location_or_pipeline_of_another_type(tmp_path, monkeypatch):
    """README: a location that is not a str or Path, or a pipeline that is not loaded, is a TypeError naming the argument,
    as for kdcache.extract; extract_distributed(p, None) wrote a store named 'None' in the working folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=r"out must be the location of a store or folder, got NoneType None"):
        extract_distributed(make_pipeline(), None)
    with pytest.raises(TypeError, match=r"pipeline must be a kdcache.Pipeline, got str .*load it first"):
        extract_distributed(str(FIXTURES / "tiny.toml"), str(tmp_path / "s.zarr"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("counts, error, match", [
    ({"workers": 0}, PipelineError, r"^workers must be >= 1 \(CPU worker processes of a local dask cluster\), got 0$"),
    ({"workers": -2}, PipelineError, r"^workers must be >= 1 .*, got -2$"),
    ({"workers": "2"}, TypeError, r"^workers must be an int \(CPU worker processes of a local dask cluster\), got str '2'$"),
    ({"workers": True}, TypeError, r"^workers must be an int .*, got bool True$"),
    ({"attempts": 0}, PipelineError, r"^attempts must be >= 1 \(tries of each shard before the job stops\), got 0$"),
    ({"attempts": 2.0}, TypeError, r"^attempts must be an int \(tries of each shard before the job stops\), got float 2.0$"),
    ({"attempts": 0, "scheduler": "tcp://127.0.0.1:1"}, PipelineError, r"^attempts must be >= 1 "),
    ({"workers": 4, "scheduler": "tcp://127.0.0.1:1"}, TypeError,
     r"^extract_distributed takes workers \(a local dask cluster\) or scheduler \(an existing one\), not both: got workers=4 and "
     r"scheduler='tcp://127.0.0.1:1'; pass one of them$"),
])
def test_extract_distributed_refuses_a_worker_count_before_anything_is_built(tmp_path, counts, error, match):
    """The CLI's --workers is at least 1; through the API workers=0 was checked only as the cluster started: the teacher
    had been built and an empty store created at OUT, then the error named --workers ("2" was a TypeError from inside).
    ``attempts`` likewise (0 ended in 'shard 0 failed 0 times' once the teacher had been built and the store created).
    ``workers`` beside ``scheduler`` (the CLI's usage error) was dropped without a word: the job ran on the scheduler's
    workers, or waited dask's connect timeout, 30 s, for one that was not there."""
    with pytest.raises(error, match=match):
        extract_distributed(make_pipeline(), tmp_path / "s.zarr", **counts)
    assert list(tmp_path.iterdir()) == []


def test_workers_that_cannot_reach_the_drivers_store_stop_the_job(toml, scheduler, tmp_path):
    """A location each process has its own of (memory://: the process's memory; a folder on each machine's local disk):
    the workers found no store and said to run kdcache extract first, the command just run; or, where each had one of
    its own, wrote that and the job ended with exit 0 and the driver's store empty."""
    import fsspec
    from distributed import Client

    from kdcache.distributed import ShardError

    folder = f"kdcache-test-{os.getpid()}"
    out = f"memory://{folder}/unshared.zarr"
    with Client(scheduler) as client:
        try:
            with pytest.raises(StoreError) as e:
                extract_distributed(kdcache.load_pipeline(toml), out, scheduler=scheduler)
            assert str(e.value).startswith("dask worker ") and f"finds no store at {out!r}, where the job created it" in str(e.value)
            assert "a filesystem they share, or an object store URL" in str(e.value)
            client.run(kdcache.extract, kdcache.load_pipeline(toml), out)  # each worker's own store
            with pytest.raises(ShardError, match=rf"reported shards 0, 1, 2, 3 written, but {out!r} does not have them"):
                extract_distributed(kdcache.load_pipeline(toml), out, scheduler=scheduler)
            assert not open_store(out).done().any()
        finally:  # the driver's store, and each worker's: the module's later jobs run on those workers
            def forget() -> None:
                if fsspec.filesystem("memory").exists(folder):
                    fsspec.filesystem("memory").rm(folder, recursive=True)

            client.run(forget)
            forget()


def test_a_cluster_rebuilds_a_teacher_whose_checkpoint_changed_since_its_last_job(tmp_path):
    """A cluster outlives jobs, and each worker keeps the teacher it built for a pipeline. A teacher whose checkpoint
    file was replaced between two jobs (the same pipeline, the same path) gave the driver the new weights and every
    worker its old ones: each job stopped ("its teacher and dataset give different teacher weights ... seed the
    initialisation"), rerun after rerun, until the workers were restarted."""
    from distributed import Client, LocalCluster

    from conftest import FIXTURES

    (tmp_path / "teacher.py").write_text(
        "import pathlib\nimport torch\n\n"
        "def teacher():\n"
        "    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))\n"
        "    model.load_state_dict(torch.load(pathlib.Path(__file__).with_name('teacher.pt')))\n"
        "    return model\n")
    toml = write_toml(tmp_path / "p.toml", f"teacher.factory='{tmp_path / 'teacher.py'}:teacher'", "targets.layers=[]")
    assert f"{FIXTURES}/extract_zoo.py:images" in toml.read_text()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster):
        for version in range(2):  # the checkpoint fine-tuned further, saved over the old one, extracted into a new store
            torch.manual_seed(version)
            torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).state_dict(), tmp_path / "teacher.pt")
            out = str(tmp_path / f"v{version}.zarr")
            info = extract_distributed(kdcache.load_pipeline(toml), out, scheduler=cluster.scheduler_address)
            assert info["complete"]
            single = str(tmp_path / f"single-v{version}.zarr")
            kdcache.extract(kdcache.load_pipeline(toml), single)
            assert_same_store(out, single)


@pytest.mark.timeout(600)  # two starts of a worker (torch's import, the teacher's build) on a loaded box: 300 s ran out
def test_worker_killed_mid_shard_is_retried(tmp_path, zoo_env, fetch_log, capfd):
    """The killed worker's shard is retried and the store equals the single-process one; the progress line counts the
    2 workers (by name: counted by pid, the one the nanny restarted was a third). Each step waits for its moment: both
    workers held mid-way through the last two shards (in submission order: each did one before), one killed there, its
    restart holding the retried shard, then both let go. (Timed by a 0.5 s shard instead, a loaded box's first worker
    did every shard while the other started and was killed: the line said 1 worker.)"""
    import dask
    from distributed import Client, LocalCluster

    zoo_env(N=96)  # 6 shards of 16 rows
    reference = str(tmp_path / "single.zarr")
    kdcache.extract(make_pipeline(), reference)
    fetch_log(clear=True)
    hold = tmp_path / "hold"
    hold.touch()
    zoo_env(HOLD=hold, HOLD_AT="72,88")  # mid-way through shards 4 and 5; read by the workers when they start
    out = str(tmp_path / "killed.zarr")

    def held() -> set[int]:  # the processes that reached a held row
        return {int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("hold.held-*")}

    def wait_for(condition: Callable[[], Any], what: str) -> None:
        deadline = time.monotonic() + 240  # the nanny's restart imports torch again, on a loaded box
        while not condition():
            assert time.monotonic() < deadline and job.is_alive(), what
            time.sleep(0.05)

    # a worker runs one shard at a time, none queued behind: the retried shard waits for a free one, the restarted one
    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        result: dict = {}
        job = threading.Thread(target=lambda: result.update(info=extract_distributed(make_pipeline(), out, scheduler=cluster.scheduler_address,
                                                                                    progress=True)))
        job.start()
        wait_for(lambda: len(held()) == 2, "the two workers did not both reach a held row")
        before, done_before = held(), int(open_store(out).done().sum())
        assert before == set(client.run(os.getpid).values())
        os.kill(min(before), signal.SIGKILL)  # mid-shard
        wait_for(lambda: held() - before, "the restarted worker did not reach the retried shard's held row")
        hold.unlink()
        job.join(timeout=300)
        assert not job.is_alive(), "the extract did not finish within 300 s of the worker's death"
    assert done_before < 6
    fetched = fetch_log()
    assert sorted(set(fetched)) == list(range(96)) and len(fetched) > 96  # the killed worker's shard was fetched again
    assert result["info"]["complete"]
    assert_same_store(out, reference)
    err = capfd.readouterr().err
    assert "shards, 2 workers]" in err and "3 workers" not in err, err[-2000:]


def test_a_shard_whose_dataset_keeps_failing_is_tried_attempts_times_then_named(tmp_path, zoo_env, fetch_log):
    """The dataset's read failing (a DataError: a network share's hiccup, say) may not happen again: the shard's task is
    submitted again, up to ``ATTEMPTS`` tries, and then the job stops with the dataset's one line; the shards written
    stay done and the rerun, the cause gone, writes the store one process does. (A worker killed mid-shard is dask's own
    retry, above: this is kdcache's.)"""
    from kdcache.distributed import ATTEMPTS

    zoo_env(N=48)  # 3 shards of 16 rows
    toml, out, reference = str(write_toml(tmp_path / "p.toml")), str(tmp_path / "s.zarr"), str(tmp_path / "single.zarr")
    kdcache.extract(kdcache.load_pipeline(toml), reference)
    fetch_log(clear=True)
    zoo_env(FAIL_AT=20)  # in shard 1; read by the workers as they start
    result = CliRunner().invoke(main, ["extract", toml, "--out", out, "--workers", "1"])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: the dataset raised RuntimeError: simulated crash fetching index 20") and \
        result.stderr.count("\n") == 1, result.stderr
    assert fetch_log().count(16) == ATTEMPTS  # shard 1's first row, fetched once a try
    assert not open_store(out).done()[1]
    zoo_env(FAIL_AT=None)
    result = CliRunner().invoke(main, ["extract", toml, "--out", out, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert_same_store(out, reference)


def test_a_shard_whose_worker_keeps_dying_is_tried_attempts_times_then_named(tmp_path, zoo_env):
    """A worker that dies on every try of a shard (killed, as the kernel's out-of-memory killer does) ends, after dask's
    own retries, in its KilledWorker, which is not kdcache's and may be the machine's: the shard is submitted again, up
    to ``ATTEMPTS`` tries, and then the job stops with one line naming the shard, the last error and the likely cause."""
    import dask

    from kdcache.distributed import ATTEMPTS

    builds = tmp_path / "builds.log"
    zoo_env(N=16, BUILDS=builds)  # one shard: one task, its tries one after another
    toml = write_toml(tmp_path / "p.toml", f'teacher.factory="{FIXTURES / "driver_only.py"}:killed_in_the_workers"', "targets.layers=[]")
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # dask gives up at the first death: a try is one
        result = CliRunner().invoke(main, ["extract", str(toml), "--out", str(tmp_path / "s.zarr"), "--workers", "1"])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: shard 0 failed {ATTEMPTS} times; last error: KilledWorker: ") and result.stderr.endswith(
        "(a worker that keeps dying is often out of memory: lower extract.batch_size); fix its cause, then run the same "
        "command again to resume the missing shards\n") and result.stderr.count("\n") == 1, result.stderr
    assert len(builds.read_text().splitlines()) == ATTEMPTS


def test_a_worker_with_several_threads_writes_the_single_process_store(tmp_path):
    """``dask worker`` starts one thread per core unless told ``--nthreads 1``: its tasks ran shards at once on the one
    teacher the worker keeps, whose forward hooks then saw every thread's batches ("layer 'conv' ran more than once in
    one forward pass", or another shard's rows kept as this one's), and whose factories seeded the one global RNG at once
    ("different teacher weights ... seed the initialisation"). A worker now runs one shard at a time."""
    from distributed import Client, LocalCluster

    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    single = str(tmp_path / "single.zarr")
    kdcache.extract(kdcache.load_pipeline(toml), single)
    out = str(tmp_path / "threads.zarr")
    with LocalCluster(n_workers=1, threads_per_worker=4, processes=True, dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster):
        info = extract_distributed(kdcache.load_pipeline(toml), out, scheduler=cluster.scheduler_address)
    assert info["complete"]
    assert_same_store(out, single)


def test_a_worker_that_cannot_build_the_teacher_is_named(scheduler, tmp_path):
    """The driver built the teacher; a worker whose machine lacks its checkpoint (or a package it imports) failed with the
    driver's own words for it, and its user, running the factory on the driver, found nothing wrong there. The one line
    now names the worker and its host."""
    toml = write_toml(tmp_path / "p.toml", f'teacher.factory="{FIXTURES / "driver_only.py"}:teacher"')
    result = CliRunner().invoke(main, ["extract", str(toml), "--out", str(tmp_path / "s.zarr"), "--scheduler", scheduler])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("Error: dask worker ") and f" on {socket.gethostname()}): " in lines[0], lines[0]
    assert "no such file: checkpoints/teacher.pt" in lines[0], lines[0]


def test_a_package_a_workers_machine_lacks_is_named_with_the_worker_in_process_too(tmp_path):
    """kdcache's error for an optional package that is not installed (a MissingDependencyError, an ImportError: its
    str() is its ``msg``, not its ``args``) raised as a worker builds the teacher names the worker and its host, on a
    cluster of this process's own too (``inproc://``, no comm to cross: dask pickles a task's exception all the same,
    and an ImportError comes out of the pickle with the ``args`` the worker gave it as its ``msg``)."""
    from distributed import Client, LocalCluster

    from kdcache.errors import MissingDependencyError

    pipeline = kdcache.load_pipeline(write_toml(tmp_path / "p.toml", f'teacher.factory="{FIXTURES / "driver_only.py"}:needs_a_package_the_workers_lack"'))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster):
        assert cluster.scheduler_address.startswith("inproc://")
        with pytest.raises(MissingDependencyError) as e:
            extract_distributed(pipeline, str(tmp_path / "s.zarr"), scheduler=cluster.scheduler_address)
    assert str(e.value).startswith("dask worker 0 (pid ") and f" on {socket.gethostname()}): the teacher needs the Python package " \
        "'kdcache_test_absent_package', which is not installed; pip install 'kdcache[absent]'" in str(e.value), str(e.value)


def test_a_local_cluster_started_from_another_thread_than_the_main_one(toml, single, tmp_path):
    """``extract_distributed`` called in a thread (a workflow runner's task, a web service's handler): the workers are
    started without SIGINT ignored around them (``signal.signal`` works in the main thread alone, where Ctrl-C lands),
    and the store is the one a single process writes."""
    out, result = str(tmp_path / "s.zarr"), {}

    def job() -> None:
        try:
            result["info"] = extract_distributed(kdcache.load_pipeline(toml), out, workers=1)
        except BaseException as e:  # noqa: BLE001 - said by the assertion below
            result["error"] = e

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(timeout=240)
    assert not thread.is_alive() and "error" not in result, result
    assert result["info"]["complete"] and result["info"]["shards_written"] == 4
    assert_same_store(out, single)


def test_a_complete_store_extracted_again_with_workers_says_so_and_starts_no_cluster(toml, single, tmp_path, monkeypatch):
    """``extract --workers`` of a store that is complete already has no shard to hand out: it says so, as one process
    does, leaves the store as it was, and starts no cluster (a LocalCluster refused here)."""
    import distributed

    out = tmp_path / "s.zarr"
    shutil.copytree(single, out)
    before = open_store(out).manifest

    def refused(*args, **kwargs):
        raise AssertionError("a LocalCluster was started for a complete store")

    monkeypatch.setattr(distributed, "LocalCluster", refused)
    result = CliRunner().invoke(main, ["extract", toml, "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"{out} is already complete (50 samples); nothing to do (--overwrite to redo it)\n"), result.stderr
    assert open_store(out).manifest == before


def test_an_inf_a_workers_teacher_does_not_give_again_reaches_the_driver_as_its_own_error(scheduler, tmp_path):
    """A worker's stored inf that a second run of the batch does not explain (a teacher that does not run the same twice)
    stays the error naming both causes; it crosses to the driver pickled as it was made (a TargetError of its own
    arguments), and is told in one line."""
    toml = write_toml(tmp_path / "p.toml", "teacher.factory='extract_zoo.py:inf_once'", "targets.layers=[]", "targets.dtype='float16'")
    result = CliRunner().invoke(main, ["extract", str(toml), "--out", str(tmp_path / "s.zarr"), "--scheduler", scheduler])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "target 'logits' (rows 16..23) holds inf once stored as float16: the teacher produced inf, or finite values beyond the " \
           "float16 range (±65504); check the model and its inputs, or set targets.dtype = \"float32\"" in lines[0], lines[0]


def test_a_worker_whose_device_is_too_small_for_the_teacher_stops_the_job_at_once(tmp_path, zoo_env):
    """A teacher that does not fit a worker's GPU at all (its move to the device runs out of memory) was retried as a
    transient error: the shard was built and failed 3 times before the job stopped with the same line. It fails the same
    way on every try: the job stops at the first (a batch out of device memory is still retried)."""
    builds = tmp_path / "builds.log"
    zoo_env(N=16, BUILDS=builds)  # one shard: one task, its tries one after another
    toml = write_toml(tmp_path / "p.toml", f'teacher.factory="{FIXTURES / "driver_only.py"}:too_large_for_the_workers"', "targets.layers=[]")
    result = CliRunner().invoke(main, ["extract", str(toml), "--out", str(tmp_path / "s.zarr"), "--workers", "1"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: dask worker ") and "does not fit in the memory of cpu" in lines[0], lines
    assert len(builds.read_text().splitlines()) == 1


@pytest.mark.parametrize("how", ["dask", "torchrun"])
def test_a_process_with_another_teacher_writes_nothing(toml, tmp_path, zoo_env, how):
    """A teacher factory that gives each process other weights (here: seeded by the pid) would fill the store
    with several teachers' targets under the one the manifest names: each worker or rank compares its
    teacher with the store's before it writes, and the job stops with one line."""
    zoo_env(SEED="pid")
    out = tmp_path / "mixed.zarr"
    if how == "dask":
        result = CliRunner().invoke(main, ["extract", toml, "--out", str(out), "--workers", "2"])
        code, stderr = result.exit_code, result.stderr
        who = "dask worker"
    else:
        r = _torchrun("extract", toml, "--out", str(out), cwd=tmp_path)
        code, stderr = r.returncode, r.stderr
        who = "rank 1"
    assert code != 0, stderr
    assert f"{who}" in stderr and "its teacher and dataset give different teacher weights (teacher.weights_sha256: store has" in stderr, stderr[-3000:]
    assert "seed the initialisation" in stderr
    assert int(open_store(str(out)).done().sum()) == 0  # the driver's / rank 0's store, created, with no shard of another teacher


def test_a_local_cluster_leaves_dasks_default_port_to_others(toml, tmp_path):
    """Another dask cluster on the machine holds port 8787 (dask's default for the scheduler's HTTP server): a
    --workers extract says nothing about it (dask warned "Port 8787 is already in use" on stderr) and writes its store."""
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        held.bind(("", 8787))
        held.listen()
    except OSError:  # in use already: by another cluster, as the test wants
        pass
    try:
        proc = subprocess.run([sys.executable, "-m", "kdcache.cli", "extract", str(toml), "--out", str(tmp_path / "s.zarr"), "--workers", "2",
                               "--no-progress"], capture_output=True, text=True, timeout=180,
                              env={k: v for k, v in os.environ.items() if not k.startswith("ZOO_")} | {"OMP_NUM_THREADS": "1"})
    finally:
        held.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8787" not in proc.stderr and "already in use" not in proc.stderr, proc.stderr[-3000:]
    assert open_store(tmp_path / "s.zarr").complete


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_a_local_cluster_with_one_line(tmp_path, sig):
    """Ctrl-C reaches the terminal's whole process group: the dask workers ignore it (the driver starts them with
    SIGINT ignored), the driver says its one line and exits 130, and the store resumes. A scheduler's SIGTERM to the
    job's processes stops it the same way, exit 143. The last shard's first item is held until the job has ended: a
    loaded box may finish the job (50 shards, 4 s) between the test seeing 2 done and its signal."""
    from reference import signal_and_wait

    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    out, hold = tmp_path / "s.zarr", tmp_path / "hold"
    hold.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")} | {"ZOO_N": "400", "ZOO_SLEEP": "0.02", "OMP_NUM_THREADS": "1",
                                                                               "ZOO_HOLD": str(hold), "ZOO_HOLD_AT": "392"}
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "extract", str(toml), "--out", str(out), "--workers", "2", "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while shards_done(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        stderr = signal_and_wait(proc, sig, group=True)
    finally:
        hold.unlink()
    assert proc.returncode == 128 + sig, stderr[-3000:]
    said = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    kept = f"the {shards_done(out)} shards done so far are kept"
    assert stderr.strip().splitlines() == [f"Error: {said}; {kept}: run the same command again to resume"]
    result = CliRunner().invoke(main, ["extract", str(toml), "--out", str(out)], env={"ZOO_N": "400", "ZOO_SLEEP": "0"})
    assert result.exit_code == 0, result.output


def test_ctrl_c_while_waiting_for_a_schedulers_handshake_stops_at_once(tmp_path):
    """Ctrl-C while ``--scheduler``'s address has accepted the connection and says nothing: the command stops with its
    one line at once. It waited for the handshake's thread, twice dask's connect timeout (2 x 30 s here)."""
    from reference import signal_and_wait

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "extract", str(FIXTURES / "tiny.toml"), "--out", str(tmp_path / "s.zarr"),
                                 "--scheduler", f"tcp://127.0.0.1:{server.getsockname()[1]}"],
                                env=os.environ | {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "30s"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            held, _ = server.accept()  # the command waits for the handshake now
        except BaseException:
            proc.kill()
            raise
        with held:
            time.sleep(0.2)
            started = time.monotonic()
            stderr = signal_and_wait(proc, signal.SIGINT, timeout=40)
            took = time.monotonic() - started
    # at once: well within the 60 s of the wait it cut short (5 s, the bound before, is tight for a loaded box's exit)
    assert proc.returncode == 130 and took < 20, (proc.returncode, f"{took:.1f} s", stderr[-3000:])
    assert stderr.strip().splitlines() == ["Error: interrupted; no shard was written: run the same command again"]
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.timeout(600)  # a cluster's start and a worker's restart (torch imported again) on a loaded box
def test_a_local_clusters_logging_stays_silent_while_it_closes_and_in_a_restarted_worker():
    """What made the SIGTERM case above print dask's "Batched Comm Closed" and a traceback above its one line (seen in
    CI): dask's silence_logs quiets only a handler, for as long as each scheduler and worker lives, and puts it back as
    it closes, before its connections are done. The "distributed" logger itself is held at CRITICAL instead: in the
    driver until the cluster is closed (then as it was), and in every worker process, one its nanny restarts too."""
    import logging
    from types import SimpleNamespace

    from kdcache.distributed import _local_cluster

    def level() -> int:
        return logging.getLogger("distributed.batched").getEffectiveLevel()

    def killed_state(pid: int) -> str:  # why no restart came, should none come: the worker not ended, or its nanny not running
        try:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
            process = f"pid {pid} still there: {status.get('State')}, SigIgn {status.get('SigIgn')}, SigBlk {status.get('SigBlk')}"
        except FileNotFoundError:
            process = f"pid {pid} gone"
        nannies = {name: str(w.status) for name, w in client.cluster.workers.items()}
        return f"{process}; nannies {nannies}; the scheduler's workers {sorted(client.scheduler_info()['workers'])}"

    before = logging.getLogger("distributed").level
    with _local_cluster(SimpleNamespace(extract=SimpleNamespace(device="cpu")), 2) as client:
        assert level() == logging.CRITICAL
        first = client.run(os.getpid)
        killed = next(iter(first.values()))
        os.kill(killed, signal.SIGTERM)  # as a scheduler's SIGTERM to the job does: the nanny restarts it
        deadline = time.monotonic() + 240  # 2-4 s here; a restart imports torch again (120 s once ran out, cause not known)
        while len(now := client.run(os.getpid, on_error="ignore")) < 2 or set(now.values()) <= set(first.values()):
            assert time.monotonic() < deadline, f"the nanny did not restart the worker within 240 s: {killed_state(killed)}"
            time.sleep(0.2)
        assert set(client.run(level).values()) == {logging.CRITICAL}
    assert logging.getLogger("distributed").level == before


def _torchrun(*args: str, nproc: int = 2, cwd: Path, env: dict[str, str] | None = None, script: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun … kdcache ARGS`` (``script``: that script instead, as tests/fixtures/faults.py)."""
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(nproc), "--standalone", *(["-m", "kdcache.cli"] if script is None else [str(script)]), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240,  # 120 s: too short for a loaded box
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _in_a_joined_group(tmp_path: Path, argv: list[str]) -> None:
    """torchrun (2 ranks) of a script that joins its process group itself, runs kdcache's command ``argv`` in it, then a
    collective of its own: every rank must end it, still joined."""
    script = tmp_path / "joined.py"
    script.write_text(
        "import torch.distributed as dist\nfrom kdcache.cli import main\n\n"
        "dist.init_process_group('gloo')\n"
        f"main({argv!r}, standalone_mode=False)\n"
        "dist.barrier()\n"
        "print(f'rank {dist.get_rank()} still joined: {dist.is_initialized()}', flush=True)\n"
        "dist.destroy_process_group()\n")
    r = _torchrun(cwd=tmp_path, script=script)
    assert r.returncode == 0 and "rank 0 still joined: True" in r.stdout and "rank 1 still joined: True" in r.stdout, (r.stdout, r.stderr[-3000:])


def test_torchrun_extract_inside_a_process_group_the_script_joined_leaves_it_joined(toml, single, tmp_path):
    """A torchrun script that joined its process group itself runs kdcache's extract command: the extract runs in that
    group (it does not join another, which torch refuses: the default group made twice) and leaves it joined for the
    script's own collectives after it."""
    _in_a_joined_group(tmp_path, ["extract", str(toml), "--out", str(tmp_path / "s.zarr"), "--no-progress"])
    assert_same_store(str(tmp_path / "s.zarr"), single)


def test_torchrun_train_inside_a_process_group_the_script_joined_equals_one_process(tiny_store, tmp_path):
    """A torchrun script that joined its process group itself runs kdcache's train command: the ranks train in that
    group (their collectives in it: kdcache made none of its own) the student one process trains with as many streams."""
    from conftest import TINY_TOML

    toml = tmp_path / "tiny.toml"  # tiny.toml with absolute factory paths
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    one = CliRunner().invoke(main, ["train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "one"), "--set", "train.streams=2"])
    assert one.exit_code == 0, one.output
    _in_a_joined_group(tmp_path, ["train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "ddp")])
    a, b = torch.load(tmp_path / "one" / "student.pt"), torch.load(tmp_path / "ddp" / "student.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_torchrun_refuses_an_overwrite_of_a_folder_holding_other_files_before_any_rank_builds_its_teacher(toml, single, tmp_path, zoo_env):
    """Rank 0 refused the --overwrite of a store folder holding other files only once every rank had built its teacher;
    it is refused first (no rank's build leaves hold.waiting), and the other rank stops with rank 0's line, not waiting."""
    out = tmp_path / "s.zarr"
    shutil.copytree(single, out)
    (out / "NOTES.md").write_text("keep me")
    r = _torchrun("extract", toml, "--out", str(out), "--overwrite", cwd=tmp_path, env={"ZOO_BUILD_HOLD": str(tmp_path / "hold")})
    ours = [line for line in r.stderr.splitlines() if line.startswith("Error: ") and "stopped by SIGTERM" not in line]
    assert r.returncode != 0 and ours and all("holds 1 entry besides its store" in line for line in ours), r.stderr[-3000:]
    assert not (tmp_path / "hold.waiting").exists() and (out / "NOTES.md").exists()


def test_torchrun_of_a_complete_store_on_a_read_only_mount_says_it_is_complete(toml, single, tmp_path, zoo_env):
    """A complete store on a read-only mount, extracted again under torchrun: rank 0 was refused for its writer lock
    ("cannot lock … Read-only file system") where one process (and --workers) says the store is complete, nothing being
    left to write. Every rank ends at once, rank 0 saying so; an --overwrite is still refused for the lock."""
    with mount_to_make_read_only(tmp_path / "ro") as make_read_only:
        out = tmp_path / "ro" / "s.zarr"
        shutil.copytree(single, out)
        make_read_only()
        r = _torchrun("extract", toml, "--out", str(out), cwd=tmp_path)
        assert r.returncode == 0 and r.stderr.startswith(f"{out} is already complete (50 samples); nothing to do\n"), r.stderr[-3000:]
        r = _torchrun("extract", toml, "--out", str(out), "--overwrite", cwd=tmp_path)
        ours = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
        assert r.returncode != 0 and ours and all(line.startswith(f"Error: cannot lock {str(out)!r} for writing") for line in ours), r.stderr[-3000:]


@pytest.mark.parametrize("where", ["refuse_replacing", "create_or_resume"])
def test_a_bug_in_rank_0s_store_set_up_stops_every_rank_with_its_line(toml, tmp_path, where):
    """Another exception than kdcache's (a bug, an OSError) on rank 0 while it looks at or creates the store: the other
    ranks said only that another rank had ended (gloo's lost connection), not why; each says rank 0's line, at once."""
    script, raised = tmp_path / "bug.py", tmp_path / "raised"
    script.write_text(
        "import atexit, os, sys, time\nimport kdcache.store as layout\nfrom kdcache.cli import main\n\n"
        "if os.environ['RANK'] == '0':\n"
        f"    def broken(*args, **kwargs):\n        open({str(raised)!r}, 'w').write(str(time.monotonic()))\n        raise ValueError('a bug')\n\n"
        f"    layout.{where} = broken\n"
        "    atexit.register(time.sleep, 3)  # rank 0 ends slowly: torchrun stops the others only then, once they have said it\n"
        "sys.exit(main())\n")
    r = _torchrun("extract", toml, "--out", str(tmp_path / "s.zarr"), cwd=tmp_path, script=script)
    ended = time.monotonic()  # the whole run took 62 s on a loaded box, most of it the ranks' start: timed from the bug on
    ours = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert r.returncode != 0 and ours == ["Error: rank 0 failed: ValueError: a bug (rank 0 prints its traceback)"], r.stderr[-3000:]
    assert "[rank0]: ValueError: a bug" in r.stderr and ended - float(raised.read_text()) < 60


def test_torchrun_store_equals_single_process_and_resumes_others(toml, single, tmp_path, zoo_env):
    fresh = str(tmp_path / "torchrun.zarr")
    r = _torchrun("extract", toml, "--out", fresh, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("progress") == 1  # only rank 0 reports
    assert_same_store(fresh, single)

    with writer_lock(fresh):  # another job writing it: rank 0 is refused, and every rank stops (none waits)
        r = _torchrun("extract", toml, "--out", fresh, "--overwrite", cwd=tmp_path)
    assert r.returncode != 0 and f"is being written by kdcache pid {os.getpid()} on " in r.stderr, r.stderr[-3000:]
    ours = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    # one line per rank that got to say it (torchrun stops the others once one has failed: rank 0, SIGTERMed before it got
    # to its own refusal, says so, and that the store is unchanged), no kdcache frame (torchrun adds its own summary)
    stopped = "Error: stopped by SIGTERM; the store there is unchanged (--overwrite had not replaced it yet): run the same command again to start afresh"
    refusals = {line for line in ours if line != stopped}
    package = str(Path(kdcache.__file__).parent)
    assert 1 <= len(ours) <= 2 and len(refusals) == 1 and package not in r.stderr, r.stderr[-3000:]
    assert_same_store(fresh, single)

    partial = str(tmp_path / "partial.zarr")  # a partial single-process store, finished by 2 ranks
    zoo_env(FAIL_AT=20)
    with pytest.raises(RuntimeError, match="simulated crash"):
        kdcache.extract(kdcache.load_pipeline(toml), partial)
    zoo_env(FAIL_AT=None)
    r = _torchrun("extract", toml, "--out", partial, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count(f"resumed {partial}: 1 of 4 shards was already done; this run wrote the others") == 1, r.stderr[-3000:]  # rank 0's
    assert_same_store(partial, single)


def test_a_store_of_kdcache_0_1_6_is_resumed_by_dask_workers_and_torchrun_ranks_by_its_own_fingerprints(scheduler, tmp_path):
    """Every worker and rank builds its own manifest and compares it with the store's before it writes: it must
    fingerprint the probe items, and then its rows, by the store's algorithm ("blake2b-64", kdcache <= 0.1.6's), as
    the driver and rank 0 resume it. Otherwise each would call the store another dataset's, or write rows that
    training reads as changed inputs."""
    import zarr

    from kdcache import data

    old = FIXTURES / "stores" / "spans-0.1.6.zarr"  # its manifest names the factories relative to the pipeline file
    for name in ("numbered.py", "tiny.py"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    toml = tmp_path / "spans.toml"
    toml.write_text('[teacher]\nfactory = "numbered.py:span_teacher"\n[data]\nfactory = "numbered.py:spans"\nsplit = "train"\n'
                    '[targets]\nlogits = true\ndtype = "float32"\n[extract]\nbatch_size = 4\ndevice = "cpu"\nrows_per_shard = 8\n')
    for how in ("dask", "torchrun"):
        out = tmp_path / f"{how}.zarr"
        shutil.copytree(old, out)
        zarr.open_array(out / "progress" / "done", mode="r+")[1:] = False  # shards 1 and 2 to write again
        if how == "dask":
            result = CliRunner().invoke(main, ["extract", str(toml), "--out", str(out), "--scheduler", scheduler])
            assert result.exit_code == 0, result.output
        else:
            r = _torchrun("extract", str(toml), "--out", str(out), cwd=tmp_path)
            assert r.returncode == 0, r.stderr[-3000:]
        resumed, original = open_store(out), open_store(old)
        assert resumed.complete and resumed.manifest["fingerprint"]["algorithm"] == data.V1, how
        for path in original.paths():
            assert resumed.read(path, 0, 20).tobytes() == original.read(path, 0, 20).tobytes(), (how, path)


STREAMING = ("train.memory_budget_mb=0.0001", "train.shuffle_buffer_shards=1")
# features only: the student's classifier (and its unused module 'spare') get no gradient, which stops DDP's reducer; its
# spare is float64 (one flat all-reduce of every gradient promoted them all to float64: a traceback at the first step)
UNUSED = ("train.loss.kl=0", "train.loss.ce=0", "student.factory='bad_input.py:with_float64_spare'")


def test_train_streams_other_than_1_or_the_ranks_is_refused_under_torchrun_before_joining(tiny_store, tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE 2) train.streams is 1 or the number of ranks: 3 streams of 2 ranks cannot share out one
    plan; refused in one line saying which, before the rank joins a process group (which waits for the others)."""
    import torch.distributed as dist

    from conftest import TINY_TOML

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match=re.escape("train.streams = 3; use 1 (or the number of ranks, 2, under torchrun)")):
        kdcache.train(kdcache.load_pipeline(TINY_TOML, ["train.streams=3"]), tiny_store, tmp_path / "run")
    assert not dist.is_initialized()


def _listening(port: int) -> bool:
    """Whether a socket listens on ``port`` of this machine (/proc/net/tcp*: state 0A), found without connecting to it."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":
                    return True
    return False


@pytest.mark.parametrize("command", ["train", "extract"])
def test_sigterm_ends_rank_0_at_once_while_it_waits_for_the_other_ranks_to_join(tiny_store, tmp_path, command):
    """Rank 0 of 2 (torchrun's variables, set here) whose rank 1 never comes waits in torch's init_process_group for up to
    12 hours (distributed.TIMEOUT); kdcache's SIGTERM handler, Python's, runs only once that C call returns, so SIGTERM
    (a scheduler's time limit) was ignored for as long. Nothing is written before the ranks have joined: it ends at once,
    exit 143, in one line."""
    from conftest import TINY_TOML

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    with socket.socket() as s:  # a port let go for rank 0's store to listen on (free_port's stays bound)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / ("run" if command == "train" else "s.zarr")
    argv = ["--cache", tiny_store] if command == "train" else []
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", command, str(toml), *argv, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # its start: imports on a loaded box
        while not _listening(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _listening(port), proc.communicate(timeout=5) if proc.poll() is not None else "rank 0 never listened"
        time.sleep(0.5)  # inside the wait
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143 and stderr.splitlines() == [
        f"Error: stopped by SIGTERM while waiting for the other ranks to join (WORLD_SIZE=2, MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}); "
        "nothing was written: run the same command again"], stderr[-3000:]
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "extract"])
def test_a_rank_that_fails_before_joining_stops_the_ranks_of_another_machines_torchrun(toml, tmp_path, request, command):
    """Two torchrun launchers on loopback as two machines (--nnodes 2, one rank each): machine 1 lacks the pipeline file,
    so its rank stops before it joins the process group. Its torchrun ends; machine 0's never saw it, and rank 0 waited
    in init_process_group for 12 hours (distributed.TIMEOUT). Now it stops within moments of rank 1, naming it and its line."""
    toml, tiny_store, port = _two_machines(command, toml, tmp_path, request)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for node, pipeline in ((0, str(toml)), (1, str(tmp_path / "machine-1" / "p.toml"))):  # machine 1's disk has no such file
        out = tmp_path / f"out-{node}"
        argv = ["train", pipeline, "--cache", tiny_store, "--out", str(out)] if command == "train" else ["extract", pipeline, "--out", str(out)]
        procs.append(subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                       "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "kdcache.cli", *argv],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        said = [""] * 2
        _, said[1] = procs[1].communicate(timeout=240)  # its start: imports on a loaded box
        _, said[0] = procs[0].communicate(timeout=60)  # rank 0 stops at once, or as it comes to join: seconds
    finally:
        _end_launchers(procs)
    line = f"pipeline file {str(tmp_path / 'machine-1' / 'p.toml')!r} does not exist; pass the path of a .toml file"
    assert procs[1].returncode == 1 and f"Error: {line}" in said[1].splitlines(), said[1][-3000:]
    assert procs[0].returncode == 1 and f"Error: rank 1 (on {socket.gethostname()}) stopped before joining the other ranks: {line}" in \
        said[0].splitlines(), said[0][-3000:]
    assert "SIGTERM" not in said[0] and not (tmp_path / "out-0").exists()


@pytest.mark.parametrize("command", ["train", "extract"])
def test_a_rank_that_comes_to_join_after_the_first_machines_torchrun_ended_says_so_in_one_line(toml, tmp_path, request, command):
    """Two torchrun launchers on loopback as two machines (--nnodes 2, one rank each): machine 0 lacks the pipeline file,
    so its rank fails before joining and its torchrun ends, taking its store (MASTER_ADDR:MASTER_PORT) with it, while
    machine 1's rank is still starting. That rank then came to join: torch's init_process_group tried to reach the store
    for 12 hours (distributed.TIMEOUT), silent after c10d's retries, C++ frames and all, on stderr. Now it says it cannot
    join there in one line, exit 1, within AGENT_STORE_S (10 s)."""
    toml, tiny_store, port = _two_machines(command, toml, tmp_path, request)
    go, script = tmp_path / "go", tmp_path / "late.py"  # machine 1's rank, still starting (a slow read) until the test says go
    script.write_text("import os, sys, time\nfrom kdcache.cli import main\n\n"
                      f"deadline = time.monotonic() + 300\nwhile not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
                      "    time.sleep(0.1)\nsys.exit(main())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for node, pipeline in ((0, str(tmp_path / "machine-0" / "p.toml")), (1, str(toml))):  # machine 0's disk has no such file
        out = tmp_path / f"out-{node}"
        argv = ["train", pipeline, "--cache", tiny_store, "--out", str(out)] if command == "train" else ["extract", pipeline, "--out", str(out)]
        procs.append(subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                       "--master-addr", "127.0.0.1", "--master-port", str(port),
                                       *(["-m", "kdcache.cli"] if node == 0 else [str(script)]), *argv],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        said = [""] * 2
        _, said[0] = procs[0].communicate(timeout=240)  # its start: imports on a loaded box
        go.touch()
        started = time.monotonic()
        try:
            _, said[1] = procs[1].communicate(timeout=120)  # 10 s for the store, then the rank's end
        except subprocess.TimeoutExpired:
            pytest.fail("machine 1's rank still waits to join, 120 s after machine 0's torchrun ended")
        took = time.monotonic() - started
    finally:
        _end_launchers(procs)
    assert procs[0].returncode == 1 and "does not exist; pass the path of a .toml file" in said[0], said[0][-3000:]
    ours = [line for line in said[1].splitlines() if line.startswith("Error: ")]
    assert procs[1].returncode == 1 and ours == [
        f"Error: rank 1 (on {socket.gethostname()}) could not join the other ranks at MASTER_ADDR:MASTER_PORT 127.0.0.1:{port} "
        "(no answer within 10 s: [Errno 111] Connection refused): torchrun's store there, which the first machine's torchrun "
        "serves, has gone (it ends once a rank of its own fails: its output names that rank and its error) or is not reachable "
        "from this machine; fix that, then run the same command again on every machine (nothing was written)"], said[1][-3000:]
    # no frame of kdcache's, and none of c10d's retries (torchrun's own summary of its failed rank follows)
    assert str(Path(kdcache.__file__).parent) not in said[1] and "[c10d]" not in said[1] and took < 100, said[1][-3000:]
    assert not (tmp_path / "out-1").exists()


def _children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (torchrun's ranks: each in a session of its own), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


def _connections_to(port: int, parent: int) -> int:
    """The connections to ``port`` on loopback that the processes whose parent is ``parent`` hold open (established), found
    from /proc: their sockets' inodes in /proc/PID/fd, those connections' in /proc/net/tcp*."""
    inodes = set()
    for pid in _children(parent):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if (link := os.readlink(fd)).startswith("socket:["):
                        inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                n += int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] in inodes
    return n


def test_a_rank_whose_first_machines_torchrun_ends_while_it_joins_says_so_in_one_line(toml, tmp_path):
    """Two torchrun launchers on loopback as two machines: machine 1's rank is inside torch's init_process_group, waiting
    for machine 0's rank (still starting), when machine 0 goes (its torchrun and rank killed), taking torchrun's store with
    it. torch's DistNetworkError ("Failed to recv, got 0 bytes") was the rank's traceback; it is one line now, exit 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "never.py"  # machine 0's rank: starting until its machine goes
    script.write_text("import time\nwhile True:\n    time.sleep(1)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        procs.append(subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                       "--master-addr", "127.0.0.1", "--master-port", str(port),
                                       *([str(script)] if node == 0 else ["-m", "kdcache.cli", "extract", str(toml), "--out", str(tmp_path / "out")])],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    try:
        deadline = time.monotonic() + 240  # its start: imports on a loaded box
        while _connections_to(port, procs[1].pid) < 2 and procs[1].poll() is None:  # the look for a failed rank's, and torch's
            assert time.monotonic() < deadline, "machine 1's rank never came to join"
            time.sleep(0.2)
        time.sleep(1.0)  # inside init_process_group's wait for rank 0
        for pid in [*_children(procs[0].pid), procs[0].pid]:  # machine 0 gone at once: its rank, and its torchrun with its store
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        procs[0].communicate(timeout=30)
        try:
            _, said = procs[1].communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("machine 1's rank still waits to join, 60 s after machine 0's torchrun ended")
    finally:
        for proc in procs:  # its rank first: in a session of its own, it outlives a SIGKILL of its torchrun
            for pid in [*_children(proc.pid), proc.pid] if proc.poll() is None else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=30)
    ours = [line for line in said.splitlines() if line.startswith("Error: ")]
    assert procs[1].returncode == 1 and len(ours) == 1 and ours[0].startswith(
        f"Error: rank 1 (on {socket.gethostname()}) could not join the other ranks at MASTER_ADDR:MASTER_PORT 127.0.0.1:{port} (") and \
        ours[0].endswith("): torchrun's store there, which the first machine's torchrun serves, has gone (it ends once a rank of its own "
                         "fails: its output names that rank and its error) or is not reachable from this machine; fix that, then run the "
                         "same command again on every machine (nothing was written)"), said[-3000:]
    assert str(Path(kdcache.__file__).parent) not in said and not (tmp_path / "out").exists(), said[-3000:]


def test_a_second_command_in_one_process_says_its_failure_before_joining_to_the_ranks(tmp_path, monkeypatch):
    """A command that fails before it joins puts its line in torchrun's store, for the ranks waiting for it to join; an
    earlier command in the same process that had joined (an extract, which leaves its group) kept the next one from
    saying it: its ranks on other machines waited for it for 12 hours. torchrun's store here: a real TCPStore on loopback."""
    from torch.distributed import TCPStore

    from kdcache import distributed

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "_BEGUN_JOINING", True)  # as an earlier extract in this process left it
    missing = tmp_path / "p.toml"
    result = CliRunner().invoke(main, ["extract", str(missing), "--out", str(tmp_path / "s.zarr")])
    line = f"pipeline file {str(missing)!r} does not exist; pass the path of a .toml file"
    assert result.exit_code == 1 and f"Error: {line}" in result.output, result.output
    key = "kdcache/failed-before-joining/0"
    assert store.check([key]) and store.get(key).decode() == \
        f"rank 1 (on {socket.gethostname()}) stopped before joining the other ranks: {line}"


def test_the_handlers_are_given_back_once_the_rank_has_joined():
    """The handlers ``_ended_at_once_while_joining`` sets while a rank joins, and Python's wakeup fd, are given back after it."""
    from kdcache.distributed import _ended_at_once_while_joining

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with _ended_at_once_while_joining():
            assert signal.getsignal(signal.SIGTERM) is not mine
            signal.set_wakeup_fd(ours := signal.set_wakeup_fd(-1))
            assert ours != -1
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.set_wakeup_fd(-1) == -1
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("extra", [(), STREAMING, UNUSED], ids=["in-memory", "streaming", "parameters-the-loss-leaves-unused"])
def test_torchrun_train_equals_one_process_with_as_many_streams(tiny_store, tmp_path, extra):
    from conftest import TINY_TOML

    toml = tmp_path / "tiny.toml"  # tiny.toml with absolute factory paths; 50 rows: the last step is uneven
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    sets = [x for s in ("train.epochs=2", *extra) for x in ("--set", s.replace("'bad_input.py:", f"'{TINY_TOML.parent}/bad_input.py:"))]
    if extra == STREAMING:  # evaluated against an eval store too: each rank its shards (the others, the eval split's part)
        evaluated = CliRunner().invoke(main, ["extract", str(toml), "--out", str(tmp_path / "test.zarr"), "--set", 'data.split="test"'])
        assert evaluated.exit_code == 0, evaluated.output
        sets += ["--set", f'train.eval_cache="{tmp_path / "test.zarr"}"']
    one = CliRunner().invoke(main, ["train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "one"),
                                    "--set", "train.streams=2", *sets])
    assert one.exit_code == 0, one.output
    r = _torchrun("train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "ddp"), *sets, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("student written") == 1  # rank 0 reports and writes
    a, b = torch.load(tmp_path / "one" / "student.pt"), torch.load(tmp_path / "ddp" / "student.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    heads_a, heads_b = torch.load(tmp_path / "one" / "heads.pt"), torch.load(tmp_path / "ddp" / "heads.pt")
    for k in heads_a:
        torch.testing.assert_close(heads_a[k], heads_b[k], rtol=0, atol=1e-5, msg=k)
    # The logged loss terms are the step's over every rank's rows, as in one process (not rank 0's alone).
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "ddp")]
    assert len(logs[1]) == 2
    for one_epoch, ddp_epoch in zip(*logs):
        losses = [k for k in one_epoch if k.startswith("loss")]
        assert len(losses) >= (2 if extra == UNUSED else 3) and losses == [k for k in ddp_epoch if k.startswith("loss")]
        for k in losses:
            assert ddp_epoch[k] == pytest.approx(one_epoch[k], rel=1e-5, abs=1e-7), k
        # the eval metrics: each rank evaluates its part, the counts summed over the ranks are the whole split's (its time aside)
        evals = [k for k in one_epoch if k.startswith("eval_") and k != "eval_seconds"]
        assert evals == [k for k in ddp_epoch if k.startswith("eval_") and k != "eval_seconds"] and "eval_accuracy" in evals, (one_epoch, ddp_epoch)
        assert "eval_seconds" in one_epoch and "eval_seconds" in ddp_epoch
        assert len(evals) == (3 if extra == STREAMING else 1) and all(ddp_epoch[k] == one_epoch[k] for k in evals), (one_epoch, ddp_epoch)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["step"]
    if extra == ():  # requeued once finished: every rank sees it so and ends, rank 0 says it, nothing is written
        files = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "ddp").iterdir()}
        r = _torchrun("train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "ddp"), *sets, "--auto-resume", cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.count("already finished its run (train.epochs = 2, step ") == 1, r.stdout + r.stderr[-3000:]
        assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "ddp").iterdir()} == files
    if extra == UNUSED:  # what no loss reached is never stepped (AdamW's weight decay included), on every rank alike
        torch.manual_seed(0)  # train.seed: the student every rank started from
        from bad_input import with_float64_spare

        start = with_float64_spare().state_dict()
        assert all(torch.equal(b[k], start[k]) for k in ("fc.weight", "spare.weight")) and not torch.equal(b["conv.weight"], start["conv.weight"])


@pytest.mark.parametrize(("dataset", "student", "module", "inputs"), [
    ("padded_tokens", "token_lm_student", "hidden", "[]"),
    ("typed_tokens", "tokens_only_student", "embed", '["tokens"]'),  # called with its tokens alone, the mask read from the item
], ids=["all-inputs", "student-inputs"])
def test_torchrun_train_with_a_padding_mask_equals_one_process_with_as_many_streams(tmp_path, dataset, student, module, inputs):
    """train.mask: a masked loss is the mean over rows of each row's mean over its valid positions, so two ranks' scaled
    losses average to the joined batch's, the uneven last step's too (50 rows, per-token logits and features of
    extract_zoo.TokenLM), also for a student called with student.inputs. SGD: AdamW would make steps of lr out of the
    rounding of a gradient that is 0 (attention's key bias), which the two ways of summing round differently."""
    toml = write_toml(tmp_path / "lm.toml", 'teacher.factory="extract_zoo.py:token_lm"', f'data.factory="extract_zoo.py:{dataset}"',
                      'targets.layers=["hidden"]', 'targets.dtype="float32"', f'student.factory="{FIXTURES}/extract_zoo.py:{student}"',
                      f'student.inputs={inputs}', 'train={epochs=2, batch_size=8, device="cpu", optimizer="sgd", lr=0.05, mask="attention_mask", '
                      f'loss={{kl=1.0, mse=0.5}}, features={{hidden={{student="{module}", weight=0.1}}}}}}')
    store = str(tmp_path / "lm.zarr")
    extracted = CliRunner().invoke(main, ["extract", str(toml), "--out", store])
    assert extracted.exit_code == 0, extracted.output
    one = CliRunner().invoke(main, ["train", str(toml), "--cache", store, "--out", str(tmp_path / "one"), "--set", "train.streams=2"])
    assert one.exit_code == 0, one.output
    r = _torchrun("train", str(toml), "--cache", store, "--out", str(tmp_path / "ddp"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for file in ("student.pt", "heads.pt"):
        a, b = torch.load(tmp_path / "one" / file), torch.load(tmp_path / "ddp" / file)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "ddp")]
    for one_epoch, ddp_epoch in zip(*logs):
        assert {"loss_kl", "loss_mse", "loss_feat:hidden"} <= set(one_epoch)
        for k in (k for k in one_epoch if k.startswith("loss")):
            assert ddp_epoch[k] == pytest.approx(one_epoch[k], rel=1e-5), k


def test_torchrun_ranks_evaluate_the_student_rank_0_saves(tiny_store, tmp_path):
    """Each rank updates BatchNorm's running statistics from its own rows, and each evaluated its part of the eval split
    with its own: eval_accuracy mixed the ranks' students, none of them the student.pt written (rank 0's). Every rank
    evaluates with rank 0's buffers: the reported accuracy is the saved student's."""
    import tiny
    from conftest import TINY_TOML

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    sets = [x for s in ("train.epochs=1", "train.features={}", f"student.factory='{TINY_TOML.parent}/tiny.py:normed_student'")
            for x in ("--set", s)]
    log = tmp_path / "norm"
    r = _torchrun("train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "ddp"), *sets, cwd=tmp_path,
                  env={"TINY_NORM_LOG": str(log)})
    assert r.returncode == 0, r.stderr[-3000:]
    student = tiny.normed_student()
    student.load_state_dict(torch.load(tmp_path / "ddp" / "student.pt", weights_only=True))
    test = tiny.dataset("test")
    with torch.no_grad():
        accuracy = float((student.eval()(test.x).argmax(-1) == test.y).float().mean())
    (line,) = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert line["eval_accuracy"] == pytest.approx(accuracy)
    saved = student.norm.running_mean.tolist()
    evaluated = [json.loads(Path(f"{log}.{rank}").read_text().splitlines()[-1]) for rank in (0, 1)]  # each rank's last eval batch
    assert evaluated == [pytest.approx(saved), pytest.approx(saved)]


def test_torchrun_ranks_stop_together_at_the_next_checkpoint_when_one_gets_sigterm(tiny_store, tmp_path):
    """Rank 1 alone gets SIGTERM as its step 5 begins. Ranks cannot stop at different steps (the others would wait in
    the next all-reduce), so they agree at the next checkpoint (train.checkpoint_every = 3: step 6, inside epoch 1),
    save it and stop; rank 0 says so in one line. The resumed run reaches the uninterrupted run's weights and losses:
    with dropout too, whose RNG the ranks draw from differently (rank 1 idles in epoch 0's last step, drawing nothing),
    so the checkpoint holds each rank's RNG state."""
    from conftest import FIXTURES, TINY_TOML

    toml = tmp_path / "tiny.toml"  # 50 rows, 2 ranks of batch 8: 4 steps an epoch
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    dropping = f"student.factory='{FIXTURES}/bad_input.py:dropping'"
    sets = [x for s in ("train.epochs=3", "train.checkpoint_every=3", "train.features={}", "train.eval_split=''", dropping) for x in ("--set", s)]
    r = _torchrun("train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "whole"), *sets, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cut = tmp_path / "cut"
    r = _torchrun("train", str(toml), "--cache", tiny_store, "--out", str(cut), *sets, cwd=tmp_path, script=FIXTURES / "faults.py",
                  env={"KDCACHE_FAULT": "term:5", "KDCACHE_FAULT_RANK": "1"})
    assert r.returncode != 0
    line = f"Error: stopped by SIGTERM to another rank in epoch 1 after batch 2 (step 6 of 12); its checkpoint is saved in {str(cut)!r}"
    ours = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]  # rank 0's; torchrun adds its own summary
    assert len(ours) == 1 and ours[0].startswith(line) and str(Path(kdcache.__file__).parent) not in r.stderr, r.stderr[-3000:]
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 2, 6) and not (cut / "student.pt").exists()
    one = CliRunner().invoke(main, ["train", str(toml), "--cache", tiny_store, "--out", str(cut), *sets, "--resume"])  # one process
    assert one.exit_code == 1 and one.output.strip().splitlines()[-1] == (
        "Error: --resume: this run took a batch from each of 2 streams a step, now 1 (one process): its steps would take other "
        "batches than the uninterrupted run's; resume under torchrun with 2 ranks (or in one process with train.streams = 2), or start "
        "afresh with --overwrite"), one.output
    shutil.copytree(cut, tmp_path / "copy")  # as it says: one process of 2 streams resumes it (to its end)
    one = CliRunner().invoke(main, ["train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "copy"), *sets, "--resume",
                                    "--set", "train.streams=2", "--no-progress"])
    assert one.exit_code == 0 and "in epoch 1 after batch 2 (step 6 of 12)" in one.output, one.output
    r = _torchrun("train", str(toml), "--cache", tiny_store, "--out", str(cut), *sets, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / "whole" / "student.pt"), torch.load(cut / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (tmp_path / "whole", cut)]
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_a_rank_that_stops_answering_ends_the_others_in_one_line_when_the_collective_times_out(tiny_store, tmp_path):
    """Rank 1 hangs before its third step (a stalled read, a stopped process, a lost node: it neither ends nor
    answers), so rank 0 waits in that step's all-reduce until train.rank_timeout_s (30 min; here 5 s: every collective
    waited 12 h before). It ended with gloo's RuntimeError traceback ("Timed out waiting 5000ms for recv operation"); now
    one line naming what happened. Rank 1, once it wakes, finds rank 0 gone and says so in its own line. Where one rank
    legitimately works while the others wait (rank 0 saving a checkpoint: here 6 s, at epoch 0's end), they wait
    longer (distributed.TIMEOUT, 12 h), and the run goes on."""
    from conftest import TINY_TOML

    toml = tmp_path / "tiny.toml"  # 50 rows, 2 ranks of batch 8: 4 steps an epoch
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    # kdcache's command, rank 0's first checkpoint slow (6 s: the ranks meet in its gather of their RNG states just before,
    # so the others wait all of it, past 5 s), rank 1 asleep before its seventh step until rank 0's process has ended (it
    # slept a fixed 7 s, most of it after rank 0 had gone; at most 60 s now, so a loaded box cannot wake it early)
    hung, pid = tmp_path / "hung.py", tmp_path / "rank0.pid"
    hung.write_text("import importlib, os, time\n"
                    f"pid = {str(pid)!r}\n"
                    "if os.environ['RANK'] == '0':\n    open(pid, 'w').write(str(os.getpid()))\n"
                    "def gone():  # rank 0's process has ended (a zombie until torchrun reaps it)\n    try:\n        stat = f'/proc/{open(pid).read()}/stat'\n"
                    "    except FileNotFoundError:\n        return False\n    try:\n        return open(stat).read().rsplit(')', 1)[1].split()[0] in 'ZX'\n"
                    "    except (FileNotFoundError, ProcessLookupError):\n        return True\n"
                    "train = importlib.import_module('kdcache.train')\nlosses, steps, save = train.Run.losses, [], train._save_epoch\n"
                    "def slow(self, batch):\n    steps.append(1)\n"
                    "    if os.environ['RANK'] == '1' and len(steps) == 7:\n        end = time.monotonic() + 60\n"
                    "        while not gone() and time.monotonic() < end:\n            time.sleep(0.05)\n    return losses(self, batch)\n"
                    "def slow_save(*args, **kwargs):\n    time.sleep(6)\n    return save(*args, **kwargs)\n"
                    "train.Run.losses, train._save_epoch = slow, slow_save\nfrom kdcache.cli import main\nmain()\n")
    # 5 s, not 2: on a loaded box (load 10 on 2 cores, a process gets a fifth of a core) a rank's own work in a step (a
    # buffer read) may leave the other waiting past 2 s in a step before the hung one, and the run ends in epoch 0
    sets = [x for s in ("train.epochs=2", "train.features={}", "train.eval_split=''", "train.rank_timeout_s=5") for x in ("--set", s)]
    r = _torchrun("train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "out"), *sets, cwd=tmp_path, script=hung)
    assert r.returncode != 0
    ours = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
    assert ours and ours[0] == (
        "Error: rank 0 gave up waiting for the other ranks in a collective (Timed out waiting 5000ms for recv operation to complete): "
        "a rank is hung (a stalled read, a stopped process) or its machine is unreachable; find that one, then rerun (train: with "
        "--resume, from the last checkpoint; a training step waits train.rank_timeout_s for a rank)"), r.stderr[-3000:]
    assert str(Path(kdcache.__file__).parent) not in r.stderr and r.stderr.count("Timed out waiting") == 1, r.stderr[-3000:]  # no frame
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["epoch"] == 1  # epoch 0's slow save waited for


def test_a_one_process_run_resumed_under_torchrun_is_refused(tiny_store, tmp_path):
    """A one-process run stopped inside an epoch, resumed by the same command under torchrun with 2 ranks: each step
    then takes a batch from each rank's stream, and the resumed epoch skipped twice the batches the first run had
    trained (24 of 100 rows never trained, with no word: pipeline.json says train.streams = 1 either way). Refused,
    naming how the run began; the checkpoint is left as it was."""
    from conftest import FIXTURES, TINY_TOML

    toml = tmp_path / "tiny.toml"  # 50 rows in batches of 8: 7 steps an epoch in one process
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    sets = [x for s in ("train.epochs=2", "train.features={}", "train.eval_split=''") for x in ("--set", s)]
    cut = tmp_path / "cut"
    r = subprocess.run([sys.executable, str(FIXTURES / "faults.py"), "train", str(toml), "--cache", tiny_store, "--out", str(cut), *sets],
                       cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "KDCACHE_FAULT": "term:6"})
    assert r.returncode == 143, r.stderr[-3000:]
    before = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert before["epoch"] == 0 and 0 < before["batch"] < 7, (before["epoch"], before["batch"])  # inside epoch 0
    r = _torchrun("train", str(toml), "--cache", tiny_store, "--out", str(cut), *sets, "--resume", cwd=tmp_path)
    ours = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
    assert r.returncode != 0 and ours and set(ours) == {
        "Error: --resume: this run took a batch from each of 1 streams a step, now 2 (2 torchrun ranks): its steps would take other "
        "batches than the uninterrupted run's; resume in one process with train.streams = 1, or start afresh with --overwrite"}, r.stderr[-3000:]
    after = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert after["step"] == before["step"] and not (cut / "student.pt").exists()


def test_ranks_that_see_another_out_than_rank_0_are_refused_in_one_line(tiny_store, tmp_path):
    """--out must be one folder every rank sees (docs/CLUSTER.md). Where rank 1 sees another (its machine's own disk, a
    stale copy: here it is handed another path), each rank decided --auto-resume and read checkpoint.pt for itself: rank 0
    resumed while rank 1 started from step 0, or (--resume) each loaded another checkpoint, and they trained on, with
    different weights and optimizer states, until their steps no longer matched (then hung in a collective). Now the
    ranks compare what they see once they have joined, and all stop before anything is written, naming the rank, the
    paths and what each sees; --overwrite too, and a --resume whose rank 1 finds a checkpoint.pt it cannot read."""
    from conftest import TINY_TOML

    toml = tmp_path / "tiny.toml"  # 50 rows, 2 streams of batch 8: 4 steps an epoch
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    sets = [x for s in ("train.features={}", "train.eval_split=''", "train.streams=2") for x in ("--set", s)]
    run, copy, elsewhere = tmp_path / "run", tmp_path / "copy", tmp_path / "elsewhere"
    for epochs, more in ((1, []), (2, ["--resume"])):  # one process of 2 streams, as 2 ranks: a copy is left one epoch behind
        one = CliRunner().invoke(main, ["train", str(toml), "--cache", tiny_store, "--out", str(run), *sets, "--epochs", str(epochs), *more])
        assert one.exit_code == 0, one.output
        if epochs == 1:
            shutil.copytree(run, copy)
    elsewhere.mkdir()
    unreadable = tmp_path / "unreadable"  # a checkpoint.pt rank 1 cannot read (an empty file: a copy cut short)
    unreadable.mkdir()
    (unreadable / "checkpoint.pt").write_bytes(b"")
    script = tmp_path / "rank1.py"  # rank 1 is handed another --out
    script.write_text("import os, sys\nif os.environ['RANK'] == '1':\n    sys.argv[sys.argv.index('--out') + 1] = os.environ['RANK1_OUT']\n"
                      "from kdcache.cli import main\nmain()\n")
    before = (run / "checkpoint.pt").read_bytes()
    host = socket.gethostname()
    for flag, theirs, sees in (("--auto-resume", elsewhere, "no checkpoint.pt"), ("--resume", copy, "checkpoint.pt saved after epoch 0 (step 4)"),
                               ("--overwrite", elsewhere, "no checkpoint.pt"),
                               ("--resume", unreadable, "a checkpoint.pt it cannot read (EOFError: empty or truncated)")):
        r = _torchrun("train", str(toml), "--cache", tiny_store, "--out", str(run), *sets, "--epochs", "3", flag, cwd=tmp_path,
                      script=script, env={"RANK1_OUT": str(theirs)})
        ours = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
        mine = "checkpoint.pt saved after epoch 1 (step 8)" if flag != "--overwrite" else "checkpoint.pt"
        line = (f"Error: rank 1 (on {host}) sees another --out than rank 0 (on {host}): {sees} in {str(run)!r}, where rank 0 sees {mine}; "
                "every rank must see the same --out, a folder on a filesystem they share (docs/CLUSTER.md): fix that, then rerun (nothing was changed)")
        assert r.returncode != 0 and line in ours and len(ours) == 2, (flag, r.stderr[-3000:])  # each rank's (rank 1's names its path)
        assert str(Path(kdcache.__file__).parent) not in r.stderr, r.stderr[-3000:]
        assert (run / "checkpoint.pt").read_bytes() == before and not list(elsewhere.iterdir()), flag


def _rank1_given(tmp_path: Path) -> tuple[Path, list[str]]:
    """tiny.toml (absolute factory paths; 50 rows, 2 ranks of batch 8) and its arguments for one epoch, and a script that runs
    kdcache's command with rank 1 handed more arguments (``RANK1_ARGS``, JSON) or another --cache (``RANK1_CACHE``)."""
    from conftest import TINY_TOML

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:'))
    script = tmp_path / "rank1.py"
    script.write_text("import json, os, sys\nif os.environ['RANK'] == '1':\n    sys.argv += json.loads(os.environ.get('RANK1_ARGS', '[]'))\n"
                      "    if os.environ.get('RANK1_CACHE'):\n        sys.argv[sys.argv.index('--cache') + 1] = os.environ['RANK1_CACHE']\n"
                      "from kdcache.cli import main\nmain()\n")
    sets = [x for s in ("train.epochs=1", "train.features={}", "train.eval_split=''") for x in ("--set", s)]
    return script, [str(toml), *sets]


@pytest.mark.parametrize("given", ["seed", "store", "resume"])
def test_ranks_given_another_run_than_rank_0_are_refused_in_one_line(tiny_store, tmp_path, given):
    """Each rank parses its own command line and pipeline file and opens its own --cache: a --set on one launcher, a pipeline
    file edited on one machine, an older store at the same path there. Rank 1 with another train.seed (another epoch plan:
    the streams no longer disjoint), another store of the same shape (its rows paired with another teacher's targets) or
    --resume where rank 0 starts anew trained on without a word, exit 0. Now, once joined, the ranks compare what they
    train and all stop before anything is written to --out, in one line naming rank 1, its host and both values."""
    from conftest import extract_tiny

    script, args = _rank1_given(tmp_path)
    host = re.escape(socket.gethostname())
    if given == "seed":
        env, differs = {"RANK1_ARGS": json.dumps(["--set", "train.seed=1"])}, rf"train\.seed = 1 on rank 1 \(on {host}\), 0 on rank 0 \(on {host}\)"
    elif given == "store":  # its shape, another teacher's values (created in the same second as tiny_store or not)
        env = {"RANK1_CACHE": extract_tiny(tmp_path / "other.zarr", "teacher.factory='tiny.py:ties_in_float16'")}
        differs = rf"the --cache store's (created|teacher\.factory) = \S+ on rank 1 \(on {host}\), \S+ on rank 0 \(on {host}\)"
    else:
        env, differs = {"RANK1_ARGS": json.dumps(["--resume"])}, rf"--resume given on rank 1 \(on {host}\), not given on rank 0 \(on {host}\)"
    out = tmp_path / "out"
    r = _torchrun("train", *args, "--cache", tiny_store, "--out", str(out), cwd=tmp_path, script=script, env=env)
    ours = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
    line = (f"Error: the torchrun ranks were not given the same run: {differs}" + re.escape(
        "; give every rank the same command, pipeline file and store (a copy of one store, where each machine reads its own: "
        "docs/CLUSTER.md), then rerun (nothing was changed)"))
    assert r.returncode != 0 and len(ours) == 2 and all(re.fullmatch(line, x) for x in ours), r.stderr[-3000:]  # each rank's
    assert str(Path(kdcache.__file__).parent) not in r.stderr, r.stderr[-3000:]
    assert not out.exists(), list(out.iterdir())


def _copy_of(store: str, to: Path, shard: int, damage: str) -> str:
    """A copy of ``store`` at ``to`` whose ``shard`` lacks its done marker (``"marker"``: a copy made while extract still
    wrote the store, or cut short) or holds other logits, its digest row rewritten to match them (``"rows"``: the shard
    extracted again in one copy since, by a teacher whose last bits differ): a store that verifies either way."""
    import numpy as np
    import zarr

    from kdcache import store as layout

    shutil.copytree(store, to)
    if damage == "marker":
        (to / "progress" / "done" / "c" / str(shard)).unlink()
        return str(to)
    g, opened = zarr.open_group(str(to), mode="r+"), open_store(str(to))
    lo, hi = opened.shard_rows(shard)
    rows = (np.asarray(g[layout.LOGITS][lo:hi], dtype=np.float32) * 1.5).astype(np.float16)
    g[layout.LOGITS][lo:hi] = rows
    g[layout.DIGEST][shard, opened.digest_paths().index(layout.LOGITS)] = layout.shard_digest(layout.LOGITS, shard, [rows])
    return str(to)


@pytest.mark.parametrize("given", ["unfinished", "allow_partial", "rows", "resumed"])
def test_ranks_whose_copy_of_the_store_lacks_shards_rank_0_trains_on_are_refused_in_one_line(tiny_store, tmp_path, given):
    """Each rank may read its own copy of the store (docs/CLUSTER.md), and the ranks compared the copies' manifests, not
    their shards: rank 0 broadcast its done shards, and rank 1, whose copy lacked one (a copy made while extract still
    wrote it, or cut short), failed alone: with --allow-partial in its check of the rows ('pass rows of done shards only
    (kdcache.cache.done_rows(store))'), without it telling the user to pass --allow-partial, on resuming naming its own
    copy alone, rank 0 only saying another rank ended first; and a copy whose shard held other rows (extracted again
    since, its digests rewritten to match) trained on, exit 0, rank 1 reading rows rank 0's store does not hold. Now the
    ranks compare their done markers and digests in the same gather, and all stop before anything is written, in one
    line naming rank 1, its host, the shards and the fix."""
    script, args = _rank1_given(tmp_path)
    host = socket.gethostname()
    copy = _copy_of(tiny_store, tmp_path / "copy.zarr", 2, "rows" if given == "rows" else "marker")
    out, more = tmp_path / "out", (["--allow-partial"] if given in ("allow_partial", "resumed") else [])
    if given == "resumed":  # one epoch of the run in one process (train.streams = 2, as 2 ranks), resumed under torchrun for a second
        one = CliRunner().invoke(main, ["train", *args, "--cache", tiny_store, "--out", str(out), "--set", "train.streams=2"])
        assert one.exit_code == 0, one.output
        more += ["--resume", "--set", "train.epochs=2"]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) if out.exists() else []
    r = _torchrun("train", *args, "--cache", tiny_store, "--out", str(out), *more, cwd=tmp_path, script=script,
                  env={"RANK1_CACHE": copy})
    ours = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
    if given == "rows":
        what = (f"rank 1 (on {host}) holds other rows than rank 0 (on {host}) in shards [2] of the 4 shards the run trains on: their "
                f"digests (FORMAT.md §7.1) differ in {copy!r} (a shard extracted again, or rewritten, in one copy since)")
    else:
        whose = "its checkpoint's" if given == "resumed" else f"rank 0's done ones, on {host}"
        what = (f"rank 1 (on {host}) lacks shards [2] of the 4 shards the run trains on ({whose}): {copy!r} has 3/4 shards done there "
                "(a copy made while kdcache extract still wrote the store, or cut short)")
    line = (f"Error: the torchrun ranks' stores do not hold the same shards: {what}; copy rank 0's store again where rank 1 reads it, "
            "or give every rank the same copy (docs/CLUSTER.md), then rerun (nothing was changed)")
    assert r.returncode != 0 and ours == [line, line], r.stderr[-3000:]  # each rank's
    assert str(Path(kdcache.__file__).parent) not in r.stderr, r.stderr[-3000:]
    assert (sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) if out.exists() else []) == before


@pytest.mark.parametrize("whose", [1, 0])
def test_ranks_one_of_whose_copies_lacks_an_object_of_a_done_shard_are_refused_in_one_line(tiny_store, tmp_path, whose):
    """Each rank may read its own copy of the store (docs/CLUSTER.md): a copy cut short (rsync, aws s3 sync) whose done
    shard lacks an object was found only where that rank read the shard, the rank failing alone, the others stopped by
    it, OUT written. Now each rank lists its own copy's objects of the shards the run reads before anything is written,
    the ranks gather what they found, and every rank stops in the same line: the first refusal, named by its rank and
    host where it is not rank 0's."""
    script, args = _rank1_given(tmp_path)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    (copy / "targets" / "logits" / "c" / "2" / "0").unlink()
    cache, other = (tiny_store, str(copy)) if whose == 1 else (str(copy), tiny_store)
    out = tmp_path / "out"
    r = _torchrun("train", *args, "--cache", cache, "--out", str(out), cwd=tmp_path, script=script, env={"RANK1_CACHE": other})
    ours = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
    line = (f"Error: {f'rank 1 (on {socket.gethostname()}): ' if whose else ''}{str(copy)!r} lacks objects of 1 shard of the 4 marked done "
            f"that this run reads (an incomplete copy, or objects deleted): shards [2], object 'targets/logits/c/2/0' missing; copy the "
            f"store again, or run kdcache extract PIPELINE --out {copy}, which resumes it and rewrites those shards; kdcache verify "
            f"{copy} lists every damaged object (nothing was written)")
    assert r.returncode != 0 and ours == [line, line], r.stderr[-3000:]  # each rank's
    assert str(Path(kdcache.__file__).parent) not in r.stderr, r.stderr[-3000:]
    assert not out.exists()


def test_ranks_whose_copy_holds_more_shards_than_rank_0s_train_on_rank_0s(tiny_store, tmp_path):
    """Rank 0's done shards are the run's: rank 1's copy, holding one more (rank 0's copy made before extract had
    written it), trains with rank 0 on rank 0's 3 shards (34 rows: 2 steps of 2 batches of 8, then one of rank 0's 2
    rows left), and where rank 0's copy is incomplete without --allow-partial every rank refuses in rank 0's line."""
    script, args = _rank1_given(tmp_path)
    behind = _copy_of(tiny_store, tmp_path / "behind.zarr", 2, "marker")
    r = _torchrun("train", *args, "--cache", behind, "--out", str(tmp_path / "out"), "--allow-partial", cwd=tmp_path, script=script,
                  env={"RANK1_CACHE": tiny_store})
    assert r.returncode == 0 and r.stdout.count("student written") == 1, r.stderr[-3000:]
    (line,) = (json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
    assert line["step"] == 3, line
    r = _torchrun("train", *args, "--cache", behind, "--out", str(tmp_path / "refused"), cwd=tmp_path, script=script,
                  env={"RANK1_CACHE": tiny_store})
    ours = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
    line = (f"Error: {behind!r} is incomplete (34/50 samples); resume kdcache extract, or pass --allow-partial to train on completed "
            "shards only")
    assert r.returncode != 0 and ours == [line, line], r.stderr[-3000:]
    assert not (tmp_path / "refused").exists()


def test_ranks_may_differ_in_their_machines_workers_and_the_path_of_the_same_eval_store(tiny_store, tmp_path):
    """What a machine may have its own of is not compared: train.num_workers (the batches' order under torchrun does not
    depend on it) and train.eval_cache's path to the same store (another mount): the ranks train, and evaluate against it."""
    from conftest import extract_tiny

    script, args = _rank1_given(tmp_path)
    evaluated = extract_tiny(tmp_path / "test.zarr", "data.split='test'")
    (tmp_path / "mount").symlink_to(tmp_path)  # the same eval store by another path
    mounted = ["--set", "train.num_workers=1", "--set", f'train.eval_cache="{tmp_path / "mount" / "test.zarr"}"']
    r = _torchrun("train", *args, "--set", f'train.eval_cache="{evaluated}"', "--cache", tiny_store, "--out", str(tmp_path / "out"),
                  cwd=tmp_path, script=script, env={"RANK1_ARGS": json.dumps(mounted)})
    assert r.returncode == 0 and r.stdout.count("student written") == 1, r.stderr[-3000:]
    assert "eval_agreement" in json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])


def test_torchrun_rank_whose_stream_ran_out_trains_a_batchnorm_student(tmp_path):
    """17 rows in batches of 5 (drop_last: 3 batches) over 2 ranks: at step 2 rank 1's stream has run out and it takes part
    with one row it learns nothing from. A BatchNorm student failed on that row (told to set drop_last, already set)."""
    from conftest import FIXTURES

    arch = FIXTURES / "architectures.py"
    toml = tmp_path / "bn.toml"
    toml.write_text(f"""
[teacher]
factory = "{arch}:blocks_teacher"
[data]
factory = "{arch}:images_17"
[targets]
dtype = "float32"
[extract]
batch_size = 8
device = "cpu"
rows_per_shard = 8
[student]
factory = "{arch}:batchnorm_student"
[train]
epochs = 1
batch_size = 5
drop_last = true
device = "cpu"
""")
    store = str(tmp_path / "bn.zarr")
    assert CliRunner().invoke(main, ["extract", str(toml), "--out", store]).exit_code == 0
    r = _torchrun("train", str(toml), "--cache", store, "--out", str(tmp_path / "ddp"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = (json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines())
    assert line["step"] == 2 and line["loss"] > 0

    # Batches of 8 without drop_last: rank 0's second batch is the one row left over, which its BatchNorm cannot
    # take. Rank 0 says so; rank 1, whose all-reduce then loses its peer, says one line too (was gloo's traceback).
    toml.write_text(toml.read_text().replace("batch_size = 5\ndrop_last = true", "batch_size = 8"))
    r = _torchrun("train", str(toml), "--cache", store, "--out", str(tmp_path / "bn8"), cwd=tmp_path)
    output = r.stdout + r.stderr
    assert r.returncode != 0 and "on a batch of one sample" in output and "set train.drop_last = true" in output, output[-3000:]
    assert "Connection closed by peer" not in output and "RuntimeError" not in output, output[-3000:]


@pytest.mark.parametrize("env, device, refused", [
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:0", True),  # two ranks, one GPU: NCCL refuses it
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "cuda:1", False),  # a rank per machine picks its GPU
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cpu", False),
    ({}, "cuda:3", False),  # one process
])
def test_an_explicit_gpu_for_every_rank_of_a_machine_is_refused(monkeypatch, env, device, refused):
    from kdcache.distributed import training_device
    from kdcache.errors import PipelineError

    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if refused:
        with pytest.raises(PipelineError, match=r"train.device = 'cuda:0' under torchrun puts all 2 ranks of this machine on one GPU; "
                                                 r"use \"cuda\" or \"auto\""):
            training_device(device)
    else:
        assert training_device(device) == device


def test_the_torchrun_progress_bar_rides_out_a_done_list_that_does_not_read(tiny_store, tmp_path, monkeypatch):
    """Rank 0's bar reads the done markers of the job's shards not yet seen done once a second: one read that failed (an
    S3 request on the way, a marker caught damaged) ended its thread with a traceback on stderr, the bar frozen from then on."""
    import io

    from kdcache.distributed import _watch
    from kdcache.progress import Progress

    seen: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    store = open_store(shutil.copytree(tiny_store, tmp_path / "s.zarr"))
    marker = tmp_path / "s.zarr" / "progress" / "done" / "c" / "0"
    marker.write_bytes(b"\x00")  # shard 0 (rows 0-15): the job's
    stream = io.StringIO()
    bar, read, failed = Progress(16, "extract", enabled=True, stream=stream, every=0), store.done, []

    def done(*args):
        try:
            return read(*args)
        except Exception as e:
            failed.append(e)
            raise

    def wait_for(condition) -> None:  # a fixed 0.2 s for each: a loaded box's bar had not looked meanwhile
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, (failed, bar.done)
            time.sleep(0.01)

    monkeypatch.setattr(store, "done", done)
    with _watch(store, [0], bar, every=0.01):
        marker.write_bytes(b"zz")  # done() refuses a marker that is not one byte 0 or 1
        wait_for(lambda: failed)
        marker.write_bytes(b"\x01")
        wait_for(lambda: bar.done == 16)  # by the bar's thread, not the last look as the block ends
    assert seen == []
    assert "extract 16/16" in stream.getvalue(), stream.getvalue()  # the shards done before the job are not its


def test_streams_split_the_plan_disjointly_and_join_back(tiny_store):
    from kdcache.cache import TransferSet
    from tiny import dataset

    kw = dict(batch_size=8, seed=3, memory_budget_mb=0.0001, buffer_shards=1)
    joined = list(TransferSet(tiny_store, dataset(), [], streams=2, **kw))
    ranks = [list(TransferSet(tiny_store, dataset(), [], streams=2, stream=r, **kw)) for r in range(2)]
    assert len(joined) == len(ranks[0]) == len(ranks[1])
    served = []
    for step, batch in enumerate(joined):
        own = [b for b in (ranks[0][step], ranks[1][step]) if b["scale"] > 0]
        assert batch["rows"].tolist() == [r for b in own for r in b["rows"].tolist()]
        assert sum(b["scale"] for b in own) == pytest.approx(2.0)  # DDP's mean of scaled losses = the joined batch's loss
        served += batch["rows"].tolist()
    assert sorted(served) == list(range(50))  # every row once per epoch
    shards = [{int(r) // 16 for b in rank if b["scale"] > 0 for r in b["rows"]} for rank in ranks]
    assert not shards[0] & shards[1]  # each rank reads its own shards




def test_dask_extract_to_s3_equals_local(toml, single, s3, scheduler, tmp_path):
    url = f"s3://{BUCKET}/dask.zarr"
    info = extract_distributed(kdcache.load_pipeline(toml), url, scheduler=scheduler, storage_options=s3)
    assert info["complete"]
    assert_same_store(url, single, options_a=s3)


def test_a_dask_job_whose_s3_lock_was_taken_over_runs_no_more_shards(s3, slow_scheduler, tmp_path, zoo_env):
    """The driver holds the job's S3 lock and its workers write. Once the lock is lost (the driver's heartbeat found
    it taken over), the driver cancels the shards not yet run and stops with the one-line error, instead of letting
    its workers write the whole store over the other job's."""
    from kdcache import locking

    zoo_env(N=240, SLEEP=0.01)  # slow_scheduler's worker's dataset
    url = f"s3://{BUCKET}/dask-lost.zarr"
    pipeline = kdcache.load_pipeline(write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4"))
    thread, failed = _extract_in_a_thread(pipeline, url, s3, slow_scheduler)
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline and (locking._LEASES == {} or not done_at_least(url, 2, s3)):
        time.sleep(0.05)
    lease = locking.held_lease(url, s3)
    lease.lost_to = "kdcache pid 4242 on elsewhere"  # what the heartbeat records when a renewal is refused
    thread.join(timeout=120)
    assert len(failed) == 1 and isinstance(failed[0], StoreError), failed
    assert str(failed[0]).startswith(f"{url!r} lost its writer lock while being written: kdcache pid 4242 on elsewhere took it over")
    assert 2 <= shards_done(url, s3) < 30, "the shards not yet run were cancelled"


def test_dask_workers_write_no_shard_once_the_jobs_s3_lock_is_anothers(s3, slow_scheduler, tmp_path, zoo_env, monkeypatch):
    """A driver paused (a laptop asleep while a remote cluster works) cannot notice that its lock was taken over, and
    its workers went on writing every shard handed to them over the other job's. Each worker now reads the lock
    object before it writes a shard: another job's, it writes nothing and the job stops with the one-line error."""
    import s3fs

    from kdcache import locking

    monkeypatch.setattr(locking, "LOCK_HEARTBEAT_S", 600)  # the driver renews nothing and notices nothing: paused
    monkeypatch.setattr(locking, "LOCK_LATE_S", 600)
    zoo_env(N=240, SLEEP=0.01)  # slow_scheduler's worker's dataset
    url = f"s3://{BUCKET}/dask-taken.zarr"
    pipeline = kdcache.load_pipeline(write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4"))
    thread, failed = _extract_in_a_thread(pipeline, url, s3, slow_scheduler)
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline and not done_at_least(url, 2, s3):
        time.sleep(0.05)
    taker = {"holder": "kdcache pid 4242 on elsewhere since 2026-11-29T00:00:00+00:00", "heartbeat": "now", "token": "theirs"}
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).pipe_file(f"{BUCKET}/.dask-taken.zarr.kdcache-lock", json.dumps(taker).encode())
    taken_at = shards_done(url, s3)
    thread.join(timeout=120)
    assert len(failed) == 1 and isinstance(failed[0], StoreError), failed
    assert str(failed[0]).startswith(f"{url!r} lost its writer lock while being written: kdcache pid 4242 on elsewhere since "), failed[0]
    assert taken_at <= shards_done(url, s3) <= taken_at + 1 < 30, "only a shard being written as it was taken over is finished"


@pytest.mark.parametrize("taken", [True, False], ids=["anothers", "gone"])
def test_dask_workers_write_no_shard_once_the_jobs_local_lock_is_gone_or_anothers(slow_scheduler, tmp_path, zoo_env, taken):
    """A worker of a cluster of one's own (``--scheduler``) runs its task on after the driver stopped (Ctrl-C, SIGTERM,
    another shard's error) and released the local lock: it wrote its shard and done marker into the store an
    ``--overwrite`` with another teacher had made there meanwhile (seen: 2 of 4 shards of the new store held the old
    teacher's targets, and it verified). Each worker now reads the lock file before it writes a shard: gone, or another
    job's, it writes nothing and the job stops with one line."""
    zoo_env(N=240, SLEEP=0.01)  # slow_scheduler's worker's dataset
    out = tmp_path / "local-taken.zarr"
    pipeline = kdcache.load_pipeline(write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4"))
    thread, failed = _extract_in_a_thread(pipeline, str(out), None, slow_scheduler)
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline and shards_done(out) < 2:
        time.sleep(0.05)
    lock = tmp_path / ".local-taken.zarr.kdcache-lock"
    if taken:
        lock.write_text("kdcache pid 4242 on elsewhere since 2026-11-29T00:00:00+00:00")
    else:  # as the driver leaves it when it stops
        lock.unlink()
    taken_at = shards_done(out)
    thread.join(timeout=120)
    assert len(failed) == 1 and isinstance(failed[0], StoreError), failed
    assert str(failed[0]).startswith(f"{str(out)!r}: the job this dask worker writes for (kdcache pid {os.getpid()} on "), failed[0]
    now = "no longer holds its lock (kdcache pid 4242 on elsewhere since " if taken else "has ended (its lock is released); "
    assert now in str(failed[0]), failed[0]
    assert taken_at <= shards_done(out) <= taken_at + 1 < 30, "only a shard being written as it was taken over is finished"


def test_torchrun_ranks_write_no_shard_once_the_jobs_s3_lock_is_anothers(s3, tmp_path):
    """torchrun to an S3 store: rank 0 holds the job's lock and hands its token to the other ranks, which read the lock
    object before each shard they write. Rank 0 paused (its heartbeat renews nothing and notices nothing, as on a
    laptop asleep) cannot see that another job took the lock over: rank 1 finds another job's token there, writes none
    of its shards more than those already past that check, and the job stops with the one-line error."""
    import s3fs

    from kdcache.extract import WRITE_THREADS
    from reference import slow_extract

    paused = tmp_path / "paused.py"  # torchrun runs a script: kdcache's command with rank 0's lock never renewed
    paused.write_text("from kdcache import locking\nlocking.LOCK_HEARTBEAT_S = locking.LOCK_LATE_S = 600\n"
                      "from kdcache.cli import main\nmain()\n")
    url, fs = f"s3://{BUCKET}/torchrun-taken.zarr", s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")  # 30 shards; rank 1's: the odd ones
    torchrun = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--standalone", str(paused)]

    def rank_1s() -> int:
        return int(open_store(url, storage_options=s3).done()[1::2].sum())

    def take() -> int:
        taker = {"holder": "kdcache pid 4242 on elsewhere since 2026-11-29T00:00:00+00:00", "heartbeat": "now", "token": "theirs"}
        fs.pipe_file(f"{BUCKET}/.torchrun-taken.zarr.kdcache-lock", json.dumps(taker).encode())
        return rank_1s()

    # rank 1's 7th shard (13) waits until the lock is taken: a loaded box may end the job first, and the shards it may
    # finish after the take (WRITE_THREADS, up to 8) must leave some of its 15 unwritten
    hold = tmp_path / "hold"
    hold.touch()
    proc = slow_extract(toml, url, sleep=0.05, storage_options=s3, command=torchrun, held=(hold, 104))  # ~0.4 s a shard
    taken_at, stderr = _while_running(proc, take, hold)
    assert proc.returncode != 0, stderr[-3000:]
    assert f"Error: {url!r} lost its writer lock while being written: kdcache pid 4242 on elsewhere since " in stderr, stderr[-3000:]
    assert taken_at <= rank_1s() <= taken_at + WRITE_THREADS < 15, (taken_at, rank_1s())
    assert json.loads(fs.cat_file(f"{BUCKET}/.torchrun-taken.zarr.kdcache-lock"))["token"] == "theirs"  # the job left the taker's lock


@pytest.mark.parametrize("taken", [True, False], ids=["anothers", "gone"])
def test_torchrun_ranks_write_no_shard_once_the_jobs_local_lock_is_gone_or_anothers(tmp_path, taken):
    """torchrun to a local (or shared) folder: rank 0 holds the job's lock file and tells the other ranks what it wrote
    there; they read it before each shard they write, as dask workers do. They were handed rank 0's S3 token alone (None
    here) and never looked: a rank on another machine whose rank 0 was killed (kill -9 leaves the file, its flock
    released) wrote on until the final barrier, into whatever store another job had made there meanwhile. Rank 1 finds
    another job's name there (rank 0 still holding its flock), or the file gone, writes none of its shards more than the
    one past that check, and the job stops with one line."""
    from reference import slow_extract

    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")  # 30 shards; rank 1's: the odd ones
    out = tmp_path / "local-taken.zarr"
    torchrun = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--standalone",
                "-m", "kdcache.cli"]

    def rank_1s() -> int:
        return int(open_store(out).done()[1::2].sum())

    def take() -> int:
        lock = tmp_path / ".local-taken.zarr.kdcache-lock"
        if taken:  # rewritten in place: rank 0's flock on it stays
            lock.write_text("kdcache pid 4242 on elsewhere since 2026-11-29T00:00:00+00:00")
        else:
            lock.unlink()
        return rank_1s()

    hold = tmp_path / "hold"  # rank 1's 7th shard (13) waits until the lock is taken: a loaded box may end the job first
    hold.touch()
    proc = slow_extract(toml, out, sleep=0.05, command=torchrun, held=(hold, 104))  # ~0.4 s a shard
    taken_at, stderr = _while_running(proc, take, hold)
    assert proc.returncode != 0, stderr[-3000:]
    now = "no longer holds its lock (kdcache pid 4242 on elsewhere since " if taken else "has ended (its lock is released); "
    assert f"Error: {str(out)!r}: the job rank 1 writes for (kdcache pid " in stderr and now in stderr, stderr[-3000:]
    assert taken_at <= rank_1s() <= taken_at + 1 < 15, (taken_at, rank_1s())


def _while_running(proc: subprocess.Popen, act: Callable[[], Any], hold: Path) -> tuple[Any, str]:
    """``act()`` while ``proc`` (a slow extract held by ``hold``: ``slow_extract``'s ``held``) runs, then ``hold``
    removed and its stderr once it has ended (killed if the wait fails)."""
    try:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        result = act()
        hold.unlink()
        stderr = proc.communicate(timeout=120)[1].decode()
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    return result, stderr


def _extract_in_a_thread(pipeline, url: str, options: dict, scheduler: str) -> tuple[threading.Thread, list[BaseException]]:
    """A dask extract of ``url`` on the cluster at ``scheduler`` running in a thread (started), and the list its error
    will be put in."""
    failed: list[BaseException] = []

    def job() -> None:
        try:
            extract_distributed(pipeline, url, scheduler=scheduler, storage_options=options)
        except BaseException as e:  # noqa: BLE001 - the test's to look at
            failed.append(e)

    thread = threading.Thread(target=job)
    thread.start()
    return thread, failed


class _ThenAnotherJob:
    """A worker's borrowed lease, and ``then()``, the worker's job stopping and another recreating the store, at the
    moment ``when`` names: right after the look before the shard's rows (``rows``: the lock still the job's, the rows
    then written) or right before the look at its commit point (``marker``: while its rows were written). The race of a
    cluster of one's own, made deterministic; every read and write is of the real store and lock."""

    def __init__(self, lease: Any, then: Callable[[], None], when: str):
        self.lease, self.then, self.when, self.looks = lease, then, when, 0

    def check(self, location: str) -> None:
        self.looks += 1
        if self.when == "marker" and self.looks == 2:
            self.then()
        self.lease.check(location)
        if self.when == "rows" and self.looks == 1:
            self.then()


@pytest.mark.parametrize("when", ["rows", "marker"], ids=["before-its-rows", "while-its-rows-are-written"])
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_stale_workers_shard_never_lands_done_in_the_store_another_job_made_since(tmp_path, zoo_env, request, kind, when):
    """A dask worker looked at its job's lock before writing a shard, never after: its driver stopped (Ctrl-C) and an
    ``extract --overwrite`` with another teacher recreated the store as the worker began writing, and the shard landed
    in the new store marked done, with a digest of its rows (seen: shard 1 of the new store held the old teacher's
    targets, the new job skipped it as done, and the store verified). The worker now looks before the rows and again
    right before its done marker, each time at the lock (on S3: the new job's token is there) and at the store (its
    manifest: still the one its job created; locally this test's two jobs are one process, whose lock files may read
    alike): the shard is not marked done, the worker stops with one line, and the new job writes the shard."""
    from contextlib import ExitStack

    from kdcache.distributed import _open_created
    from kdcache.extract import extract_shards, setup
    from kdcache.locking import borrowed_lease, local_token
    from kdcache.progress import Progress
    from kdcache.store import create_or_resume

    options = request.getfixturevalue("s3") if kind == "s3" else None
    out = f"s3://{BUCKET}/recreated-{when}.zarr" if kind == "s3" else str(tmp_path / "recreated.zarr")
    pipeline = make_pipeline()  # 50 samples, 4 shards
    zoo_env(SEED=1)
    reference = str(tmp_path / "b.zarr")  # job B's store, written alone
    kdcache.extract(pipeline, reference)
    run_b = setup(pipeline)
    zoo_env(SEED=0)
    run_a = setup(pipeline)
    job_a, job_b = ExitStack(), ExitStack()
    job_a.enter_context(writer_lock(out, options, helpers=True))  # job A's driver: the lock, the store, its workers' token
    store_a = create_or_resume(out, run_a.manifest_for(pipeline), storage_options=options)
    token = getattr(store_a.lease, "token", None) or local_token(out)
    worker = _open_created(out, options, "dask worker 0")

    def a_stops_and_b_recreates() -> None:
        job_a.close()
        job_b.enter_context(writer_lock(out, options, helpers=True))
        create_or_resume(out, run_b.manifest_for(pipeline), overwrite=True, storage_options=options)

    worker.lease = _ThenAnotherJob(borrowed_lease(out, options, token), a_stops_and_b_recreates, when)
    with job_b:
        with pytest.raises(StoreError, match="was replaced since this job created it|no longer holds its lock|lost its writer lock"):
            extract_shards(run_a, pipeline, worker, [1], Progress(0, "", enabled=False))
        store_b = open_store(out, mode="r+", storage_options=options)
        assert store_b.resume_pending() == [0, 1, 2, 3], "job A's shard is not done in job B's store"
        extract_shards(run_b, pipeline, store_b, store_b.resume_pending(), Progress(0, "", enabled=False))
        store_b.finish()
    assert_same_store(out, reference, options_a=options)  # every row job B's teacher's
