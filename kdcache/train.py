"""The student loop: a student learns from the store alone; the teacher is never imported.

Inputs come from the pipeline's dataset, targets from the store, joined row by row with the
input fingerprint checked (``kdcache.cache``). Output folder: ``student.pt`` (state dict),
``heads.pt`` (projection heads), ``metrics.jsonl`` (one line per epoch), ``pipeline.json`` and
``checkpoint.pt`` (written atomically each epoch, every ``train.checkpoint_every`` steps, and on SIGTERM;
``resume=True`` continues from it, mid-epoch too).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import itertools
import json
import math
import operator
import os
import re
import shlex
import sys
import signal
import socket
import threading
import time
import warnings
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcache import cache, data, distributed, errors, locking, losses, storage, store as layout, teacher as teachers, threads
from kdcache.errors import (DamagedStoreError, DeviceMemoryError, KdcacheError, ModelError, PipelineError, ShapeMismatchError,
                            StoreError, count, TargetError, TrainingError, TrainingStopped, one_line, option, own_messages, raised,
                            short, worker_message, write_fix)
from kdcache.pipeline import FEATURE_DEFAULTS, Pipeline, check_pipeline
from kdcache.storage import flag_arg, location_arg, options_arg
from kdcache.progress import Progress

CHECKPOINT = "checkpoint.pt"


@own_messages("train")
def train(pipeline: Pipeline, cache_location: str | os.PathLike[str], out: str | os.PathLike[str], *,
          resume: bool | str = False, overwrite: bool = False, allow_partial: bool = False, progress: bool = False,
          storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``pipeline.student`` from the store at ``cache_location`` (any location, with fsspec
    ``storage_options`` for URLs; they apply to ``train.eval_cache`` too); write results to ``out``.

    Returns the last epoch's metrics plus ``params``, ``seconds`` (the run's training time, a resumed run's earlier
    processes' included, its evaluations' left out: ``eval_seconds``) and ``out``. Seeds torch's global RNG with
    ``train.seed`` first (the student factory's initialisation draws from it) and leaves it where training took it.
    Raises ``TrainingStopped`` after saving a checkpoint when SIGTERM asks the run to stop (``_stop_requests``).
    ``resume="auto"``: resume if ``out`` holds a checkpoint, else start the run (the command a scheduler requeues). A
    resumed run at the end of this plan (its own, or a shorter one that ended there), with nothing left to do
    (``_finished``) prints so and returns its last metrics and ``params`` with ``already_finished: True``, writing
    nothing.
    """
    pipeline = check_pipeline(pipeline)
    t, out = pipeline.train, local_folder(location_arg(out, "out"), "train")
    cache_location = location_arg(cache_location, "cache_location")
    check_values(pipeline)
    _refuse_out_inside_store(out, cache_location)
    resume, overwrite, allow_partial, progress, again = _flags(storage_options, resume, overwrite, allow_partial,
                                                               progress)
    cache_options, eval_options = _options_by_store(cache_location, t.eval_cache, storage_options)
    given = {"--resume": resume is True, "--auto-resume": resume == "auto", "--overwrite": overwrite, "--allow-partial": allow_partial}
    if resume == "auto":  # decided before any rank writes: torchrun's rank 0 writes nothing until all ranks have joined
        resume = _checkpoint_file(out).is_file()  # by each rank: they must agree (_check_same_run)
    rank, world, _ = distributed.ranks()  # under torchrun: K ranks train one student (data parallel); rank 0 writes
    checkpoint, unread = _checked_out(out, resume, overwrite, rank, pipeline)
    # what the run changes on the student: its feature hooks, and its modules' training modes (evaluation leaves them in
    # eval mode), undone however the run ends: the factory may return a model it keeps, and train or fine-tune it after
    hooks: list[Any] = []
    # one run per OUT, from its first look to its end: a second is told the first is still going (before, while the first
    # loaded its store, dataset and student, a second without flags was told OUT already held a run, and a --resume trained)
    with _owned_out(out, resume, overwrite, rank, pipeline):
        try:
            torch.manual_seed(t.seed)
            device = data.pick_device(distributed.training_device(t.device), "train.device", pipeline.where("train.device"))
            streams = distributed.join_training(t.streams, device, t.rank_timeout_s)
            # under torchrun an incomplete store is refused by rank 0's look, for every rank (_check_same_run); another
            # rank's own copy lacking shards rank 0's holds is named by _shards
            store = open_for_training(cache_location, allow_partial, cache_options, refuse=world == 1)
            # train.eval_cache opened, and the shards each rank's store holds: the ranks compare them
            evaluated, held = None, None
            if world > 1:
                evaluated, held = _check_same_run(out, checkpoint, unread, given, pipeline, store, eval_options,
                                                  _held(cache_location, store, allow_partial, cache_options))
            # resumed: the run's own store, values and rows, checked first
            shards = _shards(out, pipeline, store, checkpoint, held)
            if _finished(out, checkpoint, t):  # a requeued job (--auto-resume) or a --resume whose run had ended: nothing
                return _already_finished(out, checkpoint, t, rank)  # to do
            if rank == 0 and len(shards) < store.num_shards:  # --allow-partial, or a resumed run's own shards
                print(_part_trained(store, shards, resumed=checkpoint is not None, subset=t.subset))
            # each store's objects of the shards the run reads, listed: a done shard an incomplete copy lacks is refused
            # now, not where it is read (streaming: hours into the run); in one process train.eval_cache is opened here for that
            evaluated = _check_objects(pipeline, store, shards, checkpoint, evaluated, eval_options, world)
            dataset = _dataset(pipeline, store, "the store")
            training = _training(pipeline, store, shards, dataset, device, hooks, checkpoint, out, rank, world,
                                 cache_location, streams)
            run = training.run
            # the next step's epoch and the epoch's batches trained; resumed inside an epoch, its loss sums so far
            state, partial = _resumed(out, checkpoint, run, training.optimizer, training.schedule, training.total_steps,
                                      rank)
            with _rng_kept(device):  # after a resume set the RNG: its dataset and check draw nothing training would
                evaluate = _evaluator(pipeline, run, device, eval_options, trained=store.manifest, opened=evaluated)
            # an earlier run's files (--overwrite) stay until this run's first checkpoint is saved
            # the values the run began with (a resumed run's own, where its pipeline.json or checkpoint records them)
            values = (_recorded(out, checkpoint)[0] if checkpoint is not None else None) or pipeline.to_dict()
            replacing = _prepare_out(out, pipeline, resume, values) if rank == 0 else False
            loop = _loop(training, out, rank, pipeline, store, shards, checkpoint, state, values, replacing, again)
            distributed.barrier()  # all ranks ready to train: from here a step's collectives wait train.rank_timeout_s
            _epochs(run, loop, training.transfer, t, state, partial, evaluate, progress)
            if rank == 0:
                _save(_on_cpu(run.student.state_dict()), out / "student.pt")  # loadable where there is no GPU
                _save(_on_cpu(run.heads.state_dict()), out / "heads.pt")
            distributed.barrier()  # torchrun: every rank returns after rank 0 has written
            return _result(out, state, run, loop)
        finally:
            for hook in hooks:
                hook.remove()


def _refuse_out_inside_store(out: Path, cache_location: str) -> None:
    """Refuse an OUT inside the store it trains from; OUT the store itself is left to ``_check_out``, which names
    it as a store."""
    if out.resolve() != Path(storage.local_path(cache_location)).resolve():
        storage.refuse_inside_store(cache_location, out, option("--out"), "an extract --overwrite of the store, "
                                    "which deletes everything in its folder, would be refused while the run is there, "
                                    "and pack leaves the run out")


def _options_by_store(cache: str, eval_cache: str, storage_options: dict[str, Any] | None) -> tuple[Any, Any]:
    """The storage options of the ``--cache`` store and of ``train.eval_cache``: both take them, but for a local one
    (a folder, a local zip) where the other is a URL, whose options they are; with no URL of the two the local cache
    refuses them, naming them."""
    urls = [bool(where) and storage.location_kind(where) in ("url", "http") for where in (cache, eval_cache)]
    if not any(urls):
        return storage_options, storage_options
    return tuple(storage_options if url else None for url in urls)  # type: ignore[return-value]


def _flags(storage_options: Any, resume: Any, overwrite: Any, allow_partial: Any, progress: Any) -> tuple[Any, bool, bool, bool, str]:
    """train's keyword arguments checked (``resume`` may also be "auto"), and how to continue a run that stops
    (``TrainingStopped``: ``_Loop.again``), as the caller does it: the command line's options, or the call's."""
    options_arg(storage_options)
    if not (isinstance(resume, str) and resume == "auto"):  # 1 or "yes" passed as resume=True (a numpy bool is one)
        resume = flag_arg(resume, "resume", '"auto"')
    overwrite, allow_partial = flag_arg(overwrite, "overwrite"), flag_arg(allow_partial, "allow_partial")
    again = (option("run the same command again", "call kdcache.train again") if resume else
             option("run it again with --resume instead of --overwrite", "call kdcache.train again with resume=True instead of "
                    "overwrite=True") if overwrite else
             option("run the same command with --resume", "call kdcache.train again with resume=True"))
    return resume, overwrite, allow_partial, flag_arg(progress, "progress"), again


def _checked_out(out: Path, resume: bool, overwrite: bool, rank: int, pipeline: Pipeline) -> tuple[dict[str, Any] | None, StoreError | None]:
    """OUT checked by rank 0 before the store, dataset and student are loaded (``_check_out``), and the checkpoint a
    --resume continues, read by every rank; with, for another rank than 0 that cannot read it, why (said once every rank
    has joined: ``_check_same_run``)."""
    if rank == 0:
        locking.refuse_if_being_written(out)
        _check_out(out, resume, overwrite, pipeline)
    try:
        return (_read_checkpoint(out) if resume else None), None
    except StoreError as e:
        if rank == 0:
            raise
        return None, e if _checkpoint_file(out).is_file() else None  # none there: _check_same_run says so


@dataclass(frozen=True)
class _Training:
    """What ``_training`` sets up before the run owns OUT: the student (``run``), its batches (``transfer``) and what
    decides their ``order`` (each checkpoint records it, a resume checks it), and the optimizer with its schedule over
    the plan's ``total_steps``."""

    run: Run
    transfer: cache.TransferSet
    order: dict[str, Any]
    optimizer: torch.optim.Optimizer
    schedule: Any
    total_steps: int


def _training(pipeline: Pipeline, store: layout.Store, shards: np.ndarray, dataset: Any, device: torch.device,
              hooks: list[Any], checkpoint: dict[str, Any] | None, out: Path, rank: int, world: int,
              cache_location: str, streams: int) -> _Training:
    """The student built (its feature hooks added to ``hooks``, which train removes however the run ends), its batches
    and their order, every rank's parameters made rank 0's (torchrun), the plan's length checked against a resumed run's
    checkpoint, and the optimizer and schedule; nothing written to OUT yet."""
    t = pipeline.train
    run = setup(pipeline, store, dataset, device, hooks, keep_zero=_keeps_zero_terms(checkpoint, pipeline, rank))
    streamed = checkpoint is not None and (checkpoint.get("order") or {}).get("in_memory") is False
    transfer = _transfer_set(t, cache_location, store, shards, dataset, run, streams, streamed)
    order = _order(transfer, t.num_workers, world)
    if world > 1:
        distributed.barrier()  # every rank has loaded its store and built its student, however long it took
        distributed.broadcast_parameters([run.student, run.heads])
        run.world = world
    _check_batches(transfer, 0, t.batch_size)
    # Summed per epoch: streaming groups shards into buffers differently each epoch, so counts vary.
    total_steps = t.steps if t.steps > 0 else sum(transfer.batches_per_epoch(e) for e in range(t.epochs))
    if checkpoint is not None:
        _check_resumed_plan(checkpoint, order, total_steps, t)
        _say_replanned(out, pipeline, checkpoint)
    params = list(run.student.parameters()) + list(run.heads.parameters())
    optimizer = _optimizer(t.optimizer, params, t.lr, t.weight_decay, _decays_all(checkpoint, params, rank))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(t.schedule, total_steps))
    return _Training(run, transfer, order, optimizer, schedule, total_steps)


def _loop(training: _Training, out: Path, rank: int, pipeline: Pipeline, store: layout.Store, shards: np.ndarray,
          checkpoint: dict[str, Any] | None, state: dict[str, int], values: dict[str, Any], replacing: bool,
          again: str) -> _Loop:
    """The ``_Loop`` of a run that owns OUT: its checkpoints saved with the run's store, rows, order and ``values``,
    the first replacing an earlier run's files where rank 0 left them there (``replacing``: ``_prepare_out``); resumed,
    where its checkpoint left it (position, training seconds, last learning rate)."""
    t = pipeline.train
    save_to = functools.partial(_save_epoch, out, training.run, training.optimizer, training.schedule, shards=shards,
                                store=store, order=training.order, values=values,
                                plan={"epochs": t.epochs, "steps": t.steps})
    return _Loop(training.optimizer, training.schedule, training.total_steps, t.checkpoint_every, out, rank, save_to,
                 pipeline if replacing else None, _position(state) if checkpoint is not None else "", again,
                 before=_trained_seconds(checkpoint, out, state) if checkpoint is not None else 0.0,
                 lr=_last_lr(checkpoint, training.schedule) if checkpoint is not None else 0.0,
                 background=training.transfer.checkpoint_bytes > 0, saved_at=state["step"])


def _transfer_set(t: Any, cache_location: str, store: layout.Store, shards: np.ndarray, dataset: Any, run: Run,
                  streams: int, streamed: bool = False) -> cache.TransferSet:
    """The run's batches of its targets (``run.paths``) from the store (this rank's share under torchrun), its memory checked against the
    machine's; noted where the store's fingerprints cannot tell this dataset's inputs apart (kdcache <= 0.1.6). ``streamed``
    (a resumed run's checkpoint streamed its targets): streamed again, whatever train.memory_budget_mb decides now, so its
    batches come in the order they began in (a subset's RAM check counted the store's every row up to kdcache 0.1.15).

    Counted with the targets: the copy a checkpoint written in the background holds (``_checkpoint_copy_bytes``). Where the
    two do not fit together but the targets alone do, the checkpoints are written in the main thread, from the state itself
    (the transfer set's ``checkpoint_bytes`` 0: ``_Loop.background``): refused, the run had no setting of its targets that
    would do (a student whose copy alone is more than half the memory), and it ran so before the copy was made. Not on a
    GPU: there each write, in the main thread too, copies the state to the host (``_on_cpu``), and the refusal stands."""
    rank, world, _ = distributed.ranks()

    def made(checkpoint_bytes: int) -> cache.TransferSet:
        transfer = cache.TransferSet(  # the store setup opened and checked, found still at its location (not one put there since)
            store, dataset, run.paths, batch_size=t.batch_size, seed=t.seed, rows=_rows(store, shards, t.subset, t.seed),
            memory_budget_mb=0 if streamed else t.memory_budget_mb, buffer_shards=t.shuffle_buffer_shards, fingerprint_check=t.fingerprint_check,
            fingerprint_recheck=t.fingerprint_recheck, drop_last=t.drop_last, streams=streams,
            stream=rank if world > 1 else None, checkpoint_bytes=checkpoint_bytes)
        transfer.check_memory(t.num_workers, f"the targets of {cache_location!r}", f"train.num_workers = {t.num_workers}")
        transfer.check_masks(run.mask, "train.mask", run.mask_where)  # each batch's values, as it is made: not on the step's thread
        return transfer

    copy = _checkpoint_copy_bytes(run, t.optimizer) if world == 1 else 0
    try:
        transfer = made(copy)
    except PipelineError:
        if not copy or run.device.type != "cpu":  # a GPU's: a write in the main thread copies the state to the host too
            raise
        transfer = made(0)  # refused again (the targets alone do not fit): that refusal, whose fixes are the targets'
        print(f"note: checkpoints are written in the main thread, training paused meanwhile: one written while the next steps "
              f"train holds a copy of the student, heads and optimizer state ({copy:,} bytes), which with the targets "
              "would take more than half of the memory this process may use")
    if rank == 0 and transfer.algorithm == data.V1 and (blind := data.v1_blind_spot(data.item_inputs(dataset, 0))):
        print(f"note: {cache_location!r} was made by kdcache <= 0.1.6, whose input fingerprints (blake2b-64) feed {blind} unframed, "
              "and this dataset's inputs hold them: two inputs that read alike ((1, 23) and (12, 3), or ([1, 2], [3]) and ([1], [2, 3])) "
              f"pass its check as one; re-extract the store ({option('--overwrite')}) to have every pairing checked")
    return transfer


def _checkpoint_copy_bytes(run: Run, optimizer: str) -> int:
    """The host copy a checkpoint written in the background holds until it is written (``_save_epoch``'s ``copied``), in
    one process: the student's and heads' state, one copy per storage, and the optimizer's, per trained parameter AdamW's
    two moments or SGD's momentum (a frozen one has none); 0 where checkpoints are written in the main thread
    (``WRITE_IN_BACKGROUND``)."""
    if not WRITE_IN_BACKGROUND:
        return 0
    modules = (run.student, run.heads)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for m in modules for t in m.state_dict().values() if isinstance(t, torch.Tensor)}
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad)
    return sum(storages.values()) + params * (2 if optimizer == "adamw" else 1)


def _resumed(out: Path, checkpoint: dict[str, Any] | None, run: Run, optimizer: Any, schedule: Any, total_steps: int,
             rank: int) -> tuple[dict[str, int], dict[str, Any] | None]:
    """The run's position and (resumed inside an epoch) loss sums: a new run's start, or a resumed run's, its checkpoint
    loaded into the student, heads, optimizer and schedule, under OUT's lock: an --overwrite's replacement of the
    earlier run finished first where it was under way (``_finish_replacing``), an abandoned one's files dropped, and a
    damaged metrics.jsonl refused now, not after the first epoch (its lines beyond the checkpoint dropped, ``_beyond``, and
    a last one cut short)."""
    if checkpoint is None:
        return {"epoch": 0, "step": 0, "batch": 0}, None
    if checkpoint.get(_FILE) == NEXT_CHECKPOINT:
        if rank == 0:
            _finish_replacing(out, checkpoint)  # before the run's metrics.jsonl is read: the earlier run's may be there
        distributed.barrier()  # torchrun: the other ranks read metrics.jsonl once rank 0 has written it again
    elif rank == 0:
        _drop_abandoned_next(out)
    state, partial = _restore(checkpoint, out, run, optimizer, schedule)
    if rank == 0:
        print(f"resuming {str(out)!r} {_position(state)} (step {state['step']} of {total_steps})")
    lines = _read_metrics(out)
    if rank == 0 and (any(_beyond(m, state) for m in lines) or _cut_short(out / "metrics.jsonl")):
        try:
            _atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in lines if not _beyond(m, state)))
        except OSError as e:
            raise _write_error(out, e) from None
    return state, partial


def _beyond(line: dict[str, Any], state: dict[str, int]) -> bool:
    """Whether a metrics line is of an epoch the checkpoint saved at ``state`` has not ended (a crash between the line and
    its checkpoint): the resumed run trains it again, and a run with no step left must not end on it (``_result``). The
    line of a plan that ended inside the epoch, at the checkpoint's step, is not."""
    here = bool(state["batch"]) and line["epoch"] == state["epoch"] and line.get("step") == state["step"]
    return line["epoch"] >= state["epoch"] and not here


def _result(out: Path, state: dict[str, int], run: Run, loop: _Loop) -> dict[str, Any]:
    """train's return: the run's last metrics line (none: a resumed run with no step left whose metrics.jsonl was
    deleted still writes its weights), its student's parameter count, training time and OUT."""
    lines = _read_metrics(out)
    last = lines[-1] if lines else {"epoch": state["epoch"] - (state["batch"] == 0), "step": state["step"]}
    return {**last, "params": teachers.num_parameters(run.student), "seconds": loop.elapsed(), "out": str(out)}


def _finished(out: Path, checkpoint: dict[str, Any] | None, t: Any) -> bool:
    """Whether ``checkpoint`` is at the end of ``t``'s plan (``train.epochs`` and ``steps``: a longer one trains on, one
    the run has trained past is refused, ``_check_resumed_plan``), its metrics.jsonl ends with its last line
    (``_line_due``: a line lost, or an evaluation now due, is made again) and OUT's student.pt and heads.pt hold its
    weights (written after it, the run's last files: a run stopped before they were whole is not finished). The plan
    the checkpoint was trained under may be longer: a --resume that shortened it to end there wrote the weights and
    saved no checkpoint (no line due), and a second such --resume wrote them again (compared with that plan)."""
    if checkpoint is None or checkpoint.get(_FILE) == NEXT_CHECKPOINT:
        return False  # the .next checkpoint of an --overwrite run stopped as it replaced the earlier run: its files are that run's
    state = {"epoch": int(checkpoint["epoch"]), "batch": int(checkpoint.get("batch", 0)), "step": int(checkpoint["step"])}
    ended = state["step"] == t.steps if t.steps > 0 else state["epoch"] == t.epochs and not state["batch"]
    return (ended and not _line_due(_read_metrics(out), t, state, checkpoint.get("partial"))[0]
            and _holds(out / "student.pt", checkpoint["student"]) and _holds(out / "heads.pt", checkpoint["heads"]))


def _holds(file: Path, weights: dict[str, torch.Tensor]) -> bool:
    """Whether the state dict saved in ``file`` is ``weights``."""
    try:
        saved = torch.load(file, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - missing, truncated: not written whole
        return False
    return isinstance(saved, dict) and saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in weights)


def _already_finished(out: Path, checkpoint: dict[str, Any], t: Any, rank: int) -> dict[str, Any]:
    """A resume (``--resume``, ``--auto-resume``) of a finished run (``_finished``): one line, nothing written; train's return, as the run's end
    returned it (``params`` as its checkpoint records it: the student is not built; absent from a checkpoint of kdcache
    0.1.15 or earlier), plus ``already_finished``."""
    setting, value = ("train.steps", t.steps) if t.steps > 0 else ("train.epochs", t.epochs)
    if rank == 0:
        print(f"{str(out)!r} already finished its run ({setting} = {value}, step {int(checkpoint['step'])}); its student is "
              f"{str(out / 'student.pt')!r}: nothing was trained or written (raise {setting} to train on, or "
              f"{option('--overwrite')} to start afresh)")
    lines = _read_metrics(out)
    last = lines[-1] if lines else {"epoch": int(checkpoint["epoch"]) - 1, "step": int(checkpoint["step"])}
    params = {"params": int(checkpoint["params"])} if "params" in checkpoint else {}
    return {**last, **params, "seconds": float(checkpoint.get("seconds") or 0.0), "out": str(out), "already_finished": True}


