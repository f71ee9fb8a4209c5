"""Mutation testing of the alignment and resume code: does the suite catch the bugs kdcache most fears?

Each mutant is one small, plausible slip (an off-by-one in row or shard arithmetic, a check dropped, ``<`` for ``<=``,
another row's values, a resume one step early or late) in ``kdcache/``. This script applies one mutant at a time,
runs the test files chosen for it (``-x``: the first failure kills it), writes the file back as it was, and prints
a Markdown table: KILLED (by which test), SURVIVED, or TIMEOUT. The table of Session 36 is in benchmarks/RESULTS.md.

Run from the repository root (78 mutants; the first 48 about 11 minutes on 2 cores; ``IDS`` such as ``C12 T5`` run only those)::

    PYTHONPATH=. python tests/mutate_alignment.py [IDS ...]

``opening`` runs the mutants of the remote opening and the snapshots (``R1``-``R30``, session 44: the root's bytes read
once, every array's ``zarr.json`` in one wave, ``read_columns``, ``done_snapshot`` / ``digests_snapshot``; their table is
in benchmarks/RESULTS.md too)::

    PYTHONPATH=. python tests/mutate_alignment.py opening

Not collected by pytest (no ``test_`` prefix). It refuses to start where ``kdcache/`` has uncommitted changes (a run
cut short leaves its mutant in place: ``git checkout -- kdcache/`` undoes it), so that every mutant starts from HEAD.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # per mutant; a mutant that hangs the tests counts as caught (TIMEOUT), but is named so

# the test files each kind of mutant is run against (the suite as a whole would take hours per mutant)
READ = ["tests/test_cache.py", "tests/test_alignment.py"]
STORE = ["tests/test_format.py", "tests/test_fast_paths.py", "tests/test_cache.py", "tests/test_verify.py"]
EXTRACT = ["tests/test_extract.py", "tests/test_format.py"]
RESUME = ["tests/test_train.py", "-k", "resum"]


class Mutant(NamedTuple):
    id: str
    file: str  # under kdcache/
    old: str  # must occur exactly once in the file
    new: str
    what: str
    tests: list[str]


MUTANTS = [
    # -- cache.TransferSet: which rows are read, and where in what was read each row is ------------------------------
    Mutant("C1", "cache.py", "np.searchsorted(self.groups.shards, rows // self.rows_per_shard) * self.rows_per_shard",
           "np.searchsorted(self.groups.shards, rows // self.rows_per_shard, side=\"right\") * self.rows_per_shard",
           "in RAM, `held`: searchsorted side='right' (each row's place one shard later)", READ),
    Mutant("C2", "cache.py", "held = np.searchsorted(self.groups.shards, rows // self.rows_per_shard) * self.rows_per_shard + rows % self.rows_per_shard",
           "held = rows", "in RAM, `held = rows` (as if every shard of the store were held)", READ),
    Mutant("C3", "cache.py", "offsets = np.concatenate([[0], np.cumsum(spans[:, 1] - spans[:, 0])])",
           "offsets = np.cumsum(spans[:, 1] - spans[:, 0])", "streaming `_read`: offsets without their leading 0", READ),
    Mutant("C4", "cache.py", "position = offsets[local] + rows - spans[local, 0]",
           "position = local * self.rows_per_shard + rows - spans[local, 0]",
           "streaming `_read`: position by rows_per_shard, not the shards' own lengths", READ),
    Mutant("C5", "store.py", "places = ((int(s), out[end - (hi - lo) : end]) for s, (lo, hi), end in zip(shards, spans, ends))",
           "places = ((int(s), out[end - self.rows_per_shard : end]) for s, (lo, hi), end in zip(shards, spans, ends))",
           "`read_shards`: each shard's place taken as rows_per_shard long (the store's short last shard)", READ),
    Mutant("C6", "store.py", "places = ((int(s), out[end - (hi - lo) : end]) for s, (lo, hi), end in zip(shards, spans, ends))",
           "places = ((int(s), out[end - (hi - lo) : end]) for s, (lo, hi), end in zip(sorted(shards), spans, ends))",
           "`read_shards`: shards put in ascending order, not the order asked for", READ + STORE[:2]),
    Mutant("C7", "cache.py", "order = None if bool(np.all(shard[1:] >= shard[:-1])) else np.argsort(shard, kind=\"stable\")",
           "order = None", "`ShardGroups.of`: rows taken as grouped by shard without looking (unsorted `rows`)", READ),
    Mutant("C8", "cache.py", "spans = [slice(self.bounds[g], self.bounds[g + 1]) for g in np.sort(groups)]",
           "spans = [slice(self.bounds[g], self.bounds[g + 1]) for g in groups]",
           "`ShardGroups.rows_of`: a buffer's shards in draw order, not ascending", READ),
    Mutant("C9", "cache.py", "            if i % k != me:\n                continue",
           "            if (i + 1) % k != me:\n                continue",
           "DataLoader workers: worker w takes buffers w-1, w-1+k, ... (`[1::k]` for `[0::k]`)", READ),
    Mutant("C10", "cache.py", "taken[w], rest, following = taken[w] + 1, rest - 1, (w + 1) % len(totals)",
           "taken[w], rest, following = taken[w] + 1, rest - 1, w",
           "`taken_in_turn`: the next turn is the last served reader's, not the one after", READ),
    Mutant("C11", "cache.py", "me = (following + me) % k", "me = (following - me) % k",
           "a resumed epoch's workers: turns rotated the wrong way", READ),
    Mutant("C12", "cache.py", "if left and left >= counts[i]:", "if left and left > counts[i]:",
           "a resumed epoch: a buffer whose batches were all served is read again (`>` for `>=`)", READ),
    Mutant("C13", "cache.py", "steps = range(skip + me, max(len(s) for s in streams), k)",
           "steps = range(me, max(len(s) for s in streams), k)", "streams: a resumed epoch's skipped steps served again", READ),
    Mutant("C14", "cache.py", "        _check_index(rows, columns[layout.INDEX], self.location)\n", "",
           "`_batch`: `_check_index` dropped", READ),
    Mutant("C15", "cache.py", "\"index\": torch.from_numpy(columns[layout.INDEX]),", "\"index\": torch.from_numpy(rows),",
           "`_batch`: the batch's index taken from its rows, not the store's index column", READ),
    Mutant("C16", "cache.py", "which = range(n) if check.fraction >= 1 else", "which = range(n - 1) if check.fraction >= 1 else",
           "fingerprint check: the last row of each batch left out", READ),
    Mutant("C17", "cache.py", "(self.first_skipped and self.epoch == first + 1)", "(self.first_skipped and self.epoch == first)",
           "a resumed first epoch: the next epoch checked at the recheck fraction", READ),
    Mutant("C18", "cache.py", "undone = np.flatnonzero(~done[out // store.rows_per_shard])",
           "undone = np.flatnonzero(~done[np.minimum(out // store.num_shards, store.num_shards - 1)])",
           "`_checked_rows`: a row's shard by num_shards, not rows_per_shard", READ),
    Mutant("C19", "cache.py", "for s in (np.flatnonzero(store.done_snapshot()) if shards is None else shards)]",
           "for s in (np.arange(store.num_shards) if shards is None else shards)]",
           "`done_rows`: every shard taken as done", READ),
    Mutant("C20", "cache.py", "expected, at = stored[which].tolist(), index[which].tolist()",
           "expected, at = stored[: len(which)].tolist(), index[which].tolist()",
           "fingerprint check: stored fingerprint of the k-th row, not of the k-th checked row", READ),
    Mutant("C21", "cache.py", "out[i % self.streams].append((i, lo, min(lo + self.batch_size, size)))",
           "out[(i + 1) % self.streams].append((i, lo, min(lo + self.batch_size, size)))",
           "streams (torchrun ranks): buffer i to stream i+1 (`[1::K]` for `[0::K]`)", READ),
    Mutant("C22", "cache.py", "if n != store.num_samples:  # rows would be paired", "if n < store.num_samples:  # rows would be paired",
           "a dataset longer than the store accepted (`<` for `!=`)", READ),
    # -- store: shard arithmetic, done markers, digests ----------------------------------------------------------------
    Mutant("S1", "store.py", "return start, min(start + self.rows_per_shard, self.num_samples)",
           "return start, min(start + self.rows_per_shard, self.num_samples - 1)", "`shard_rows`: the last row left out", STORE),
    Mutant("S2", "store.py", "shards = range(start // self.rows_per_shard, -(-stop // self.rows_per_shard))\n        self._take_snapshot()\n        undone",
           "shards = range(start // self.rows_per_shard, stop // self.rows_per_shard)\n        self._take_snapshot()\n        undone",
           "`read`: the shards read by floor(stop / rows_per_shard): a last, partly read shard not checked as done", STORE),
    Mutant("S3", "store.py", "        if self._done[shard]:\n            self._read_checked(", "        if True:\n            self._read_checked(",
           "`read_shards`: a shard not done read as if it were", STORE),
    Mutant("S4", "store.py", "return rows[:, 0] == 1", "return rows[:, 0] <= 1", "done markers: `<= 1` (every marker read as done)", STORE),
    Mutant("S5", "store.py", "if rows is None or (rows > 1).any():", "if rows is None or (rows >= 1).any():",
           "done markers: `>= 1` for `> 1` (zarr reads every marker where one is done)", ["tests/test_scale.py", "-k", "done"]),
    Mutant("S6", "store.py", "whole = self._done[shard] and start <= lo and hi <= stop",
           "whole = self._done[shard] and start < lo and hi <= stop", "digests: a read from a shard's first row not checked (`<`)", STORE),
    Mutant("S7", "store.py", "digest = value(path.encode() + int(shard).to_bytes(8, \"little\"))", "digest = value(path.encode())",
           "digest: the shard number left out (a row of digests fits any shard of the array)", STORE),
    Mutant("S8", "store.py", "        digests, objects = {}, {}\n        try:\n",
           "        digests, objects = {}, {}\n        if not _write_uncompressed_chunk(self.array(DONE), (shard,), np.ones(1, dtype=bool)):\n"
           "            self.array(DONE)[shard] = True\n        try:\n",
           "`write_shard`: the done marker written before the columns", ["tests/test_reliability.py", "tests/test_extract.py"]),
    Mutant("S9", "store.py", "            done[list(lost)] = False\n", "",
           "`resume_pending`: shards whose objects are gone stay done in the pending list", EXTRACT + ["tests/test_verify.py"]),
    Mutant("S10", "store.py", "digests[path] = shard_digest(path, shard, pieces, crcs)", "digests[path] = shard_digest(path, start, pieces, crcs)",
           "`write_shard`: the digest bound to the shard's first row, not its number", STORE),
    # -- extract: which shards are written, and what goes in them ------------------------------------------------------
    Mutant("E1", "extract.py", "pending = store.resume_pending()  # done shards whose objects are missing too",
           "pending = [int(s) for s in np.flatnonzero(~store.done())]", "extract resumes the shards not done only (objects gone ignored)", EXTRACT),
    Mutant("E2", "extract.py", "shard = int(rows[0]) // self.store.rows_per_shard", "shard = int(rows[-1]) // self.store.rows_per_shard",
           "`ShardWriter`: a batch's shard by its last row", EXTRACT),
    Mutant("E3", "extract.py", "pieces = sorted(pieces, key=lambda entry: entry[0])", "pieces = list(pieces)",
           "`_joined`: a shard's batches joined in the order they came, not by row", EXTRACT),
    Mutant("E4", "extract.py", "index, stored = store.array(layout.INDEX)[start:stop], store.array(layout.FINGERPRINT)[start:stop]",
           "index, stored = store.array(layout.INDEX)[start:stop], store.array(layout.FINGERPRINT)[start + 1 : stop + 1]",
           "resume's `check_done_rows`: fingerprints one row further on than their indices", EXTRACT),
    Mutant("E5", "extract.py", "for shard in np.sort(rng.choice(done, size=min(len(done), RESUMED_SHARDS), replace=False)):",
           "for shard in np.sort(rng.choice(done, size=min(len(done), RESUMED_SHARDS), replace=False))[1:]:",
           "resume's `check_done_rows`: the first shard drawn not checked", EXTRACT),
    Mutant("E6", "data.py", "start, stop = s * self.rows, min((s + 1) * self.rows, self.n)",
           "start, stop = s * self.rows, min((s + 1) * self.rows, self.n - 1)", "`ShardBatches`: the dataset's last row never extracted", EXTRACT),
    Mutant("E7", "teacher.py", "return values.gather(-1, order), classes.gather(-1, order).to(torch.int32)",
           "return values.gather(-1, order), classes.to(torch.int32)", "`top_k`: values sorted, their classes not", ["tests/test_topk.py"]),
    Mutant("E8", "teacher.py", "return values.gather(-1, order), classes.gather(-1, order).to(torch.int32)",
           "return values.gather(-1, order), classes.gather(-1, order).roll(1, 0).to(torch.int32)",
           "`top_k`: each row's values with the previous row's classes", ["tests/test_topk.py"]),
    Mutant("E9", "distributed.py", "extract_shards(run, pipeline, store, pending[rank::world], Progress(0, \"\", enabled=False))",
           "extract_shards(run, pipeline, store, pending[rank + 1::world], Progress(0, \"\", enabled=False))",
           "torchrun extract: rank r writes pending[r+1::K]", ["tests/test_distributed.py", "-k", "torchrun_store_equals"]),
    # -- train: where a resumed run starts, and what it trains on ------------------------------------------------------
    Mutant("T1", "train.py", "transfer.set_epoch(state[\"epoch\"], skip=state[\"batch\"])", "transfer.set_epoch(state[\"epoch\"])",
           "resume: the epoch's batches trained before are served again", RESUME),
    Mutant("T2", "train.py", "    _set_rng_state(ckpt[\"rng\"])\n", "", "resume: the RNG state not restored", RESUME),
    Mutant("T3", "train.py", "                rng = _rng_state()  # before the next epoch's loader draws its seed: what a resume restores\n"
           "                if state[\"step\"] < loop.total_steps:  # streaming, its first buffer is read while this epoch is saved\n"
           "                    try:  # one started ahead stays in following until it is batches: a Ctrl-C waiting for it, the finally stops it\n"
           "                        batches = following[0].result() if following else _start_epoch(transfer, loader, state)\n"
           "                    except Exception as e:  # noqa: BLE001 - any: raised as it was, once the epoch is saved (_kept)\n"
           "                        failed = e\n"
           "                    following.clear()\n",
           "                if state[\"step\"] < loop.total_steps:  # streaming, its first buffer is read while this epoch is saved\n"
           "                    try:  # one started ahead stays in following until it is batches: a Ctrl-C waiting for it, the finally stops it\n"
           "                        batches = following[0].result() if following else _start_epoch(transfer, loader, state)\n"
           "                    except Exception as e:  # noqa: BLE001 - any: raised as it was, once the epoch is saved (_kept)\n"
           "                        failed = e\n"
           "                    following.clear()\n"
           "                rng = _rng_state()  # before the next epoch's loader draws its seed: what a resume restores\n",
           "the RNG state saved after the next epoch's loader started", RESUME),
    Mutant("T4", "train.py", "if checkpoint is not None and \"shards\" in checkpoint:", "if False:",
           "resume: trains on the shards done now, not the run's own", RESUME),
    Mutant("T5", "train.py", "return line[\"epoch\"] >= state[\"epoch\"] and not here", "return line[\"epoch\"] > state[\"epoch\"] and not here",
           "resume: metrics line of the epoch trained again is kept (`>` for `>=`)", RESUME),
    Mutant("T6", "train.py", "return np.sort(np.random.default_rng(seed).permutation(rows)[:subset])",
           "return np.random.default_rng(seed).permutation(rows)[:subset]", "`train.subset`'s rows left unsorted",
           RESUME[:1] + ["-k", "subset"]),
    Mutant("T7", "train.py", "state = state[rank if len(state) == world else 0]", "state = state[0]",
           "torchrun resume: every rank restored with rank 0's RNG state",
           ["tests/test_distributed.py", "-k", "torchrun and (sigterm or resume)"]),
]


# -- session 44: the remote opening and the snapshots of session 43 (storage._s3_root, _root_read, open_existing's bytes,
# store._open_group, _node, _check_groups' one wave, read_columns, done_snapshot / digests_snapshot) ------------------
OPENING_TESTS = ("http_store_is_read_only or streamed_over_http or failing_one_object or cut_short or reads_its or read_its "
                 "or reads_each or at_once or private_parsers or one_get or only_the_first_look or "
                 "http_no_store or digest_object or extract_info_verify_train or percent_encoding or replaced or opened_zip or "
                 "root_zarr_json or written_before_digests")
REMOTE = ["tests/test_remote.py", "-k", OPENING_TESTS]


def remote_and(*files: str) -> list[str]:
    """REMOTE and the whole of ``files``."""
    return ["tests/test_remote.py", *files, "-k", f"({OPENING_TESTS}) or not test_remote"]


REPLACED = ["tests/test_alignment.py", "tests/test_cache.py", "tests/test_verify.py", "-k", "replaced"]
SNAPSHOT = ["tests/test_verify.py", "tests/test_interop.py", "tests/test_remote.py", "-k", "verify or export or pack or once or snapshot"]

OPENING = [
    Mutant("R1", "storage.py", "return (True, raw) if isinstance(raw, bytes) else (raw, None)",
           "return (True, None) if isinstance(raw, bytes) else (raw, None)",
           "`_first_look`: the first look's root bytes dropped (zarr reads the root again: the fallback taken always)", REMOTE),
    Mutant("R2", "storage.py", "return (None, None) if buf is None else (opened, buf.to_bytes())",
           "return (None, None) if buf is None else (opened, None)",
           "`_root_read`: a later opening's root bytes dropped (zarr reads the root again)", REMOTE),
    Mutant("R3", "storage.py", "    except Exception:  # noqa: BLE001 - what the look says of it (an unreachable endpoint: named there)\n"
           "        return _root_store(location, storage_options), None",
           "    except Exception:  # noqa: BLE001 - what the look says of it (an unreachable endpoint: named there)\n"
           "        return None, None",
           "`_root_read`: a root read that fails (5xx, a dropped connection) taken as no store there (its fallback never taken)",
           remote_and("tests/test_store_edges.py")),
    Mutant("R4", "storage.py", "        if answered:\n            return True", "        if answered:\n            return False",
           "`_s3_root`: a first look whose body was cut part way taken as no store there", REMOTE),
    Mutant("R5", "storage.py", "return await read_body(length, read, MAX_METADATA_BYTES, refuse)",
           "return await read_body(length, read, MAX_METADATA_BYTES - 1, refuse)",
           "`_s3_root`: the root's size cap one byte short (a zarr.json of exactly MAX_METADATA_BYTES refused)", REMOTE),
    Mutant("R6", "store.py", "    target, root = open_existing(location, storage_options, read_only=mode == \"r\")\n",
           "    target, root = open_existing(location, storage_options, read_only=mode == \"r\")\n"
           "    root = open_store.__dict__.setdefault(\"roots\", {}).setdefault(location, root) if root is not None else root\n",
           "`open_store`: the root bytes kept across openings of a location (a store replaced since is parsed from the old root)",
           ["tests/test_remote.py", "tests/test_alignment.py", "tests/test_cache.py", "-k", f"({OPENING_TESTS}) or replaced"]),
    Mutant("R7", "store.py", "    if parse is None or made is None:\n        return zarr.open_group(",
           "    if True:\n        return zarr.open_group(", "`_open_group`: the opening's root bytes never parsed (zarr reads them again)", REMOTE),
    Mutant("R8", "store.py", "            raise zarr.errors.GroupNotFoundError(f\"No group found in store {target!r} at path {at.path!r}\") from None",
           "            raise", "`_open_group`: the root parse's KeyError or FileNotFoundError (zarr's for a node_type not \"group\") raised as it "
           "came, not as open_group maps it (\"No group found\")",
           remote_and("tests/test_store_edges.py", "tests/test_received_stores.py")),
    Mutant("R9", "store.py", "for path, got in zip(arrays, found[len(keys):]):", "for path, got in zip(arrays, found[len(keys) - 1:]):",
           "`_check_groups`: each array's zarr.json bytes handed to the next path (the first gets the progress group's)", REMOTE),
    Mutant("R10", "store.py", "for path, got in zip(arrays, found[len(keys):]):",
           "for path, got in zip([*arrays[1::-1], *arrays[2:]], found[len(keys):]):",
           "`_check_groups`: samples/index's and samples/fingerprint's metadata bytes swapped (same shape, int64 / uint64)", REMOTE),
    Mutant("R11", "store.py", "            if isinstance(got, BaseException):  # its opening reads it again, and says what is wrong\n"
           "                if not isinstance(got, Exception):\n                    raise got\n                continue",
           "            if isinstance(got, BaseException):  # its opening reads it again, and says what is wrong\n                raise got",
           "`_check_groups`: an array's zarr.json read that fails raised at the opening, as it came (not left to its opening)", REMOTE),
    Mutant("R12", "store.py", "                if not isinstance(got, Exception):\n                    raise got\n                continue",
           "                if not isinstance(got, Exception):\n                    raise got\n                if path == DIGEST:\n"
           "                    self._digested = False\n                continue",
           "`_check_groups`: a digest zarr.json read that fails (5xx) taken as a store without digests", REMOTE),
    Mutant("R13", "store.py", "                self._digested = got is not None", "                self._digested = True",
           "`_check_groups`: a remote store without progress/digest (kdcache < 0.1.1) taken as having digests",
           remote_and("tests/test_received_stores.py")),
    Mutant("R14", "store.py", "if got is not None and len(got) <= HANDED_METADATA_BYTES:", "if got is not None and len(got) < HANDED_METADATA_BYTES:",
           "`_check_groups`: the size cap of the bytes handed to array() off by one (equivalent: a zarr.json within the cap is "
           "parsed from the bytes, one past it read again by zarr, the same node either way; one request more for a zarr.json "
           "of exactly 65,536 bytes alone)", REMOTE),
    Mutant("R15", "store.py", "        self.replaced_when = (\"since kdcache.open_store opened it\", \"it was opened\")\n        self._check_groups()\n",
           "        self.replaced_when = (\"since kdcache.open_store opened it\", \"it was opened\")\n        self._check_groups()\n"
           "        self._metadata = {}\n",
           "`Store.__init__`: the metadata bytes the opening read dropped (`_metadata` made after `_check_groups`)", REMOTE),
    Mutant("R16", "store.py", "        raw = self._metadata.pop(path, None)\n", "        raw = self._metadata.get(path)\n",
           "`_node`: an array's metadata bytes kept once parsed (equivalent for what is read: array() keeps the node it parsed, "
           "so kept bytes are parsed again only after array() refused them, and they are that array's own; a Store held while "
           "its damaged zarr.json is repaired would refuse it again, never read rows by other metadata)", REMOTE),
    Mutant("R17", "store.py", "        if parse is None:\n            return self.group[path]", "        if True:\n            return self.group[path]",
           "`_node`: the bytes read at opening never parsed (zarr reads each array's metadata again)", REMOTE),
    Mutant("R18", "store.py", "                    done, self._markers = (self._markers if kept else self.done()), None\n"
           "                    self._digests = None if self.writable else self.digests()\n",
           "                    self._digests = None if self.writable else self.digests()\n"
           "                    done, self._markers = (self._markers if kept else self.done()), None\n",
           "`_take_snapshot`: the digest rows read before the done markers (a shard finished between them has no digest in it)",
           ["tests/test_remote.py", "tests/test_verify.py", "tests/test_cache.py", "-k", "snapshot or once or digest or writer"]),
    Mutant("R19", "store.py", "kept = self._markers is not None and not again and not self.writable",
           "kept = self._markers is not None and not self.writable",
           "`_take_snapshot`: a snapshot taken again (`again`) keeps done_snapshot's markers (equivalent: `again` follows a "
           "snapshot taken, which set `_markers` to None, and done_snapshot sets it only before the first: kept is False "
           "whenever `again` is True)", SNAPSHOT),
    Mutant("R20", "store.py", "        if self.writable:\n            return self.done()\n        with self._snapshot:",
           "        with self._snapshot:", "`done_snapshot`: a writable store's markers read once (a writer's own shards since not seen)",
           ["tests/test_extract.py", "tests/test_train.py", "tests/test_interop.py", "tests/test_store_edges.py", "-k",
            "resum or import or partial or snapshot"]),
    Mutant("R21", "store.py", "        self._take_snapshot()\n        return self._digests\n",
           "        return self.digests() if self._done is None else self._digests\n",
           "`digests_snapshot`: before any read, the digests read alone (not with the markers the reads take after)", SNAPSHOT),
    Mutant("R22", "store.py", "return {p: r.result() for p, r in zip(paths, reads)}", "return {p: r.result() for p, r in zip(sorted(paths), reads)}",
           "`read_columns`: the columns paired with the paths in sorted order, not the order asked for",
           ["tests/test_cache.py", "tests/test_alignment.py", "tests/test_remote.py", "-k", "memory or stream or at_once"]),
    Mutant("R23", "store.py", "reads = threads.ahead(\"read\", REMOTE_READS, read, [(p, list(shards)) for p in paths], window)",
           "reads = threads.ahead(\"read\", REMOTE_READS, read, [(p, sorted(shards)) for p in paths], window)",
           "`read_columns`: each column's shards read in ascending order, not the order asked for",
           ["tests/test_cache.py", "tests/test_fast_paths.py", "tests/test_remote.py", "-k", "memory or stream or read_shards or columns or at_once"]),
    Mutant("R24", "store.py", "        read = functools.partial(self.read_shards, replaced_when=replaced_when)\n",
           "        read = self.read_shards\n", "`read_columns`: the reader's words for a replaced store not passed on", REPLACED),
    Mutant("R25", "store.py", "raw = _zip_member_now(self.location, \"zarr.json\") if self._kind == \"zip\" else self._get(\"zarr.json\")",
           "raw = _zip_member_now(self.location, \"zarr.json\") if self._kind == \"zip\" else json.dumps({\"attributes\": {ATTRS: self.manifest}}, default=str).encode()",
           "`_manifest_now`: the opening's manifest reused for the in-place check (the `replaced` check skipped)", REPLACED),
    Mutant("R26", "verify.py", "        store.done_snapshot()\n    except DamagedStoreError", "        pass\n    except DamagedStoreError",
           "verify: the done markers not read by the open check (an unreadable marker array found later, not as `open`)", ["tests/test_verify.py"]),
    Mutant("R27", "verify.py", "            store.digests_snapshot()  # the rows the reads below check against (one object a shard, read once)\n", "",
           "verify's layout check: the digest rows not read (a damaged digest array not found there)", ["tests/test_verify.py"]),
    Mutant("R28", "interop.py", "reads = store.read_ahead([(path, shard) for path in store.paths() for shard in range(store.num_shards)])",
           "reads = store.read_ahead([(path, shard) for shard in range(store.num_shards) for path in store.paths()])",
           "export: the arrays' shards read shard by shard, written array by array (rows of one array put in another)",
           ["tests/test_interop.py"]),
    Mutant("R29", "interop.py", "                ds[:] = store.done_snapshot() if path == layout.DONE else store.digests_snapshot()",
           "                ds[:] = store.done() if path == layout.DONE else store.digests()",
           "export: the markers and digests copied read anew, not the ones the reads checked rows against", SNAPSHOT),
    Mutant("R30", "cache.py", "            store.check_in_place(*when)  # one small read", "            pass  # one small read",
           "a reader handed the caller's Store: the in-place check skipped (the Store's opening bytes reused as they are)", REPLACED),
]
MUTANTS = MUTANTS + OPENING


def dirty() -> bool:
    return bool(subprocess.run(["git", "status", "--porcelain", "kdcache/"], cwd=ROOT, capture_output=True, text=True).stdout.strip())


def run_one(m: Mutant) -> tuple[str, str, float]:
    """Apply ``m``, run its tests, put the file back: where it was made (``kdcache/FILE:LINE``), the outcome as the table
    says it, and the seconds taken."""
    path = ROOT / "kdcache" / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        return f"kdcache/{m.file}", f"NOT APPLIED (its text occurs {text.count(m.old)} times: the code changed; update the mutant)", 0.0
    line = text.count("\n", 0, text.index(m.old)) + 1  # where the mutated text begins
    where = f"kdcache/{m.file}:{line}"
    start = time.monotonic()
    path.write_text(text.replace(m.old, m.new))
    try:
        done = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                              cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return where, f"TIMEOUT after {TIMEOUT_S} s", time.monotonic() - start
    finally:
        path.write_text(text)
    seconds = time.monotonic() - start
    if done.returncode == 0:
        return where, "SURVIVED", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    return where, (f"KILLED by {failed[0]}" if failed else f"KILLED (pytest exit {done.returncode})"), seconds


def main(ids: list[str]) -> None:
    if dirty():
        sys.exit("kdcache/ has uncommitted changes (a mutant left by a run cut short?); `git checkout -- kdcache/` first")
    ids = [i for name in ids for i in ([m.id for m in OPENING] if name == "opening" else [name])]
    unknown = sorted(set(ids) - {m.id for m in MUTANTS})
    if unknown:
        sys.exit(f"no mutant {', '.join(unknown)}; the ids are {', '.join(m.id for m in MUTANTS)}")
    chosen = [m for m in MUTANTS if not ids or m.id in ids]
    print("| id | mutation | where | outcome | seconds |\n|---|---|---|---|---|", flush=True)
    for m in chosen:
        where, outcome, seconds = run_one(m)
        print(f"| {m.id} | {m.what} | {where} | {outcome} | {seconds:.0f} |", flush=True)
    if dirty():
        sys.exit("kdcache/ was not restored: `git checkout -- kdcache/`")


if __name__ == "__main__":
    main(sys.argv[1:])
