"""The reader: a store joined with the input dataset, batch by batch, alignment checked.

Row ``r`` of the store is paired with dataset item ``samples/index[r]``, and the input's
fingerprint is recomputed and compared with ``samples/fingerprint[r]``: for a seeded fraction
``fingerprint_check`` of the rows (default every row) in the first epoch this object serves (and the next, where the
first was resumed inside: its first batches were not served), and ``fingerprint_recheck`` of them in each later epoch. Targets are never read row by row:

- in memory: when the arrays needed fit under ``memory_budget_mb`` they are read whole, once,
  with sequential whole-chunk reads, and batches take random rows from RAM;
- streaming: otherwise, each epoch shuffles the order of shards, reads ``buffer_shards`` whole
  shards at a time and shuffles rows within that buffer.

``TransferSet`` is an ``IterableDataset`` yielding whole batches; with DataLoader workers each
worker opens the store itself and takes every k-th buffer of the epoch's plan (with ``streams`` > 1, every k-th
step: ``_stream_steps``).
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from kdcache import data, storage, store as layout, threads
from kdcache.errors import AlignmentError, DamagedShardError, PipelineError, StoreError, short


class TransferSet(IterableDataset):
    """Batches ``{"rows", "index", "inputs", "targets": {path: tensor}, "label"}`` for one epoch (``"mask"`` too: ``check_masks``).

    ``location``: where the store is, or the ``Store`` already opened there (``kdcache.open_store``; its storage options
    are used): its manifest, markers and metadata are not read again, the store at its location is looked at once to be
    it still (one small read: one replaced since it was opened is refused, ``StoreReplacedError``). ``rows``: the store
    rows to use, of done shards (default: every row of a done shard; others are refused). ``paths``: the targets to read,
    by name (``"logits"``, a layer's name) or array path (``"targets/logits"``); ``batch["targets"]``
    is keyed by array path (``store.targets[name].path``; a top-k target adds its classes, ``targets/logits_indices``); ``samples/*`` columns are always read (``[]``: inputs, indices and
    labels alone, a labels-only loop). ``shuffle=False`` keeps store order. ``memory_budget_mb`` (MiB, >= 0): targets whose
    rows fit are read into RAM once, others streamed by whole shards, ``buffer_shards`` (>= 1) at a time. ``fingerprint_check``
    and ``fingerprint_recheck``: the fractions (0 to 1) of rows whose input fingerprint is checked in the first epoch set
    and in later ones. ``checkpoint_bytes``: what the process holds besides, counted with the targets in the memory checks
    (``kdcache train``: the host copy of a checkpoint written while the next steps train). Public as
    ``kdcache.TransferSet``, for a training loop of one's own (README).
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | layout.Store,
        dataset: Dataset,
        paths: list[str],
        *,
        batch_size: int,
        seed: int = 0,
        rows: np.ndarray | None = None,
        shuffle: bool = True,
        memory_budget_mb: float = 2048.0,
        buffer_shards: int = 4,
        fingerprint_check: float = 1.0,
        fingerprint_recheck: float = 1.0,
        drop_last: bool = False,
        storage_options: dict[str, Any] | None = None,
        streams: int = 1,
        stream: int | None = None,
        checkpoint_bytes: int = 0,
    ):
        opened = location if isinstance(location, layout.Store) else None
        # a Path too: the streaming reads look at its scheme, and messages name it as a string
        location = opened.location if opened is not None else storage.location_arg(location, "location")
        if opened is not None and storage_options is not None:  # else dropped unsaid: the Store reads with the options it was opened with
            raise PipelineError(f"storage_options were given with an opened Store, which has its own ({short(opened.storage_options)}); "
                                "drop them, or pass the store's location with them")
        storage_options = opened.storage_options if opened is not None else storage_options
        _check_paths(paths)
        shuffle, drop_last = storage.flag_arg(shuffle, "shuffle"), storage.flag_arg(drop_last, "drop_last")  # "False" shuffled
        _check_options(batch_size=batch_size, fingerprint_check=fingerprint_check, fingerprint_recheck=fingerprint_recheck,
                       memory_budget_mb=memory_budget_mb, buffer_shards=buffer_shards, streams=streams, stream=stream, seed=seed)
        store, algorithm = _open_for(opened or location, dataset, storage_options)
        self.location, self.dataset, self.storage_options, self.algorithm = location, dataset, storage_options, algorithm
        self._check_probes(store.manifest)
        self._manifest = layout.identity(store.manifest)  # what a streaming read's own opening of the store must find (_read)
        self.paths = store.sample_paths() + [a for p in paths for a in _target_arrays(store, p)]
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.buffer_shards = int(buffer_shards)
        self.fingerprint_check, self.fingerprint_recheck = float(fingerprint_check), float(fingerprint_recheck)
        self.streams, self.stream = int(streams), stream  # see _stream_steps
        self.rows_per_shard = store.rows_per_shard
        self.rows = done_rows(store) if rows is None else _checked_rows(rows, store)
        if self.streams > max(1, len(self.rows)):  # each epoch lists every stream's batches: 10**12 streams never began
            raise PipelineError(f"streams = {self.streams} (train.streams, or the ranks under torchrun) is more than the {len(self.rows)} "
                                f"rows trained on, so a stream would serve no row; use at most {len(self.rows)}, e.g. 1 (the default)")
        self.groups = ShardGroups.of(self.rows, self.rows_per_shard)
        self._epoch = multiprocessing.RawValue("q", 0)  # shared memory: persistent DataLoader workers see set_epoch
        self._skip = multiprocessing.RawValue("q", 0)  # and its batches to leave out
        self.first_epoch: int | None = None  # the first epoch set: its rows are checked at fingerprint_check
        self.first_skipped = False  # the first epoch set was resumed inside (skip): the next one is checked so too
        # decoded bytes of one row of the arrays read: what decides RAM or streaming, and what streaming's buffers hold (footprint)
        # (checked against the manifest first: a damaged zarr.json's shape is named as such, not as a buffer too large to stream)
        self.row_bytes = sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize for a in map(store.checked_array, self.paths))
        held = _rows_of_shards(store, self.groups.shards)  # in RAM: the shards holding the rows (a train.subset's, not the store's)
        self.in_memory = self.row_bytes * held <= memory_budget_mb * 2**20
        self.checkpoint_bytes = int(checkpoint_bytes)
        self.memory = (_read_whole(store, self.paths, self.groups.shards, self.row_bytes, memory_budget_mb, location, self.checkpoint_bytes)
                       if self.in_memory else None)  # the rows of the shards holding self.rows, back to back
        self._store: layout.Store | None = None  # the streaming reads' (_read): once per process
        self._made: tuple[layout.Store, int] | None = (store, os.getpid())  # the store this reader was made from, by that process
        self.mask: tuple[str, str, str] | None = None  # check_masks: the key, setting and message start of each batch's mask

    def check_masks(self, key: str, setting: str = "mask", where: str = "TransferSet") -> None:
        """Have each batch's padding mask, the ``(rows, tokens)`` tensor under ``key`` of its dict inputs, checked as the
        batch is made, in the thread making it (not the training step's; a DataLoader worker's), before it is pinned or
        copied anywhere: values other than bool or 0/1 (``data.check_mask_values``) raise a ``PipelineError`` where that
        batch would be served (``where``: what its one line begins with; ``setting``: what it names), and the mask is
        served as bool too, in ``batch["mask"]`` (``batch["inputs"]`` unchanged). Before iterating (workers take it with them);
        ``key`` "": none checked."""
        self.mask = (key, setting, where) if key else None

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The epoch the next iterator serves. ``skip``: its first batches (steps, with streams) not to serve, as they
        were already trained on (a run resumed mid-epoch): the rest are the uninterrupted epoch's, and buffers
        holding only skipped batches are not read."""
        for name, value in (("epoch", epoch), ("skip", skip)):  # -1 failed in the next iterator (numpy's seed), 1.5 in RawValue
            if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < 0:
                raise PipelineError(f"set_epoch's {name} must be an integer >= 0, got {short(value)}")
        if self.first_epoch is None:
            self.first_epoch, self.first_skipped = epoch, skip > 0
        self._epoch.value = epoch
        self._skip.value = skip

    def check_fraction(self) -> float:
        """The fraction of rows whose fingerprint this epoch checks: every epoch is a first one until
        ``set_epoch`` is called; after that the first epoch set is, and the one after it where the first was resumed
        inside (``skip``): the rows of the batches it left out (served before the interruption, perhaps from another
        dataset than now) would otherwise be checked only at ``fingerprint_recheck`` from then on."""
        first = self.first_epoch
        if first is None or self.epoch == first or (self.first_skipped and self.epoch == first + 1):
            return self.fingerprint_check
        return self.fingerprint_recheck

    # -- the plan: which rows, in which buffers, in which order -----------------------------
    def plan(self, epoch: int) -> Iterator[np.ndarray]:
        """The epoch's buffers, made one at a time: arrays of store rows, in the order they are served.

        Deterministic in ``(seed, epoch)``: a resumed or repeated epoch sees the same batches.
        Streaming, the shards are drawn in a seeded order, ``buffer_shards`` at a time; a buffer is the
        rows of its shards in the rows' own order, then permuted. Only the buffer being made is held:
        memory grows with the number of shards, not of rows (beyond ``rows`` itself).
        """
        rng = np.random.default_rng([self.seed, epoch])
        if self.in_memory:  # one batch per buffer: k DataLoader workers take turns and serve the plan's order for any k
            order = rng.permutation(self.rows) if self.shuffle else self.rows
            yield from (order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))
            return
        shards = self._shard_order(rng)
        for i in range(0, len(shards), self.buffer_shards):
            rows = self.groups.rows_of(shards[i : i + self.buffer_shards])
            yield rng.permutation(rows) if self.shuffle else rows

    def _shard_order(self, rng: np.random.Generator) -> np.ndarray:
        """Streaming: the epoch's order of the shards ``rows`` touch (indices into ``groups.shards``), drawn first."""
        n = len(self.groups.shards)
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def buffer_sizes(self, epoch: int) -> list[int]:
        """``[len(b) for b in plan(epoch)]``, without making the buffers."""
        if self.in_memory:
            return [min(self.batch_size, len(self.rows) - i) for i in range(0, len(self.rows), self.batch_size)]
        counts = np.diff(self.groups.bounds)[self._shard_order(np.random.default_rng([self.seed, epoch]))]
        return np.add.reduceat(counts, np.arange(0, len(counts), self.buffer_shards)).tolist() if len(counts) else []

    def footprint(self, workers: int, processes: int = 1) -> Footprint | None:
        """Streaming: the most this reader set holds at once, in ``processes`` processes (torchrun's ranks on this machine)
        of ``workers`` DataLoader workers each (0: the process reads itself); None in RAM (the targets were read once, under
        ``memory_budget_mb``). A reader holds the buffer it serves (one per stream it joins) and the next, read ahead;
        one stream's buffers go to one reader each, so no more are held than an epoch makes. Every buffer is counted
        as whole shards of ``rows_per_shard`` rows: the reads are whole shards, decoded. One stream, a reader that serves
        more than two buffers an epoch also holds the last ``TAIL`` batches of the buffer before while they are made
        ahead or handed on (``_pieces``), each of at most a batch's rows, or a buffer's where that is fewer (streams join
        copies of their rows: their batches hold no buffer)."""
        if self.in_memory:
            return None
        shards = len(self.groups.shards)
        planned = -(-shards // self.buffer_shards)  # buffers an epoch makes
        readers = max(1, workers) * max(1, processes)
        per_reader = min(planned, 1 + (self.streams if self.stream is None else 1))
        buffers = readers * per_reader if self.streams > 1 else min(planned, readers * per_reader)  # streams: readers share buffers
        held, k = min(self.buffer_shards, shards), max(1, workers)
        # one stream: DataLoader worker w of k serves ceil((planned - w) / k) buffers an epoch, more than 2 where w < planned - 2k
        tails = 0 if self.streams > 1 else max(1, processes) * min(k, max(0, planned - 2 * k))
        return Footprint(buffers, held, self.rows_per_shard, self.row_bytes, per_reader, readers, tails * TAIL,
                         min(self.batch_size, held * self.rows_per_shard))

    def check_memory(self, workers: int, what: str, readers: str) -> None:
        """Refuse, before the first step and before anything is written, streaming whose buffers (``footprint``, in
        ``workers`` DataLoader workers of each of torchrun's ranks on this machine) would take more than
        ``MEMORY_SHARE`` of the memory the process may use: such a run is killed hours in, without a word. Targets in
        RAM were checked before they were read (``_check_ram``); where the OS gives no figure nothing is. ``what``:
        the targets, as the message names them; ``readers``: who reads them (``train.num_workers = 2``)."""
        processes = local_ranks()
        f, memory = self.footprint(workers, processes), memory_limit()
        if f is None or memory is None or f.nbytes + self.checkpoint_bytes <= MEMORY_SHARE * memory:
            return
        served = "the one served" if self.streams == 1 or self.stream is not None else f"one served per stream (train.streams = {self.streams})"
        tail = (f", and the last {TAIL} batches of the one before, made ahead or handed on: {f.batches} batches of up to "
                f"{_binary_size(f.batch_rows * f.row_bytes)} ({f.batch_rows} rows) in all" if f.batches else "")
        readers += f" in each of {processes} ranks on this machine" if processes > 1 else ""
        raise PipelineError(
            f"streaming {what} would hold up to {_binary_size(f.nbytes)} at once, more than half of the {_binary_size(memory)} of memory "
            f"this process may use: {_count(f.buffers, 'buffer')} of {_count(f.shards, 'shard')} (train.shuffle_buffer_shards = "
            f"{self.buffer_shards}) of {_binary_size(f.rows * f.row_bytes)} each ({f.rows} rows of {f.row_bytes} bytes: the arrays "
            f"read, decoded), {f.per_reader} per reader ({served} and the next, read ahead{tail}) and {_count(f.readers, 'reader')} "
            f"({readers}){_with_checkpoint(self.checkpoint_bytes)}; lower train.shuffle_buffer_shards or train.num_workers, or re-extract the store with a smaller extract.shard_mb")

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Batches (streams: steps) the epoch serves: counted from the buffer sizes, nothing drawn or listed."""
        counts = self._batch_counts(epoch)
        if self.streams > 1:  # buffer i goes to stream i % streams; a step is batch j of every stream
            return max(sum(counts[s :: self.streams]) for s in range(self.streams))
        return sum(counts)

    def _batch_counts(self, epoch: int) -> list[int]:
        """The batches each buffer of the epoch's plan makes."""
        return [size // self.batch_size if self.drop_last else -(-size // self.batch_size) for size in self.buffer_sizes(epoch)]

    def __len__(self) -> int:
        return self.batches_per_epoch(self.epoch)

    # -- serving ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Batches (dataset items, fingerprints, collation) are made ahead by a thread that starts now, overlapping the
        # training step where cores are free; streaming, the store's buffers are read one ahead of those by another.
        # The epoch and its check fraction are read now: a later set_epoch (the next epoch, started early while this
        # one's last is saved) must not change this one's batches.
        worker = get_worker_info()
        k, me = (worker.num_workers, worker.id) if worker else (1, 0)
        epoch, skip = self.epoch, self._skip.value
        check = Check(self.check_fraction(), np.random.default_rng([self.seed, epoch, 1, me]))
        if self.streams > 1:
            return data.Prefetch(self._stream_steps(epoch, k, me, check, skip), depth=PREFETCH)
        return data.Prefetch(self._batches(self._read_ahead(self._buffers_of(epoch, k, me, skip)), check), depth=PREFETCH)

    def _buffers_of(self, epoch: int, k: int, me: int, skip: int) -> Iterator[np.ndarray]:
        """Reader ``me`` of ``k``'s buffers: every k-th of the plan. With ``skip``, the rest of an epoch whose first
        ``skip`` batches were served: a DataLoader serves its workers' batches in turn (``taken_in_turn``), and a new
        iterator's turns start at worker 0, so worker ``me`` now plays the reader whose turn came ``me`` after the
        last batch served, less that reader's batches served. A buffer wholly served is not read; one partly served
        is cut after them (its batches are consecutive slices of its rows)."""
        counts, left = self._batch_counts(epoch) if skip else [], 0
        if skip:
            taken, following = taken_in_turn([sum(counts[w::k]) for w in range(k)], skip)
            me = (following + me) % k
            left = taken[me]
        for i, rows in enumerate(self.plan(epoch)):
            if i % k != me:
                continue
            if left and left >= counts[i]:
                left -= counts[i]
                continue
            yield rows[left * self.batch_size :]
            left = 0

    def _batches(self, buffers: Iterator[tuple[np.ndarray, list[Piece]]], check: Check) -> Iterator[dict[str, Any]]:
        for rows, pieces in buffers:
            for lo, hi, columns in pieces:  # a batch's rows are in one piece (``_pieces``)
                for start in range(lo, hi, self.batch_size):
                    if self.drop_last and start + self.batch_size > len(rows):
                        break
                    at = slice(start - lo, start - lo + self.batch_size)
                    yield self._batch(rows[start : start + self.batch_size], {p: c[at] for p, c in columns.items()}, check)
            pieces = columns = None  # not held while the next buffer is waited for (the one after it may be read meanwhile)

    def _read_ahead(self, buffers: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, list[Piece]]]:
        """Each buffer's rows with their columns. Streaming, the next buffer's shards are read by a thread of their own
        while this one's batches are made (the first read starts at once): whole-shard reads, decoding and an object
        store's requests wait outside the GIL, and overlap all of a buffer's batches, not only the last few made ahead.
        Two buffers are held, the one served and the next, and the last batches of the one before while they are made
        ahead or handed on (``_pieces``)."""
        if self.memory is not None:
            return ((rows, self._read(rows)) for rows in buffers)
        buffers = iter(buffers)
        first = next(buffers, None)
        if first is None:
            return iter(())
        reader = threads.pool("read-ahead", 1)

        def serve(rows: np.ndarray, reading: Any) -> Iterator[tuple[np.ndarray, list[Piece]]]:
            for following in buffers:
                ahead = reader.submit(self._read, following)
                yield rows, reading.result()
                rows, reading = following, ahead
            yield rows, reading.result()

        return serve(first, reader.submit(self._read, first))

    def _streams(self, sizes: list[int]) -> list[list[tuple[int, int, int]]]:
        """Buffer ``i`` of the plan (``sizes[i]`` rows) goes to stream ``i % streams``; each stream's batches as ``(buffer, lo, hi)``."""
        out: list[list[tuple[int, int, int]]] = [[] for _ in range(self.streams)]
        for i, size in enumerate(sizes):
            for lo in range(0, size, self.batch_size):
                if self.drop_last and lo + self.batch_size > size:
                    break
                out[i % self.streams].append((i, lo, min(lo + self.batch_size, size)))
        return out

    def _stream_steps(self, epoch: int, k: int, me: int, check: Check, skip: int = 0) -> Iterator[dict[str, Any]]:
        """``streams > 1``: step j is batch j of every stream. ``stream=None`` (one process) joins them into one
        batch; ``stream=r`` (torchrun rank r) serves only its own, reading only its own buffers, with
        ``scale = streams * rows / rows of the whole step``: the mean of the ranks' gradients of their scaled
        losses is then the gradient of the joined batch's loss, and ``share = rows / rows of the whole step``
        weighs its loss in the step's logged mean. A stream that has run out serves one row (the plan's first)
        with scale and share 0 (every rank takes part in every step). DataLoader worker ``me`` of ``k`` takes
        steps skip+me, skip+me+k, ... (buffers used only by the first ``skip`` steps are not read)."""
        streams = self._streams(self.buffer_sizes(epoch))
        mine = range(self.streams) if self.stream is None else [self.stream]
        steps = range(skip + me, max(len(s) for s in streams), k)
        needed = list(dict.fromkeys(streams[s][j][0] for j in steps for s in mine if j < len(streams[s])))  # buffers, as first used
        plan = enumerate(self.plan(epoch))
        made: dict[int, np.ndarray] = {}  # buffers of the plan made before their turn
        first: list[np.ndarray] = []  # the plan's first row

        def rows_of(i: int) -> np.ndarray:
            while i not in made:
                j, rows = next(plan)
                made[j] = rows
                if j == 0:
                    first.append(rows[:1])
            return made.pop(i)

        def first_row() -> np.ndarray:  # buffers are made in plan order: once any is, the first was; if none is, none is needed
            return first[0] if first else next(plan)[1][:1]

        reads = self._read_ahead(rows_of(i) for i in needed)
        return self._join_steps(streams, mine, steps, reads, first_row, check)

    def _join_steps(self, streams: list[list[tuple[int, int, int]]], mine: Any, steps: range,
                    reads: Iterator[tuple[np.ndarray, list[Piece]]], first_row: Any, check: Check) -> Iterator[dict[str, Any]]:
        """The steps of ``_stream_steps``, from its buffers read in the order they are first used."""
        current: dict[int, tuple[int, np.ndarray, list[Piece]]] = {}  # stream -> (buffer, its rows, its pieces read)
        filler: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
        for j in steps:
            total = sum(s[j][2] - s[j][1] for s in streams if j < len(s))
            parts = []
            for s in mine:
                if j < len(streams[s]):
                    i, lo, hi = streams[s][j]
                    if current.get(s, (-1,))[0] != i:
                        current.pop(s, None)  # its last buffer not held while the next is waited for
                        current[s] = (i, *next(reads))
                    parts.append(_part(*current[s][1:], lo, hi))
            share = sum(len(r) for r, _ in parts) / total  # of the step's rows; 1 when the streams are joined
            if not parts:
                if filler is None:
                    row = first_row()
                    filler = (row, self._read(row)[0].columns)
                parts = [filler]
            rows = np.concatenate([r for r, _ in parts])
            batch = self._batch(rows, {p: np.concatenate([c[p] for _, c in parts]) for p in self.paths}, check)
            yield {**batch, "scale": 1.0 if self.stream is None else self.streams * share, "share": share}

    def _read(self, rows: np.ndarray) -> list[Piece]:
        """Every needed column for ``rows`` (in that order), from RAM or by whole-shard reads, in the pieces ``_pieces``
        cuts ``rows`` into, each with arrays of its own."""
        if self.memory is not None:  # every shard held but the store's last has rows_per_shard rows, and that one is held last
            held = np.searchsorted(self.groups.shards, rows // self.rows_per_shard) * self.rows_per_shard + rows % self.rows_per_shard
            return [Piece(0, len(rows), {p: a[held] for p, a in self.memory.items()})]  # a buffer is one batch (plan)
        if self._store is None:  # once per process: by each DataLoader worker, or by this process at its first read
            self._store = self._reopened()
        shards, local = np.unique(rows // self.rows_per_shard, return_inverse=True)
        spans = np.array([self._store.shard_rows(int(s)) for s in shards], dtype=np.int64).reshape(-1, 2)
        offsets = np.concatenate([[0], np.cumsum(spans[:, 1] - spans[:, 0])])
        position = offsets[local] + rows - spans[local, 0]  # row's place in the shards read back to back
        # each column's shards decoded into one array, then put in the buffer's order (the Store may be the caller's: its
        # words for a replaced store kept, the reader's own given)
        columns = self._store.read_columns(self.paths, shards.tolist(), replaced_when=REPLACED_WHEN)
        return [Piece(lo, hi, {p: c[position[lo:hi]] for p, c in columns.items()}) for lo, hi in self._pieces(len(rows))]

    def _pieces(self, n: int) -> list[tuple[int, int]]:
        """The ``(lo, hi)`` pieces ``_read`` gathers a buffer of ``n`` rows into, whole batches each: its last ``TAIL``
        batches one a piece, the rows before them one piece. A batch is a view of its piece; the last ones of a buffer,
        made ahead (``PREFETCH``) or handed on (the step's; a DataLoader worker's, until copied to shared memory) while the
        next buffer is served, then hold their own rows, not their whole buffer (three buffers held at once where a
        buffer makes many batches)."""
        head = max(0, -(-n // self.batch_size) - TAIL) * self.batch_size
        return [(0, head)] * (head > 0) + [(lo, min(lo + self.batch_size, n)) for lo in range(head, n, self.batch_size)]

    def _reopened(self) -> layout.Store:
        """The store opened again (streaming: by each DataLoader worker; the process that made this reader reads through
        the Store it was made from, looked at once more), refused unless it is the store this reader was made for: one
        replaced at the same location since (another ``kdcache extract --overwrite``, a copy synced over it) would serve its
        rows beside the first store's (in RAM, or read by another worker), targets of another teacher or run, checked only
        by the fingerprints of the rows the re-check picks. One that does not open now (removed, or not yet whole again) was
        there when the reader was made: named so, not as "no store"."""
        when = REPLACED_WHEN
        if self._made is not None and self._made[1] == os.getpid():
            store = self._made[0]
            store.check_in_place(*when)  # one small read, where an opening read the store's every group and array again
        else:
            store = layout.reopen_same(self.location, self.storage_options, self._manifest, *when)
        return store  # a read failing as damage (the store replaced, or removed, since) is named as REPLACED_WHEN says (_read)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a DataLoader worker started by spawn: without the Stores this process holds (the worker opens its own)."""
        return {**self.__dict__, "_store": None, "_made": None}

    def _batch(self, rows: np.ndarray, columns: dict[str, np.ndarray], check: Check) -> dict[str, Any]:
        _check_index(rows, columns[layout.INDEX], self.location)
        index = columns[layout.INDEX].tolist()
        items = data.getitems(self.dataset, index)
        inputs = [data.inputs_of(item, i) for i, item in zip(index, items)]
        batch = data.stack(inputs, index)
        self._check(rows, columns, items, inputs, batch, check)
        made = {
            "rows": torch.from_numpy(rows),
            "index": torch.from_numpy(columns[layout.INDEX]),
            "inputs": batch,
            "targets": {p: torch.from_numpy(np.ascontiguousarray(c)) for p, c in columns.items() if p.startswith("targets/")},
            "label": torch.from_numpy(columns[layout.LABEL]) if layout.LABEL in columns else None,
        }
        # check_masks: the mask's values checked here, off the step's thread (every value of a float mask compared: 0.4 ms a
        # batch at 256 x 2048), and served as bool; a mask of another form is left to the step, whose checks name it
        mask = data.bool_mask(batch, len(rows), *self.mask) if self.mask is not None else None
        return made if mask is None else {**made, "mask": mask}

    def _check(self, rows: np.ndarray, columns: dict[str, np.ndarray], items: list[Any], inputs: list[Any], batch: Any, check: Check) -> None:
        """A seeded ``check.fraction`` of the batch's rows: the input's fingerprint, and the label where the store holds
        labels, against the dataset's item now."""
        if check.fraction <= 0:
            return
        index, stored = columns[layout.INDEX], columns[layout.FINGERPRINT]
        n = len(rows)
        which = range(n) if check.fraction >= 1 else np.flatnonzero(check.rng.random(n) < check.fraction)
        if not len(which):
            return
        # Tensor items of the batch's dtype: hash rows of the collated batch (same bytes, one prefix), not item by
        # item. Items of mixed dtypes were promoted when stacked: their own bytes are hashed. Only the checked
        # items are looked at (a 5 % recheck would otherwise pay a Python pass over every item of every batch).
        same = isinstance(batch, torch.Tensor) and all(isinstance(inputs[j], torch.Tensor) and inputs[j].dtype == batch.dtype for j in which)
        fast = data.fingerprint_rows(batch, which) if same else None
        # the checked rows' stored values as Python ints, one call per column (not an int() of a numpy scalar per row and value);
        # the rows are compared one by one, in order, only where the two lists differ
        expected, at = stored[which].tolist(), index[which].tolist()
        if fast is None or fast != expected:
            for k, j in enumerate(which):
                seen = fast[k] if fast is not None else data.fingerprint(inputs[j], self.algorithm)
                if seen != expected[k]:
                    where = f"store row {int(rows[j])} (dataset index {at[k]}) of {self.location!r}"
                    batched = hasattr(self.dataset, "__getitems__")  # torch's Subset has one
                    raise self._mismatch(where, at[k], expected[k], seen, batched=batched, last=int(index[-1]),
                                         one_input=batched and _one_input(inputs, self.algorithm))
        labels = columns.get(layout.LABEL)
        if labels is None:
            return
        for k, (j, stored_label) in enumerate(zip(which, labels[which].tolist())):
            label = data.split_item(items[j], at[k])[1]
            if label is not None and label != stored_label:  # the same input, another label: ce trains on the stored one, eval scores this
                raise AlignmentError(
                    f"store row {int(rows[j])} (dataset index {at[k]}) of {self.location!r} holds label {stored_label} but the "
                    f"dataset now gives {label}: its labels changed since extraction (another class mapping?); use the dataset the "
                    "store was made from, or re-extract")

    def _check_probes(self, manifest: dict[str, Any]) -> None:
        """The inputs whose fingerprints the manifest records (the dataset's first and last) against the dataset: whatever
        the check fractions, a reversed, shifted or other dataset (or random items) is refused before anything is served."""
        for i, recorded in manifest["dataset"]["probe_fingerprints"].items():
            seen = data.item_fingerprint(self.dataset, int(i), self.algorithm)
            if seen != int(recorded, 16):
                raise self._mismatch(f"dataset index {i} (its fingerprint is in the manifest) of {self.location!r}", int(i),
                                     int(recorded, 16), seen, batched=False)

    def _mismatch(self, where: str, index: int, stored: int, seen: int, batched: bool, last: int | None = None,
                  one_input: bool = False) -> AlignmentError:
        """The error for an input whose fingerprint is not the stored one, naming the cause: an item that is another input at
        each read (random augmentation), items that are one buffer refilled by each read (``last``: the index read last in
        the input's batch; ``one_input``: a batched read gave one input in every place, as torch's ``Subset`` reading such
        items does), a batched ``__getitems__`` (``batched``: the input came from one) that served another item in its
        place, or a dataset that changed since extraction. Item ``index`` is read alone a few times."""
        alone = data.reread(self.dataset, index, self.algorithm)
        said = f"{where} has input fingerprint {stored:016x} but the dataset now gives {seen:016x}"
        if (not batched or one_input) and last not in (None, index) and set(alone) == {stored} and data.item_fingerprint(self.dataset, last, self.algorithm) == seen:
            return AlignmentError(f"{said}: {data.reused_buffer(index, last)}")
        reads = alone if batched else [seen, *alone]  # a batch's read counts only if it was one of dataset[index]
        if len(set(reads)) > 1:
            fix = "and extract again if the store was made from random items"
            return AlignmentError(f"{said}: {data.not_deterministic(index, reads, fix)}")
        if batched and set(alone) == {stored}:
            return AlignmentError(f"{said}, yet dataset[{index}] gives the stored input: the dataset's __getitems__ served another item "
                                  "in its place; make it return one item per index, in the order asked")
        return AlignmentError(f"{said}: the dataset changed since extraction (order, content or preprocessing); use the dataset "
                              "the store was made from, or re-extract")


def _part(rows: np.ndarray, pieces: list[Piece], lo: int, hi: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows ``lo:hi`` of a buffer read (``TransferSet._read``), a batch: views of the one piece that holds them."""
    start, end, columns = next(piece for piece in pieces if piece.lo <= lo < piece.hi)
    if hi > end:  # a batch is whole in one piece (_streams' and _pieces' bounds are both batch_size apart from 0): never
        raise AssertionError(f"rows {lo}-{hi - 1} of a buffer span its pieces {start}-{end - 1} and after")  # cut short
    return rows[lo:hi], {p: c[lo - start : hi - start] for p, c in columns.items()}


def _check_index(rows: np.ndarray, index: np.ndarray, location: str) -> None:
    """A batch's store ``rows`` must hold dataset ``index`` ``rows`` (FORMAT.md §4: ``index[r] == r``): a damaged index of a
    store without digests (which would otherwise catch it) is named as such, not paired with another sample (``-1`` read
    as the dataset's last item) or called a changed dataset by the fingerprint check."""
    if not np.array_equal(index, rows):
        j = int(np.flatnonzero(index != rows)[0])
        raise DamagedShardError(f"{location!r} is damaged: store row {int(rows[j])} holds dataset index {int(index[j])} in samples/index, "
                                f"where a store's row r holds index r (FORMAT.md §4); run kdcache verify {location}, and re-extract "
                                "or copy the store again from its source")


def _check_paths(paths: Any) -> None:
    """Refuse ``paths`` that is not a list of targets' names or array paths (one string, None)."""
    if isinstance(paths, str):  # one target, not a list of them: each character would be read as a target's name
        raise PipelineError(f"paths is the string {paths!r}, not a list of targets' names or array paths; pass [{paths!r}]")
    if not hasattr(paths, "__iter__"):  # None: "every target"? a TypeError deep inside said nothing
        raise PipelineError(f"paths must be a list of targets' names or array paths, got {short(paths)}; pass e.g. ['logits'] "
                            "(or [] for inputs and labels alone)")


def _check_options(*, batch_size: Any, fingerprint_check: Any, fingerprint_recheck: Any, memory_budget_mb: Any,
                   buffer_shards: Any, streams: Any, stream: Any, seed: Any) -> None:
    """Refuse a ``TransferSet`` option of the wrong type or out of its range, naming it, the value seen and what fits."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise PipelineError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for name, value in (("fingerprint_check", fingerprint_check), ("fingerprint_recheck", fingerprint_recheck)):
        if not _number(value) or not 0 <= value <= 1:  # above 1 was every row, below 0 or NaN none: a typo passed as a check
            raise PipelineError(f"{name} is a fraction of rows, from 0 to 1, got {short(value)}; use e.g. 1.0 (every row) or 0.05")
    if not _number(memory_budget_mb) or not memory_budget_mb >= 0:  # a negative budget (or NaN) streamed without a word
        raise PipelineError(f"memory_budget_mb must be a number of MiB >= 0, got {short(memory_budget_mb)}; use e.g. 2048 (the "
                            "default: targets that fit are read into RAM), or 0 to stream them")
    for name, value in (("buffer_shards", buffer_shards), ("streams", streams)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:  # 0 or less was taken as 1
            raise PipelineError(f"{name} must be an integer >= 1, got {short(value)}")
    if stream is not None and (isinstance(stream, bool) or not isinstance(stream, int | np.integer) or not 0 <= stream < streams):
        raise PipelineError(f"stream must be None (every stream) or a stream from 0 to {streams - 1}, got {short(stream)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise PipelineError(f"seed must be an integer >= 0, got {short(seed)}; the order of every epoch is drawn from it")


def _open_for(location: str | layout.Store, dataset: Dataset, storage_options: dict[str, Any] | None) -> tuple[layout.Store, str]:
    """The store at ``location`` (or the one handed, found still there) and its fingerprint algorithm, refused unless
    ``dataset`` has as many samples as it has rows."""
    if isinstance(location, layout.Store):  # opened by the caller (train's setup), whose checks were of it: not another put there since
        store, location = location, location.location
        store.check_in_place("between its first opening and this reader's", "first opened")
    else:
        store = layout.open_store(location, storage_options=storage_options)
    algorithm = data.check_algorithm(store.manifest, location)
    n = data.check_dataset(dataset, "dataset", "is")  # an IterableDataset was "object of type ... has no len()", a dict "1 samples"
    if n != store.num_samples:  # rows would be paired with the wrong items, or with none
        made = store.manifest["dataset"]
        raise StoreError(f"the dataset has {n} samples but {location!r} has {store.num_samples} (extracted from "
                         f"{made.get('factory')}({made.get('split')!r})); use the dataset the store was made from")
    return store, algorithm


def _rows_of_shards(store: layout.Store, shards: np.ndarray) -> int:
    """The rows the ``shards`` (ascending, distinct) hold: ``rows_per_shard`` each, the store's last its own."""
    if not len(shards):
        return 0
    lo, hi = store.shard_rows(int(shards[-1]))
    return (len(shards) - 1) * store.rows_per_shard + hi - lo


def _read_whole(store: layout.Store, paths: list[str], shards: np.ndarray, row_bytes: int, budget_mb: float, location: str,
                checkpoint_bytes: int = 0) -> dict[str, np.ndarray]:
    """Every array of ``paths`` over the ``shards`` (ascending: those holding the rows served, ``TransferSet.groups``), their
    rows back to back, read once (DataLoader workers inherit them), once the machine is found to have room for them
    (``location``: the store's, as the user named it). Each column is one ``Store.read_shards``, its shards decoded into
    the one array kept: a ``train.subset`` of a few shards' rows reads those shards only, and holds them once. From object
    storage or http every column's call is made at once (``Store.read_columns``)."""
    _check_ram(row_bytes * _rows_of_shards(store, shards), budget_mb, location, checkpoint_bytes)
    return store.read_columns(paths, shards.tolist())


def _one_input(inputs: list[Any], algorithm: str) -> bool:
    """Whether a batch's items (more than one) are all one input: items that are one buffer refilled by each read, read
    in a batch, hold the last item read in every place, whether read one by one or by a ``__getitems__`` that reads them
    so (torch's ``Subset``). Looked at only when a fingerprint differed."""
    return len(inputs) > 1 and len({data.fingerprint(x, algorithm) for x in inputs}) == 1


PREFETCH = 2  # batches made ahead of the consumer
# Batches of a buffer that may still be held once the buffer after it is served: those made ahead, and those handed on:
# the step's, with the one the loop takes next; a DataLoader worker's, up to its prefetch_factor (2) until they are
# copied to shared memory. Streaming gathers each of a buffer's last TAIL batches into arrays of its own (``_pieces``).
TAIL = PREFETCH + 2
# how the streaming reader names a store replaced (or removed) under it: when, and when its manifest was the one it read
REPLACED_WHEN = ("while this reader used it", "the reader was made")


# What training's targets may take of the memory the process may use: in RAM, or in streaming's buffers (at most; reading
# a buffer also holds its shards as decoded, one array a column, until the shuffled copy is made, for a moment). The
# student, its optimizer, the dataset, the batches made ahead (streaming's, of a buffer before the one served, are counted
# with the buffers: TransferSet.footprint), other processes and the page cache need the rest. Half
# keeps a run that passes clear of the OOM killer, which gives no message.
MEMORY_SHARE = 0.5


def taken_in_turn(totals: list[int], n: int) -> tuple[list[int], int]:
    """Readers of ``totals[w]`` batches each, served in turn (0, 1, ..., k-1, 0, ...; one that has run out is passed
    over, as a DataLoader passes over a worker whose iterator ended): how many of each are among the first ``n``,
    and whose turn comes next (passed over too if it has run out)."""
    lo, hi = 0, max(totals, default=0)  # the most whole rounds r with sum(min(t, r)) <= n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(t, mid) for t in totals) <= n else (lo, mid - 1)
    taken, following = [min(t, lo) for t in totals], 0
    rest = n - sum(taken)
    for w, t in enumerate(totals):  # the next round's first readers
        if rest > 0 and t > lo:
            taken[w], rest, following = taken[w] + 1, rest - 1, (w + 1) % len(totals)
    return taken, following


def _number(value: Any) -> bool:
    """A real number (an int, float or numpy scalar), not a bool or a string."""
    return not isinstance(value, bool | np.bool_) and isinstance(value, int | float | np.integer | np.floating)


def _check_ram(nbytes: int, budget_mb: float, location: str, checkpoint_bytes: int = 0) -> None:
    """Refuse targets that fit ``memory_budget_mb`` but not ``MEMORY_SHARE`` of the memory this process may use (with
    ``checkpoint_bytes``, a background checkpoint's copy: ``TransferSet``), before they are read: the read would be killed
    (a budget set for a larger machine, or a container's limit), or the run later. Under torchrun every rank on the
    machine reads its own copy."""
    limit, copies = memory_limit(), local_ranks()
    if limit is not None and nbytes * copies + checkpoint_bytes > MEMORY_SHARE * limit:
        ranks = f" in each of {copies} ranks on this machine" if copies > 1 else ""
        raise PipelineError(f"the targets of {location!r} take {_binary_size(nbytes)} in RAM{ranks}{_with_checkpoint(checkpoint_bytes)}, "
                            f"under train.memory_budget_mb = "
                            f"{budget_mb:g} but more than half of the {_binary_size(limit)} of memory this process may use; lower "
                            f"train.memory_budget_mb below {nbytes / 2**20:.4g} to stream them (whole shards, a few at a time)")


def _with_checkpoint(nbytes: int) -> str:
    """The part of a memory refusal that names a background checkpoint's copy (``TransferSet``'s ``checkpoint_bytes``)."""
    return (f", and each checkpoint's write holds a host copy of {_binary_size(nbytes)} (the student, "
            "its heads and the optimizer's state)") if nbytes else ""


def local_ranks() -> int:
    """How many of torchrun's ranks run on this machine (``LOCAL_WORLD_SIZE``), each reading its own targets; 1 outside it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else 1


def _checked_rows(rows: Any, store: layout.Store) -> np.ndarray:
    """``rows`` as int64 store rows, else an error naming the first that is not one: a row of a shard not done (in RAM its
    fill values, index 0 and zero targets, were served with dataset item 0's input, or called a changed dataset), one
    outside the store (a traceback, or in RAM a negative row read from the end), or a number that is not an integer."""
    given = np.asarray(rows)
    if given.ndim == 1 and given.size == 0:
        return np.zeros(0, dtype=np.int64)
    if given.ndim != 1 or given.dtype.kind not in "iu":  # a float would be cut to another row, a boolean mask read as rows 0 and 1
        raise PipelineError(f"rows must be a 1-D sequence of integer store rows, got {short(rows)}; e.g. np.array([0, 5, 9])")
    outside = np.flatnonzero((given < 0) | (given >= store.num_samples))
    if len(outside):
        raise PipelineError(f"rows must be store rows from 0 to {store.num_samples - 1} of {store.location!r}, got {int(given[outside[0]])}")
    out = given.astype(np.int64)
    done = store.done_snapshot()  # the markers the rows' reads are checked against: read once for both
    undone = np.flatnonzero(~done[out // store.rows_per_shard])
    if len(undone):
        row = int(out[undone[0]])
        shard = row // store.rows_per_shard
        lo, hi = store.shard_rows(shard)
        raise StoreError(f"rows include row {row} of shard {shard} (rows {lo}-{hi - 1}), which is not done: {store.location!r} is "
                         f"incomplete ({int(done.sum())}/{store.num_shards} shards done) and a shard not done holds no targets; pass rows "
                         "of done shards only (kdcache.cache.done_rows(store)), or finish the store with kdcache extract")
    return out


def _target_arrays(store: layout.Store, target: str) -> list[str]:
    """The array paths of a stored target named by its name (``"logits"``, a layer's) or its path (``"targets/logits"``):
    its own, and a top-k target's classes (``targets/logits_indices``)."""
    targets = store.targets
    found = targets.get(target) or next((t for t in targets.values() if t.path == target), None)  # a name first
    if found is not None:
        return list(found.arrays)
    raise StoreError(f"{store.location!r} stores no target {target!r}; name one of its targets: {', '.join(map(repr, targets))}")


def _binary_size(n: float) -> str:
    """``n`` bytes in words: ``"2 KiB"``, ``"4.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} TiB"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def memory_limit() -> int | None:
    """The memory this process may use, in bytes: the machine's physical memory, or its cgroup's limit where that is
    lower (a container's: the kernel kills a process past it as at the machine's); None where the OS does not say
    (training's memory check is then skipped). A function, looked up at each call: tests give another machine's figure."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = cgroup_memory_limit(Path("/proc/self/cgroup").read_text(), Path("/sys/fs/cgroup"))
    except OSError:  # no /proc (not Linux) or an unreadable one
        limit = None
    return min(total, limit) if total > 0 and limit else (total if total > 0 else None)


def cgroup_memory_limit(membership: str, root: Path) -> int | None:
    """The memory limit of the cgroup named in ``membership`` (the text of ``/proc/self/cgroup``) under the cgroup
    filesystem ``root``: v2 ``memory.max`` (line ``0::PATH``) or v1 ``memory/…/memory.limit_in_bytes`` (line
    ``N:memory:PATH``), the lowest of its own folder's and its ancestors' below the mount (the kernel enforces every
    ancestor's limit: a Slurm job's or a Kubernetes pod's, above the task's or container's own cgroup, which often
    says ``max``) or, in a container whose cgroup is mounted as the root, the root's. None: no limit (``max``, or
    v1's 2**63 rounded to pages), or none found."""
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "":
            top, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            top, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        own = top / path.lstrip("/")
        folders = [own, *[f for f in own.parents if top in f.parents]] if own != top and own.is_dir() else [top]
        limits, found = [], False
        for folder in folders:
            try:
                text = (folder / name).read_text().strip()
            except OSError:
                continue
            found = True
            if text.isdigit() and 0 < int(text) < 2**62:
                limits.append(int(text))
        if found:  # "max" or v1's unlimited in every folder: no limit
            return min(limits) if limits else None
    return None


class Footprint(NamedTuple):
    """What streaming holds at once at most (``TransferSet.footprint``): ``buffers`` buffers of ``shards`` whole shards of
    ``rows`` rows of ``row_bytes`` bytes (the arrays read, decoded), ``per_reader`` of them in each of ``readers`` readers,
    and ``batches`` batches of up to ``batch_rows`` rows left of the buffers before (``TAIL`` in a reader that has them)."""

    buffers: int
    shards: int
    rows: int
    row_bytes: int
    per_reader: int
    readers: int
    batches: int = 0
    batch_rows: int = 0

    @property
    def nbytes(self) -> int:
        return (self.buffers * self.shards * self.rows + self.batches * self.batch_rows) * self.row_bytes


class Piece(NamedTuple):
    """Rows ``lo:hi`` of a buffer (``TransferSet._read``), whole batches: each needed column's rows, arrays of their own."""

    lo: int
    hi: int
    columns: dict[str, np.ndarray]


class Check(NamedTuple):
    """One epoch's fingerprint check: the fraction of rows, and the seeded generator that picks them."""

    fraction: float
    rng: np.random.Generator


class ShardGroups(NamedTuple):
    """Rows grouped by shard, made once per reader so that an epoch's plan never sorts every row:
    ``shards`` are the shards the rows touch (ascending), shard ``shards[g]``'s rows are
    ``rows[order[bounds[g]:bounds[g + 1]]]`` in the rows' own order (``order`` None: ``rows`` is
    already grouped by ascending shard, as ``done_rows`` and a sorted subset are; no copy is made)."""

    rows: np.ndarray
    order: np.ndarray | None
    shards: np.ndarray
    bounds: np.ndarray

    @staticmethod
    def of(rows: np.ndarray, rows_per_shard: int) -> ShardGroups:
        shard = rows // rows_per_shard
        order = None if bool(np.all(shard[1:] >= shard[:-1])) else np.argsort(shard, kind="stable")
        grouped = shard if order is None else shard[order]
        starts = np.flatnonzero(np.diff(grouped, prepend=-1)) if len(rows) else np.zeros(0, dtype=np.int64)
        return ShardGroups(rows, order, grouped[starts], np.append(starts, len(rows)))

    def rows_of(self, groups: np.ndarray) -> np.ndarray:
        """The rows of the shards ``self.shards[groups]`` together, in the rows' own order."""
        spans = [slice(self.bounds[g], self.bounds[g + 1]) for g in np.sort(groups)]
        if self.order is None:  # ascending groups of grouped rows: already in the rows' own order
            return np.concatenate([self.rows[span] for span in spans]) if spans else self.rows[:0]
        return self.rows[np.sort(np.concatenate([self.order[span] for span in spans]))] if spans else self.rows[:0]


def done_rows(store: layout.Store, shards: np.ndarray | None = None) -> np.ndarray:
    """Every row of every completed shard (or of ``shards``, ascending shard numbers), ascending."""
    parts = [np.arange(*store.shard_rows(int(s))) for s in (np.flatnonzero(store.done_snapshot()) if shards is None else shards)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
