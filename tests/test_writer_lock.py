"""One writer per store: a second ``extract`` / ``import`` of a store being written is refused.

Before the lock, ``kdcache extract --overwrite`` with another teacher, run while the first extract
(240 rows) still ran, let both commands report success; when the first finished last, its manifest
named the first teacher while 136 rows held the second's targets, and ``kdcache verify`` passed it.
A local store's lock is ``flock`` on a file beside the store (FORMAT.md §13), so it holds across processes
and dies with its holder. An S3 store's is an object beside it made by a conditional PUT, kept fresh by a
heartbeat and taken over when stale; those tests run against a real S3-API server (conftest's ``s3``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache import interop, locking, storage, store as layout
from kdcache.cli import main
from kdcache.locking import active_writer, writer_lock
from conftest import S3_BUCKET
from reference import FIXTURES, done_at_least, file_bytes, read_store, shards_done, slow_extract, without_times, write_toml


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


@pytest.fixture
def brief_looks(monkeypatch):
    """A writer refused in this process is told in 0.15 s, not after a second of retries (``locking.LOOK_TRIES``): the
    holder in these tests is a writer that keeps the lock throughout, not a look that lasts an instant."""
    monkeypatch.setattr(locking, "LOOK_TRIES", 4)


@pytest.mark.slow
def test_a_second_extract_of_a_store_being_written_is_refused(tmp_path, zoo_env, brief_looks):
    """A real ``kdcache extract`` (240 samples, held at row 24 until the others have tried: it ran 5 s at 20 ms a sample,
    most of it after they had) holds the lock; ``--overwrite`` with another teacher, and the same command again, are
    refused while it runs; the first run's store equals an undisturbed one."""
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    out, reference, hold = tmp_path / "s.zarr", tmp_path / "reference.zarr", tmp_path / "hold"
    hold.touch()
    first = slow_extract(toml, out, sleep=0, held=(hold, 24))
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
        assert first.poll() is None, "the first run ended while held"
        hold.unlink()
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


def test_import_and_extract_are_refused_while_another_holds_the_lock(tiny_store, tmp_path, brief_looks):
    h5, copy = tmp_path / "t.h5", tmp_path / "copy.zarr"
    assert invoke("export", tiny_store, h5).exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom kdcache.locking import writer_lock\n"
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


def test_lock_is_per_store_and_held_only_inside_the_block(tmp_path, brief_looks):
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
    with writer_lock("zip::s3://bucket/x.zarr.zip"), writer_lock(tmp_path / "x.zarr.zip"):  # zips (read-only): no lock
        pass
    assert list(tmp_path.iterdir()) == []  # "runs", made for b's lock file and left empty, is removed too

    with pytest.raises(RuntimeError, match="failed before writing"):
        with writer_lock(tmp_path / "new" / "deeper" / "c.zarr"):
            raise RuntimeError("failed before writing")
    assert not (tmp_path / "new").exists(), "folders made for the lock are removed when left empty"


def as_user(uid: int, gid: int, store: Path, *, stay: bool = False) -> tuple[int, str]:
    """Take ``store``'s writer lock in a forked process of user ``uid`` (group ``gid``, umask 002, as in a folder a team
    shares): its pid and what it said ("held", or the error). ``stay``: it keeps the lock until killed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([gid]), os.setgid(gid), os.setuid(uid), os.umask(0o002)
            with writer_lock(store):
                os.write(w, b"held\n")
                while stay:
                    time.sleep(1)
        except BaseException as e:  # noqa: BLE001
            os.write(w, f"{type(e).__name__}: {e}\n".encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        said = f.readline().strip()
    if not stay:
        os.waitpid(pid, 0)
    return pid, said


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="runs jobs as two other users")
def test_a_lock_file_left_by_another_users_killed_job_is_taken_over(tmp_path):
    """A folder a team shares (group-writable, setgid): the lock file is made 0644, so a teammate's job killed with
    ``kill -9`` left one nobody else could open for writing. Every later job of another member was refused, for ever,
    with "Permission denied; make the folder writable" (it is), and while the first job ran, refused so instead of
    naming it. flock needs no write access: such a file is locked read-only, and replaced once free."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # not under pytest's folders, which only root may enter
    try:
        base.chmod(0o755)
        shared = base / "shared"
        shared.mkdir()
        os.chown(shared, 0, 54321)
        shared.chmod(0o2775)
        store = shared / "s.zarr"
        first, said = as_user(54322, 54321, store, stay=True)
        try:
            assert said == "held" and lock_file(store).stat().st_uid == 54322
            _, said = as_user(54323, 54321, store)  # a teammate, while it runs: refused, naming it
            assert said.startswith(f"StoreError: {str(store)!r} is being written by kdcache pid {first} on "), said
        finally:
            os.kill(first, signal.SIGKILL)
            os.waitpid(first, 0)
        assert lock_file(store).stat().st_uid == 54322, "left behind"
        assert as_user(54323, 54321, store)[1] == "held"
        assert not lock_file(store).exists()

        shared.chmod(0o3775)  # sticky (a scratch folder like /tmp): only the file's owner may delete it
        first, said = as_user(54322, 54321, store, stay=True)
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)
        said = as_user(54323, 54321, store)[1]
        assert said == (f"StoreError: cannot lock {str(store)!r} for writing: its lock file {str(lock_file(store))!r} was left by a kdcache "
                        "of another user (uid 54322) that has ended, and this folder (sticky) lets only that user delete it; have it "
                        "deleted, and rerun"), said
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="runs a job as another user")
def test_a_lock_in_a_folder_the_user_may_not_write_names_that(tmp_path):
    """A folder the user may not write (no lock file in it): the read-only open that takes over another user's lock
    file found none, and the error said "No such file or directory; fix the cause" instead of the permission and its fix."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # not under pytest's folders, which only root may enter
    try:
        base.chmod(0o755)
        store = base / "s.zarr"
        said = as_user(54323, 54321, store)[1]
        assert said == (f"StoreError: cannot lock {str(store)!r} for writing: its lock file {str(lock_file(store))!r}: Permission denied; "
                         "make the folder writable (or choose another location) and rerun"), said
        assert not lock_file(store).exists()
        lock_file(store).write_text("kdcache pid 4242 on here since 2026-11-29T00:00:00+00:00")  # root's job, killed: not locked
        said = as_user(54323, 54321, store)[1]
        assert said == (f"StoreError: cannot lock {str(store)!r} for writing: its lock file {str(lock_file(store))!r} was left by a "
                        f"kdcache of another user (uid 0) that has ended, and this user may not write its folder {str(base)!r}; make "
                        "the folder writable (or choose another location) and rerun"), said  # not "this folder (sticky)"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_lock_that_cannot_be_written_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(layout.StoreError, match=r"cannot lock .*s\.zarr' for writing: its lock file .*file/\.s\.zarr\.kdcache-lock': .*; choose an out whose parent .*file' is a folder and rerun"):
        with writer_lock(tmp_path / "file" / "s.zarr"):
            pass
    result = invoke("extract", FIXTURES / "tiny.toml", "--out", tmp_path / "file" / "s.zarr")  # through the CLI: one line, exit 1
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and "lock file" in result.output, result.output


def test_a_link_where_the_lock_file_goes_is_refused_and_its_target_kept(tiny_store, tmp_path):
    """The lock file was opened through a link at its name (``.t.zarr.kdcache-lock -> notes.txt``, in a folder a team
    shares): extract, import, train, pack and export emptied the link's target, wrote their holder line into it and
    deleted the link. Each is refused in one line naming the link and its target, which is kept."""
    store = tmp_path / "t.zarr"
    shutil.copytree(tiny_store, store)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    lock_file(store).symlink_to(notes)
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / ".run.kdcache-lock").symlink_to(notes)
    for args in (["extract", FIXTURES / "tiny.toml", "--out", store], ["pack", store, tmp_path / "t.zarr.zip"],
                 ["export", store, tmp_path / "t.h5"], ["train", FIXTURES / "tiny.toml", "--cache", store, "--out", run]):
        result = invoke(*args)
        named = lock_file(store) if args[0] != "train" else tmp_path / ".run.kdcache-lock"
        assert result.exit_code == 1 and result.stderr == (
            f"Error: cannot lock {str(run if args[0] == 'train' else store)!r}: its lock file "
            f"{str(named)!r} is a link (to {str(notes)!r}), whose target kdcache would overwrite; remove the link (kdcache makes "
            "the file itself) and rerun (nothing was changed)\n"), (args[0], result.output)
        assert notes.read_text() == "keep me" and named.is_symlink(), args[0]
    assert not (tmp_path / "t.zarr.zip").exists() and not (tmp_path / "t.h5").exists()


def test_pack_and_export_of_a_store_being_written_are_refused(tiny_store, tmp_path, brief_looks):
    """pack and export read a store without looking at its writer lock: one racing an extract --overwrite of the store
    could copy objects of two stores into one file. They are refused at the start, as the writers are."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    with writer_lock(copy):  # another job writing the store
        assert_refused(invoke("pack", copy, tmp_path / "t.zarr.zip"), copy, f"kdcache pid {os.getpid()} on ")
        assert_refused(invoke("export", copy, tmp_path / "t.h5"), copy, f"kdcache pid {os.getpid()} on ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.zarr"], "a refused pack or export writes nothing"
    assert invoke("pack", copy, tmp_path / "t.zarr.zip").exit_code == 0


