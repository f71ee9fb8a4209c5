"""One error base class; each subclass also inherits the matching builtin.

Messages say what was wrong, the value seen, and the fix. The CLI turns a
``KdcacheError`` into a one-line message and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping


class KdcacheError(Exception):
    """Base class of every error kdcache raises on purpose."""


class PipelineError(KdcacheError, ValueError):
    """A pipeline file or an override holds a missing, unknown or invalid value."""


class StoreError(KdcacheError, ValueError):
    """A store is missing, unreadable, of an unknown format, or not what was asked for."""


class DamagedStoreError(StoreError):
    """A store is there but damaged: its metadata (root, group or array ``zarr.json``, the manifest), a done marker, a
    zip member or a shard does not read back as the format says. ``kdcache verify`` reports it among its checks; any
    other StoreError (no store there, a newer format version, an option refused) is its one Error line."""


class DamagedShardError(DamagedStoreError):
    """A done shard of a store reads back wrong; ``problem`` says how (``"does not decode (...)"``)."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        # None: rebuilt from its message alone, as torch re-raises an error of a DataLoader worker (with one argument:
        # a class that cannot be made so reached the main process as a RuntimeError, a traceback)
        self.problem = message if problem is None else problem


class StoreMismatchError(StoreError):
    """An existing store was made from a different teacher, dataset, target set or geometry."""


class StoreReplacedError(StoreError):
    """The store at a location is not the one a reader opened there (another ``extract --overwrite``, a copy over it, or
    removed): its reads would mix the two stores' rows, or fail as damage."""


class UnreachableError(StoreError):
    """A read of a store's location failed on the way (connection, timeout, HTTP status, credentials): nothing says
    the store is damaged."""


class TargetError(KdcacheError, ValueError):
    """A teacher output or layer cannot be captured or stored as asked."""


class ShapeMismatchError(KdcacheError, ValueError):
    """A student output cannot be matched to a stored target's shape."""


class AlignmentError(KdcacheError, RuntimeError):
    """An input sample does not belong to the stored row it was paired with."""


class TrainingError(KdcacheError, RuntimeError):
    """Training cannot go on: its loss became NaN or inf."""


class TrainingStopped(KdcacheError, RuntimeError):
    """Training was asked to stop (SIGTERM: a scheduler's preemption or time limit) and saved a checkpoint to resume from
    (none where it stopped before its first step, waiting for its first batch)."""


class DataError(KdcacheError, RuntimeError):
    """The dataset raised reading an item (a missing file, a network read): possibly transient, so dask retries it."""


class ModelError(KdcacheError, RuntimeError):
    """A teacher's or student's forward pass raised: the model does not take the dataset's inputs."""


class DeviceMemoryError(ModelError):
    """A forward pass, or a model moved to its device, ran out of device memory: a smaller batch, or a less loaded (or larger)
    device, may do."""


class ModelTooLargeError(DeviceMemoryError):
    """A model moved to its device ran out of its memory (``data.move_model``): it does so again on every try there, where
    a smaller batch does not help."""


class LaunchError(KdcacheError, ValueError):
    """The environment a process was started in does not describe a run kdcache can join: torchrun's RANK, WORLD_SIZE,
    LOCAL_RANK or LOCAL_WORLD_SIZE not a count, out of range, or set without torchrun's MASTER_ADDR and MASTER_PORT."""


class JoinError(KdcacheError, ConnectionError):
    """A torchrun rank could not join the others: torchrun's store at MASTER_ADDR:MASTER_PORT, which the first machine's
    torchrun serves, does not answer or went away while the rank joined (that torchrun ended: one of its ranks failed)."""


class DataLoaderWorkerError(KdcacheError, RuntimeError):
    """A DataLoader worker process died: killed by a signal (``signal``: the out-of-memory killer's SIGKILL, a full
    /dev/shm's SIGBUS, a crash's SIGSEGV; None where torch did not say which) or exited on its own. ``pids``: the workers
    torch named. Made from torch's RuntimeError by ``worker_died``."""

    def __init__(self, message: str, pids: tuple[int, ...] = (), signal: int | None = None):
        super().__init__(message)
        self.pids, self.signal = tuple(pids), signal


class MissingDependencyError(KdcacheError, ImportError):
    """An optional dependency that a command needs (an extra of kdcache's package) is not installed."""