def _epochs(run: Run, loop: _Loop, transfer: cache.TransferSet, t: Any, state: dict[str, int], partial: dict[str, Any] | None,
            evaluate: Callable[[], dict[str, float]], progress: bool) -> None:
    """Train from ``state`` (and a resumed epoch's loss sums, ``partial``) to the plan's end: each epoch's steps,
    its evaluation when due (``train.eval_every``), its metrics line and checkpoint (resumed at the plan's end: its last
    line, ``_complete_last_line``)."""
    # One loader for the run: its worker processes (if any) persist across epochs and follow set_epoch.
    # On the CPU with no workers the TransferSet is iterated directly: a DataLoader would add only its
    # per-batch bookkeeping (a profiler record per batch, ~5 % of a tiny student's epoch).
    loader: Any = transfer
    if t.num_workers > 0 or run.device.type != "cpu":
        loader = DataLoader(transfer, batch_size=None, num_workers=t.num_workers, pin_memory=run.device.type == "cuda",
                            persistent_workers=t.num_workers > 0, generator=torch.Generator().manual_seed(t.seed),
                            worker_init_fn=data.worker_signals)
    rows_per_step = t.batch_size * (transfer.streams if transfer.stream is None else 1)  # streams in one process: joined
    batches: Any = iter(())  # the epoch's batches, made ahead: stopped however the run ends
    following: list[futures.Future[Iterator[dict[str, Any]]]] = []  # the next epoch's, started during this epoch's last steps (_ahead)
    ending: BaseException | None = None  # the error the run ends with, which a failed checkpoint write names
    with data.torch_threads(t.threads), _skipped_steps_allowed(), _stop_requests(loop.stop):
        # a SIGTERM while the batches are stopped (after a stop: its clean-up) is one more stop request
        try:
            if state["step"] >= loop.total_steps:  # resumed where its plan ends
                _complete_last_line(loop, t, state, partial, evaluate)
                return
            batches = _start_epoch(transfer, loader, state)
            while state["step"] < loop.total_steps:
                count = _check_batches(transfer, state["epoch"], t.batch_size)
                steps = min(count - state["batch"], loop.total_steps - state["step"])
                bar = Progress(steps * rows_per_step, f"epoch {state['epoch']}", enabled=progress and loop.rank == 0)
                ahead = _ahead(transfer, loader, state, t, following, batches)
                means, partial = _epoch(run, loop, batches, state, count, bar, partial, ahead)
                _check_finite(means, state, loop.out, loop.saved)
                due = state["step"] >= loop.total_steps or (t.eval_every > 0 and (state["epoch"] + 1) % t.eval_every == 0)
                metrics = {"epoch": state["epoch"], "step": state["step"], "lr": loop.lr, **means,
                           **(loop.evaluation(evaluate, t, state, partial) if due else {}), "seconds": loop.elapsed()}
                if state["batch"] >= count:  # else the plan ended inside the epoch: its checkpoint is saved there, with
                    state.update(epoch=state["epoch"] + 1, batch=0)  # the sums so far, so a longer plan (--resume) trains the rest
                    partial = None
                failed: Exception | None = None  # the next epoch's batches not started: raised once this epoch is saved
                rng = _rng_state()  # before the next epoch's loader draws its seed: what a resume restores
                if state["step"] < loop.total_steps:  # streaming, its first buffer is read while this epoch is saved
                    try:  # one started ahead stays in following until it is batches: a Ctrl-C waiting for it, the finally stops it
                        batches = following[0].result() if following else _start_epoch(transfer, loader, state)
                    except Exception as e:  # noqa: BLE001 - any: raised as it was, once the epoch is saved (_kept)
                        failed = errors.worker_died(e, "train", data.ended_workers(batches, e)) or e  # a persistent worker that died
                    following.clear()
                loop.save(state, rng, metrics, partial)
                if failed is not None:  # the epoch's checkpoint and metrics line kept: a rerun goes on after it
                    raise _kept(failed, loop)
                if loop.stopping(state["step"] < loop.total_steps):
                    raise loop.stopped(state)
        except BaseException as e:
            # a DataLoader worker that died: its line, whose "rerun" _go_on makes a --resume after a checkpoint
            died = errors.worker_died(e, "train", data.ended_workers(batches, e)) if isinstance(e, Exception) else None
            ending = _go_on(died or e, loop)
            if died is not None:
                raise died from None
            raise
        finally:
            try:  # a run stopped (Ctrl-C, SIGTERM) does not wait long for the batch in the making: its read may hang
                wait = data.STOPPED_WAIT if isinstance(ending, KeyboardInterrupt | TrainingStopped) else None
                data.stop_making(batches, wait)  # first: one started ahead waits for it to have stopped (_ahead)
                for made in (f.result() for f in following if f.exception() is None):  # one started ahead too
                    data.stop_making(made, wait)
            finally:  # the last checkpoint whole on the disk before train returns or raises, or its write's error raised
                loop.writes.wait(during=ending)  # in the place of the run's own (a stop, NaN, Ctrl-C), which it names


# a failure's advice, last in its line: "…, then rerun". Its last line: a DataLoader worker's error holds torch's text, which
# ends with the worker's own message and a line break (a "rerun once …" read past it, the line printed lost the message)
_RERUN = re.compile(r"\brerun( once [^;()\n]*)?$")


def _go_on(error: BaseException, loop: _Loop) -> BaseException:
    """``error``, a failure that ends the run (an unreachable store, a dataset that raised, a store replaced): where a
    checkpoint was saved, its line's last advice "rerun" says how to go on from it (``loop.again``: the same command
    was refused, OUT holding a run). Its type kept: a caller's ``except`` still takes it."""
    if loop.saved and isinstance(error, KdcacheError) and len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (_from_checkpoint(error.args[0], loop),)
    return error


def _from_checkpoint(message: str, loop: _Loop, why: str = "") -> str:
    """``message`` with its last advice "rerun" (if any) saying how to go on from the last checkpoint; ``why``: a note
    after where that checkpoint is."""
    return _RERUN.sub(lambda m: f"{loop.again}{m.group(1) or ''} to go on from its last checkpoint ({loop.saved}{why})", message)


def _kept(error: Exception, loop: _Loop) -> Exception:
    """``error``, raised as the next epoch's batches were started, saying that the checkpoint saved before it is raised
    keeps the epoch that ended (its type kept: a caller's ``except`` still takes it). A kdcache error's one line says so:
    its last advice "rerun" said as ``_go_on`` says it (not followed by a second fix: "…, then rerun (…: fix this, then
    run the same command with --resume …)"), else the checkpoint named after it. Another error gets a note (its traceback
    shows it)."""
    started = "raised as the next epoch's batches were started"
    kept = f"{str(loop.out / CHECKPOINT)!r} keeps the run {loop.saved}: fix this, then {loop.again} to go on from there"
    if isinstance(error, KdcacheError) and len(error.args) == 1 and isinstance(error.args[0], str):
        said = _from_checkpoint(error.args[0], loop, f"; {started}")
        error.args = (said if said != error.args[0] else f"{error.args[0]} ({started}; {kept})",)
    else:
        error.add_note(f"{started}; {kept}")
    return error


def _complete_last_line(loop: _Loop, t: Any, state: dict[str, int], partial: dict[str, Any] | None,
                        evaluate: Callable[[], dict[str, float]]) -> None:
    """A run resumed with no step left (a --resume's train.steps/epochs end where its checkpoint was saved) ends with
    the line an uninterrupted run of that plan ends with: the epoch it stopped inside gets its line (its means from the
    checkpoint's loss sums so far), and the evaluation due at a plan's end (its line was saved where the plan went on,
    with none due); saved with the checkpoint again. Nothing where that line is there whole, or none can be made (an
    epoch's end whose metrics.jsonl was deleted)."""
    due, line = _line_due(_read_metrics(loop.out), t, state, partial)
    if not due:
        return
    if line is None:
        line = {"epoch": state["epoch"] - (state["batch"] == 0), "step": state["step"], "lr": loop.lr,
                **_means(partial["sums"], [*partial["sums"].values(), partial["rows"]]), "seconds": loop.elapsed()}
    seconds = line.pop("seconds", None)  # the line's own: the training time when its epoch ended
    loop.save(state, _rng_state(), {**line, **loop.evaluation(evaluate, t, state, partial), "seconds": loop.elapsed() if seconds is None else seconds},
              partial)


def _line_due(lines: list[dict[str, Any]], t: Any, state: dict[str, int], partial: dict[str, Any] | None) -> tuple[bool, dict[str, Any] | None]:
    """Whether the line of the epoch a run with no step left ended in (at ``state``) is still to be made, or its
    evaluation due at a plan's end to be added (``_complete_last_line``); and that line where metrics.jsonl has it."""
    epoch = state["epoch"] - (state["batch"] == 0)
    line = lines[-1] if lines and (lines[-1]["epoch"], lines[-1]["step"]) == (epoch, state["step"]) else None
    if line is None:
        return partial is not None, None
    return bool(t.eval_split or t.eval_cache) and not any(k.startswith("eval_") for k in line), line


