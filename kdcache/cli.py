"""The ``kdcache`` command: click glue over the Python API. Errors become one-line messages here."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import gc
import io
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from kdcache import __version__
from kdcache.errors import JoinError, KdcacheError, TrainingStopped, command_line, count, one_line, worker_message
from kdcache.threads import MAX_PARALLEL, reads_stuck


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a KdcacheError (a user mistake) into ``Error: <message>`` and exit 1, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _command_started()
        if (distributed := sys.modules.get("kdcache.distributed")) is not None:  # an earlier command's (torch imported already)
            distributed.new_command()
        started = time.time()
        try:
            with _dropped_signals_sent_again(), _ctrl_c_outside_finalizers(), _sigterm_as_ctrl_c(), _quiet_handoffs(), command_line():  # messages name the command's flags (--out), not the API's arguments
                return fn(*args, **kwargs)
        except KeyboardInterrupt as e:  # Ctrl-C: one line saying what is kept and how to go on, exit 130 (as a shell says)
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            term = isinstance(e, _Terminated)
            stop = _Stopped if term else _Interrupted  # SIGTERM: exit 143, as a process it ended says
            if os.environ.get("RANK", "0") not in ("", "0"):  # torchrun: every rank gets the terminal's Ctrl-C; rank 0 says it
                sys.exit(stop.exit_code)
            raise stop(f"{'stopped by SIGTERM' if term else 'interrupted'}; {_after_interrupt(fn.__name__, kwargs, started)}") from None
        except TrainingStopped as e:  # SIGTERM: a checkpoint was saved; exit 143, as a process ended by SIGTERM says
            if os.environ.get("RANK", "0") not in ("", "0"):  # torchrun: every rank stopped at the same step; rank 0 says it
                sys.exit(_Stopped.exit_code)
            # its advice is train's options'; a command that trains for its own ends (demo) says how to rerun itself
            raise _Stopped(str(e) if fn.__name__ == "train" else f"stopped by SIGTERM; {_after_interrupt(fn.__name__, kwargs, started)}") from None
        except KdcacheError as e:
            # zarr's reads still running when one failed are dropped at exit; asyncio would report each
            # ("Task was destroyed but it is pending!") after the one Error line.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            if isinstance(e, JoinError) and os.environ.get("LOCAL_RANK", "0") not in ("", "0"):  # each machine's first rank says it
                sys.exit(1)
            _say_to_the_ranks(fn.__name__, _message(e))
            raise click.ClickException(_message(e)) from None
        except RuntimeError as e:
            rank = os.environ.get("RANK", "?")
            if _peer_gone(e):
                raise click.ClickException(f"rank {rank} stopped because another rank ended first (its own error, or how torchrun saw it "
                                           "end, is printed above); fix what that one says and rerun") from None
            if _peer_silent(e):
                raise click.ClickException(f"rank {rank} gave up waiting for the other ranks in a collective ({_gloo_text(e)}): a rank is "
                                           "hung (a stalled read, a stopped process) or its machine is unreachable; find that one, then "
                                           "rerun (train: with --resume, from the last checkpoint; a training step waits train.rank_timeout_s for a rank)") from None
            _say_to_the_ranks(fn.__name__, _traceback_line(e))
            raise
        except Exception as e:  # a usage error (click's), or a bug or an OSError: its traceback follows
            _say_to_the_ranks(fn.__name__, e.format_message() if isinstance(e, click.ClickException) else _traceback_line(e))
            raise

    return wrapper


def _traceback_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {one_line(e)} (it prints its traceback)"


def _say_to_the_ranks(command: str, line: str) -> None:
    """Under torchrun, ``train`` or ``extract`` that ended with ``line`` on this rank before it began joining the others:
    the ranks waiting for it to join stop with it (``distributed.say_failed_before_joining``), where those on another
    machine waited 12 hours."""
    if command not in ("train", "extract") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # not under torchrun
        return
    with contextlib.suppress(Exception):  # never in the way of the rank's own line
        from kdcache import distributed

        distributed.say_failed_before_joining(line)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C is, so that every clean-up for Ctrl-C runs. A subclass, not KeyboardInterrupt itself:
    CPython remembers a KeyboardInterrupt that left code it ran through ``PyRun_*`` (as C extensions do) and, even
    when it was handled, ends the process by SIGINT once the command has said its line and exited 143."""


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption or time limit, ``kill``) stops a command as Ctrl-C does, where Python's
    default would end the process on the spot: what is written is kept, DataLoader workers are stopped, and a writer
    lock is released (an S3 store's lock object would otherwise refuse a requeued job until it goes stale).
    ``train`` takes SIGTERM itself while it trains, to save a checkpoint first. Later SIGTERMs are ignored while the
    command cleans up (a scheduler may send several: Slurm signals every process of a job, and torchrun passes its own
    on); Ctrl-C or SIGKILL end it at once. Signals reach the main thread only: elsewhere (a caller's thread) SIGTERM
    is left as it is. A SIGTERM while the command ends with its own error (in the clean-up after it) leaves that error to be
    said; one while it handles an error it recovers from stops it just after. Under torchrun only rank 0 takes it so (it holds the writer lock and speaks): the other ranks
    end at once, as before, for torchrun also SIGTERMs them when another rank fails, often while they still import
    their modules, where an exception raised on the spot would leave a module half made and a traceback. While a rank
    waits for the others to join (torch's ``init_process_group``, where this handler could not run) SIGTERM ends it at
    once (``distributed._ended_at_once_while_joining``)."""
    if threading.current_thread() is not threading.main_thread() or os.environ.get("RANK", "0") not in ("", "0"):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        if isinstance(sys.exc_info()[1], KdcacheError) or _put_off(signum, frame):  # it came while the command cleans up after its
            # own error, which it goes on to say (torchrun SIGTERMs rank 0 once another rank has said the same refusal and
            # ended); or while it handles one it recovers from (a probe's), and goes on; or in a finalizer, which would drop
            # it: sent again shortly, it stops the command then
            _send_later(signum, stop)
            return
        signal.signal(signum, signal.SIG_IGN)
        raise _sent_again_if_dropped(_Terminated(), signum, stop)

    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop)
    stop.running = True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        stop.running = False  # type: ignore[attr-defined]
        _PUT_OFF_SINCE.pop(signal.SIGTERM, None)  # one put off as the command ended: the next command's counts afresh
        # the kdcache program: the command has ended (its files written, its exit status decided) and the process only
        # says so and exits; a SIGTERM now is ignored, not Python's default that would end it by the signal (-15, with
        # "Terminated" where a shell said it finished or gave its Error line). A caller of main() in-process gets its handler back.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if _PROGRAM else before if before is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _quiet_handoffs() -> Iterator[None]:
    """A DataLoader worker hands each batch's tensors over by file descriptor, from a thread of multiprocessing's
    (``resource_sharer``) that the main process connects to. A command stopped (SIGTERM, Ctrl-C, an error) ends its
    workers mid-batch, and that thread, its connection cut, printed a traceback (EOFError, a reset connection, a failed
    handshake) after the command's one line. Those are dropped; any other error is printed as before. Installed for the
    command's run, in this process and so in the workers it forks."""
    before = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, (EOFError, OSError, multiprocessing.AuthenticationError)) and any(
                Path(frame.f_code.co_filename).match("multiprocessing/resource_sharer.py") for frame, _ in traceback.walk_tb(tb)):
            return
        before(kind, value, tb)

    sys.excepthook = hook
    try:
        yield
    finally:
        if sys.excepthook is hook:
            sys.excepthook = before


@contextlib.contextmanager
def _ctrl_c_outside_finalizers() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as Python's own handler does, except in a finalizer (a ``__del__``, a
    ``weakref.finalize`` callback), where Python prints "Exception ignored in" and drops it: the command went on to the
    end, exit 0 (seen in CI: a dask Future collected in the driver as Ctrl-C came). There it is sent again moments later,
    once the finalizer has run. Installed in the main thread where Python's handler is (a SIGINT ignored, as in a job
    started in the background, stays ignored), for the command's run. Once the command has ended, the kdcache program
    ignores Ctrl-C, as SIGTERM: it only says its line and exits with the command's status (Python's handler, put back,
    raised KeyboardInterrupt in click's code after the command: "Aborted!", exit 1, after a command that had done its
    work and printed its result)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        if _put_off(signum, frame):
            _send_later(signum, interrupt)
            return
        raise _sent_again_if_dropped(KeyboardInterrupt(), signum, interrupt)

    signal.signal(signal.SIGINT, interrupt)
    interrupt.running = True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        interrupt.running = False  # type: ignore[attr-defined]
        _PUT_OFF_SINCE.pop(signal.SIGINT, None)
        if signal.getsignal(signal.SIGINT) is interrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN if _PROGRAM else signal.default_int_handler)


