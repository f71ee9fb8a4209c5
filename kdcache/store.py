"""The store: the only module that knows the on-disk layout (specified in docs/FORMAT.md); where a store lives is
``storage``'s, who may write it ``locking``'s.

One zarr v3 group. Sample axis first in every array; row ``r`` of every array describes the
same sample. Rows are grouped into shards of ``rows_per_shard`` rows; every array is sharded on
that same row grid, so a shard is written whole, by one writer, and only then marked done in
``progress/done``. Everything about the store is JSON under the root attribute ``kdcache``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import difflib
import errno
import functools
import importlib
import json
import math
import os
import re
import stat
import sys
import threading
import time
import zipfile
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, NamedTuple, Sequence
from urllib.parse import quote, unquote

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from kdcache import threads
from kdcache.errors import DamagedShardError, DamagedStoreError, KdcacheError, PipelineError, StoreError, StoreMismatchError, StoreReplacedError, UnreachableError, count, one_line, option, short, write_fix
from kdcache.locking import Borrowed, Lease, LocalBorrowed, active_writer, held_lease
from kdcache.storage import MAX_METADATA_BYTES, REMOTE_READS, exists, filesystem, http_problem, http_url, local_path, location_arg, location_kind, LocalObjects, object_to_write, open_existing, open_zip, read_local_object, unreachable_error, write_file, zarr_store

FORMAT = "kdcache-store"
FORMAT_VERSION = 1
TOPK_FORMAT_VERSION = 2  # a store with a top-k logits target (FORMAT.md §2, §5.1): version-1 readers refuse it
FORMAT_VERSIONS = (FORMAT_VERSION, TOPK_FORMAT_VERSION)  # what this kdcache reads
ATTRS = "kdcache"  # root attribute holding the manifest

INDEX = "samples/index"  # [N] int64: dataset index of row r
FINGERPRINT = "samples/fingerprint"  # [N] uint64: the input's fingerprint as the teacher saw it (manifest fingerprint.algorithm)
LABEL = "samples/label"  # [N] int64: the dataset's label, when it has one
LOGITS = "targets/logits"  # [N, ...] the model's output; with targets.topk = K, its K largest values per position, descending
LOGITS_INDICES = "targets/logits_indices"  # [N, ..., K] int32: the class of each top-k value (only with targets.topk)
LAYERS = "targets/layers/"  # + encoded module name: [N, ...] a hooked module's output
DONE = "progress/done"  # [num_shards] bool, chunk 1: shard s fully written
DIGEST = "progress/digest"  # [num_shards, data arrays] uint32, chunk 1 shard: shard_digest of each array's rows
# Those arrays, and all of kdcache's nodes (the root "", its groups and arrays), as patterns of their paths: any other
# zarr node in a store's folder (a user's group put there, an array another tool added, §14) is not the store's
ARRAY_PATHS = "|".join([*map(re.escape, (INDEX, FINGERPRINT, LABEL, LOGITS, LOGITS_INDICES, DONE, DIGEST)), re.escape(LAYERS) + "[^/]+"])
NODE_PATHS = re.compile("|".join(["", "samples", "targets", re.escape(LAYERS.rstrip("/")), "progress", ARRAY_PATHS]))
# The progress arrays' objects (one a shard) asked for at once from an object store or http(s) server (Store._remote_rows):
# zarr's async.concurrency (10) was the limit, with s3fs's pool of 10 connections (storage.S3_POOL raises it): 200 shards
# at 200 ms a GET (moto behind a proxy), 4.3 s at 10 at once, 1.6 s at 64
PROGRESS_READS_AT_ONCE = {"url": 64, "http": 10}

MAX_SHARD_ROWS = 16384
ENCODE_THREADS = min(8, threads.CORES)  # per process, shared by every shard being written
MIN_SHARD_ROWS = 16
MAX_SHARDS = 2**24  # a store of more shards is refused (16,777,216: 2.7e11 rows at MAX_SHARD_ROWS)
# A manifest declaring more targets is refused (FORMAT.md §8, a reader's limit), as a writer's is before it writes: every
# command opens each target's array (its zarr.json, one read each), so a received manifest of 20,000 targets held verify
# for 3 minutes (9 ms a target on 2 busy cores; 300,000 fit in a 60 MB zarr.json). A teacher hooked at every layer has hundreds.
MAX_TARGETS = 4096
# A shard's rows of every data array together, decoded, hold at most this (FORMAT.md §3.1): the writer holds shards
# whole until written, and a whole-shard read makes a buffer of one array's shard; a received store declaring more is
# refused as damaged before any such buffer is made.
MAX_SHARD_BYTES = 4 * 2**30

# What zarr raises on metadata that parses as JSON but not as zarr metadata: ``[]`` as a zarr.json gives a
# TypeError, ``"x"`` an AttributeError, a missing field a KeyError or ValueError (zarr's MetadataValidationError), an
# inner chunk of 0 rows a ZeroDivisionError (zarr's sharding codec validates the shard grid by it).
# Store.digest_problem of a done shard without a digest row: its digest object lost (extract redoes such a shard itself)
NO_DIGEST = ("has no digest in progress/digest although the store records them (its digest object is missing: an incomplete copy, "
             "or a writer that does not know digests resumed the store)")
# the opening's reads (Store._check_groups) hand each array's zarr.json they read to array() up to this size (kdcache's:
# ~1 KB); a larger one (a received store's) is not held by the Store until then: zarr reads it again
HANDED_METADATA_BYTES = 64 * 2**10
BAD_METADATA = (ValueError, TypeError, AttributeError, KeyError, RecursionError, ArithmeticError)


def layer_path(name: str) -> str:
    """Array path of a hooked layer's target: the name percent-encoded into one safe node name.

    Every character outside ``[A-Za-z0-9._-]`` is encoded as ``%XX`` per UTF-8 byte (so ``/``
    cannot make a sub-path; ``~``, which ``quote`` keeps, is encoded too), a name that would start
    with ``_`` has every ``_`` encoded (``__`` prefixes are reserved by zarr), and names made only
    of dots (``.``, ``..``) are encoded whole. ``layer_name`` inverts it exactly.
    """
    if not name:
        raise StoreError("a layer name must not be empty; use targets.logits for the model's own output")
    encoded = quote(name, safe="-.").replace("~", "%7E")
    encoded = encoded.replace("_", "%5F") if encoded.startswith("_") else encoded
    if set(encoded) == {"."}:
        encoded = encoded.replace(".", "%2E")
    return LAYERS + encoded


def layer_name(path: str) -> str:
    assert path.startswith(LAYERS), path
    return unquote(path[len(LAYERS):])


@dataclass(frozen=True)
class Target:
    """One stored teacher output: ``shape`` excludes the sample axis."""

    name: str  # "logits" or the module name
    path: str
    shape: tuple[int, ...]
    dtype: str
    source: str  # "" for the model's output, else the module name
    select: str  # which part of a structured output was kept ("tensor", "0", "logits", ...)
    mask: str = ""  # targets.mask, where the select's mean/last steps pooled by it ("": none did; not written then)
    topk: int = 0  # targets.topk: the logits keep their K largest values per position, with their classes (0: all of them)
    classes: int = 0  # with topk: the full class count of the teacher's logits (the student's)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        for key in ("mask", "topk", "classes"):
            if not d[key]:  # a store without one reads as before, and is resumed by a run without one
                del d[key]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Target:
        return Target(d["name"], d["path"], tuple(d["shape"]), d["dtype"], d["source"], d["select"], d.get("mask", ""),
                      d.get("topk", 0), d.get("classes", 0))

    @property
    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The data arrays holding this target, by path: per-sample shape and dtype (a top-k target's classes too)."""
        own = {self.path: (self.shape, self.dtype)}
        return own | ({LOGITS_INDICES: (self.shape, "int32")} if self.topk else {})

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The per-sample shape of the teacher's output this target holds: a top-k target's with every class."""
        return (*self.shape[:-1], self.classes) if self.topk else self.shape

    @property
    def row_bytes(self) -> int:
        """Bytes of one sample's rows of this target's arrays."""
        return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in self.arrays.values())


def plan_geometry(
    num_samples: int,
    bytes_per_sample: dict[str, int],
    *,
    shard_mb: float = 64.0,
    chunk_mb: float = 1.0,
    rows_per_shard: int = 0,
) -> dict[str, Any]:
    """Choose shard and chunk rows from bytes per sample (all powers of two).

    A shard holds about ``shard_mb`` MiB over all arrays (16..16384 rows) and is the unit of
    writing and resume; an array's inner chunk holds about ``chunk_mb`` MiB and divides the shard,
    so whole-chunk reads never straddle shards.
    """
    total = max(1, sum(bytes_per_sample.values()))
    if rows_per_shard <= 0:
        rows = _pow2_floor(shard_mb * 2**20 / total)
        rows = max(MIN_SHARD_ROWS, min(MAX_SHARD_ROWS, rows, _pow2_ceil(num_samples)))
    else:
        rows = rows_per_shard
    chunks = {
        path: max(1, min(rows, _pow2_floor(chunk_mb * 2**20 / max(1, nbytes)))) for path, nbytes in bytes_per_sample.items()
    }
    if rows_per_shard > 0:  # a chunk must divide the shard
        chunks = {path: math.gcd(rows, c) for path, c in chunks.items()}
    shards = max(1, math.ceil(num_samples / rows))
    if shards > MAX_SHARDS:
        raise PipelineError(f"extract.rows_per_shard = {rows} makes {shards:,} shards of {num_samples:,} samples, more than a store may "
                            f"have ({MAX_SHARDS:,}); raise extract.rows_per_shard, or set it to 0 to let kdcache choose")
    return {"rows_per_shard": rows, "num_shards": shards, "chunk_rows": chunks}


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def _pow2_ceil(x: float) -> int:
    return 1 << max(0, int(math.ceil(math.log2(max(1.0, x)))))


class Store:
    """An open store: its manifest, its arrays, and shard bookkeeping.

    Opened read-only by ``open_store`` or for writing by ``create_or_resume``.
    """

    def __init__(self, group: zarr.Group, location: str, writable: bool, storage_options: dict[str, Any] | None = None):
        self.group = group
        self.location = location
        self.writable = writable
        self.storage_options = dict(storage_options or {})  # reopening elsewhere (a DataLoader worker) needs them
        # the S3 writer lock each write is checked against: this process's (Lease), or the job's holder's (Borrowed)
        self.lease: Lease | Borrowed | LocalBorrowed | None = held_lease(location, self.storage_options) if writable else None
        self._temps: dict[Path, dict[Any, list[Path]]] = {}  # _remove_stale_temps: folder -> its temp files
        # verify's (a dict): done() takes a damaged done marker as not done and names it here (shard -> "'progress/done/c/1'
        # (holds b'zz')"), instead of refusing the store
        self.damaged_markers: dict[int, str] | None = None
        attrs = dict(group.attrs)
        manifest = attrs.get(ATTRS)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            # a store being created: its manifest is written last. Opened for writing, the lock is our own (taken by
            # writer_lock before create_or_resume): that is not another writer.
            writer = None if writable else active_writer(location, self.storage_options)
            if writer is not None:
                raise StoreError(f"{location!r} is being created by {writer} (its manifest is not written yet); try again in a moment")
            if ATTRS not in attrs:
                inside = _inside_a_store(location)
                if inside is not None:
                    raise inside
                if _interrupted_creation(location, self.storage_options):  # kdcache's own empty nodes (looked at on error only)
                    # an import stopped so leaves the same: the command to rerun is the one that was stopped, either
                    raise StoreError(f"{location!r} is an empty zarr group, as an extract stopped while it created the store leaves "
                                     f"it, or an import (no {ATTRS!r} root attribute, no data); rerun that extract or import, which "
                                     "creates it again")
                why = f"no {ATTRS!r} root attribute"
            elif not isinstance(manifest, dict):
                why = f"its {ATTRS!r} root attribute holds {short(manifest)}, not a JSON object"
            else:
                why = f"its {ATTRS!r} root attribute has format {short(manifest.get('format'))}, not {FORMAT!r}"
            # a manifest that is no JSON object is damage (verify's open check); no manifest, or another format's, is another group
            error = DamagedStoreError if ATTRS in attrs and not isinstance(manifest, dict) else StoreError
            raise error(f"{location!r} is a zarr group but not a kdcache store ({why}); pass a store written by kdcache extract")
        version = manifest.get("format_version")
        if type(version) is not int:  # exactly the JSON integer: true and 1.0 compare equal to 1 in Python
            raise _bad_manifest(location, "format_version", version, f"the integer {FORMAT_VERSION} or {TOPK_FORMAT_VERSION}")
        if version not in FORMAT_VERSIONS:
            raise StoreError(
                f"{location!r} has store format version {version!r}; this kdcache reads version {FORMAT_VERSION} or {TOPK_FORMAT_VERSION}: "
                "upgrade kdcache or re-extract the store"
            )
        check_manifest(manifest, location)
        self.manifest: dict[str, Any] = manifest
        # what every read looks up, made once: the manifest's targets and data arrays do not change while a store is open
        self._targets = {name: Target.from_dict(d) for name, d in manifest["targets"].items()}
        self._paths = (*self.sample_paths(), *(path for t in self._targets.values() for path in t.arrays))
        self._kind = location_kind(location)
        self._arrays: dict[str, zarr.Array] = {}
        self._done: np.ndarray | None = None  # read() of a read-only store: done() read once
        self._markers: np.ndarray | None = None  # done() read by done_snapshot() before any read: the snapshot's, when taken
        self._digests: np.ndarray | None = None  # and digests() after it (a shard's digest is written before its marker)
        self._digested: bool | None = None  # whether the store has progress/digest (stores written before it have none)
        self._metadata: dict[str, bytes] = {}  # array path -> its zarr.json as the opening read it, until array() parses it
        self._digest_columns: dict[str, int] | None = None
        self._snapshot = threading.Lock()  # read(): the done markers and digests are loaded together
        self._layout_checked: set[str] = set()  # checked_array: arrays whose shape and dtype match the manifest
        self._same_at: float | None = None  # _replaced_named: when the store at the location was last found this one
        # how a replacement found by a read is said (check_not_replaced): when it was replaced, and when the store was opened
        self.replaced_when = ("since kdcache.open_store opened it", "it was opened")
        self._check_groups()

    def _check_groups(self) -> None:
        """Refuse damaged metadata of the groups FORMAT.md §3 lists (``samples``, ``targets``, ``progress`` and,
        with a layer target, ``targets/layers``; the root's zarr parsed): each must be a zarr v3 group's
        ``zarr.json``. One small read per group, all at once.

        At an http(s) or object-store location every array's ``zarr.json`` (the manifest's data arrays, ``progress/done``,
        ``progress/digest``) is read in the same wave, its bytes kept for ``array()`` to parse (``_node``) and, for
        ``progress/digest``, for ``has_digests`` to answer from: zarr read each when it was first opened, one round trip
        after another (6 to 7 waited in turn by every command, 100-300 ms each to a bucket across the world). An array's
        read that fails is left to its opening (zarr reads it then, and names what is wrong as before). Local folders and
        zips, a ``zip::`` chain's too (its members are read from the zip's bytes), are read as before: each array's
        metadata when it is opened."""
        import asyncio

        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        groups = ["samples", "targets", "progress"]
        if any(t.path.startswith(LAYERS) for t in self.targets.values()):
            groups.insert(2, LAYERS.rstrip("/"))
        keys = [f"{g}/zarr.json" for g in groups]
        arrays = [*self._paths, DONE, DIGEST] if self._kind in ("url", "http") and "::" not in self.location else []
        store = self.group.store

        async def every() -> list[Any]:
            return list(await asyncio.gather(*(store.get(k, prototype=default_buffer_prototype()) for k in keys),
                                             *(store.get(f"{a}/zarr.json", prototype=default_buffer_prototype()) for a in arrays),
                                             return_exceptions=True))

        found = sync(every())
        for e in found[:len(keys)]:
            if not isinstance(e, BaseException):
                continue
            if isinstance(e, zipfile.BadZipFile):
                raise _corrupted_member(self.location, str(e)) from None
            if isinstance(e, Exception) and _on_the_way(e):
                raise self._unreachable("the groups' zarr.json", e) from None
            raise e
        for path, got in zip(arrays, found[len(keys):]):
            if isinstance(got, BaseException):  # its opening reads it again, and says what is wrong
                if not isinstance(got, Exception):
                    raise got
                continue
            if path == DIGEST:  # has_digests: a missing key is a store from before digests
                self._digested = got is not None
            if got is not None and len(got) <= HANDED_METADATA_BYTES:
                self._metadata[path] = got.to_bytes()
        for key, buf in zip(keys, found):
            if buf is None:
                why = "it is missing"
            else:
                try:
                    meta = json.loads(buf.to_bytes())
                except (ValueError, RecursionError) as e:
                    meta, why = None, f"not JSON: {str(e)[:200]}"
                else:
                    if not isinstance(meta, dict):
                        why = f"it holds {short(meta)}, not a JSON object"
                    elif type(meta.get("zarr_format")) is not int or meta["zarr_format"] != 3 or meta.get("node_type") != "group":
                        why = f"zarr_format {short(meta.get('zarr_format'))}, node_type {short(meta.get('node_type'))}"
                    else:
                        continue
            raise DamagedStoreError(f"{self.location!r} is damaged: {key!r} is not zarr v3 group metadata ({why}); write "
                             '{"zarr_format": 3, "node_type": "group", "attributes": {}} to it, or re-extract the store')

    # -- layout -----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def rows_per_shard(self) -> int:
        return int(self.manifest["geometry"]["rows_per_shard"])

    @property
    def num_shards(self) -> int:
        return int(self.manifest["geometry"]["num_shards"])

    @property
    def targets(self) -> dict[str, Target]:
        return dict(self._targets)

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest["has_labels"])

    def sample_paths(self) -> list[str]:
        return [INDEX, FINGERPRINT] + ([LABEL] if self.has_labels else [])

    def paths(self) -> list[str]:
        return list(self._paths)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.num_samples)

    def array(self, path: str) -> zarr.Array:
        """The zarr array at ``path``: a data array (``paths()``), ``progress/done`` or ``progress/digest``."""
        if not isinstance(path, str) or path not in self._arrays:
            if not isinstance(path, str) or path not in (DONE, DIGEST) and path not in self.paths():  # else "missing" (damaged)
                raise StoreError(f"{short(path)} is not an array of {self.location!r}; open one of "
                                 f"{', '.join(map(repr, [*self.paths(), DONE, DIGEST]))} (a target's array is store.targets[name].path)")
            try:
                with _CONFIG_LOCK, zarr.config.set({"array.write_empty_chunks": True, "codecs.zstd": _BOUNDED_ZSTD}):
                    # opened by another thread while this one waited (stats' blocks, at once): its metadata read once
                    node = self._arrays[path] if path in self._arrays else self._node(path)
            except StoreError:
                raise
            except (KeyError, FileNotFoundError):
                not_v3 = self._not_v3(path)
                if not_v3:
                    raise self._bad_metadata(path, not_v3) from None
                raise DamagedStoreError(f"{self.location!r} is missing the array {path!r} its manifest lists (deleted, or an incomplete copy); "
                                 f"kdcache verify {self.location} lists what is damaged; re-extract or copy the store again") from None
            except BAD_METADATA as e:
                why = _metadata_problem(self.group.store, f"{path}/zarr.json", e)
                raise self._bad_metadata(path, why) from None
            except zipfile.BadZipFile as e:
                raise _corrupted_member(self.location, str(e)) from None
            except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
                if _on_the_way(e):
                    raise self._unreachable(f"{path}/zarr.json", e) from None
                raise
            if not isinstance(node, zarr.Array):
                raise self._bad_metadata(path, "it describes a group, not an array")
            other = _other_codec(node.metadata.codecs) or _other_key_encoding(node.metadata.chunk_key_encoding)
            if other is not None:
                raise self._bad_metadata(path, other)
            bounds = getattr(self.group.store, "object_bounds", None)  # a folder's, a remote store's: an object larger is refused
            if bounds is not None:
                bounds[path] = _object_bound(node)
            self._arrays[path] = node
        return self._arrays[path]

    def _node(self, path: str) -> zarr.Array | zarr.Group:
        """``self.group[path]``; from the bytes of its ``zarr.json`` that the opening (``_check_groups``) or ``has_digests``
        read where they are kept (parsed as zarr parses what it reads, with the same errors), not read a second time."""
        raw = self._metadata.pop(path, None)
        parse = _zarr_private("zarr.core.group", "_build_metadata_v3", "_build_node", "_parse_async_node") if raw is not None else None
        if parse is None:
            return self.group[path]
        build_metadata, build_node, parse_node = parse
        return parse_node(build_node(store=self.group.store, path=path, metadata=build_metadata(json.loads(raw))))

    def _not_v3(self, path: str) -> str | None:
        """Why zarr found no array at ``path`` although its ``zarr.json`` is there (its ``zarr_format`` is not 3: zarr then
        looks for another format's metadata, and finds none); None where it is not there."""
        raw = self.raw_object(f"{path}/zarr.json", at_most=MAX_METADATA_BYTES)
        if raw is None:
            return None
        with contextlib.suppress(ValueError, AttributeError):
            found = json.loads(raw).get("zarr_format")
            if found != 3:
                return f"its zarr_format is {short(found)}, not 3"
        return "zarr reads no array from it"

    def _bad_metadata(self, path: str, why: str) -> StoreError:
        error = DamagedStoreError(f"{self.location!r} is damaged: {path + '/zarr.json'!r} is not valid zarr metadata ({why}); "
                           f"run kdcache verify {self.location}, or re-extract the store")
        error.metadata_problem = (path, why)  # type: ignore[attr-defined] - verify's words for it, without "run kdcache verify"
        return error

    def checked_array(self, path: str) -> zarr.Array:
        """``array(path)`` once its shape and dtype are found to be the manifest's (a damaged or edited zarr.json
        would make readers index past its end or read the wrong bytes). Checked here, on reading, not in
        ``array()``: kdcache verify's layout check opens the arrays and reports such a mismatch itself."""
        array = self.array(path)
        if path not in self._layout_checked:
            shape, dtype = self.expected(path)
            if tuple(array.shape) != shape or str(array.dtype) != dtype:
                raise self._bad_metadata(path, f"it says {list(array.shape)} {array.dtype}, the manifest says {list(shape)} {dtype}")
            grid = array.shards or array.chunks  # an inner chunk is within its shard: zarr decodes one whole to read any of it
            if math.prod(grid) * array.dtype.itemsize > MAX_SHARD_BYTES:
                raise self._bad_metadata(path, f"its shards of {list(grid)} {array.dtype} hold {math.prod(grid) * array.dtype.itemsize / 2**30:.4g} "
                                               f"GiB each, more than the {MAX_SHARD_BYTES // 2**30} GiB a shard may hold decoded, FORMAT.md §3.1")
            self._layout_checked.add(path)
        return array

    def expected(self, path: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype the manifest gives the data array at ``path``."""
        n = self.num_samples
        arrays = {p: a for t in self.targets.values() for p, a in t.arrays.items()}
        if path in arrays:
            return (n, *arrays[path][0]), arrays[path][1]
        return (n,), "uint64" if path == FINGERPRINT else "int64"

    # -- progress ---------------------------------------------------------------------------
    def done(self, shards: list[int] | None = None) -> np.ndarray:
        """``[num_shards]`` bool: which shards are completely written. A damaged marker is a StoreError naming it.
        ``shards``: only their markers are read (one object each), ``[len(shards)]`` bool in their order."""
        array = self.array(DONE)
        if tuple(array.shape) != (self.num_shards,) or array.dtype != np.dtype(bool) or tuple(array.chunks) != (1,):
            # chunks: one marker object per shard (FORMAT.md §3.1); a chunk of 2**32 was "done marker (unreadable)", whose
            # fix (delete the marker) could not help
            chunks = "" if tuple(array.chunks) == (1,) else f" in chunks of {list(array.chunks)}"
            raise self._bad_metadata(DONE, f"it says {list(array.shape)} {array.dtype}{chunks}, expected [{self.num_shards}] bool"
                                           f"{' in chunks of [1]: one marker object per shard' if chunks else ''}")
        done = self._straight_markers(array, shards)
        if done is not None:
            return done
        try:
            done = np.asarray(array[:] if shards is None else array.get_orthogonal_selection(np.asarray(shards, dtype=np.intp)))
        except Exception as e:  # noqa: BLE001 - a marker that does not decode; named below
            if _on_the_way(e):
                raise self._unreadable(DONE, 0, self.num_shards, e) from None
            done = None
        if done is None or (done.view(np.uint8) > 1).any():  # a one-byte marker other than 0/1 decodes, as garbage
            done, bad, corrupted = self._read_markers(shards)
            if self.damaged_markers is None or not bad + corrupted:
                raise self._damaged_markers(bad)
            self.damaged_markers.clear()
            self.damaged_markers.update((int(key.rsplit("/", 1)[1]), f"{_marker(key, raw)} is not one byte 0 or 1") for key, raw in bad)
            self.damaged_markers.update((int(key.rsplit("/", 1)[1]), problem) for key, problem in corrupted)
        return done

    def _straight_markers(self, array: zarr.Array, shards: list[int] | None) -> np.ndarray | None:
        """``done()``'s markers, each one-byte object read straight (``_progress_rows``: a folder's files, an object
        store's GETs): zarr took ~170 µs a local marker, 8.5 s at 50,000 shards, paid by every command opening a store.
        None (zarr reads them all, and names any damage) where one is not the byte 0 or 1, or ``_progress_rows`` answers
        None."""
        numbers = range(self.num_shards) if shards is None else [int(s) for s in shards]
        if shards is not None and not all(0 <= s < self.num_shards for s in numbers):
            return None  # zarr's selection: counted from the end, or refused
        rows = self._progress_rows(array, DONE, numbers, 1)
        if rows is None or (rows > 1).any():
            return None
        return rows[:, 0] == 1

    def _progress_rows(self, array: zarr.Array, path: str, shards: Sequence[int], width: int) -> np.ndarray | None:
        """``[len(shards), width]`` uint8: the object of each of ``shards`` of the progress array ``path`` (one row each,
        FORMAT.md §7) read straight: an object store's or http(s) server's by ``_remote_rows``; a local folder's through
        ``LocalObjects`` (a link out of the store, a file that is not regular or larger than the array's objects can be
        is refused), 0 where it is missing (the fill value). None (zarr reads them, and names any damage) where one is
        not ``width`` bytes, or anything is off, or the array is not the plain one of FORMAT.md §3.1 (``_plain_progress``)."""
        if self._kind in ("url", "http"):
            return self._remote_rows(array, path, shards, width)
        if self._kind != "local" or not isinstance(array.store, zarr.storage.LocalStore) or not _plain_progress(array, path):
            return None
        bound, rows = array.store.at_most(f"{path}/c/0"), np.zeros((len(shards), width), dtype=np.uint8)
        rest = "/0" * (array.ndim - 1)  # a digest row's object: progress/digest/c/S/0
        try:
            with LocalObjects(array.store.root) as objects:
                for i, s in enumerate(shards):
                    raw = objects.read(f"{path}/c/{s}{rest}", bound)
                    if raw is not None:
                        if len(raw) != width:
                            return None
                        rows[i] = raw
        except (OSError, KdcacheError):  # a link out, a FIFO, an object too large: zarr's read names it
            return None
        return rows

    def _remote_rows(self, array: zarr.Array, path: str, shards: Sequence[int], width: int) -> np.ndarray | None:
        """``_progress_rows`` of an object store's or http(s) server's progress array: its objects asked for
        ``PROGRESS_READS_AT_ONCE[kind]`` at a time, not at zarr's ``async.concurrency`` (10, which the user's own code
        may set): one GET each, so a round trip of 20 ms was ~2 ms a shard, 100 s at 50,000 shards. None (zarr reads
        them, naming any damage or failure) where one is not ``width`` bytes or a GET fails."""
        if not _plain_progress(array, path):
            return None
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        rest, gate = "/0" * (array.ndim - 1), PROGRESS_READS_AT_ONCE[self._kind]

        async def get(key: str, slots: asyncio.Semaphore) -> bytes | None:
            async with slots:
                got = await array.store.get(key, default_buffer_prototype())
            return None if got is None else got.to_bytes()

        async def get_all() -> list[bytes | None]:
            slots = asyncio.Semaphore(gate)
            async with asyncio.TaskGroup() as group:  # a failed GET calls off those not yet answered (zarr reads them after)
                asked = [group.create_task(get(f"{path}/c/{s}{rest}", slots)) for s in shards]
            return [task.result() for task in asked]

        try:
            got = sync(get_all())
        except Exception:  # noqa: BLE001 - an object too large, a timeout, a denied GET: zarr's read names it
            return None
        if any(raw is not None and len(raw) != width for raw in got):
            return None
        rows = np.zeros((len(shards), width), dtype=np.uint8)
        for i, raw in enumerate(got):
            if raw is not None:
                rows[i] = np.frombuffer(raw, dtype=np.uint8)
        return rows

    def digest_paths(self) -> list[str]:
        """The data arrays in the order of ``progress/digest``'s columns: sorted."""
        return sorted(self.paths())

    def digest_column(self, path: str) -> int:
        """The column of ``progress/digest`` that holds the data array ``path``'s digests (its place in ``digest_paths()``),
        looked up, not found by sorting the paths again: a reader asks it for each shard of each array."""
        if self._digest_columns is None:
            self._digest_columns = {p: i for i, p in enumerate(self.digest_paths())}
        return self._digest_columns[path]

    def has_digests(self) -> bool:
        if self._digested is None:
            try:
                raw = self._get(f"{DIGEST}/zarr.json")
                self._digested = raw is not None
                if raw is not None and len(raw) <= HANDED_METADATA_BYTES and DIGEST not in self._arrays:
                    self._metadata[DIGEST] = raw  # array(DIGEST) parses these: zarr does not read them again
            except PermissionError:  # a bucket granting GetObject only answers a missing key 403: a store from before digests
                self._digested = False
            except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
                if _on_the_way(e):
                    raise self._unreachable(f"{DIGEST}/zarr.json", e) from None
                raise
        kept = (self.manifest.get("compression") or {}).get("shard_digests")
        if not self._digested and kept:  # every kdcache that writes the key makes the array: deleted, no read would check rows' places
            raise DamagedStoreError(f"{self.location!r} is damaged: {DIGEST} is missing although its manifest says the store keeps shard "
                             f"digests (compression.shard_digests = {kept!r}): an incomplete copy; copy the whole store again, or re-extract it")
        return self._digested

    def digests(self) -> np.ndarray | None:
        """``[num_shards, arrays]`` uint32: each done shard's ``shard_digest`` per data array (columns:
        ``digest_paths()``), 0 where none was recorded; None for a store written before digests existed."""
        if not self.has_digests():
            return None
        array = self.array(DIGEST)
        want = (self.num_shards, len(self.paths()))
        if tuple(array.shape) != want or array.dtype != np.dtype("uint32"):
            raise self._bad_metadata(DIGEST, f"it says {list(array.shape)} {array.dtype}, expected {list(want)} uint32")
        rows = self._progress_rows(array, DIGEST, range(self.num_shards), 4 * want[1])
        if rows is not None:  # zarr took ~300 µs a row, 2.5 s at 8,000 shards, paid by every reader
            return rows.view("<u4").astype(np.uint32, copy=False)
        try:
            return np.asarray(array[:])
        except StoreError:  # an object refused unread (storage.local_object): it names itself
            raise
        except Exception as e:  # noqa: BLE001 - a digest object that does not decode
            if _on_the_way(e):  # s3fs's OSError for a GET refused or failed (403, 5xx): was "damaged ... re-extract"
                raise self._unreadable(DIGEST, 0, self.num_shards, e) from None
            bad = self._bad_digest_rows(4 * want[1])
            if bad:  # named, with the marker whose deletion has extract redo that shard (FORMAT.md §13)
                named = ", ".join(f"{DIGEST}/c/{s}/0 (shard {s}: {size} bytes)" for s, size in bad[:3])
                named += f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                redo = (f"delete the done marker {' '.join(f'{DONE}/c/{s}' for s, _ in bad[:3])} of its shard and rerun "
                        "kdcache extract (which redoes the shard)")
                fix = redo_fix(self.location, redo, f"{redo}, or re-extract the store")
                raise DamagedStoreError(f"{self.location!r} is damaged: digest row {named} is not the {4 * want[1]} bytes of one row "
                                        f"(truncated or corrupted); {fix}") from None
            raise DamagedStoreError(f"{self.location!r} is damaged: {DIGEST} does not decode ({type(e).__name__}: {short(str(e))}); "
                             f"run kdcache verify {self.location}, or re-extract the store") from None

    def _bad_digest_rows(self, width: int) -> list[tuple[int, int]]:
        """The digest row objects (``progress/digest/c/S/0``, uncompressed, FORMAT.md §3.1) present whose size is not
        ``width`` bytes: (shard, size). Sizes are listed where the location lists them, else the objects are read."""
        keys = [f"{DIGEST}/c/{s}/0" for s in range(self.num_shards)]
        sizes = self._object_sizes(f"{DIGEST}/c", keys)
        kind = location_kind(self.location)
        listed = kind == "local" or (kind == "url" and "::" not in self.location)
        bad = []
        for s, key in enumerate(keys):
            if key not in sizes:
                continue
            size = sizes[key] if listed else len(self.raw_object(key) or b"")
            if size != width:
                bad.append((s, size))
        return bad

    def digest_problem(self, path: str, shard: int, rows: np.ndarray, parts: list[tuple[int, int]] | None = None) -> str | None:
        """What is wrong with done shard ``shard``'s ``rows`` of ``path``, read whole, by the digest its writer recorded
        (None: they match, or none was recorded): a shard object swapped with another of the array, or copied in from
        another store of the same layout, has valid checksums but other rows. ``parts``: see ``shard_digest``."""
        if self._digests is None:  # none recorded, or not loaded: read() loads them with the done markers, for readers
            return None
        if not self._digests[shard].any():  # written before the marker: a done shard without one lost its digest object
            return NO_DIGEST
        recorded = int(self._digests[shard, self.digest_column(path)])
        if recorded and shard_digest(path, shard, [rows], parts) != recorded:
            return ("holds other rows than its writer wrote there (their digest is not the one recorded in progress/digest: "
                    "a shard object swapped with another, or copied from another store)")
        return None

    def _read_markers(self, shards: list[int] | None = None) -> tuple[np.ndarray, list[tuple[str, bytes]], list[tuple[str, str]]]:
        """Each done marker's object (of ``shards``, default all) read alone: bool in their order, done where it is the
        byte 1; the damaged ones (not one byte 0 or 1) with their bytes; and, where verify reads them
        (``damaged_markers`` set), the zip members among them that fail the zip's CRC-32 or are cut short, each named
        with what is wrong (elsewhere such a member is the error naming it, as any other member is)."""
        keys = [f"{DONE}/c/{s}" for s in (range(self.num_shards) if shards is None else shards)]
        raws: list[bytes | None] = []
        corrupted = []
        for key in keys:
            try:
                raws.append(self.raw_object(key))
            except DamagedStoreError as e:
                if self.damaged_markers is None or not hasattr(e, "zip_problem"):
                    raise
                raws.append(None)
                corrupted.append((key, f"{key!r} is a corrupted zip member ({e.zip_problem})"))
        bad = [(k, raw) for k, raw in zip(keys, raws) if raw is not None and raw not in (b"\x00", b"\x01")]
        return np.array([raw == b"\x01" for raw in raws], dtype=bool), bad, corrupted

    def _damaged_markers(self, bad: list[tuple[str, bytes]]) -> StoreError:
        """The done markers that are not one byte 0 or 1, named.

        Every command refuses such a store, extract's resume too. Taking the marker as not done would be safe
        for extract (a shard is rewritten whole before its marker is set), but a marker damaged after it was
        written says the store was damaged, so more of it may be: the user should run verify first, and
        deleting the marker is a one-step way to have extract redo that shard.
        """
        named = ", ".join(_marker(key, raw) for key, raw in bad[:3])
        named += f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return DamagedStoreError(f"{self.location!r} is damaged: done marker {named or '(unreadable)'} is not one byte 0 or 1; "
                                 f"run kdcache verify {self.location} for any other damage, then {marker_fix(self.location)}")

    def done_snapshot(self) -> np.ndarray:
        """``done()`` as this reader's reads check rows against: of a store opened read-only, the markers read once (by
        the first read, or the first call of this), each marker one object; a writable store's, read anew. A reader
        choosing its rows (train, ``TransferSet``) and then reading them read every marker two to five times."""
        if self.writable:
            return self.done()
        with self._snapshot:
            if self._done is None and self._markers is None:
                self._markers = self.done()
            return self._markers if self._done is None else self._done

    def digests_snapshot(self) -> np.ndarray | None:
        """``digests()`` as this reader's reads check rows against: of a store opened read-only, read once with the done
        markers (by the first read, or the first call of this: ``done_snapshot``'s markers first, as a read takes them); a
        writable store's, read anew."""
        if self.writable:
            return self.digests()
        self._take_snapshot()
        return self._digests

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def samples_done(self, done: np.ndarray | None = None) -> int:
        done = self.done() if done is None else done
        return int(sum(self.shard_rows(int(s))[1] - self.shard_rows(int(s))[0] for s in np.flatnonzero(done)))

    def unbacked_shards(self, done: np.ndarray | None = None) -> dict[int, str]:
        """Done shards whose storage objects are not all there (deleted, an incomplete copy): shard -> what its first
        such object is, as ``"object 'targets/logits/c/1/0' is missing (…)"`` (or ``is empty``). Every data array's shard object
        is looked for, and the shard's ``progress/digest`` row where the store has digests (``missing_shard_objects``)."""
        done = self.done() if done is None else done
        lost: dict[int, str] = {}
        for _, s, key, problem in self.missing_shard_objects(self.paths() + ([DIGEST] if self.has_digests() else []),
                                                             [int(s) for s in np.flatnonzero(done)]):
            lost.setdefault(s, f"object {key!r} is {'missing (deleted, or an incomplete copy)' if problem == 'missing' else 'empty'}")
        return dict(sorted(lost.items()))

    def damaged_shards(self) -> list[str]:
        """Every (array, done shard) whose storage object is missing or empty, as ``"shard 1 of targets/logits
        (rows 16-31): object 'targets/logits/c/1/0' is missing although the shard is marked done"``; no object is read (the
        done markers: ``done_snapshot``'s)."""
        return [f"shard {s} of {path} (rows {self.shard_rows(s)[0]}-{self.shard_rows(s)[1] - 1}): object {key!r} is {problem} "
                "although the shard is marked done"
                for path, s, key, problem in self.missing_shard_objects(self.paths(), [int(s) for s in np.flatnonzero(self.done_snapshot())])]

    def missing_shard_objects(self, paths: list[str], shards: list[int]) -> list[tuple[str, int, str, str]]:
        """``(path, shard, key, "missing" or "empty")`` for each shard object of ``paths`` and ``shards`` that is not there;
        no object is read. Where the location lists its objects with their sizes (a folder, an object store) they are
        listed (``_object_sizes``: one LIST per array on S3, not a HEAD per object); a local zip's are looked up in its
        central directory (``members``); elsewhere (http, a ``zip::`` URL) all are asked for at once (``_object_problems``).
        An object store's arrays are listed at once: a listing's pages (1,000 keys each on S3) follow one another, 10 of
        them an array at 10,000 shards."""
        kind = location_kind(self.location)
        listed = kind == "local" or (kind == "url" and "::" not in self.location)
        found = []
        listings = (threads.ahead("list", LISTINGS, self._object_sizes, [(f"{path}/c", []) for path in paths], LISTINGS)
                    if listed and kind == "url" and shards else None)
        try:
            for path in paths if shards else []:
                found += self._missing_of(path, shards, listed, listings)
        finally:
            if listings is not None:
                listings.close()  # the listings not yet made are cancelled
        return found

    def _missing_of(self, path: str, shards: list[int], listed: bool, listings: Any) -> list[tuple[str, int, str, str]]:
        """``missing_shard_objects`` of the array ``path`` (``listings``: an object store's listings in the order of the
        paths, the next one this array's)."""
        keys = [self.shard_key(path, s) for s in shards]
        try:
            if listed:
                sizes = next(listings).result() if listings is not None else self._object_sizes(f"{path}/c", keys)
                problems = [None if sizes.get(key, 0) > 0 else "empty" if key in sizes else "missing" for key in keys]
            elif hasattr(self.group.store, "members"):  # a local zip: its central directory, as _object_problems asks it
                there = self.group.store.members(keys)
                problems = [None if key in there else "missing" for key in keys]
            else:
                problems = self._object_problems(keys)
        except KdcacheError:
            raise
        except Exception as e:  # noqa: BLE001 - a request refused (403), a 5xx, a lost connection: botocore/aiohttp errors
            key = next((k for k in getattr(e, "__notes__", ()) if k in keys), None)  # s3fs says "Forbidden", not which
            raise self._unreachable(f"object {key!r}" if key else f"the objects of {path} of {len(shards)} done shards", e) from None
        return [(path, s, key, problem) for s, key, problem in zip(shards, keys, problems) if problem]

    def _object_sizes(self, prefix: str, keys: list[str]) -> dict[str, int]:
        """The bytes of each of ``keys`` (all under ``prefix``, a folder of keys, e.g. ``targets/logits/c``) that exists.
        An object store's are listed, one LIST (paginated) for the prefix, not asked for one by one (a HEAD each); a
        local folder's files are stat'ed (cheaper than walking the folder: a target's shard is a nest of folders).
        Where the location lists no sizes (a chained ``zip::`` URL: read-only, never resumed) an object counts as 1 byte."""
        from zarr.core.sync import sync

        kind = location_kind(self.location)
        if kind == "local":
            root, found = local_path(self.location), {}
            for key in keys:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    info = os.stat(os.path.join(root, *key.split("/")))
                    if not stat.S_ISDIR(info.st_mode):  # a folder is no object: zarr reads it as absent (missing)
                        found[key] = info.st_size
            return found
        try:
            if kind == "url" and "::" not in self.location:
                fs, root = filesystem(self.location, self.storage_options)
                root = root.rstrip("/")
                listed = fs.find(f"{root}/{prefix}", detail=True)
                return {k[len(root) + 1 :]: int(info.get("size") or 0) for k, info in listed.items() if k.startswith(root + "/")}

            async def collect() -> list[str]:
                return [key async for key in self.group.store.list_prefix(prefix + "/")]

            return {key: 1 for key in sync(collect())}
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
            if _on_the_way(e):
                raise self._unreachable(f"the list of the objects under {prefix!r}", e) from None
            raise

    def resume_pending(self) -> list[int]:
        """The shards a writer resuming this store writes: those not done, and those marked done whose objects are not
        all there (``unbacked_shards``: deleted, an incomplete copy), which are made pending again, named in a note on
        stderr. Such a shard's marker is cleared before any of its objects is written again, so a writer stopped on the
        way leaves it pending, never done with objects of two attempts (a teacher not bit-for-bit deterministic
        writes other rows each time; the digest row is of one). Only the store's writer (holding its lock) calls this."""
        assert self.writable, "store opened read-only"
        pending, lost = self.pending_shards()
        if lost:
            if self.lease is not None:  # a paused writer whose S3 lock was taken over writes no more
                self.lease.check(self.location)
            try:
                for s in lost:
                    self._remove_stale_temps(f"{DONE}/c/{s}")
                    if not _write_uncompressed_chunk(self.array(DONE), (s,), np.zeros(1, dtype=bool)):
                        self.array(DONE)[s] = False
            except OSError as e:
                raise self._write_error("the done markers", e) from None
            _say_redone(self, lost)
        return pending

    def pending_shards(self) -> tuple[list[int], dict[int, str]]:
        """The shards ``resume_pending`` would write, found without writing (a dry run's count): those not done, and those
        marked done whose objects are not all there, which are returned too (``unbacked_shards``: shard -> what is missing)."""
        done = self.done()
        lost = self.unbacked_shards(done)
        done[list(lost)] = False
        return [int(s) for s in np.flatnonzero(~done)], lost

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray | list[np.ndarray]]) -> None:
        """Write one whole shard of every array, then mark it done (never the other way round).

        Each array's rows are one array or a list of consecutive pieces (the batches as they came:
        a local store writes their inner chunks without joining them first).
        """
        assert self.writable, "store opened read-only"
        start, stop = self.shard_rows(shard)
        missing = set(self.paths()) - set(arrays)
        assert not missing, f"shard {shard} lacks {sorted(missing)}"
        self._check_still_ours(shard)
        digests, objects = {}, {}
        try:
            for path, data in arrays.items():
                pieces = data if isinstance(data, list) else [data]
                assert sum(len(p) for p in pieces) == stop - start, (path, [len(p) for p in pieces], start, stop)
                self._remove_stale_temps(self.shard_key(path, shard))  # a shard has one writer: its temps are dead
                crcs: list[tuple[int, int]] = []  # codec none: the inner chunks' crc32c make the digest's
                remote = self._kind == "url" and (whole := _whole_shard_object(self.array(path), pieces, crcs)) is not None
                if remote:
                    objects[self.shard_key(path, shard)] = whole
                elif not _write_whole_shard(self.array(path), shard, pieces, crcs):
                    self.array(path)[start:stop] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                digests[path] = shard_digest(path, shard, pieces, crcs)
            row = np.array([[digests[p] for p in self.digest_paths()]], dtype=np.uint32) if self.has_digests() else None
            # the digest row, like the data, before the marker (FORMAT.md §7.1): on object storage PUT with the columns,
            # not one more round trip after them (only the marker says the shard is done, and it waits for every PUT)
            digest = _uncompressed_chunk(self.array(DIGEST), (shard, 0), row) if row is not None and self._kind == "url" else None
            self._put_at_once(objects | dict([digest] if digest else []))
            if row is not None and digest is None:
                self._remove_stale_temps(f"{DIGEST}/c/{shard}/0")
                if not _write_uncompressed_chunk(self.array(DIGEST), (shard, 0), row):
                    self.array(DIGEST)[shard] = row[0]
            self._check_still_ours(shard)  # again at the commit point: the shard's writing took a while
            self._remove_stale_temps(f"{DONE}/c/{shard}")
            if not _write_uncompressed_chunk(self.array(DONE), (shard,), np.ones(1, dtype=bool)):
                self.array(DONE)[shard] = True
        except OSError as e:
            raise self._write_error(f"shard {shard}", e) from None

    def _put_at_once(self, objects: dict[str, list[Any]]) -> None:
        """Store each object (key: its buffers, in order) of an object store, all PUT at once: a whole shard's columns
        and its digest row, where zarr asks for each one (a GET finding nothing) before its PUT, one after another (12
        round trips of a shard of 6 columns, and the digest row's PUT after them; now 1). Every PUT ends before the first
        failure is raised: none is still in flight once this returns, or raises."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        if not objects:
            return
        store, prototype = self.group.store, default_buffer_prototype()

        async def put() -> list[Any]:
            return await asyncio.gather(*(store.set(key, prototype.buffer.from_bytes(b"".join(parts))) for key, parts in objects.items()),
                                        return_exceptions=True)

        failed = [e for e in sync(put()) if isinstance(e, BaseException)]
        if failed:
            raise failed[0]

    def _check_still_ours(self, shard: int) -> None:
        """Before shard ``shard``'s data and again right before its done marker: the job's writer lock is still its own
        (``lease``), and the store at the location is still the one this Store opened (``_replaced``). A dask worker or
        torchrun rank writes on after its job stopped (Ctrl-C, a crash), and an ``--overwrite`` may have made another
        store there meanwhile, where a shard of the old teacher marked done would be served as the new one's targets
        (docs/CLUSTER.md). What is left is the moment between the last look and the marker's write: no object store
        swaps one object on the condition of another."""
        if self.lease is not None:  # a paused writer whose S3 lock was taken over writes no more
            self.lease.check(self.location)
        replaced = self._replaced()
        if replaced is not None:
            raise StoreError(f"{self.location!r} was replaced since this job created it ({replaced}): another job (an "
                             f"{option('--overwrite')}) made a new store there while this process wrote shard {shard}, which "
                             "is not marked done there; this job writes nothing more; rerun it once that job has ended")

    def _replaced(self) -> str | None:
        """How the store at the location is not the one this Store opened (its manifest but ``completed``, read again
        now: one small read), in words; None when it is."""
        now = self._manifest_now()
        if now is None:
            return "its manifest is gone"
        if json.dumps(identity(now), sort_keys=True, default=str) == json.dumps(identity(self.manifest), sort_keys=True, default=str):
            return None  # compared as JSON: this Store's manifest may hold the tuples its writer put there
        if now.get("created") != self.manifest.get("created"):
            return f"created {short(self.manifest.get('created'))}, now {short(now.get('created'))}"
        return difference(self.manifest, now) or "its manifest differs"  # "store has" what it had, "now" what it has

    def _manifest_now(self) -> dict[str, Any] | None:
        """The manifest at the location now, its root ``zarr.json`` read again (one small read); None where there is none
        (the store removed, or being created again: its manifest is written last). A zip's from the zip at its location
        now: a local one's file opened anew (its directory and that member), one behind a URL (``zip::https://…``)
        opened anew. This Store reads its zip through the directory it read when opened (a local one through the file
        it keeps open): read so, a zip put in its place since was the one opened still (renamed over it; a URL's, from
        the bytes cached as it was opened), or a damaged member (one rewritten in place)."""
        if self._kind != "zip" and self.location.lower().startswith("zip::"):
            try:
                return open_store(self.location, storage_options=self.storage_options).manifest
            except UnreachableError:
                raise
            except KdcacheError:  # not there, or not a store (yet): no manifest
                return None
        try:
            raw = _zip_member_now(self.location, "zarr.json") if self._kind == "zip" else self._get("zarr.json")
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
            if _on_the_way(e):
                raise self._unreachable("zarr.json", e) from None
            raise
        try:
            now = json.loads(raw)["attributes"][ATTRS] if raw is not None else None
        except (ValueError, TypeError, KeyError):
            now = None
        return now if isinstance(now, dict) else None

    def check_in_place(self, when: str, then: str) -> None:
        """Refuse the store unless the one at its location now is this one (``identity``), looked at with one small read
        (its root ``zarr.json``; a zip's directory too, and a zip behind a URL opened again: ``_manifest_now``), not opened again: a ``StoreReplacedError`` saying it was replaced (or removed) ``when``,
        naming what its manifest held ``then``. A reader handed a Store opened earlier (``TransferSet``) checks so that
        its reads are of the store that was opened."""
        now = self._manifest_now()
        if now is None:
            raise StoreReplacedError(f"{self.location!r} was removed or replaced {when}: no store manifest is at its root now; rerun "
                                     "once the store is in place again")
        # compared as JSON: a writer's manifest may hold tuples where the one read back holds lists
        check_same_store(self.location, json.loads(json.dumps(identity(self.manifest), default=str)), identity(now), when, then)

    def _remove_stale_temps(self, key: str) -> None:
        """Remove temp files a killed writer left beside the object ``key`` of a local store: ours
        (``.NAME.PID.tmp``) and zarr's (``STEM.UUID.partial``). Only the one writer of that object calls this.

        Each folder is listed once per Store (a shard folder can hold 10^5 files: listing it per shard
        write would make a long extract quadratic); temp files are looked up in that listing.
        """
        if location_kind(self.location) != "local":
            return
        file = object_to_write(local_path(self.location), key)
        with _TEMPS_LOCK:
            if file.parent not in self._temps:
                self._temps[file.parent] = _temp_files(file.parent)
            stale = self._temps[file.parent]
            found = stale.pop(file.name, []) + stale.pop(("partial", file.stem), [])
        for path in found:
            path.unlink(missing_ok=True)

    def _write_error(self, what: str, e: OSError) -> StoreError:
        return _write_error(self.location, what, e)

    def finish(self) -> None:
        """Record completion time once every shard is done."""
        if self.complete and not self.manifest.get("completed"):
            if self.lease is not None:
                self.lease.check(self.location)
            self.manifest["completed"] = _now()
            try:
                self._remove_stale_temps("zarr.json")
                self.group.attrs[ATTRS] = self.manifest
            except OSError as e:
                raise self._write_error("the manifest", e) from None

    # -- reading ----------------------------------------------------------------------------
    def read(self, path: str, start: int, stop: int, *, digests: bool = True, pending: bool = False) -> np.ndarray:
        """Rows ``start:stop`` of an array. A damaged done shard is a StoreError naming it, never zeros: its object
        missing or empty (zarr alone would read the fill value), bytes that do not decode (checksum, truncation), or
        (``digests``) a shard read whole whose rows are not the ones written there (``digest_problem``). Rows of a
        shard not done are a StoreError too (FORMAT.md §7: they are not data), unless ``pending``: the caller uses
        only the done rows of what it reads."""
        # else named as a damaged store: an array its manifest lists, missing or of another shape
        if not isinstance(path, str) or path not in self._paths:
            raise StoreError(f"{short(path)} is not a data array of {self.location!r}; read one of {', '.join(map(repr, self.paths()))} "
                             "(a target's array is store.targets[name].path)")
        for name, value in (("start", start), ("stop", stop)):  # a float was numpy's TypeError, True read as row 1
            if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
                raise StoreError(f"{name} must be an integer row, got {type(value).__name__} {short(value)}; read rows start:stop "
                                 f"with integers 0 <= start <= stop <= {self.num_samples}")
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_samples:  # else a negative start reads as a missing shard, a stop past the end as an IndexError
            raise StoreError(f"rows {start}:{stop} of {path!r} are not within the {self.num_samples} samples of {self.location!r}; "
                             f"read rows start:stop with 0 <= start <= stop <= {self.num_samples}")
        self.checked_array(path)
        shards = range(start // self.rows_per_shard, -(-stop // self.rows_per_shard))
        self._take_snapshot()
        undone = [] if pending else [s for s in shards if not self._done[s]]
        if undone and not self.writable:  # a writer may have finished them since this reader's snapshot
            self._take_snapshot(again=True)
            undone = [s for s in undone if not self._done[s]]
        if undone:
            lo, hi = self.shard_rows(undone[0])
            raise StoreError(f"rows {start}:{stop} of {path!r} include shard {undone[0]} (rows {lo}-{hi - 1}), which is not done: "
                             f"{self.location!r} is incomplete ({int(self._done.sum())}/{self.num_shards} shards done) and a shard "
                             "not done holds no data; read the rows of done shards (store.done()), or finish the store with kdcache extract")
        with self._replaced_named():
            return self._read_checked(path, start, stop, shards, digests)

    def _read_checked(self, path: str, start: int, stop: int, shards: range, digests: bool = True,
                      objects: LocalObjects | None = None, into: np.ndarray | None = None) -> np.ndarray:
        """``read`` of rows its checks let through (``objects``: a local store's folders kept open, ``read_shards``;
        ``into``: the rows' place in an array the caller holds, filled and returned)."""
        check = digests and self._digests is not None
        crcs: dict[int, list[tuple[int, int]]] | None = {} if check else None  # each whole shard's inner chunks' crc32c
        rows = self._read_rows(path, start, stop, shards, crcs, objects, into)
        if into is not None and rows is not into:  # read by zarr: copied to its place
            into[:] = rows
            rows = into
        if check:
            for shard in shards:
                lo, hi = self.shard_rows(shard)
                whole = self._done[shard] and start <= lo and hi <= stop  # a part of a shard is not checked
                problem = whole and self.digest_problem(path, shard, rows[lo - start : hi - start], crcs and crcs.get(shard))
                if problem:
                    raise self._damaged(path, shard, problem, missing=problem == NO_DIGEST)
        return rows

    def read_shards(self, path: str, shards: Sequence[int] | np.ndarray, *, replaced_when: tuple[str, str] | None = None) -> np.ndarray:
        """The rows of shards ``shards`` of ``path``, back to back in the order given: what ``read`` of each shard's rows
        gives, with the same checks and errors, decoded into the one array returned (not each into its own, then joined:
        the rows are held once), and the work a call makes once made once for them all (the streaming reader's call, for
        a buffer's shards of one column: a local store's folders are opened once for them). From object storage or http
        the next shards are asked for while one is decoded (``REMOTE_READS`` at once, fewer where their objects would
        hold more than ``READ_AHEAD_BYTES``): the network's latency is overlapped, not paid shard after shard.
        ``replaced_when``: how a replacement found by a read failing as damage is said, in place of ``replaced_when``'s
        (a reader handed this Store by its caller, ``TransferSet``: its own words, the caller's left as they are)."""
        if getattr(shards, "ndim", None) == 0:  # np.int64(3), np.array(3): one shard (a 0-d array's iteration was numpy's TypeError)
            shards = shards.item()
        if isinstance(shards, str | bytes) or not isinstance(shards, Iterable):  # one shard, not a list of them: a TypeError said nothing
            raise StoreError(f"shards must be a list of shard numbers, got {short(shards)}; pass e.g. [{shards!r}] or "
                             "np.flatnonzero(store.done()) (a numpy array of them does too)")
        shards = list(shards)  # a numpy array of them too: its truth value, asked below, was numpy's ValueError
        for shard in shards:
            if isinstance(shard, bool | np.bool_) or not isinstance(shard, int | np.integer) or not 0 <= shard < self.num_shards:
                raise StoreError(f"shard {short(shard)} is not a shard of {self.location!r}; read shards 0 to {self.num_shards - 1} "
                                 "(shard s holds rows s * rows_per_shard onwards: store.shard_rows(s))")
        if not isinstance(path, str) or path not in self._paths or not shards:
            return self.read(path, 0, 0)  # names a path that is not a data array; else no rows
        array = self.checked_array(path)
        self._take_snapshot()
        spans = [self.shard_rows(int(s)) for s in shards]
        ends = np.cumsum([hi - lo for lo, hi in spans]).tolist()
        out = np.empty((ends[-1], *array.shape[1:]), dtype=array.dtype)
        places = ((int(s), out[end - (hi - lo) : end]) for s, (lo, hi), end in zip(shards, spans, ends))
        window = ahead_for(_object_bound(array)) if self._kind in ("url", "http") and len(shards) > 1 else 0
        with self._replaced_named(replaced_when), LocalObjects(array.store.root) if self._kind == "local" else contextlib.nullcontext() as objects:
            # a pool of its own: this call may run in the "read" pool (the streaming reader's columns, read at once)
            for read in threads.ahead("shards", REMOTE_READS, functools.partial(self._read_shard, path, objects=objects), places, window):
                read.result()
        return out

    def read_columns(self, paths: Sequence[str], shards: Sequence[int], *, replaced_when: tuple[str, str] | None = None) -> dict[str, np.ndarray]:
        """``read_shards`` of each of ``paths`` over ``shards``: one call a column (its checks made once), decoded into one
        array each. From object storage or http every column's call is made at once (each asking for its next shards
        while it decodes one): a column's first shards are not a round trip waited after the last column's. Elsewhere
        the columns are read in turn."""
        read = functools.partial(self.read_shards, replaced_when=replaced_when)
        window = len(paths) - 1 if self._kind in ("url", "http") else 0
        reads = threads.ahead("read", REMOTE_READS, read, [(p, list(shards)) for p in paths], window)
        return {p: r.result() for p, r in zip(paths, reads)}

    def _read_shard(self, path: str, shard: int, into: np.ndarray, objects: LocalObjects | None = None) -> None:
        """``read_shards``' read of one shard's rows, decoded into ``into``."""
        lo, hi = self.shard_rows(shard)
        if self._done[shard]:
            self._read_checked(path, lo, hi, range(shard, shard + 1), objects=objects, into=into)
        else:  # not done in this reader's snapshot: read() takes another, or names it
            into[:] = self.read(path, lo, hi)

    def read_ahead(self, wanted: Sequence[tuple[str, int]], *, digests: bool = True, most: int = REMOTE_READS) -> Iterator[Future[np.ndarray]]:
        """``read`` of each ``(path, shard)``'s rows in turn, as a future (its result, or the error the read raised).
        From object storage or http the next reads are asked for while the caller uses this one (in the process's pool
        of ``REMOTE_READS``): the network's latency is overlapped, not paid read after read. At most ``most`` are asked
        for ahead, fewer where that many shards of the largest array wanted, decoded, would hold more than
        ``READ_AHEAD_BYTES``. Elsewhere each read is made when its turn comes."""
        read = functools.partial(self.read, digests=digests)
        calls = ((path, *self.shard_rows(shard)) for path, shard in wanted)
        window = 0
        if self._kind in ("url", "http"):
            largest = max((math.prod(self.array(p).shape[1:]) * self.array(p).dtype.itemsize for p, _ in wanted), default=1)
            window = min(most, ahead_for(largest * self.rows_per_shard))
        return threads.ahead("read", REMOTE_READS, read, calls, window)

    @contextlib.contextmanager
    def _replaced_named(self, when: tuple[str, str] | None = None) -> Iterator[None]:
        """A read of a store opened read-only that fails as damage (a shard missing, not the rows its digest says) is,
        where the store at the location is another now, named as replaced (``check_not_replaced``): a notebook holding
        the Store was told to re-extract a store that is whole."""
        try:
            yield
        except DamagedStoreError:
            # looked at once a second at most: a store damaged in many shards (verify reads them all) is not reopened for each
            if not self.writable and (self._same_at is None or time.monotonic() - self._same_at > 1):
                self.check_not_replaced(when)
                self._same_at = time.monotonic()
            raise

    def check_not_replaced(self, when: tuple[str, str] | None = None) -> None:
        """Refuse the store if the one at its location now is another (``identity``): a read that failed as damage is then
        that replacement (another ``extract --overwrite``, a copy over it), not damage: a ``StoreReplacedError``, said as
        ``replaced_when`` says (its reader's words: ``kdcache stats``, ``kdcache verify``), or ``when`` (a reader's that
        was handed this Store: the streaming ``TransferSet``)."""
        reopen_same(self.location, self.storage_options, identity(self.manifest), *(when or self.replaced_when))

    def _take_snapshot(self, again: bool = False) -> None:
        """The done markers and digests reads are checked against: taken at the first read (``again``: anew), at every
        read of a store being written."""
        if again or self._done is None or self.writable:
            with self._snapshot:  # concurrent first reads (remote streaming) take one pair, never one's markers with the other's digests
                if again or self._done is None or self.writable:
                    # first: every shard done in it has its digest written (§7.1); done_snapshot's markers were read first too
                    kept = self._markers is not None and not again and not self.writable
                    done, self._markers = (self._markers if kept else self.done()), None
                    self._digests = None if self.writable else self.digests()
                    self._done = done

    def _read_rows(self, path: str, start: int, stop: int, shards: range, crcs: dict[int, list[tuple[int, int]]] | None,
                   objects: LocalObjects | None = None, into: np.ndarray | None = None) -> np.ndarray:
        direct = self._read_direct(path, start, stop, shards, crcs, objects, into)
        if direct is not None:
            return direct
        if self._kind == "http" and "::" not in self.location:
            # a plain static server ignores Range (SHARING.md: objects are fetched whole): rows are sliced from whole shards
            lo, hi = shards[0] * self.rows_per_shard, min(shards[-1] * self.rows_per_shard + self.rows_per_shard, self.num_samples)
            whole = self._read_direct(path, lo, hi, shards, None) if (lo, hi) != (start, stop) else None
            if whole is not None:
                return whole[start - lo : stop - lo]
        array = self.array(path)
        checked = [(shard, key) for shard in shards if self._done[shard] for key in self._row_objects(array, path, shard, start, stop)]
        try:
            problems = self._object_problems([key for _, key in checked])
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
            raise self._unreadable(path, start, stop, e) from None
        for (shard, key), problem in zip(checked, problems):
            if problem:
                what = f"is {problem}" if key == self.shard_key(path, shard) else f"has the object of its rows {key!r} {problem}"
                raise self._damaged(path, shard, f"{what} although the shard is marked done", missing=True)
        try:
            return array[start:stop]
        except StoreError:  # an object larger than it can be (storage._RemoteStore), named
            raise
        except Exception as first:  # noqa: BLE001 - any failure to decode stored bytes; named by shard below
            if _transport(first):
                raise self._unreadable(path, start, stop, first) from None
            for shard in shards:
                lo, hi = self.shard_rows(shard)
                try:
                    array[max(lo, start) : min(hi, stop)]
                except Exception as e:  # noqa: BLE001
                    if _transport(e):
                        raise self._unreadable(path, start, stop, e) from None
                    why = "crc32c checksum mismatch" if "checksum" in str(e) else f"{type(e).__name__}: {short(str(e))}"
                    raise self._damaged(path, shard, f"does not decode ({why})") from None
            raise

    def _row_objects(self, array: zarr.Array, path: str, shard: int, start: int, stop: int) -> list[str]:
        """The keys of the storage objects zarr reads the rows ``start:stop`` of shard ``shard`` of ``array`` (at ``path``)
        from: the shard's own object, or, where the array's zarr.json shards its rows otherwise than the manifest (rewritten
        by another zarr tool, which ``read`` reads through zarr), those of the array's own shards that hold them. Each
        must be there: zarr reads an absent one as zeros, and the shard's done marker says it holds rows."""
        own = (array.shards or array.chunks)[0]
        if own == self.rows_per_shard:
            return [self.shard_key(path, shard)]
        lo, hi = self.shard_rows(shard)
        return [self.shard_key(path, s) for s in range(max(lo, start) // own, -(-min(hi, stop) // own))]

    def _unreadable(self, path: str, start: int, stop: int, e: BaseException) -> UnreachableError:
        return self._unreachable(f"rows {start}-{stop - 1} of {path}", e)

    def _unreachable(self, what: str, e: BaseException) -> UnreachableError:
        return _unreachable(self.location, what, e)

    def _read_direct(self, path: str, start: int, stop: int, shards: range, crcs: dict[int, list[tuple[int, int]]] | None,
                     objects: LocalObjects | None = None, into: np.ndarray | None = None) -> np.ndarray | None:
        """Rows ``start:stop`` when they are whole done shards, read by ``_read_whole_shard`` (the streaming reader's
        and the in-memory load's case): from the file of a local array, or (object stores, http) from the object
        fetched whole, one request, where zarr asks for the shard's index and then its chunks. None: zarr reads
        them (and names any damage). ``crcs`` (not None: the digests will be checked): given each shard's inner
        chunks' ``(crc32c, length)`` of their rows (``_read_whole_shard``). ``objects``: see ``_read_whole_shard``. ``into``:
        where the rows go (``_read_checked``)."""
        spans = [self.shard_rows(s) for s in shards]
        if not spans or not all(self._done[s] and start <= lo and hi <= stop for s, (lo, hi) in zip(shards, spans)):
            return None
        found: dict[int, list[tuple[int, int]]] = {}
        array = self.array(path)
        if array.shards is None or array.shards[0] != self.rows_per_shard:
            return None
        fetch = self._kind in ("url", "http") and "::" not in self.location
        layout = _direct_layout(array, any_store=fetch)
        if layout is None:
            return None
        # several shards are decoded into one array (the caller's, ``into``), not each into its own and then joined: held once
        out = into if into is not None or len(shards) == 1 else np.empty((stop - start, *layout.shape[1:]), dtype=layout.dtype)
        if fetch:  # the next shards' objects asked for while one is decoded (a bucket's latency overlapped); a pool of
            # its own: this read may run in the "read" pool (read_ahead, streaming), whose threads would wait on each other
            bound = _object_bound(array)
            keys = [(self.shard_key(path, s),) for s in shards]  # one shard (the streaming reader's): in this thread
            raws = threads.ahead("fetch", REMOTE_READS, functools.partial(self._get, at_most=bound), keys,
                                 ahead_for(bound) if len(shards) > 1 else 0)
        for s, (lo, hi) in zip(shards, spans):
            sums = found.setdefault(s, []) if crcs is not None else None
            place = out[lo - start : hi - start] if out is not None else None
            if fetch:
                try:
                    raw = next(raws).result()
                except StoreError:  # an object larger than it can be, named
                    raise
                except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
                    if _on_the_way(e):
                        raise self._unreadable(path, start, stop, e) from None
                    return None
                rows = _read_whole_shard(array, s, np.frombuffer(raw, np.uint8), sums, into=place) if raw else None
            else:
                rows = _read_whole_shard(array, s, None, sums, objects, into=place)
            if rows is None:
                return None
        if crcs is not None:
            crcs.update(found)
        return out if out is not None else rows

    def _object_problems(self, keys: list[str]) -> list[str | None]:
        """``"missing"`` or ``"empty"`` for each storage object that should hold data, else None; the objects
        are not read, and all are asked at once (an object store answers the HEAD requests concurrently)."""
        import asyncio

        from zarr.core.sync import sync

        store = self.group.store

        async def problem(key: str) -> str | None:
            try:
                if isinstance(store, zarr.storage.ZipStore):  # its getsize would read the whole object
                    return None if await store.exists(key) else "missing"
                return "empty" if await store.getsize(key) == 0 else None
            except FileNotFoundError as e:
                if e.__cause__ is not None and _transport(e.__cause__) and getattr(e.__cause__, "status", None) != 404:
                    e.add_note(key)
                    raise  # fsspec's http _info turns a refused connection or a 5xx into FileNotFoundError
                return "missing"
            except Exception as e:  # noqa: BLE001 - s3fs's OSErrors (a 403, a 5xx), botocore's own: the caller's to name
                e.add_note(key)
                raise

        async def every() -> list[str | None]:
            return list(await asyncio.gather(*(problem(k) for k in keys)))

        return sync(every()) if keys else []

    def _damaged(self, path: str, shard: int, problem: str, missing: bool = False) -> DamagedShardError:
        """``missing``: the problem is an object missing or empty, which extract redoes by itself (``resume_pending``);
        bytes that are there but wrong it takes as done: the shard's done marker must go first."""
        lo, hi = self.shard_rows(shard)
        redo = ("rerun kdcache extract (which redoes a done shard whose objects are missing or empty)" if missing else
                f"delete its done marker {DONE}/c/{shard} and rerun kdcache extract (which skips done shards)")
        return DamagedShardError(f"{self.location!r} is damaged: shard {shard} of {path} (rows {lo}-{hi - 1}) {problem}; "
                                 f"kdcache verify {self.location} lists every damaged chunk; {redo_fix(self.location, redo)}",
                                 problem)

    def nbytes_stored(self, sizes: dict[str, int] | None = None) -> int | None:
        """Bytes stored: on disk (a folder or a zip file) or by listing object sizes (``sizes``: ``_stored_sizes``'s,
        listed already); None where unlistable (http)."""
        if location_kind(self.location) == "zip":
            return os.path.getsize(local_path(self.location))
        sizes = self._stored_sizes() if sizes is None else sizes
        return None if sizes is None else sum(sizes.values())

    def _stored_sizes(self) -> dict[str, int] | None:
        """Every stored object's bytes by key (relative to the root; a writer's temp files too), listed once: a folder's
        files, a zip's members, an object store's objects; None where sizes cannot be listed (http)."""
        kind = location_kind(self.location)
        if kind == "zip":
            try:
                with open_zip(self.location) as z:
                    return {info.filename: info.compress_size for info in z.infolist() if not info.is_dir()}
            except (OSError, zipfile.BadZipFile):  # replaced or damaged since it was opened
                return None
        if kind == "local":
            root = Path(self.location)
            return _local_sizes(root) if root.is_dir() else None
        if kind == "http":
            return None
        fs, path = filesystem(self.location, self.storage_options)
        root = path.rstrip("/")
        return {(name[len(root) + 1:] if root and name.startswith(root + "/") else name.lstrip("/")): int(info.get("size") or 0)
                for name, info in fs.find(path, detail=True).items()}

    def raw_object(self, key: str, *, at_most: int | None = None) -> bytes | None:
        """The bytes of one storage object (``key`` relative to the root, e.g. ``targets/logits/c/1/0``), None if absent
        (``at_most``: see ``_get``). A read that fails on the way (a refused connection, an HTTP 5xx, a cut response,
        credentials) is an UnreachableError naming the object, never a traceback or damage."""
        try:
            return self._get(key, at_most=at_most)
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
            if _on_the_way(e):
                raise self._unreachable(f"object {key!r}", e) from None
            raise

    def _get(self, key: str, *, at_most: int | None = None) -> bytes | None:
        """``raw_object`` raising what the read raised.

        ``at_most``: the object is known to hold at most this many bytes (else the bound its store knows, if any). A
        remote store's object is read in one GET (no HEAD first), and refused once it holds more (``storage._RemoteStore``)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        store, prototype = self.group.store, default_buffer_prototype()
        bounded = at_most is not None and hasattr(store, "get_at_most")
        try:
            buf = sync(store.get_at_most(key, prototype, None, at_most) if bounded else store.get(key, prototype=prototype))
        except zipfile.BadZipFile as e:  # a stored zip member whose bytes fail the zip's own CRC-32, or one cut short
            error = _corrupted_member(self.location, f"object {key!r} {e}")
            error.zip_problem = _zip_problem(str(e))  # type: ignore[attr-defined] - verify's words for it
            raise error from None
        return None if buf is None else buf.to_bytes()

    def object_keys(self, skip: Collection[str] = ()) -> list[str]:
        """Every storage object's key, sorted (listed from the location; ``http`` lists through index pages), but those
        below the folders ``skip`` names (``targets/logits/c``), which a local folder's or an http store's listing does
        not walk. A writer's temp files (FORMAT.md §13.1) are not objects."""
        from zarr.core.sync import sync

        if location_kind(self.location) == "local":  # zarr 3.1's LocalStore.list mangles keys under a relative root ("s")
            return sorted(k for k in _local_sizes(Path(local_path(self.location)), skip) if not _is_temp(k.rpartition("/")[2]))
        store = self.group.store

        async def collect() -> list[str]:
            listed = store.list_except(skip) if hasattr(store, "list_except") else store.list()
            return [key async for key in listed if not _is_temp(key.rpartition("/")[2])]

        try:
            return sorted(sync(collect()))
        except Exception as e:  # noqa: BLE001 - aiohttp's errors are not OSErrors
            if _on_the_way(e) and not isinstance(e, PermissionError):  # a listing refused: its callers' to judge
                raise self._unreachable("the list of its objects", e) from None
            raise

    def shard_key(self, path: str, shard: int) -> str:
        """Storage key of shard ``shard`` of the array at ``path`` (FORMAT.md §3.1): a data array, ``progress/done`` or
        ``progress/digest`` (one chunk per shard: its row)."""
        return f"{path}/c/{shard}" + "/0" * (self.array(path).ndim - 1)

    def check_shard(self, path: str, shard: int) -> list[str]:
        """Problems in the stored bytes of one shard, each naming the inner chunk: missing or empty
        object, shard index checksum, chunk extents, per-chunk crc32c. Reads the raw object only."""
        import google_crc32c

        try:
            raw = self.raw_object(self.shard_key(path, shard))
        except UnreachableError:
            raise
        except StoreError as e:  # a zip member that fails the zip's CRC-32 or is cut short, or a local object that is not read
            problem = getattr(e, "zip_problem", None)
            if problem is None:
                return [f"shard {shard}: {e}"]
            return [f"shard {shard} object {self.shard_key(path, shard)!r} is a corrupted zip member ({problem})"]
        if not raw:
            return [f"shard {shard} object {self.shard_key(path, shard)!r} is {'missing' if raw is None else 'empty'}"]
        start, stop = self.shard_rows(shard)
        chunk = int(self.array(path).chunks[0])
        n_chunks = math.ceil(self.rows_per_shard / chunk)  # the index covers the full shard grid
        index_size = n_chunks * 16 + 4
        if len(raw) < index_size:
            return [f"shard {shard}: object truncated to {len(raw)} bytes, shorter than its {index_size}-byte index"]
        index, crc = raw[-index_size:-4], raw[-4:]
        if google_crc32c.value(index).to_bytes(4, "little") != crc:
            return [f"shard {shard}: shard index checksum mismatch (truncated or corrupted object of {len(raw)} bytes)"]
        entries = np.frombuffer(index, dtype="<u8").reshape(n_chunks, 2)
        problems = []
        for c in range(math.ceil((stop - start) / chunk)):
            offset, nbytes = (int(v) for v in entries[c])
            if offset == nbytes == 2**64 - 1:
                continue  # an absent inner chunk reads as the fill value (FORMAT.md §3.1)
            if nbytes < 4 or offset + nbytes > len(raw) - index_size:
                problems.append(f"shard {shard} inner chunk {c} (rows {start + c * chunk}..): extent {offset}+{nbytes} outside the object")
                continue
            body = raw[offset : offset + nbytes]
            if google_crc32c.value(body[:-4]).to_bytes(4, "little") != body[-4:]:
                problems.append(f"shard {shard} inner chunk {c} (rows {start + c * chunk}-{min(start + (c + 1) * chunk, stop) - 1}): crc32c checksum mismatch")
        return problems

    def nbytes_raw(self, rows: int | None = None) -> int:
        """Uncompressed bytes of the rows done (``rows``: their number, if known), over every array."""
        rows = self.samples_done() if rows is None else rows
        total = 0
        for path in self.paths():
            arr = self.checked_array(path)  # the manifest's shape: a zarr.json that says otherwise is named, not counted
            total += rows * int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
        return total

    def info(self) -> dict[str, Any]:
        """The machine-readable summary ``kdcache info --json`` prints."""
        m = self.manifest
        done = self.done()  # one snapshot: a writer may mark more shards done meanwhile
        samples_done = self.samples_done(done)
        sizes, raw = self._stored_sizes(), self.nbytes_raw(samples_done)
        stored = self.nbytes_stored(sizes)
        # the ratio compares like with like: the done rows decoded against the done shards' objects, not the metadata nor
        # the objects of shards not done (being written, or left by a killed writer), which a partial store has
        packed = None if sizes is None else sum(sizes.get(self.shard_key(path, int(shard)), 0)
                                                for path in self.paths() for shard in np.flatnonzero(done))
        return {
            "location": self.location,
            "format": FORMAT,
            "format_version": m["format_version"],
            "kdcache_version": m["kdcache_version"],
            "created": m["created"],
            "completed": m.get("completed"),
            "num_samples": self.num_samples,
            "samples_done": samples_done,
            "complete": bool(done.all()),
            "shards_done": int(done.sum()),
            "num_shards": self.num_shards,
            "rows_per_shard": self.rows_per_shard,
            "has_labels": self.has_labels,
            "shard_digests": self.has_digests(),  # FORMAT.md §7.1: false for stores written before kdcache 0.1.1
            "fingerprint_algorithm": _bounded(fingerprint_algorithm(m)),
            "teacher": _bounded(m["teacher"]),
            "dataset": _bounded(m["dataset"]),
            "targets": {
                name: {"path": t.path, "shape": [self.num_samples, *t.shape], "dtype": t.dtype, "source": t.source, "select": t.select,
                       **({"mask": t.mask} if t.mask else {}), **topk_info(t)}
                for name, t in self.targets.items()
            },
            "bytes_stored": stored,
            "bytes_raw": raw,
            "compression_ratio": (raw / packed) if packed else None,
            "writer": None if done.all() else active_writer(self.location, self.storage_options),
        }



_TEMPS_LOCK = threading.Lock()  # Store._temps is filled by several writer threads
# Store.array sets zarr's global config around an open and restores it after: threads opening arrays at once would
# restore each other's settings (an array opened with zarr's unbounded zstd, the config left changed for the process)
_CONFIG_LOCK = threading.Lock()
_PARTIAL = re.compile(r"(.+)\.[0-9a-f]{32}\.partial")  # zarr's temp file of the object STEM
_TMP = re.compile(r"\.(.+)\.\d+\.tmp")  # ours (_write_whole_shard) of the object NAME


LISTINGS = 8  # an object store's arrays listed at once (missing_shard_objects): a listing's pages come one after another
READ_AHEAD_BYTES = 256 * 2**20  # the most bytes reads ahead of their caller hold (Store.read_ahead, pack's copies)


def ahead_for(nbytes: int) -> int:
    """How many reads of ``nbytes`` each to ask for ahead of their caller from object storage or http: ``REMOTE_READS``,
    fewer where they would hold more than ``READ_AHEAD_BYTES``."""
    return max(1, min(REMOTE_READS, READ_AHEAD_BYTES // max(1, nbytes)))


def _unreachable(location: str, what: str, e: BaseException) -> UnreachableError:
    """A read of ``what`` that failed on the way (connection, timeout, HTTP status, credentials): not damage."""
    cause = e.__cause__ if isinstance(e, FileNotFoundError) and e.__cause__ is not None else e
    return UnreachableError(f"cannot read {what} from {location!r}: {type(cause).__name__}: "
                            f"{one_line(cause, 200)}; nothing says the store is damaged: check the connection, endpoint, "
                            "credentials and that the server is up, then rerun")


def _transport(e: BaseException) -> bool:
    """Whether ``e`` is a failure to reach the location (connection, timeout, HTTP status, credentials) rather than
    bytes that fail to decode: such an error says nothing about the store's contents."""
    import asyncio

    if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    return type(e).__module__.split(".")[0] in ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests")


def _on_the_way(e: BaseException) -> bool:
    """``_transport``, or an OSError a filesystem raised for one (s3fs turns botocore's errors into OSErrors)."""
    return _transport(e) or isinstance(e, OSError) and e.__cause__ is not None and _transport(e.__cause__)


def _is_temp(name: str) -> bool:
    """Whether a file name is a writer's temp file (FORMAT.md §13.1: names ending ``.tmp`` / ``.partial``), not an
    object of the store: no object of the format has such a name (keys end in ``zarr.json`` or a chunk number)."""
    return name.endswith((".tmp", ".partial"))


def _temp_files(folder: Path) -> dict[Any, list[Path]]:
    """Temp files in ``folder`` by the object they stand for: ``NAME`` (ours) or ``("partial", STEM)`` (zarr's)."""
    found: dict[Any, list[Path]] = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return found
    for entry in entries:
        if m := _TMP.fullmatch(entry.name):
            found.setdefault(m.group(1), []).append(Path(entry.path))
        elif m := _PARTIAL.fullmatch(entry.name):
            found.setdefault(("partial", m.group(1)), []).append(Path(entry.path))
    return found


def _write_error(location: str, what: str, e: OSError) -> StoreError:
    """A failed write (disk full, quota, I/O error, a folder where an object goes) as a one-line error; the store stays
    resumable."""
    fix, said = write_fix(e), e.strerror or e
    folder = e.filename2 or e.filename  # a rename's target, else the file opened
    if e.errno == errno.EISDIR and folder:
        fix, said = "remove that folder", f"{os.fspath(folder)!r} is a folder where the object of {what} goes"
    return StoreError(f"cannot write {what} of {location!r}: {said}; "
                      f"{fix} and rerun the same command to resume (shards already done are kept)")


def _local_sizes(root: Path, skip: Collection[str] = ()) -> dict[str, int]:
    """Bytes of each regular file under ``root`` (a link to one: its target's), by its path relative to it, folders
    linked to not walked (as ``Path.rglob``), nor those ``skip`` names (relative paths: ``targets/logits/c``); a file
    renamed or removed while listed (a writer's temp file), or a link to nothing, is left out. ``os.walk`` and one
    ``stat`` a file: 24,000 files in 0.2 s where rglob's took 1.0 s."""
    sizes = {}
    for folder, subfolders, files in os.walk(root):
        here = Path(folder).relative_to(root).as_posix()
        prefix = "" if here == "." else f"{here}/"
        subfolders[:] = [d for d in subfolders if prefix + d not in skip]
        for name in files:
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue
                raise
            if stat.S_ISREG(st.st_mode):
                sizes[prefix + name] = st.st_size
    return sizes


def shard_digest(path: str, shard: int, pieces: list[np.ndarray], parts: list[tuple[int, int]] | None = None) -> int:
    """crc32c (Castagnoli) of the array path (UTF-8), the shard number (uint64, little-endian) and the shard's rows
    (C order, little-endian), consecutive ``pieces`` of them: what binds a shard's rows to their place (FORMAT.md §7.1).
    Not a security measure; ~13 GB/s, beside zstd's ~0.8 GB/s decode.

    ``parts``: ``(crc32c, length)`` of consecutive byte ranges that are exactly the rows' bytes (a codec-none
    shard's inner chunks, checksummed on their way to or from the file): combined (``crc32c_combine``, a few µs
    each) instead of a second pass over the rows."""
    from google_crc32c import extend, value

    digest = value(path.encode() + int(shard).to_bytes(8, "little"))
    if parts and sum(n for _, n in parts) == sum(np.asarray(p).nbytes for p in pieces):
        for crc, n in parts:
            digest = crc32c_combine(digest, crc, n)
        return digest
    for piece in pieces:
        piece = np.asarray(piece)
        digest = extend(digest, np.ascontiguousarray(piece, dtype=piece.dtype.newbyteorder("<")).reshape(-1).view(np.uint8))
    return digest


CASTAGNOLI = 0x82F63B78  # crc32c's polynomial, bit-reflected


def _multmodp(a: int, b: int) -> int:
    """``a × b`` modulo the crc32c polynomial, both bit-reflected (zlib's ``multmodp``)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ CASTAGNOLI if b & 1 else b >> 1


# x^(2^k) modulo the polynomial, k = 0..66 (x^(8n) for any n < 2^64). Not cycled with k & 31 as zlib's table is:
# that holds for zlib's polynomial, not for Castagnoli's (x^(2^32) is x^2 here, not x), and an inner chunk of 512 MiB
# or more would be combined into another digest than its rows' (FORMAT.md §7.1)
_X2N = [1 << 30]
for _ in range(66):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=64)
def _x8n(nbytes: int) -> int:
    """x^(8 × nbytes) modulo the polynomial: what appending ``nbytes`` bytes multiplies a crc by."""
    p, k = 1 << 31, 3
    while nbytes:
        if nbytes & 1:
            p = _multmodp(_X2N[k], p)
        nbytes, k = nbytes >> 1, k + 1
    return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32c(A ‖ B) from crc32c(A), crc32c(B) and len(B) (zlib's ``crc32_combine``, for the Castagnoli polynomial)."""
    return _multmodp(_x8n(len2), crc1) ^ crc2


def _write_whole_shard(array: zarr.Array, shard: int, data: np.ndarray | list[np.ndarray],
                       crcs: list[tuple[int, int]] | None = None) -> bool:
    """Write one complete shard of a local array straight to its file (``_whole_shard_object``); False (nothing written)
    where this does not apply. zarr 3.1 makes four copies of every inner chunk on the way (fill, merge, checksum append,
    concatenate); here the chunks are views of the pieces handed to one ``writev``, which brings float16 map writes near
    ``numpy.tofile`` speed."""
    parts = _whole_shard_object(array, data, crcs) if isinstance(array.store, zarr.storage.LocalStore) else None
    if parts is None:
        return False
    _replace_file(_shard_file(array, shard), parts)
    return True


def _whole_shard_object(array: zarr.Array, data: np.ndarray | list[np.ndarray],
                        crcs: list[tuple[int, int]] | None = None) -> list[Any] | None:
    """The object of one complete shard of ``array``, as buffers in order; None where this does not apply (a shard's
    rows that are not a whole shard of a row-sharded array with this store's codecs: zarr writes those).

    ``data``: the shard's rows, as one array or consecutive pieces. The bytes are exactly those zarr's sharding
    codec writes with ``write_empty_chunks`` (docs/FORMAT.md §3.1): each inner chunk through ``bytes`` (little
    endian) [→ ``zstd``] → ``crc32c``, one after the other, then the index (offset, length as little-endian uint64
    per inner chunk) + its crc32c at the end; the chunks are views of the pieces (a chunk that straddles two pieces is
    joined). ``crcs`` (codec none): filled with each inner chunk's ``(crc32c, length)``, the rows' bytes in order.
    """
    from google_crc32c import value as crc32c

    pieces = data if isinstance(data, list) else [data]
    layout = _direct_layout(array, any_store=True)
    chunk = array.chunks[0]
    fits = all(p.dtype == array.dtype and p.shape[1:] == array.shards[1:] and p.flags.c_contiguous for p in pieces)
    little = all(p.dtype.byteorder in "<=|" for p in pieces) and np.little_endian
    if not (layout and fits and little and sum(len(p) for p in pieces) == array.shards[0]):
        return None
    zstd = layout[0]
    flat = list(_chunk_bytes(pieces, chunk))
    if zstd:  # inner chunks are compressed in parallel (zstd releases the GIL): a shard's write is not one core's
        compress = __import__("numcodecs").Zstd(level=zstd.level, checksum=zstd.checksum).encode
        bodies: Any = threads.pool("encode", ENCODE_THREADS).map(compress, flat) if len(flat) > 1 else map(compress, flat)
    else:
        bodies = flat
    parts: list[Any] = []
    index = np.empty((len(flat), 2), dtype="<u8")  # per inner chunk, in chunk order: offset, length
    offset = 0
    for i, body in enumerate(bodies):
        crc = crc32c(body)
        parts += [body, np.array([crc], dtype="<u4")]
        if crcs is not None and not zstd:
            crcs.append((crc, len(body)))
        index[i] = offset, len(body) + 4
        offset += len(body) + 4
    parts += [index, np.array([crc32c(index.tobytes())], dtype="<u4")]
    return parts


def _write_uncompressed_chunk(array: zarr.Array, chunk: tuple[int, ...], value: np.ndarray) -> bool:
    """Write one chunk of a local array whose only codec is ``bytes`` (the progress arrays, FORMAT.md §7) straight to
    its file: zarr's write of a 1-byte done marker costs ~1 ms in its event loop, ~10 ms with shards being written
    beside it. False (nothing written) for any other array or store."""
    from zarr.storage import LocalStore

    found = _uncompressed_chunk(array, chunk, value) if isinstance(array.store, LocalStore) else None
    if found is None:
        return False
    _replace_file(object_to_write(array.store.root, found[0]), found[1])
    return True


def _uncompressed_chunk(array: zarr.Array, chunk: tuple[int, ...], value: np.ndarray) -> tuple[str, list[Any]] | None:
    """The key (from the store's root) and the bytes (buffers, in order) of the object of one whole chunk ``value`` of
    an array whose only codec is ``bytes`` (the progress arrays, FORMAT.md §7), as zarr writes it (``write_empty_chunks``:
    a row of fill values too); None for any other array."""
    from zarr.codecs import BytesCodec

    codecs = array.metadata.codecs
    if not (len(codecs) == 1 and isinstance(codecs[0], BytesCodec) and array.metadata.chunk_key_encoding.name == "default"
            and value.shape == tuple(array.chunks) and value.dtype == array.dtype and np.little_endian):
        return None
    return f"{array.path}/{array.metadata.encode_chunk_key(chunk)}", [np.ascontiguousarray(value)]


def _replace_file(file: Path, parts: list[Any]) -> None:
    """Write ``parts`` (buffers, in order) as the file ``file`` through ``.NAME.PID.tmp`` beside it (``write_file``:
    readers never see a half-written object, and a power loss never leaves a done marker whose shard is not on disk)."""
    write_file(file, parts, file.with_name(f".{file.name}.{os.getpid()}.tmp"))


def _chunk_bytes(pieces: list[np.ndarray], chunk: int) -> Iterator[np.ndarray]:
    """The bytes of each ``chunk``-row inner chunk of the rows ``pieces`` hold one after the other: a view
    of the piece that holds the chunk, or a copy joining the pieces it straddles."""
    pending: list[np.ndarray] = []
    have = 0
    for piece in pieces:
        at = 0
        while at < len(piece):
            take = min(chunk - have, len(piece) - at)
            part, at = piece[at : at + take], at + take
            if have == 0 and take == chunk:
                yield part.reshape(-1).view(np.uint8)  # rows of a C-contiguous piece: contiguous, no copy
                continue
            pending.append(part)
            have += take
            if have == chunk:
                yield np.concatenate(pending).reshape(-1).view(np.uint8)
                pending, have = [], 0
    assert not pending, "the pieces end inside an inner chunk"


def _read_whole_shard(array: zarr.Array, shard: int, raw: np.ndarray | None = None, crcs: list[tuple[int, int]] | None = None,
                      objects: LocalObjects | None = None, into: np.ndarray | None = None) -> np.ndarray | None:
    """The rows of shard ``shard`` of a local array, read straight from its file (or decoded from ``raw``, the
    object's bytes fetched whole from any store): one read, each inner chunk's crc32c checked and decoded into
    one buffer. None (nothing decided) where this does not apply or anything is off (no file, an empty inner
    chunk, a checksum or size mismatch): zarr then reads it and reports damage.

    The mirror of ``_write_whole_shard``; zarr 3.1 makes two calls through its event loop per read and
    assembles inner chunks one by one (~2.3 ms per column of a small shard, a tenth of that here).
    ``crcs``: given each inner chunk's ``(crc32c, length)`` of its rows' bytes (codec none: the stored checksum;
    zstd: computed right after decoding, while the chunk is in the CPU's cache), for ``shard_digest``. ``objects``: the
    local store's folders, kept open across the reads of several shards (``Store.read_shards``). ``into``: the rows'
    place in an array the caller holds, decoded there and returned (a shard's rows that end inside an inner chunk, the
    last shard's, are copied there).
    """
    layout = _direct_layout(array, any_store=raw is not None)
    if not layout or not (np.little_endian and layout.dtype.byteorder in "<=|"):
        return None
    zstd, chunk, shape = layout.zstd, layout.chunk_rows, layout.shape
    start = shard * layout.shard_rows
    rows = min(layout.shard_rows, shape[0] - start)
    count = -(-rows // chunk)  # inner chunks holding rows; those past the array's end are never written
    if raw is None:
        raw = _local_shard_object(array, layout.key(shard), objects)
        if raw is None:
            return None
    extents = _inner_extents(raw, layout.shard_rows // chunk, count)
    if extents is None:
        return None
    try:
        out = into if into is not None and len(into) == count * chunk else np.empty((count * chunk, *shape[1:]), dtype=layout.dtype)
    except MemoryError:  # a chunk grid larger than memory (a received zarr.json): zarr reads it and names the shard
        return None

    def chunk_crc(i: int) -> int | None:
        return _decode_inner_chunk(raw, *extents[i], out[i * chunk : (i + 1) * chunk].reshape(-1).view(np.uint8), zstd, crcs is not None)

    # zstd releases the GIL: a shard's chunks decode on every core (training's reader, verify, export, stats)
    parallel = zstd is not None and count > 1 and ENCODE_THREADS > 1
    found = list(threads.pool("decode", ENCODE_THREADS).map(chunk_crc, range(count)) if parallel else map(chunk_crc, range(count)))
    if any(crc is None for crc in found):
        return None
    if crcs is not None:
        crcs.extend((crc, out[:chunk].nbytes) for crc in found)
    if into is not None and out is not into:
        into[:] = out[:rows]
    return out[:rows] if into is None else into


def _local_shard_object(array: zarr.Array, key: str, objects: LocalObjects | None) -> np.ndarray | None:
    """The bytes of the local object ``key`` of ``array`` (through ``objects``, the store's folders kept open, where
    given), at most the store's bound for it; None where it is missing or not a plain file of that size."""
    bound = array.store.at_most(key) if hasattr(array.store, "at_most") else None
    try:  # never a link out, a FIFO, a device or a sparse giant
        return objects.read(key, bound) if objects is not None else read_local_object(array.store.root, key, bound)
    except OSError:
        return None


def _plain_progress(array: zarr.Array, path: str) -> bool:
    """Whether the progress array ``path``'s objects (``progress/done``, ``progress/digest``) are its rows' bytes as they
    are (FORMAT.md §3.1, §7: codecs ``[bytes]`` little-endian, fill value 0, one row a chunk, keys ``P/c/S[/0]``) in a
    store of kdcache's (a folder's or an fsspec URL's, which bound their objects' sizes)."""
    from zarr.codecs import BytesCodec

    meta, encoding = array.metadata, array.metadata.chunk_key_encoding
    codecs = meta.codecs
    return (hasattr(array.store, "at_most") and array.path == path
            and [type(c) for c in codecs] == [BytesCodec] and getattr(codecs[0].endian, "value", "little") == "little"
            and meta.fill_value is not None and not bool(meta.fill_value) and tuple(array.chunks) == (1, *array.shape[1:])
            and encoding.name == "default" and getattr(encoding, "separator", None) == "/")


def _inner_extents(raw: np.ndarray, slots: int, count: int) -> list[tuple[int, int]] | None:
    """The ``(offset, length)`` of the first ``count`` inner chunks of a shard object ``raw`` whose index (at its end,
    FORMAT.md §3.1) has ``slots`` entries; None where the index's crc32c is off, or an extent is empty (2**64 - 1), shorter
    than its checksum or out of range."""
    from google_crc32c import value as crc32c

    tail = slots * 16 + 4
    if len(raw) < tail or crc32c(raw[-tail:-4]) != int(raw[-4:].view("<u4")[0]):
        return None
    index = raw[-tail:-4].view("<u8").reshape(slots, 2)
    extents = [(int(offset), int(length)) for offset, length in index[:count]]
    if any(length < 4 or offset + length > len(raw) - tail for offset, length in extents):
        return None
    return extents


def _decode_inner_chunk(raw: np.ndarray, offset: int, length: int, target: np.ndarray, zstd: Any, checked: bool) -> int | None:
    """The inner chunk at ``raw[offset : offset + length]`` checked and decoded into ``target`` (its rows' bytes): the crc32c
    of those rows (``checked``; else 0 for a zstd chunk), None if it is off (checksum, size, a body that does not decompress)."""
    from google_crc32c import value as crc32c

    body = raw[offset : offset + length - 4]
    crc = crc32c(body)
    if crc != int(raw[offset + length - 4 : offset + length].view("<u4")[0]):
        return None
    if zstd is None:
        if len(body) != len(target):
            return None
        target[:] = body
        return crc
    try:
        decode_zstd(body, target)
    except Exception:  # noqa: BLE001 - a body that does not decompress to the chunk: zarr names it
        return None
    return crc32c(target) if checked else 0  # while the chunk is in the CPU's cache, not in a pass later


def _object_bound(array: zarr.Array) -> int:
    """At most how many bytes one storage object of ``array`` holds (FORMAT.md §3.1, §13): each of its inner chunks at
    zstd's worst case with room to spare (``ZSTD_compressBound``: n + n/256 + 64 bytes for incompressible data; its
    checksum, 4) with its crc32c, and a shard's index. A chunk past the array's end is not stored; a partial one is
    stored whole."""
    slots = array.shards[0] // array.chunks[0] if array.shards else 1
    chunk = math.prod(array.chunks) * array.dtype.itemsize
    return slots * (chunk + chunk // 128 + 128) + (slots * 16 + 4 if array.shards else 0)


_LAYOUTS: dict[int, tuple[Any, bool, str, Direct | None]] = {}  # id(array.metadata) -> (that metadata, any_store, path, the answer)


def _direct_layout(array: zarr.Array, any_store: bool = False) -> Direct | None:
    """``_find_direct_layout``, worked out once per array metadata (and store kind, and path: the answer holds the shard
    keys): a read of one shard asks for it each time."""
    metadata, local = array.metadata, any_store or isinstance(array.store, zarr.storage.LocalStore)
    known = _LAYOUTS.get(id(metadata))
    if known is not None and known[0] is metadata and known[1] == local and known[2] == array.path:
        return known[3]
    found = _find_direct_layout(array, any_store)
    if len(_LAYOUTS) >= 1024:  # arrays of many stores opened in turn: forget them all, rather than hold every metadata
        _LAYOUTS.clear()
    _LAYOUTS[id(metadata)] = (metadata, local, array.path, found)  # the metadata is held: its id is not another's while the entry lasts
    return found


def _find_direct_layout(array: zarr.Array, any_store: bool = False) -> Direct | None:
    """The ``Direct`` layout where a shard of ``array`` can be read and written straight from its file
    (docs/FORMAT.md §3.1): a local (``any_store``: any) row-sharded array with bytes [→ zstd] → crc32c chunks and
    a crc32c index at the end; None for anything else (other stores, codecs or key encodings go through zarr)."""
    from zarr.codecs import BytesCodec, ShardingCodec
    from zarr.storage import LocalStore

    codec = array.metadata.codecs[0] if len(array.metadata.codecs) == 1 else None
    if not ((any_store or isinstance(array.store, LocalStore)) and isinstance(codec, ShardingCodec) and array.shards is not None):
        return None
    inner, index_codecs = list(codec.codecs), list(codec.index_codecs)
    zstd = inner.pop(1) if len(inner) == 3 and isinstance(inner[1], ZstdCodec) else None
    if not (array.shards[1:] == array.shape[1:] == array.chunks[1:] and array.shards[0] % array.chunks[0] == 0
            and [type(c) for c in inner] == [BytesCodec, Crc32cCodec] and [type(c) for c in index_codecs] == [BytesCodec, Crc32cCodec]
            and codec.index_location.value == "end" and array.metadata.chunk_key_encoding.name == "default"
            and getattr(array.metadata.chunk_key_encoding, "separator", None) == "/"):
        return None
    key = f"{array.path}/c/" if array.path else "c/"
    return Direct(zstd, array.shards[0], array.chunks[0], tuple(array.shape), array.dtype, key, "/0" * (array.ndim - 1))


class Direct(NamedTuple):
    """How a shard of an array is read and written straight from its file (``_find_direct_layout``): its zstd codec (or
    None), rows per shard and per inner chunk, the array's shape and dtype, and a shard's key around its number."""

    zstd: Any
    shard_rows: int
    chunk_rows: int
    shape: tuple[int, ...]
    dtype: np.dtype
    key_head: str
    key_tail: str

    def key(self, shard: int) -> str:
        return f"{self.key_head}{shard}{self.key_tail}"


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def decode_zstd(body: Any, out: np.ndarray) -> np.ndarray:
    """One inner chunk's zstd bytes decoded into ``out`` (uint8, the chunk's size), never into more memory: a frame
    that declares (or, without a declared size, yields) another size raises ValueError/RuntimeError. Without the
    bound, numcodecs allocates what the frame declares: 32 KB of a received store's chunk decode to 1 GiB, and a
    few MB to more than the machine's memory (a compression bomb; the chunk's crc32c covers the compressed bytes)."""
    body = memoryview(body).cast("B")
    if len(body) >= 5 and body[:4] == ZSTD_MAGIC:  # RFC 8878 §3.1.1: the frame header's Frame_Content_Size
        descriptor = body[4]
        single = descriptor >> 5 & 1  # no Window_Descriptor byte; a size flag of 0 then means a one-byte size
        width = (single, 2, 4, 8)[descriptor >> 6]
        at = 5 + (1 - single) + (0, 1, 2, 4)[descriptor & 3]  # after the Window_Descriptor and Dictionary_ID
        if width and len(body) >= at + width:
            declared = int.from_bytes(body[at : at + width], "little") + (256 if width == 2 else 0)
            if declared != len(out):
                raise ValueError(f"its zstd frame declares {declared:,} bytes where the inner chunk holds {len(out):,}")
    from numcodecs.zstd import decompress

    return decompress(body, out)  # numcodecs refuses more than ``out`` holds, unallocated


class BoundedZstdCodec(ZstdCodec):
    """zarr's ``zstd`` codec whose decode is ``decode_zstd``'s, bounded by the chunk's size; the same encoding. Every
    array of a store is opened with it (``Store.array``): a chunk zarr decodes (a remote or zipped store's, a damaged
    one's, ``verify``'s) is never decompressed past the size its array declares."""

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        native = chunk_spec.dtype.to_native_dtype()
        if native.kind not in "biufc":  # no fixed size per element (kdcache stores have none)
            return super()._decode_sync(chunk_bytes, chunk_spec)
        out = np.empty(math.prod(chunk_spec.shape) * native.itemsize, np.uint8)
        return chunk_spec.prototype.buffer.from_array_like(decode_zstd(chunk_bytes.as_numpy_array(), out))


def _other_codec(codecs: Iterable[Any]) -> str | None:
    """What is wrong with the first codec (inner and index codecs of a shard included) that is not one of FORMAT.md §3.1's, else
    None: a received store's zarr.json may name any codec zarr knows, and gzip or blosc decompress a chunk to whatever
    size its bytes say, unbounded (only zstd is decoded into the chunk's size, ``BoundedZstdCodec``)."""
    from zarr.codecs import BytesCodec, ShardingCodec

    for codec in codecs:
        if isinstance(codec, ShardingCodec):
            inner = _other_codec([*codec.codecs, *codec.index_codecs])
            if inner is not None:
                return inner
        elif not isinstance(codec, (BytesCodec, BoundedZstdCodec, Crc32cCodec)):
            name = str(codec.to_dict().get("name", type(codec).__name__))
            return f"its codec {name!r} is not one of the format's: sharding_indexed, bytes, zstd, crc32c"
        elif isinstance(codec, BytesCodec) and codec.endian is not None and codec.endian.value != "little":
            # FORMAT.md §3.1: little-endian. kdcache's own shard reader and writer (_read_whole_shard) take the bytes as
            # little-endian, zarr as the metadata says: a store whose values depended on the path that reads them
            return f"its bytes codec is {codec.endian.value}-endian; the format's is little-endian"
    return None


def _other_key_encoding(encoding: Any) -> str | None:
    """What is wrong with an array's ``chunk_key_encoding`` when it is not FORMAT.md §3.1's (``default``, separator ``/``),
    else None. Another encoding (``v2``, or a ``.`` separator) names other objects than the store's chunks: zarr reads
    every chunk of the array as absent, i.e. as the fill value, and a store without digests served all-zero targets
    that verified."""
    name, separator = getattr(encoding, "name", None), getattr(encoding, "separator", None)
    if name == "default" and separator == "/":
        return None
    return (f"its chunk_key_encoding is {short(name)} with separator {short(separator)}; the format's is 'default' with '/', "
            "so its chunks would be looked for under other keys than the store's and read as the fill value")


_BOUNDED_ZSTD = f"{BoundedZstdCodec.__module__}.{BoundedZstdCodec.__qualname__}"
zarr.registry.register_codec("zstd", BoundedZstdCodec)  # chosen only where Store.array sets codecs.zstd to it


def _shard_key(array: zarr.Array, shard: int) -> str:
    """The store key of shard ``shard``'s object (``_shard_file``'s path below the store's root, as a string)."""
    key = array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
    return f"{array.path}/{key}" if array.path else key


def _shard_file(array: zarr.Array, shard: int) -> Path:
    return object_to_write(array.store.root, _shard_key(array, shard))


def open_store(location: str | os.PathLike[str], *, mode: str = "r", storage_options: dict[str, Any] | None = None) -> Store:
    """Open an existing store (read-only by default; ``mode="r+"``: read and write it) at any location (``zarr_store``).
    Never runs code: the manifest is JSON."""
    location = location_arg(location, "location")
    if mode not in ("r", "r+"):  # zarr's "w" deletes the store's every array before this function sees it
        raise StoreError(f"mode must be 'r' (read only) or 'r+' (read and write an existing store), got {mode!r}; "
                         "kdcache extract creates and writes stores")
    target, root = open_existing(location, storage_options, read_only=mode == "r")
    if target is None:
        raise _no_store(location, storage_options)
    try:  # never consolidated metadata (kdcache writes none): arrays parsed at open would miss Store.array's bounded zstd
        group = _open_group(target, mode, root)
    except StoreError:
        raise
    except zarr.errors.ContainsArrayError:  # someone's zarr array, not a store's root damaged (verify's open check)
        raise _inside_a_store(location) or StoreError(f"{location!r} is a zarr array, not a store (a zarr group); pass a store "
                                                      "written by kdcache extract") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # bytes no writer makes: a copy cut short, a byte flipped
        raise _inside_a_store(location) or DamagedStoreError(f"{location!r} is not a zarr v3 group: its 'zarr.json' is not valid "
                                                             f"JSON ({str(e)[:200]}), a damaged copy; copy the store again from its "
                                                             "source, or re-extract it") from None
    except (FileNotFoundError, *BAD_METADATA) as e:
        raise _inside_a_store(location) or DamagedStoreError(f"{location!r} is not a zarr v3 group ({_metadata_problem(target, 'zarr.json', e)}); "
                         "pass a store written by kdcache extract") from None
    except zipfile.BadZipFile as e:
        raise _corrupted_member(location, str(e)) from None
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
        if _on_the_way(e):  # zarr's read of the root zarr.json (the look's failed) cut short: was aiohttp's traceback
            raise _unreachable(location, "zarr.json", e) from None
        raise
    return Store(group, location, writable=mode != "r", storage_options=storage_options)


def _open_group(target: Any, mode: str, root: bytes | None) -> zarr.Group:
    """``zarr.open_group(target, mode=mode)`` of a store's root (format 3, no consolidated metadata). ``root``: the root
    ``zarr.json``'s bytes, read by the look that found it (``open_existing``: a GET at an http(s) or object-store
    location), parsed here as zarr parses what it reads, with the same errors: not read a second time."""
    parse = _zarr_private("zarr.core.group", "AsyncGroup._from_bytes_v3") if root is not None else None
    made = _zarr_private("zarr.storage._common", "make_store_path") if parse else None
    if parse is None or made is None:
        return zarr.open_group(target, mode=mode, zarr_format=3, use_consolidated=False)
    (from_bytes,), (make_store_path,) = parse, made
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def parse_root() -> Any:
        at = await make_store_path(target, mode=mode)
        try:
            return from_bytes(at, default_buffer_prototype().buffer.from_bytes(root), use_consolidated=False)
        except (KeyError, FileNotFoundError):  # what zarr.open_group says of them in modes r and r+
            raise zarr.errors.GroupNotFoundError(f"No group found in store {target!r} at path {at.path!r}") from None

    return zarr.Group(sync(parse_root()))


def _zarr_private(module: str, *names: str) -> tuple[Any, ...] | None:
    """``names`` (``Class.method`` or a function) of zarr's ``module``: the private parts of zarr 3.1 that parse a node's
    ``zarr.json`` from bytes already read. None where this zarr has moved or renamed one: the caller then lets zarr's
    public calls read the object again (one request more, the same node and errors), so a zarr release within the
    supported range that reorganises its internals costs a request, not the opening of every store."""
    try:
        found = importlib.import_module(module)
        return tuple(functools.reduce(getattr, name.split("."), found) for name in names)
    except (ImportError, AttributeError):
        return None


def _zip_problem(said: str) -> str:
    """What is wrong with a zip member, from zipfile's (or ``storage._ZipStore``'s) ``BadZipFile`` text ``said``."""
    if said.startswith("Bad CRC-32"):
        return "its bytes fail the zip's CRC-32"
    if "is cut short" in said:
        return "cut short: the zip's central directory gives it more bytes than the file holds"
    return f"zipfile: {said}"  # a header that does not match the directory, overlapping entries, ...


def _corrupted_member(location: str, what: str) -> StoreError:
    """A zip member whose bytes fail the zip's own CRC-32 (``what``: zipfile's words, naming it)."""
    return DamagedStoreError(f"{location!r} is damaged: {what} (a corrupted zip member); kdcache verify {location} lists every "
                      "damaged chunk; pack the store again or copy the zip again")


def marker_fix(location: str) -> str:
    """What redoes the shard of a damaged done marker of the store at ``location``: a zip's members cannot be changed,
    nor can an http server's files by their reader."""
    kind = location_kind(location)
    if kind == "zip" or "::" in location:
        return "copy the zip again, or pack the store again from its folder (kdcache pack FOLDER OUT)"
    if kind == "http":
        return "ask the store's owner to delete the marker and rerun kdcache extract to redo its shard, or copy the store again"
    return "delete the marker and rerun kdcache extract to redo its shard, or re-extract the store"


def redo_fix(location: str, redo: str, writable: str = "") -> str:
    """The fix of a damaged shard of the store at ``location``, whose shard ``redo`` (deleting its done marker, rerunning
    kdcache extract) redoes in place: where the store is writable, "copy the store again, or redo the shard: REDO"
    (``writable``: another wording); a zip's members cannot be changed, nor can an http server's files by their reader
    (the fix named was "rerun kdcache extract", which cannot write there), so there the copy's source is named."""
    kind = location_kind(location)
    if kind == "zip" or "::" in location:
        return ("a zip cannot be changed in place: copy the zip again, or pack it again (kdcache pack FOLDER OUT) from the "
                f"folder it was packed from once the shard is redone there: {redo}")
    if kind == "http":
        return ("a store read over HTTP cannot be changed by its reader: have the server's copy replaced from its source, or "
                f"copy the store to a local folder and redo the shard there: {redo}")
    return writable or f"copy the store again, or redo the shard: {redo}"


def _marker(key: str, raw: bytes) -> str:
    """A damaged done marker, named with what it holds: ``'progress/done/c/1' (holds b'zz')``."""
    return f"{key!r} (holds {short(raw[:8])}{'...' if len(raw) > 8 else ''})"


def _metadata_problem(target: Any, key: str, e: Exception) -> str:
    """What is wrong with the zarr metadata object ``key`` that zarr failed to parse with ``e``, for a message."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    try:
        value = json.loads(sync(target.get(key, prototype=default_buffer_prototype())).to_bytes())
    except Exception:  # noqa: BLE001 - unreadable or not JSON: zarr's own message says which
        return str(e)[:200]
    if not isinstance(value, dict):
        return f"it holds {json.dumps(value)[:80]}, not a JSON object"
    return f"{type(e).__name__}: {str(e)[:200]}"


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _no_store(location: str, storage_options: dict[str, Any] | None) -> StoreError:
    """Why there is no store (no root ``zarr.json``) at ``location``, and the fix that fits the location:
    only a local folder or an object-store prefix can be extracted to."""
    kind = location_kind(location)
    extract = f"run kdcache extract PIPELINE --out {location} first"
    if kind == "local":
        return _no_local_store(location, extract)
    if kind == "zip":
        return _no_zip_store(location)
    http = http_url(location)
    if http is not None:  # http(s)://, or a chain ending in one (zip::https://...)
        return _no_http_store(location, http, storage_options)
    return _no_url_store(location, storage_options, extract)


def _inside_a_store(location: str) -> StoreError | None:
    """The error for a local path inside a store folder (its ``targets`` group, an array, a shard, its ``zarr.json``: what
    an unpacked hand-over shows first) or inside a store's zip (a member's path), naming the store to pass; None where
    nothing above holds one."""
    if location_kind(location) != "local":
        return None
    path = Path(local_path(location))
    for above in path.parents:
        if above.is_file():  # t.zarr.zip/targets: "no store there; run kdcache extract --out t.zarr.zip/targets"
            if _zip_holds_store(above):
                return StoreError(f"{location!r} is {path.relative_to(above).as_posix()!r} inside the store {str(above)!r} (a zip), "
                                  f"not a store itself; pass {str(above)!r}")
            continue
        try:
            raw = read_local_object(above, "zarr.json", MAX_METADATA_BYTES)
            manifest = None if raw is None else json.loads(raw.tobytes()).get("attributes", {}).get(ATTRS)
        except (OSError, ValueError, AttributeError, StoreError):  # not a store's root: look further up
            continue
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
            return StoreError(f"{location!r} is {path.relative_to(above).as_posix()!r} inside the store {str(above)!r}, not a "
                              f"store itself; pass {str(above)!r}")
    return None


def _no_local_store(location: str, extract: str) -> StoreError:
    """Why no store is at the local path ``location``: a file (an HDF5 export, a zip of another name), a zarr v2 store,
    a folder of other things, or nothing (``extract``: the fix)."""
    path = Path(local_path(location))
    inside = _inside_a_store(location)
    if inside is not None:
        return inside
    if path.is_file() and location.endswith("/"):  # a file named as a folder: zip:: of it would look inside a folder
        return StoreError(f"{location!r} is a file, named with a trailing '/'; pass {location.rstrip('/')!r}")
    if path.is_file():
        with contextlib.suppress(OSError), path.open("rb") as f:
            if f.read(8) == HDF5_MAGIC or path.suffix.lower() in (".h5", ".hdf5"):
                return StoreError(f"{location!r} is an HDF5 file (a kdcache export?), not a store; run kdcache import "
                                  f"{location} STORE first, then pass STORE")
        if zipfile.is_zipfile(path) and not _zip_holds_store(path):  # torch.save's .pt files are zips too
            return StoreError(f"{location!r} is a zip file that holds no store (no zarr.json at its root: a PyTorch checkpoint, "
                              "another archive); pass a store folder, or a .zarr.zip written by kdcache pack")
        if zipfile.is_zipfile(path):  # read as a zip by its name alone: SHARING.md's zip:: takes one of any name
            return StoreError(f"{location!r} is a zip file not named .zip; pass it as zip::{location} (a zip of any name is "
                              "read through zip::), or rename it to .zarr.zip")
        return StoreError(f"{location!r} is a file, not a store; pass a store folder, a .zarr.zip written by kdcache pack, "
                          "or zip::PATH for such a zip of another name")
    if (path / ".zgroup").is_file():
        return _zarr_v2(location)
    if (path / "pipeline.json").is_file() and any((path / name).is_file() for name in ("student.pt", "checkpoint.pt")):
        return StoreError(f"no store at {location!r}: it is a training run's folder (kdcache train --out: student.pt, "
                          "pipeline.json); pass the store kdcache extract wrote (train --cache takes it)")
    if path.is_dir() and not (path / "zarr.json").exists() and _interrupted_creation(location, remains=True):
        # a copy made in name order (rsync, some cp) writes the root zarr.json last: a copy cut short lacks it alone
        return StoreError(f"no store at {location!r}: the folder holds a kdcache store's arrays but not its root zarr.json, "
                          "which holds the store's manifest (an incomplete copy: rsync copies it last; or a store whose deletion "
                          "by kdcache extract --overwrite was stopped); copy the store again whole, or rerun that extract")
    if path.is_dir() and any(path.iterdir()):
        return StoreError(f"no store at {location!r}: the folder holds no zarr.json; pass the folder of a store "
                          "(kdcache extract PIPELINE --out NEW writes one)")
    near = store_named_alike(path)
    if near is not None:  # a typo of a store beside it was told to extract one there
        return StoreError(f"no store at {location!r}; did you mean {near!r}, a store beside it? If not, {extract}")
    return StoreError(f"no store at {location!r}; {extract}")


def store_named_alike(path: Path) -> str | None:
    """A store in ``path``'s folder whose name is close to ``path``'s (``runs/mnist-teacher.zar``, ``mnist-teacher.zip``
    for ``mnist-teacher.zarr.zip``): a folder with a root ``zarr.json`` or a zip holding one; None where there is none.
    Names are compared without their ``.zarr``/``.zip`` endings, which every store shares (``nothing.zarr`` is not close
    to ``tiny.zarr``; ``tiny.zar`` is). Looks at the first 10,000 entries of the folder only (a scratch folder of many runs)."""
    def stem(name: str) -> str:
        return re.sub(r"(\.z[a-z]*)+$", "", name, flags=re.IGNORECASE) or name  # .zarr, .zarr.zip, a typo's .zar

    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        names = [e.name for _, e in zip(range(10_000), entries) if e.name != path.name]
        stems = {stem(name) for name in names}
        for close in difflib.get_close_matches(stem(path.name), stems, n=3, cutoff=0.8):
            alike = sorted((name for name in names if stem(name) == close),  # t.zip: t.zarr.zip before t.zarr
                           key=lambda name: -difflib.SequenceMatcher(None, path.name, name).ratio())
            for near in (path.parent / name for name in alike):
                if (near / "zarr.json").is_file() or (near.is_file() and zipfile.is_zipfile(near) and _zip_holds_store(near)):
                    return str(near)
    return None


def _zip_holds_store(path: Path) -> bool:
    """Whether the zip file at ``path`` has a root ``zarr.json`` member (a store's, as kdcache pack writes it)."""
    with contextlib.suppress(OSError, zipfile.BadZipFile), open_zip(str(path)) as z:
        return "zarr.json" in z.namelist()
    return False


def _no_zip_store(location: str) -> StoreError:
    """Why no store is in the local zip file ``location``: no such file, not a zip, a zarr v2 store, or no root zarr.json."""
    path = Path(local_path(location))
    if not path.exists():
        near = store_named_alike(path)
        if near is not None:
            return StoreError(f"no store at {location!r} (no such file); did you mean {near!r}, a store beside it? If not, "
                              f"write it with kdcache pack STORE {path}")
        return StoreError(f"no store at {location!r} (no such file); check the path, or write it with kdcache pack STORE {path}")
    try:
        with open_zip(str(path)) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile) as e:
        with contextlib.suppress(OSError), path.open("rb") as f:
            if isinstance(e, zipfile.BadZipFile) and f.read(4) == b"PK\x03\x04":  # a zip's first member, no end: damage (verify's open check)
                return DamagedStoreError(f"{location!r} is damaged: it begins as a zip file but has no end (its central directory): "
                                         f"a copy or download cut short ({path.stat().st_size:,} bytes); copy it again from its source")
        return StoreError(f"{location!r} is not a readable zip file ({e}); pass a .zarr.zip written by kdcache pack")
    if ".zgroup" in names:
        return _zarr_v2(location)
    return StoreError(f"no store in {location!r}: the zip holds no zarr.json at its root; pass a .zarr.zip written by kdcache pack")


def _no_http_store(location: str, http: str, storage_options: dict[str, Any] | None) -> StoreError:
    """Why no store is at ``location``, read through the http(s) URL ``http`` (itself, or the zip file a ``zip::`` chain
    fetches): what the server answered (a failure, a refusal, a missing key: an HDF5 file, a zarr v2 store, a zip named
    without ``zip::``), an unreachable server, or a zip or a folder without a root zarr.json."""
    chained = http != location  # zip::http://...: the zip file itself is fetched
    url = http if chained else http.rstrip("/") + "/zarr.json"
    options = None if chained else storage_options
    problem = http_problem(url, options, whole=not chained)
    if problem is not None and problem.startswith("HTTP 5"):  # the server failed: nothing says the store is absent
        return UnreachableError(f"cannot reach {location!r} ({url}: {problem}): the server failed to answer; "
                                "check that the server is up, then rerun")
    if problem is not None and problem.startswith(("HTTP 401", "HTTP 403")):  # the store may well be there
        # a bucket served over HTTP(S) that may not be listed answers a missing key 403 too
        maybe = ", or there is no store there (a bucket answers 403 for a missing key): check the URL, or" if "403" in problem[:8] else ";"
        return StoreError(f"{location!r} refuses access ({url}: {problem}){maybe} pass the credentials the server expects, e.g. "
                          "--storage-option 'headers.Authorization=Bearer TOKEN' (storage_options={'headers': {...}} from Python)")
    if problem is not None and problem.startswith("HTTP "):
        if not chained and http.lower().endswith((".h5", ".hdf5")):
            return StoreError(f"{location!r} names an HDF5 file (a kdcache export?), not a store; download it and run "
                              "kdcache import FILE STORE, then pass STORE")
        if not chained and http_problem(http.rstrip("/") + "/.zgroup", options, whole=True) is None:
            return _zarr_v2(location)
        if not chained and http.rstrip("/").lower().endswith(".zip"):
            return _zip_behind_url(location, f"({url}: {problem})")
        return StoreError(f"no store at {location!r} ({url}: {problem}); check the URL")
    if problem is not None:
        return StoreError(f"cannot reach {location!r} ({problem}); check the URL and that the server is up")
    if chained:
        return StoreError(f"no store in {location!r}: the zip holds no zarr.json at its root; pass the URL of a .zarr.zip written by kdcache pack")
    return StoreError(f"no store at {location!r}: {url} holds no zarr v3 group metadata; check the URL")


def _no_url_store(location: str, storage_options: dict[str, Any] | None, extract: str) -> StoreError:
    """Why no store is at the fsspec URL ``location`` (s3://, gs://, ...): a zarr v2 store, no such bucket, a zip named
    without ``zip::``, or nothing (``extract``: the fix)."""
    from zarr.core.sync import sync

    with contextlib.suppress(Exception):
        if sync(zarr_store(location, storage_options).exists(".zgroup")):
            return _zarr_v2(location)
    with contextlib.suppress(Exception):  # a bucket name mistyped: extracting there would fail too, after the teacher is built
        fs, path = filesystem(location, storage_options)
        bucket = path.split("/")[0]
        if bucket and "/" in path.strip("/") and not fs.exists(bucket):
            return StoreError(f"no store at {location!r}: there is no bucket {bucket!r} (or these credentials cannot see it); "
                              "check the bucket name, --storage-option values and credentials")
    if "::" not in location and location.rstrip("/").lower().endswith(".zip"):
        return _zip_behind_url(location, "")
    return StoreError(f"no store at {location!r}; {extract}")


def _zip_behind_url(location: str, seen: str) -> StoreError:
    """No store at a URL that names a zip (``https://host/t.zarr.zip``): a local ``.zip`` is read as one by its name, a
    URL only through fsspec's chain (SHARING.md), so the fix is ``zip::URL``, not an extract."""
    scheme = location.split("://", 1)[0].lower()
    return StoreError(f"no store at {location!r} {seen + ' ' if seen else ''}and it names a zip file; a zip behind a URL is read as "
                      f"'zip::{location}' (storage options of the {scheme} layer then go under its scheme, e.g. "
                      f"--storage-option {scheme}.KEY=VALUE)")


def _zarr_v2(location: str) -> StoreError:
    return StoreError(f"{location!r} is a zarr v2 group (it has .zgroup), not a kdcache store (zarr v3); pass a store written by kdcache extract")


def _occupied(location: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether something that is not a store is at the location (never overwritten)."""
    if location_kind(location) == "local":
        path = Path(local_path(location))
        return path.exists() and (not path.is_dir() or any(path.iterdir()))
    if location_kind(location) != "url":
        return False  # zip and http are refused by zarr_store
    fs, path = filesystem(location, storage_options)
    return bool(fs.exists(path) and (fs.isfile(path) or fs.ls(path)))


# A chunk key below its array's folder (FORMAT.md §3.1: "c/0/0", "c" of a 0-d array; zarr v2's encoding "0.0", "0/0"),
# or a writer's temp file of one (§13.1); a file system's own records of a folder it showed (Finder's, Explorer's)
_CHUNK_KEY = re.compile(r"(c|[0-9]+)(/[0-9]+)*|([0-9]+\.)+[0-9]+")
_FOLDER_RECORDS = {".DS_Store", "Thumbs.db", "desktop.ini"}
OTHERS_NAMED = 5  # entries named in the refusal of an --overwrite of a folder that holds others


def _refuse_others(location: str, storage_options: dict[str, Any] | None, named: str) -> None:
    """Refuse an ``--overwrite`` of the store ``location`` whose folder (or object-store prefix: zarr deletes it whole too)
    holds files that are not the store's (``_others``), before anything is deleted, naming the first ``OTHERS_NAMED``: a
    training run, notes, a ``.git``."""
    others = _others(*_listing(location, storage_options))
    if others:
        shown = ", ".join(others[:OTHERS_NAMED]) + (f" and {len(others) - OTHERS_NAMED} more" if len(others) > OTHERS_NAMED else "")
        them = "it" if len(others) == 1 else "them"
        raise StoreError(f"{location!r} holds {count(len(others), 'entry', 'entries')} besides its store, which "
                         f"{option('--overwrite')} would delete with it: {shown}; move {them} out of the folder (or delete "
                         f"{them}), or choose another {named}")


def _listing(location: str, storage_options: dict[str, Any] | None) -> tuple[list[str], Callable[[str], bytes]]:
    """The keys of the files under the local store folder or object-store prefix ``location`` (a local link: ``KEY (a
    link)``; a local empty folder: ``KEY/``, which the --overwrite would delete too: a run's --out made ahead), and a
    read of the file at one of them."""
    if location_kind(location) == "local":
        folder = Path(local_path(location))
        keys = list(_folder_keys(folder, folders=True))
        above = {key[: i + 1] for key in keys for i, c in enumerate(key.rstrip("/")) if c == "/"}  # folders holding keys
        return [key for key in keys if key not in above], lambda key: (folder / key).read_bytes()
    fs, root = filesystem(location, storage_options)
    root = root.rstrip("/")
    try:
        keys = [k[len(root) + 1 :] for k in fs.find(root) if not k.endswith("/")]  # "KEY/": a console's folder marker, no data
    except Exception as e:  # noqa: BLE001 - botocore's errors are not all OSErrors; a torchrun rank 0's error must be kdcache's
        raise unreachable_error(location, e) from None
    return keys, lambda key: fs.cat_file(f"{root}/{key}")


def _others(keys: list[str], read: Callable[[str], bytes]) -> list[str]:
    """The entries of a store folder, its files' ``keys`` (``read``: a file's bytes), that are not its store's, sorted,
    each named once by its top entry (an empty folder's key, ``KEY/``, too)
    (``'run/'``, ``'notes.md'``, ``'old.zarr/' (a kdcache store)``). The store's are the ``zarr.json`` of each of its
    nodes (a folder with one whose parent is a node, the root first: a damaged or older store's too) that kdcache's layout
    has (``NODE_PATHS``), the chunk keys below such a node (``_CHUNK_KEY``), and writers' temp files of both; a node with
    a manifest of its own is another store, any other node someone else's zarr data (a user's group put in the folder)."""
    nodes = {""}  # a link's key, "KEY (a link)", is never the store's
    for key in sorted((k for k in keys if k.rpartition("/")[2] == "zarr.json"), key=lambda k: k.count("/")):
        if key.rpartition("/")[0].rpartition("/")[0] in nodes or "/" not in key:
            nodes.add(key.rpartition("/")[0])
    stores = sorted(n for n in nodes if n and _has_manifest(read, f"{n}/zarr.json"))
    ours = [n for n in nodes if NODE_PATHS.fullmatch(n)]
    found = set()
    for key in keys:
        if key.endswith("/") and (NODE_PATHS.fullmatch(key[:-1]) or _ARRAY_FOLDER.fullmatch(key[:-1])):
            continue  # an empty folder of the store's: a node's whose zarr.json is gone, an array's chunk folder
        inside = next((n for n in stores if key.startswith(n + "/")), None)
        owner = max((n for n in ours if n == "" or key.startswith(n + "/")), key=len)
        rest = key[len(owner) + 1 :] if owner else key
        if inside is not None:
            found.add(f"{inside + '/'!r} (a kdcache store)")
        elif not _of_the_store(rest, bool(re.fullmatch(ARRAY_PATHS, owner))):
            top, sep, _ = rest.partition("/")
            found.add(repr(f"{owner}/{top}{sep}".lstrip("/")).replace(" (a link)'", "' (a link)"))
    return sorted(found)


def _of_the_store(rest: str, array: bool) -> bool:
    """Whether ``rest``, a file's key below its node, is the node's ``zarr.json``, a chunk key of an ``array`` node (a
    group has none: a user's ``2024.06`` or ``samples/7/1`` in the folder was taken for one, and deleted by an
    --overwrite unnamed), a temp file of either (``.NAME.PID.tmp``, ``STEM.UUID.partial``: FORMAT.md §13.1), or a
    folder's record a file system made."""
    parent, _, name = rest.rpartition("/")
    if name in _FOLDER_RECORDS:
        return True
    if m := _TMP.fullmatch(name):
        name = m.group(1)
    elif m := _PARTIAL.fullmatch(name):
        name = "zarr.json" if m.group(1) == "zarr" else m.group(1)
    return f"{parent}/{name}".lstrip("/") == "zarr.json" or (array and bool(_CHUNK_KEY.fullmatch(f"{parent}/{name}".lstrip("/"))))


def _has_manifest(read: Callable[[str], bytes], meta: str) -> bool:
    """Whether the ``zarr.json`` at key ``meta`` (``read``) holds kdcache's manifest (a store's root); unreadable: not
    known, False."""
    try:
        return ATTRS in json.loads(read(meta)).get("attributes", {})
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def store_above(out: Path) -> Path | None:
    """The outermost kdcache store folder (its root ``zarr.json`` holds the manifest: its groups, ``targets/``, hold a
    ``zarr.json`` each too) that local path ``out`` is, or lies inside, as an absolute path; None where there is none. A
    folder a command writes there (a demo's, a training run's, a store's) is mixed with the store's files: an ``extract
    --overwrite`` of the store is refused while it is there, and ``pack`` leaves it out or copies it in. Someone else's
    zarr group above (a project's own hierarchy a store is put in) is no store: kdcache neither replaces nor packs it, and
    ``extract --out proj.zarr/kd.zarr`` was refused as "inside the store 'proj.zarr'". The folders above are those of the
    absolute path, ``..`` taken away: as spelled, ``../t2.zarr`` run inside a store took the working folder (the store)
    for a folder above it, and ``t.zarr/../t2.zarr`` took ``t.zarr``."""
    out = Path(os.path.abspath(out))
    stores = [d for d in (out, *out.parents) if _has_manifest(lambda key, d=d: (d / key).read_bytes(), "zarr.json")]
    return stores[-1] if stores else None


IDENTITY = {
    "teacher.weights_sha256": "teacher weights",
    "teacher.factory": "teacher factory",
    "dataset.factory": "dataset factory",
    "dataset.split": "dataset split",
    "dataset.length": "dataset length",
    "dataset.probe_fingerprints": "dataset fingerprints",
    "has_labels": "labels",
    "targets": "targets",
    "geometry": "chunk/shard geometry",
    "compression": "compression",
    "precision": "teacher precision",
    "fingerprint.algorithm": "fingerprint algorithm",
}


def create_or_resume(location: str | os.PathLike[str], manifest: Callable[[dict[str, Any] | None], dict[str, Any]], *,
                     overwrite: bool = False, storage_options: dict[str, Any] | None = None, named: str | None = None) -> Store:
    """Create a store or reopen a partial one made from the same inputs. ``manifest(existing)`` is the run's manifest,
    given the manifest of the store it would resume (None where it creates one): a resumed store keeps how it was
    made where the run can match it (its fingerprint algorithm).

    Resuming is refused when anything in ``IDENTITY`` differs (naming it); ``overwrite`` starts afresh.
    The arrays are created here, once, before any shard is written. ``named``: how the command that
    called names the location, for its messages (None: extract's, ``--out`` or ``out``). What it decides, and refuses,
    is ``resumable``'s, which a dry run asks alone.
    """
    store = resumable(location, manifest, overwrite=overwrite, storage_options=storage_options, named=named, mode="r+")
    if store is not None:
        return store
    location = str(location)
    target = zarr_store(location, storage_options, read_only=False, command="extract" if named is None else "import")
    try:
        return _create(location, target, manifest(None), storage_options)
    except OSError as e:
        raise _write_error(location, "the metadata", e) from None


def resumable(location: str | os.PathLike[str], manifest: Callable[[dict[str, Any] | None], dict[str, Any]], *,
              overwrite: bool = False, storage_options: dict[str, Any] | None = None, named: str | None = None,
              mode: str = "r") -> Store | None:
    """What ``create_or_resume`` decides, writing nothing: the store at ``location`` it would resume (opened with ``mode``:
    ``"r"`` for ``extract --dry-run``, which says what the run would do), refused where made from other inputs than
    ``manifest``'s; None where it would create one (refused where it may not: an occupied folder, someone else's zarr
    node, a location inside another store). The same refusals, in the same words, for the run and its dry run."""
    location, extract = str(location), named is None
    named = option("--out") if named is None else named
    zarr_store(location, storage_options, read_only=False, command="extract" if extract else "import")  # refuses zip, http
    interrupted = _interrupted_creation(location, storage_options)  # killed before its manifest was written: created again
    if exists(location, storage_options) and not overwrite and not interrupted and not _foreign_node(location, storage_options):
        store = open_store(location, mode=mode, storage_options=storage_options)
        ours = manifest(store.manifest)
        different = difference(store.manifest, ours)
        if different:
            same_factory = _get(store.manifest, "teacher.factory") == _get(ours, "teacher.factory")
            hint = (" (if the pipeline is unchanged, teacher.factory builds other weights on each call: seed it with "
                    "torch.manual_seed or load a checkpoint in it)") if different.startswith("different teacher weights") and same_factory else ""
            fix = (f"use the original pipeline to resume, or {option('--overwrite')} to start afresh" if extract else  # import has no pipeline
                   f"import the file it was made from to resume it, choose another {named}, or pass {option('--overwrite')} to replace it")
            raise StoreMismatchError(f"{location!r} was made with {different}{hint}; {fix}")
        return store
    if not interrupted:
        _refuse_replacing(location, overwrite, storage_options, named)  # again: the location may have changed since the early look
    return None


def refuse_replacing(location: str | os.PathLike[str], overwrite: bool, storage_options: dict[str, Any] | None = None) -> None:
    """What ``create_or_resume`` refuses from the location and ``overwrite`` alone, refused before a teacher is built
    (``extract``'s every path): an ``--overwrite`` of someone else's zarr group or of a folder holding other files, a
    location holding what is not a store. A store to resume (compared with the run's manifest later) passes, as does one
    whose creation was interrupted (created again)."""
    location = str(location)
    zarr_store(location, storage_options, read_only=False)  # refuses zip, http
    if exists(location, storage_options) and not overwrite and not _foreign_node(location, storage_options):
        return  # a store to resume
    try:
        _refuse_replacing(location, overwrite, storage_options, option("--out"))
    except StoreError:
        if not _interrupted_creation(location, storage_options):  # looked for only here: an S3 prefix is listed
            raise


def _refuse_replacing(location: str, overwrite: bool, storage_options: dict[str, Any] | None, named: str) -> None:
    """``refuse_replacing`` of a location whose creation was not interrupted; ``named``: how the command names it."""
    present = exists(location, storage_options)  # looked at once: on S3 each look is a request
    if not present and location_kind(location) == "local":  # a new store inside another's folder (runs/t.zarr/eval.zarr)
        outer = store_above(Path(local_path(location)).parent)
        if outer is not None:  # its --overwrite was then refused for it, and its pack copied it in as the store's objects
            raise StoreError(f"{location!r} is inside the store {str(outer)!r} (an --overwrite of that store, which deletes "
                             "everything in its folder, would be refused while this one is there, and its pack would copy this one in); "
                             f"choose another {named} outside the store folder (e.g. {str(outer.parent / Path(location).name)!r})")
    foreign = present and _foreign_node(location, storage_options)
    if foreign:  # without --overwrite too: a reader's "pass a store written by kdcache extract" is no fix for an OUT
        replaces = f"{option('--overwrite')} replaces only a kdcache store: " if overwrite else ""
        raise StoreError(f"{location!r} is a zarr {foreign} but not a kdcache store (no {ATTRS!r} root attribute); {replaces}"
                         f"choose another {named} or remove it")
    if overwrite and present and location_kind(location) in ("local", "url"):
        _refuse_others(location, storage_options, named)  # zarr's mode="w" deletes the folder (or prefix) whole
    if not present and _occupied(location, storage_options):  # never wipe other files
        # a store an --overwrite (or a removal) was deleting when it was killed: its root zarr.json may be gone first
        remains = _interrupted_creation(location, storage_options, remains=True)
        if not remains:
            raise StoreError(f"{location!r} {_not_a_store(location)}; choose another {named} or remove it")
        if not overwrite:
            raise StoreError(f"{location!r} holds what is left of a kdcache store whose deletion was stopped (its root zarr.json is "
                             f"gone: an {option('--overwrite')} killed while it replaced the store?); pass {option('--overwrite')} "
                             f"to replace it, or choose another {named}")


def _not_a_store(location: str) -> str:
    """What the occupied ``location`` is, said where it is another of kdcache's outputs (``pipeline.not_a_pipeline``: a
    training run's folder, an HDF5 export), so that the user knows which of their folders they named: ``import h5 RUN``
    of a run's folder said only "exists and is not a kdcache store"."""
    from kdcache.pipeline import not_a_pipeline  # kdcache's outputs, as a pipeline argument is told from them

    kind = not_a_pipeline(local_path(location)) if location_kind(location) == "local" else None
    if kind is None or kind.startswith("a zarr"):  # a folder with a root zarr.json is a store (or someone's zarr node)
        return "exists and is not a kdcache store"
    return f"is {kind}, not a kdcache store"


REDONE_NAMED = 5  # shards named, one line each, in the note on done shards whose objects are missing


def _say_redone(store: Store, lost: dict[int, str]) -> None:
    """The note (stderr, one line per shard, the first ``REDONE_NAMED``) on done shards ``resume_pending`` made pending."""
    for s, why in list(lost.items())[:REDONE_NAMED]:
        lo, hi = store.shard_rows(s)
        print(f"note: {store.location!r}: shard {s} (rows {lo}-{hi - 1}) was marked done but its {why}; it is pending "
              "again (rewritten whole, as a shard not done)", file=sys.stderr)
    more = len(lost) - REDONE_NAMED
    if more > 0:
        print(f"note: {store.location!r}: {count(more, 'more shard')} marked done {'misses' if more == 1 else 'miss'} objects; "
              f"{'it is' if more == 1 else 'they are'} pending again too", file=sys.stderr)


def _foreign_node(location: str, storage_options: dict[str, Any] | None) -> str | None:
    """``"group"`` or ``"array"`` where the root ``zarr.json`` at ``location`` parses as zarr metadata without kdcache's
    manifest (someone else's data), else None."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    try:
        buf = sync(zarr_store(location, storage_options).get("zarr.json", prototype=default_buffer_prototype()))
        meta = json.loads(buf.to_bytes()) if buf is not None else None
    except Exception:  # noqa: BLE001 - damaged or unreadable metadata: a damaged store may be overwritten
        return None
    if isinstance(meta, dict) and isinstance(meta.get("attributes", {}), dict) and ATTRS not in meta.get("attributes", {}):
        return "array" if meta.get("node_type") == "array" else "group"
    return None


def _interrupted_creation(location: str, storage_options: dict[str, Any] | None = None, *, remains: bool = False) -> bool:
    """Whether a local folder or an object-store prefix holds only what ``create_or_resume`` writes before the
    manifest: zarr metadata (and zarr temp files) of kdcache's groups and arrays, no data, and a root group without
    attributes (``_before_manifest``). ``remains``: or the chunks of kdcache's arrays too (and their temp files) — what is
    left of a store whose deletion (zarr's recursive delete of an ``--overwrite``, which may remove the root ``zarr.json``
    early) was stopped."""
    kind = location_kind(location)
    if kind == "url" and "::" not in location:
        fs, root = filesystem(location, storage_options)
        root = root.rstrip("/")
        try:
            keys = [k[len(root) + 1 :] for k in fs.find(root)]
            meta = json.loads(fs.cat_file(f"{root}/zarr.json")) if "zarr.json" in keys else {}
        except (OSError, ValueError):
            return False
        return _before_manifest(meta) and _only_creation_metadata(keys, remains)
    if kind != "local":
        return False
    folder = Path(local_path(location))
    try:
        meta = json.loads((folder / "zarr.json").read_text()) if (folder / "zarr.json").is_file() else {}
    except (OSError, ValueError):
        return False
    if not _before_manifest(meta) or not folder.is_dir():
        return False  # a store (the usual case: answered without listing it)
    # a generator: stops listing at the first file that is not such metadata
    return _only_creation_metadata(_folder_keys(folder, remains), remains)


def _before_manifest(meta: Any) -> bool:
    """Whether the root ``zarr.json`` ``meta`` (parsed; ``{}`` where there is none) is what ``_create`` writes before
    the manifest, a group without attributes: someone's empty group holding attributes of its own, or a zarr array with
    no chunk written (all its fill value), was taken for a creation interrupted and replaced, ``--overwrite`` or not."""
    return meta == {} or (isinstance(meta, dict) and meta.get("node_type") == "group" and not meta.get("attributes"))


def _folder_keys(folder: Path, folders: bool = False) -> Iterator[str]:
    """The keys of the files under ``folder`` (``folders``: and of its folders, ending in ``/``), not following links
    (a link, to a file or a folder, is yielded as a key that is no store's: ``KEY (a link)``)."""
    for parent, dirs, files in os.walk(folder):  # a link to a folder is in dirs, not walked into
        here = Path(parent)
        for name in [*files, *dirs]:
            key = (here / name).relative_to(folder).as_posix()
            if (here / name).is_symlink():
                yield f"{key} (a link)"
            elif name in files or folders:
                yield key if name in files else f"{key}/"


# kdcache's arrays (FORMAT.md §3) and the folders of their chunk keys, which name a chunk of each dimension (``c/0``, ``c/3/0/0``)
_ARRAY_FOLDER = re.compile(f"({ARRAY_PATHS})/c(/[0-9]+)*")


def _only_creation_metadata(keys: Iterable[str], remains: bool = False) -> bool:
    """Whether ``keys`` (at least one) are all zarr metadata (or zarr's temp files of it) of kdcache's nodes.
    ``remains``: or chunks of kdcache's arrays or their temp files (``.NAME.PID.tmp``, ``NAME.UUID.partial``), or folders
    (keys ending in ``/``) of kdcache's nodes and chunks."""
    found = False
    for key in keys:
        parent, _, name = key.rpartition("/")
        if remains and key.endswith("/"):  # a folder
            ok = bool(NODE_PATHS.fullmatch(parent) or _ARRAY_FOLDER.fullmatch(parent))
        elif remains and _ARRAY_FOLDER.fullmatch(parent):  # a chunk, or a chunk's temp file: .NAME.PID.tmp, NAME.UUID.partial
            m = _TMP.fullmatch(name) or _PARTIAL.fullmatch(name)
            ok = bool(re.fullmatch("[0-9]+", m.group(1) if m else name))
        else:
            ok = (name == "zarr.json" or (name.startswith("zarr.") and name.endswith(".partial"))) and bool(NODE_PATHS.fullmatch(parent))
        if not ok:
            return False
        found = True
    return found


def fingerprint_algorithm(manifest: dict[str, Any]) -> Any:
    """The fingerprint algorithm a manifest records (FORMAT.md §9; None where a damaged one has none)."""
    return manifest["fingerprint"].get("algorithm") if isinstance(manifest.get("fingerprint"), dict) else None


def check_layer_names(names: list[str]) -> None:
    """Refuse layer names whose array paths differ only in case (FORMAT.md §6: ``Conv`` / ``conv`` collide on a
    case-insensitive file system, macOS's and Windows' default, where one array would overwrite the other)."""
    seen: dict[str, str] = {}
    for name in names:
        key = layer_path(name).casefold()
        if key in seen and seen[key] != name:
            raise PipelineError(f"layer names {seen[key]!r} and {name!r} differ only in case: their arrays would be one folder on a "
                             "case-insensitive file system (macOS, Windows); keep one of them in targets.layers, or hook a parent module")
        seen.setdefault(key, name)


def _create(location: str, target: Any, manifest: dict[str, Any], storage_options: dict[str, Any] | None) -> Store:
    targets = manifest.get("targets")
    topk = isinstance(targets, dict) and any(isinstance(t, dict) and t.get("topk") for t in targets.values())
    manifest = dict(manifest, format=FORMAT, format_version=TOPK_FORMAT_VERSION if topk else FORMAT_VERSION, created=_now(), completed=None)
    if isinstance(targets, dict):  # before anything is written (extract checks its pipeline's names earlier still)
        check_layer_names([t["name"] for t in targets.values() if isinstance(t, dict) and t.get("source")])
        if len(targets) > MAX_TARGETS:
            raise StoreError(f"{len(targets):,} targets to write to {location!r}, more than a store may hold ({MAX_TARGETS:,}: "
                             "FORMAT.md §8); hook fewer layers (targets.layers); nothing was written")
    # The whole layout is built in memory first: whatever zarr refuses (a codec setting, a shape, a manifest
    # that is not JSON) fails there, before mode="w" deletes the store an --overwrite replaces.
    try:
        write_layout(zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3), manifest, location)
    except StoreError as e:
        raise StoreError(f"{e}; nothing was written (a store already there is kept)") from None
    group = zarr.open_group(target, mode="w", zarr_format=3)
    write_layout(group, manifest, location)
    return Store(group, location, writable=True, storage_options=storage_options)


def write_layout(group: zarr.Group, manifest: dict[str, Any], location: str) -> None:
    """Create every array of ``manifest`` in the empty ``group``, then write the manifest."""
    what = "the manifest"
    try:
        geometry = manifest["geometry"]
        rows, n = geometry["rows_per_shard"], manifest["num_samples"]
        columns = {INDEX: ((), "int64"), FINGERPRINT: ((), "uint64")}
        if manifest["has_labels"]:
            columns[LABEL] = ((), "int64")
        for t in manifest["targets"].values():
            columns |= {path: (tuple(shape), dtype) for path, (shape, dtype) in Target.from_dict(t).arrays.items()}
        what = "the compression"
        level = manifest["compression"]["level"]
        compressors = [ZstdCodec(level=level), Crc32cCodec()] if manifest["compression"]["codec"] == "zstd" else [Crc32cCodec()]
        for path, (shape, dtype) in columns.items():
            what = f"array {path!r}"
            group.create_array(
                path,
                shape=(n, *shape),
                chunks=(geometry["chunk_rows"][path], *shape),
                shards=(rows, *shape),
                dtype=dtype,
                compressors=compressors,
                fill_value=0,
                dimension_names=["sample", *[f"dim_{i}" for i in range(len(shape))]],
            )
        what = f"array {DONE!r}"
        group.create_array(DONE, shape=(geometry["num_shards"],), chunks=(1,), dtype="bool", fill_value=False, compressors=None)
        what = f"array {DIGEST!r}"
        group.create_array(DIGEST, shape=(geometry["num_shards"], len(columns)), chunks=(1, len(columns)), dtype="uint32",
                           fill_value=0, compressors=None)
        what = "the manifest"
        group.attrs[ATTRS] = manifest  # last: a store without its manifest is never mistaken for one
    except BAD_METADATA as e:  # zarr's checks of what it is given: a chunk of 0 rows divides by zero
        raise StoreError(f"cannot create a store at {location!r}: {what}: {type(e).__name__}: {str(e)[:200]}") from None


def check_manifest(m: dict[str, Any], location: str) -> None:
    """Refuse a manifest whose core keys have the wrong type or point outside the layout (a crafted or
    damaged store must give an error, never a traceback or an array path of its choosing)."""
    n, rows = _check_counts(m, location)
    _check_provenance(m, location)
    _check_probes(m, location, n)
    targets = _check_targets(m, location, rows)
    row = 8 * (3 if m["has_labels"] else 2) + sum(Target.from_dict(t).row_bytes for t in targets.values())
    if rows * row > MAX_SHARD_BYTES:  # a whole-shard read's buffer would be larger: a kdcache writer never makes such a store
        raise _bad_manifest(location, "geometry.rows_per_shard", rows, f"at most {MAX_SHARD_BYTES // row} ({row} bytes per row in all the data "
                       f"arrays; a shard holds at most {MAX_SHARD_BYTES // 2**30} GiB of them decoded, FORMAT.md §3.1)")


def _bad_manifest(location: str, key: str, value: Any, want: str) -> StoreError:
    """The error for the manifest of the store at ``location``: ``key`` holds ``value``, where ``want`` belongs."""
    return DamagedStoreError(f"{location!r} has a damaged manifest: {key} = {short(value)}, expected {want}; re-extract or re-import the store")


def _manifest_int(m: dict[str, Any], location: str, key: str, lo: int = 0) -> int:
    """The manifest's integer at the dotted ``key``, refused unless ``lo <= value < 2**62`` (not a bool)."""
    value = _get(m, key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < 2**62:
        raise _bad_manifest(location, key, value, f"an integer >= {lo}")
    return value


def _check_counts(m: dict[str, Any], location: str) -> tuple[int, int]:
    """Refuse a manifest whose sample, shard and row counts do not fit together (or a store of more shards than one
    reads markers for), or without ``has_labels``, ``teacher`` and ``dataset``; returns ``(num_samples, rows_per_shard)``."""
    integer = functools.partial(_manifest_int, m, location)
    n, rows, shards = integer("num_samples", 1), integer("geometry.rows_per_shard", 1), integer("geometry.num_shards", 1)
    if shards != max(1, math.ceil(n / rows)):
        raise _bad_manifest(location, "geometry.num_shards", shards, f"ceil({n} / {rows})")
    if shards > MAX_SHARDS:  # one done marker each, read whole: 2**30 of them would take every byte of memory
        raise _bad_manifest(location, "geometry.num_shards", shards, f"at most {MAX_SHARDS} (a store that large has larger shards)")
    if not isinstance(m.get("has_labels"), bool):
        raise _bad_manifest(location, "has_labels", m.get("has_labels"), "true or false")
    for key in ("teacher", "dataset"):
        if not isinstance(m.get(key), dict):
            raise _bad_manifest(location, key, m.get(key), "an object")
    integer("teacher.num_parameters")
    if integer("dataset.length") != n:  # FORMAT.md §4: row r is dataset item index[r], and every item is a row
        raise _bad_manifest(location, "dataset.length", _get(m, "dataset.length"), f"num_samples ({n})")
    return n, rows


def _check_provenance(m: dict[str, Any], location: str) -> None:
    """Refuse a manifest whose teacher, dataset, version and time strings, ``compression`` or ``precision`` have the wrong type."""
    for key in ("teacher.factory", "teacher.class", "teacher.weights_sha256", "dataset.factory", "dataset.split", "kdcache_version", "created"):
        if not isinstance(_get(m, key), str):
            raise _bad_manifest(location, key, _get(m, key), "a string")
    if m.get("completed") is not None and not isinstance(m["completed"], str):
        raise _bad_manifest(location, "completed", m["completed"], "an ISO-8601 time string or null")
    if "compression" in m and not isinstance(m["compression"], dict):  # has_digests reads compression.shard_digests
        raise _bad_manifest(location, "compression", m["compression"], "an object")
    if "precision" in m and not isinstance(m["precision"], str):  # verify --teacher-check looks its tolerance up by it
        raise _bad_manifest(location, "precision", m["precision"], "'fp32', 'bf16' or 'fp16'")


def _check_probes(m: dict[str, Any], location: str, n: int) -> None:
    """Refuse ``dataset.probe_fingerprints`` unless it maps row numbers below ``n`` to 16 lowercase hex digits."""
    probes = _get(m, "dataset.probe_fingerprints")  # training fingerprints these dataset items before anything is served
    if not isinstance(probes, dict) or not probes:
        raise _bad_manifest(location, "dataset.probe_fingerprints", probes, '{"0": "<16 hex digits>", "<N-1>": ...}')
    for i, fp in probes.items():
        if not (i.isascii() and i.isdecimal() and int(i) < n) or not (isinstance(fp, str) and re.fullmatch("[0-9a-f]{16}", fp)):
            raise _bad_manifest(location, f"dataset.probe_fingerprints.{str(i)[:80]}", fp, f"16 lowercase hex digits under a row number below {n}")


def _check_targets(m: dict[str, Any], location: str, rows: int) -> dict[str, Any]:
    """Refuse a manifest without targets, or with a target (``_check_target``) or a ``geometry.chunk_rows`` entry (an
    integer in 1..``rows``) out of place; returns the targets."""
    targets, chunk_rows = m.get("targets"), _get(m, "geometry.chunk_rows")
    if not isinstance(targets, dict) or not targets:
        raise _bad_manifest(location, "targets", targets, "a non-empty object")
    if not isinstance(chunk_rows, dict):
        raise _bad_manifest(location, "geometry.chunk_rows", chunk_rows, "an object")
    if len(targets) > MAX_TARGETS:
        raise DamagedStoreError(f"{location!r} has a damaged manifest: targets declares {len(targets):,} targets, expected at most "
                         f"{MAX_TARGETS:,} (a reader's limit, FORMAT.md §8); re-extract the store hooking fewer layers")
    for name, t in targets.items():
        _check_target(location, name, t)
        _check_topk(location, name, t, m.get("format_version"))
    for path, c in chunk_rows.items():
        if not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= rows:
            raise _bad_manifest(location, f"geometry.chunk_rows.{str(path)[:80]}", c, f"an integer in 1..{rows}")
    return targets


def _check_target(location: str, name: str, t: Any) -> None:
    """Refuse the manifest's target ``name`` unless it is an object of its own name, a string source and select, the
    array path its name gives (never one of its choosing), a list of sizes and a stored dtype."""
    at = f"targets.{str(name)[:80]}"
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t.get("name"):
        raise _bad_manifest(location, at, t, "a target object")
    if t["name"] != name:  # FORMAT.md §8: readers look a target up by its key, and read the array of its name
        raise _bad_manifest(location, f"{at}.name", t["name"], repr(name))
    for key in ("source", "select"):  # read by every command (Target.from_dict): a missing one was a KeyError traceback
        if not isinstance(t.get(key), str):
            raise _bad_manifest(location, f"{at}.{key}", t.get(key), "a string")
    if not isinstance(t.get("mask", ""), str):  # optional: written where targets.mask pooled the target (FORMAT.md §8)
        raise _bad_manifest(location, f"{at}.mask", t["mask"], "a string")
    want = LOGITS if t.get("source") == "" else layer_path(t["name"])
    legacy = want.replace("%7E", "~")  # the first 0.1.0 commit left ``~`` unencoded (FORMAT.md §6); only that differs
    if t.get("path") not in (want, legacy) or (t["source"] != "" and t["source"] != t["name"]):
        raise _bad_manifest(location, f"{at}.path", t.get("path"), repr(want))
    shape = t.get("shape")
    if not isinstance(shape, list) or len(shape) > 32 or not all(isinstance(d, int) and 1 <= d < 2**40 for d in shape):
        raise _bad_manifest(location, f"{at}.shape", shape, "a list of sizes of at least 1")
    if t.get("dtype") not in ("float16", "float32"):
        raise _bad_manifest(location, f"{at}.dtype", t.get("dtype"), "'float16' or 'float32'")


def _check_topk(location: str, name: str, t: dict[str, Any], version: int) -> None:
    """Refuse a target's ``topk`` / ``classes`` (FORMAT.md §5.1) unless both are absent, or the model's output holds its
    ``topk`` largest values of ``classes`` (topk <= classes, the last axis of its shape) in a store of format version 2."""
    at = f"targets.{str(name)[:80]}"
    topk, classes = t.get("topk", 0), t.get("classes", 0)
    if not topk and not classes:
        return
    if type(topk) is not int or topk < 1 or t["source"] != "" or not t["shape"] or topk != t["shape"][-1]:
        raise _bad_manifest(location, f"{at}.topk", topk, f"the last size of its shape {t['shape']} (top-k values of the model's output only)")
    if type(classes) is not int or not topk <= classes < 2**31:  # the classes are stored as int32
        raise _bad_manifest(location, f"{at}.classes", classes, f"an integer from topk ({topk}) to 2**31 - 1 (its classes are int32)")
    if version != TOPK_FORMAT_VERSION:
        raise _bad_manifest(location, "format_version", version, f"{TOPK_FORMAT_VERSION} in a store of top-k logits")


def topk_info(t: Target) -> dict[str, Any]:
    """What ``info`` and a dry run add for a top-k target: K, the class count, the classes' array, and the bytes per sample
    it saves against the full logits (the values and classes stored, against every class's value)."""
    if not t.topk:
        return {}
    full = math.prod(t.output_shape) * np.dtype(t.dtype).itemsize
    return {"topk": t.topk, "classes": t.classes, "indices_path": LOGITS_INDICES, "bytes_per_sample_full": full,
            "bytes_per_sample_saved": full - t.row_bytes}


def _bounded(value: Any, limit: int = 1000, depth: int = 6) -> Any:
    """A copy of a JSON value safe to print: long strings cut, big containers and deep nesting elided."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"... ({len(value):,} characters)"
    if depth <= 0 and isinstance(value, (dict, list)):
        return "..."
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k)[:limit]: _bounded(v, limit, depth - 1) for k, v in items[:100]}
        return out | ({"...": f"{len(items) - 100} more keys"} if len(items) > 100 else {})
    if isinstance(value, list):
        return [_bounded(v, limit, depth - 1) for v in value[:100]] + ([f"... {len(value) - 100} more"] if len(value) > 100 else [])
    return value


def printable(line: str) -> str:
    """``line`` with every character that is not printable escaped (``\\x1b``, ``\\n``): a store's strings (teacher
    class, layer names) come from whoever made it, and an escape sequence or a line break printed raw would reach the
    terminal (set its title, clear it, add a line that is not kdcache's)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def _get(d: dict[str, Any], dotted: str, absent: Any = None) -> Any:
    """The value at ``dotted`` in nested dicts; ``absent`` where a key on the way is missing."""
    for part in dotted.split("."):
        d = d.get(part, absent) if isinstance(d, dict) else absent  # type: ignore[assignment]
    return d


def _zip_member_now(location: str, key: str) -> bytes | None:
    """The member ``key`` of the local zip file at ``location`` now, opened anew; None where the file or the member is not
    there, or the file is no readable zip (being written, another file) or the member larger than metadata may be."""
    try:
        with open_zip(location) as z:
            info = z.getinfo(key)
            return z.read(info) if info.file_size <= MAX_METADATA_BYTES else None
    except (FileNotFoundError, KeyError, zipfile.BadZipFile, KdcacheError):
        return None


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes a store the one it is: its manifest, but for ``completed`` (set when a store being written is finished:
    a reader of a partial store reads only shards done when it began, a writer of one goes on writing it)."""
    return {k: v for k, v in manifest.items() if k != "completed"}


def reopen_same(location: str, storage_options: dict[str, Any] | None, was: dict[str, Any], when: str, then: str) -> Store:
    """The store at ``location`` opened again, refused unless its identity is ``was`` (``check_same_store``); one that
    does not open now (removed, or not yet whole again: a replacement under way) was removed or replaced ``when``, a
    ``StoreReplacedError`` too (not "no store there; run kdcache extract"). An unreachable location is its own error."""
    try:
        store = open_store(location, storage_options=storage_options)
    except UnreachableError:
        raise
    except KdcacheError as e:
        raise StoreReplacedError(f"{location!r} was removed or replaced {when}: it does not open now ({one_line(e, 200)}); "
                                 "rerun once the store is in place again") from None
    check_same_store(location, was, identity(store.manifest), when, then)
    return store


def check_same_store(location: str, was: dict[str, Any], now: dict[str, Any], when: str, then: str) -> None:
    """Refuse the store at ``location`` unless its identity ``now`` is ``was`` (``identity``): it was replaced ``when``."""
    if now != was:
        key = next(k for k in sorted(set(now) | set(was)) if now.get(k) != was.get(k))
        raise StoreReplacedError(f"{location!r} was replaced {when}: its manifest's {key} was {short(was.get(key))} when {then} and is "
                         f"{short(now.get(key))} now (another kdcache extract --overwrite, or a copy over it?); rerun against the "
                         "store as it is now, and keep a store in place while a run reads it (its rows would mix with the other store's)")


def difference(stored: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    """The first ``IDENTITY`` difference between a store's manifest and a new run's, in words
    (``different teacher weights (teacher.weights_sha256: store has '…', now '…')``); None when they agree.
    A store of kdcache <= 0.1.1 has no ``compression.shard_digests``: it is resumed as it was made (with digests
    where it has ``progress/digest``)."""
    compression, was = manifest.get("compression"), stored.get("compression")
    if isinstance(compression, dict) and isinstance(was, dict) and "shard_digests" not in was:  # a damaged one: named below
        manifest = {**manifest, "compression": {k: v for k, v in compression.items() if k != "shard_digests"}}
    for key, what in IDENTITY.items():
        if _get(stored, key) != _get(manifest, key):
            key, old, new = _difference(key, _get(stored, key, _ABSENT), _get(manifest, key, _ABSENT))
            if old is _ABSENT:  # a key one of them lacks (a full-logits store resumed with targets.topk): "store has None" said
                return f"different {what} (the store has no {key}, now {short(new)})"
            return f"different {what} ({key}: store has {short(old)}, now {'none' if new is _ABSENT else short(new)})"
    return None


_ABSENT = object()  # a manifest key one manifest has and the other lacks, as difference() names it


def _difference(key: str, old: Any, new: Any) -> tuple[str, Any, Any]:
    """The dotted key and values of the first leaf where two manifest values differ (``_ABSENT`` for a missing key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            if old.get(k) != new.get(k):
                return _difference(f"{key}.{k}", old.get(k, _ABSENT), new.get(k, _ABSENT))
    return key, old, new


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