@contextlib.contextmanager
def _skipped_steps_allowed() -> Iterator[None]:
    """fp16: a step whose gradients overflow is skipped (GradScaler) and the schedule steps all the same (the plan
    counts steps, not updates), so torch's warning about a schedule stepped before its optimizer would be noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before `optimizer.step()`"), UserWarning)
        yield


def _check_resumed_plan(checkpoint: dict[str, Any], order: dict[str, Any], total_steps: int, t: Any) -> None:
    """A resumed run must serve its batches in the order it began with, and its new length must not end before the
    steps it has trained (its weights are past that plan's end). A checkpoint of kdcache <= 0.1.5 has no streams."""
    then = checkpoint.get("order") or {}
    if then.get("streams", order["streams"]) != order["streams"]:  # each step would take another share of the epoch
        k, ranks = then["streams"], then.get("ranks", 1)
        how = f"under torchrun with {ranks} ranks (or in one process with train.streams = {k})" if ranks > 1 else \
            f"in one process with train.streams = {k}"
        now = f"{order['ranks']} torchrun ranks" if order["ranks"] > 1 else "one process"
        raise PipelineError(f"{option('--resume')}: this run took a batch from each of {k} streams a step, now {order['streams']} ({now}): "
                            f"its steps would take other batches than the uninterrupted run's; resume {how}, or start afresh with "
                            f"{option('--overwrite')}")
    served = {k: v for k, v in then.items() if k not in ("streams", "ranks")}  # ranks: for the advice (2 ranks = 2 streams in one)
    if served != {k: order.get(k) for k in served}:
        raise PipelineError(f"{option('--resume')}: this run served its batches {_says(checkpoint['order'])}, now {_says(order)} "
                            "(train.memory_budget_mb decides whether targets are read into RAM, and DataLoader workers interleave "
                            "their batches): the batch order would differ from the uninterrupted run's; resume with the run's "
                            f"train.memory_budget_mb and train.num_workers, or start afresh with {option('--overwrite')}")
    if int(checkpoint["step"]) > total_steps:
        done, epochs = int(checkpoint["step"]), int(checkpoint["epoch"]) + (int(checkpoint.get("batch", 0)) > 0)  # begun ones too
        plan = f"train.steps = {t.steps}" if t.steps > 0 else f"train.epochs = {t.epochs} ({total_steps} steps)"
        longer = f"train.steps >= {done}" if t.steps > 0 else f"train.epochs >= {epochs} (or train.steps >= {done})"
        raise PipelineError(f"{option('--resume')}: this run has trained {done} steps in {epochs} epoch{'s' * (epochs != 1)}, more than {plan} "
                            f"plans; resume with {longer} to go on (no more: only the weights are written), or start afresh with "
                            f"{option('--overwrite')}")


def _check_batches(transfer: cache.TransferSet, epoch: int, batch_size: int) -> int:
    """The epoch's number of batches; none (train.drop_last with fewer rows than a batch) is an error, not a run that never ends."""
    n = transfer.batches_per_epoch(epoch)
    if n == 0:
        where = "" if transfer.in_memory else f" (streamed in buffers of {', '.join(map(str, transfer.buffer_sizes(epoch)))} rows)"
        buffers = "" if transfer.in_memory else " (or raise train.shuffle_buffer_shards)"  # in RAM a buffer is one batch
        raise PipelineError(f"train.drop_last = true leaves no batch in epoch {epoch}: {len(transfer.rows)} rows{where} and "
                            f"train.batch_size = {batch_size}; lower train.batch_size{buffers}, or set train.drop_last = false")
    return n


def _order(transfer: cache.TransferSet, workers: int, ranks: int) -> dict[str, Any]:
    """What decides the order batches are served in, beyond the seed and the values a resume checks: targets in RAM or
    streamed, and (streaming, one stream) the number of DataLoader workers, which take turns by buffer of shards. In
    RAM a buffer is one batch, and with streams worker w serves steps w, w+k, ...: then the order does not depend on k.
    And the streams a step takes a batch of each (torchrun's ``ranks``, or train.streams in one process): train.streams
    = 1 under torchrun means one per rank, which pipeline.json cannot tell from one process's single stream."""
    by_buffer = not transfer.in_memory and transfer.streams == 1
    return {"in_memory": bool(transfer.in_memory), "workers": max(1, workers) if by_buffer else "any",
            "streams": transfer.streams, "ranks": ranks}


def _says(order: dict[str, Any]) -> str:
    if order["in_memory"]:
        return "from RAM"
    return "streamed" + ("" if order["workers"] == "any" else f" by {order['workers']} DataLoader reader(s)")


def _check_finite(means: dict[str, float], state: dict[str, int], out: Path, saved: str) -> None:
    """Stop a run whose loss became NaN or inf, before its checkpoint is overwritten (checked where one is saved:
    no sync per step). ``saved``: where the last checkpoint was saved ("" for none)."""
    bad = {k: v for k, v in means.items() if not math.isfinite(v)}
    if bad:
        kept = f"{str(out / CHECKPOINT)!r} keeps the run {saved}" if saved else "no checkpoint was written"
        raise TrainingError(f"training diverged in epoch {state['epoch']}: {', '.join(f'{k} = {v}' for k, v in bad.items())}; "
                            f"lower train.lr, train.weight_decay or the loss weights (train.loss, train.features) and rerun ({kept})")


def _start_epoch(transfer: cache.TransferSet, loader: Any, state: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Set the epoch, less the batches already trained of it, and start its iterator (streaming, a TransferSet
    starts reading its first buffer at once)."""
    transfer.set_epoch(state["epoch"], skip=state["batch"])
    return iter(loader)


def _ahead(transfer: cache.TransferSet, loader: Any, state: dict[str, int], t: Any,
           following: list[futures.Future[Iterator[dict[str, Any]]]], batches: Any) -> Callable[[], None] | None:
    """In RAM, iterated without a DataLoader: what starts the next epoch's batches (into ``following``) as ``_epoch`` takes
    one of this epoch's last, so that its first ones are made during the last steps and the save, not waited for after them. A
    thread of its own starts them: starting their thread waits for it to be scheduled (milliseconds on a busy machine),
    which the steps' thread then does not. That thread starts them once this epoch's ``batches`` are all made (or
    stopped): the dataset is read by one thread at a time, as without this (two at once, a dataset read as from one
    open file served one item's input for another's, unchecked past the first epoch at train.fingerprint_recheck < 1;
    a tokenizer refusing a second thread failed the run). None where a DataLoader serves them (its persistent workers
    serve one iterator at a time), where streaming (a reader holds the buffer it serves and the next, and the last batches
    of the one before: the next epoch's first two would be held beside the last, which check_memory does not count) and
    where the epoch ends with an evaluation (its dataset read beside the next epoch's). The next epoch's iterator
    draws nothing from the RNGs a checkpoint saves (a TransferSet's draws are its own, seeded): it may start before they
    are read."""
    evaluated = (t.eval_split or t.eval_cache) and t.eval_every > 0 and (state["epoch"] + 1) % t.eval_every == 0
    if loader is not transfer or not transfer.in_memory or evaluated:
        return None
    following_state = {"epoch": state["epoch"] + 1, "batch": 0}
    return lambda: following.append(threads.pool("next-epoch", 1).submit(_start_after, batches, transfer, loader, following_state))


def _start_after(batches: Any, transfer: cache.TransferSet, loader: Any, state: dict[str, int]) -> Iterator[dict[str, Any]]:
    """``_start_epoch`` once every batch of the iterator ``batches`` (a ``data.Prefetch``) is made; none where it was
    stopped first (the run ends: its batch in the making, a read that hangs, is not waited for)."""
    if isinstance(batches, data.Prefetch) and not batches.settled():
        return iter(())
    return _start_epoch(transfer, loader, state)


def _position(state: dict[str, int]) -> str:
    """Where a run saved at ``state`` is: "after epoch 2", or "in epoch 3 after batch 40"."""
    return f"in epoch {state['epoch']} after batch {state['batch']}" if state["batch"] else f"after epoch {state['epoch'] - 1}"


def _epoch(run: Run, loop: _Loop, batches: Iterator[dict[str, Any]], state: dict[str, int], count: int, bar: Progress,
           partial: dict[str, Any] | None = None, ahead: Callable[[], None] | None = None) -> tuple[dict[str, float], dict[str, Any] | None]:
    """The epoch's batches from ``state["batch"]`` on (of ``count``; or up to the plan's last step); returns the mean of
    each loss term over the rows trained on (a step's loss is its rows' mean: weighted by its rows, a short last batch
    counts as the rows it holds), and their sums (``_partial``: for a checkpoint where the plan ends inside the epoch).
    ``partial``: the sums of a resumed epoch's batches before. Inside the epoch a
    checkpoint is saved every ``train.checkpoint_every`` steps and when a stop is asked for (``_Loop.midway``), also
    while the next batch is waited for (``_taken``: a dataset read that hangs), at the last step taken.
    ``ahead``: called as the batch made ``cache.PREFETCH`` before the epoch's last is taken (the epoch's batches are
    then made, or the last in the making: the next epoch's wait for it), where the plan goes on past the epoch (``_ahead``)."""
    sums, seen = _sums(run, partial)
    run.student.train(), run.heads.train()
    try:
        for batch in _taken(batches, loop.stop, run.world):
            if ahead is not None and state["batch"] >= count - 1 - cache.PREFETCH and state["step"] + count - state["batch"] < loop.total_steps:
                ahead()  # this epoch's last batches are made (or in the making): the next epoch's first ones can be
                ahead = None
            parts = _step_losses(run, batch)
            loss = functools.reduce(operator.add, parts.values())  # not sum(): its start, 0, would add an op per step
            if "scale" in batch:  # a rank's share of a step (cache.TransferSet streams)
                loss = loss * batch["scale"]
            loop.optimizer.zero_grad(set_to_none=True)
            loop.lr = loop.optimizer.param_groups[0]["lr"]  # the rate this step takes (a float: no sync), for the epoch's line
            # the backward holds the forward's activations and their gradients: where a batch too large for the device most often runs out
            with data.device_memory("the student's backward pass or optimizer step", batch["inputs"], "lower train.batch_size"):
                run.scaler.scale(loss).backward()
                if run.world > 1:  # the ranks' scales are equal (as their mean gradients are), so all skip the same steps
                    distributed.average_gradients([p for g in loop.optimizer.param_groups for p in g["params"]], run.world)
                run.scaler.step(loop.optimizer)
            run.scaler.update()
            loop.schedule.step()
            state.update(step=state["step"] + 1, batch=state["batch"] + 1)
            rows = len(batch["rows"]) if batch.get("share", 1.0) else 0  # under torchrun, an idle rank's one row counts for nothing
            seen += rows
            for k, v in parts.items():  # summed on the device: no sync per step
                sums[k] = sums[k].add_(v.detach(), alpha=rows) if k in sums else v.detach() * rows
            bar.update(len(batch["rows"]), loss=loss.detach())  # read when the line is drawn: no device sync per step
            if state["step"] >= loop.total_steps:
                break
            if state["batch"] < count and loop.midway_due(state, run.world):
                sums, seen = loop.midway(run, state, sums, seen, bar)
    except _WaitStopped:  # SIGTERM while the next batch was waited for: the run as its last step left it is saved, if not yet
        if state["batch"] < count:  # else the epoch's batches are all trained: it ends as it would, then stops (_epochs)
            if state["step"] > loop.saved_at:  # steps taken since the last checkpoint (or the run's start)
                loop.midway(run, state, sums, seen, bar)  # raises TrainingStopped
            bar.close()
            raise loop.stopped(state) from None
    bar.close()
    totals = _summed(run, sums, seen, loop.stop)
    return _means(sums, totals), _partial(sums, totals)


class _WaitStopped(BaseException):
    """SIGTERM while the main thread waits for the next batch (``_taken``) or evaluates (``_evaluated``): raised by its
    handler (``_stop_requests``).
    Not an ``Exception``: no ``except Exception`` on the way (torch's DataLoader's) takes it for the batch's error."""


def _taken(batches: Iterator[dict[str, Any]], stop: dict[str, Any], world: int) -> Iterator[dict[str, Any]]:
    """``batches``, each waited for with ``stop["waiting"]`` set (one process): a SIGTERM then stops the run at once, where
    it would wait for a batch that may never come (a dataset read that hangs: a stalled network mount, a dead remote
    dataset), not at the next step. Under torchrun a stop waits for the ranks' next checkpoint, where they agree on it."""
    if world > 1:
        yield from batches
        return
    while True:
        stop["waiting"] = True
        try:
            if stop["signal"]:  # asked for before the wait began, since the last step's check
                raise _WaitStopped
            batch = next(batches, None)
        finally:
            stop["waiting"] = False
        if batch is None:
            return
        yield batch


def _evaluated(evaluate: Callable[[], dict[str, float]], stop: dict[str, Any]) -> dict[str, float]:
    """``evaluate()`` with ``stop["waiting"]`` set (one process): a SIGTERM before or during it raises ``_WaitStopped``, as
    one while a batch is waited for does (``_taken``): its reads may hang, and a scheduler's grace may be shorter than
    it. Under torchrun the ranks evaluate together (their counts are summed): a stop waits for its end."""
    if distributed.ranks()[1] > 1:
        return evaluate()
    stop["waiting"] = True
    try:
        if stop["signal"]:  # asked for in the epoch's last step: its checkpoint is saved now, not after the evaluation
            raise _WaitStopped
        return evaluate()
    finally:
        stop["waiting"] = False


def _sums(run: Run, partial: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], int]:
    """The loss sums and rows an epoch starts from: none, or a resumed one's so far (rank 0's: the checkpoint holds every
    rank's, summed; the others go on from zero)."""
    if partial is None:
        return {}, 0
    mine = distributed.ranks()[0] == 0
    sums = {k: torch.tensor(v if mine else 0.0, dtype=torch.float32, device=run.device) for k, v in partial["sums"].items()}
    return sums, int(partial["rows"]) if mine else 0


def _summed(run: Run, sums: dict[str, torch.Tensor], seen: int, stop: dict[str, Any]) -> list[float]:
    """The loss sums and row count of every rank, and the number of ranks asked to stop, in one all-reduce (float64: the
    count stays exact); the ranks then agree on stopping (``stop["agreed"]``)."""
    counted = [*(v.double() for v in sums.values()), *torch.tensor([seen, bool(stop["signal"])], dtype=torch.float64, device=run.device)]
    totals = distributed.sum_over_ranks(torch.stack(counted)).tolist()
    stop["agreed"] = stop["agreed"] or totals[-1] > 0
    return totals[:-1]


def _partial(sums: dict[str, torch.Tensor], totals: list[float]) -> dict[str, Any]:
    """A checkpoint's record of the epoch's loss sums so far, every rank's (``_summed``)."""
    return {"sums": dict(zip(sums, totals)), "rows": int(totals[-1])}


def _means(sums: dict[str, torch.Tensor], totals: list[float]) -> dict[str, float]:
    means = {f"loss_{k}": v / max(1.0, totals[-1]) for k, v in zip(sums, totals)}
    return {**means, "loss": sum(means.values())}


WRITE_IN_BACKGROUND = True  # one process writes its checkpoints while it trains on (tests/fixtures/faults.py: off, for one event order)


class _Writes:
    """A run's checkpoint write under way in a thread of its own (``_save_epoch``'s ``background``): its files reach the
    disk (their fsyncs, milliseconds each) while the next steps train. ``wait`` returns once it is done, and raises its error."""

    def __init__(self) -> None:
        self.future: Any = None
        self.abandoned = threading.Event()  # set by a Ctrl-C while the run waits for the write (``_save`` stops writing)

    def start(self, write: Callable[[], None]) -> None:
        self.wait()
        self.future = threads.pool("checkpoint", 1).submit(write)

    def wait(self, during: BaseException | None = None) -> None:
        """A Ctrl-C while it waits abandons the write, as a Ctrl-C during a write in the main thread does (its temp file
        removed, the last checkpoint kept), and waits for its thread to stop at its next chunk: the run raises once what it
        leaves on the disk is settled (the CLI's after-interrupt line reads it). The future is kept until it is done, so a
        wait that a Ctrl-C cut short is waited for again (``_epochs``' finally) rather than left writing after train raises.

        A write that failed raises its error (``_write_error``: what the disk keeps, how to resume) in the place of
        ``during`` (the run's own error as it ends: a stop, a NaN loss) or of that Ctrl-C, which its line names
        (``_stopped_too``): the checkpoint those would call saved is not."""
        future = self.future
        if future is None:
            return
        interrupted = None
        try:
            futures.wait([future])
        except KeyboardInterrupt as e:
            self.abandoned.set()
            futures.wait([future])  # another Ctrl-C ends this wait, and _epochs' finally waits again
            interrupted = e
        self.future = None
        error, during = future.exception(), interrupted or during
        if error is not None and not isinstance(error, KeyboardInterrupt):  # that: the abandoned write's stop, as asked
            raise _stopped_too(error, during) from during
        if interrupted is not None:
            raise interrupted


def _stopped_too(error: BaseException, during: BaseException | None) -> BaseException:
    """A checkpoint write's ``error``, its line naming the error the run was ending with (``during``), if any."""
    if during is None or not isinstance(error, KdcacheError):
        return error
    # a DataLoader worker's error: its own message, not torch's text and the worker's traceback around it
    what = "interrupted" if isinstance(during, KeyboardInterrupt) else worker_message(during).split("; ", 1)[0]
    what = what if isinstance(during, KdcacheError | KeyboardInterrupt) else f"{type(during).__name__}: {what}"
    return type(error)(f"{error} (the run was ending already: {what})")


@dataclass
class _Loop:
    """What the epochs of a run share: the optimizer and its schedule, the plan's length, and rank 0's checkpoints of
    OUT (``save``: ``_save_epoch`` less the state; ``replacing``: the pipeline of an ``--overwrite`` run whose first
    checkpoint is still to replace the earlier run's files; ``saved``: where the last checkpoint is, and ``again``: the
    command that resumes the run, for messages; ``stop``: SIGTERM's request, and the ranks' agreement on it)."""

    optimizer: torch.optim.Optimizer
    schedule: Any
    total_steps: int
    every: int  # train.checkpoint_every
    out: Path
    rank: int
    save_to: Callable[..., None]
    replacing: Pipeline | None = None
    saved: str = ""
    again: str = "run the same command with --resume"  # how to resume, for TrainingStopped (the CLI refuses --resume --overwrite)
    stop: dict[str, Any] = field(default_factory=lambda: {"signal": 0, "agreed": False, "waiting": False})
    started: float = field(default_factory=time.perf_counter)  # for the metrics' "seconds" (moved on past each evaluation)
    before: float = 0.0  # a resumed run's training seconds before this process (its checkpoint's)
    lr: float = 0.0  # the learning rate the last step was taken with (the metrics' "lr")
    writes: _Writes = field(default_factory=_Writes)  # the last checkpoint's write, while the next steps train
    appending: bool = False  # metrics.jsonl was written whole by this process: its next lines are appended (_save_epoch)
    background: bool = False  # checkpoints written in a thread while the next steps train: train's TransferSet counted their
    # copy (one process, WRITE_IN_BACKGROUND, room for it: _transfer_set)
    saved_at: int = 0  # the step the last checkpoint was saved at (or the run started from)

    def elapsed(self) -> float:
        """The metrics' ``seconds``: the run's training time so far, across the processes that resumed it (evaluations
        left out: ``evaluation``)."""
        return self.before + time.perf_counter() - self.started

    def evaluation(self, evaluate: Callable[[], dict[str, float]], t: Any, state: dict[str, int], partial: dict[str, Any] | None) -> dict[str, float]:
        """``evaluate()``'s metrics and ``eval_seconds``: the time it took, which the training clock (``elapsed``) leaves
        out; none where ``t`` sets no evaluation (train.eval_split, train.eval_cache). An eval split without labels gives
        no metric, and its ``eval_seconds`` alone marks the line as evaluated (``_line_due``: else a finished run's every
        resume evaluated again and rewrote its files).

        A SIGTERM before or during one (one process) stops the run at once (``_evaluated``: its reads may hang, as a batch's
        may): the run is saved as its last step left it, at ``state`` with the epoch's loss sums (``partial``), its line and
        evaluation left to the resume, which makes them as the uninterrupted run did; a checkpoint there already is kept."""
        began = time.perf_counter()
        try:
            metrics = _evaluated(evaluate, self.stop) if t.eval_split or t.eval_cache else evaluate()
        except _WaitStopped:
            self.started += time.perf_counter() - began
            if state["step"] > self.saved_at:
                self.save(state, _rng_state(), None, partial)
            raise self.stopped(state) from None
        took = time.perf_counter() - began
        self.started += took
        return {**metrics, "eval_seconds": took} if metrics or t.eval_split or t.eval_cache else metrics

    def save(self, state: dict[str, int], rng: Any, metrics: dict[str, Any] | None, partial: dict[str, Any] | None = None) -> None:
        """Rank 0 saves the checkpoint (``_save_epoch``) with every rank's RNG state: under torchrun the ranks draw
        differently (dropout over an uneven last batch, none in an idle rank's step), and each restores its own."""
        rngs = distributed.gather(rng)
        self.writes.wait()  # one write at a time, in order: the next reads the metrics the last wrote
        if self.rank == 0:
            # one process: the files are written (and flushed to the disk) while the next steps train; under torchrun the
            # other ranks wait for them at the barrier below, as a resumed run's ranks must find them whole
            background = self.writes if self.background else None
            self.save_to(state, metrics, rngs if len(rngs) > 1 else rng, replacing=self.replacing, partial=partial, seconds=self.elapsed(),
                         lr=self.lr, background=background, append=self.appending)
            self.replacing, self.appending = None, self.appending or metrics is not None
        distributed.barrier()  # the other ranks wait for the save here (up to distributed.TIMEOUT), not in the next step's all-reduce
        self.saved, self.saved_at = _position(state), state["step"]

    def midway_due(self, state: dict[str, int], world: int) -> bool:
        """A checkpoint inside the epoch now: every ``train.checkpoint_every`` steps, and (one process) as soon as a stop
        is asked for; under torchrun a stop waits for the ranks' next checkpoint, where they agree on it."""
        return (self.every > 0 and state["step"] % self.every == 0) or (world == 1 and bool(self.stop["signal"]))

    def midway(self, run: Run, state: dict[str, int], sums: dict[str, torch.Tensor], seen: int,
               bar: Progress) -> tuple[dict[str, torch.Tensor], int]:
        """Save a checkpoint inside the epoch, with every rank's loss sums so far (rank 0 goes on from them, the other
        ranks from zero), and stop there if any rank was asked to (``TrainingStopped``). A loss already NaN or inf stops
        the run before it overwrites the checkpoint."""
        totals = _summed(run, sums, seen, self.stop)
        _check_finite(_means(sums, totals), state, self.out, self.saved)
        partial = _partial(sums, totals)
        self.save(state, _rng_state(), None, partial)
        if self.stop["agreed"]:
            bar.close()
            raise self.stopped(state)
        return _sums(run, partial)

    def stopping(self, more: bool) -> bool:
        """After an epoch's checkpoint, with ``more`` steps to go: whether the ranks agreed to stop, or (one process) a
        stop was asked for while the epoch ended."""
        return more and (self.stop["agreed"] or (distributed.ranks()[1] == 1 and bool(self.stop["signal"])))

    def stopped(self, state: dict[str, int]) -> TrainingStopped:
        name = signal.Signals(self.stop["signal"]).name if self.stop["signal"] else "SIGTERM to another rank"
        if not self.saved:  # stopped while its first batch was waited for (_taken): nothing to save
            return TrainingStopped(f"stopped by {name} before the run's first step; no checkpoint was saved: run the same command again")
        return TrainingStopped(f"stopped by {name} {_position(state)} (step {state['step']} of {self.total_steps}); "
                               f"its checkpoint is saved in {str(self.out)!r}: {self.again} to continue")


@contextlib.contextmanager
def _stop_requests(stop: dict[str, Any]) -> Iterator[None]:
    """SIGTERM (a scheduler's preemption or time limit, ``kill``) asks the run to stop: it finishes its step, saves a
    checkpoint and raises ``TrainingStopped`` (``_Loop.midway``) instead of losing the epoch in progress; one while the
    next batch is waited for saves the run as its last step left it (``_taken``). More SIGTERMs
    ask the same (a scheduler may send several: Slurm signals every process of a job, and torchrun passes its own on
    to the ranks); Ctrl-C or SIGKILL end a run at once. Only the main thread takes signals: a run in another thread
    (a library caller's) leaves SIGTERM as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def requested(signum: int, frame: Any) -> None:
        stop["signal"] = signum
        if stop.get("waiting"):  # for the next batch, or an evaluation's, which may never come: the run stops now (_taken)
            raise _WaitStopped

    before = signal.getsignal(signal.SIGTERM)
    before = before if before is not None else signal.SIG_DFL  # None: set outside Python; the default is the closest
    signal.signal(signal.SIGTERM, requested)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _step_losses(run: Run, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``run.losses(batch)`` in training mode; a batch of one sample BatchNorm cannot normalise says how to leave it out."""
    # torchrun: a rank whose stream has run out takes part in the step with one row it learns nothing from (share 0),
    # run in eval mode: BatchNorm neither fails on the one row nor counts it in its running statistics
    idle = batch.get("share", 1.0) == 0
    if idle:
        run.student.eval(), run.heads.eval()
    try:
        parts = run.losses(batch)
    except ModelError as e:
        if len(batch["rows"]) != 1 or e.__cause__ is None:
            raise
        raise ModelError(f"the student model raised {raised(e.__cause__)} on a batch of one sample (an epoch's rows left over after "
                         "its full batches), which BatchNorm cannot normalise in training; set train.drop_last = true to leave "
                         "incomplete batches out, or choose a train.batch_size that leaves more than one") from e.__cause__
    finally:
        if idle:
            run.student.train(), run.heads.train()
    for name, part in parts.items():  # backward() would raise "element 0 of tensors does not require grad" (a traceback)
        if not part.requires_grad and not name.startswith("feat:"):
            raise _without_gradient(run, name)
    for path, (_, weight, _) in run.features.items():  # a feature term's gradient must reach the student, not its head alone
        if weight and not run.graded[path]:  # a weight of 0 trains nothing anyway (the message's fix)
            raise _without_gradient(run, f"feat:{layout.layer_name(path)}")
    return parts


def _without_gradient(run: Run, term: str) -> ModelError:
    """The error for loss term ``term`` through which no gradient reaches the student's parameters (nor a projection head's)."""
    what = f"the output of student module {run.features[layout.layer_path(term[5:])][0]!r}" if term.startswith("feat:") else "the student's output"
    return ModelError(f"loss term {term!r} does not depend on the student's parameters: {what} carries no gradient (an integer or "
                      "boolean tensor, such as an argmax or a one-hot of it, a .detach(), a forward run under torch.no_grad() or "
                      "torch.inference_mode(), a module run inside torch.utils.checkpoint with use_reentrant=True, whose first forward "
                      "keeps no gradient: use_reentrant=False, e.g. Hugging Face's gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                      "{'use_reentrant': False}), or parameters all frozen with requires_grad=False), so its weight trains nothing; "
                      "return the logits (or features) the student computes, as floating-point tensors, or set that term's weight to 0")


@dataclass
class Run:
    """The student, its projection heads and feature hooks, and the loss weights."""

    student: torch.nn.Module
    heads: torch.nn.ModuleDict  # keyed by teacher layer (encoded path)
    features: dict[str, tuple[str, float, str]]  # teacher target path -> (student module, weight, select)
    hooked: dict[str, Any]
    loss: Any  # LossSection
    device: torch.device
    paths: list[str]
    world: int = 1  # under torchrun: the number of ranks whose gradients each step averages
    select: str = "auto"  # student.select: the part of the student's output compared with the stored logits
    precision: str = "fp32"  # train.precision: autocast of the student's forward and heads
    mask: str = ""  # train.mask: the key of the batch's dict inputs holding its (B, T) padding mask
    masked: tuple[str, ...] = ()  # the target paths whose terms take that mask (per-token ones: mask_paths)
    classes: int = 0  # a store of top-k logits (targets.topk): the teacher's class count, which they are spread over (0: full logits)
    mask_where: str = ""  # where train.mask was set, to begin messages about it
    inputs: tuple[str, ...] = ()  # student.inputs: the keys of the batch's dict inputs the student is called with ((): all)
    inputs_where: str = ""  # where student.inputs was set, to begin messages about it
    scaler: Any = field(init=False, default=None)
    graded: dict[str, bool] = field(init=False, default_factory=dict)  # the last losses(): each student feature carries a gradient

    def __post_init__(self) -> None:
        # fp16: a dynamic loss scale keeps small gradients from flushing to zero; a step whose gradients overflow is
        # skipped and the scale halved (bf16 has float32's range and needs none). Disabled, it passes calls through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @functools.cached_property
    def pools(self) -> bool:
        """Whether ``train.mask`` is set and a select of the student (``student.select``, a feature's) pools by it."""
        return bool(self.mask) and any(teachers.pools(s) for s in (self.select, *(sel for _, _, sel in self.features.values())))

    def padding(self, batch: dict[str, Any]) -> teachers.Padding | None:
        """``train.mask``'s padding mask of ``batch`` (a training, probe or eval batch), checked and on the host
        (``teachers.Padding.of``, as extract's), which the student's select steps ``mean`` and ``last`` pool by; None where
        no mask is set or no select of the student pools (``pools``: decided once): those selects run as without a mask.
        A training batch brings it as bool, its values checked as the batch was made (``batch["mask"]``: ``TransferSet.check_masks``)."""
        if not self.pools:
            return None
        if batch.get("mask") is not None:  # the rest of the checks (a row keeping no position) on the bool copy: no value compared here
            batch = {"inputs": {**batch["inputs"], self.mask: batch["mask"]}, "index": batch["index"]}
        return teachers.Padding.of(batch, self.mask, "train.mask", self.mask_where)

    def forward(self, inputs: Any) -> Any:
        """The student's output for a batch's ``inputs`` (on the host): the entries ``student.inputs`` names (every one where
        it names none) moved to the device and passed to it (``data.call``)."""
        return data.call(self.student, data.to_device(data.picked(inputs, self.inputs, self.inputs_where), self.device), "student")

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weighted loss terms for one batch; only terms with a non-zero weight appear."""
        self.hooked.clear()  # this forward's outputs only: never a stale one from an earlier batch
        padding = self.padding(batch)
        with data.autocast(self.device, self.precision):  # the student and its heads; the losses compute in float32
            logits = self.forward(batch["inputs"])
            logits = select_student(logits, "student output", self.select, mask=padding)
            feats = {}
            for path, (module, _, selector) in self.features.items():
                feat = student_feature(self.hooked, layout.layer_name(path), module, selector, padding)
                self.graded[path] = feat.requires_grad  # before its head, whose parameters would give the term a gradient
                feats[path] = self.heads[_key(path)](feat) if _key(path) in self.heads else feat
        if self.classes:  # on the host copy: no device sync, and no device-side assert of an index out of range
            losses.check_topk_classes(batch["targets"][layout.LOGITS_INDICES], self.classes, "the store's top-k logits")
        targets = {p: v.to(self.device, non_blocking=True) for p, v in batch["targets"].items()}
        # the batch's own items' padding mask, for per-token terms (read from the whole item: student.inputs need not list it)
        masks = dict.fromkeys(self.masked, self.token_mask(batch, padding)) if self.masked else {}
        w, parts, mask = self.loss, {}, masks.get(layout.LOGITS)
        try:
            if w.kl and self.classes:  # top-k logits (train refuses mse on them)
                kl = losses.topk_kl_divergence(logits, targets[layout.LOGITS], targets[layout.LOGITS_INDICES], w.temperature, mask,
                                               self.classes)
                parts["kl"] = _weighted(w.kl, kl)
            elif w.kl:
                parts["kl"] = _weighted(w.kl, losses.kl_divergence(logits, targets[layout.LOGITS], w.temperature, mask))
            if w.mse:
                mse = (losses.logit_mse(logits, targets[layout.LOGITS], mask) if w.mse_on == "logits"
                       else losses.probability_mse(logits, targets[layout.LOGITS], w.temperature, mask))
                parts["mse"] = _weighted(w.mse, mse)
        except ShapeMismatchError as e:
            raise _output_mismatch(e, logits, self.stored_shape(targets), len(batch["rows"]), self.select) from None
        if w.ce:
            _check_labels(batch["label"], tuple(logits.shape))  # on the CPU copy: no device sync
            parts["ce"] = _weighted(w.ce, losses.cross_entropy(logits, batch["label"].to(self.device)))
        for path, (_, weight, _) in self.features.items():
            parts[f"feat:{layout.layer_name(path)}"] = _weighted(weight, losses.feature_mse(feats[path], targets[path], masks.get(path)))
        return parts

    def token_mask(self, batch: dict[str, Any], padding: teachers.Padding | None) -> torch.Tensor:
        """``train.mask``'s (B, T) padding mask of ``batch`` on the device, as bool: a training batch brings it so, its values
        checked on the host copy as the batch was made, in the thread making it (``batch["mask"]``: ``TransferSet.check_masks``;
        here only copied, from pinned memory without blocking); another batch's is checked here (``Padding.of`` did where the
        student's select pools by it) and made bool on the device after its copy there. A loss then takes it as it is, with
        no check of its own (a device sync each step)."""
        mask = batch.get("mask")
        if mask is None:
            mask = batch["inputs"][self.mask]
            if padding is None:
                data.check_mask_values(mask, self.mask, "train.mask", self.mask_where)
        return mask.to(self.device, non_blocking=True).to(torch.bool)

    def stored_shape(self, targets: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        """The stored logits' per-sample shape over every class: a top-k store's with the teacher's class count for K."""
        shape = tuple(targets[layout.LOGITS].shape[1:])
        return (*shape[:-1], self.classes) if self.classes else shape


def _output_mismatch(e: ShapeMismatchError, logits: torch.Tensor, stored: tuple[int, ...], rows: int, selector: str) -> Exception:
    """A loss's shape error, with the setting that fixes it in ``kdcache train``: a first axis that is not the batch's
    samples (``samples_first_error``), or a batch-first output with more axes than the stored logits (``stored``: their
    per-sample shape, over every class; per-token logits against one row per sample: ``student.select`` picks the part);
    other errors (the classes) as they are."""
    if logits.ndim == 0 or logits.shape[0] != rows:
        return samples_first_error(tuple(logits.shape), rows, selector)
    if logits.ndim < len(stored) + 1 and selector != "auto":  # the select stepped into the classes (an index of them)
        what = str(e).split(": ", 1)[0]
        return ShapeMismatchError(f"{what}: student.select = {selector!r} picks a part of the student's output of per-sample shape "
                                  f"{list(logits.shape[1:])}, fewer axes than the stored logits' {list(stored)}: it is the part "
                                  "compared with them, their classes on its last axis; set it to that part (\"auto\": the whole "
                                  "output, where the student returns its logits alone)")
    if logits.ndim > len(stored) + 1:
        what = str(e).split("; ", 1)[0]
        setting = f"student.select = {selector!r} picks" if selector != "auto" else "student.select picks"
        return ShapeMismatchError(f"{what}: the student's output has more axes than the stored logits (per-sample shape "
                                  f"{list(stored)}); {setting} the part of the student's output compared with them: set it "
                                  "to the part that matches, e.g. \"-1\" (the last position: a causal LM's next token), \"0\" (the "
                                  "first: a class token) or \"mean\" (the mean over positions), as targets.select did for the teacher")
    return e


def samples_first_error(shape: tuple[int, ...], rows: int, selector: str, probe: bool = False) -> TargetError:
    """The student's output does not have the batch's samples on its first axis (a sequence-first output)."""
    part = "" if selector == "auto" else f" (student.select = {selector!r})"
    seen = f" (kdcache runs {rows} sample{'s' * (rows != 1)} through the student to see this)" if probe else ""
    return TargetError(f"the student's output{part} has shape {list(shape)} for a batch of {rows} sample{'s' * (rows != 1)}, but its "
                       f"first axis must be the samples{seen}: a sequence-first output ((time, batch, ...), from an RNN or "
                       "attention layer with batch_first=False, PyTorch's default) would have each sample's targets compared with "
                       "other samples' outputs; make the model student.factory builds return its output batch first "
                       "(batch_first=True, or a permute to (batch, ...)); student.select's steps work on each sample's axes after "
                       "the batch and cannot move it")


def _weighted(weight: float, loss: torch.Tensor) -> torch.Tensor:
    return loss if weight == 1 else weight * loss  # a weight of 1 adds no op to each step's graph


# the fix a student or head too large for its device names: train.precision autocasts the forward only
STUDENT_FIX = 'set train.device = "cpu" (train --device cpu) to train on the CPU (train.precision does not shrink the weights: they stay float32)'


def setup(pipeline: Pipeline, store: layout.Store, dataset: Any, device: torch.device, hooks: list[Any] | None = None,
          keep_zero: bool = False) -> Run:
    """Build the student, hook its feature layers, and create projection heads from a probe batch. A ``train.features``
    entry of weight 0 is checked (its layer stored, its student module there) but off: no hook, no head, its layer not
    read (``keep_zero``: on, with a term of 0, as kdcache <= 0.1.12 had it: ``_keeps_zero_terms``). The hooks' handles, and
    the student's and heads' training modes as built (``_Modes``), are appended to ``hooks`` as they are made (the caller
    removes them, also when this raises)."""
    t, w = pipeline.train, pipeline.train.loss
    if pipeline.student.inputs:  # keys the items have, before the student is built
        data.picked(data.item_inputs(dataset, 0), pipeline.student.inputs, pipeline.where("student.inputs"))
    student = _build_student(pipeline, device, hooks)
    _check_float16_student(pipeline, student)
    _check_stored_for_loss(pipeline, store)
    specs = {layer: {**FEATURE_DEFAULTS, **spec} for layer, spec in t.features.items()}
    _check_something_to_learn(pipeline, specs)
    stored = {tg.name: tg for tg in store.targets.values()}
    _check_feature_layers(specs, store, stored)
    terms = loss_targets(pipeline, stored, keep_zero)
    features = {path: (spec["student"], float(spec["weight"]), spec["select"]) for path, spec in terms.items() if path != layout.LOGITS}
    teachers.check_layers(student, tuple(spec["student"] for spec in specs.values()), what="student")
    run = Run(student, torch.nn.ModuleDict(), features, {}, w, device, list(terms), select=pipeline.student.select, precision=t.precision,
              mask=t.mask, mask_where=pipeline.where("train.mask"), classes=stored[teachers.LOGITS].classes if layout.LOGITS in terms else 0,
              inputs=pipeline.student.inputs, inputs_where=pipeline.where("student.inputs"))
    run.masked = mask_paths(pipeline, store.targets.values(), run.paths, dataset)
    # owned as the teacher's are: a later in-place op (ReLU(inplace=True)) must not change what is distilled
    handles = teachers.hook(student, [module for module, _, _ in features.values()], run.hooked)
    if hooks is not None:
        hooks.extend(handles)
    if features:
        shapes, dtypes = _probe_features(run, dataset)
        _check_samples_first(run, dataset, {path: len(shape) for path, shape in shapes.items()})
        _add_heads(run, stored, shapes, dtypes)
    if hooks is not None:
        hooks.append(_Modes(run.heads))
    compared = bool(w.kl or w.mse or w.ce or t.eval_split or t.eval_cache)  # the output: by a loss, or by the evaluation
    if compared or features:
        _check_student_rows(run, dataset, output=compared, batch_size=t.batch_size)
    _check_trainable(pipeline, run)
    return run


def _build_student(pipeline: Pipeline, device: torch.device, hooks: list[Any] | None) -> torch.nn.Module:
    """The student ``student.factory`` builds, in eval mode on ``device``; its modules' training modes as the factory
    returned them are appended to ``hooks`` (``_Modes``), for the caller to put back."""
    student = teachers.build(pipeline, "student.factory", None if hooks is None else lambda model: hooks.append(_Modes(model)))
    return data.move_model(student, f"the student (student.factory {pipeline.student.factory!r})", device, STUDENT_FIX)


def _check_float16_student(pipeline: Pipeline, student: torch.nn.Module) -> None:
    """Refuse a student with trainable float16 parameters where ``train.precision = "fp16"`` or AdamW would fail on them."""
    t = pipeline.train
    half = next((name for name, p in student.named_parameters() if p.requires_grad and p.dtype == torch.float16), None)
    if half is not None and t.precision == "fp16":  # GradScaler unscales float32 gradients only: a traceback at the first step
        raise PipelineError(f"{pipeline.where('train.precision')}: train.precision = \"fp16\" keeps float32 weights (autocast runs the "
                            f"forward in float16, a loss scale guards the gradients), but {pipeline.student.factory!r} builds a student "
                            f"with float16 parameters (e.g. {half!r}); return the model in float32 (drop its .half())")
    if half is not None and t.optimizer == "adamw":  # its squared gradients and eps (1e-8) are 0 in float16: NaN weights at step 1
        raise PipelineError(f"{pipeline.student.factory!r} builds a student with float16 parameters (e.g. {half!r}), whose AdamW state "
                            "underflows in float16 (its eps 1e-8 and small squared gradients are 0): the first step makes NaN weights; "
                            "return the model in float32 (drop its .half()) and set train.precision = \"fp16\" for float16 compute")


def _check_stored_for_loss(pipeline: Pipeline, store: layout.Store) -> None:
    """Refuse loss weights that read what ``store`` lacks: kl and mse its logits, ce its labels."""
    w = pipeline.train.loss
    if (w.kl or w.mse) and layout.LOGITS not in {tg.path for tg in store.targets.values()}:
        if teachers.LOGITS in store.targets:  # targets.logits = false with a module named 'logits' (extract's fix for the clash)
            raise PipelineError(f"train.loss.kl/mse need the teacher's stored output ({layout.LOGITS}), but {store.location!r} stores "
                                f"none: its target 'logits' is the teacher module of that name, stored as a layer "
                                f"({store.targets[teachers.LOGITS].path}); set train.loss.kl and mse to 0 and distill it with "
                                "train.features.logits = {student = \"MODULE\"} (a student module giving outputs of its shape)")
        raise PipelineError(f"train.loss.kl/mse need stored logits but {store.location!r} has none; set them to 0 or extract with targets.logits = true")
    topk = next((tg for tg in store.targets.values() if tg.path == layout.LOGITS and tg.topk), None)
    if w.mse and topk is not None:  # the other classes' logits are not stored: there is nothing to square their error against
        raise PipelineError(f"train.loss.mse = {w.mse:g} compares every class's logit, but {store.location!r} stores the teacher's top "
                            f"{topk.topk} of {topk.classes} (targets.topk); set train.loss.mse = 0 and distil with train.loss.kl, or "
                            "extract with targets.topk = 0")
    if w.ce and not store.has_labels:
        raise PipelineError(f"train.loss.ce needs labels but {store.location!r} stores none (its dataset has no labels); set train.loss.ce = 0")
    check_classes(pipeline, store.targets.values())


def check_classes(pipeline: Pipeline, targets: Iterable[layout.Target]) -> None:
    """Refuse train.loss.kl, and mse on probabilities, over stored logits of one class (per-sample shape (1,) or (T, 1): a
    regression head's ``Linear(d, 1)``, a binary classifier's one sigmoid logit): softmax over one class is 1 whatever the
    logit, so the term is 0 at every step and the student learns nothing from it. ``targets``: a store's, or extract's dry run's."""
    w = pipeline.train.loss
    shape = next((tg.output_shape for tg in targets if tg.path == layout.LOGITS), ())
    term = "kl" if w.kl else "mse" if w.mse and w.mse_on == "probabilities" else ""
    if shape and shape[-1] == 1 and term:
        setting = f"train.loss.{term}" + (' with mse_on = "probabilities"' if term == "mse" else "")
        raise PipelineError(f"{pipeline.where('train.loss.' + term)}: {setting} compares softmax distributions over classes, but the stored "
                            f"logits have one class (per-sample shape {list(shape)}): softmax over one class is 1 whatever the logit, so "
                            "the term is 0 and trains nothing; distil one value per output by its squared error: train.loss.mse > 0 with "
                            'mse_on = "logits", and train.loss.kl = 0')


def _check_something_to_learn(pipeline: Pipeline, specs: dict[str, dict[str, Any]]) -> None:
    """Refuse a run whose every loss weight is 0, ``train.features`` entries (``specs``, FEATURE_DEFAULTS filled in) included."""
    t, w = pipeline.train, pipeline.train.loss
    if not (w.kl or w.mse or w.ce or any(spec["weight"] for spec in specs.values())):
        features = "train.features is empty" if not t.features else "every train.features entry has weight 0"
        raise PipelineError(f"{pipeline.source}: every loss weight is 0 and {features}; nothing to learn from: "
                            "set a weight above 0 (train.loss.kl, mse, ce or a train.features weight), e.g. train.loss.kl = 1.0")


def _check_feature_layers(specs: dict[str, dict[str, Any]], store: layout.Store, stored: dict[str, layout.Target]) -> None:
    """Refuse a ``train.features`` layer that ``store`` (its targets by name: ``stored``) does not hold, or that is the
    teacher's output rather than a layer."""
    for layer in specs:
        if layer not in stored:
            layers = sorted(name for name, tg in stored.items() if tg.path != layout.LOGITS)
            # a typo of a stored layer ('classifer.1') is told so first: extracting a store with the typo in it is no fix
            close = difflib.get_close_matches(layer, layers, n=1)
            fix = f"did you mean {close[0]!r}? Name it in train.features" if close else "name one of them"
            raise PipelineError(f"train.features names teacher layer {layer!r}, which {store.location!r} does not store (its layers: "
                                f"{layers}); {fix}, or extract a store with {layer!r} in targets.layers (--layers)")
        if stored[layer].path == layout.LOGITS:
            raise PipelineError(f"train.features names {layer!r}, the teacher's output, not a layer; distill it with train.loss.kl or "
                                "train.loss.mse, and list only layers from targets.layers under train.features")


def _probe_features(run: Run, dataset: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Each hooked student feature's shape and dtype for a probe batch of dataset items 0 and 1 (the first two), by
    target path; a feature whose first axis is not the probe's samples is refused."""
    probe = _probe_batch(dataset, [0, min(1, len(dataset) - 1)])
    with torch.no_grad():
        run.forward(probe["inputs"])
    shapes, dtypes = {}, {}
    for path, (module, _, selector) in run.features.items():
        name = layout.layer_name(path)
        feat = student_feature(run.hooked, name, module, selector, run.padding(probe))
        if feat.ndim == 0 or feat.shape[0] != len(probe["index"]):  # as extract refuses for the teacher's layers
            raise TargetError(f"train.features {name!r}: student module {module!r} gives shape {list(feat.shape)} for a batch of "
                              f"{len(probe['index'])} samples, but its first axis must be the samples (kdcache runs two samples "
                              "through the student to see this); distill a batch-first output (e.g. batch_first=True for "
                              "RNN/attention layers, or a module that permutes to (batch, ...))")
        shapes[path], dtypes[path] = tuple(feat.shape), feat.dtype
    return shapes, dtypes


def _add_heads(run: Run, stored: dict[str, layout.Target], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> None:
    """A projection head in ``run.heads`` for each student feature (probed ``shapes`` and ``dtypes``) whose shape is not
    its stored layer's (``stored``: by name), on the run's device; each said once (rank 0)."""
    for path, (module, _, selector) in run.features.items():
        name = layout.layer_name(path)
        try:
            head = losses.projection_head(shapes[path][1:], stored[name].shape, name=name)
        except ShapeMismatchError as e:  # the student's shape is the part its select picked: name the value seen
            if selector == "auto":
                raise
            seen, text = f"student shape {tuple(shapes[path][1:])}", str(e)
            picked = f"what train.features.{name!r}.select = {selector!r} picks from the output of student module {module!r}"
            raise ShapeMismatchError(text.replace(seen, f"{seen} ({picked})", 1) if seen in text else f"{text} ({picked})") from None
        if head is not None:
            # in the student feature's dtype: a float64 student's head is float64 (autocast casts a float32 one's input)
            run.heads[_key(path)] = data.move_model(head, f"the projection head for {name!r}", run.device, STUDENT_FIX,
                                                    dtypes[path] if dtypes[path].is_floating_point else None)
            if distributed.ranks()[0] == 0:  # said once, not by every torchrun rank
                part = "" if selector == "auto" else f" (select {selector!r})"
                print(f"projection head for {name!r} <- student {module!r}{part}: {head.description}")


def _check_trainable(pipeline: Pipeline, run: Run) -> None:
    """Refuse a run with no parameters to train: none in the student, and no projection head."""
    if not any(True for _ in itertools.chain(run.student.parameters(), run.heads.parameters())):
        raise PipelineError(f"{pipeline.student.factory!r} builds a student with no parameters (and no projection heads): "
                            "nothing to train; make student.factory return a model with trainable parameters")


class _Modes:
    """Each of ``module``'s modules' training mode (``train()``/``eval()``) as it is now; ``remove()`` puts them back
    (named as a hook's handle: ``train`` undoes both the same way however it ends)."""

    def __init__(self, module: torch.nn.Module):
        self.modes = {m: m.training for m in module.modules()}

    def remove(self) -> None:
        for m, mode in self.modes.items():
            m.training = mode


def _keeps_zero_terms(checkpoint: dict[str, Any] | None, pipeline: Pipeline, rank: int) -> bool:
    """Whether a resumed run was started by kdcache <= 0.1.12 with a projection head for a ``train.features`` entry of
    weight 0 (its term 0 at every step): it keeps those terms on, so that its checkpoint's heads and optimizer state
    still fit (a new run leaves them off)."""
    kept = _zero_terms_kept(checkpoint, pipeline)
    if kept and rank == 0:
        print(f"note: this run was started by kdcache <= 0.1.12, which built a projection head for a train.features entry of "
              f"weight 0; the resumed run keeps the term of train.features {', '.join(map(repr, kept))} (weight 0), its loss_feat "
              "0 (a new run leaves such an entry off: its layer not read, no head)", file=sys.stderr)
    return bool(kept)


def _zero_terms_kept(checkpoint: dict[str, Any] | None, pipeline: Pipeline) -> list[str]:
    """The ``train.features`` entries of weight 0 a resumed run keeps on (``_keeps_zero_terms``): those its checkpoint has a
    projection head for."""
    if checkpoint is None:
        return []
    heads = {key.split(".", 1)[0] for key in checkpoint["heads"]}
    zero = [layer for layer, spec in pipeline.train.features.items() if not {**FEATURE_DEFAULTS, **spec}["weight"]]
    return [layer for layer in zero if _key(layout.layer_path(layer)) in heads]


def loss_targets(pipeline: Pipeline, stored: Mapping[str, layout.Target], keep_zero: bool = False) -> dict[str, dict[str, Any]]:
    """The stored targets the run's loss terms read, by path: the logits where train.loss.kl or mse is above 0, then each
    train.features layer of weight above 0 (``keep_zero``: of any weight, ``_keeps_zero_terms``) with its entry, FEATURE_DEFAULTS
    filled in. ``stored``: the targets by name (a store's, or extract's dry run's); a layer it lacks is left out."""
    w = pipeline.train.loss
    terms: dict[str, dict[str, Any]] = {layout.LOGITS: {}} if w.kl or w.mse else {}
    for layer, spec in pipeline.train.features.items():
        spec = {**FEATURE_DEFAULTS, **spec}
        if layer in stored and (spec["weight"] or keep_zero):
            terms[stored[layer].path] = spec
    return terms


def mask_paths(pipeline: Pipeline, targets: Iterable[layout.Target], paths: list[str], dataset: Any) -> tuple[str, ...]:
    """Of ``paths`` (the run's terms' targets, among ``targets``: a store's, or extract's dry run's), those whose terms
    ``train.mask`` applies to: per-token logits and features, ``(tokens, classes)`` or ``(tokens, dim)`` per sample. The
    mask is checked on two dataset items first (``_checked_mask``): an entry of their dict inputs, ``(tokens,)`` each, as
    many tokens as those targets, of bool or 0/1 values. The student's selects are checked first (``_check_student_pooling``).
    """
    by_path = {tg.path: tg for tg in targets}
    pooled = _check_student_pooling(pipeline, by_path, paths)
    key, where = pipeline.train.mask, pipeline.where("train.mask")
    if not key:
        return ()
    shapes, names = {path: tuple(tg.shape) for path, tg in by_path.items()}, {path: tg.name for path, tg in by_path.items()}
    tokens = {path: shapes[path][0] for path in paths if len(shapes[path]) == 2}
    if not tokens and not pooled:
        seen = ", ".join(f"{names[path]} {list(shapes[path])}" for path in paths) or "none: ce alone"
        raise PipelineError(f"{where}: train.mask = {key!r} masks per-token terms (kl and mse on (tokens, classes) logits, train.features "
                            f"of (tokens, dim)) and pools the student's select steps 'mean' and 'last', but no term of this run is "
                            f"per-token (per-sample shapes: {seen}) and no student select pools, so it would change nothing; set "
                            "train.mask = \"\"")
    mask = _checked_mask(dataset, key, where)
    wrong = next((path for path, count in tokens.items() if count != mask.shape[1]), None)
    if wrong is not None:
        target = by_path[wrong]
        chosen = "" if target.select in ("tensor", "auto") else f", targets.select {target.select!r}"
        raise ShapeMismatchError(f"{where}: train.mask {key!r} has {mask.shape[1]} positions per item, but the stored "
                                 f"{target.name!r} has {tokens[wrong]} tokens (per-sample shape {list(shapes[wrong])}{chosen}); "
                                 "give the mask one value per token of the per-token logits and features (a select that keeps part of "
                                 "the tokens, \"1:\", needs a mask of that part under a key of its own, e.g. attention_mask[1:], which the "
                                 "models are passed too), or set train.mask = \"\"")
    return tuple(tokens)


def _student_selects(pipeline: Pipeline, targets: Mapping[str, layout.Target],
                     paths: list[str]) -> list[tuple[str, str, str, layout.Target | None]]:
    """The selects this run applies to the student (``paths``: its terms' targets, in ``targets`` by path): each one's key
    (for ``Pipeline.where``), its name in messages, its value, and the stored target its term compares it with (None:
    ``student.select`` where neither kl nor mse reads the stored logits)."""
    logits = targets.get(layout.LOGITS) if layout.LOGITS in paths else None
    features = {targets[path].name: targets[path] for path in paths if path != layout.LOGITS}
    return [("student.select", "student.select", pipeline.student.select, logits)] + [
        (f"train.features.{name}", f"train.features.{name!r}.select", {**FEATURE_DEFAULTS, **spec}["select"], features[name])
        for name, spec in pipeline.train.features.items() if name in features]


def _check_student_pooling(pipeline: Pipeline, targets: Mapping[str, layout.Target], paths: list[str]) -> bool:
    """Refuse a student select (``_student_selects``) that pools otherwise than it must: ``last`` without ``train.mask``, and
    a term whose student select and stored target both pool (``mean``, ``last``), one by a padding mask and the other over
    every position, padding included (they differ for every padded item). A pooling step on one side only (the student's
    ``mean`` against the teacher's class token or pooler output), or masks under two keys, is a choice let be. Returns
    whether a student select pools by ``train.mask``."""
    key, pooled = pipeline.train.mask, False
    for at, setting, selector, target in _student_selects(pipeline, targets, paths):
        pooled = pooled or bool(key) and teachers.pools(selector)
        said = f"{setting} = {selector!r}"
        if not key and "last" in selector.split("."):
            raise PipelineError(f"{pipeline.where(at)}: {said} takes each item's last valid position by the padding mask train.mask "
                                "names, but train.mask is not set; set train.mask = \"attention_mask\" (the key of the dataset's dict "
                                "inputs holding each item's mask), or use \"-1\" there (the last position, padding or not)")
        if target is None or not (teachers.pools(selector) and teachers.pools(target.select)) or bool(key) == bool(target.mask):
            continue
        stored = f"the stored target {target.name!r} (targets.select {target.select!r})"
        if key:
            raise PipelineError(f"{pipeline.where('train.mask')}: {said} pools the student's output by train.mask {key!r} (each item's "
                                f"valid positions), but {stored} was pooled over every position, padding included (the store records no "
                                f"targets.{target.name}.mask): the two differ for every padded item; extract the store with "
                                f"targets.mask = {key!r}, or set train.mask = \"\" (both pooled over padding)")
        raise PipelineError(f"{pipeline.where(at)}: {said} averages the student's output over every position, padding included "
                            f"(train.mask is not set), but {stored} was pooled by the padding mask {target.mask!r} (targets."
                            f"{target.name}.mask): the two differ for every padded item; set train.mask to the key of the items' "
                            f"padding mask (the store's: {target.mask!r})")
    return pooled


def _checked_mask(dataset: Any, key: str, where: str) -> torch.Tensor:
    """The batched ``train.mask`` entry of dataset items 0 and 1 (the first two), checked as ``data.padding_mask`` checks
    extract's ``targets.mask`` of every batch."""
    probe = _probe_batch(dataset, [0, min(1, len(dataset) - 1)])
    return data.padding_mask(probe["inputs"], probe["index"], key, "train.mask", where)


def _check_samples_first(run: Run, dataset: Any, ndim: dict[str, int]) -> None:
    """A first axis as long as setup's two-sample probe that is not the samples (a 2-layer LSTM's ``h_n``, or a select step
    such as ``"1.0.-1"`` taking its last sample) keeps its length for one sample, as extract's probe of one sample finds
    for the teacher. A student that does not take a batch of one is let be."""
    run.hooked.clear()
    try:
        one = _probe_batch(dataset, [0])
        with torch.no_grad():
            run.forward(one["inputs"])
        feats = {path: student_feature(run.hooked, layout.layer_name(path), module, selector, run.padding(one))
                 for path, (module, _, selector) in run.features.items()}
    except DeviceMemoryError as e:
        teachers.skipped_check("the check that each train.features module's first axis is the samples", "student", e,
                               "nothing else checks it: distill a batch-first output, or train where a batch of one sample fits")
        return
    except (ModelError, TargetError):
        return
    finally:
        run.hooked.clear()
    for path, feat in feats.items():
        if feat.ndim == ndim[path] and feat.shape[0] != 1:
            raise TargetError(f"train.features {layout.layer_name(path)!r}: student module {run.features[path][0]!r} gives shape "
                              f"{list(feat.shape)} for one sample, but its first axis must be the samples (kdcache runs one sample "
                              "through the student to see this); distill a batch-first output (e.g. batch_first=True for "
                              "RNN/attention layers, or a module that permutes to (batch, ...)); a select step works on each "
                              "sample's first axis, the one after the batch")


def _check_student_rows(run: Run, dataset: Any, output: bool, batch_size: int) -> None:
    """The student's output (``student.select``'s part; where ``output``: a loss or the evaluation compares it) must have
    the samples on its first axis: a sequence-first one, ``(time, batch, classes)``, would be compared with the stored
    ``(batch, ...)`` logits sample for time step, and silently where the time axis is as long as the batch (per-token
    logits). A probe batch of samples 0 to N-1 (N: ``batch_size``, at most the dataset's length, at least 2), then sample
    0 alone (a first axis that keeps its length is not the samples), then the probe batch with every sample moved one
    place, in eval mode, with the RNG and every module's mode as they were: the run trains as without this check. Each
    sample's output, and each ``train.features`` module's, must be its own row (``_check_rows_in_place``): a student that
    sorts its batch and puts back only its output leaves its modules' rows sorted. A student that does not take them is
    let be: the first step says what is wrong. One whose probes run out of device memory is let be too, with a warning."""
    n = len(dataset)
    rows = [i % n for i in range(max(2, min(batch_size, n)))]  # a dataset of one item: that item twice
    modes = _Modes(run.student)
    run.student.eval()
    try:
        batch = _student_rows(run, dataset, rows, output)  # out of device memory: so is the first step, said as it would be
        if batch is not None:
            _check_probes(run, dataset, output, rows, batch)
    finally:
        modes.remove()


def _check_probes(run: Run, dataset: Any, output: bool, rows: list[int], batch: dict[str, torch.Tensor]) -> None:
    """``_check_student_rows``'s probes after the probe batch of dataset ``rows`` (``batch``: ``_student_rows``), and its
    refusals; where one runs out of device memory, a warning that the check was skipped (the probe batch fitted, and so
    may the run's)."""
    alone = functools.cache(lambda sample: _student_rows(run, dataset, [sample], output))
    try:
        one, again = alone(0), _student_rows(run, dataset, [*rows[1:], rows[0]], output)
        if one is None or again is None:
            return
        if output:
            _check_output_samples_first(run, len(rows), batch[""].shape, one[""].shape)
        for key in batch:
            _check_rows_in_place(run, key, batch[key], one[key], again[key], lambda sample, key=key: (alone(sample) or {}).get(key))
    except DeviceMemoryError as e:
        teachers.skipped_check("the check of the student's rows (a student that returns its rows, or a train.features module's, in "
                               "another order than its inputs)", "student", e,
                               "nothing else checks it: make the student return row i for input i (one that sorts its batch puts its "
                               "output back: output[order.argsort()]), or train where its probes fit")


def _probe_batch(dataset: Any, rows: list[int]) -> dict[str, Any]:
    """A batch of dataset ``rows`` as training makes its batches (inputs, index, label), for setup's probes."""
    return data.collate(data.Indexed(dataset, None).__getitems__(rows))


def _student_rows(run: Run, dataset: Any, rows: list[int], output: bool) -> dict[str, torch.Tensor] | None:
    """For a batch of dataset ``rows`` through the student (no gradients, the RNG kept): its output (key "", where
    ``output``) and each ``train.features`` module's (key: its target path); None where the student refuses the batch
    (a ``DeviceMemoryError`` is raised: out of memory is no refusal)."""
    probe = _probe_batch(dataset, rows)
    run.hooked.clear()
    try:
        with torch.no_grad(), _rng_kept(run.device), \
                data.device_memory("the student's setup probe (select steps)", probe["inputs"], "lower train.batch_size"):
            out, padding = run.forward(probe["inputs"]), run.padding(probe)
            parts = {"": select_student(out, "student output", run.select, mask=padding)} if output else {}
            return parts | {path: student_feature(run.hooked, layout.layer_name(path), module, selector, padding)
                            for path, (module, _, selector) in run.features.items()}
    except (ComplexOutputError, DeviceMemoryError):
        raise
    except (ModelError, TargetError):
        return None
    finally:
        run.hooked.clear()


def _check_output_samples_first(run: Run, rows: int, batch: torch.Size, one: torch.Size) -> None:
    """Refuse a student output whose first axis is not the samples: the probe batch's (shape ``batch``) is not as long as
    the batch (``rows`` samples), or sample 0's alone (``one``) keeps a first axis longer than one."""
    if not batch or batch[0] != rows:
        raise samples_first_error(tuple(batch), rows, run.select, probe=True)
    if len(one) == len(batch) and one[0] != 1:
        raise samples_first_error(tuple(one), 1, run.select, probe=True)


def _check_rows_in_place(run: Run, key: str, batch: torch.Tensor, alone: torch.Tensor, again: torch.Tensor,
                         alone_of: Callable[[int], torch.Tensor | None]) -> None:
    """Refuse (``_reordered_student``) a student whose output (``key`` "") or ``train.features`` module (``key``: its target
    path) gives setup's probes (``batch``: samples 0 to N-1, ``alone``: sample 0, ``again``: samples 1 to N-1, then 0) in
    another order: sample 0 alone is the probe batch's row J where sample J alone (``alone_of(J)``) is not its own row
    either (a student on batch statistics whose output saturates gives sample 0 alone another sample's row, and keeps each
    row in place), or a row of the batch moved one place is another sample's row of the probe batch (the whole batch moved:
    a student that stably sorts by a key samples 0 and 1 share, their lengths, is seen there)."""
    if alone.shape[1:] == batch.shape[1:] and alone.numel():
        j = teachers.moved_row(alone[0], batch, 0, STUDENT_RTOL)
        other = None if j is None else alone_of(j)
        if other is not None and other.shape == alone.shape and teachers.moved_row(other[0], batch, j, STUDENT_RTOL) is not None:
            raise _reordered_student(run, key, f"for dataset sample 0 alone is its row {j} in a batch of {_probe_samples(len(batch))}, "
                                               "not its row 0")
    if again.shape != batch.shape or not batch.numel():
        return
    for i in range(len(batch)):
        own = (i + 1) % len(batch)  # again's row i is the probe batch's sample i + 1
        j = teachers.moved_row(again[i], batch, own, STUDENT_RTOL)
        if j is not None:
            raise _reordered_student(run, key, f"for a batch of {_probe_samples(len(batch), moved=True)} holds at row {i} (sample "
                                               f"{own}'s place) sample {j}'s row of a batch of {_probe_samples(len(batch))}")


def _probe_samples(count: int, moved: bool = False) -> str:
    """Setup's probe batch of ``count`` samples in words ("samples 0 to 7"), or (``moved``) with each moved one place
    ("samples 1 to 7, then 0")."""
    if moved:
        return "samples 1 and 0" if count == 2 else f"samples 1 to {count - 1}, then 0"
    return "samples 0 and 1" if count == 2 else f"samples 0 to {count - 1}"


STUDENT_RTOL = 1e-2  # a student's output for one sample, alone and in setup's probe batch (eval mode, float32): rounding apart


def _reordered_student(run: Run, key: str, seen: str) -> TargetError:
    """The student returns the rows of its output (``key`` "") or of a ``train.features`` module (``key``: its target path)
    in another order than its inputs (``seen``: how setup's probe shows it)."""
    if key == "":
        part = "" if run.select == "auto" else f" (student.select = {run.select!r})"
        return TargetError(f"the student's output{part} {seen}: the student returns the rows of its output in another order than its "
                           "inputs, so each sample's stored targets would be compared with another sample's output; make the model "
                           "student.factory builds return row i for input i (a model that sorts its batch, e.g. by length for packed "
                           "sequences, must put its output back in the input order: output[order.argsort()])")
    layer, module = layout.layer_name(key), run.features[key][0]
    return TargetError(f"train.features {layer!r}: student module {module!r}'s output {seen}: the module gets the student's batch in "
                       f"another order than its inputs (a student that sorts its batch, e.g. by length for packed sequences, and puts "
                       f"back only its output), so each sample's stored {layer!r} targets would be compared with another sample's "
                       "features; distill a module whose rows follow the inputs (one the student runs after it puts its rows back in "
                       "the input order: output[order.argsort()])")


class ComplexOutputError(TargetError):
    """A complex student output or feature: the losses would compare its real part only."""


def _real(tensor: torch.Tensor, what: str, setting: str) -> torch.Tensor:
    """Refuse a complex ``tensor`` (``what``: the student's output, or a student module's): the losses cast to float32,
    which drops the imaginary part with only torch's UserWarning, as extract refuses a complex teacher output."""
    if tensor.is_complex():
        raise ComplexOutputError(f"{what} is {str(tensor.dtype).removeprefix('torch.')} (shape {list(tensor.shape)}), but the losses "
                                 "compare real values and would drop its imaginary part; return torch.view_as_real(...) of it (or its "
                                 f"abs()) from the student, or pick a real part with {setting}")
    return tensor


def select_student(output: Any, what: str, selector: str = "auto",
                   real: tuple[str, str] = ("the student's output", "student.select"), mask: teachers.Padding | None = None) -> torch.Tensor:
    """The student's tensor in ``output`` (its logits: ``student.select``; default auto), with errors naming the fix that
    applies to the student; a complex one is refused (``_real``, with ``real``'s name of it and the setting to change).
    ``mask``: the batch's ``train.mask`` (``Run.padding``), which ``mean`` and ``last`` steps pool by, as extract's do."""
    label, setting = real
    if selector != "auto":
        return _real(teachers.select(output, selector, what, label=f"the {what}", setting="student.select", mask=mask,
                                     pooled_by="train.mask")[0], label, setting)
    try:
        return _real(teachers.select(output, "auto", what)[0], label, setting)
    except ComplexOutputError:
        raise
    except TargetError:
        raise TargetError(f"{what!r} of the student is a {type(output).__name__} kdcache cannot pick a tensor from (it takes a "
                          f"tensor, the first element of a tuple/list, or the first of {', '.join(teachers.AUTO_KEYS)} of a dict); "
                          "make the student return its logits (or the hooked module its features) that way, or set "
                          "student.select") from None


def student_feature(hooked: dict[str, Any], layer: str, module: str, selector: str, mask: teachers.Padding | None = None) -> torch.Tensor:
    """The part of student ``module``'s output (``train.features`` ``select``; default auto, pooled by ``mask`` as
    ``select_student``) distilled into teacher ``layer``."""
    output = teachers.hooked_output(hooked, module, "student")
    real = (f"train.features {layer!r}: student module {module!r}'s output", f"train.features.{layer!r}.select")
    if selector == "auto":
        return select_student(output, module, real=real)
    return _real(teachers.select(output, selector, module, label=f"train.features {layer!r}: student module {module!r}",
                                 setting=f"train.features.{layer!r}.select", mask=mask, pooled_by="train.mask")[0], *real)


def _check_labels(label: torch.Tensor, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ShapeMismatchError(f"train.loss.ce: the store holds one label per sample, but the student's output has shape {shape}, "
                                 "not (batch, classes); set train.loss.ce = 0 (train.loss.kl and mse distill per-token logits), "
                                 "or make the student output one row of class scores per sample")
    classes = shape[-1]
    high = int(label.max()) if len(label) else 0  # below 0: no label (losses.cross_entropy)
    if high >= classes:
        raise ShapeMismatchError(f"train.loss.ce: the store holds label {high} but the student's output has {classes} classes "
                                 f"(labels must be 0..{classes - 1}, or below 0 for none); make student.factory's model output as "
                                 "many classes as the dataset has, or set train.loss.ce = 0")


def _key(path: str) -> str:
    return path.replace(".", "%2E")  # ModuleDict keys cannot contain dots


def open_for_training(location: str, allow_partial: bool, storage_options: dict[str, Any] | None = None,
                      refuse: bool = True) -> layout.Store:
    """The store at ``location``, refused where it is incomplete without ``allow_partial`` or has no shard done
    (``refuse=False``: left to the caller, ``_incomplete``: under torchrun, rank 0's look decides for every rank)."""
    store = layout.open_store(location, storage_options=storage_options)
    refusal = _incomplete(location, store, allow_partial, storage_options) if refuse else None
    if refusal is not None:
        raise refusal
    return store


def _incomplete(location: str, store: layout.Store, allow_partial: bool, storage_options: dict[str, Any] | None) -> StoreError | None:
    """Why ``store`` is not one to train on (incomplete without ``allow_partial``, or no shard done), or None."""
    if not store.done_snapshot().all():  # read once for the run's setup (_shards), each marker an object
        done, total = store.samples_done(store.done_snapshot()), store.num_samples
        if not allow_partial:  # a store still being extracted is not an interrupted one (info and verify say so too)
            writer = locking.active_writer(location, storage_options)
            going_on = f"being written by {writer}: wait for it to end" if writer else "resume kdcache extract"
            return StoreError(f"{location!r} is incomplete ({done}/{total} samples); {going_on}, or pass "
                              f"{option('--allow-partial')} to train on completed shards only")
        if done == 0:
            return StoreError(f"{location!r} has no completed shard yet; nothing to train on")
    return None


def _check_objects(pipeline: Pipeline, store: layout.Store, shards: np.ndarray, checkpoint: dict[str, Any] | None,
                   evaluated: layout.Store | None, eval_options: dict[str, Any] | None, world: int) -> layout.Store | None:
    """Refuse, before the student is built and anything is written to OUT, a run whose store lacks an object of a shard
    marked done that the run reads (``_unbacked``), or whose ``train.eval_cache`` does (of the shards this rank
    evaluates); return ``train.eval_cache`` opened (in one process opened here: None where it does not open, which the
    evaluation says, as before). Under torchrun each rank looks at its own store (a copy per machine) and the ranks gather
    what they found: every rank raises the first refusal, named by its rank and host, so that none is left waiting."""
    t = pipeline.train
    if world == 1 and t.eval_cache:
        with contextlib.suppress(KdcacheError):
            evaluated = _open_eval_store(t.eval_cache, t.eval_split, eval_options, pipeline.where("train.eval_cache"))
    try:
        refusal = _unbacked(store, _shards_read(store, shards, t.subset, t.seed), _arrays_read(pipeline, store, checkpoint))
        logits = None if evaluated is None else next((tg for tg in evaluated.targets.values() if tg.path == layout.LOGITS), None)
        if refusal is None and logits is not None:  # without logits (or incomplete) it is refused by the evaluation's checks
            mine = distributed.my_part(evaluated.num_shards)  # the shards this rank evaluates, those done (whole: _eval_store)
            refusal = _unbacked(evaluated, mine[evaluated.done_snapshot()[mine]], [*evaluated.sample_paths(), *logits.arrays],
                                "train.eval_cache ", evaluated.manifest["dataset"]["split"])
    except KdcacheError as e:  # a listing refused or cut (UnreachableError): under torchrun carried as a refusal
        if world == 1:
            raise
        refusal = e
    if world > 1:
        found = distributed.gather(None if refusal is None else (type(refusal).__name__, str(refusal), socket.gethostname()))
        r, first = next(((r, f) for r, f in enumerate(found) if f is not None), (0, None))
        kind = getattr(errors, first[0], StoreError) if first is not None else StoreError
        refusal = None if first is None else kind(f"rank {r} (on {first[2]}): {first[1]}" if r else first[1])
    if refusal is not None:
        raise refusal
    return evaluated


def _shards_read(store: layout.Store, shards: np.ndarray, subset: int, seed: int) -> np.ndarray:
    """Of the run's ``shards``, those holding the rows it reads: a ``train.subset``'s (all of them where the subset is
    larger than the rows, which ``_rows`` refuses)."""
    if subset <= 0 or subset > len(cache.done_rows(store, shards)):
        return shards
    return np.unique(_rows(store, shards, subset, seed) // store.rows_per_shard)


def _arrays_read(pipeline: Pipeline, store: layout.Store, checkpoint: dict[str, Any] | None) -> list[str]:
    """The data arrays of ``store`` the run reads: the samples' (index, fingerprint, labels) and those of the stored targets
    its loss terms take (``loss_targets``, as ``setup`` takes them; a term the store lacks is ``setup``'s to refuse)."""
    stored = {tg.name: tg for tg in store.targets.values()}
    by_path = {tg.path: tg for tg in stored.values()}
    terms = loss_targets(pipeline, stored, keep_zero=bool(_zero_terms_kept(checkpoint, pipeline)))
    return [*store.sample_paths(), *(a for path in terms if path in by_path for a in by_path[path].arrays)]


def _unbacked(store: layout.Store, shards: np.ndarray, paths: list[str], what: str = "", split: str = "") -> StoreError | None:
    """Why the run cannot read ``store`` (``what``: how its message names it, ``split``: an eval store's, for the extract
    that redoes it): shards of ``shards``, marked done, lack a storage object of ``paths`` or their ``progress/digest`` row
    (an incomplete copy: ``aws s3 sync`` or ``rsync`` cut short, a copy of a store being extracted; objects deleted), found
    by listing the objects (``Store.missing_shard_objects``: a stat per object of a folder, one LIST per array on an
    object store, a zip's central directory), none read; else None. Not looked for over plain http, which lists nothing
    (it would be a request per object): there a read names such a shard where it reaches it (``Store._damaged``)."""
    if not len(shards) or storage.location_kind(store.location) == "http":
        return None
    lost: dict[int, tuple[str, str]] = {}
    for _, s, key, problem in store.missing_shard_objects(paths + ([layout.DIGEST] if store.has_digests() else []),
                                                          [int(s) for s in shards]):
        lost.setdefault(s, (key, problem))
    if not lost:
        return None
    where = store.location
    key, problem = lost[min(lost)]
    if storage.location_kind(where) == "zip" or "::" in where:
        fix = "copy the zip again, or pack the store again from a complete folder (kdcache pack FOLDER OUT)"
    else:
        again = f" --set data.split={shlex.quote(split)}" if split else ""
        fix = (f"copy the store again, or run kdcache extract PIPELINE --out {shlex.quote(where)}{again}, which resumes it and "
               "rewrites those shards")
    return DamagedStoreError(
        f"{what}{where!r} lacks objects of {count(len(lost), 'shard')} of the {len(shards):,} marked done that this run reads "
        f"(an incomplete copy, or objects deleted): shards {short(sorted(lost))}, object {key!r} {problem}; {fix}; kdcache verify "
        f"{where} lists every damaged object (nothing was written)")


def _dataset(pipeline: Pipeline, store: layout.Store, what: str) -> Any:
    """The pipeline's dataset of the split ``store`` was extracted from, refused where its length is not the store's
    (naming the factory the store records where it is another: a store of another pipeline's run)."""
    split, made_by = store.manifest["dataset"]["split"], store.manifest["dataset"].get("factory")
    dataset = data.load(pipeline, split)
    if len(dataset) != store.num_samples:
        other = f" (extracted from {made_by}({split!r}), another data.factory)" if made_by != pipeline.data.factory else ""
        raise StoreError(f"dataset {pipeline.data.factory}({split!r}) has {len(dataset)} samples but {what} has {store.num_samples}"
                         f"{other}; use the dataset the store was made from")
    return dataset


def _shards(out: Path, pipeline: Pipeline, store: layout.Store, checkpoint: dict[str, Any] | None,
            held: list[tuple[Any, ...]] | None = None) -> np.ndarray:
    """The completed shards this run trains on. A resumed run (``checkpoint``; its store and values checked
    first) keeps its own, though more may have completed since (``--allow-partial`` on a store being
    extracted); a new run takes those done now, as rank 0 sees them (under torchrun, every rank must draw
    from the same rows: ``held``, every rank's ``_held``, where each must hold them, done and with rank 0's digests)."""
    if checkpoint is not None:
        _check_resume(out, pipeline, store, checkpoint)
    done, location = (store.done_snapshot(), store.location) if held is None else (_unpacked(held[0], store), held[0][0])
    if checkpoint is not None and "shards" in checkpoint:
        shards = np.asarray(checkpoint["shards"], dtype=np.int64)
        lost = [int(s) for s in shards if s >= store.num_shards or not done[s]]
        if lost:  # being extracted again, or no longer marked done (a damaged shard's marker removed)
            raise StoreError(f"{option('--resume')}: this run trained on shards {short(lost)} of "
                             f"{location!r}, no longer completed there; complete the store again (kdcache extract with "
                             f"its pipeline and --out {location}), or start afresh with {option('--overwrite')}")
    elif held is None:
        return distributed.broadcast(np.flatnonzero(done))
    else:
        shards = np.flatnonzero(done)  # rank 0's, gathered by _check_same_run
    if held is not None:
        _check_ranks_hold(shards, held, store, resumed=checkpoint is not None and "shards" in checkpoint)
    return shards


def _part_trained(store: layout.Store, shards: np.ndarray, resumed: bool, subset: int) -> str:
    """The note of a run on part of its store (``--allow-partial``; a resumed run keeps its own shards): how many of
    the store's samples and shards it trains on (it said nothing: a run on 20 of 50 samples looked like one on all)."""
    mine = np.zeros(store.num_shards, dtype=bool)
    mine[shards] = True
    which = ", those done as the run began" if resumed else " done"
    chosen = f"; train.subset = {subset} takes {subset:,} rows of them" if 0 < subset < store.samples_done(mine) else ""
    return (f"note: training on {store.samples_done(mine):,} of {store.num_samples:,} samples ({len(shards)} of "
            f"{store.num_shards} shards{which}) of {store.location!r}{chosen}")


def _held(location: str, store: layout.Store, allow_partial: bool, storage_options: dict[str, Any] | None) -> tuple[Any, ...]:
    """What a torchrun rank's ``--cache`` store holds, as the ranks compare it (``_check_same_run``, ``_shards``): its
    location, its done markers (packed, a bit a shard), a 32-bit hash of each shard's digest row (FORMAT.md §7.1; None
    for a store without digests), why it is not one to train on (``_incomplete``: rank 0's decides for every rank) and
    its host. The markers and digests are those the rank's reads are checked against (read once, as its first read would)."""
    done = store.done_snapshot()
    refusal = _incomplete(location, store, allow_partial, storage_options)
    digests = store.digests_snapshot()
    rows = None if digests is None else np.array([zlib.crc32(row.tobytes()) for row in np.ascontiguousarray(digests, dtype="<u4")],
                                                 dtype=np.uint32)
    return (location, np.packbits(done), rows, None if refusal is None else str(refusal), socket.gethostname())


def _unpacked(held: tuple[Any, ...], store: layout.Store) -> np.ndarray:
    """A ``_held``'s done markers, a bool a shard."""
    return np.unpackbits(held[1], count=store.num_shards).astype(bool)


def _check_ranks_hold(shards: np.ndarray, held: list[tuple[Any, ...]], store: layout.Store, resumed: bool) -> None:
    """Refuse, on every rank, a run one of whose ranks reads its own copy of the store (its machine's disk) lacking some of
    the ``shards`` the run trains on (rank 0's done ones, or a resumed run's own): a copy made while extract still ran, or
    cut short, whose rows then failed that rank's check of them (rows of a shard not done: pass rows of done shards only),
    as its store's own lack when incomplete without ``--allow-partial``, rank 0 stopping as another rank ended first; or
    holding other rows in one of them than rank 0's (their digests differ: re-extracted or rewritten since the copy),
    which trained on. A rank whose store holds more done shards than rank 0's trains on rank 0's. (A copy lacking objects
    of a shard marked done is refused next, each rank listing its own copy's: ``_check_objects``.)"""
    ours = f"the {count(len(shards), 'shard')} the run trains on"
    whose = "its checkpoint's" if resumed else f"rank 0's done ones, on {held[0][4]}"
    for r, (location, _, rows, _, host) in enumerate(held[1:], 1):
        done = _unpacked(held[r], store)
        lacks = [int(s) for s in shards if not done[s]]
        if lacks:
            what = (f"rank {r} (on {host}) lacks shards {short(lacks)} of {ours} ({whose}): {location!r} has "
                    f"{int(done.sum())}/{store.num_shards} shards done there (a copy made while kdcache extract still wrote the "
                    "store, or cut short)")
        elif rows is not None and held[0][2] is not None and (other := [int(s) for s in shards if rows[s] != held[0][2][s]]):
            what = (f"rank {r} (on {host}) holds other rows than rank 0 (on {held[0][4]}) in shards {short(other)} of {ours}: "
                    f"their digests (FORMAT.md §7.1) differ in {location!r} (a shard extracted again, or rewritten, in one copy since)")
        else:
            continue
        raise StoreError(f"the torchrun ranks' stores do not hold the same shards: {what}; copy rank 0's store again where "
                         f"rank {r} reads it, or give every rank the same copy (docs/CLUSTER.md), then rerun (nothing was changed)")


def _rows(store: layout.Store, shards: np.ndarray, subset: int, seed: int) -> np.ndarray:
    rows = cache.done_rows(store, shards)
    if subset <= 0:
        return rows
    if subset > len(rows):
        raise PipelineError(f"train.subset = {subset} exceeds the {len(rows)} rows available; lower it or use 0 for all rows")
    return np.sort(np.random.default_rng(seed).permutation(rows)[:subset])


def _optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
               decay_all: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW. Weight decay applies to matrices and kernels only (ndim >= 2); biases, norm scales and
    other vectors or scalars are not pulled toward 0 (timm's and nanoGPT's rule), unless `decay_all` (runs of <= 0.1.8)."""
    decayed = params if decay_all else [p for p in params if p.ndim >= 2]
    kept = [] if decay_all else [p for p in params if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr)


def _decays_all(checkpoint: dict[str, Any] | None, params: list[torch.nn.Parameter], rank: int) -> bool:
    """Whether a resumed run was started by kdcache <= 0.1.8, which decayed every parameter (one group): it keeps doing so,
    so that its optimizer state still fits and the run ends as it would have."""
    if checkpoint is None or len(checkpoint["optimizer"]["param_groups"]) != 1 or all(p.ndim >= 2 for p in params) \
            or all(p.ndim < 2 for p in params):
        return False
    if rank == 0:
        print("note: this run was started by kdcache <= 0.1.8, which applies train.weight_decay to biases and norm weights "
              "too; the resumed run keeps doing so (a new run decays matrices and kernels only)", file=sys.stderr)
    return True


def _schedule(name: str, total_steps: int) -> Any:
    if name == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def _open_eval_store(location: str, split: str, storage_options: dict[str, Any] | None, where: str) -> layout.Store:
    """``train.eval_cache``, opened. Where nothing is at a local path, the error names the setting and the split to extract:
    open_store's own fix, "run kdcache extract PIPELINE --out X first", read as the training store's (--cache), and that
    extract wrote the training split, which the eval store is then refused for. ``where``: what gave the value
    (``Pipeline.where``): the flag ``--eval-cache X`` is named first (``_eval_cache_named``)."""
    named, drop = _eval_cache_named(where)
    try:
        storage.location_arg(location, "train.eval_cache")  # a "~/eval.zarr" in the pipeline file: no shell expanded it
    except StoreError as e:
        raise StoreError(f"{named}: {e}") from None
    if storage.location_kind(location) == "local" and not Path(storage.local_path(location)).exists():
        near = layout.store_named_alike(Path(storage.local_path(location)))
        typo = "" if near is None else f"did you mean {near!r}, a store beside it? If not, "
        raise StoreError(f"{named}: no store at {location!r}; {typo}extract the eval split there first (kdcache extract PIPELINE "
                         f"--out {shlex.quote(location)} --set data.split={split or 'SPLIT'}), or {drop}")
    return layout.open_store(location, storage_options=storage_options)


def _eval_cache_named(where: str) -> tuple[str, str]:
    """How an error about the eval store names train.eval_cache, given by ``where`` (``Pipeline.where``), and how to go
    without it: given by the flag, ``--eval-cache X: train.eval_cache`` and "leave --eval-cache out" (the README's rule:
    an error names the flag that gave the value; it said "drop train.eval_cache", a setting the user never wrote)."""
    if where.startswith("--eval-cache "):
        return f"{where}: train.eval_cache", "leave --eval-cache out"
    return "train.eval_cache", "drop train.eval_cache"


def _evaluator(pipeline: Pipeline, run: Run, device: torch.device, storage_options: dict[str, Any] | None = None,
               trained: dict[str, Any] | None = None, opened: layout.Store | None = None) -> Any:
    """A function returning eval metrics: accuracy on the eval split, and teacher agreement with an eval store
    (``trained``: the manifest of the store the student trains from; an eval store must have its teacher, and hold
    another split unless ``train.eval_split`` names that one; ``opened``: that store, where it was opened already)."""
    t = pipeline.train
    if not t.eval_split and not t.eval_cache:
        return dict
    if t.eval_cache:
        dataset, source, stored = _eval_cache_source(pipeline, storage_options, trained, opened)
    else:
        dataset, source = _eval_split_source(pipeline, trained)
    _check_per_sample(run, dataset, device, f"train.eval_cache = {t.eval_cache!r}" if t.eval_cache else f"train.eval_split = {t.eval_split!r}",
                      agreement=stored.output_shape if t.eval_cache else None)

    evaluations = itertools.count()

    def evaluate() -> dict[str, float]:
        if isinstance(source, cache.TransferSet):
            source.set_epoch(next(evaluations))  # the first evaluation checks fingerprint_check, later ones the recheck
        correct, agree, teacher_correct, n, labelled = _eval_counts(run, device, source, stored.classes if t.eval_cache else 0)
        out = {"eval_accuracy": correct / labelled} if labelled else {}  # no labels: no accuracies (never a 0 that reads as one)
        if t.eval_cache and n:
            out |= {"eval_agreement": agree / n, **({"eval_teacher_accuracy": teacher_correct / labelled} if labelled else {})}
        return out

    return evaluate


def _eval_cache_source(pipeline: Pipeline, storage_options: dict[str, Any] | None, trained: dict[str, Any] | None,
                       opened: layout.Store | None = None) -> tuple[Any, cache.TransferSet | None, layout.Target]:
    """``train.eval_cache``'s dataset, the batches of this rank's whole shards of it (None: no shard left to this rank) and
    its stored logits, once the store is found fit to measure the student against the teacher it distils."""
    t = pipeline.train
    store, stored = _eval_store(t.eval_cache, t.eval_split, storage_options, trained, opened, pipeline.where("train.eval_cache"))
    split = store.manifest["dataset"]["split"]
    if _check_eval_split(t.eval_cache, t.eval_split, store.manifest, trained):
        _say_evaluated_on_training_data(f"train.eval_cache {t.eval_cache!r}", split)
    drop = _eval_cache_named(pipeline.where("train.eval_cache"))[1]
    _check_eval_logits(t.eval_cache, stored, trained, drop)
    dataset = _dataset(pipeline, store, "train.eval_cache")
    if trained is not None and split != trained["dataset"]["split"] and _training_samples(dataset, trained):
        raise PipelineError(f"train.eval_cache {t.eval_cache!r} (split {split!r}) holds the samples the student trains on: its "
                            f"{len(dataset)} samples begin and end as split {trained['dataset']['split']!r} of the store trained from "
                            "does (data.factory gives one split whatever the split asked?); make data.factory return the split it "
                            f"is asked for and extract the eval split again, or {drop}")
    shards = distributed.my_part(store.num_shards)  # torchrun: each rank evaluates its whole shards, the counts are summed
    source = None if not len(shards) else cache.TransferSet(  # the store checked above, found still at its location
        store, dataset, [layout.LOGITS], batch_size=max(t.batch_size, 512), shuffle=False, rows=cache.done_rows(store, shards),
        memory_budget_mb=t.memory_budget_mb, buffer_shards=t.shuffle_buffer_shards, fingerprint_check=t.fingerprint_check,
        fingerprint_recheck=t.fingerprint_recheck)
    if source is not None:
        source.check_memory(0, f"train.eval_cache {t.eval_cache!r}", "the main process")  # between epochs, in this process
    return dataset, source, stored


def _eval_store(location: str, split: str, storage_options: dict[str, Any] | None,
                trained: dict[str, Any] | None, opened: layout.Store | None, where: str) -> tuple[layout.Store, layout.Target]:
    """``train.eval_cache`` (``location``; ``split``: train.eval_split; ``where``: what gave it) opened (``opened``, where
    it was already), and its stored logits: it must be complete, store logits, and have been made by the teacher of the
    store trained from (``trained``: its manifest)."""
    store = opened or _open_eval_store(location, split, storage_options, where)
    drop = _eval_cache_named(where)[1]
    if not store.done_snapshot().all():  # allow_partial is the training store's: an eval store's metrics are the whole split's
        raise StoreError(f"train.eval_cache {location!r} is incomplete ({store.samples_done(store.done_snapshot())}/{store.num_samples} samples): its "
                         f"metrics would leave out the rest; resume its kdcache extract ({option('--allow-partial')} applies to the "
                         f"training store alone), or {drop}")
    stored = next((tg for tg in store.targets.values() if tg.path == layout.LOGITS), None)
    if stored is None:
        raise PipelineError(f"train.eval_cache {location!r} stores no logits to compare with; extract it with targets.logits = true")
    theirs, teacher = store.manifest["teacher"]["weights_sha256"], (trained or store.manifest)["teacher"]
    if theirs != teacher["weights_sha256"]:  # agreement with another teacher than the one distilled
        raise PipelineError(f"train.eval_cache {location!r} was made by another teacher ({store.manifest['teacher']['factory']}, "
                            f"weights sha256 {theirs[:12]}...) than the store trained from ({teacher['factory']}, weights sha256 "
                            f"{teacher['weights_sha256'][:12]}...): eval_agreement would compare the student with another teacher; "
                            f"extract the eval split with the same teacher (--set data.split=...), or {drop}")
    return store, stored


def _check_eval_split(location: str, eval_split: str, manifest: dict[str, Any], trained: dict[str, Any] | None) -> bool:
    """Refuse an eval store (``location``, ``manifest``) of another split than train.eval_split names, or, where that names
    none, one holding the samples of the store trained from (``trained``: its manifest): the same factory, split and length,
    and probe fingerprints where both use one algorithm. Returns whether it holds them (train.eval_split names their split:
    measured on purpose)."""
    split = manifest["dataset"]["split"]
    if eval_split and eval_split != split:
        raise PipelineError(f"train.eval_split = {eval_split!r} but train.eval_cache holds split {split!r}; make them agree or drop eval_split")
    same = ("factory", "split", "length", "probe_fingerprints")
    if trained is not None and layout.fingerprint_algorithm(manifest) != layout.fingerprint_algorithm(trained):
        same = same[:-1]  # fingerprints of two algorithms cannot be compared: the same factory, split and length are the same data
    held = trained is not None and all(manifest["dataset"][k] == trained["dataset"][k] for k in same)
    if held and not eval_split:
        raise PipelineError(f"train.eval_cache {location!r} holds the samples the student trains on (split {split!r} of "
                            f"{trained['dataset']['factory']}): its eval metrics would be measured on training data; extract the eval "
                            f"split into its own store (--set data.split=...), or set train.eval_split = {split!r} to measure it on purpose")
    return held


def _say_evaluated_on_training_data(what: str, split: str) -> None:
    """One ``warning:`` line on stderr (by torchrun's rank 0) where the evaluation (``what``) measures the split the student
    trains on: allowed (train.eval_split names it on purpose), but its eval metrics are then no held-out measure."""
    if distributed.ranks()[0] == 0:
        print(f"warning: {what} evaluates the student on split {split!r}, the split it trains on: its eval metrics measure "
              "training data, not held-out data; extract another split to evaluate on (train.eval_split, train.eval_cache)",
              file=sys.stderr)


def _check_eval_logits(location: str, stored: layout.Target, trained: dict[str, Any] | None, drop: str) -> None:
    """Refuse an eval store (``location``) whose logits (``stored``) are another part of the teacher's output (another
    select) than the store trained from holds (``trained``: its manifest; a run of features and labels alone has none);
    ``drop``: how to go without it (``_eval_cache_named``)."""
    ours = next((tg for tg in map(layout.Target.from_dict, (trained or {"targets": {}})["targets"].values())
                 if tg.path == layout.LOGITS), None)  # None: a run of features and labels alone
    if ours is not None and (ours.output_shape, ours.select) != (stored.output_shape, stored.select):  # another part of the teacher's output
        raise PipelineError(f"train.eval_cache {location!r} stores the teacher's logits as select {stored.select!r}, per-sample shape "
                            f"{list(stored.output_shape)}, but the store trained from as select {ours.select!r}, shape {list(ours.output_shape)}: "
                            "eval_agreement would compare the student with another part of the teacher's output; extract the eval "
                            f"split with the training store's targets.select (logits = {ours.select!r}), or {drop}")


def _eval_split_source(pipeline: Pipeline, trained: dict[str, Any] | None) -> tuple[Any, DataLoader | None]:
    """``train.eval_split``'s dataset (no store: labels alone) and the batches of this rank's part of it (None: no part left
    to this rank); refused where it gives the samples of the store trained from (``trained``: its manifest)."""
    t = pipeline.train
    try:
        dataset = data.load(pipeline, t.eval_split)
    except PipelineError as e:  # named as what asked for the split: pipelines copied from mnist.toml ask for "test"
        raise PipelineError(f"train.eval_split = {t.eval_split!r}: {e}; or set train.eval_split = \"\" (no evaluation)") from None
    if trained is not None and t.eval_split != (ours := trained["dataset"]["split"]) and _training_samples(dataset, trained):
        raise PipelineError(f"train.eval_split = {t.eval_split!r} gives the samples the student trains on: its {len(dataset)} items "
                            f"begin and end as split {ours!r} of the store trained from does (data.factory gives one split whatever "
                            "the split asked?); make data.factory return the split it is asked for, or set train.eval_split = "
                            f"{ours!r} to measure training data on purpose")
    if trained is not None and t.eval_split == trained["dataset"]["split"]:
        _say_evaluated_on_training_data(f"train.eval_split = {t.eval_split!r}", t.eval_split)
    # a generator of its own: each iterator draws a seed, which from torch's global RNG would move the dropout that
    # follows (a run resumed with another train.eval_every would train other weights)
    part = distributed.my_part(len(dataset))  # torchrun: each rank evaluates its part, the counts are summed
    source = DataLoader(torch.utils.data.Subset(data.Indexed(dataset, None), part.tolist()), batch_size=max(t.batch_size, 512),
                        collate_fn=data.collate, generator=torch.Generator()) if len(part) else None
    return dataset, source


def _eval_counts(run: Run, device: torch.device, source: Any, classes: int = 0) -> list[float]:
    """The student (rank 0's, under torchrun) scored on ``source``'s batches (None: none), summed over ranks: ``[correct,
    agree, teacher_correct, n, labelled]``, each top-1 tie of k classes counting 1/k (``classes``: an eval store of top-k
    logits, their class count: the teacher's top class is a stored class of the largest stored value)."""
    if run.world > 1:  # torchrun: every rank scores rank 0's student (its BatchNorm statistics), the one saved
        distributed.broadcast_buffers([run.student])
    run.student.eval()
    correct = agree = teacher_correct = n = labelled = 0
    with torch.no_grad(), data.autocast(device, run.precision), _rng_kept(device):
        batches = iter(source if source is not None else ())  # None: a rank with no part (more ranks than shards)
        try:
            for batch in batches:
                logits = select_student(run.forward(batch["inputs"]), "student output", run.select, mask=run.padding(batch))
                # a tie at the top (float16 logits tie often) counts 1/k, not argmax's lowest class (losses.top1_matches)
                label = None if batch["label"] is None else torch.as_tensor(batch["label"])
                if label is not None:  # below 0: no label (losses.cross_entropy), which top1_correct counts 0
                    correct, labelled = correct + float(losses.top1_correct(logits, label).sum()), labelled + int((label >= 0).sum())
                if "targets" in batch:
                    agree += float(_agreement(logits, batch["targets"], classes).sum())
                    teacher_correct += float(_teacher_correct(batch["targets"], classes, label).sum()) if label is not None else 0
                n += len(logits)
        except (KeyboardInterrupt, _WaitStopped):  # a stopped run: an eval store's batches in the making not waited for long
            data.stop_making(batches, data.STOPPED_WAIT)  # (their read may hang), nor made on
            raise
    counts = torch.tensor([correct, agree, teacher_correct, n, labelled], dtype=torch.float64)  # sums of 1/k; n exact below 2**53
    return distributed.sum_over_ranks(counts, waits=True).tolist()


def _agreement(logits: torch.Tensor, targets: Mapping[str, torch.Tensor], classes: int) -> torch.Tensor:
    """``losses.top1_matches`` of the student's ``logits`` with a batch's stored logits (``targets``; ``classes``: of a
    top-k store, the teacher's class count), top-k ones compared as stored (``losses.topk_top1_matches``)."""
    if not classes:
        return losses.top1_matches(logits, targets[layout.LOGITS])
    return losses.topk_top1_matches(logits, targets[layout.LOGITS], targets[layout.LOGITS_INDICES], classes)


def _teacher_correct(targets: Mapping[str, torch.Tensor], classes: int, label: torch.Tensor) -> torch.Tensor:
    """``losses.top1_correct`` of a batch's stored logits (top-k ones: ``losses.topk_top1_correct``), as ``_agreement``."""
    if not classes:
        return losses.top1_correct(targets[layout.LOGITS], label)
    return losses.topk_top1_correct(targets[layout.LOGITS], targets[layout.LOGITS_INDICES], label)


def _training_samples(dataset: Any, trained: dict[str, Any]) -> bool:
    """Whether ``dataset`` is the store trained from's (``trained``: its manifest) under another split's name: as long, and
    its items at the manifest's probe rows (the first and last) fingerprinted alike."""
    d, algorithm = trained["dataset"], data.known_algorithm(trained)
    if algorithm is None or len(dataset) != d["length"]:
        return False
    try:
        return all(data.item_fingerprint(dataset, int(i), algorithm) == int(fp, 16) for i, fp in d["probe_fingerprints"].items())
    except KdcacheError:  # items the training store's fingerprints cannot be of
        return False


def _rng_kept(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """torch's global RNG (and ``device``'s) as it was, after the block: what evaluation draws (a student that samples
    in eval mode, Monte Carlo dropout; its dataset) must not move what training draws next (dropout), or the weights
    would depend on train.eval_every, which may change on --resume."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


def _check_per_sample(run: Run, dataset: Any, device: torch.device, what: str, agreement: tuple[int, ...] | None = None) -> None:
    """Accuracy compares each sample's label with the student's top class, and agreement (``agreement``: an eval store's
    per-sample logits shape) the teacher's top class with it: refuse a student whose output is not (batch, classes), such
    as per-token logits or a regression's one value per sample, or not of the eval store's classes, now rather than at
    the end of the first epoch."""
    probe = _probe_batch(dataset, [0])
    if probe["label"] is None and agreement is None:
        return
    run.student.eval()
    try:
        with torch.no_grad():
            logits = select_student(run.forward(probe["inputs"]), "student output", run.select,
                                    mask=run.padding(probe))
    except (ModelError, TargetError):
        return  # the first training step says what is wrong with the model or its output, on a batch of its own
    if logits.ndim < 2 and run.select != "auto":  # the select stepped into the classes: the fix is student.select's
        raise PipelineError(f"{what}: eval_accuracy and eval_agreement compare one class per sample with the student's top class, but "
                            f"student.select = {run.select!r} picks a part of the student's output of shape {list(logits.shape)} "
                            "for a batch of one sample, one value per sample, not (batch, classes); set student.select to the part "
                            "holding the classes (\"auto\": the whole output, where the student returns its logits alone)")
    if logits.ndim != 2:
        raise PipelineError(f"{what}: eval_accuracy and eval_agreement compare one class per sample with the student's top class, but the student's "
                            f"output has shape {list(logits.shape)} for one sample, not (batch, classes); set train.eval_split and "
                            "train.eval_cache to \"\" (no evaluation), or evaluate the student outside kdcache")
    if agreement is not None and tuple(logits.shape[1:]) != tuple(agreement):
        raise PipelineError(f"{what}: eval_agreement compares the student's top class with the teacher's, but the eval store's logits "
                            f"have per-sample shape {list(agreement)} and the student's output {list(logits.shape[1:])}; extract the "
                            "eval split with the targets.select of the student's classes, or drop train.eval_cache")


MIN_TEMPERATURE = 0.01


def check_values(pipeline: Pipeline) -> None:
    """Refuse values the pipeline loader accepts (numbers >= 0) but training cannot use, before anything is written."""
    t = pipeline.train
    if t.batch_size < 1:
        raise PipelineError(f"{pipeline.where('train.batch_size')}: train.batch_size must be >= 1, got {t.batch_size}")
    if t.shuffle_buffer_shards < 1:
        raise PipelineError(f"{pipeline.where('train.shuffle_buffer_shards')}: train.shuffle_buffer_shards must be >= 1 (shards read per shuffle buffer), "
                            f"got {t.shuffle_buffer_shards}; use e.g. 4 (the default), or 1 to hold the fewest shards")
    if t.streams < 1:
        raise PipelineError(f"{pipeline.where('train.streams')}: train.streams must be >= 1, got {t.streams}; use 1 (the default), or K "
                            "to reproduce a K-rank torchrun run in one process")
    if t.epochs < 1 and t.steps < 1:
        where = pipeline.where("train.epochs")  # --epochs sets train.steps = 0 too: steps are no way out of it
        raise PipelineError(f"{where}: train.epochs must be >= 1{'' if where.startswith('--epochs') else ' (or train.steps > 0)'}, got {t.epochs}")
    if t.epochs > MAX_EPOCHS and t.steps < 1:  # train.steps > 0 overrides the epochs: then they are not counted
        raise PipelineError(f"{pipeline.where('train.epochs')}: train.epochs = {t.epochs} is above its limit of {MAX_EPOCHS:,}; "
                            "train.steps counts a longer run in optimizer steps, without that limit")
    if (t.loss.kl or t.loss.mse and t.loss.mse_on == "probabilities") and not t.loss.temperature >= MIN_TEMPERATURE:
        raise PipelineError(f"{pipeline.where('train.loss.temperature')}: train.loss.temperature must be at least {MIN_TEMPERATURE:g} (logits / T overflows below), "
                            f"got {t.loss.temperature:g}; use e.g. 1.0 (plain KL) or 2.0-4.0 (softer targets)")
    if not t.lr > 0:
        raise PipelineError(f"{pipeline.where('train.lr')}: train.lr must be > 0, got {t.lr:g}; use e.g. 1e-3 (adamw) or 0.05 (sgd)")
    if not 0 < t.rank_timeout_s <= MAX_RANK_TIMEOUT_S:  # torch.distributed counts a wait's end in nanoseconds from now:
        # beyond ~9.2e9 s it wraps (gloo: every step's all-reduce timed out at once), then is refused (a traceback)
        raise PipelineError(f"{pipeline.where('train.rank_timeout_s')}: train.rank_timeout_s must be > 0 and at most {MAX_RANK_TIMEOUT_S:g} (seconds; torch.distributed's "
                            f"clock overflows beyond), got {t.rank_timeout_s:g}; use e.g. 1800 (the default: a rank waits 30 minutes "
                            "for a hung or lost one in a training step)")


MAX_EPOCHS = 1_000_000  # train counts every epoch's batches before its first step (10**12 epochs: a run that never began)
MAX_RANK_TIMEOUT_S = 1e9  # about 31 years: the longest train.rank_timeout_s (check_values)


@contextlib.contextmanager
def _owned_out(out: Path, resume: bool, overwrite: bool, rank: int, pipeline: Pipeline) -> Iterator[None]:
    """Rank 0 holds OUT's writer lock from its first look at OUT (``_checked_out``) to the run's end, its store, dataset
    and student loaded under it too (a second run into the same OUT is refused as still going, as a second writer of a
    store is), and checks OUT again under it (another run may have written it meanwhile)."""
    if rank != 0:
        yield
        return
    with locking.writer_lock(out, verb="train"):
        _check_out(out, resume, overwrite, pipeline)
        yield


def _check_same_run(out: Path, checkpoint: dict[str, Any] | None, unread: StoreError | None, given: dict[str, bool],
                    pipeline: Pipeline, store: layout.Store, eval_options: dict[str, Any] | None,
                    held: tuple[Any, ...]) -> tuple[layout.Store | None, list[tuple[Any, ...]]]:
    """Under torchrun, once every rank has joined and opened its store, in one gather: refuse a run whose ranks were not
    given the same run as rank 0, or see another OUT. Each rank parses its own command line and pipeline file and opens
    its own ``--cache``: a ``--set train.seed`` on one launcher, a pipeline file edited on one machine or an older store
    at the same path there trained on without a word, the streams no longer disjoint, the gradients mis-scaled or rows
    paired with another teacher's targets. Compared (``_what_rank_trains``): the flags, the values training reads, and
    the identity of ``--cache``'s store and of ``train.eval_cache``'s (opened here, and returned for the run's evaluation:
    None where there is none, or it does not open, which the evaluation then says); then what each sees in OUT
    (``_out_view``): each rank decides ``--auto-resume`` and reads the checkpoint for itself, and rank 0 would resume while
    another started from step 0, or the ranks load different checkpoints. Each refusal is one line naming the first rank
    that differs, and what differs; nothing is written before it. Gathered with them: what each rank's store holds
    (``held``: ``_held``), returned for ``_shards`` to check against the run's shards, and rank 0's refusal of its store
    (incomplete without ``--allow-partial``), raised here by every rank (another rank's own copy lacking shards is named there)."""
    evaluated, failed = None, ""
    if pipeline.train.eval_cache:
        try:
            evaluated = _open_eval_store(pipeline.train.eval_cache, pipeline.train.eval_split, eval_options,
                                         pipeline.where("train.eval_cache"))
        except KdcacheError as e:  # said by the evaluation, as in one process; here the ranks compare that it does not open
            failed = one_line(e, 160)
    trains = _what_rank_trains(given, pipeline, store, evaluated, failed)
    views = distributed.gather((trains, _out_view(out, checkpoint, unread), socket.gethostname(), held))
    for r, (theirs, _, host, _) in enumerate(views):
        differs = _first_difference(views[0][0], theirs)
        if differs is not None:
            key, mine, other = differs
            flag = "." not in key and not key.startswith("the ")  # --resume given on rank 1 (…), not given on rank 0 (…)
            what = f"{key}{' ' if flag else ' = '}{other} on rank {r} (on {host}), {mine} on rank 0 (on {views[0][2]})"
            raise (StoreError if key.startswith("the ") else PipelineError)(
                f"the torchrun ranks were not given the same run: {what}; give every rank the same command, "
                "pipeline file and store (a copy of one store, where each machine reads its own: docs/CLUSTER.md), then rerun "
                "(nothing was changed)")
    if views[0][3][3] is not None:  # rank 0's store is incomplete without --allow-partial, or has no shard done
        raise StoreError(views[0][3][3])
    other = next((r for r, (_, v, _, _) in enumerate(views) if v != views[0][1]), None)
    if other is None:
        return evaluated, [v[3] for v in views]

    def sees(v: tuple[Any, ...]) -> str:
        if v[0] == "loaded":
            return f"{CHECKPOINT} saved {_position({'epoch': v[1], 'batch': v[2]})} (step {v[3]})"
        if v[0] == "unread":
            return f"a {CHECKPOINT} it cannot read ({v[1]})"
        return f"{CHECKPOINT}" if v[1] else f"no {CHECKPOINT}" + (" but student.pt" if v[2] else "")

    raise StoreError(f"rank {other} (on {views[other][2]}) sees another {option('--out')} than rank 0 (on {views[0][2]}): "
                     f"{sees(views[other][1])} in {str(out)!r}, where rank 0 sees {sees(views[0][1])}; every rank must see the same "
                     f"{option('--out')}, a folder on a filesystem they share (docs/CLUSTER.md): fix that, then rerun (nothing was changed)")


def _out_view(out: Path, checkpoint: dict[str, Any] | None, unread: StoreError | None) -> tuple[Any, ...]:
    """What a rank sees in OUT, as ``_check_same_run`` compares it: the checkpoint it loaded (its epoch, batch, step and
    training time), else why it could not read one, else whether it sees a ``checkpoint.pt``, and a finished run's
    ``student.pt``."""
    if checkpoint is not None:
        return ("loaded", int(checkpoint["epoch"]), int(checkpoint.get("batch", 0)), int(checkpoint["step"]), checkpoint.get("seconds"))
    if unread is not None:
        return ("unread", getattr(unread, "detail", str(unread)[:160]))
    return ("files", _checkpoint_file(out).is_file(), (out / "student.pt").is_file())


# Values each torchrun rank may have its own of: its machine's CPUs (the batches' order under torchrun does not depend on
# DataLoader workers: _order), and train.eval_cache's path (another mount of one store: its identity is compared instead)
PER_RANK = {"train.num_workers", "train.threads", "train.eval_cache"}


def _what_rank_trains(given: dict[str, bool], pipeline: Pipeline, store: layout.Store, evaluated: layout.Store | None,
                      failed: str) -> dict[str, Any]:
    """What a rank trains, as ``_check_same_run`` compares the ranks': the flags it was given (``--progress`` aside), the
    pipeline values training reads (``data``, ``student`` and ``train``, but ``PER_RANK``: the teacher and targets are the
    store's own, ``extract`` is not read), canonical (a feature's omitted weight is its default, ``student.inputs`` in any
    order), and the identity of the store it trains from and of ``train.eval_cache``'s (``failed``: why that does not
    open; None: none). Compact: the stores by their manifests' leaves two levels deep, a long one by its digest."""
    values = pipeline.to_dict()
    trains: dict[str, Any] = {option(flag, "resume=\"auto\"" if flag == "--auto-resume" else None): on for flag, on in given.items()}
    for section in ("data", "student", "train"):
        for key, value in _flat(_feature_defaults(values[section], section), section).items():
            if key not in PER_RANK:
                trains[key] = _canonical(key, value)
    trains[f"the {option('--cache')} store"] = _identity_leaves(store.manifest)
    eval_store = None if evaluated is None else _identity_leaves(evaluated.manifest)
    trains["the train.eval_cache store"] = eval_store or (f"one that does not open ({failed})" if failed else None)
    return trains


def _identity_leaves(manifest: dict[str, Any]) -> dict[str, Any]:
    """A store's identity (``layout.identity``: its manifest but ``completed``) as dotted leaves two levels deep
    (``teacher.weights_sha256``), a value longer than 80 characters of JSON as its first 40 and its sha256."""
    leaves = {}
    for key, value in layout.identity(manifest).items():
        for leaf, v in (((f"{key}.{k}", v) for k, v in value.items()) if isinstance(value, dict) and value else ((key, value),)):
            text = json.dumps(v, sort_keys=True, default=str)
            leaves[leaf] = v if len(text) <= 80 else f"{text[:40]}... (sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]})"
    return leaves


def _first_difference(mine: dict[str, Any], theirs: dict[str, Any]) -> tuple[str, str, str] | None:
    """The first key where another rank's ``_what_rank_trains`` (``theirs``) differs from rank 0's (``mine``), down to a
    store's leaf, with rank 0's value and the other's in words; None where none does."""
    for key in [*mine, *(k for k in theirs if k not in mine)]:
        parts = key.split(".")  # where one rank has a table's leaves and another the table (train.features = {}): the table
        key = next((p for p in (".".join(parts[:n]) for n in range(1, len(parts))) if p in mine or p in theirs), key)
        a, b = _under(mine, key), _under(theirs, key)
        if a == b:
            continue
        if key.startswith("the ") and isinstance(a, dict) and isinstance(b, dict):  # a store: its first leaf that differs
            leaf = next(k for k in [*a, *(k for k in b if k not in a)] if a.get(k, _NONE) != b.get(k, _NONE))
            key, a, b = f"{key}'s {leaf}", a.get(leaf, _NONE), b.get(leaf, _NONE)
        return key, _said(key, a), _said(key, b)
    return None


_NONE = object()  # a key one rank's _what_rank_trains has and another's lacks


def _under(trains: dict[str, Any], key: str) -> Any:
    """``trains[key]``; where it has none, its values under ``key`` (``train.features = {}`` on one rank, another's
    ``train.features.conv.weight``) as one value, or ``_NONE``."""
    if key in trains:
        return trains[key]
    below = {k[len(key) + 1:]: v for k, v in trains.items() if k.startswith(key + ".")}
    return below if below else _NONE


def _said(key: str, value: Any) -> str:
    """A value of ``_what_rank_trains``'s ``key`` in words: a flag given or not, a store by when it was created."""
    if isinstance(value, bool) and "." not in key and not key.startswith("the "):  # a flag
        return "given" if value else "not given"
    if isinstance(value, dict) and key.startswith("the "):
        return f"one created {value.get('created')}"
    if value is _NONE or value is None:
        return "none"
    return value if isinstance(value, str) and value.startswith("one that") else _brief(value)


def local_folder(out: str, command: str) -> Path:
    """``out`` as the local folder kdcache ``command`` writes; a URL is refused (Path merged ``s3://b/run``'s slashes into
    ``s3:/b/run``: train refused it as a URL that lost a slash, its fix the very URL given, and demo wrote a folder ``s3:``),
    and so is a broken symlink, or a path under one (``storage.refuse_broken_link``)."""
    chained = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)::", out)  # a chain kdcache reads (zip::…, simplecache::…); a folder
    if "://" in out or (chained and chained.group(1).lower() in _CHAINS):  # "Net::v2" or "data::v2" is none, as extract's
        raise StoreError(f"{option('--out')} {out!r} is a URL; kdcache {command} writes a local folder (train's: every torchrun "
                         "rank's, a filesystem they share): write it there, then upload it (e.g. aws s3 cp --recursive FOLDER s3://...)")
    storage.refuse_broken_link(out, option("--out"), f"remove the link, create the folder it leads to, or choose another {option('--out')}")
    return Path(out)


_CHAINS = ("zip", *storage.CACHING_LAYERS)  # what begins a chained URL kdcache reads, told without fsspec (an extra)


def _check_out(out: Path, resume: bool, overwrite: bool, pipeline: Pipeline | None = None) -> None:
    """Refuse an OUT that is a file, a --resume without a checkpoint, a finished run without --overwrite (writes nothing),
    and, for a new run without --overwrite, files a run writes that are not this run's (``_refuse_foreign_files``)."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"{option('--out')} {str(out)!r} is a file, not a folder; choose another {option('--out')} or remove the file")
    if (out / "zarr.json").exists():  # a store (--cache itself, say): its files would be mixed with the run's
        raise StoreError(f"{option('--out')} {str(out)!r} is a zarr store, not a training run's folder; choose another {option('--out')}")
    if resume:
        if not _checkpoint_file(out).is_file():
            raise StoreError(f"{option('--resume')}: no {CHECKPOINT} in {str(out)!r}; run without {option('--resume')} to start training")
        return  # a run made inside a store by an earlier kdcache may still be resumed: it is there already
    store = layout.store_above(out)
    if store is not None:  # another store than --cache (inside --cache: refused at train's start, naming it as read)
        raise StoreError(f"{option('--out')} {str(out)!r} is inside the store {str(store)!r} (an extract --overwrite of that "
                         "store, which deletes everything in its folder, would be refused while the run is there, and pack leaves the "
                         f"run out); write it outside the store folder (e.g. {str(store.parent / out.name)!r})")
    present = [name for name in (CHECKPOINT, NEXT_CHECKPOINT, "student.pt") if (out / name).exists()]
    if present:
        _refuse_another_tools_run(out, present)
        if not overwrite:
            raise StoreError(f"{str(out)!r} already holds a training run; pass {option('--resume')} to continue it or "
                             f"{option('--overwrite')} to start afresh")
    elif not overwrite and pipeline is not None:
        _refuse_foreign_files(out, pipeline)


def _refuse_another_tools_run(out: Path, present: list[str]) -> None:
    """Refuse a new run, with or without --overwrite, into an OUT whose ``present`` checkpoint.pt, checkpoint.pt.next or
    student.pt are not a kdcache run's: OUT holds no kdcache pipeline.json and no checkpoint with kdcache's keys (another
    tool's model or checkpoint, a user's ``student.pt``). Both were called "a training run", and --overwrite deleted them."""
    if _kdcache_values(out / "pipeline.json"):
        return
    seen = []
    for name in (n for n in (CHECKPOINT, NEXT_CHECKPOINT) if n in present):
        kind = _checkpoint_kind(out / name)
        if not kind:
            return  # a kdcache checkpoint (a run of an earlier kdcache that lost its pipeline.json)
        seen.append(f"{name!r} is not a kdcache checkpoint: {kind}")
    seen.append("a pipeline.json that is not kdcache's" if (out / "pipeline.json").exists() else "no pipeline.json")
    them = "it" if len(present) == 1 else "them"
    raise StoreError(f"{str(out)!r} holds {', '.join(map(repr, present))} but no kdcache training run ({'; '.join(seen)}): a new run "
                     f"would replace {them}, and {option('--overwrite')} replaces only a kdcache run's files; move {them} away or "
                     f"choose another {option('--out')}")


def run_files(folder: Path) -> list[str]:
    """The files of a kdcache training run in ``folder`` (its pipeline.json, checkpoint, weights and metrics), where it
    holds one (a kdcache pipeline.json, or a checkpoint with kdcache's keys); else []."""
    ours = _kdcache_values(folder / "pipeline.json") or any(
        (folder / name).is_file() and not _checkpoint_kind(folder / name) for name in (CHECKPOINT, NEXT_CHECKPOINT))
    return [name for name in ("pipeline.json", *RUN_FILES, NEXT_CHECKPOINT) if (folder / name).exists()] if ours else []


def _kdcache_values(path: Path) -> bool:
    """Whether ``path`` holds a kdcache run's pipeline values (the pipeline.json train writes: its sections as JSON objects)."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and all(isinstance(values.get(section), dict) for section in ("student", "train"))


def _checkpoint_kind(path: Path) -> str:
    """Empty where ``path`` is a kdcache checkpoint (a dict with ``_CHECKPOINT_KEYS``), else what it is, in a few words. Its
    tensors are mapped, not read (a large checkpoint costs no more to tell than a small one)."""
    try:
        try:
            checkpoint = torch.load(str(path), weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError:  # a file mmap cannot map (torch.save's legacy format; older torch's unaligned storages): read whole
            checkpoint = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - truncated, not a zip of torch.save's, unpicklable
        return f"it cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120] or 'empty or truncated'})"
    return _not_a_checkpoint(checkpoint)


def _not_a_checkpoint(checkpoint: Any) -> str:
    """Empty for a kdcache checkpoint, else what ``checkpoint`` (as torch.load read it) is: a bare state_dict, a model saved
    whole by another tool."""
    missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else list(_CHECKPOINT_KEYS)
    if not missing:
        return ""
    return f"a dict without {missing}" if isinstance(checkpoint, dict) else type(checkpoint).__name__


def _refuse_foreign_files(out: Path, pipeline: Pipeline) -> None:
    """Refuse a new run into an OUT holding no run's checkpoint but a ``pipeline.json``, ``metrics.jsonl`` or ``heads.pt``
    that this run would replace, unless its ``pipeline.json`` is this run's values (the same command, stopped before its
    first checkpoint, run again): a user's files (a folder of their pipeline, another tool's metrics) were replaced
    with no ``--overwrite`` given."""
    present = [name for name in ("pipeline.json", "metrics.jsonl", "heads.pt") if (out / name).exists()]
    if not present:
        return
    try:
        ours = json.loads((out / "pipeline.json").read_text()) == json.loads(json.dumps(pipeline.to_dict()))
    except (OSError, ValueError):
        ours = False
    if not ours:
        them = "it" if len(present) == 1 else "them"
        raise StoreError(f"{str(out)!r} holds {', '.join(map(repr, present))} but no training run's {CHECKPOINT}, and not this run's "
                         f"pipeline.json: a new run would replace {them}; move {them} away or choose another {option('--out')} "
                         f"({option('--overwrite')} replaces {them})")


RUN_FILES = (CHECKPOINT, "student.pt", "heads.pt", "metrics.jsonl")
NEXT_CHECKPOINT = "checkpoint.pt.next"  # an --overwrite run's first checkpoint, before the earlier run's files go
_CHECKPOINT_KEYS = ("student", "heads", "optimizer", "schedule", "rng", "epoch", "step", "shards")  # _save's, since 0.1.0
_FILE = "_file"  # set by _read_checkpoint: the file a checkpoint was read from (CHECKPOINT, or NEXT_CHECKPOINT)


def _checkpoint_file(out: Path) -> Path:
    """The checkpoint a --resume continues: ``checkpoint.pt``, or where there is none but ``checkpoint.pt.next`` (an
    ``--overwrite`` run stopped while it replaced the earlier run's files: ``_save_epoch``), that one, the run's newest
    state. Beside a ``checkpoint.pt``, a ``.next`` is not used: the earlier run's files were still whole."""
    if not (out / CHECKPOINT).is_file() and (out / NEXT_CHECKPOINT).is_file():
        return out / NEXT_CHECKPOINT
    return out / CHECKPOINT


def _prepare_out(out: Path, pipeline: Pipeline, resume: bool, values: dict[str, Any] | None = None) -> bool:
    """Create OUT and, for a new run, write pipeline.json. An earlier run's files (``--overwrite``) are left until
    this run has saved its first checkpoint (``_save_epoch``: at an epoch's end, or inside one): a run that fails
    before (a changed dataset, a bad eval split, a diverging loss) leaves them as they were. Returns whether they
    are still to be replaced. A resumed run keeps its pipeline.json: the record of the values it was started with
    (written again only if it is gone: ``values``, those its checkpoint recorded)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            if not (out / "pipeline.json").is_file():
                _atomic_write_text(out / "pipeline.json", json.dumps(values if values is not None else pipeline.to_dict(), indent=2) + "\n")
            return False
        if any((out / name).exists() for name in (*RUN_FILES, NEXT_CHECKPOINT)):  # a .next: replaced by this run's first save
            os.close(os.open(out / ".kdcache-write-test", os.O_CREAT | os.O_WRONLY, 0o600))  # writable: known now, not after an epoch
            (out / ".kdcache-write-test").unlink()
            return True
        write_pipeline(out, pipeline)
        return False
    except OSError as e:  # read-only, no permission, no space
        raise _write_error(out, e) from None


def _save_epoch(out: Path, run: Run, optimizer: Any, schedule: Any, state: dict[str, int], metrics: dict[str, Any] | None,
                rng: Any, shards: np.ndarray, store: layout.Store, replacing: Pipeline | None = None,
                order: dict[str, Any] | None = None, partial: dict[str, Any] | None = None, values: dict[str, Any] | None = None,
                seconds: float | None = None, lr: float | None = None, plan: dict[str, int] | None = None,
                background: _Writes | None = None, append: bool = False) -> None:
    """Append the epoch's metrics, then atomically replace the checkpoint (metrics first: a crash in
    between leaves a checkpoint one epoch behind, and resume rewrites that epoch's line). Inside an epoch
    (``train.checkpoint_every``, a stop) there are no metrics yet: ``partial`` holds the epoch's loss sums so far
    (where the plan ends inside an epoch, both: its line, and its sums for a longer plan's --resume). ``values``: the
    run's pipeline values, as its pipeline.json records them (a --resume compares with them where that file is lost).
    ``seconds``: the run's training time so far (``_Loop.elapsed``), which a resumed run's metrics count on from; ``lr``:
    the rate its last step took (a resumed run's line of the epoch it stopped inside, where it has no step left).
    ``plan``: the train.epochs and train.steps it was trained under (a --resume may have changed them since pipeline.json).

    ``replacing`` (the first save of an ``--overwrite`` run, with its pipeline): the new checkpoint is written
    whole under another name first, and only then are the earlier run's files removed, this run's
    pipeline.json and metrics written, and the checkpoint renamed into place (``_replace_run``): the earlier run is
    lost only for the few renames it takes to put this one in its place, not for the time a large checkpoint takes.
    The ``.next`` checkpoint holds what those steps write (``pipeline``, ``first_metrics``): a run stopped among them
    is resumed from it, and its --resume takes the same steps again first (``_finish_replacing``).

    ``background`` (one process, not ``replacing``): the files are written by its thread, from copies of the state taken
    now (the next steps change the tensors in place), while the caller trains on (``_Loop.save`` waits for the last one).

    ``append`` (metrics.jsonl was written whole by this process, ``_Loop.appending``): the epoch's line is appended, not the
    file rewritten (``_metrics_lines``: each save would read and write every line before it, quadratic in the epochs).
    """
    copied = background is not None and replacing is None
    # on the host, as student.pt is (a GPU run's resumes onto the GPU: load_state_dict moves the optimizer's state to its parameters)
    ckpt = {"student": _on_cpu(run.student.state_dict(), copied), "heads": _on_cpu(run.heads.state_dict(), copied),
            "optimizer": _on_cpu(optimizer.state_dict(), copied), "schedule": copy.deepcopy(schedule.state_dict()), "epoch": state["epoch"], "step": state["step"], "batch": state["batch"], "rng": rng,
            "params": teachers.num_parameters(run.student),  # train's return where resume="auto" finds the run finished
            "shards": shards.tolist(), "store": _store_identity(store), **({"order": order} if order else {}),
            **({"pipeline": values} if values is not None else {}), **({"seconds": seconds} if seconds is not None else {}),
            **({"lr": lr} if lr is not None else {}), **({"plan": plan} if plan is not None else {}),
            **({"scaler": run.scaler.state_dict()} if run.scaler.is_enabled() else {}), **({"partial": partial} if partial else {})}
    lines = None if append else _metrics_lines(out, metrics, replacing)
    if replacing is not None:
        _save({**ckpt, "pipeline": replacing.to_dict(), "first_metrics": lines}, out / NEXT_CHECKPOINT)
        _replace_run(out, replacing.to_dict(), lines or [])
        return

    def write() -> None:
        try:
            if append and metrics is not None:
                _append_line(out / "metrics.jsonl", metrics)
            elif lines is not None:
                _atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in lines))
        except OSError as e:
            raise _write_error(out, e) from None
        _save(ckpt, out / CHECKPOINT, background.abandoned if copied else None)

    if copied:
        background.start(write)
    else:
        write()


def _metrics_lines(out: Path, metrics: dict[str, Any] | None, replacing: Pipeline | None) -> list[dict[str, Any]] | None:
    """metrics.jsonl's lines as ``_save_epoch`` writes them: the lines of the epochs before this one (a crash between a line
    and its checkpoint leaves one more) and its own, ``metrics``; None inside an epoch, where there is none to add and the
    file is left as it is, but for an --overwrite run's first save (``replacing``), which rewrites it to drop the earlier
    run's (its lines only, none inside an epoch)."""
    if metrics is not None:
        return [*([] if replacing else [m for m in _read_metrics(out) if m["epoch"] < metrics["epoch"]]), metrics]
    return [] if replacing else None


def _replace_run(out: Path, values: dict[str, Any] | None, lines: list[dict[str, Any]]) -> None:
    """Put an ``--overwrite`` run whose first checkpoint is saved whole as ``checkpoint.pt.next`` in the earlier run's
    place: its files go, this run's pipeline.json (``values``) and metrics.jsonl (``lines``) are written, and the
    checkpoint is renamed into place, last. Each step may be taken again: a run stopped among them (killed, a full
    disk) is resumed from the ``.next`` checkpoint, which holds both, after the steps are taken again."""
    try:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        if values is None:  # not recorded (a checkpoint of an earlier kdcache): written again by _prepare_out
            (out / "pipeline.json").unlink(missing_ok=True)
        else:
            _atomic_write_text(out / "pipeline.json", json.dumps(values, indent=2) + "\n")
        _atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in lines))
        os.replace(out / NEXT_CHECKPOINT, out / CHECKPOINT)
        storage.sync_folder(out)
    except OSError as e:
        raise _write_error(out, e) from None


def _finish_replacing(out: Path, checkpoint: dict[str, Any]) -> None:
    """A --resume of an ``--overwrite`` run stopped while it replaced the earlier run's files (its checkpoint read from
    ``checkpoint.pt.next``): the rest of ``_replace_run``, under OUT's lock, before anything reads pipeline.json or
    metrics.jsonl (the earlier run's may still be there). A ``.next`` of an earlier kdcache records no metrics: none are kept."""
    if (out / CHECKPOINT).exists() or not (out / NEXT_CHECKPOINT).is_file():
        raise StoreError(f"{str(out)!r} changed while this run started (another run wrote it); run the same command again")
    values = checkpoint.get("pipeline")
    lines = checkpoint.get("first_metrics")
    _replace_run(out, values if isinstance(values, dict) else None,
                 [m for m in lines if isinstance(m, dict)] if isinstance(lines, list) else [])


def _drop_abandoned_next(out: Path) -> None:
    """A ``checkpoint.pt.next`` beside the ``checkpoint.pt`` this --resume continues: the first checkpoint of an
    ``--overwrite`` run stopped before it replaced the earlier run (``_save_epoch``), which this --resume goes on
    with instead; nothing would read it again (a checkpoint's size, left for ever): removed, with a note."""
    try:
        (out / NEXT_CHECKPOINT).unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise _write_error(out, e) from None
    print(f"note: removed {str(out / NEXT_CHECKPOINT)!r}, the first checkpoint of an {option('--overwrite')} run stopped before "
          f"it replaced this one, which {option('--resume')} continues")


def _store_identity(store: layout.Store) -> dict[str, Any]:
    """What a resumed run's store must still be: the teacher and dataset it was made from."""
    m = store.manifest
    return {"weights_sha256": m["teacher"]["weights_sha256"], "probe_fingerprints": m["dataset"]["probe_fingerprints"],
            "num_samples": store.num_samples, "rows_per_shard": store.rows_per_shard,  # the shards' numbers mean the same rows
            "targets": m["targets"], "precision": m["precision"]}


# The values a resumed run may change: where and how fast it runs, what it reports, and how long it lasts (the
# schedule then follows the new length). Any other value of student.* and train.* would make it another run
# than the one its checkpoint continues.
RESUMABLE = {"device", "num_workers", "threads", "memory_budget_mb", "eval_split", "eval_cache", "eval_every", "checkpoint_every",
             "fingerprint_check", "fingerprint_recheck", "epochs", "steps", "rank_timeout_s"}


def _check_resume(out: Path, pipeline: Pipeline, store: layout.Store, checkpoint: dict[str, Any]) -> None:
    """Refuse a --resume from another store, or with values that change the run (its pipeline.json holds them)."""
    then, now = checkpoint.get("store") or {}, _store_identity(store)
    key = next((k for k in then if then[k] != now.get(k)), None)  # the keys it recorded (fewer, from earlier versions)
    if key is not None:
        old, new = then[key], now.get(key)
        while isinstance(old, dict) and isinstance(new, dict):  # down to the first leaf that differs
            sub = next(k for k in [*old, *new] if old.get(k) != new.get(k))
            key, old, new = f"{key}.{sub}", old.get(sub), new.get(sub)
        raise StoreError(f"{option('--resume')}: this run trained from another store ({key}: {_brief(old)} then, {_brief(new)} in "
                         f"{store.location!r}); resume with the run's own {option('--cache')}, or start afresh with {option('--overwrite')}")
    recorded, source = _recorded(out, checkpoint)
    if recorded is None:
        return  # no record to compare with (a run of an earlier kdcache whose pipeline.json is lost or damaged)
    current, defaults = pipeline.to_dict(), Pipeline().to_dict()
    # train.streams may change where the checkpoint records the streams the run took (_check_resumed_plan compares
    # those): K torchrun ranks of train.streams = 1 resume in one process with train.streams = K
    resumable = RESUMABLE | ({"streams"} if "streams" in (checkpoint.get("order") or {}) else set())
    for section in ("student", "train"):
        old, new = (_flat(_feature_defaults(values, section), section) for values in (recorded.get(section, {}), current[section]))
        # a value an earlier kdcache did not record (train.drop_last, say) was its default then
        old = {**{k: v for k, v in _flat(defaults[section], section).items() if k in new}, **old}
        for key in sorted(set(old) | set(new)):
            if key.split(".")[1] not in resumable and not _same_value(key, old.get(key), new.get(key)):
                raise PipelineError(f"{option('--resume')}: {key} was {old.get(key)!r} in this run ({source!r}), now "
                                    f"{new.get(key)!r}; resume with the run's values (only train.{{{', '.join(sorted(resumable))}}} "
                                    f"may change), or start afresh with {option('--overwrite')}")


def _say_replanned(out: Path, pipeline: Pipeline, checkpoint: dict[str, Any]) -> None:
    """A resumed run whose train.epochs/steps changed is allowed, but is not the run its checkpoint began: say so, once the
    new length is accepted (said before _check_resumed_plan refused a length shorter than the run had trained, the line
    claimed a schedule planned again for a run that then did not start)."""
    recorded, _ = _recorded(out, checkpoint)
    if recorded is None:
        return
    keys = ("epochs", "steps")
    old = {k: v for k, v in {**Pipeline().to_dict()["train"], **(recorded.get("train") or {})}.items() if k in keys}
    # the length its checkpoint was trained under: an earlier --resume may have changed it since pipeline.json
    old.update({k: v for k, v in (checkpoint.get("plan") or {}).items() if k in keys})
    new = {"epochs": pipeline.train.epochs, "steps": pipeline.train.steps}
    length = [f"train.{key} was {old.get(key)!r}, now {new[key]!r}" for key in keys if old.get(key) != new[key]]
    if length:
        print(f"{option('--resume')}: {' and '.join(length)}: the learning-rate schedule is planned again over the new length from "
              "here on, so the result is neither the earlier plan's nor a fresh run's (pipeline.json keeps the run's values)")


def _same_value(key: str, then: Any, now: Any) -> bool:
    """Whether a value a resumed run was recorded with (``then``, pipeline.json's) is ``now``'s (``_canonical``)."""
    return _canonical(key, then) == _canonical(key, now)


def _canonical(key: str, value: Any) -> Any:
    """A pipeline value as runs are compared by it (a resume's, torchrun's ranks'): ``student.inputs`` names the keyword
    arguments the student is called with, and listed in another order is the same call."""
    return sorted(map(repr, value)) if key == "student.inputs" and isinstance(value, list) else value


def _recorded(out: Path, checkpoint: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The values the run began with, and where they were read: its pipeline.json or, where that is lost or damaged, the
    copy its checkpoint holds (none in a checkpoint of an earlier kdcache: then None). A checkpoint read from
    ``checkpoint.pt.next`` (an --overwrite run stopped while it replaced the earlier run) has its own copy read first:
    pipeline.json may still be the earlier run's."""
    path, values = out / "pipeline.json", checkpoint.get("pipeline")
    source = str(out / checkpoint.get(_FILE, CHECKPOINT))
    if checkpoint.get(_FILE) == NEXT_CHECKPOINT and isinstance(values, dict):
        return values, source
    try:
        recorded = json.loads(path.read_text())
        if isinstance(recorded, dict):
            return recorded, str(path)
    except (OSError, ValueError):
        pass
    return (values, source) if isinstance(values, dict) else (None, "")


def _feature_defaults(values: Any, section: str) -> Any:
    """A section of pipeline.json with each train.features entry's omitted keys at their defaults: an entry that spells
    out ``weight = 1.0`` or ``select = "auto"`` is the same run as one that leaves them out."""
    features = values.get("features") if section == "train" and isinstance(values, dict) else None
    if not isinstance(features, dict):
        return values
    return {**values, "features": {layer: {**FEATURE_DEFAULTS, **spec} if isinstance(spec, dict) else spec
                                   for layer, spec in features.items()}}


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}.{key}").items()}


def _read_checkpoint(out: Path) -> dict[str, Any]:
    """The checkpoint a --resume continues (``_checkpoint_file``), with the name of its file under ``_FILE``."""
    file = _checkpoint_file(out)
    path = str(file)
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, unpicklable
        detail = " ".join(str(e).split())[:160] or "empty or truncated"
        error = StoreError(f"{option('--resume')}: {path!r} cannot be read ({type(e).__name__}: {detail}); {_afresh(out)}")
        error.detail = f"{type(e).__name__}: {detail}"
        raise error from None
    seen = _not_a_checkpoint(checkpoint)
    if seen:  # a bare state_dict, a model saved whole by another tool
        error = StoreError(f"{option('--resume')}: {path!r} is not a kdcache checkpoint ({seen}); {_afresh(out)}")
        error.detail = f"not a kdcache checkpoint: {seen}"  # torchrun: what another rank than 0 saw (_check_same_run)
        raise error
    checkpoint[_FILE] = file.name
    return checkpoint


def _afresh(out: Path) -> str:
    """How to start afresh where a --resume cannot read OUT's checkpoint: --overwrite, where OUT holds a kdcache run's
    pipeline.json (else --overwrite refuses the folder too: ``_refuse_another_tools_run``)."""
    if _kdcache_values(out / "pipeline.json"):
        return f"pass {option('--overwrite')} instead of {option('--resume')} to start afresh"
    return (f"{str(out)!r} holds no kdcache run's pipeline.json either ({option('--overwrite')} replaces only a kdcache run's "
            f"files): move the file away or choose another {option('--out')} to start afresh")


def _restore(ckpt: dict[str, Any], out: Path, run: Run, optimizer: Any, schedule: Any) -> tuple[dict[str, int], dict[str, Any] | None]:
    """The run's state from its checkpoint: weights, optimizer, schedule, loss scale and RNG; returns where it was
    (epoch, step, batch) and, saved inside an epoch, that epoch's loss sums so far."""
    path = str(out / CHECKPOINT)  # a checkpoint read from checkpoint.pt.next was renamed to it (_finish_replacing)
    try:
        run.student.load_state_dict(ckpt["student"])
        run.heads.load_state_dict(ckpt["heads"])
    except (RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())
        raise StoreError(f"{option('--resume')}: {path!r} holds another student or projection heads than this pipeline builds "
                         f"({detail[:200]}); resume with the run's own pipeline (its pipeline.json) or pass {option('--overwrite')}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    # the next step's lr from this run's plan: the checkpoint's is the earlier plan's where train.epochs/steps changed
    for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * factor(schedule.last_epoch)
    if "scaler" in ckpt:  # fp16: the loss scale the run had reached (train.precision cannot change on --resume)
        run.scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])
    state = {"epoch": int(ckpt["epoch"]), "step": int(ckpt["step"]), "batch": int(ckpt.get("batch", 0))}  # none before 0.1.4
    return state, ckpt.get("partial")


def _trained_seconds(ckpt: dict[str, Any], out: Path, state: dict[str, int]) -> float:
    """The training time a run had when its checkpoint was saved: the checkpoint's ``seconds``, or (a checkpoint of
    kdcache <= 0.1.8, which has none) the most of the metrics lines the resumed run keeps (its epochs before ``state``'s)."""
    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

    if number(ckpt.get("seconds")):
        return float(ckpt["seconds"])
    kept = [m.get("seconds") for m in _read_metrics(out) if m["epoch"] < state["epoch"]]
    return max((float(s) for s in kept if number(s)), default=0.0)


def _last_lr(ckpt: dict[str, Any], schedule: Any) -> float:
    """The rate a resumed run's last step took: its checkpoint's ``lr``, or (kdcache <= 0.1.12 recorded none) the
    schedule's for that step (the same where train.epochs/steps did not change)."""
    if isinstance(ckpt.get("lr"), float):
        return ckpt["lr"]
    return schedule.base_lrs[0] * schedule.lr_lambdas[0](max(0, schedule.last_epoch - 1))


def _rng_state() -> Any:
    """torch's CPU RNG state, with every CUDA device's (dropout on a GPU draws from those) where CUDA is used."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}
    return torch.get_rng_state()


def _set_rng_state(state: Any) -> None:
    if isinstance(state, list):  # torchrun: every rank's, in rank order (a checkpoint of another rank count: rank 0's)
        rank, world, _ = distributed.ranks()
        state = state[rank if len(state) == world else 0]
    if isinstance(state, dict):
        torch.set_rng_state(state["cpu"])
        if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
    else:
        torch.set_rng_state(state)


def _read_metrics(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's lines, less a last one cut short as it was appended (``_append_line``: a crash, a full disk)."""
    path = out / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and not text.endswith("\n") and not _is_json(lines[-1]):
        lines.pop()
    metrics = []
    for i, line in enumerate(lines, 1):
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise StoreError(f"{str(path)!r} line {i} is not JSON ({e.msg}: {line[:60]!r}); delete that line, "
                             f"or pass {option('--overwrite')} instead of {option('--resume')} to start afresh") from None
        if not isinstance(metrics[-1], dict) or not isinstance(metrics[-1].get("epoch"), int):
            raise StoreError(f"{str(path)!r} line {i} is not an epoch's metrics ({line[:60]!r}); delete that line, "
                             f"or pass {option('--overwrite')} instead of {option('--resume')} to start afresh")
    return metrics


def _cut_short(path: Path) -> bool:
    """Whether the file ``path`` ends inside a line (an append cut short: ``_append_line``)."""
    try:
        with open(path, "rb") as f:
            return f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _append_line(path: Path, line: dict[str, Any]) -> None:
    """``line`` added to the metrics file ``path`` and flushed to the disk (before the checkpoint that follows it). Its
    newline ends it: a crash in the write leaves a last line cut short, which ``_read_metrics`` leaves out, and the
    first save of a resumed run writes the file whole again (``_Loop.appending``)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        data = memoryview((json.dumps(line) + "\n").encode())
        while data:  # writev may write less than asked
            data = data[os.writev(fd, [data]):]
        storage.sync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    """``text`` as the file ``path``, through a temp file flushed to the disk and renamed over it (``storage.write_file``),
    then the folder flushed: after a power loss the run's files are each whole, and as new as the order they were written in."""
    storage.write_file(path, [text.encode()], path.with_suffix(path.suffix + ".tmp"))  # a full disk or Ctrl-C leaves no temp file
    storage.sync_folder(path.parent)


class _Recorded:
    """A file whose write errors are kept: ``torch.save`` turns them into a bare RuntimeError. ``abandoned`` (a background
    write's, ``_Writes``): once set, the next chunk raises KeyboardInterrupt, as a Ctrl-C in the main thread would."""

    def __init__(self, file: Any, abandoned: threading.Event | None = None):
        self.file, self.error, self.abandoned = file, None, abandoned
        self.name = file.name

    def write(self, data: Any) -> int:
        try:
            if self.abandoned is not None and self.abandoned.is_set():
                raise KeyboardInterrupt
            return self.file.write(data)
        except (OSError, KeyboardInterrupt) as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _on_cpu(state: Any, copied: bool = False, copies: dict[Any, Any] | None = None) -> Any:
    """``state`` (a state dict, or an optimizer's nested one) with its tensors on the host: loadable where there is no GPU,
    without map_location. A dict keeps its type and attributes (a module state dict's ``_metadata``, which load_state_dict
    reads); a tensor already on the host is not copied, unless ``copied`` (every tensor a copy of its own: ``_copied``)."""
    if isinstance(state, torch.Tensor):
        return _copied(state.detach(), {} if copies is None else copies) if copied else state.detach().cpu()
    copies = {} if copies is None else copies
    if isinstance(state, dict):
        out = copy.copy(state)
        for key, value in state.items():
            out[key] = _on_cpu(value, copied, copies)
        return out
    if type(state) in (list, tuple):
        return type(state)(_on_cpu(value, copied, copies) for value in state)
    return state


def _copied(tensor: torch.Tensor, copies: dict[Any, Any]) -> torch.Tensor:
    """``tensor`` on the host, in a copy of its storage made once per storage (``copies``): tensors that share one (a
    student's tied weights) share their copy's, and are saved once, as torch.save keeps the tensors themselves."""
    if type(tensor) is not torch.Tensor or tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        return tensor.to("cpu", copy=True)  # sparse, quantized, nested, a subclass: a storage of another make, or none
    storage = tensor.untyped_storage()
    key = (storage.device, storage.data_ptr(), storage.nbytes())
    if key not in copies:
        copies[key] = storage.clone() if storage.device.type == "cpu" else storage.cpu()
    return torch.empty(0, dtype=tensor.dtype).set_(copies[key], tensor.storage_offset(), tensor.size(), tensor.stride())


def _save(obj: Any, path: Path, abandoned: threading.Event | None = None) -> None:
    """``torch.save`` to a temp file renamed over ``path``: a crash or a full disk leaves the previous file whole (and so
    does ``abandoned``, set: ``_Recorded``)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            recorded = _Recorded(f, abandoned)
            try:
                torch.save(obj, recorded)
            except RuntimeError:
                if recorded.error is None:
                    raise
                raise recorded.error from None
            f.flush()
            storage.sync(f.fileno())  # on the disk before it replaces the last one: a power loss leaves one of them whole
        os.replace(tmp, path)
        storage.sync_folder(path.parent)
    except BaseException as e:  # a full disk, or Ctrl-C: no temp file is left
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def _write_error(path: Path, e: OSError) -> StoreError:
    """A failed write of the output folder (disk full, quota, I/O error) as a one-line error."""
    fix = write_fix(e)
    folder = path if path.is_dir() else path.parent  # OUT itself, or a file in it
    again = f"rerun with {option('--resume')} to continue from the last checkpoint" if _checkpoint_file(folder).is_file() else "rerun"
    return StoreError(f"cannot write {str(path)!r}: {e.strerror or e}; {fix} and {again}")


def write_pipeline(out: Path, pipeline: Pipeline) -> None:
    _atomic_write_text(Path(out) / "pipeline.json", json.dumps(pipeline.to_dict(), indent=2) + "\n")