@contextlib.contextmanager
def _dropped_signals_sent_again() -> Iterator[None]:
    """The signal handlers' KeyboardInterrupt (Ctrl-C, SIGTERM's) raised in code whose exceptions Python drops that
    ``_in_code_to_finish_first`` does not see: a weakref's callback (a dask Comm collected leaves the WeakSet that lists it), a
    generator closed as it is collected (its ``finally``), a C object's finalizer that calls Python (an asyncio Task's
    "destroyed but pending" report). Python printed "Exception ignored in" and a traceback and went on, the command to
    its end, exit 0 (SIGTERM's handler had set later SIGTERMs to be ignored: they were too). The dropped exception is
    not printed; its signal is taken again, sent moments later. Installed in the main thread, for the command's run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        again = getattr(unraisable.exc_value, "_kdcache_send_again", None)
        if again is None or threading.current_thread() is not threading.main_thread():
            before(unraisable)
            return
        signum, handler = again
        if signal.getsignal(signum) is signal.SIG_IGN:  # SIGTERM's handler ignores later ones as it raises
            signal.signal(signum, handler)
        _send_later(signum, handler)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = before


def _sent_again_if_dropped(e: KeyboardInterrupt, signum: int, handler: Any) -> KeyboardInterrupt:
    """``e``, marked for ``_dropped_signals_sent_again``: where Python drops it, ``signum`` is sent again to ``handler``."""
    e._kdcache_send_again = (signum, handler)  # type: ignore[attr-defined]
    return e


PUT_OFF_S = 10.0  # the longest a signal waits for a finalizer, an import or a thread's start (a hung one is cut short)
_PUT_OFF_SINCE: dict[int, float] = {}


def _put_off(signum: int, frame: Any) -> bool:
    """Whether the handler of ``signum`` puts it off (sends it again moments later): ``frame`` runs in a finalizer, an
    import or a thread's start (``_in_code_to_finish_first``), for at most ``PUT_OFF_S`` since it was first put off.
    Forgotten as the command that put it off ends (its handlers removed): a command ended before the signal was sent
    again kept that time, and a later command in the same process (a caller of ``main``, CliRunner) took its own at
    once, inside its import. In Python a C library calls back (``_C_CALLBACKS``) it is put off however long that takes:
    while one of HDF5's calls writes a large dataset, every resend lands there again, and raised there, past the limit,
    it crashed the process as a first one did."""
    if _in_c_callback(frame):
        return True
    if not _in_code_to_finish_first(frame):
        _PUT_OFF_SINCE.pop(signum, None)
        return False
    if time.monotonic() - _PUT_OFF_SINCE.setdefault(signum, time.monotonic()) < PUT_OFF_S:
        return True
    del _PUT_OFF_SINCE[signum]
    return False


# Code that makes and starts a thread and keeps it in a module's globals: an exception raised there left the thread made
# but never started, where later use waits on it forever (an event loop nothing runs) or fails (zarr's clean-up at exit
# printed "cannot join thread before it is started" after the command's one line; CI, a preempted job's SIGTERM as its
# first store read made zarr's loop). Seen as (file, function).
_THREAD_STARTS = (("threading.py", "start"), ("zarr/core/sync.py", "_get_loop"), ("fsspec/asyn.py", "get_loop"))
# Python that a C library calls back and that must not raise: HDF5 writes an export through ``interop._Sink`` (h5py's
# fileobj driver), and does not recover from an exception there: raised in its seek or write, the stop was swallowed by
# h5py, the export said "exported … into OUT" of a file HDF5 had not written whole, and the process crashed (SIGSEGV,
# exit -11) as HDF5 closed it (tests/fuzz_signals.py). Seen as (file, qualified name's prefix).
_C_CALLBACKS = (("kdcache/interop.py", "_Sink."),)


def _in_c_callback(frame: Any) -> bool:
    """Whether ``frame`` runs in Python a C library calls back (``_C_CALLBACKS``)."""
    while frame is not None:
        code = frame.f_code
        if any(code.co_qualname.startswith(prefix) and Path(code.co_filename).as_posix().endswith(f"/{file}") for file, prefix in _C_CALLBACKS):
            return True
        frame = frame.f_back
    return False


def _in_code_to_finish_first(frame: Any) -> bool:
    """Whether ``frame`` runs in a finalizer, whose exceptions Python prints and drops, in an import, or as a thread is
    made and started (``_THREAD_STARTS``). Seen here, the signal waits until the finalizer is done, which then runs to
    its end (a dask Future's release); a finalizer this does not see (a weakref's callback, a generator's ``finally``)
    drops the exception, and ``_dropped_signals_sent_again`` sends it again. An import, too, runs to its end first:
    raised inside torch's (``kdcache.train`` imports it as train starts), the exception left torch half made, and the
    process was once aborted (SIGABRT, exit -6) instead of saying its line (CI: a preempted job's SIGTERM in its first
    second)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or (code.co_name == "__call__" and Path(code.co_filename).name == "weakref.py"):
            return True
        if code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        if any(code.co_name == name and Path(code.co_filename).as_posix().endswith(f"/{file}") for file, name in _THREAD_STARTS):
            return True
        frame = frame.f_back
    return False


def _send_later(signum: int, handler: Any) -> None:
    again = threading.Timer(0.1, _send_again, (signum, handler))
    again.daemon = True
    again.start()


def _send_again(signum: int, handler: Any) -> None:
    """A signal the main thread put off, sent to it again while ``handler`` still takes it, or while the command it was
    installed for runs (``handler.running``: train's own SIGTERM handler, installed as it trains, takes it then; put off
    as the run was set up, it was lost, and the job ran to its end) — not once the command has ended."""
    if signal.getsignal(signum) is handler or getattr(handler, "running", False):
        signal.pthread_kill(threading.main_thread().ident, signum)


_PROGRAM = False  # set by _Group.main when it runs as the kdcache program (argv, then exit), not for a caller's args (CliRunner)


def _peer_gone(e: RuntimeError) -> bool:
    """Under torchrun: a collective failed because another rank's process ended (it printed its own error)."""
    text = str(e)
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "remote worker crashing"))