class PausedCopy(threading.Thread):
    """``copy()`` (a pack or export, in this process) in a thread of its own, held as it reads the store's first object
    until ``finish()``; ``finish()`` returns what it returned (raises what it raised)."""

    def __init__(self, monkeypatch, copy):
        super().__init__(daemon=True)
        self.copy, self.reading, self.go, self.result, self.error = copy, threading.Event(), threading.Event(), None, None
        real = interop._reading

        @contextlib.contextmanager
        def paused(store, what):
            if threading.current_thread() is self and not self.reading.is_set():
                self.reading.set()
                assert self.go.wait(120)
            with real(store, what):
                yield

        monkeypatch.setattr(interop, "_reading", paused)
        self.start()
        assert self.reading.wait(60), "the copy never began reading the store"

    def run(self):
        try:
            self.result = self.copy()
        except BaseException as e:  # noqa: BLE001 - raised by finish()
            self.error = e

    def finish(self):
        self.go.set()
        self.join(120)
        if self.error is not None:
            raise self.error
        return self.result


@pytest.mark.parametrize("verb, name", [("pack", "t.zarr.zip"), ("export", "t.h5")])
def test_a_writer_that_starts_while_a_store_is_packed_or_exported_is_refused(tiny_store, tmp_path, monkeypatch, verb, name):
    """pack and export looked at the writer lock only as they began: an extract --overwrite of the store (float32 targets
    now) started while they copied it, a real second process, rewrote the store under them, and the file held the manifest
    of one moment and the shards of another. They hold the lock, shared, until the file is in place: the writer is refused
    in one line naming the copy; another copy of the store, and `info`, run alongside; the file is the store's."""
    import kdcache

    copy, out = tmp_path / "copy.zarr", tmp_path / name
    shutil.copytree(tiny_store, copy)
    before = kdcache.open_store(str(copy)).manifest
    paused = PausedCopy(monkeypatch, lambda: interop.pack(copy, out) if verb == "pack" else interop.export_hdf5(copy, out))
    try:
        writer = subprocess.run([sys.executable, "-m", "kdcache.cli", "extract", FIXTURES / "tiny.toml", "--out", copy, "--overwrite",
                                 "--set", "targets.dtype=float32", "--no-progress"], capture_output=True, text=True, timeout=300)
        assert writer.returncode == 1 and "Traceback" not in writer.stderr, writer.stderr
        assert writer.stderr.strip() == (f"Error: {str(copy)!r} is being copied by kdcache pack or export (the last to start: kdcache {verb} "
                                         f"pid {os.getpid()} on {socket.gethostname()} since {writer.stderr.split(' since ')[1].split(')')[0]}); "
                                         "wait for the copies to end, then rerun (nothing was changed)"), writer.stderr
        assert active_writer(copy) is None and invoke("pack", copy, tmp_path / "other.zarr.zip").exit_code == 0  # copies run alongside
    finally:
        result = paused.finish()
    assert result["out"] == str(out) and not lock_file(copy).exists(), "the last copy removes the lock file"
    assert kdcache.open_store(str(copy)).manifest == before, "the store was not rewritten"
    imported = tmp_path / "back.zarr"
    assert invoke("import", out, imported).exit_code == 0 if verb == "export" else True
    back = kdcache.open_store(str(imported if verb == "export" else out))
    assert without_times(back.manifest) == without_times(before)
    assert read_store(copy)[1][layout.LOGITS].tolist() == back.read(layout.LOGITS, 0, back.num_samples).tolist()
    with writer_lock(copy):  # writers start again once the copy ended
        pass


def test_a_writer_refused_by_copies_is_not_told_that_one_which_ended_writes_the_store(tmp_path, brief_looks):
    """Copies of a store write their names into its lock file in turn: once the last to start had ended (or was killed,
    here) while another copy went on, a writer was refused as if that dead process wrote the store ('is being written by
    kdcache export pid P ...; stop it'). A shared hold is told from a writer's: the copies are named as such."""
    store = tmp_path / "s.zarr"
    pack = hold_lock(str(store), verb="pack")
    export = hold_lock(str(store), verb="export")
    try:
        kill_9(export)
        copied = (rf"^{str(store)!r} is being copied by kdcache pack or export \(the last to start: kdcache export pid {export.pid} on "
                  r".*\); wait for the copies to end, then rerun \(nothing was changed\)$")
        with pytest.raises(layout.StoreError, match=copied):
            with writer_lock(store):
                pass
        result = invoke("extract", FIXTURES / "tiny.toml", "--out", store)  # its check before the teacher is built
        assert result.exit_code == 1 and re.match(copied, result.stderr.strip().removeprefix("Error: ")), result.output
        assert active_writer(store) is None, "copies are no writer"
    finally:
        kill_9(pack)
    with writer_lock(store):
        pass