def need(module: str, extra: str, what: str) -> None:
    """Import ``module``, or raise a MissingDependencyError naming the extra that installs it: called before anything
    is built or written, so a command without its optional dependency stops at once, in one line."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{what} needs the Python package {(e.name or module).split('.')[0]!r}, which is not "
                                     f"installed; pip install 'kdcache[{extra}]'") from None


def transient(e: BaseException) -> bool:
    """Whether ``e`` may not happen again, so that dask retries the shard that raised it: the dataset's read, or a batch
    out of device memory (a GPU another process also uses, a batch of longer items than the probe's). Not a model larger
    than its device's free memory: it fails at once, before any batch, and would on every try."""
    return isinstance(e, (DataError, DeviceMemoryError)) and not isinstance(e, ModelTooLargeError)


def worker_message(e: BaseException) -> str:
    """``e``'s message. An error raised in a DataLoader worker process reaches the main process as the same class holding
    torch's text (``Caught X in DataLoader worker process N.`` and the worker's traceback): its last line, less the class
    name (``kdcache.errors.DataError: ``; a builtin's bare: ``RuntimeError: ``), is the worker's own message."""
    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback (most recent call last):" in text:
        name = type(e).__qualname__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"
        text = text.rstrip().splitlines()[-1].removeprefix(f"{name}: ")
    return text


# torch's words for a DataLoader worker that died, as its main process reports it: the SIGCHLD handler's (torch's C++
# _error_if_any_worker_fails: the signal as strsignal(3) names it, "Bus error" followed by a note on shared memory; or the
# exit code of one that exited), and the iterator's when it finds a worker gone (_try_get_data, raised from the first)
_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: ([^.\n]+)\.")
_EXITED = re.compile(r"DataLoader worker \(pid (\d+)\) exited unexpectedly with exit code (-?\d+)")
_GONE = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")
_SIGNALS = {signal.strsignal(s): s for s in signal.Signals if signal.strsignal(s)}
# a command's DataLoader workers' setting, and the settings that size what its workers hold in memory
_WORKERS = {"train": ("train.num_workers", "train.num_workers, train.memory_budget_mb or train.batch_size"),
            "extract": ("extract.num_workers", "extract.num_workers or extract.batch_size")}


def worker_died(e: BaseException, command: str = "", ended: Mapping[int, int] | None = None) -> DataLoaderWorkerError | None:
    """``e`` as a DataLoaderWorkerError where it reports a DataLoader worker that died during ``command`` ("train",
    "extract": the settings its fix names; "": any), else None: its message names the worker(s) and the signal, and the
    fix that signal calls for (the one line the CLI prints).

    torch reports one as a RuntimeError (its SIGCHLD handler's, raised wherever the main process was, or the iterator's,
    raised from it); it counts where ``e``'s own message quotes it (a ``ModelError``: the signal came in a forward pass),
    or ``e`` is not kdcache's own and it is anywhere in ``e``'s causes and contexts (torch's clean-up that failed after
    it). A kdcache error that merely followed one (a checkpoint write's) keeps its own line. ``ended``: the pids and exit
    codes (-N: killed by signal N) of the DataLoader's workers that had ended as ``e`` was raised (``data.ended_workers``):
    a worker killed as it handed a batch over leaves the main process no torch report but a ConnectionResetError (or
    EOFError) from the shared memory it was to read, which is then the worker's death too where ``e`` is not kdcache's."""
    if isinstance(e, DataLoaderWorkerError):  # said already
        return None
    reports = [str(x) for x in _chain(e) if not isinstance(x, KdcacheError) or x is e]
    reported = any(p.search(str(e)) for p in (_KILLED, _EXITED, _GONE)) or not isinstance(e, KdcacheError) and any(
        p.search(text) for p in (_KILLED, _EXITED, _GONE) for text in reports)
    died = {pid: code for pid, code in (ended or {}).items() if code != 0}
    if not reported and (isinstance(e, KdcacheError) or not died):
        return None
    pids: list[int] = []
    sig = code = None
    for text in reports if reported else ():
        for m in _KILLED.finditer(text):
            pids.append(int(m.group(1)))
            sig = sig or _SIGNALS.get(m.group(2).strip())
        for m in _EXITED.finditer(text):
            pids.append(int(m.group(1)))
            code = int(m.group(2)) if code is None else code
        for m in _GONE.finditer(text):
            pids += [int(p) for p in m.group(1).replace(",", " ").split()]
    for pid, status in died.items():  # the exit status torch's words may lack ("pid(s) N exited unexpectedly")
        pids.append(pid)
        if sig is None and code is None:
            sig, code = (_signal(-status), None) if status < 0 else (None, status)
    pids = list(dict.fromkeys(pids))
    workers, smaller = _WORKERS.get(command, ("num_workers", "num_workers or the batch size"))
    several = len(pids) > 1
    who = (f"{command}'s " if command else "a ") if not several else (f"{command}'s " if command else "")
    who += f"DataLoader worker{'s' * several} (pid{'s' * several} {', '.join(map(str, pids))})"
    was = "were" if several else "was"
    if sig == signal.SIGKILL:
        said = (f"{who} {was} killed by SIGKILL, most likely by the out-of-memory killer (dmesg names the pid it killed); give the "
                f"workers less to hold: lower {smaller}, then rerun")
    elif sig == signal.SIGBUS:
        said = (f"{who} {was} killed by SIGBUS, most likely a full /dev/shm (the shared memory workers hand their batches over "
                f"in); enlarge it (docker run --shm-size=8g; Kubernetes: an emptyDir of medium Memory) or lower {workers}, then rerun")
    elif sig is not None or code is not None:
        how = f"{was} killed by {signal.Signals(sig).name}" if sig is not None else f"exited with exit code {code}"
        said = (f"{who} {how}: the dataset's code (or a library it calls) crashed in it; set {workers} = 0 to see its error in "
                "the main process, fix it, then rerun")
    else:
        said = (f"{who} ended unexpectedly, torch did not say how (most likely the out-of-memory killer, which dmesg names, else "
                f"a crash in the dataset's code); lower {smaller}, or set {workers} = 0 to see the dataset's error, then rerun")
    return DataLoaderWorkerError(said, tuple(pids), sig)


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and its causes and contexts, each once, nearest first."""
    chain, seen, todo = [], set(), [e]
    while todo:
        x = todo.pop(0)
        if x is not None and id(x) not in seen:
            seen.add(id(x))
            chain.append(x)
            todo += [x.__cause__, x.__context__]
    return chain


def _signal(number: int) -> int | None:
    try:
        return signal.Signals(number)
    except ValueError:  # a real-time signal
        return None


def own_messages(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator of the function that runs ``command`` ("train", "extract"): a KdcacheError that a DataLoader worker
    raised is raised with its own message again (``worker_message``): ``kdcache.train(...)`` raises what ``kdcache train``
    prints, not torch's text around it. An attribute torch's text was given to (torch rebuilds the error from it alone:
    ``DamagedShardError.problem``) gets the worker's message too. A DataLoader worker that died (``worker_died``) is a
    DataLoaderWorkerError naming it and the fix, where torch's RuntimeError was a traceback."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except KdcacheError as e:
                torch_text, own = str(e), worker_message(e)
                if own != torch_text:  # a worker's (else left as raised: an error of several arguments keeps them)
                    e.args = (own,)
                    for name, value in vars(e).items():
                        if isinstance(value, str) and value == torch_text:
                            setattr(e, name, own)
                if (died := worker_died(e, command)) is not None:  # a forward pass the SIGCHLD handler raised in
                    raise died from None
                raise
            except Exception as e:
                if (died := worker_died(e, command)) is not None:
                    # the first report, where this is torch's SIGCHLD handler's again, raised in the clean-up after it: that
                    # one was said already (in train with --resume after a checkpoint: _epochs)
                    raise next((x for x in _chain(e) if isinstance(x, DataLoaderWorkerError)), died) from None
                raise

        return call

    return decorate


# How a message names an option the user gave: the command line's flag while a ``kdcache`` command runs (the CLI sets
# COMMAND_LINE, see ``command_line``), else the argument of the Python function called (``kdcache.train(..., resume=True)``),
# so that the fix a message names is one its reader can type. Other options are the CLI's alone.
COMMAND_LINE = False
OPTIONS = {"--out": "out", "--cache": "cache_location", "--resume": "resume=True", "--overwrite": "overwrite=True",
           "--allow-partial": "allow_partial=True", "--teacher-check": "teacher_check"}


def option(flag: str, argument: str | None = None) -> str:
    """``flag`` (``"--resume"``) as the caller names it: itself under the CLI, else the Python argument (``argument``, by
    default ``OPTIONS[flag]``: ``"resume=True"``)."""
    return flag if COMMAND_LINE else argument or OPTIONS[flag]


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """While a CLI command runs: messages name its flags (``option``). Threads and forked processes see it too."""
    global COMMAND_LINE
    before, COMMAND_LINE = COMMAND_LINE, True
    try:
        yield
    finally:
        COMMAND_LINE = before


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one line of at most ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any) -> str:
    """``repr(value)``, cut to 80 characters: a value from a store or a pipeline, quoted in a message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def count(n: int, noun: str, plural: str = "") -> str:
    """``n`` and its noun, plural unless ``n`` is 1 (``1 shard``, ``1,024 samples``; ``plural``: where not noun + "s")."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def raised(e: BaseException) -> str:
    """``Type: message (at file.py:line)`` for an exception from the user's code, in one line of at most ~300
    characters. The line is the innermost frame outside torch and kdcache (in the user's code, or in another
    library it called); there is none when only those two ran."""
    import torch

    libraries = tuple(str(Path(m.__file__).parent) + os.sep for m in (torch, sys.modules["kdcache"]))
    users = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(libraries)]
    message = one_line(e) if str(e).strip() else ""
    where = f" (at {Path(users[-1].filename).name}:{users[-1].lineno})" if users else ""
    return f"{type(e).__name__}: {message}{where}"


def write_fix(e: OSError) -> str:
    """The fix a failed write's message names, from its errno."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make the folder writable (or choose another location)"
    if e.errno == errno.EFBIG:  # past the process's RLIMIT_FSIZE (a batch system's file size limit), or the file system's
        return "lift the file size limit (ulimit -f; or the file system's largest file, 4 GiB on FAT32)"
    return "fix the cause"
