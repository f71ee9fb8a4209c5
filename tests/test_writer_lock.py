"""One writer per local store: a second ``extract`` / ``import`` of a store being written is refused.

Before the lock, ``kdcache extract --overwrite`` with another teacher, run while the first extract
(240 rows) still ran, let both commands report success; when the first finished last, its manifest
named the first teacher while 136 rows held the second's targets, and ``kdcache verify`` passed it.
The lock is ``flock`` on a file beside the store (FORMAT.md §13), so it holds across processes and
dies with its holder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache import store as layout
from kdcache.cli import main
from kdcache.store import active_writer, writer_lock
from reference import FIXTURES, file_bytes, read_store, slow_extract, without_times, write_toml


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def lock_file(store: Path) -> Path:
    store = store.resolve()
    return store.parent / f".{store.name}.kdcache-lock"


def assert_refused(result, store: Path, holder: str) -> None:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()  # stdout may hold what the run printed before (train's projection heads)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert f"{str(store)!r} is being written by {holder}" in lines[0] and "nothing was changed" in lines[0], lines[0]


@pytest.mark.slow
def test_a_second_extract_of_a_store_being_written_is_refused(tmp_path, zoo_env):
    """A real ``kdcache extract`` (240 samples at 20 ms: ~5 s) holds the lock; ``--overwrite`` with another teacher, and
    the same command again, are refused while it runs; the first run's store equals an undisturbed one."""
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    out, reference = tmp_path / "s.zarr", tmp_path / "reference.zarr"
    first = slow_extract(toml, out, sleep=0.02)
    try:
        assert first.poll() is None and lock_file(out).exists(), "the first run ended too soon to be interrupted"
        holder = f"kdcache pid {first.pid} on "
        info = invoke("info", out)  # a running extract is told from an interrupted one
        assert info.exit_code == 0 and f"INCOMPLETE (being written by {holder}" in info.stdout, info.output
        assert json.loads(invoke("info", out, "--json").stdout)["writer"].startswith(holder)
        verify = invoke("verify", out)
        assert verify.exit_code == 1 and f"shards done, being written by {holder}" in verify.stdout, verify.output
        assert "is not done; its writer is still running" in verify.stdout
        zoo_env(N=240, SEED=1)  # another teacher
        assert_refused(invoke("extract", toml, "--out", out, "--overwrite"), out, holder)
        zoo_env(SEED=None)
        assert_refused(invoke("extract", toml, "--out", out), out, holder)
        assert_refused(invoke("extract", toml, "--out", out, "--workers", 2), out, holder)  # dask's driver takes it too
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not lock_file(out).exists(), "the lock file is removed when its holder ends"
    assert json.loads(invoke("info", out, "--json").stdout)["writer"] is None

    assert invoke("extract", toml, "--out", reference).exit_code == 0
    got_manifest, got = read_store(out)
    want_manifest, want = read_store(reference)
    assert without_times(got_manifest) == without_times(want_manifest)
    assert file_bytes(out) == file_bytes(reference), "every shard is the first run's own"

    result = invoke("extract", toml, "--out", out, "--overwrite")  # the lock was released: allowed now
    assert result.exit_code == 0, result.output


def test_import_and_extract_are_refused_while_another_holds_the_lock(tiny_store, tmp_path):
    h5, copy = tmp_path / "t.h5", tmp_path / "copy.zarr"
    assert invoke("export", tiny_store, h5).exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom kdcache.store import writer_lock\n"
                               "with writer_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)", str(copy)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_refused(invoke("import", h5, copy), copy, f"kdcache pid {holder.pid} on ")
        assert not copy.exists(), "a refused import writes nothing"
        holder.send_signal(signal.SIGKILL)  # a holder that dies leaves its lock file, but not its lock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert lock_file(copy).exists() and active_writer(copy) is None, "a dead holder's file names no writer"
    result = invoke("import", h5, copy)
    assert result.exit_code == 0, result.output
    assert not lock_file(copy).exists(), "a stale lock file is taken over and removed"
    _, arrays = read_store(copy)
    _, original = read_store(Path(tiny_store))
    assert arrays.keys() == original.keys() and all((arrays[k] == original[k]).all() for k in arrays)