def _peer_silent(e: RuntimeError) -> bool:
    """Under torchrun: a gloo collective gave up waiting for another rank (``distributed.TIMEOUT``), which neither ended
    nor answered: gloo's RuntimeError was a traceback."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and re.search(r"Timed out waiting \d+ ?ms for (recv|send) operation", str(e)) is not None


def _gloo_text(e: RuntimeError) -> str:
    """gloo's message without the source location it starts with (``[/path/unbound_buffer.cc:78] Timed out …``)."""
    return re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0])


def _after_interrupt(command: str, options: dict[str, Any], started: float) -> str:
    """What an interrupted command leaves, and how to go on."""
    if options.get("dry_run"):  # extract --dry-run writes nothing, whatever --out names
        return "a dry run writes nothing: run the same command again"
    if command in ("extract", "import_"):
        if options.get("overwrite") and _made_before(options.get("out") or options.get("store"), started):
            return "the store there is unchanged (--overwrite had not replaced it yet): run the same command again to start afresh"
        done = _shards_done(options.get("out") or options.get("store"))
        if done == 0:
            return "no shard was written: run the same command again"
        again = "run it again without --overwrite" if options.get("overwrite") else "run the same command again"
        kept = "any shards written are kept" if done is None else f"the {count(done, 'shard')} done so far {'is' if done == 1 else 'are'} kept"
        return f"{kept}: {again} to resume"
    if command == "train":
        # train._checkpoint_file's rule, spelled here: importing kdcache.train (torch) in a signal's handler may land inside
        # torch's own import, which an early SIGTERM interrupted
        checkpoint = Path(options["out"]) / "checkpoint.pt"
        if not checkpoint.exists() and checkpoint.with_name("checkpoint.pt.next").exists():  # stopped while an --overwrite
            checkpoint = checkpoint.with_name("checkpoint.pt.next")  # replaced the earlier run's files: --resume continues it
        if _changed_since(checkpoint, started):  # this run saved a checkpoint
            again = ("run the same command again" if options.get("resume") or options.get("auto_resume") else
                     "run it again with --resume instead of --overwrite" if options.get("overwrite") else "run it again with --resume")
            return f"its last checkpoint is kept: {again} to continue"
        if options.get("resume") or (options.get("auto_resume") and checkpoint.exists()):
            return "no new checkpoint was saved: run the same command again to continue from the last one"
        if options.get("overwrite"):
            return (f"no checkpoint was saved, so {str(options['out'])!r} still holds the earlier run, unchanged: run the same command "
                    "again to start afresh")
        return "no checkpoint was saved: run the same command again"
    if command in ("pack", "export"):
        return _file_after_interrupt(options.get("out"), started)
    return {"demo": "run the same command again (the demo starts afresh)"}.get(command, "nothing was changed")


def _file_after_interrupt(out: str | None, started: float) -> str:
    """What a stopped pack or export leaves: nothing (its temporary file removed), or, stopped once it had renamed
    the file into place (as it synced the folder, said its notes, printed its line), ``out`` whole, which its line
    said was not written: a rerun was refused, the file there."""
    if out is not None and _changed_since(Path(out), started):
        return f"{out!r} was written whole before it stopped and is kept: there is nothing to run again"
    return "no file was written"


def _changed_since(path: Path, started: float) -> bool:
    """Whether the file at ``path`` was written by the command that started at ``started``: told by its ctime, which no
    copy sets (cp -p, rsync -a and tar x keep a modification time, one from a machine whose clock runs ahead too, and an
    earlier file or checkpoint so dated, left as it was, was said to be this run's)."""
    try:
        return path.stat().st_ctime >= started
    except OSError:  # none there
        return False


def _made_before(location: str | None, started: float) -> bool:
    """Whether the local store at ``location`` was created before ``started`` (an --overwrite stopped before it replaced
    the store: nothing of the new one was written). Not known (False) for other locations: no request is made."""
    try:  # the import too: an interrupt may have left a module it needs half made
        from kdcache.storage import location_kind
        from kdcache.store import open_store

        if not location or location_kind(location) != "local":
            return False
        created = datetime.datetime.fromisoformat(open_store(location).manifest["created"])
    except Exception:  # noqa: BLE001 - no store there, or one without a manifest yet: it was not kept from before
        return False
    return created.timestamp() < int(started)  # "created" has whole seconds


def _shards_done(location: str | None) -> int | None:
    """The shards done in the local store at ``location``, 0 where there is no store yet (what an interrupted extract or
    import leaves); None where not known: another kind of location (no request is made) or a store that cannot be read."""
    try:  # the import too: an interrupt may have left a module it needs half made
        from kdcache.storage import location_kind
        from kdcache.store import open_store

        if not location or location_kind(location) != "local":
            return None
        if not (Path(location) / "zarr.json").exists():
            return 0
        return int(open_store(location).done().sum())
    except Exception:  # noqa: BLE001 - a store begun without its arrays yet, or damaged: not known
        return None


class _Interrupted(click.ClickException):
    exit_code = 130


class _Stopped(click.ClickException):
    exit_code = 128 + signal.SIGTERM


def _message(e: BaseException) -> str:
    """The error's one line (a DataLoader worker's: its own message, ``worker_message``). Characters that are not
    printable are shown escaped (``\\x1b``, ``\\n``): a message may quote a store's strings (a target's name, zarr's
    words for a damaged zarr.json quote its value), whose escape sequences and line breaks would reach the terminal raw."""
    from kdcache.store import printable

    return printable(worker_message(e))