def read_only_run(folder: Path, mount: Path, *args: object) -> subprocess.CompletedProcess:
    """``python -m kdcache.cli ARGS`` with ``folder`` mounted read-only at ``mount`` (a bind mount in a mount namespace of
    its own, as a container sees a dataset volume mounted ``:ro``); skipped where such a namespace cannot be made."""
    mount.mkdir(exist_ok=True)
    script = 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"'
    mounted = ["unshare", "-rm", "sh", "-c", script, "sh", str(folder), str(mount)]
    probe = subprocess.run([*mounted, "true"], capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"no read-only bind mount here: {probe.stderr.strip() if probe else 'no unshare'}")
    return subprocess.run([*mounted, sys.executable, "-m", "kdcache.cli", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_a_store_on_a_read_only_mount_is_not_packed_while_being_written(tiny_store, tmp_path):
    """A store mounted read-only where pack runs (a container's ``:ro`` volume) and written where it is mounted writable:
    opening the lock file to create it failed (read-only file system, not 'permission denied'), and pack copied the store
    without looking at the lock at all, while the writer wrote (before reading_lock, the check at its start refused it).
    The lock file is now locked read-only; with none there, pack says that writers are not kept out."""
    folder = tmp_path / "rw"
    shutil.copytree(tiny_store, folder / "s.zarr")
    holder = hold_lock(str(folder / "s.zarr"))
    try:
        refused = read_only_run(folder, tmp_path / "ro", "pack", tmp_path / "ro" / "s.zarr", tmp_path / "a.zarr.zip")
        assert refused.returncode == 1 and refused.stderr.startswith(f"Error: {str(tmp_path / 'ro' / 's.zarr')!r} is being written by "
                                                                     f"kdcache pid {holder.pid} on "), refused.stderr
        assert not (tmp_path / "a.zarr.zip").exists()
    finally:
        kill_9(holder)
    lock_file(folder / "s.zarr").unlink()  # none there, and none can be made: a note
    packed = read_only_run(folder, tmp_path / "ro", "pack", tmp_path / "ro" / "s.zarr", tmp_path / "a.zarr.zip")
    assert packed.returncode == 0 and packed.stderr.startswith(f"note: {str(tmp_path / 'ro' / 's.zarr')!r} is read by pack without "
                                                               "keeping writers out (its lock file "), packed.stderr


def test_a_writer_that_starts_while_an_s3_store_is_packed_is_refused(s3, tiny_store, tmp_path, monkeypatch):
    """An S3 store has no shared lock: pack holds its writer lock object, under its own name, until the zip is in place."""
    import kdcache

    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/packed.zarr"
    fs.put(str(tiny_store), f"{S3_BUCKET}/packed.zarr", recursive=True)
    lock = f"{S3_BUCKET}/.packed.zarr.kdcache-lock"
    paused = PausedCopy(monkeypatch, lambda: interop.pack(url, tmp_path / "t.zarr.zip", storage_options=s3))
    try:
        assert json.loads(read_object(fs, lock))["holder"].startswith(f"kdcache pack pid {os.getpid()} on ")
        with pytest.raises(layout.StoreError, match=rf"^{url!r} is being written by kdcache pack pid {os.getpid()} on .*; "
                                                    r"wait for it to end or stop it, then rerun \(nothing was changed\)$"):
            with writer_lock(url, s3):
                pass
    finally:
        paused.finish()
    assert read_object(fs, lock) is None, "removed once the zip is in place"
    assert kdcache.open_store(str(tmp_path / "t.zarr.zip")).complete


def test_an_s3_pack_whose_lock_was_late_but_kept_is_put_in_place_and_one_taken_over_is_not(s3, tiny_store, tmp_path, monkeypatch):
    """A pack paused past the point where its lock may be taken over (Ctrl-Z, a laptop asleep: its heartbeat late) failed
    at its end ('lost its hold ... not renewed for N s') though nobody had taken the lock, the whole copy thrown away: the
    lock, renewed as it was (If-Match its last version), shows that no writer came meanwhile, as a writer's late lock is
    renewed before its next shard. One taken over meanwhile, by a real second process, still fails, the taker's lock left."""
    monkeypatch.setattr(locking, "LOCK_HEARTBEAT_S", 60)  # paused: no heartbeat while the test runs
    monkeypatch.setattr(locking, "LOCK_LATE_S", 0.5)
    monkeypatch.setattr(locking, "LOCK_STALE_S", 5.6)  # less LOCK_REQUEST_S: taken over, as this process fears, after 0.6 s
    monkeypatch.setattr(locking, "LOCK_REQUEST_S", 5.0)
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/late.zarr"
    fs.put(str(tiny_store), f"{S3_BUCKET}/late.zarr", recursive=True)
    lock = f"{S3_BUCKET}/.late.zarr.kdcache-lock"
    paused = PausedCopy(monkeypatch, lambda: interop.pack(url, tmp_path / "kept.zarr.zip", storage_options=s3))
    time.sleep(0.8)
    assert paused.finish()["out"] == str(tmp_path / "kept.zarr.zip") and read_object(fs, lock) is None

    paused = PausedCopy(monkeypatch, lambda: interop.pack(url, tmp_path / "lost.zarr.zip", storage_options=s3))
    time.sleep(2.2)
    taker = hold_lock(url, s3, stale_s=1.5)  # a writer that finds the lock stale
    try:
        with pytest.raises(layout.StoreError, match=rf"^{url!r}: pack lost its hold on the store's writer lock while copying it \(kdcache "
                                                    rf"pid {taker.pid} on .* took it over\), so a writer may have changed it meanwhile; "
                                                    r"nothing was written; rerun kdcache pack$"):
            paused.finish()
        assert json.loads(read_object(fs, lock))["holder"].startswith(f"kdcache pid {taker.pid} on "), "the taker's lock stays"
    finally:
        taker.stdin.close()  # the taker's block ends: its lock removed
        assert taker.wait(timeout=30) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["kept.zarr.zip"] and read_object(fs, lock) is None


def test_a_second_train_into_the_same_out_is_refused(tiny_store, tmp_path, brief_looks, monkeypatch):
    """A second run into the OUT of a run still going was told the folder "is being written by kdcache pid …", as a store
    is: a training run's lock names it as train, and the refusal says the folder is a training run's."""
    import importlib

    training = importlib.import_module("kdcache.train")  # the module (kdcache.train is the function)
    check_out, holders = training._check_out, []
    monkeypatch.setattr(training, "_check_out", lambda out, *a: (holders.append(lock_file(out).read_text() if lock_file(out).exists()
                                                                                else None), check_out(out, *a))[1])
    out = tmp_path / "run"
    args = ("train", FIXTURES / "tiny.toml", "--cache", tiny_store, "--out", out, "--set", "train.epochs=1", "--no-progress")
    assert invoke(*args).exit_code == 0
    assert holders[-1].startswith(f"kdcache train pid {os.getpid()} on "), holders  # checked again under its lock
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with writer_lock(out, verb="train"):  # another run of that OUT
        for result in (invoke(*args, "--overwrite"), invoke(*args, "--resume", "--set", "train.epochs=2")):
            assert result.exit_code == 1, result.output
            assert re.fullmatch(rf"Error: {re.escape(repr(str(out)))} is the output folder of a training run still going \(kdcache "
                                rf"train pid {os.getpid()} on {re.escape(socket.gethostname())} since [^)]+\); wait for it to end or "
                                r"stop it, then rerun \(nothing was changed\)\n", result.stderr), result.output
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


def test_pack_and_export_on_a_file_system_without_flock_copy_unlocked_and_leave_no_lock_file(tmp_path, tiny_store, monkeypatch):
    """pack and export keep writers out with a shared flock on the lock file (``reading_lock``); where flock is refused
    (ENOLCK, injected as above) they copied the store unlocked, as a writer writes it, but left the lock file they had
    created beside it (an empty ``.NAME.kdcache-lock`` after every copy); a writer there removes its own. A lock file left
    there (a store moved from another file system) does not make a look at it (``info``) fail."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    for command, out in (("pack", tmp_path / "s.zarr.zip"), ("export", tmp_path / "s.h5")):
        result = invoke(command, store, out)
        assert result.exit_code == 0 and out.exists(), result.output
        assert not lock_file(store).exists(), command
    lock_file(store).write_text("kdcache pid 4242 on elsewhere since 2026-11-29T00:00:00+00:00")
    assert active_writer(store) is None  # not known without flock: the text alone is no writer
    result = invoke("info", store)
    assert result.exit_code == 0 and "being written" not in result.output, result.output


def test_a_refused_job_builds_no_teacher(tmp_path, tiny_store, brief_looks):
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
    result = invoke("info", out)  # its writer gone: an extract stopped as it created the store
    assert result.exit_code == 1 and "is an empty zarr group, as an extract stopped while it created the store" in result.output, result.output


# ------------------------------------------------------------------ object stores: a lock object made by a conditional PUT

def s3_files(options: dict):
    import s3fs

    return s3fs.S3FileSystem(**options, skip_instance_cache=True)


def read_object(fs, key: str) -> bytes | None:
    """The object's bytes, or None: asked of the server, not of s3fs's listing cache."""
    fs.invalidate_cache()
    return fs.cat_file(key) if fs.exists(key) else None


def objects(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {key: fs.cat_file(key) for key in fs.find(prefix)}


def stale_holder(fs, key: str) -> None:
    """A lock object as a writer killed without a word (SIGKILL, a preempted node) leaves it."""
    fs.pipe_file(key, json.dumps({"holder": "kdcache pid 4242 on gone-host since 2026-01-01T00:00:00+00:00",
                                  "heartbeat": "2026-01-01T00:00:00+00:00"}).encode())


def test_a_second_writer_of_an_s3_store_is_refused_through_the_cli(s3, tmp_path, zoo_env):
    """Another job holds the lock (a process of its own): ``info`` and ``verify`` name it, ``extract`` (plain and
    ``--overwrite``) is refused in one line, exit 1, changing nothing; once the holder ends, the extract resumes."""
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/refused.zarr"
    lock = f"{S3_BUCKET}/.refused.zarr.kdcache-lock"
    toml = write_toml(tmp_path / "p.toml")
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    zoo_env(FAIL_AT=42)
    result = invoke("extract", toml, "--out", url, *options)
    assert result.exit_code == 1 and "simulated crash fetching index 42" in result.output, result.output
    assert read_object(fs, lock) is None, "a run that failed leaves no lock object"
    zoo_env(FAIL_AT=None)
    before = objects(fs, url)
    holder = subprocess.Popen([sys.executable, "-c", "import json, sys\nfrom kdcache.locking import writer_lock\n"
                               "with writer_lock(sys.argv[1], json.loads(sys.argv[2])):\n    print('held', flush=True)\n"
                               "    sys.stdin.readline()", url, json.dumps(s3)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = f"kdcache pid {holder.pid} on "
        assert active_writer(url, s3).startswith(who)
        info = invoke("info", url, "--json", *options)
        assert info.exit_code == 0 and json.loads(info.stdout)["writer"].startswith(who), info.output
        verify = invoke("verify", url, *options)
        assert verify.exit_code == 1 and f"shards done, being written by {who}" in verify.stdout, verify.output
        for extra in ([], ["--overwrite"]):
            assert_refused(invoke("extract", toml, "--out", url, *options, *extra), url, who)
        assert objects(fs, url) == before, "a refused run changes nothing"
        holder.stdin.close()  # the holder's block ends
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    assert read_object(fs, lock) is None, "its holder removes the lock object at the end"
    result = invoke("extract", toml, "--out", url, *options)
    assert result.exit_code == 0 and "resumed" in result.output, result.output
    assert read_object(fs, lock) is None


def test_an_s3_store_that_cannot_be_reached_is_named_before_the_teacher_is_built(tmp_path):
    """Looking for another writer's lock is the first request to the store: one that cannot be reached is said then,
    not after minutes of building a teacher."""
    sentinel = tmp_path / "teacher-was-built"
    (tmp_path / "slow_teacher.py").write_text(f"import pathlib\n\ndef teacher():\n    pathlib.Path({str(sentinel)!r}).touch()\n")
    toml = write_toml(tmp_path / "p.toml", f'teacher.factory="{tmp_path / "slow_teacher.py"}:teacher"')
    result = invoke("extract", toml, "--out", f"s3://{S3_BUCKET}/x.zarr", "--storage-option", "endpoint_url=http://127.0.0.1:9",
                    "--storage-option", "config_kwargs.retries.max_attempts=1", "--storage-option", "key=testing",
                    "--storage-option", "secret=testing")  # nothing listens there
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"Error: cannot reach 's3://{S3_BUCKET}/x.zarr': ") and "check the URL" in result.output, result.output
    assert not sentinel.exists()


@pytest.mark.parametrize("theirs, tries, wait", [((), 2, 0.5), (("config_kwargs.read_timeout=1", "config_kwargs.retries.max_attempts=0"), 1, 1)],
                         ids=["probe-defaults", "user-options-win"])
def test_an_s3_endpoint_that_never_answers_is_named_within_the_probe_timeouts(tmp_path, monkeypatch, silent_endpoint, theirs, tries, wait):
    """An endpoint that takes the connection and never answers held extract for minutes (s3fs's passes of botocore's
    tries of 15 s). The look for another writer's lock gives up after ``PROBE_ATTEMPTS`` tries of ``PROBE_READ_S``, or
    the user's own config_kwargs, says so in one line and names the setting to raise; no teacher is built."""
    monkeypatch.setattr(storage, "PROBE_CONNECT_S", 1.0)
    monkeypatch.setattr(storage, "PROBE_READ_S", 0.5)  # the endpoint never answers: any wait gives up
    monkeypatch.setattr(storage, "PROBE_ATTEMPTS", 2)
    endpoint, held = silent_endpoint
    sentinel = tmp_path / "teacher-was-built"
    (tmp_path / "slow_teacher.py").write_text(f"import pathlib\n\ndef teacher():\n    pathlib.Path({str(sentinel)!r}).touch()\n")
    toml = write_toml(tmp_path / "p.toml", f'teacher.factory="{tmp_path / "slow_teacher.py"}:teacher"')
    options = [f"--storage-option={o}" for o in (f"endpoint_url={endpoint}", "key=testing", "secret=testing", *theirs)]
    result = invoke("extract", toml, "--out", f"s3://{S3_BUCKET}/x.zarr", *options)
    returned = time.monotonic()
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert re.match(rf"Error: cannot reach 's3://{S3_BUCKET}/x.zarr': Read timeout on endpoint URL: .*; gave up after \d+ s "
                    rf"\({tries} tr(y|ies) of up to {wait} s each\); for an endpoint that is slow rather than down raise "
                    r"--storage-option config_kwargs.read_timeout=SECONDS; check the URL", result.output), result.output
    assert not sentinel.exists()
    assert len(held) == tries, "one connection a try: s3fs does not try again on top of botocore"
    # from its first try, not from the command's start (with it, 7-11 s against bounds of 6 and 9 s in 4 of 20 runs beside
    # a CI run and busy loops): a try waits `wait`; botocore's backoff between tries is under 1 s
    took = returned - held.times[0]
    assert took < 3 * tries * (wait + 1), f"{took:.1f} s"


def test_the_probe_of_an_s3_lock_has_a_filesystem_of_its_own(s3):
    """The short timeouts are for the first look only: the data moves through fsspec's usual (cached) filesystem."""
    from kdcache.locking import _lock_object
    from kdcache.storage import filesystem

    url = f"s3://{S3_BUCKET}/probed.zarr"
    usual = filesystem(url, s3)[0]
    probe = _lock_object(url, {**s3, "config_kwargs": {"read_timeout": 30}}, probe=True)[0]
    assert probe is not usual and filesystem(url, s3)[0] is usual and _lock_object(url, s3)[0] is usual
    pool = {"max_pool_connections": storage.S3_POOL}  # kdcache's where the user sets none (Store._remote_rows)
    assert probe.retries == 1 and probe.config_kwargs == {"connect_timeout": storage.PROBE_CONNECT_S, "read_timeout": 30,
                                                          "retries": {"max_attempts": storage.PROBE_ATTEMPTS - 1}, **pool}
    assert usual.retries == 5 and usual.config_kwargs == pool, "s3fs's defaults for the data, but its pool of connections"
    locking.refuse_if_being_written(url, s3)  # a healthy store: nobody writes it
    with writer_lock(url, s3):
        with pytest.raises(layout.StoreError, match=r"is being written by kdcache pid"):
            locking.refuse_if_being_written(url, s3)


def test_an_s3_lock_is_an_object_beside_the_store_gone_at_the_end(s3):
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/runs/b.zarr"
    lock = f"{S3_BUCKET}/runs/.b.zarr.kdcache-lock"
    with writer_lock(url, s3):
        body = json.loads(read_object(fs, lock))
        assert body["holder"].startswith(f"kdcache pid {os.getpid()} on ") and body["heartbeat"], body
        assert active_writer(url, s3).startswith(f"kdcache pid {os.getpid()} on ")
        with pytest.raises(layout.StoreError, match=rf"^'s3a://{S3_BUCKET}/runs/b.zarr/' is being written by kdcache pid {os.getpid()} on "
                                                    r".*, last heartbeat \d+ s ago \(taken over after 180 s without one\); "
                                                    r"wait for it to end or stop it, then rerun \(nothing was changed\)$"):
            with writer_lock(f"s3a://{S3_BUCKET}/runs/b.zarr/", s3):  # the same store, spelt otherwise
                pass
    assert read_object(fs, lock) is None and active_writer(url, s3) is None
    with pytest.raises(RuntimeError, match="failed while writing"):
        with writer_lock(url, s3):
            raise RuntimeError("failed while writing")
    assert read_object(fs, lock) is None, "removed after an error too"
    # not locked: a store at a bucket's root (its lock would be inside it), a zip (read-only), other fsspec backends
    for location, options in ((f"s3://{S3_BUCKET}", s3), (f"zip::s3://{S3_BUCKET}/c.zarr.zip", s3), ("memory://c.zarr", None)):
        with writer_lock(location, options):
            assert active_writer(location, options) is None
    assert not [key for key in objects(fs, S3_BUCKET) if key.endswith(".kdcache-lock")]


def test_a_stale_s3_lock_is_taken_over_and_a_live_one_is_not(s3, monkeypatch):
    """Staleness is judged by the server's clock: the lock object not rewritten for LOCK_STALE_S (shortened here).

    The fresh lock is looked at with a LOCK_STALE_S of a minute: with 1.5 s, a loaded machine's first look (the S3
    client made, the endpoint probed) came 2 s after the lock's write by the server's whole seconds, and found it stale."""
    monkeypatch.setattr(locking, "LOCK_HEARTBEAT_S", 0.2)
    monkeypatch.setattr(locking, "LOCK_STALE_S", 60)
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/stale.zarr"
    lock = f"{S3_BUCKET}/.stale.zarr.kdcache-lock"
    stale_holder(fs, lock)
    assert active_writer(url, s3).startswith("kdcache pid 4242 on gone-host since ")  # fresh: its holder may live
    with pytest.raises(layout.StoreError, match="is being written by kdcache pid 4242 on gone-host since"):
        with writer_lock(url, s3):
            pass
    monkeypatch.setattr(locking, "LOCK_STALE_S", 1.5)
    time.sleep(2.2)
    assert active_writer(url, s3) is None, "a stale lock names no writer"
    with writer_lock(url, s3):  # taken over
        first = json.loads(read_object(fs, lock))
        assert first["holder"].startswith(f"kdcache pid {os.getpid()} on ")
        # a lock is stale at 2 s by the server's whole seconds with 1.5, which a heartbeat 1 s late (a loaded box) may show:
        # with 3, past 2 s late only
        monkeypatch.setattr(locking, "LOCK_STALE_S", 3)
        # past LOCK_STALE_S from its first write, our heartbeat keeps it live: waited for on the renewals themselves (when
        # each one's PUT was sent), not a sleep of 3.5 s in which a loaded box's in-process S3 server must answer one
        lease = locking.held_lease(url, s3)
        renewals, deadline = [lease.renewed], time.monotonic() + 120
        while renewals[-1] - renewals[0] <= locking.LOCK_STALE_S:
            assert time.monotonic() < deadline, f"renewed {len(renewals) - 1} times in 120 s (every {locking.LOCK_HEARTBEAT_S} s)"
            if lease.renewed != renewals[-1]:
                renewals.append(lease.renewed)
            time.sleep(0.01)
        # its period, from the renewals' own times: the quickest of them (a loaded box only makes them later) well within
        # LOCK_STALE_S, as a heartbeat every LOCK_HEARTBEAT_S is (one as slow as LOCK_STALE_S lets the lock go stale)
        gaps = [later - earlier for earlier, later in zip(renewals, renewals[1:])]
        assert min(gaps) < locking.LOCK_STALE_S / 2, f"renewed every {min(gaps):.1f} s at the quickest ({len(gaps)} renewals)"
        assert json.loads(read_object(fs, lock))["heartbeat"] > first["heartbeat"], "the lock object rewritten"
        with pytest.raises(layout.StoreError, match=f"is being written by kdcache pid {os.getpid()} on "):
            with writer_lock(url, s3):
                pass
    assert read_object(fs, lock) is None


def test_a_writer_whose_s3_lock_was_taken_over_fails_at_the_end(s3, monkeypatch):
    """A writer paused (or cut off from the store) past LOCK_STALE_S loses its lock to the next writer: it says so
    when its block ends, or at its next heartbeat, instead of reporting success; it removes no lock but its own."""
    monkeypatch.setattr(locking, "LOCK_STALE_S", 1.5)
    monkeypatch.setattr(locking, "LOCK_HEARTBEAT_S", 60)  # paused: no heartbeat while the test runs
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/lost.zarr"
    lock = f"{S3_BUCKET}/.lost.zarr.kdcache-lock"
    paused = writer_lock(url, s3)
    paused.__enter__()
    time.sleep(2.2)
    taker = writer_lock(url, s3)
    taker.__enter__()
    with pytest.raises(layout.StoreError, match=rf"^'s3://{S3_BUCKET}/lost.zarr' lost its writer lock while being written: kdcache pid "
                                                r"\d+ on .* took it over, as this job had not renewed it for 2 s .*once that job has ended, "
                                                r"rerun with overwrite=True$"):
        paused.__exit__(None, None, None)
    assert json.loads(read_object(fs, lock))["holder"].startswith(f"kdcache pid {os.getpid()} on "), "the taker's lock stays"
    taker.__exit__(None, None, None)
    assert read_object(fs, lock) is None

    monkeypatch.setattr(locking, "LOCK_HEARTBEAT_S", 0.1)
    with pytest.raises(layout.StoreError, match="lost its writer lock while being written: another writer took it over"):
        with writer_lock(url, s3):
            fs.rm_file(lock)  # removed by someone: the next heartbeat's PUT (If-Match) is refused
            time.sleep(0.5)
    assert read_object(fs, lock) is None


def test_a_paused_extract_whose_s3_lock_was_taken_over_writes_no_more_shards(s3, tmp_path, zoo_env):
    """A job suspended past LOCK_STALE_S (Ctrl-Z, a laptop's sleep, a VM paused) lost its lock to another job; resumed,
    it wrote on to the end of the store over the other job's shards, learning of the loss only at its end. It now
    renews its late lock before its next shard, finds it taken over, and stops in one line (exit 1): only the shards
    being written when it was paused are finished. It is held at shard 21's first item until it is resumed: a loaded
    box may write all 30 shards (2.4 s) before the test's SIGSTOP, and the shards in flight (WRITE_THREADS, up to 8) must
    leave some unwritten."""
    from kdcache.extract import WRITE_THREADS

    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/paused.zarr"
    lock = f"{S3_BUCKET}/.paused.zarr.kdcache-lock"
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    shortened = "from kdcache import locking; locking.LOCK_STALE_S = 1.5; locking.LOCK_HEARTBEAT_S = 0.3; locking.LOCK_LATE_S = 0.6\n" \
                "from kdcache.cli import main; main()"
    hold = tmp_path / "hold"
    hold.touch()
    proc = slow_extract(toml, url, storage_options=s3, command=[sys.executable, "-c", shortened], held=(hold, 168))
    try:
        proc.send_signal(signal.SIGSTOP)  # paused
        paused_at = shards_done(url, s3)
        time.sleep(2.5)  # its lock is stale by the server's clock
        with pytest.MonkeyPatch.context() as m:
            m.setattr(locking, "LOCK_STALE_S", 1.5)
            with writer_lock(url, s3):  # another job takes it over
                taker = json.loads(read_object(fs, lock))["holder"]
                proc.send_signal(signal.SIGCONT)
                hold.unlink()
                assert proc.wait(timeout=60) == 1
                assert json.loads(read_object(fs, lock))["holder"] == taker, "the taker's lock is left alone"
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    lines = proc.stderr.read().decode().strip().splitlines()
    # its renewal refused (the taker named), or, where the pause caught a renewal in flight (its request timed out on
    # SIGCONT, and the writer found it failed just now), the lock not renewable in time: one line either way
    taken = rf"Error: '{url}' lost its writer lock while being written: kdcache pid {os.getpid()} on .* took it over, as this job had not renewed it for 2 s"
    late = rf"Error: '{url}': cannot renew this job's writer lock \(last renewed \d+ s ago, taken over by another job after 2 s\): .*nothing more was written"
    assert len(lines) == 1 and (re.match(taken, lines[0]) or re.match(late, lines[0])), lines
    done = shards_done(url, s3)
    assert paused_at <= done <= paused_at + WRITE_THREADS < 30, (paused_at, done)  # before: all 30


def test_a_late_s3_lock_is_renewed_before_the_next_write_and_a_retried_put_is_still_ours(s3, monkeypatch):
    """A writer whose heartbeat is late (paused, but nobody took its lock) renews it before it writes on, and goes
    on. A renewal whose answer was lost and which botocore sent again is refused (the first try changed the ETag)
    though the lock is still ours: that is not a takeover (before, the job failed at its end naming itself as taker)."""
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/late.zarr"
    lock = f"{S3_BUCKET}/.late.zarr.kdcache-lock"
    monkeypatch.setattr(locking, "LOCK_HEARTBEAT_S", 60)  # no heartbeat: late
    with writer_lock(url, s3):
        lease = locking.held_lease(url, s3)
        assert lease is not None and list(locking._LEASES.values()) == [lease]
        before = (lease.etag, lease.renewed)
        lease.check(url)  # not late yet (LOCK_LATE_S as it is: with 0.3 s, a loaded machine got here late): nothing sent
        assert (lease.etag, lease.renewed) == before
        monkeypatch.setattr(locking, "LOCK_LATE_S", 0.3)
        time.sleep(0.5)
        lease.check(url)
        assert lease.renewed > before[1] and lease.lost_to is None  # the ETag is the body's MD5: the same within a second
        ours = json.dumps({"holder": lease.holder, "heartbeat": "a moment later", "token": lease.token}).encode()
        landed = fs.call_s3("put_object", Bucket=S3_BUCKET, Key=lock.partition("/")[2], Body=ours)
        assert landed["ETag"] != lease.etag  # our renewal's first try, whose answer was lost
        time.sleep(0.5)
        lease.check(url)  # its retry is refused: still ours
        assert lease.lost_to is None and lease.etag == fs.info(lock, refresh=True)["ETag"] != landed["ETag"], "that version renewed"
        time.sleep(0.5)
        lease.check(url)
        assert lease.lost_to is None and lease.etag == fs.info(lock, refresh=True)["ETag"] != landed["ETag"]
        fs.call_s3("put_object", Bucket=S3_BUCKET, Key=lock.partition("/")[2], Body=ours.replace(b"a moment", b"two moments"))
    assert read_object(fs, lock) is None, "ours in a version the writer never saw: deleted at the end, without an error"


def test_a_lease_on_an_endpoint_that_stopped_answering_gives_up(silent_endpoint, monkeypatch):
    """aiohttp waits for a silent server's 100 Continue to a PUT without end: the heartbeat's PUT would hang, and the
    writer with it once it must renew; the lock's DELETE at the end waited out s3fs's retries (still waiting after 300 s).
    A request about the lock gives up after LOCK_REQUEST_S; a writer that cannot renew a lock that may be stale by now
    stops, saying so; the lock object is then left behind (taken over once stale)."""
    monkeypatch.setattr(locking, "LOCK_REQUEST_S", 1.0)
    endpoint, held = silent_endpoint
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "skip_instance_cache": True}
    fs, _ = storage.filesystem(f"s3://{S3_BUCKET}/silent.zarr", options)
    fs.connect()  # its client made beforehand: within the 1 s given, the PUT is sent and waits
    lease = locking.Lease(fs, S3_BUCKET, ".silent.zarr.kdcache-lock", "me", "token", '"etag"', locking._clock())
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        lease.renew()
    assert time.monotonic() - started < 10 and held
    lease.renewed -= locking.LOCK_LATE_S + 1  # late, not yet possibly stale: written on (the data's writes will say more)
    lease.failed = 0.0  # not just now
    lease.check("s3://x")
    lease.renewed -= locking.LOCK_STALE_S
    lease.failed = 0.0
    with pytest.raises(layout.StoreError, match=r"^'s3://x': cannot renew this job's writer lock \(last renewed \d+ s ago, taken over "
                                                r"by another job after 180 s\): no answer within 1 s; nothing more was written; check that the store "
                                                r"can be reached, then rerun to resume$"):
        lease.check("s3://x")
    # another writer thread just after (within LOCK_REQUEST_S of that failure, 1 s: a loaded box may take longer to get
    # here, and the try was made again, "no answer within 1 s"; 60 s here): the failed try is not made again
    monkeypatch.setattr(locking, "LOCK_REQUEST_S", 60.0)
    started = time.monotonic()
    with pytest.raises(layout.StoreError, match=r"\): its renewals failed; nothing more was written"):
        lease.check("s3://x")
    assert time.monotonic() - started < 30  # a try made again waits 60 s
    monkeypatch.setattr(locking, "LOCK_REQUEST_S", 1.0)
    started = time.monotonic()
    lease.release()
    assert time.monotonic() - started < 10 and lease.lost_to is None


@pytest.mark.parametrize("stale", [False, True], ids=["absent", "stale"])
def test_writers_racing_for_an_s3_lock_exactly_one_wins(s3, monkeypatch, stale):
    """Eight writers, each with its own S3 client, ask at once for a lock that is absent (the PUT's If-None-Match
    decides) or stale (the takeover's If-Match decides): one holds it, seven are refused naming it.

    Only the stale holder's lock may look stale: a LOCK_STALE_S of 1.5 s left for the whole race let a writer that
    looked late (a loaded box) find the winner's lock 2 s old, by the server's whole seconds, and take it over too. So
    each writer takes the stale lock over once all eight have judged it stale (all eight race on its If-Match), and
    from then on a lock is stale after the usual LOCK_STALE_S."""
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/race-{stale}.zarr"
    lock = f"{S3_BUCKET}/.race-{stale}.zarr.kdcache-lock"
    if stale:
        usual, take_over = locking.LOCK_STALE_S, locking._take_over
        monkeypatch.setattr(locking, "LOCK_STALE_S", 1.5)
        stale_holder(fs, lock)
        time.sleep(2.2)
        judged = threading.Barrier(8, timeout=60, action=lambda: monkeypatch.setattr(locking, "LOCK_STALE_S", usual))

        def once_all_judged_it_stale(*args):
            judged.wait()
            return take_over(*args)

        monkeypatch.setattr(locking, "_take_over", once_all_judged_it_stale)
    start, tried = threading.Barrier(8, timeout=60), threading.Barrier(8, timeout=60)
    won, refused = [], []

    def writer(i: int) -> None:
        start.wait()
        try:
            with writer_lock(url, {**s3, "skip_instance_cache": True}):
                won.append(i)
                tried.wait()  # held until every writer has tried
                return
        except layout.StoreError as e:
            refused.append(str(e))
        tried.wait()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert len(won) == 1 and len(refused) == 7, (won, refused)
    assert all(f"is being written by kdcache pid {os.getpid()} on " in e for e in refused), refused
    assert read_object(fs, lock) is None


def test_a_job_stopped_by_sigterm_releases_its_s3_lock_at_once(s3, tmp_path, zoo_env):
    """A scheduler's preemption (SIGTERM) must not leave the lock object behind: a requeued job would be refused
    until it went stale (LOCK_STALE_S). The extract stops as Ctrl-C stops it, deleting its lock; the rerun resumes.
    The job is held at the last shard's first item until it is stopped: on a loaded box it once wrote all 10 shards
    between the test seeing 2 done and its SIGTERM (CI, with other tests' processes beside it)."""
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/preempted.zarr"
    lock = f"{S3_BUCKET}/.preempted.zarr.kdcache-lock"
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    hold = tmp_path / "hold"
    hold.touch()
    proc = slow_extract(toml, url, n=80, sleep=0.03, storage_options=s3, held=(hold, 72))  # 10 shards of 0.24 s, the last held
    try:
        assert read_object(fs, lock) is not None, "the job holds its lock"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, proc.stderr.read()
    finally:
        hold.unlink()
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr.read().decode().strip().splitlines() == [
        "Error: stopped by SIGTERM; any shards written are kept: run the same command again to resume"]
    assert read_object(fs, lock) is None
    assert 2 <= layout.open_store(url, storage_options=s3).done().sum() < 10
    zoo_env(N=80)  # the dataset the store was made from, without the sleep
    result = invoke("extract", toml, "--out", url, *options)
    assert result.exit_code == 0 and "resumed" in result.output, result.output


def test_sigterm_to_every_process_of_a_torchrun_job_releases_its_s3_lock(s3, tmp_path, zoo_env):
    """A scheduler's SIGTERM reaches every process of the job (Slurm signals the whole step), torchrun among them,
    and torchrun passes it on to its ranks: each rank gets SIGTERM twice, the second while it is cleaning up. Rank 0
    still deletes its lock object (a requeued job is not refused for LOCK_STALE_S), and only rank 0 speaks. Each rank
    is held at its last shard's first item (shards 48 and 49) until the job is stopped: a loaded box may finish the job
    (4 s), its lock released, between the test seeing 2 shards done and its SIGTERM."""

    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/torchrun-preempted.zarr"
    lock = f"{S3_BUCKET}/.torchrun-preempted.zarr.kdcache-lock"
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    hold = tmp_path / "hold"
    hold.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")} | {"ZOO_N": "400", "ZOO_SLEEP": "0.02", "OMP_NUM_THREADS": "1",
                                                                               "ZOO_HOLD": str(hold), "ZOO_HOLD_AT": "384,392"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--standalone", "-m", "kdcache.cli", "extract", str(toml), "--out", url, *options, "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not done_at_least(url, 2, s3):
            time.sleep(0.05)
        assert read_object(fs, lock) is not None, "rank 0 holds the lock"
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both ranks, as Slurm does
        proc.wait(timeout=90)
    finally:
        hold.unlink()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.stderr.read()
    assert read_object(fs, lock) is None, f"rank 0 left its lock object behind: {stderr[-3000:]}"
    ours = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert ours == ["Error: stopped by SIGTERM; any shards written are kept: run the same command again to resume"], stderr[-3000:]


@pytest.mark.parametrize("when", ["taking it", "starting its heartbeat"])
def test_ctrl_c_as_an_s3_lock_is_taken_leaves_no_lock_object(s3, monkeypatch, when):
    """Ctrl-C (or SIGTERM, which the CLI turns into one) that arrives just as the lock object has been made, before the
    block that removes it is entered, must not leave it behind: a rerun would be refused for LOCK_STALE_S."""
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/interrupted-{when.split()[0]}.zarr"
    lock = f"{S3_BUCKET}/.interrupted-{when.split()[0]}.zarr.kdcache-lock"
    if when == "taking it":
        take = locking._take_object_lock

        def interrupted(*args):
            etag = take(*args)  # made: the PUT succeeded
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, raised as KeyboardInterrupt at once
            return etag

        monkeypatch.setattr(locking, "_take_object_lock", interrupted)
    else:
        start = threading.Thread.start

        def interrupted(self):
            start(self)
            if self.name == "kdcache-lock-heartbeat":
                os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with writer_lock(url, s3):
            pytest.fail("the block never runs")
    assert read_object(fs, lock) is None, "a lock object left behind by an interrupted writer"
    assert not [t for t in threading.enumerate() if t.name == "kdcache-lock-heartbeat"], "its heartbeat outlives it"


# ------------------------------------------------------------------ a holder killed without a word (kill -9) on this machine

def hold_lock(location: str, options: dict | None = None, verb: str | None = None, stale_s: float = locking.LOCK_STALE_S,
              **kwargs) -> subprocess.Popen:
    """A real process holding ``location``'s writer lock (``writer_lock(location, options, **kwargs)``), or holding it as
    ``kdcache VERB`` does while it copies the store (``reading_lock``), until killed. ``stale_s``: its LOCK_STALE_S."""
    take = "locking.reading_lock(sys.argv[1], json.loads(sys.argv[2]), sys.argv[4])" if verb else \
        "locking.writer_lock(sys.argv[1], json.loads(sys.argv[2]), **json.loads(sys.argv[3]))"
    holder = subprocess.Popen([sys.executable, "-c", f"import json, sys\nfrom kdcache import locking\nlocking.LOCK_STALE_S = float(sys.argv[5])\n"
                               f"with {take}:\n    print('held', flush=True)\n    sys.stdin.readline()",
                               location, json.dumps(options), json.dumps(kwargs), str(verb), str(stale_s)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def kill_9(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no finally block runs, the lock object stays
    proc.wait(timeout=30)  # and waited for, as a shell or a scheduler does (a zombie counts as running)


@pytest.mark.slow
def test_an_s3_lock_of_an_extract_killed_on_this_machine_is_taken_over_at_once(s3, tmp_path, zoo_env):
    """``kill -9`` (the OOM killer, a hung job killed) leaves the lock object behind: rerunning the job on the same machine
    was refused for LOCK_STALE_S (180 s). The lock records its holder's boot, PID namespace, pid and start time; that
    process gone from this machine, the rerun takes the lock over at once, says so in a note, and resumes."""
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/killed.zarr"
    lock = f"{S3_BUCKET}/.killed.zarr.kdcache-lock"
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    hold = tmp_path / "hold"  # the last shard's first item waits for the kill: a loaded box may write all 10 before it
    hold.touch()
    proc = slow_extract(toml, url, n=80, sleep=0.03, storage_options=s3, held=(hold, 72))  # 10 shards of 0.24 s, the last held
    try:
        record = json.loads(read_object(fs, lock))["process"]
        assert record["pid"] == proc.pid and record["alone"] is True and set(record) == {"pid", "boot_id", "pid_ns", "start", "alone"}
        assert active_writer(url, s3).startswith(f"kdcache pid {proc.pid} on "), "alive: it is the writer"
    finally:
        kill_9(proc)
        hold.unlink()
    assert read_object(fs, lock) is not None, "left behind"
    assert active_writer(url, s3) is None, "its holder is gone: nobody writes the store"
    zoo_env(N=80)
    started = time.monotonic()
    result = invoke("extract", toml, "--out", url, *[f"--storage-option={k}={v}" for k, v in s3.items()])
    assert result.exit_code == 0 and "resumed" in result.output, result.output
    assert time.monotonic() - started < locking.LOCK_STALE_S
    assert re.search(rf"^note: '{url}': its writer lock's holder \(kdcache pid {proc.pid} on .*\) has ended: it ran on this machine "
                     r"and its process is gone \(killed\); the lock is taken over now, not after 180 s$", result.stderr, re.M), result.stderr
    assert read_object(fs, lock) is None and layout.open_store(url, storage_options=s3).complete


def test_a_dead_s3_holder_is_taken_over_at_once_only_when_certainly_dead(s3, capfd):
    """Only a holder known dead is not waited for: it ran on this boot of this machine, in this PID namespace (containers
    share the host's name under --net=host, and pids: another namespace's live holder may have any pid), and its pid
    is gone or another process's (another start time). A lock from another namespace or boot, without the record (an
    older kdcache), or of a job whose dask workers or torchrun ranks may still be writing (``helpers``) keeps the wait."""
    fs, url = s3_files(s3), f"s3://{S3_BUCKET}/dead.zarr"
    lock = f"{S3_BUCKET}/.dead.zarr.kdcache-lock"
    holder = hold_lock(url, s3)
    with pytest.raises(layout.StoreError, match=f"is being written by kdcache pid {holder.pid} on "):
        with writer_lock(url, s3):  # alive
            pass
    kill_9(holder)
    dead = json.loads(read_object(fs, lock))
    record = dead["process"]
    for other in ({"pid_ns": [record["pid_ns"][0], record["pid_ns"][1] + 1]}, {"boot_id": "0" + record["boot_id"][1:]},
                  {"alone": False}, {"pid_ns": None}, {"start": str(record["start"])}, None):
        fs.pipe_file(lock, json.dumps({**dead, "process": {**record, **other}} if other else {"holder": dead["holder"]}).encode())
        with pytest.raises(layout.StoreError, match=f"is being written by kdcache pid {holder.pid} on "):
            with writer_lock(url, s3):
                pass
    fs.pipe_file(lock, json.dumps({**dead, "process": {**record, "pid": os.getpid()}}).encode())  # a pid running now: reused
    capfd.readouterr()
    with writer_lock(url, s3):
        assert json.loads(read_object(fs, lock))["holder"].startswith(f"kdcache pid {os.getpid()} on ")
    assert f"note: '{url}': its writer lock's holder (kdcache pid {holder.pid} on " in capfd.readouterr().err

    holder = hold_lock(url, s3, helpers=True)  # a --workers driver: its workers may be writing a shard still
    kill_9(holder)
    assert json.loads(read_object(fs, lock))["process"]["alone"] is False
    with pytest.raises(layout.StoreError, match=f"is being written by kdcache pid {holder.pid} on "):
        with writer_lock(url, s3):
            pass
    token = json.loads(read_object(fs, lock))["token"]
    with pytest.raises(layout.StoreError, match=rf"^'{url}': the job this process writes for \(kdcache pid {holder.pid} on .*\) has ended: "
                                                r"its process is gone from this machine \(killed\); nothing more was written; rerun to resume$"):
        locking.borrowed_lease(url, s3, token).check(url)  # its workers stop before their next shard
    fs.rm_file(lock)

    holder = hold_lock(url, s3, helpers=True)  # a driver that ends as it should (an error, Ctrl-C, SIGTERM) deletes its lock:
    token = json.loads(read_object(fs, lock))["token"]  # its workers were told that another job took it over and to --overwrite
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0 and read_object(fs, lock) is None
    with pytest.raises(layout.StoreError, match=rf"^'{url}': the job this process writes for has ended \(its writer lock is released\); "
                                                r"nothing more was written; rerun to resume$"):
        locking.borrowed_lease(url, s3, token).check(url)


def test_a_dask_worker_stops_once_its_driver_was_killed_leaving_its_lock_file(tmp_path):
    """A driver killed with ``kill -9`` leaves its lock file with its own text (its flock released with it): the job's
    workers, which read that text before each shard, wrote on until another job took the lock. The lock file's flock,
    free, says the driver has ended."""
    out = tmp_path / "s.zarr"
    holder = hold_lock(str(out))
    text = lock_file(out).read_text()
    borrowed = locking.borrowed_lease(str(out), None, text)
    borrowed.check(str(out))  # the driver lives: go on
    kill_9(holder)
    assert lock_file(out).read_text() == text
    with pytest.raises(layout.StoreError, match=rf"^{re.escape(repr(str(out)))}: the job this dask worker writes for \(kdcache pid {holder.pid} "
                                                r"on .*\) has ended \(its lock is released\); this dask worker wrote nothing more there"):
        borrowed.check(str(out))
    with writer_lock(out):  # a new job: the worker sees it as another's
        with pytest.raises(layout.StoreError, match=rf"no longer holds its lock \(kdcache pid {os.getpid()} on "):
            borrowed.check(str(out))


def test_a_rank_that_cannot_see_its_jobs_flock_checks_the_lock_files_text_alone(tmp_path):
    """A torchrun rank other than 0 asks, while rank 0 certainly holds the lock, whether it sees its flock. On a network
    file system whose flock is each machine's own (a node-local flock), a rank on another machine would not: every check
    would call the job ended and stop it at its first shard. It then checks the file's text alone (gone, or another
    job's name), as on a file system without flock."""
    out = tmp_path / "s.zarr"
    holder = hold_lock(str(out))
    text = lock_file(out).read_text()
    try:
        assert locking.LocalBorrowed(lock_file(out), text, "rank 1").sees_flock()  # held where this process sees it
    finally:
        kill_9(holder)
    unseen = locking.LocalBorrowed(lock_file(out), text, "rank 1")  # the text, with no flock seen: as on a node-local flock
    assert not unseen.sees_flock()
    unseen.flock = False
    unseen.check(str(out))  # the job's name still there: go on
    lock_file(out).write_text("kdcache pid 4242 on elsewhere since 2026-11-29T00:00:00+00:00")
    with pytest.raises(layout.StoreError, match=r"the job rank 1 writes for \(kdcache pid .*\) no longer holds its lock \(kdcache pid 4242 "):
        unseen.check(str(out))
    lock_file(out).unlink()
    with pytest.raises(layout.StoreError, match=r"has ended \(its lock is released\); rank 1 wrote nothing more there"):
        unseen.check(str(out))


def test_a_rank_that_sees_its_jobs_flock_takes_it_freed_for_the_job_ended_whatever_machine_holds_it(tmp_path):
    """A torchrun rank on another machine than rank 0, on a file system whose flock every machine sees: it saw rank 0's
    flock held (sees_flock), so a free one later says rank 0 ended (kill -9, the OOM killer: the file left with its
    text). The rule for a dask worker, which never asked (a free flock says so only for a holder on its machine), made
    it go on writing its shards on the file's unchanged text, into a store no job held, until the job's last barrier."""
    import fcntl

    out = tmp_path / "s.zarr"
    text = "kdcache pid 4242 on elsewhere since 2026-11-29T00:00:00+00:00"  # rank 0, on another machine
    lock_file(out).write_text(text)
    fd = os.open(lock_file(out), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held by rank 0, seen from here
        rank = locking.borrowed_lease(str(out), None, text, "rank 1")
        rank.flock = rank.sees_flock()
        assert rank.flock is True
        rank.check(str(out))  # held: go on
    finally:
        os.close(fd)  # rank 0 killed: its flock released, its file left
    assert lock_file(out).read_text() == text
    with pytest.raises(layout.StoreError, match=r"the job rank 1 writes for \(kdcache pid 4242 on elsewhere .*\) has ended \(its lock is released\)"):
        rank.check(str(out))


def test_a_dask_worker_on_another_machine_does_not_take_a_free_flock_for_its_driver_ended(tmp_path):
    """A network file system may keep flock per machine (NFS with local_lock, Lustre's localflock): a driver on another
    machine holds its lock where the worker cannot see it, so the lock file always looks free from the worker's machine.
    Every worker of a --scheduler cluster on another machine stopped every shard with "has ended": only the text of the
    lock file says, for a driver elsewhere (a driver on this machine killed with kill -9 is still found by its flock)."""
    out = tmp_path / "s.zarr"
    text = "kdcache pid 4242 on elsewhere since 2026-11-29T00:00:00+00:00"  # its flock held there, not seen here
    lock_file(out).write_text(text)
    borrowed = locking.borrowed_lease(str(out), None, text)
    borrowed.check(str(out))  # the driver's text: go on
    lock_file(out).write_text("kdcache pid 4343 on elsewhere since 2026-11-30T00:00:00+00:00")
    with pytest.raises(layout.StoreError, match=r"no longer holds its lock \(kdcache pid 4343 on elsewhere "):
        borrowed.check(str(out))
    lock_file(out).unlink()
    with pytest.raises(layout.StoreError, match=r"has ended \(its lock is released\)"):
        borrowed.check(str(out))


def test_train_on_a_store_being_written_names_its_writer(tmp_path, tiny_store):
    """``train`` of an incomplete store that an extract still writes says who writes it, not "resume kdcache extract"
    (which that writer's lock would refuse); an interrupted store, nobody holding it, still says to resume."""
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    (store / "progress/done/c/2").unlink()  # shard 2 not done yet
    args = ["train", FIXTURES / "tiny.toml", "--cache", store, "--out", tmp_path / "run"]
    with writer_lock(store):
        result = invoke(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"is incomplete (34/50 samples); being written by kdcache pid {os.getpid()} on " in result.output, result.output
    assert "wait for it to end, or pass --allow-partial" in result.output and "resume kdcache extract" not in result.output
    assert "resume kdcache extract, or pass --allow-partial" in invoke(*args).output
    assert not (tmp_path / "run").exists()
