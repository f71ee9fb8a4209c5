"""One writer per store: ``flock`` on a file beside a local store, a lock object beside an S3 store (a conditional
PUT, rewritten by a heartbeat, taken over once stale), and the lease through which a writer, its dask workers and its
torchrun ranks check before each shard that the lock is still the job's (docs/FORMAT.md §13).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from kdcache import storage
from kdcache.errors import StoreError, one_line, option, write_fix

_T = TypeVar("_T")

try:
    import fcntl
except ImportError:  # Windows: stores are not locked there
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def writer_lock(location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, helpers: bool = False,
                verb: str = "") -> Iterator[None]:
    """Be the only process writing the store at ``location`` while the block runs.

    Two writers of one store at once (a forgotten job, a scheduler's retry while the first still runs)
    would interleave their shards, and an ``--overwrite`` from another teacher would leave a store
    whose manifest names one teacher while some shards hold another's targets, and that verifies.
    A local store's lock is ``flock`` on ``.NAME.kdcache-lock`` beside the store (not in it: ``--overwrite``
    empties the store's folder), released when the block ends or the process dies; the file names
    its holder and is removed at the end. An S3 store's lock is an object of that name beside it, made by a
    conditional PUT (``_object_lock``). Zip files and http(s) are read-only; other object stores, and a file
    system that refuses ``flock`` (``NO_FLOCK``), are written unlocked rather than not at all (FORMAT.md §13).
    ``helpers``: other processes write for this one (its dask workers, its torchrun ranks): its S3 lock is then not
    taken over at once when this process is found dead (``_holder_ended``), as they may still be writing a shard.
    ``verb``: the command holding a local lock, named in it (``train``: a training run's OUT, which ``_being_written`` words
    as such).
    """
    if storage.location_kind(str(location)) == "url":
        with _object_lock(str(location), storage_options, helpers):
            yield
        return
    path = _lock_path(location)
    if path is None:
        yield
        return
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # removed again if left empty
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _take_lock(path, location, verb)
    except OSError as e:
        raise _lock_error(location, path, e) from None
    try:
        yield
    finally:
        if fd >= 0:
            _LOCAL_HOLDERS.pop(path, None)
            with contextlib.suppress(OSError):
                os.unlink(path)  # before the lock is released: a waiter that opened it sees another file and retries
            os.close(fd)
        for folder in made:  # deepest first: a run that failed before writing leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()


_LOCAL_HOLDERS: dict[Path, str] = {}  # the local locks this process holds: what it wrote into each lock file


def local_token(location: str | os.PathLike[str]) -> str | None:
    """What this process wrote into the local writer lock it holds on ``location`` (None: it holds none there, or the
    file system has no ``flock``): handed to the job's dask workers, which check it before each shard (``LocalBorrowed``)."""
    path = _lock_path(location)
    return _LOCAL_HOLDERS.get(path) if path is not None else None


@dataclass
class LocalBorrowed:
    """A local store's writer lock as a process writing for the job that holds it sees it (a dask worker, a torchrun rank
    other than 0: the driver or rank 0 holds it). Read before each shard is written: the lock file must still name the
    job's holder, and still be locked. A worker of a cluster of one's own (``--scheduler``) goes on running its task
    after the driver stopped (Ctrl-C, SIGTERM, another shard's error) and released the lock; without this it wrote the
    shard and its done marker into whatever store another job (``--overwrite``, another teacher) had made there since,
    and that store verified. ``who``: the process, for the message. ``flock``: whether this process sees the holder's
    ``flock`` (``sees_flock``): True, a free one says the holder ended, wherever it ran; False (a network file system
    whose flock is each machine's own), the file's text alone says; None, not asked (a dask worker): a free one says
    so for a holder on this machine only."""

    path: Path
    holder: str
    who: str = "this dask worker"
    flock: bool | None = None

    def _look(self) -> tuple[bool, str | None] | None:
        """(locked, the file's text: None where there is no file), or None: not known (not readable from here)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False, None
        except OSError:
            return None
        try:
            locked = True
            if self.flock is not False:
                try:
                    # the lock file outlives a driver killed without a word (kill -9, the OOM killer), its text unchanged;
                    # its flock does not: free, nobody holds the lock. Probed and read through one fd: the same file.
                    locked = _holder(fd, fcntl.LOCK_SH, tries=1) is not None
                except OSError:  # a file system without flock: the text alone says
                    pass
            return locked, os.pread(fd, 4096, 0).decode(errors="replace").strip()
        except OSError:
            return None
        finally:
            os.close(fd)

    def sees_flock(self) -> bool | None:
        """Whether this process sees the lock's ``flock`` held, asked while its holder certainly holds it (a torchrun rank,
        once rank 0 has told it the job's lock). Not seen: a file system whose flock is not shared between machines
        (a node-local flock): every later check would call the job ended, so the file's text alone is checked then.
        Seen: a free flock later says the holder ended, on another machine too. None: not told (the file unreadable,
        or naming another holder already)."""
        look = self._look()
        if look is None or look[1] != self.holder:
            return None
        return look[0]

    def check(self, location: str) -> None:
        look = self._look()
        if look is None:
            return
        locked, text = look
        # not asked (flock None), a free flock says the holder ended only for a holder on this machine: a network file system
        # may keep flock per machine (NFS local_lock, Lustre localflock), where another machine's holder's lock always looks
        # free (FORMAT.md §13); one seen held (sees_flock) says it wherever the holder ran
        elsewhere = self.flock is None and _holder_host(self.holder) != socket.gethostname()
        seen = text if locked or (text is not None and elsewhere) else None
        if seen == self.holder:
            return
        now = "has ended (its lock is released)" if seen is None else f"no longer holds its lock ({seen[:200] or 'another kdcache process'} does)"
        raise StoreError(f"{location!r}: the job {self.who} writes for ({self.holder}) {now}; {self.who} wrote nothing more "
                         "there; run the extract again to resume")


def _holder_host(holder: str) -> str | None:
    """The machine a local lock file's text (``kdcache pid P on HOST since T``) names."""
    m = re.fullmatch(r"kdcache pid \d+ on (.*) since \S+", holder)
    return m.group(1) if m else None


NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # a file system without flock: written unlocked (FORMAT.md §13)


def _lock_error(location: str | os.PathLike[str], path: Path, e: OSError) -> StoreError:
    """``writer_lock``'s refusal of ``location`` whose lock file ``path`` (or a folder on its way) could not be made: ``e``."""
    said = storage.on_broken_link(storage.local_path(str(location)))
    if said is not None:  # a link to a store not made yet is written through, its folder made: here that folder's cannot be
        return StoreError(f"cannot write {str(location)!r}: it {said}, and the folder "
                          f"{str(path.parent)!r} cannot be made there ({e.strerror or e}); remove the link, create the folder it "
                          "leads to, or write the store elsewhere")
    fix = write_fix(e) if e.errno not in (errno.EEXIST, errno.ENOTDIR) else \
        f"choose an {option('--out')} whose parent {str(path.parent)!r} is a folder"
    return StoreError(f"cannot lock {str(location)!r} for writing: its lock file {str(path)!r}: {e.strerror or e}; {fix} and rerun")


def refuse_unlockable(location: str | os.PathLike[str]) -> None:
    """Refuse, in its words, what ``writer_lock`` would of the local ``location``, its lock file neither made nor taken
    (``extract --dry-run``): a link at the lock file's name, a file where a folder on its way goes, a folder this process
    may not write (a read-only mount). Other locations pass: an S3 lock is looked at by ``refuse_if_being_written``."""
    path = _lock_path(location)
    if path is None:
        return
    if path.is_symlink():
        raise _linked_lock(path, location)
    failed = _lock_failure(path)
    if failed is not None:
        raise _lock_error(location, path, failed)


def _lock_failure(path: Path) -> OSError | None:
    """The error making the lock file ``path`` would meet, found by looking, as ``writer_lock`` makes it: its missing
    folders (``mkdir -p``), then the file (``_open_lock_file``: an existing one, another user's too, is opened read-only
    where it may not be written; not on a read-only mount). None where it would be made or opened."""
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:  # the nearest folder there, where mkdir -p starts
        folder = folder.parent
    if not folder.is_dir():  # a file where a folder goes: mkdir says EEXIST of the lock's folder, ENOTDIR of one below a file
        code = errno.EEXIST if folder == path.parent else errno.ENOTDIR
    elif path.exists():
        code = errno.EROFS if _read_only_mount(path) else 0
    elif not os.access(folder, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only_mount(folder) else errno.EACCES
    else:
        code = 0
    return OSError(code, os.strerror(code)) if code else None


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): not known
        return False


def _take_lock(path: Path, location: str | os.PathLike[str], verb: str = "") -> int:
    """Lock ``path`` (created if missing) and write our name into it; returns its fd (-1: flock unsupported there)."""
    while True:
        fd, theirs = _open_lock_file(path, location)
        try:
            refused = _refusal(fd, location)
            if refused is not None:
                raise refused
            with contextlib.suppress(FileNotFoundError):
                if theirs and os.path.samestat(os.fstat(fd), os.stat(path)):  # its holder killed (kill -9) left it:
                    _remove_left_lock(path, location, fd)  # replaced by one of ours
                    os.close(fd)
                    continue
                if os.path.samestat(os.fstat(fd), os.stat(path)):  # still the file at that path: the lock is ours
                    os.ftruncate(fd, 0)
                    holder = _holder_name(verb)
                    os.pwrite(fd, holder.encode(), 0)
                    _LOCAL_HOLDERS[path] = holder
                    return fd
        except OSError as e:
            os.close(fd)
            if e.errno in NO_FLOCK:
                with contextlib.suppress(OSError):
                    path.unlink()
                return -1
            raise
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed by the last holder after we opened it: lock the file there now


def _open_lock_file(path: Path, location: str | os.PathLike[str]) -> tuple[int, bool]:
    """The local lock file ``path`` opened (created if missing) for ``_take_lock``, and whether it is another user's
    (opened read-only). A link there is refused (``_linked_lock``)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644), False
    except PermissionError as denied:  # another user's lock file (a folder shared by a group): flock needs no write access
        try:
            return os.open(path, os.O_RDONLY | NOFOLLOW), True
        except FileNotFoundError:  # none there: a folder this user may not write, which the error names
            raise denied from None
        except OSError as e:
            raise _linked_lock(path, location) if e.errno == errno.ELOOP else e from None
    except OSError as e:
        raise _linked_lock(path, location) if e.errno == errno.ELOOP else e from None


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a lock file is opened so: a link at its name is refused, not followed


def _linked_lock(path: Path, location: str | os.PathLike[str]) -> StoreError:
    """A link where the lock file of ``location`` goes: opened through it, its target (a user's file, anywhere) was
    emptied, the holder's line written into it, and the link deleted as the lock was released."""
    return StoreError(f"cannot lock {str(location)!r}: its lock file {str(path)!r} is a link (to {os.readlink(path)!r}), whose "
                      f"target kdcache would overwrite; remove the link (kdcache makes the file itself) and rerun (nothing was changed)")


def _remove_left_lock(path: Path, location: str | os.PathLike[str], fd: int) -> None:
    """Delete the lock file ``path`` (open as ``fd``, locked by us) that a kdcache of another user left as it ended, or
    say why this user may not."""
    try:
        path.unlink()
    except PermissionError:  # a folder with the sticky bit (only its owner may), or one this user may not write
        left = (f"cannot lock {str(location)!r} for writing: its lock file {str(path)!r} was left by a kdcache "
                f"of another user (uid {os.fstat(fd).st_uid}) that has ended, and ")
        if os.stat(path.parent).st_mode & stat.S_ISVTX:
            raise StoreError(f"{left}this folder (sticky) lets only that user delete it; have it deleted, and rerun") from None
        raise StoreError(f"{left}this user may not write its folder {str(path.parent)!r}; make the folder writable "
                         "(or choose another location) and rerun") from None


def refuse_if_being_written(location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
    """Fail at once, before a teacher or dataset is built, when another job holds ``location``'s writer lock, or a pack
    or export holds it shared (``reading_lock``; ``writer_lock``, taken later, is what decides). An S3 store whose lock cannot be read is not reached at all:
    said now too."""
    storage.refuse_empty_segments(str(location))
    if storage.location_kind(str(location)) != "url":
        refused = _opened_lock(location, lambda fd: _refusal(fd, location)) if fcntl is not None else None  # a copy (reading_lock) too
        if refused is not None:
            raise refused
        return
    started, endpoint = time.monotonic(), storage.endpoint_of(str(location), storage_options)
    try:
        holder = _object_writer(str(location), storage_options, probe=endpoint not in storage.REACHED)
    except StoreError:  # a lock object larger than one can be
        raise
    except Exception as e:  # noqa: BLE001 - unreachable endpoint, refused credentials (botocore's are not OSErrors)
        raise storage.unreachable_error(str(location), e, storage.probe_gave_up(e, time.monotonic() - started, storage_options)) from None
    if "::" not in str(location) and storage.is_s3(str(location)):
        storage.REACHED.add(endpoint)  # the store's first look (storage.exists) is made: not a second probe client for it
    if holder is not None:
        raise _being_written(location, holder)


def _being_written(location: str | os.PathLike[str], holder: str) -> StoreError:
    if holder.startswith("kdcache train "):  # a training run's OUT: no store is written there
        return StoreError(f"{str(location)!r} is the output folder of a training run still going ({holder}); wait for it to end or "
                          "stop it, then rerun (nothing was changed)")
    return StoreError(f"{str(location)!r} is being written by {holder}; wait for it to end or stop it, then rerun (nothing was changed)")


def _refusal(fd: int, location: str | os.PathLike[str]) -> StoreError | None:
    """Take ``flock`` LOCK_EX on the local lock file ``fd`` for a second (``kdcache info`` may be looking: ``active_writer``);
    None when taken, else the error naming who holds it: a writer, or copies (``reading_lock``), whose shared hold lets a
    shared lock be had. The file of copies names the last to start, which may have ended (or been killed) since while
    others go on: named as such, not as the store's writer."""
    holder = _holder(fd, fcntl.LOCK_EX, tries=LOOK_TRIES)
    if holder is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # a writer's
        return _being_written(location, holder)
    fcntl.flock(fd, fcntl.LOCK_UN)
    last = f" (the last to start: {holder})" if holder.startswith(("kdcache pack ", "kdcache export ")) else ""  # not a dead writer's text
    return StoreError(f"{str(location)!r} is being copied by kdcache pack or export{last}; wait for the copies to end, then rerun "
                      "(nothing was changed)")


def _holder_name(verb: str = "") -> str:
    """What a lock names as its holder: this process (``verb``: the command of a copy reading the store, ``reading_lock``)."""
    return f"kdcache {verb + ' ' if verb else ''}pid {os.getpid()} on {socket.gethostname()} since {_now()}"


@contextlib.contextmanager
def reading_lock(location: str | os.PathLike[str], storage_options: dict[str, Any] | None, verb: str) -> Iterator[Callable[[], None]]:
    """Keep writers out of the store at ``location`` while ``kdcache VERB`` (pack, export) copies it whole.

    A check at the start alone let a writer that started during the copy (an extract resuming the store, or
    ``--overwrite`` with another teacher) change it under the copy: a file with the manifest of one moment and the
    shards of another. Refused at once while a writer holds the store; a writer that starts meanwhile is refused
    (``_being_written``, naming this process and ``verb``). A local store's: a shared ``flock`` on its writer lock file,
    so that copies do not exclude each other; an S3 store's: its writer lock object (S3 has no shared lock: two copies
    of one S3 store run one after the other). A zip or http(s) store has no writer. Where the lock cannot be taken (a
    folder or bucket this user may not write), the store is copied after the check alone, as a note says; an S3 lock request
    that fails otherwise (no answer, a 5xx) stops the copy. Yields
    ``held``, to call before the copy is put in place: it raises when the lock was lost meanwhile (an S3 lock taken over
    once stale), as the store may have changed."""
    location = str(location)
    if storage.location_kind(location) != "url":
        with _shared_lock(location, _holder_name(verb), verb):
            yield lambda: None
        return
    refuse_if_being_written(location, storage_options)  # an endpoint that never answers named in seconds, as for a writer
    with _object_lock(location, storage_options, reader=verb):
        yield lambda: _check_reading(location, storage_options, verb)


@contextlib.contextmanager
def _shared_lock(location: str, holder: str, verb: str) -> Iterator[None]:
    """A shared ``flock`` on the lock file of the local store ``location`` while the block runs (``reading_lock``); the last
    holder to end removes the file, as a writer does."""
    path = _lock_path(location)
    fd = _take_shared(path, location, holder, verb) if path is not None else -1
    try:
        yield
    finally:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # had at once: no other copy holds it
                if _same_file(fd, path):  # type: ignore[arg-type]
                    os.unlink(path)  # type: ignore[arg-type]
            except OSError:  # another copy holds it still: the file is left to it
                pass
            os.close(fd)


def _take_shared(path: Path, location: str, holder: str, verb: str) -> int:
    """Lock ``path`` (created if missing) shared, ``holder`` written into it for a writer refused meanwhile to name; its fd,
    or -1: not locked (no lock file, and none can be made: a folder this user may not write; a file system without flock)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _linked_lock(path, location) from None
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):  # no folder there: opening the store names it
                return -1
            try:  # another user's lock file, a read-only mount: flock needs no write access (its text is then left as it is)
                fd = os.open(path, os.O_RDONLY | NOFOLLOW)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise _linked_lock(path, location) from None
                _unlocked(location, verb, f"its lock file {str(path)!r} cannot be made here")
                return -1
        try:
            seen = _holder(fd, fcntl.LOCK_SH, tries=LOOK_TRIES)  # for a second: a writer may be looking (refuse_if_being_written)
            ours = seen is None and _same_file(fd, path)  # still the file at that path: not removed by its last holder meanwhile
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError) and e.errno in NO_FLOCK:  # copied unlocked, leaving no lock file behind (as _take_lock)
                with contextlib.suppress(OSError):
                    path.unlink()
                return -1
            raise
        if seen is not None:
            os.close(fd)
            raise _being_written(location, seen)
        if ours:
            with contextlib.suppress(OSError):  # padded: copies write it in turn, and a shorter text would keep a tail
                os.pwrite(fd, holder.encode().ljust(HOLDER_BYTES), 0)
            return fd
        os.close(fd)  # removed by its last holder after we opened it: lock the file there now


HOLDER_BYTES = 200  # of a lock file, what is read as its holder's name


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is the file at ``path`` now."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _unlocked(location: str, verb: str, why: str) -> None:
    """Say that ``verb`` reads the store at ``location`` without its lock (``why``), as a writer may start meanwhile."""
    print(f"note: {location!r} is read by {verb} without keeping writers out ({why}): a writer that starts meanwhile is "
          "not refused", file=sys.stderr, flush=True)


def _check_reading(location: str, storage_options: dict[str, Any] | None, verb: str) -> None:
    """Raise if the S3 lock ``reading_lock`` took for ``verb`` was lost (taken over, or not renewed for so long that it may
    be), renewing it first when late (as a writer does before its next shard: ``Lease.check``)."""
    lease = held_lease(location, storage_options)
    if lease is None:
        return
    if _clock() - lease.renewed > LOCK_LATE_S:  # paused, asleep: renewed as it was (If-Match), no writer took it meanwhile
        with contextlib.suppress(Exception):  # noqa: BLE001 - unreachable now: judged by its age below
            lease.renew(unless_within=LOCK_LATE_S)
    if lease.lost_to is None and _clock() - lease.renewed <= LOCK_STALE_S - LOCK_REQUEST_S:
        return
    taker = f"{lease.lost_to} took it over" if lease.lost_to else f"not renewed for {_clock() - lease.renewed:.0f} s"
    raise StoreError(f"{location!r}: {verb} lost its hold on the store's writer lock while copying it ({taker}), so a writer may "
                     f"have changed it meanwhile; nothing was written; rerun kdcache {verb}")


def active_writer(location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> str | None:
    """Who holds the writer lock of the store at ``location`` ("kdcache pid P on HOST since T"), or None: nobody
    (an incomplete store then is an interrupted one; an S3 lock past ``LOCK_STALE_S`` is a dead holder's), or not
    known (a store that is not locked, a lock that cannot be read)."""
    if storage.location_kind(str(location)) == "url":
        try:
            return _object_writer(str(location), storage_options)
        except Exception:  # noqa: BLE001 - unreachable, refused credentials (botocore's are not OSErrors): not known
            return None
    # shared, for an instant when free (the writer retries): copies (reading_lock) are no writer
    return _opened_lock(location, lambda fd: _holder(fd, fcntl.LOCK_SH, tries=1)) if fcntl is not None else None


def _opened_lock(location: str | os.PathLike[str], look: Callable[[int], _T]) -> _T | None:
    """``look(fd)`` at the local lock file of ``location`` opened read-only, or None: no lock file (no holder), or a file
    system without flock (not known)."""
    path = _lock_path(location)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: no holder
        return None
    try:
        return look(fd)
    except OSError:  # a file system without flock: not known
        return None
    finally:
        os.close(fd)


def may_not_lock(location: str | os.PathLike[str]) -> bool:
    """Whether this process may not make the writer lock of the existing local store ``location`` (``writer_lock`` would
    be refused: a read-only mount, a folder or lock file it may not write). False where not known: other locations."""
    path = _lock_path(location)
    if path is None:
        return False
    return not os.access(path if path.exists() else path.parent, os.W_OK)  # EROFS too: access(2) says a read-only mount


def _lock_path(location: str | os.PathLike[str]) -> Path | None:
    """``.NAME.kdcache-lock`` beside the local store ``location`` (None: not a local store, or no ``flock`` here)."""
    if storage.location_kind(str(location)) != "local" or fcntl is None:
        return None
    root = Path(storage.local_path(str(location))).resolve()  # one lock whatever the path: through a symlink, relative, with ..
    return root.parent / f".{root.name}.kdcache-lock"


# How often a lock taken by another process is tried again, 50 ms apart, before it is called held: for a second, as
# another process may be looking at it for an instant (``active_writer``, ``refuse_if_being_written``).
LOOK_TRIES = 20


def _holder(fd: int, kind: int, tries: int) -> str | None:
    """Take ``flock`` ``kind`` on ``fd`` without waiting (``tries`` times, 50 ms apart): None when taken, else
    what the holder wrote into the lock file."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.05)
    return os.pread(fd, HOLDER_BYTES, 0).decode(errors="replace").strip() or "another kdcache process"


# An S3 store's lock (FORMAT.md §13): its holder rewrites it every LOCK_HEARTBEAT_S seconds; one not rewritten for
# LOCK_STALE_S seconds, by the store's own clock, is a dead holder's (killed, its machine gone) and is taken over.
# A holder whose last rewrite is older than LOCK_LATE_S (its heartbeat late: the process was paused, the machine
# asleep, the endpoint failing) rewrites it before it writes anything more, and stops if it cannot. A request about
# the lock object gives up after LOCK_REQUEST_S. Read where used, so tests may shorten them.
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_S = 180.0
LOCK_LATE_S = 60.0
LOCK_REQUEST_S = 30.0
LOCK_MAX_BYTES = 2**16  # a lock object larger than this is refused, read no further (kdcache's bodies take a few hundred bytes)
_LEASES: dict[tuple[str | None, str, str], Lease] = {}  # the S3 locks this process holds, by endpoint, bucket and key


@contextlib.contextmanager
def _object_lock(location: str, storage_options: dict[str, Any] | None, helpers: bool = False, reader: str = "") -> Iterator[None]:
    """Hold the lock object ``.NAME.kdcache-lock`` beside the S3 store ``location`` while the block runs.

    S3 has no lock, but a PUT with ``If-None-Match: *`` is refused (412) when the object exists, atomically:
    of two writers, exactly one creates it. A writer that dies cannot remove it, so a thread rewrites it every
    ``LOCK_HEARTBEAT_S`` (PUT ``If-Match`` its last ETag: ``Lease``) and a lock unchanged for ``LOCK_STALE_S`` is
    taken over with a PUT ``If-Match`` the ETag seen stale: of two takers, or a taker and a late heartbeat, exactly
    one wins. Staleness is the store's ``Date`` less the object's ``Last-Modified``: no writer's clock is trusted. A
    writer whose heartbeat is late renews the lock before its next shard (``store.Store.lease``), and one whose lock was
    taken over (paused, or cut off from the store, for ``LOCK_STALE_S``) fails there, at its next heartbeat, or at
    the end of the block. Not locked: stores on other fsspec backends, a store at a bucket's root (the lock would
    be inside it), and a server that ignores ``If-None-Match`` (some S3-compatible ones): tried once after taking
    it, as a lock that cannot exclude is no lock. The lock names its holder's process as the kernel knows it
    (``_identity``): a lock whose holder is certainly dead (``_holder_ended``: it ran on this machine, in this PID
    namespace, and its process is gone) is taken over at once, unless other processes wrote for it (``helpers``).
    ``reader``: the command of a copy that holds it to keep writers out (``reading_lock``), named in it; one that
    may not write it (403: s3fs's PermissionError) copies the store unlocked, one whose lock request fails otherwise (no
    answer, a 5xx) stops, and one that lost it says so itself (``_check_reading``).
    """
    lock = _lock_object(location, storage_options)
    if lock is None and _at_bucket_root(location):
        _not_locked(location, reader, "a store at a bucket's root has no place beside it for its lock object, as one under a "
                    "prefix has (s3://BUCKET/NAME.zarr)")
    token = os.urandom(8).hex()  # our bodies differ from any other writer's, whatever the clocks say
    holder = _holder_name(reader)
    process = _identity()
    process = {**process, "alone": not helpers} if process else {}
    sent = _clock()
    etag = _first_etag(lock, location, holder, token, process, reader)
    if etag is None:
        yield
        return
    lease = Lease(*lock, holder, token, etag, sent, process=process)
    with _renewed(lease):
        yield
    if lease.lost_to is not None and not reader:
        raise _lost_lock(location, lease.lost_to)


def _first_etag(lock: tuple[Any, str, str] | None, location: str, holder: str, token: str, process: dict[str, Any],
                reader: str) -> str | None:
    """Take the lock object ``lock`` for ``_object_lock``: its ETag, or None: not held (no lock object, a server that
    cannot lock, a copy that may not write it: ``_not_taken``). One our PUT may have made is deleted when taking it fails."""
    if lock is None:
        return None
    try:
        return _take_object_lock(*lock, location, holder, token, process, reader)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable endpoint, refused credentials... (botocore's are not OSErrors)
        _drop_if_ours(*lock, token)  # a PUT that landed, its answer lost (timed out): a rerun would be refused until stale
        _not_taken(location, lock, reader, e)
        return None
    except BaseException:  # Ctrl-C or SIGTERM as it was taken: a lock object we made would refuse a rerun until stale
        _drop_if_ours(*lock, token)
        raise


def _not_taken(location: str, lock: tuple[Any, str, str], reader: str, e: Exception) -> None:
    """Raise the error for the lock object ``lock`` whose request failed (``e``), unless ``reader``'s copy may not write
    it (403: s3fs's PermissionError): that copy goes on without it, as a note says."""
    if isinstance(e, FileNotFoundError):  # s3fs's for NoSuchBucket: what else a PUT could not find
        raise StoreError(f"{'no store at' if reader else 'cannot write'} {location!r}: there is no bucket {lock[1]!r} (or these "
                         f"credentials cannot see it); {'' if reader else 'create it, or '}check the bucket name, --storage-option "
                         "values and credentials") from None
    if not reader:
        raise StoreError(f"cannot lock {location!r} for writing: its lock object 's3://{lock[1]}/{lock[2]}': {_failure(e)}; "
                         "check the URL, --storage-option values and credentials (writing there must be allowed), and rerun") from None
    if not isinstance(e, PermissionError):  # s3fs's for 403 AccessDenied; a timeout or 5xx says nothing of who may write
        raise StoreError(f"cannot keep writers out of {location!r} while kdcache {reader} copies it: its lock object "
                         f"'s3://{lock[1]}/{lock[2]}': {_failure(e)}; check that the endpoint is up and answers, and rerun "
                         "(a user not allowed to write there copies it without the lock)") from None
    _unlocked(location, reader, f"its lock object 's3://{lock[1]}/{lock[2]}' cannot be written: {one_line(e, 200)}")


@contextlib.contextmanager
def _renewed(lease: Lease) -> Iterator[None]:
    """Renew ``lease`` every ``LOCK_HEARTBEAT_S`` in a thread (``_heartbeat``), and list it as held (``held_lease``),
    while the block runs; then release it."""
    key = _lease_key(lease.fs, lease.bucket, lease.key)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lease, stop), name="kdcache-lock-heartbeat", daemon=True)
    _LEASES[key] = lease
    try:
        beat.start()  # inside: a Ctrl-C while it starts removes the lock too
        yield
    finally:
        _LEASES.pop(key, None)
        stop.set()
        with contextlib.suppress(RuntimeError):  # not started
            beat.join()
        lease.release()


def _failure(e: BaseException) -> str:
    """A failed request about the lock object in a few words (a request given up after ``LOCK_REQUEST_S`` has no message)."""
    return f"no answer within {LOCK_REQUEST_S:g} s" if isinstance(e, TimeoutError) else one_line(e)


def _clock() -> float:
    """Seconds on a clock that runs while the machine sleeps (Linux's CLOCK_BOOTTIME; elsewhere monotonic): a
    suspended laptop's lock goes stale on the server meanwhile."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


@dataclass
class Lease:
    """Our hold on an S3 lock object: the ETag of its last version, and when the PUT that made it was sent."""

    fs: Any
    bucket: str
    key: str
    holder: str
    token: str
    etag: str
    renewed: float  # _clock() when the PUT that made `etag` was sent: the server's Last-Modified is no earlier
    lost_to: str | None = None  # who took it over
    failed: float = 0.0  # _clock() when a renewal last failed: the writer threads that find it late do not each try again
    mutex: threading.Lock = field(default_factory=threading.Lock)  # the heartbeat and check renew it
    process: dict[str, Any] = field(default_factory=dict)  # the holder's process, as its lock body records it (_identity)

    def renew(self, unless_within: float = 0.0) -> None:
        """Rewrite the lock object ``If-Match`` our last ETag (``unless_within``: not when renewed within that many
        seconds, or when a renewal failed within ``LOCK_REQUEST_S``, by another thread meanwhile). Refused, it was
        taken over (``lost_to`` names who) unless it is still ours: a PUT whose answer was lost and which botocore
        sent again (the first try landed, the second was refused), whose version is then rewritten. Raises what the
        request raised otherwise (unreachable, no answer within ``LOCK_REQUEST_S``)."""
        with self.mutex:
            now = _clock()
            failed_just_now = self.failed > self.renewed and now - self.failed < LOCK_REQUEST_S
            if self.lost_to is not None or now - self.renewed < unless_within or unless_within and failed_just_now:
                return  # lost; renewed meanwhile; or, for a late writer, failed just now in another thread
            try:
                self._renew()
            except Exception:
                self.failed = _clock()
                raise

    def _renew(self) -> None:
        """``renew``'s PUT, under its mutex."""
        for _ in range(3):  # refused for a version of ours (an earlier PUT landed, its answer lost): renew that one
            sent = _clock()
            try:
                self.etag = _put_lock(self.fs, self.bucket, self.key, _lock_body(self.holder, self.token, self.process), IfMatch=self.etag)
            except OSError as e:
                if not _lost_race(e):
                    raise
                seen = _read_lock(self.fs, self.bucket, self.key)
                if not _ours(seen, self.token):
                    self.lost_to = _object_holder(seen) if seen is not None else "another writer"
                    return
                self.etag = seen[1]  # its Last-Modified may be long past: not a renewal by itself
                self.renewed = max(self.renewed, _clock() - max(0.0, seen[2]))
                continue
            self.renewed = sent
            return

    def check(self, location: str) -> None:
        """Before anything more is written: renew the lock when its heartbeat is late (``LOCK_LATE_S``), and fail
        when it was lost, or cannot be renewed and may be stale by now."""
        if _clock() - self.renewed > LOCK_LATE_S:
            failed = "its renewals failed"
            try:
                self.renew(unless_within=LOCK_LATE_S)  # the writer threads each find it late: one renews
            except Exception as e:  # noqa: BLE001 - unreachable now: the data's own writes will say more if it lasts
                failed = _failure(e)
            if _clock() - self.renewed > LOCK_STALE_S - LOCK_REQUEST_S and self.lost_to is None:
                raise StoreError(f"{location!r}: cannot renew this job's writer lock (last renewed {_clock() - self.renewed:.0f} s ago, "
                                 f"taken over by another job after {LOCK_STALE_S:.0f} s): {failed}; nothing more was written; "
                                 "check that the store can be reached, then rerun to resume")
        if self.lost_to is not None:
            raise _lost_lock(location, self.lost_to)

    def release(self) -> None:
        """Delete the lock object (``If-Match``: only while it is ours); left behind when unreachable (taken over once stale)."""
        with self.mutex:
            if self.lost_to is not None:
                return
            try:
                _lock_request(self.fs, "delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except OSError as e:
                if _lost_race(e):  # gone (our DELETE sent again after it landed), ours in another version, or taken over
                    with contextlib.suppress(Exception):  # noqa: BLE001 - unreachable now: left behind, taken over once stale
                        seen = _read_lock(self.fs, self.bucket, self.key)
                        if _ours(seen, self.token):
                            _lock_request(self.fs, "delete_object", Bucket=self.bucket, Key=self.key, IfMatch=seen[1])
                        elif seen is not None:
                            self.lost_to = _object_holder(seen)
            except Exception:  # noqa: BLE001 - unreachable now: left behind, it is taken over once stale
                pass


def held_lease(location: str, storage_options: dict[str, Any] | None) -> Lease | None:
    """This process's hold on the S3 writer lock of the store at ``location`` (taken by ``writer_lock``), or None."""
    if not _LEASES:
        return None
    lock = _lock_object(location, storage_options)
    return _LEASES.get(_lease_key(*lock)) if lock is not None else None


def _lease_key(fs: Any, bucket: str, key: str) -> tuple[str | None, str, str]:
    return getattr(fs, "endpoint_url", None), bucket, key


@dataclass
class Borrowed:
    """The S3 writer lock of a job, as a process that writes for it without holding it sees it (a dask worker, a
    torchrun rank other than 0: the driver or rank 0 holds it). Read before each shard is written: still the job's
    (its ``token``), and renewed within ``LOCK_STALE_S`` (a holder paused or gone may lose it any moment)."""

    fs: Any
    bucket: str
    key: str
    token: str

    def check(self, location: str) -> None:
        seen = _read_lock(self.fs, self.bucket, self.key)
        if seen is None:  # deleted by its holder as it ended (an error, Ctrl-C, SIGTERM): not taken over by anyone
            raise StoreError(f"{location!r}: the job this process writes for has ended (its writer lock is released); nothing more "
                             "was written; rerun to resume")
        if not _ours(seen, self.token):
            raise _lost_lock(location, _object_holder(seen))
        if _holder_ended(seen, lone=False):
            raise StoreError(f"{location!r}: the job this process writes for ({_object_holder(seen, age=False)}) has ended: its process is "
                             "gone from this machine (killed); nothing more was written; rerun to resume")
        if seen[2] >= LOCK_STALE_S:
            raise StoreError(f"{location!r}: this job's writer lock was last renewed {seen[2]:.0f} s ago by its holder (the dask driver "
                             f"or torchrun rank 0, paused or gone), and another job may take it over after {LOCK_STALE_S:.0f} s; "
                             "nothing more was written; rerun to resume")


def borrowed_lease(location: str, storage_options: dict[str, Any] | None, token: str | None,
                   who: str = "this dask worker") -> Borrowed | LocalBorrowed | None:
    """``Borrowed`` for the job whose lock holds ``token`` (None: the job holds no S3 lock; see ``_object_lock``); for a
    local store, ``LocalBorrowed`` (``token``: ``local_token``'s; ``who``: the process that borrows it, for messages)."""
    if token is not None and storage.location_kind(str(location)) == "local":
        path = _lock_path(location)
        return LocalBorrowed(path, token, who) if path is not None else None
    lock = _lock_object(location, storage_options) if token is not None else None
    return Borrowed(*lock, token) if lock is not None else None


def _lost_lock(location: str, taker: str) -> StoreError:
    return StoreError(f"{location!r} lost its writer lock while being written: {taker} took it over, as this job had not "
                      f"renewed it for {LOCK_STALE_S:.0f} s (paused, or cut off from the store); both may have written shards: "
                      f"once that job has ended, rerun with {option('--overwrite')}")


def _put_lock(fs: Any, bucket: str, key: str, body: bytes, **condition: str) -> str:
    """PUT the lock object with ``condition`` (``IfNoneMatch`` / ``IfMatch``); its new ETag."""
    return str(_lock_request(fs, "put_object", Bucket=bucket, Key=key, Body=body, **condition)["ETag"])


def _lock_request(fs: Any, method: str, **params: Any) -> Any:
    """One S3 request about the lock object, giving up after ``LOCK_REQUEST_S`` (TimeoutError) whatever s3fs's and
    botocore's retries would wait: aiohttp awaits a silent server's ``100 Continue`` to a PUT without end, and a job
    that stops, or stops writing, must not wait minutes for its lock's last request."""
    import asyncio

    from fsspec.asyn import sync

    return sync(fs.loop, asyncio.wait_for, fs._call_s3(method, **params), LOCK_REQUEST_S)


def _take_object_lock(fs: Any, bucket: str, key: str, location: str, holder: str, token: str,
                      process: dict[str, Any] | None = None, reader: str = "") -> str | None:
    """Create the lock object, or take it over when stale or its holder is certainly dead (``_holder_ended``); its
    ETag (None: this server cannot lock, as a note says: ``_cannot_lock``, of ``reader``'s copy where given)."""
    seen = None
    for _ in range(5):  # each turn lost to a writer that changed the lock meanwhile
        body = _lock_body(holder, token, process)
        try:
            etag = _put_lock(fs, bucket, key, body, IfNoneMatch="*")
        except OSError as e:
            if e.errno == errno.ENOSYS:  # 501 NotImplemented: no conditional PUT here
                return _cannot_lock(location, reader, "it answers a conditional PUT (If-None-Match) with 501 Not Implemented")
            if not _lost_race(e):
                raise
        else:
            etag = _honoured(fs, bucket, key, body, etag)
            return etag or _cannot_lock(location, reader, "it ignores If-None-Match: a second conditional PUT of the lock "
                                                          "object was accepted")
        seen = _read_lock(fs, bucket, key)
        if seen is None:
            continue  # removed meanwhile: create it again
        if _ours(seen, token):
            return seen[1]  # our own PUT, whose answer was lost and the request retried
        ended = seen[2] < LOCK_STALE_S and _holder_ended(seen, lone=True)
        if seen[2] < LOCK_STALE_S and not ended:
            raise _being_written(location, _object_holder(seen))
        etag = _take_over(fs, bucket, key, body, seen, location, ended)
        if etag is not None:
            return etag
    raise _being_written(location, _object_holder(seen) if seen is not None else "another kdcache process")


def _cannot_lock(location: str, reader: str, why: str) -> None:
    """Say that the S3 server of ``location`` cannot lock (``why``), so this writer, or ``reader``'s copy, goes on
    without the lock (FORMAT.md §13) and nothing refuses another writer meanwhile. None: no lock's ETag."""
    return _not_locked(location, reader, f"its S3 server cannot hold a lock: {why}")


def _not_locked(location: str, reader: str, why: str) -> None:
    """Say that this writer, or ``reader``'s copy, goes on without the lock of the S3 store ``location`` (``why``)."""
    if reader:
        return _unlocked(location, reader, why)
    print(f"note: {location!r} is written without a writer lock ({why}): another writer of it that starts meanwhile is not "
          "refused; run one at a time", file=sys.stderr, flush=True)
    return None


def _honoured(fs: Any, bucket: str, key: str, body: bytes, etag: str) -> str | None:
    """``etag``, of the lock object just created, when the server refuses a second ``If-None-Match: *`` PUT of it; else
    None: the server ignores the condition, no lock here (the object is deleted)."""
    try:
        _put_lock(fs, bucket, key, body, IfNoneMatch="*")  # refused by a server that honours the condition
    except FileExistsError:
        return etag
    except BaseException:
        with contextlib.suppress(Exception):  # noqa: BLE001 - not left behind; the first error is the one to name
            _lock_request(fs, "delete_object", Bucket=bucket, Key=key)
        raise
    _lock_request(fs, "delete_object", Bucket=bucket, Key=key)  # accepted: the server ignores If-None-Match, no lock here
    return None


def _take_over(fs: Any, bucket: str, key: str, body: bytes, seen: tuple[bytes, str, float], location: str, ended: bool) -> str | None:
    """Take over the lock object ``seen``, stale or its holder ``ended``: its new ETag, or None: lost to a writer that
    rewrote it since it was read."""
    try:
        etag = _put_lock(fs, bucket, key, body, IfMatch=seen[1])  # refused if anyone rewrote it since we read it
        if ended:
            print(f"note: {location!r}: its writer lock's holder ({_object_holder(seen, age=False)}) has ended: it ran on this machine "
                  f"and its process is gone (killed); the lock is taken over now, not after {LOCK_STALE_S:.0f} s", file=sys.stderr, flush=True)
        return etag
    except OSError as e:
        if not _lost_race(e):
            raise
        return None


def _heartbeat(lease: Lease, stop: threading.Event) -> None:
    """Renew the lease every ``LOCK_HEARTBEAT_S`` until ``stop`` or until it is lost. Failures are retried next time."""
    while not stop.wait(LOCK_HEARTBEAT_S) and lease.lost_to is None:
        with contextlib.suppress(Exception):  # noqa: BLE001 - a network error now and then: the lock lasts LOCK_STALE_S without a heartbeat
            lease.renew()


def _drop_if_ours(fs: Any, bucket: str, key: str, token: str) -> None:
    """Delete the lock object if it is the one our ``token`` made (a PUT interrupted after it landed), else leave it."""
    with contextlib.suppress(Exception):  # noqa: BLE001 - best effort: one left behind is taken over once stale
        seen = _read_lock(fs, bucket, key)
        if _ours(seen, token):
            _lock_request(fs, "delete_object", Bucket=bucket, Key=key, IfMatch=seen[1])


def _object_writer(location: str, storage_options: dict[str, Any] | None, *, probe: bool = False) -> str | None:
    """``active_writer`` of an object store, raising what reading its lock raised. ``probe``: read it through a
    filesystem of its own with the short timeouts of ``storage.PROBE_*``."""
    lock = _lock_object(location, storage_options, probe=probe)
    seen = _read_lock(*lock) if lock is not None else None
    return _object_holder(seen) if seen is not None and seen[2] < LOCK_STALE_S and not _holder_ended(seen, lone=True) else None


def _lock_object(location: str, storage_options: dict[str, Any] | None, *, probe: bool = False) -> tuple[Any, str, str] | None:
    """``(fs, bucket, key)`` of ``.NAME.kdcache-lock`` beside the S3 store ``location`` (None: not locked; see
    ``_object_lock``). s3fs is the fsspec backend whose PUTs kdcache can make conditional. ``probe``: the fs is a
    new one (not fsspec's cached instance, which later moves the data) with the short timeouts of ``storage.PROBE_*``."""
    if storage.location_kind(location) != "url" or "::" in location:  # zip::s3://... is read-only
        return None
    try:
        fs, path = storage.probe_filesystem(location, storage_options) if probe and storage.is_s3(location) else storage.filesystem(location, storage_options)
    except Exception:  # noqa: BLE001 - a missing backend, bad options: named when the store is opened
        return None
    bucket, _, key = path.strip("/").partition("/")
    if not hasattr(fs, "call_s3") or not key:
        return None
    parent, _, name = key.rpartition("/")
    return fs, bucket, f"{parent}/.{name}.kdcache-lock".lstrip("/")


def _at_bucket_root(location: str) -> bool:
    """Whether ``location`` is an S3 bucket's root (``s3://BUCKET``), where ``_lock_object`` has no key beside the store."""
    from fsspec.core import split_protocol

    return "::" not in location and storage.is_s3(location) and "/" not in split_protocol(location)[1].strip("/")


def _lock_body(holder: str, token: str, process: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"holder": holder, "heartbeat": _now(), "token": token, **({"process": process} if process else {})}).encode()


def _read_lock(fs: Any, bucket: str, key: str) -> tuple[bytes, str, float] | None:
    """The lock object's bytes, ETag and age in seconds by the store's clock (its ``Date`` less the object's
    ``Last-Modified``; this machine's clock only if the server sends no ``Date``); None when there is none."""
    import asyncio
    from email.utils import parsedate_to_datetime

    from fsspec.asyn import sync

    async def get() -> tuple[dict[str, Any], bytes]:
        out = await fs._call_s3("get_object", Bucket=bucket, Key=key)  # one GET: body and ETag of the same version
        try:  # read on every check of a lease: a server may send any number of bytes (storage.read_body)
            return out, await storage.read_body(out.get("ContentLength"), out["Body"].read, LOCK_MAX_BYTES,
                                                lambda size: _lock_too_large(bucket, key, size))
        finally:
            out["Body"].close()

    try:
        out, data = sync(fs.loop, asyncio.wait_for, get(), LOCK_REQUEST_S)
    except FileNotFoundError:
        return None
    date = out.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date) if date else datetime.datetime.now(datetime.timezone.utc)
    return data, out["ETag"], (now - out["LastModified"]).total_seconds()


def _lock_too_large(bucket: str, key: str, size: int | None) -> StoreError:
    """The error for the lock object ``s3://bucket/key`` holding ``size`` bytes (None: more than ``LOCK_MAX_BYTES``, where
    the read stopped): no kdcache process wrote it."""
    holds = f"{size:,} bytes" if size is not None else f"more than {LOCK_MAX_BYTES:,} bytes (the read stopped there)"
    return StoreError(f"the writer lock object 's3://{bucket}/{key}' holds {holds}; a lock object holds at most {LOCK_MAX_BYTES:,} "
                      f"bytes (kdcache's take a few hundred), so no kdcache job wrote it: once no job writes the store, delete it "
                      f"(aws s3 rm s3://{bucket}/{key}) and rerun")


def _ours(seen: tuple[bytes, str, float] | None, token: str) -> bool:
    """Whether the lock object read (``_read_lock``; None: there is none) is a version written with our ``token``."""
    return seen is not None and token in seen[0].decode(errors="replace")


def _object_holder(seen: tuple[bytes, str, float], age: bool = True) -> str:
    """What a lock object names as its holder, with its heartbeat's age (a dead holder's is taken over when stale)."""
    try:
        holder = str(json.loads(seen[0])["holder"])[:200]
    except (ValueError, TypeError, KeyError):
        holder = "another kdcache process"
    if not age:
        return holder
    return f"{holder}, last heartbeat {max(0, seen[2]):.0f} s ago (taken over after {LOCK_STALE_S:.0f} s without one)"


def _lost_race(e: OSError) -> bool:
    """Whether a conditional PUT was refused because the lock object changed: it exists (``If-None-Match``), it is
    another version or gone (``If-Match``), or another conditional write of it was under way (409). Not a missing
    bucket (NoSuchBucket, also a FileNotFoundError)."""
    code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
    return isinstance(e, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# A holder killed without a word (kill -9, the OOM killer) cannot delete its S3 lock object; where the next job runs on
# the same machine, it can know that holder is dead instead of waiting out LOCK_STALE_S. Not by host name and pid alone:
# containers share the host's name (--net=host) and have PID namespaces of their own, so "pid P is not running here"
# says nothing of a P in another container, and a pid is reused. The lock records the kernel's boot id, the holder's
# PID namespace (the device and inode of /proc/self/ns/pid), its pid there and its start time (field 22 of
# /proc/PID/stat); when boot and namespace are ours and that pid is gone, or is another process (another start time),
# the holder is certainly dead. Anything else (another machine, another namespace, a lock of an older kdcache without
# the record, no /proc as on macOS, a /proc of another PID namespace than ours) is not known: LOCK_STALE_S decides.

def _identity() -> dict[str, Any]:
    """This process as its lock records it (``{}``: not known here)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.stat("/proc/self/ns/pid")
        start = _start_time(os.getpid()) if _own_proc() else None
    except (OSError, ValueError, IndexError):
        return {}
    if not boot or start is None:
        return {}
    return {"pid": os.getpid(), "boot_id": boot, "pid_ns": [ns.st_dev, ns.st_ino], "start": start}


def _own_proc() -> bool:
    """Whether /proc shows this process's own PID namespace (not a parent's: ``unshare --pid`` without a /proc of its
    own), so that /proc/PID is the process this namespace calls PID: /proc/self/status then lists one pid, ours."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return line.split()[1:] == [str(os.getpid())]
    except OSError:
        pass
    return False  # no NSpid (Linux before 4.1): not known


def _start_time(pid: int) -> int:
    """When process ``pid`` started, in clock ticks after boot (field 22 of /proc/PID/stat)."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2:].split()[19])  # after the command name, which may hold spaces and parentheses


def _holder_ended(seen: tuple[bytes, str, float], *, lone: bool) -> bool:
    """Whether the process the lock object ``seen`` names as its holder has certainly ended (see above). ``lone``: and
    no other process wrote for it (its dask workers, its torchrun ranks may be writing a shard still)."""
    try:
        record = json.loads(seen[0]).get("process")
        pid, boot, ns, start = record["pid"], record["boot_id"], record["pid_ns"], record["start"]
    except (ValueError, AttributeError, TypeError, KeyError):
        return False  # an older kdcache's lock, or not a kdcache lock
    if lone and record.get("alone") is not True:
        return False
    if type(pid) is not int or pid <= 0 or type(start) is not int or not isinstance(ns, list) or not all(type(n) is int for n in ns):
        return False
    mine = _identity()
    if not mine or mine["boot_id"] != boot or mine["pid_ns"] != ns:
        return False  # another machine, another boot, another PID namespace: not known
    if not _running(pid):
        return True
    try:
        return _start_time(pid) != start  # the pid is another process's now
    except (OSError, ValueError, IndexError):  # hidden (/proc's hidepid), or ended just now
        return not _running(pid)


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists in this PID namespace (a zombie, killed but not yet waited for, counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's
        return True
    return True