@contextlib.contextmanager
def _one_line_usage() -> Iterator[None]:
    """Show a click usage error as one line, ``Error: <message> (see 'kdcache <cmd> --help')``, not usage + hint + error."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # plain ``kdcache``: the help text
    except click.UsageError as e:
        if e.ctx is None:
            raise  # already one line
        raise click.UsageError(f"{e.format_message().rstrip('.')} (see '{e.ctx.command_path} --help')") from None


class _Group(click.Group):
    """The ``kdcache`` group: every usage error of it and its commands is one line (exit 2)."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        global _PROGRAM
        # the console script and ``python -m kdcache``: the process's arguments, and click ends the process after the command
        _PROGRAM = args is None and kwargs.get("standalone_mode", True) and threading.current_thread() is threading.main_thread()
        if _PROGRAM:  # the last exit handler: Python's collection at shutdown then skips every object alive (0.3-1 s of a
            atexit.register(gc.freeze)  # train or extract process walking torch's modules), cycles' finalizers with them
        try:
            return super().main(args, *rest, **kwargs)
        except SystemExit as e:
            if _PROGRAM and e.code in (_Interrupted.exit_code, _Stopped.exit_code):
                _end_past_stuck_reads(e.code)
            raise
        finally:  # its SystemExit caught in-process, a command run after it (a command's own main) is not the program: it
            _PROGRAM = False  # gives the caller's SIGTERM handler back, where it left SIGTERM ignored

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_usage(), _ctrl_c_before_the_command(None):
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage(), _ctrl_c_before_the_command(ctx):
            return super().invoke(ctx)


def _end_past_stuck_reads(code: int) -> None:
    """A command stopped by Ctrl-C or SIGTERM (exit ``code``) has said its line and saved what it keeps; a read still under
    way after ``threads.EXIT_READ_WAIT`` (a stalled network mount, an object store that stopped answering: a streaming
    train's next buffer) is left, the process ending at once, as the signal would have ended it: the interpreter's exit
    would wait for its thread, for ever or until its timeout (minutes), past a scheduler's grace. The exit handlers are
    skipped then (those of kdcache wait for what is stuck)."""
    if not reads_stuck():
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


_STARTED = "kdcache.command_started"  # in the click context's meta (shared by the group's and the command's)


def _command_started() -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_STARTED] = True


@contextlib.contextmanager
def _ctrl_c_before_the_command(ctx: click.Context | None) -> Iterator[None]:
    """A Ctrl-C while click parses the command line, before the command's handlers are installed (``_errors``), is one
    line and exit 130, as during the command: Python's handler raised KeyboardInterrupt there, which click said as an
    empty line and "Aborted!", exit 1. One after the command (a caller of ``main`` in-process, where Python's handler
    is back) is raised on as it was."""
    try:
        yield
    except KeyboardInterrupt:
        if ctx is not None and ctx.meta.get(_STARTED):
            raise
        raise _Interrupted("interrupted before the command started; nothing was done") from None


def _named(what: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """A callback refusing an empty location, naming ``what`` it must name: an empty one would be the current folder (a
    store written into it, or read from it: "no store at ''")."""
    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise click.BadParameter(f"{value!r} is empty; name {what}")
        return value
    return check


class _PipelinePath(click.Path):
    """A pipeline file's path (no folder), naming a store or run given in its place: ``kdcache train STORE --cache
    PIPELINE`` was told "File 'STORE' is a directory", with no word of the order."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from kdcache.pipeline import PIPELINE_FIRST, not_a_pipeline

        kind = not_a_pipeline(value) if isinstance(value, (str, os.PathLike)) and str(value).strip() else None
        if kind is not None:
            self.fail(f"{str(value)!r} is {kind}, not a pipeline file; {PIPELINE_FIRST}", param, ctx)
        return super().convert(value, param, ctx)


_not_blank = _named("the folder or file to write")
_a_store = _named("a store to read: a folder, a .zarr.zip file or a URL")
_a_pipeline = _named("a pipeline file (.toml)")


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """NaN would pass every comparison (a check that always holds), inf too."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number; use a number >= 0")
    return value


def _load(pipeline: str, overrides: tuple[str, ...], **flags: Any) -> Any:
    """The pipeline with its ``--set`` overrides, then the shortcut flags' values (``flags``: pipeline key -> value, None
    where the flag was not given), which messages about them name as the flag (``--epochs 0``), not as a --set."""
    from kdcache.pipeline import load

    extra = {f"{key}={_toml(value)}": key for key, value in flags.items() if value is not None}
    given = {item: f"{FLAGS[key]} {_flag_value(flags, key)}" for item, key in extra.items()}
    return load(pipeline, list(overrides) + list(extra), given=given)


FLAGS = {"extract.batch_size": "--batch-size", "extract.device": "--device", "targets.layers": "--layers", "train.epochs": "--epochs",
         "train.steps": "--epochs", "train.batch_size": "--batch-size", "train.device": "--device", "train.eval_cache": "--eval-cache"}


def _flag_value(flags: dict[str, Any], key: str) -> str:
    """The value a shortcut flag was given, as typed (``train.steps`` is set to 0 by ``--epochs N``: N)."""
    value = flags["train.epochs"] if key == "train.steps" else flags[key]
    return ",".join(value) if isinstance(value, list) else str(value)


def _sets(override: str, section: str, key: str) -> bool:
    """Whether ``override`` gives ``section.key`` a value, dotted (``train.steps=5``) or in a table (``train={steps=5}``);
    a table that leaves the key out (``train={lr=0.1}``, which resets it to its default) does not."""
    from kdcache.pipeline import apply_override

    raw: dict[str, Any] = {}
    apply_override(raw, override)
    return isinstance(raw.get(section), dict) and key in raw[section]


def _toml(value: Any) -> str:
    """A flag's value as TOML text that reads back as the value. JSON's ASCII escapes are not TOML's for a character
    beyond the BMP (a surrogate pair, which TOML refuses: the override then took the JSON text, quotes and all, as
    the value), and TOML wants DEL escaped, which JSON leaves as is."""
    if isinstance(value, list):
        return f"[{', '.join(map(_toml, value))}]"
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def set_option(example: str) -> Callable[..., Any]:
    """The --set option, with an example that applies to the command."""
    return click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                        help=f"Override a pipeline value (repeatable), e.g. --set {example}.")