def test_lock_is_per_store_and_held_only_inside_the_block(tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "runs" / "b.zarr"
    with writer_lock(a), writer_lock(b):  # two stores: independent locks; a missing parent folder is made
        assert lock_file(a).read_text().startswith(f"kdcache pid {os.getpid()} on ")
        assert lock_file(b).exists() and active_writer(b).startswith(f"kdcache pid {os.getpid()} on ")
        (tmp_path / "link").symlink_to(tmp_path / "runs")
        for other in (tmp_path / "link" / "b.zarr", tmp_path / "runs" / ".." / "runs" / "b.zarr"):  # the same store by another path
            with pytest.raises(layout.StoreError, match="is being written by"):
                with writer_lock(other):
                    pass
        (tmp_path / "link").unlink()
        with pytest.raises(layout.StoreError, match=r"is being written by kdcache pid \d+ on .*then rerun \(nothing was changed\)"):
            with writer_lock(str(a)):  # the same store, another open of the lock file: refused (flock is per open file)
                pass
    assert not lock_file(a).exists() and not lock_file(b).exists() and active_writer(b) is None
    with writer_lock(a):
        pass
    with writer_lock("s3://bucket/x.zarr"), writer_lock(tmp_path / "x.zarr.zip"):  # object stores and zips: no lock
        pass
    assert list(tmp_path.iterdir()) == []  # "runs", made for b's lock file and left empty, is removed too

    with pytest.raises(RuntimeError, match="failed before writing"):
        with writer_lock(tmp_path / "new" / "deeper" / "c.zarr"):
            raise RuntimeError("failed before writing")
    assert not (tmp_path / "new").exists(), "folders made for the lock are removed when left empty"


def test_a_lock_that_cannot_be_written_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(layout.StoreError, match=r"cannot lock .*s\.zarr' for writing: its lock file .*file/\.s\.zarr\.kdcache-lock': .*; choose an --out whose parent .*file' is a folder and rerun"):
        with writer_lock(tmp_path / "file" / "s.zarr"):
            pass
    result = invoke("extract", FIXTURES / "tiny.toml", "--out", tmp_path / "file" / "s.zarr")  # through the CLI: one line, exit 1
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and "lock file" in result.output, result.output


def test_a_second_train_into_the_same_out_is_refused(tiny_store, tmp_path):
    out = tmp_path / "run"
    args = ("train", FIXTURES / "tiny.toml", "--cache", tiny_store, "--out", out, "--set", "train.epochs=1", "--no-progress")
    assert invoke(*args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with writer_lock(out):  # another run of that OUT
        assert_refused(invoke(*args, "--overwrite"), out, f"kdcache pid {os.getpid()} on ")
        assert_refused(invoke(*args, "--resume", "--set", "train.epochs=2"), out, f"kdcache pid {os.getpid()} on ")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a refused run changes nothing"
    result = invoke(*args, "--resume", "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert not lock_file(out).exists()


def test_a_look_at_the_lock_does_not_refuse_a_writer(tmp_path):
    """``kdcache info`` takes the lock shared for an instant (``active_writer``); a writer starting then retries."""
    import fcntl
    import threading

    store = tmp_path / "s.zarr"
    lock_file(store).write_text("")
    fd = os.open(lock_file(store), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a look that lasts 150 ms, far longer than a real one
    threading.Timer(0.15, os.close, [fd]).start()
    with writer_lock(store):
        assert active_writer(store).startswith(f"kdcache pid {os.getpid()} on ")
    assert active_writer(store) is None


def test_a_file_system_without_flock_is_written_unlocked(tmp_path, tiny_store, monkeypatch):
    """Some network and FUSE file systems answer flock with ENOLCK / EOPNOTSUPP (injected here, as the fault tests
    inject ENOSPC): kdcache then writes without the lock, as before it had one, instead of refusing to write at all."""
    import errno
    import fcntl

    real = fcntl.flock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    h5, copy = tmp_path / "t.h5", tmp_path / "copy.zarr"
    assert invoke("export", tiny_store, h5).exit_code == 0
    monkeypatch.setattr(fcntl, "flock", no_flock)
    result = invoke("import", h5, copy)
    assert result.exit_code == 0, result.output
    assert not lock_file(copy).exists() and active_writer(copy) is None
    monkeypatch.setattr(fcntl, "flock", real)
    _, arrays = read_store(copy)
    assert arrays["samples/index"].tolist() == list(range(50))


def test_a_refused_job_builds_no_teacher(tmp_path, tiny_store):
    """The refusal comes before the teacher (minutes for a large one) is built: a teacher factory that would
    fail is never called while another job holds the store."""
    sentinel = tmp_path / "teacher-was-built"
    (tmp_path / "slow_teacher.py").write_text(f"import pathlib\n\ndef teacher():\n    pathlib.Path({str(sentinel)!r}).touch()\n"
                                              "    raise RuntimeError('the teacher was built')\n")
    toml = write_toml(tmp_path / "p.toml", f'teacher.factory="{tmp_path / "slow_teacher.py"}:teacher"')
    out = tmp_path / "s.zarr"
    with writer_lock(out):
        for extra in ([], ["--workers", 2], ["--overwrite"]):
            assert_refused(invoke("extract", toml, "--out", out, *extra), out, f"kdcache pid {os.getpid()} on ")
        run = tmp_path / "run"
        with writer_lock(run):
            assert_refused(invoke("train", FIXTURES / "tiny.toml", "--cache", tiny_store, "--out", run), run, f"kdcache pid {os.getpid()} on ")
    assert not sentinel.exists() and not out.exists()
    result = invoke("extract", toml, "--out", out)  # and without the lock, the factory does run
    assert result.exit_code == 1 and "the teacher was built" in result.output and sentinel.exists()


def test_a_store_being_created_is_named_so(tmp_path):
    """Between the root zarr.json and the manifest (written last), a reader sees a zarr group that is not yet a store:
    while its writer holds the lock, that is said, instead of 'not a kdcache store'."""
    import zarr

    out = tmp_path / "s.zarr"
    with writer_lock(out):
        zarr.open_group(str(out), mode="w", zarr_format=3)  # what create_or_resume has written at that moment
        result = invoke("info", out)
        assert result.exit_code == 1 and f"is being created by kdcache pid {os.getpid()} on " in result.output, result.output
        assert "try again in a moment" in result.output
    result = invoke("info", out)
    assert result.exit_code == 1 and "is a zarr group but not a kdcache store" in result.output, result.output