progress_option = click.option(
    "--progress/--no-progress", default=None, help="Show a progress bar (default: only on a terminal)."
)
storage_option = click.option(
    "--storage-option", "storage_items", multiple=True, metavar="KEY=VALUE",
    help="fsspec option for a URL location (repeatable), e.g. --storage-option endpoint_url=http://host:9000; "
         "VALUE is JSON when it parses (true, 3), else a string; a.b=v nests. Credentials also come from the environment.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def _storage_options(items: tuple[str, ...]) -> dict[str, Any] | None:
    """``("key=value", "client_kwargs.region_name=x")`` -> fsspec storage options (values JSON-decoded when possible)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="'--storage-option'")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        *parents, leaf = key.strip().split(".")
        node = options
        for depth, part in enumerate(parents, 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                _refuse_both(".".join(parents[:depth]), node, item)
        if isinstance(node.get(leaf), dict):  # a.b=2, then a=1: its settings would be lost; a={"c": 3}: added to them
            if not isinstance(parsed, dict):
                _refuse_both(key.strip(), node[leaf], item)
            _merge_settings(node[leaf], parsed, key.strip(), item)
            continue
        node[leaf] = parsed
    return options or None


def _merge_settings(settings: dict[str, Any], given: dict[str, Any], name: str, item: str) -> None:
    """Settings ``given`` as a JSON object to the storage option ``name`` added to ``settings``, those given before under
    it: ``client_kwargs.endpoint_url=URL`` then ``client_kwargs={"region_name": …}`` replaced the first, its endpoint
    dropped without a word (the command went to AWS's); in the other order both were kept, as now. A key given both a
    value and settings is refused (``_refuse_both``); a value given again replaces the earlier, as ``a.b=1 a.b=2`` does."""
    for key, value in given.items():
        before = settings.get(key)
        if isinstance(before, dict) and isinstance(value, dict):
            _merge_settings(before, value, f"{name}.{key}", item)
        elif isinstance(before, dict) or (isinstance(value, dict) and key in settings):
            _refuse_both(f"{name}.{key}", before, item)
        else:
            settings[key] = value


def _refuse_both(name: str, value: Any, item: str) -> None:
    """One storage option ``name`` given both a value and settings nested under it (``a=1`` and ``a.b=2``, in either order):
    the later would silently drop the earlier."""
    seen = (f"would replace the settings {sorted(value)} already given under {name}" if isinstance(value, dict) else
            f"nests under {name}, already given the value {value!r}")
    raise click.BadParameter(f"{item} {seen}; give {name} either one value or settings {name}.NAME=VALUE, not both",
                             param_hint="'--storage-option'")


@click.group(name="kdcache", cls=_Group)
# the running code's version, as the stores it writes record it (kdcache_version): an installed distribution's
# metadata is the version at install time, stale in an editable install (pip install -e .) after a pull
@click.version_option(version=__version__, package_name="kdcache")
def main() -> None:
    """Offline knowledge distillation: run the teacher once, train students from its cached outputs."""


@main.command(short_help="Run the teacher once over a dataset into a store.")
@click.argument("pipeline", type=_PipelinePath(dir_okay=False), callback=_a_pipeline)
@click.option("--out", callback=_not_blank, help="Store to write: a folder (by convention ending in .zarr) or an fsspec URL (s3://bucket/run.zarr).")
@set_option("extract.batch_size=64")
@click.option("--batch-size", type=int, help="Shortcut for --set extract.batch_size=N.")
@click.option("--device", help="Shortcut for --set extract.device=DEVICE (auto, cpu, cuda, cuda:N).")
@click.option("--layers", help="Shortcut for --set targets.layers=a,b (comma-separated module names).")
@click.option("--overwrite", is_flag=True, help="Start afresh even if OUT holds a store.")
@click.option("--dry-run", is_flag=True, help="Validate, run one batch, print shapes and the estimated size, and check --out as the run would; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--workers", type=click.IntRange(min=1, max=MAX_PARALLEL), help="Extract on a local dask cluster: one worker per GPU, or N CPU worker processes.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", help="Extract on the dask cluster at this scheduler address (with its own workers: not with --workers).")
@storage_option
@progress_option
@_errors
def extract(pipeline: str, out: str | None, overrides: tuple[str, ...], batch_size: int | None, device: str | None,
            layers: str | None, overwrite: bool, dry_run: bool, as_json: bool, workers: int | None, scheduler: str | None,
            storage_items: tuple[str, ...], progress: bool | None) -> None:
    """Run the teacher of PIPELINE once over its dataset and write its outputs into a store.

    With --workers or --scheduler the shards are spread over dask workers; under torchrun
    (WORLD_SIZE > 1) over its ranks. The store is the same either way (docs/CLUSTER.md)."""
    import kdcache

    layer_list = [x.strip() for x in layers.split(",") if x.strip()] if layers is not None else None
    p = _load(pipeline, overrides, **{"extract.batch_size": batch_size, "extract.device": device, "targets.layers": layer_list})
    if dry_run:
        _refuse_torchrun("kdcache extract --dry-run", "; without --dry-run, kdcache extract runs under torchrun (its ranks share "
                         "the shards)")
        if not out and (overwrite or storage_items):  # they would check nothing: said, not dropped in silence
            given = "--overwrite" if overwrite else "--storage-option"
            raise click.UsageError(f"{given} is about the store --out names, but there is no --out; add --out OUT (the dry run "
                                   f"then checks OUT as the run would), or drop {given}")
        # OUT looked at as the run would (refusals in its words), where given; written nothing, nor locked
        report = kdcache.dry_run(p, out, overwrite=overwrite, storage_options=_storage_options(storage_items)) if out else kdcache.dry_run(p)
        click.echo(json.dumps(report, indent=2) if as_json else _dry_run_text(report))
        return
    if not out:
        raise click.UsageError("Missing option '--out' (the store to write), or pass --dry-run")
    options = _storage_options(storage_items)
    # checks identity even when complete
    info = _scaled_extract(p, out, workers, scheduler)(p, out, overwrite=overwrite, progress=_progress(progress), storage_options=options)
    if int(os.environ.get("RANK", 0)) != 0:
        return  # under torchrun, rank 0 reports
    _say_resumed(out, info)
    click.echo(json.dumps(info, indent=2) if as_json else _info_text(info))


def _say_resumed(out: str, info: dict[str, Any]) -> None:
    """The line (stderr) on a run that found OUT complete, or resumed it: from the shards it wrote (``shards_written``,
    counted under the writer lock; a count taken before it was wrong where another resume finished the store meanwhile)."""
    done_before = info["num_shards"] - info["shards_written"]
    if done_before == info["num_shards"]:
        from kdcache.locking import may_not_lock

        redo = "" if may_not_lock(out) else " (--overwrite to redo it)"  # a read-only mount: an --overwrite cannot work there
        click.echo(f"{out} is already complete ({count(info['num_samples'], 'sample')}); nothing to do{redo}", err=True)
    elif done_before:
        click.echo(f"resumed {out}: {done_before} of {count(info['num_shards'], 'shard')} {'was' if done_before == 1 else 'were'} already done; "
                   "this run wrote the others", err=True)


def _scaled_extract(pipeline: Any, out: str, workers: int | None, scheduler: str | None) -> Callable[..., dict[str, Any]]:
    """The extract function for how this command was started: dask (--workers/--scheduler), torchrun, or one process."""
    import kdcache
    from kdcache import distributed

    if workers is not None and scheduler is not None:
        raise click.UsageError(f"--workers {workers} starts a local dask cluster and --scheduler {scheduler} uses an existing one "
                               "(whose workers were started with it); pass one of them")
    if workers is not None or scheduler is not None:
        if distributed.ranks()[1] > 1:
            raise click.UsageError("--workers/--scheduler start dask workers; under torchrun leave them out (the ranks are the workers)")
        return functools.partial(distributed.extract_distributed, workers=workers, scheduler=scheduler)
    return distributed.extract_torchrun if distributed.ranks()[1] > 1 else kdcache.extract


@main.command(short_help="Train a student from a store alone (the teacher is never built).")
@click.argument("pipeline", type=_PipelinePath(dir_okay=False), callback=_a_pipeline)
@click.option("--cache", "cache_location", required=True, callback=_a_store, help="Store written by kdcache extract (the only source of targets).")
@click.option("--out", required=True, callback=_not_blank, help="Output folder: student.pt, heads.pt, metrics.jsonl, pipeline.json, checkpoint.pt.")
@set_option("train.lr=0.001")
@click.option("--epochs", type=int, help="Shortcut for --set train.epochs=N --set train.steps=0 (N epochs, even where the pipeline sets steps).")
@click.option("--batch-size", type=int, help="Shortcut for --set train.batch_size=N.")
@click.option("--device", help="Shortcut for --set train.device=DEVICE.")
@click.option("--eval-cache", callback=_named("a store of the eval split (leave --eval-cache out for none)"), help="Shortcut for --set train.eval_cache=STORE (a store of the eval split).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
@click.option("--auto-resume", is_flag=True, help="Continue the run in OUT if it holds a checkpoint, else start one (a job a scheduler requeues).")
@click.option("--overwrite", is_flag=True, help="Start afresh even if OUT holds a run.")
@click.option("--allow-partial", is_flag=True, help="Train on the completed shards of an incomplete store.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as one JSON object (training's notes under \"notes\").")
@storage_option
@progress_option
@_errors
def train(pipeline: str, cache_location: str, out: str, overrides: tuple[str, ...], epochs: int | None, batch_size: int | None,
          device: str | None, eval_cache: str | None, resume: bool, auto_resume: bool, overwrite: bool, allow_partial: bool,
          as_json: bool, storage_items: tuple[str, ...], progress: bool | None) -> None:
    """Train the student of PIPELINE from the store CACHE alone (the teacher is never built)."""
    from kdcache.train import train as run_training

    if sum((resume, auto_resume, overwrite)) > 1:
        given = " and ".join(name for name, on in (("--resume", resume), ("--auto-resume", auto_resume), ("--overwrite", overwrite)) if on)
        raise click.UsageError(f"{given} were given; --resume continues the run in OUT, --auto-resume continues it if it has a "
                               "checkpoint (else starts it), --overwrite replaces it: pass one of them")
    if epochs is not None and any(_sets(o, "train", "steps") for o in overrides):
        raise click.UsageError("--epochs N trains N epochs and --set train.steps=S exactly S steps; pass one of them")
    p = _load(pipeline, overrides, **{"train.epochs": epochs, "train.steps": None if epochs is None else 0,
                                      "train.batch_size": batch_size, "train.device": device,
                                      "train.eval_cache": eval_cache})
    # --json: stdout is one JSON object, so the notes training prints (a projection head made, a run resumed) go into it
    with contextlib.redirect_stdout(io.StringIO()) if as_json else contextlib.nullcontext() as notes:
        result = run_training(p, cache_location, out, resume="auto" if auto_resume else resume, overwrite=overwrite, allow_partial=allow_partial,
                              progress=_progress(progress), storage_options=_storage_options(storage_items))
    if int(os.environ.get("RANK", 0)) != 0:
        return  # under torchrun, rank 0 reports
    if as_json:
        click.echo(json.dumps({**result, "notes": notes.getvalue().splitlines()}, indent=2))
    elif not result.get("already_finished"):  # a resume (--resume, --auto-resume) of a finished run: its one line is said
        shown = {k: v for k, v in result.items() if k.startswith(("loss", "eval")) or k in ("epoch", "step", "params")}
        click.echo("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
        click.echo(f"student written to {out}/student.pt")


@main.command(short_help="The MNIST demo: extract once, train three students, print a table.")
@click.option("--out", default="runs/demo", show_default=True, callback=_not_blank, help="Folder for the stores, students and summary.json.")
@set_option("train.steps=500")
@progress_option
@_errors
def demo(out: str, overrides: tuple[str, ...], progress: bool | None) -> None:
    """Run the embedded MNIST transfer-set demo: extract once, train three students, print the table."""
    from kdcache.demo import demo as run_demo

    run_demo(out, overrides=overrides, progress=_progress(progress), echo=click.echo)
    click.echo(f"summary written to {out}/summary.json")


@main.command(short_help="Summarise a store: teacher, dataset, targets, progress, size.")
@click.argument("store", callback=_a_store)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@storage_option
@_errors
def info(store: str, as_json: bool, storage_items: tuple[str, ...]) -> None:
    """Summarise a store: teacher, dataset, targets, progress, size and format version.

    STORE is a folder, a .zarr.zip file, or a URL (s3://..., https://..., any fsspec URL)."""
    from kdcache.store import open_store

    summary = open_store(store, storage_options=_storage_options(storage_items)).info()
    click.echo(json.dumps(summary, indent=2) if as_json else _info_text(summary))


@main.command(short_help="Check a store: completeness, checksums, values (and the teacher).")
@click.argument("store", callback=_a_store)
@click.option("--teacher-check", type=click.IntRange(min=0), default=0, metavar="N", help="Recompute N random rows with the pipeline's teacher.")
@click.option("--pipeline", type=_PipelinePath(dir_okay=False), callback=_a_pipeline, metavar="PIPELINE", help="Pipeline whose teacher and dataset --teacher-check uses.")
@set_option("extract.batch_size=64")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed choosing the --teacher-check rows.")
@click.option("--tolerance", type=click.FloatRange(min=0), callback=_finite, help="Relative tolerance of --teacher-check (default by precision and dtype).")
@json_option
@storage_option
@_errors
def verify(store: str, teacher_check: int, pipeline: str | None, overrides: tuple[str, ...], seed: int, tolerance: float | None,
           as_json: bool, storage_items: tuple[str, ...]) -> None:
    """Check a store: completeness, layout, checksums, values, fingerprints (and the teacher). Exit 0 only if all hold."""
    from kdcache.verify import report_text, verify as run_verify

    try:
        if teacher_check and not pipeline:
            raise click.UsageError("--teacher-check needs --pipeline PIPELINE (the pipeline the store was extracted with)")
        if overrides and not pipeline:
            raise click.UsageError(f"--set {overrides[0]} changes a value of --pipeline PIPELINE, which was not given; pass --pipeline "
                                   "with --teacher-check N, or leave --set out")
        _refuse_without_teacher_check(pipeline=pipeline, seed=seed, tolerance=tolerance)
        p = _load(pipeline, overrides) if pipeline else None
        if teacher_check:
            _refuse_torchrun("kdcache verify --teacher-check")
        report = run_verify(store, storage_options=_storage_options(storage_items), teacher_check=teacher_check, pipeline=p,
                            seed=seed, tolerance=tolerance)
    except (Exception, KeyboardInterrupt) as e:  # raised on, as every command's error (its Error line)
        _verify_stopped(store, e, as_json)
        raise
    click.echo(json.dumps(report, indent=2) if as_json else report_text(report))
    if not report["ok"]:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # zarr's reads still running when one failed: see _errors
        sys.exit(1)


def _verify_stopped(store: str, e: BaseException, as_json: bool) -> None:
    """verify stopped by ``e`` before its checks ended (no store there, a bad option, a read failed on the way, the teacher
    raised, Ctrl-C): with --json, its one object on stdout still, ``ok`` false, the ``error`` and the checks done before it
    (``e.report``; none where the store did not open). The error's own line follows on stderr, as every command's."""
    if not as_json:
        return
    if isinstance(e, KdcacheError):
        said = _message(e)
    elif isinstance(e, click.ClickException):
        said = e.format_message()
    elif isinstance(e, KeyboardInterrupt):
        said = "stopped by SIGTERM" if isinstance(e, _Terminated) else "interrupted"
    else:
        said = f"{type(e).__name__}: {_message(e)}"  # a teacher's or dataset's own error: its traceback follows
    done = getattr(e, "report", None) or {"checks": []}
    click.echo(json.dumps({"location": store, "ok": False, "error": said, "checks": done["checks"], "teacher_check": None}, indent=2))


def _refuse_without_teacher_check(**given: Any) -> None:
    """verify's --pipeline, --seed and --tolerance serve --teacher-check alone: given without it (not even 0), the
    teacher was not checked and the report said "every check holds", as if it had been."""
    ctx = click.get_current_context()
    if ctx.get_parameter_source("teacher_check") is not click.core.ParameterSource.DEFAULT:
        return
    for name in given:
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            flag = "--" + name
            raise click.UsageError(f"{flag} serves --teacher-check N, which was not given: the teacher would not be checked; pass "
                                   f"--teacher-check N (the rows to recompute), or leave {flag} out")


@main.command(short_help="Pack a finished store into one .zarr.zip file.")
@click.argument("store", callback=_a_store)
@click.argument("out", type=click.Path(dir_okay=False), callback=_not_blank)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@storage_option
@_errors
def pack(store: str, out: str, overwrite: bool, storage_items: tuple[str, ...]) -> None:
    """Pack a finished STORE into one OUT.zarr.zip file for hand-over (kdcache reads it as a store)."""
    from kdcache.interop import pack as run_pack

    _refuse_torchrun("kdcache pack")
    r = run_pack(store, out, storage_options=_storage_options(storage_items), overwrite=overwrite)
    click.echo(f"packed {count(r['objects'], 'object')} ({_size(r['bytes'])}) into {r['out']}")


@main.command("export", short_help="Export a finished store as one HDF5 file.")
@click.argument("store", callback=_a_store)
@click.argument("out", type=click.Path(dir_okay=False), callback=_not_blank)
@click.option("--compression", type=click.Choice(["gzip", "lzf", "none"]), default="gzip", show_default=True,
              help="HDF5 compression of the data arrays' chunks.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@storage_option
@_errors
def export(store: str, out: str, compression: str, overwrite: bool, storage_items: tuple[str, ...]) -> None:
    """Export a finished STORE as one HDF5 file OUT.h5 (layout: docs/FORMAT.md, HDF5 section)."""
    from kdcache.interop import export_hdf5

    _refuse_torchrun("kdcache export")
    r = export_hdf5(store, out, compression=compression, storage_options=_storage_options(storage_items), overwrite=overwrite)
    click.echo(f"exported {count(r['arrays'], 'array')} into {r['out']} ({_size(r['file_bytes'])}, {compression})")


@main.command("import", short_help="Convert an HDF5 file of kdcache export back into a store.")
@click.argument("source", type=click.Path(dir_okay=False), callback=_named("an HDF5 file written by kdcache export"))
@click.argument("store", callback=_not_blank)
@click.option("--overwrite", is_flag=True, help="Start afresh even if STORE holds a store.")
@storage_option
@_errors
def import_(source: str, store: str, overwrite: bool, storage_items: tuple[str, ...]) -> None:
    """Convert an HDF5 file written by kdcache export back into a store (same geometry)."""
    from kdcache.interop import import_hdf5

    _refuse_torchrun("kdcache import")
    summary = import_hdf5(source, store, storage_options=_storage_options(storage_items), overwrite=overwrite)
    _say_resumed(store, summary)
    click.echo(_info_text(summary))


def _refuse_torchrun(command: str, then: str = "") -> None:
    """``distributed.refuse_torchrun`` for the commands that run in one process: pack, export and import, which write
    their OUT (STORE) (under torchrun every rank ran the command whole, each writing the same file or store), extract
    --dry-run and verify --teacher-check (a teacher built by each rank); before anything is read or written. info,
    verify (without --teacher-check) and stats only read: each rank prints its own report, and nothing is changed.
    Only where torchrun's variables are set: ``kdcache.distributed`` imports torch, which pack, export and import never do
    else (seconds of a command's start)."""
    if not {"RANK", "WORLD_SIZE"} & os.environ.keys():
        return
    from kdcache import distributed

    distributed.refuse_torchrun(command, then)


@main.command(short_help="Teacher accuracy, entropy and layer statistics of a store.")
@click.argument("store", callback=_a_store)
@click.option("--workers", type=click.IntRange(min=1, max=MAX_PARALLEL), help="dask worker threads (default: one per core).")
@json_option
@storage_option
@_errors
def stats(store: str, workers: int | None, as_json: bool, storage_items: tuple[str, ...]) -> None:
    """Teacher accuracy (overall and per class), mean entropy, and per-layer mean/std, computed with dask."""
    from kdcache.stats import stats as run_stats, stats_text

    s = run_stats(store, storage_options=_storage_options(storage_items), num_workers=workers)
    click.echo(json.dumps(s, indent=2) if as_json else stats_text(s))


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _info_text(i: dict[str, Any]) -> str:
    from kdcache.store import printable  # a store's strings, escaped: they come from whoever made it

    t, d = i["teacher"], i["dataset"]
    lines = [
        f"store       {i['location']}  (format {i['format']} v{i['format_version']}, kdcache {i['kdcache_version']}, "
        + ("shard digests)" if i["shard_digests"] else "no shard digests: positions unchecked)"),
        f"teacher     {t['factory']}  {t['class']}  {t['num_parameters']:,} params  sha256 {t['weights_sha256'][:16]}…",
        f"dataset     {d['factory']}  split={d['split']!r}  {count(d['length'], 'sample')}  labels={'yes' if i['has_labels'] else 'no'}  "
        f"fingerprints={i['fingerprint_algorithm']}",
        f"progress    {i['samples_done']:,}/{count(i['num_samples'], 'sample')}, {i['shards_done']}/{count(i['num_shards'], 'shard')} "
        f"of {count(i['rows_per_shard'], 'row')}"
        + ("  complete" if i["complete"] else f"  INCOMPLETE (being written by {i['writer']})" if i.get("writer")
           else "  INCOMPLETE (re-run extract to resume)"),
        _size_line(i),
        "targets",
    ]
    targets = i["targets"]
    width = _widths(targets, name=24, path=32, shape=20)
    for name, tgt in targets.items():
        pooled = f", targets.mask {tgt['mask']!r}" if "mask" in tgt else ""
        lines.append(f"  {name:<{width['name']}} {tgt['path']:<{width['path']}} {str(tuple(tgt['shape'])):<{width['shape']}} "
                     f"{tgt['dtype']:<8} ({tgt['select']}{pooled})")
        lines += _topk_lines(tgt, width["name"])
    return "\n".join(printable(line) for line in lines)


def _size_line(i: dict[str, Any]) -> str:
    """``info``'s size: the bytes stored in all, then the done rows' data alone, stored and decoded, whose ratio is the
    compression; the rest is metadata (and a partial store's shards not done). "12.7 KB stored, 2.1 KB raw, compression
    1.20x" read as if 2.1 KB had become 12.7 KB."""
    stored, raw, ratio = i["bytes_stored"], i["bytes_raw"], i["compression_ratio"]
    if not ratio:  # nothing done, or sizes not listable (http)
        return f"size        {_size(stored)} stored in all; the done rows' data {_size(raw)} decoded"
    data = raw / ratio
    rest = "metadata" if i["complete"] else "metadata, shards not done"
    return (f"size        {_size(stored)} stored in all: the done rows' data {_size(round(data))} ({_size(raw)} decoded, "
            f"compression {ratio:.2f}x), the rest ({rest}) {_size(round(stored - data))}")


def _widths(targets: dict[str, dict[str, Any]], **least: int) -> dict[str, int]:
    """The width of each column of ``info``'s and the dry run's target lines: ``least`` (the usual names fit), or the
    longest value's, so that a long layer name (``bert.encoder.layer.11.output``) keeps the columns in line."""
    def text(name: str, t: dict[str, Any], column: str) -> str:
        return name if column == "name" else str(tuple(t["shape"])) if column == "shape" else str(t[column])

    return {column: max([n, *(len(text(name, t, column)) for name, t in targets.items())]) for column, n in least.items()}


def _topk_lines(t: dict[str, Any], indent: int = 24) -> list[str]:
    """A top-k target's line under its own in ``info`` and the dry run: K of how many classes, where they are, and the bytes
    per sample they save against the full logits."""
    if "topk" not in t:
        return []
    saved, full = t["bytes_per_sample_saved"], t["bytes_per_sample_full"]
    return [f"  {'':<{indent}} top {t['topk']} of {t['classes']:,} classes, their classes in {t['indices_path']}: "
            f"{full - saved:,} B/sample, the full logits {full:,} B "
            + (f"({saved:,} B saved, {full / (full - saved):.1f}x less)" if saved > 0 else f"({-saved:,} B more: a K this close to the class count saves nothing)")]


def _inputs_lines(inputs: dict[str, list[str]]) -> list[str]:
    """The dry run's line of the dict items' keys each model is called with (none for items that are not dicts)."""
    if not inputs:
        return []
    teacher, student = inputs["teacher"], inputs.get("student")
    if student is None:
        said = "student: refused (see the warning)"
    elif student == teacher:
        said = "student: the same"
    else:
        said = f"student (student.inputs): {', '.join(student)}"
    return [f"inputs      teacher: {', '.join(teacher)}; {said}"]


def _dry_run_text(r: dict[str, Any]) -> str:
    g = r["geometry"]
    lines = [
        f"teacher     {r['teacher']['class']}  {r['teacher']['num_parameters']:,} params on {r['device']}",
        f"dataset     {count(r['num_samples'], 'sample')}  labels={'yes' if r['has_labels'] else 'no'}",
        f"probe       one batch of {r['probe_batch']} in {r['probe_seconds']:.2f}s",
        *_inputs_lines(r["inputs"]),
        "targets",
    ]
    width = _widths(r["targets"], name=24, shape=20)
    for name, t in r["targets"].items():
        pooled = f", targets.mask {t['mask']!r}" if "mask" in t else ""
        lines.append(f"  {name:<{width['name']}} {str(tuple(t['shape'])):<{width['shape']}} {t['dtype']:<8} "
                     f"{t['bytes_per_sample']:>10,} B/sample  ({t['select']}{pooled})")
        lines += _topk_lines(t, width["name"])
    lines += [
        f"per sample  {r['bytes_per_sample']:,} B (with index, fingerprint{', label' if r['has_labels'] else ''})",
        f"store       ~{_size(r['estimated_bytes'])} ({_size(r['estimated_bytes_raw'])} raw, ~{r['estimated_compression_ratio']:.2f}x from the probe batch)",
        f"geometry    {count(g['num_shards'], 'shard')} of {count(g['rows_per_shard'], 'row')}",
    ]
    lines += [f"warning     {w}" for w in r["warnings"]]
    if r.get("out") is not None:
        lines.append(f"out         {_out_text(r['out'])}")
    return "\n".join(lines)


def _out_text(o: dict[str, Any]) -> str:
    """The dry run's line on what kdcache extract would do at --out (``extract._out_plan``)."""
    where, shards = repr(o["location"]), count(o["num_shards"], "shard")
    redone = f"; {count(o['redone'], 'shard')} marked done {'misses' if o['redone'] == 1 else 'miss'} objects, written again" if o["redone"] else ""
    return {
        "create": f"{where} holds what a stopped extract left before its manifest: would be created again ({shards})" if o["again"]
                  else f"{where} is new: would be created ({shards})",
        "replace": f"{where} holds a kdcache store: --overwrite would replace it ({shards}, written afresh)",
        "resume": f"{where} holds a partial store of this pipeline: would resume it, {o['shards_done']} of {shards} done{redone}",
        "complete": f"{where} holds this pipeline's complete store: nothing to do",
    }[o["action"]]


if __name__ == "__main__":
    main()
