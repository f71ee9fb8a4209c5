"""Hand-over formats: a single ``.zarr.zip`` file (``pack``) and HDF5 (``export`` / ``import_hdf5``).

Everything streams one shard (or one storage object) at a time, so memory stays bounded by the
largest shard whatever the store's size. The HDF5 layout is specified in docs/FORMAT.md §16.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import sys
import zipfile
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, NamedTuple

import google_crc32c
import numpy as np

from kdcache import locking, storage, store as layout, threads
from kdcache.errors import DamagedShardError, DamagedStoreError, StoreError, need, one_line, option, short, write_fix

HDF5_LAYOUT_VERSION = 1
HDF5_COMPRESSION = ("gzip", "lzf", "none")


def pack(location: str | os.PathLike[str], out: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
         overwrite: bool = False) -> dict[str, Any]:
    """Copy a finished store, object by object, into one uncompressed zip file ``out`` (read back as a store).

    A zip is write-once, so only a complete store whose done shards all have their objects is packed. Only the
    store's objects are copied (FORMAT.md §17: the zarr metadata of its groups and arrays, the chunk objects of its
    arrays); any other file found in it (a notebook's checkpoints, notes, an old export) is left out, named in a
    note on stderr and in the result's ``left_out``. Each object is streamed from a local folder (read whole, at most
    its array's object bound, from elsewhere). The file appears only once whole and read back as a store (written
    beside it as ``OUT.TOKEN.part`` and renamed; one a killed pack left is removed by the next pack or export to OUT).
    """
    location, out = storage.location_arg(location, "location"), storage.location_arg(out, "out")
    storage.options_arg(storage_options)
    overwrite = storage.flag_arg(overwrite, "overwrite")
    _local_out(out)
    out = Path(out)
    if not out.name.endswith(".zip"):
        raise StoreError(f"pack writes a zip file; name it *.zarr.zip, not {str(out)!r}")
    storage.refuse_inside_store(location, out, "OUT", "it would replace or add one of its objects")
    _check_out(out, overwrite)
    dest = _written(out)
    # writers kept out from before the manifest is read until the zip is in place: an extract resuming the store, or an
    # --overwrite with another teacher, started meanwhile would put the manifest of one moment and the shards of another in it
    with locking.reading_lock(location, storage_options, "pack") as held:
        store = _complete(location, storage_options, "pack")
        _check_replaced(out, "pack")  # after the store is opened: a mistyped STORE is named first
        _check_objects(store, "pack")
        _check_layout(store, "pack")
        keys, strays, bounds, sharded = _store_objects(store)
        unchecked = unchecked_arrays(store)
        part = _part_name(dest)
        nbytes = 0
        with _writing(part, dest), _part_file(part, dest) as fd, open(fd, "w+b", closefd=False) as f:
            # Chunks are already compressed: ZIP_STORED keeps byte-range reads of shards possible.
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
                for key, fetched in zip(keys, _fetched(store, keys, bounds)):
                    nbytes += _copy_object(store, key, bounds, sharded, z, fetched)
            f.flush()
            _check_objects(_complete(f"zip::{part}", None, "pack"), "pack")  # it opens as a complete store, with every shard object
            held()
            _put_in_place(fd, part, dest)
    if strays:
        named = ", ".join(repr(k) for k in strays[:STRAYS_NAMED]) + (f" and {len(strays) - STRAYS_NAMED} more" if len(strays) > STRAYS_NAMED else "")
        print(f"note: left out {len(strays)} {'file' if len(strays) == 1 else 'files'} of {store.location!r} that "
              f"{'is not an object' if len(strays) == 1 else 'are not objects'} of the store (FORMAT.md §17): {named}", file=sys.stderr)
    if unchecked:
        print(f"note: copied {', '.join(map(repr, unchecked))} of {store.location!r} without a checksum check: "
              f"{'its chunks carry' if len(unchecked) == 1 else 'their chunks carry'} no crc32c (not sharded with crc32c "
              "checksums as kdcache writes them, FORMAT.md §3.1: rewritten by another tool?)", file=sys.stderr)
    return {"out": str(out), "objects": len(keys), "bytes": nbytes, "file_bytes": out.stat().st_size, "left_out": strays,
            "unchecked": unchecked}


STRAYS_NAMED = 5  # files left out by pack named in its note


def _store_objects(store: layout.Store, skip: Collection[str] = ()) -> tuple[list[str], list[str], dict[str, int | None], dict[str, _Sharded]]:
    """``(objects, strays, bounds, sharded)``: the keys of the store's objects (FORMAT.md §17), sorted; the other keys
    listed at its location (sorted); for each array path the most bytes one of its chunk objects may hold (an array
    that is not kdcache's: ``_foreign_bound``); and the arrays whose chunk objects' checksums pack checks (``_sharded``).

    An object is the ``zarr.json`` of a node of the zarr hierarchy (the root group, and any group or array whose
    parent is a group of it: an array a later kdcache adds, FORMAT.md §14, is one), or a chunk object of an array of it
    (a key its chunk key encoding gives for a chunk of its grid). The objects kdcache's layout names are always copied
    (a location without a listing: an http server without index pages). ``skip``: folders not listed (``Store.object_keys``),
    whose objects are those kdcache's layout names alone."""
    listed = set(store.object_keys(skip))
    outside = {key for key in listed if not _plain_key(key)}
    listed -= outside
    named = _layout_keys(store)
    kdcache_arrays = _kdcache_arrays(store)
    bounds: dict[str, int | None] = {path: layout._object_bound(store.array(path)) for path in kdcache_arrays}
    nodes: dict[str, dict[str, Any]] = {key[: -len("zarr.json")].rstrip("/"): {"node_type": "group"}  # the store opened: they are
                                        for key in named if key.endswith("zarr.json")}  # groups, whatever their zarr.json says
    nodes.update({path: store.array(path).metadata.to_dict() for path in kdcache_arrays})
    for key in sorted((k for k in listed if k == "zarr.json" or k.endswith("/zarr.json")), key=lambda k: k.count("/")):
        path = key[: -len("zarr.json")].rstrip("/")
        if path in nodes or nodes.get(path.rpartition("/")[0], {}).get("node_type") != "group":
            continue  # kdcache's own, or not under a group of the hierarchy (root's parent: none)
        meta = _metadata(store, key)
        if meta is not None:
            nodes[path] = meta
            if meta["node_type"] == "array":
                bounds[path] = _foreign_bound(meta)
    arrays = {path for path, meta in nodes.items() if meta["node_type"] == "array"}
    objects, strays = set(named), sorted(outside)
    for key in sorted(listed - named):
        if key == "zarr.json" or key.endswith("/zarr.json"):
            found = key[: -len("zarr.json")].rstrip("/") in nodes
        else:
            owner = _array_of(arrays, key)
            found = owner is not None and _is_chunk_key(key[len(owner) + 1:], nodes[owner])
        if found:
            objects.add(key)
        else:
            strays.append(key)
    sharded = {path: found._replace(added=path not in kdcache_arrays) for path in arrays if (found := _sharded(nodes[path])) is not None}
    return sorted(objects), sorted(strays), bounds, sharded


def unchecked_arrays(store: layout.Store) -> list[str]:
    """The data arrays whose chunks carry no crc32c checksums (not of ``_sharded``'s shape, as kdcache writes them: an
    array another tool rewrote), which ``pack`` copies and ``verify`` decodes unchecked."""
    return [path for path in store.paths() if _sharded(store.array(path).metadata.to_dict()) is None]


def _kdcache_arrays(store: layout.Store) -> list[str]:
    """The paths of the arrays of kdcache's layout in ``store`` (FORMAT.md §3): its data arrays, its done markers' and digests'."""
    return store.paths() + [layout.DONE] + ([layout.DIGEST] if store.has_digests() else [])


def check_added_arrays(store: layout.Store) -> tuple[list[str], list[str], list[str]]:
    """``(checked, unchecked, problems)`` for the arrays added to the store (FORMAT.md §14: not kdcache's), found as
    ``pack`` finds them (``_store_objects``): those whose chunk objects have the shape pack checks (``_sharded``), each
    object's checksums checked as pack checks them as it copies it (``_Checksums``, on the object read whole, at most its
    bound); the others, not checked (pack copies them as they are); and each damaged object, named (``kdcache verify``)."""
    # kdcache's arrays' chunk folders are not listed: an added array is not in them, and over http each is an index page
    ours = _kdcache_arrays(store)
    keys, _, bounds, sharded = _store_objects(store, skip={f"{path}/c" for path in ours})
    added = sorted(path for path in bounds if path not in ours)
    problems = []
    for key in keys:
        owner, bound = _owner(bounds, key)
        if owner not in added or owner not in sharded or key.endswith("/zarr.json"):
            continue
        try:
            data = store.raw_object(key, at_most=bound)
            if data is not None:  # absent: the fill value, as an array's every reader reads it
                _check_whole(sharded[owner], store.location, owner, key, data)
        except DamagedShardError as e:
            problems.append(e.problem)
        except DamagedStoreError as e:  # larger than it can be, a zip member failing its CRC-32: the error names it
            problems.append(f"array {owner!r}: {one_line(e)}")
    return [p for p in added if p in sharded], [p for p in added if p not in sharded], problems


def _owner(bounds: dict[str, int | None], key: str) -> tuple[str | None, int | None]:
    """``(array, bound)``: the array of ``bounds`` (array path → bound) whose object ``key`` is (None: no array's) and
    the most bytes the object may hold (``storage.object_at_most``; an array's chunk object of any key encoding or grid:
    its array's bound)."""
    owner = _array_of(bounds, key)
    bound = storage.object_at_most(bounds, key)
    if bound is None and owner is not None:  # a chunk object of an array of another key encoding ("0.0"), or of its every key (another grid)
        bound = bounds[owner]
    return owner, bound


def _array_of(paths: Collection[str], key: str) -> str | None:
    """The longest of ``paths`` (array paths) that ``key`` lies under (``PATH/...``), None: none. Looked up by the key's
    own parent folders, a few each, not by trying every path: pack and verify ask it for each object, and trying every
    array was objects x arrays (0.6 s of pack's 7.2 s at 200 arrays of 100 shards, growing with the arrays squared)."""
    parent = key
    while "/" in parent:
        parent = parent.rpartition("/")[0]
        if parent in paths:
            return parent
    return None


def _plain_key(key: str) -> bool:
    """Whether ``key`` is a relative path of named parts (no empty, ``.`` or ``..`` part, no ``\\``), as every key of a
    store object is. A listing may give any other (a received zip's member names, an S3 key, an http index page's
    links): taken for an object, it became a member of the zip pack writes that unzips outside its folder
    (``../zarr.json``, ``/abs/zarr.json``) or over another member (``./zarr.json``, ``targets//zarr.json``)."""
    return "\\" not in key and all(part not in ("", ".", "..") for part in key.split("/"))


def _metadata(store: layout.Store, key: str) -> dict[str, Any] | None:
    """The zarr v3 metadata of a group or array (``node_type`` ``group``/``array``) in the object ``key``; None for
    anything else (not JSON, another zarr version, unreadable): not a node of the store."""
    try:
        raw = store.raw_object(key, at_most=storage.MAX_METADATA_BYTES)
        meta = json.loads(raw) if raw is not None else None
    except (StoreError, ValueError, RecursionError):
        return None
    if isinstance(meta, dict) and meta.get("zarr_format") == 3 and meta.get("node_type") in ("group", "array"):
        return meta
    return None


def _foreign_bound(meta: dict[str, Any]) -> int:
    """At most how many bytes a chunk object of an array kdcache did not write holds (FORMAT.md §13), by its zarr v3
    metadata ``meta`` (``_encoded_bound``); ``layout.MAX_SHARD_BYTES`` where the metadata gives no fixed size (a data
    type of variable size, another chunk grid). A server may send any number of bytes for it, and from elsewhere than a
    local folder it is read whole."""
    try:
        chunk = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        bound = _encoded_bound(chunk, np.dtype(meta["data_type"]).itemsize, meta["codecs"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return layout.MAX_SHARD_BYTES
    return layout.MAX_SHARD_BYTES if bound is None else bound


def _encoded_bound(chunk: list[int], itemsize: int, codecs: list[dict[str, Any]]) -> int | None:
    """At most how many bytes a chunk of shape ``chunk`` (items of ``itemsize`` bytes) takes encoded by ``codecs``: ``2c
    + 128`` for its ``c`` bytes (any codec's worst case, with room to spare); sharded, each inner chunk's bound (a
    shard itself, where the inner codecs shard again) and the shard's index. None: no fixed size."""
    sharding = next((c["configuration"] for c in codecs if c.get("name") == "sharding_indexed"), None)
    if itemsize == 0 or min(chunk, default=1) < 1:
        return None
    if sharding is None:
        return 2 * int(np.prod(chunk)) * itemsize + 128
    inner = [int(n) for n in sharding["chunk_shape"]]
    each = _encoded_bound(inner, itemsize, sharding["codecs"]) if len(inner) == len(chunk) else None
    if each is None:
        return None
    return int(np.prod([-(-n // i) for n, i in zip(chunk, inner)])) * (each + 16) + 4  # inner chunks, 16 index bytes each


def _is_chunk_key(suffix: str, meta: dict[str, Any] | None) -> bool:
    """Whether ``suffix`` (a key less its array's path and ``/``) names a chunk object of the array whose zarr v3
    metadata is ``meta``: the key its chunk key encoding (``default`` or ``v2``) gives for a chunk of its regular grid.
    An array on another chunk grid or key encoding (not kdcache's) owns every key under it."""
    try:
        shape, encoding = list(meta["shape"]), meta["chunk_key_encoding"]  # type: ignore[index]
        name = encoding["name"] if isinstance(encoding, dict) else encoding
        separator = (encoding.get("configuration") or {}).get("separator") if isinstance(encoding, dict) else None
        separator = separator or ("/" if name == "default" else ".")
        if meta["chunk_grid"]["name"] != "regular" or name not in ("default", "v2"):  # type: ignore[index]
            return True
        chunk = list(meta["chunk_grid"]["configuration"]["chunk_shape"])  # type: ignore[index]
        parts = suffix.split(separator)
        if name == "default":
            if parts[0] != "c":
                return False
            parts = parts[1:] if shape else (parts[1:] if len(parts) > 1 else [])
        elif not shape:
            return suffix == "0"
        return (len(parts) == len(shape) == len(chunk) and all(p.isdigit() and p == str(int(p)) for p in parts)
                and all(int(p) < max(1, -(-n // c)) for p, n, c in zip(parts, shape, chunk)))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError):
        return False


def _fetched(store: layout.Store, keys: list[str], bounds: dict[str, int | None]) -> Iterator[Future[bytes | None] | None]:
    """For each of ``keys`` of a store not in a local folder, its bytes (``raw_object``, at most its bound) as a future:
    from object storage or http the next objects are asked for while one is copied (``layout.ahead_for`` the largest
    bound); None for each key of a local folder (streamed from its file, ``_copy_object``)."""
    kind = storage.location_kind(store.location)
    if kind == "local":
        return (None for _ in keys)
    calls = ((key, _owner(bounds, key)[1]) for key in keys)

    def read(key: str, bound: int | None) -> bytes | None:
        return store.raw_object(key, at_most=bound)

    largest = max((bound for bound in bounds.values() if bound is not None), default=layout.READ_AHEAD_BYTES)
    window = layout.ahead_for(largest) if kind in ("url", "http") else 0  # a zip's members: read in turn
    return threads.ahead("read", storage.REMOTE_READS, read, calls, window)


def _copy_object(store: layout.Store, key: str, bounds: dict[str, int | None], sharded: dict[str, _Sharded],
                 z: zipfile.ZipFile, fetched: Future[bytes | None] | None = None) -> int:
    """Copy the object ``key`` into the zip ``z`` as a stored member; returns its bytes (0: absent, not copied).
    From a local folder it is streamed (a MiB at a time), from elsewhere read whole (``fetched``: ``_fetched``'s);
    either way an object larger than it can be (``bounds``, FORMAT.md §13) is refused as damage, not copied, and so is a
    chunk object of an array in ``sharded`` whose checksums do not match (``_Checksums``), found on the bytes as they
    are copied."""
    owner, bound = _owner(bounds, key)
    check = sharded.get(owner) if owner is not None and not key.endswith("/zarr.json") else None
    member = zipfile.ZipInfo(key, date_time=(1980, 1, 1, 0, 0, 0))
    member.external_attr = 0o100644 << 16  # a regular file, -rw-r--r-- as unzip extracts it (zipfile wrote -rw-------)
    if fetched is not None:
        with _reading(store, key):
            data = fetched.result()
        if data is None:
            return 0  # listed but gone: an absent object reads as fill, as in the source
        if bound is not None and len(data) > bound:
            raise storage.too_large(store.location, key, len(data), bound, "packed")
        if check is not None:
            _check_whole(check, store.location, owner, key, data)  # type: ignore[arg-type]
        z.writestr(member, data)
        return len(data)
    file = storage.local_object(storage.local_path(store.location), key, bound)  # a link out, a FIFO, a size past its bound: refused
    with _reading(store, key):  # an error reading is the store's, one writing (a full disk) OUT's
        try:
            source = open(file, "rb")  # noqa: SIM115 - closed below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return 0  # listed but gone: an absent object reads as fill, as in the source
    with source:
        with _reading(store, key):
            size = member.file_size = os.fstat(source.fileno()).st_size  # zipfile writes ZIP64 extensions from it where needed
            checksums = None if check is None else _Checksums(check, store.location, owner, key, size,  # type: ignore[arg-type]
                                                              lambda n: os.pread(source.fileno(), n, size - n))
        return _stream(source, store, key, bound, checksums, z.open(member, "w"))


def _stream(source: Any, store: layout.Store, key: str, bound: int | None, checksums: _Checksums | None, w: Any) -> int:
    """Copy the object ``key`` from the open file ``source`` into the zip member ``w`` (closed here) a MiB at a time,
    refusing it once it holds more than ``bound`` bytes or fails ``checksums``; returns its bytes."""
    copied = 0
    with w:
        while True:
            with _reading(store, key):
                block = source.read(2**20)
            if not block:
                if checksums is not None:
                    checksums.finish()
                return copied
            copied += len(block)
            if bound is not None and copied > bound:  # grown since it was checked
                raise storage.too_large(store.location, key, None, bound, "packed")
            if checksums is not None:
                checksums.feed(block)
            w.write(block)


class _Sharded(NamedTuple):
    """The shape of an array's chunk objects whose bytes pack checks (``_sharded``): ``slots`` inner chunks per object
    (its index's entries); the array's ``rows``, ``shard_rows`` per object and ``chunk_rows`` per inner chunk (None
    where an inner chunk is not a range of whole rows of its shard), which name the rows of a damaged inner chunk; whether
    the array was ``added`` to the store (the fix for its damage is not re-extracting it)."""

    slots: int
    rows: int
    shard_rows: int
    chunk_rows: int | None
    added: bool = False  # an array added to the store (FORMAT.md §14): kdcache's extract cannot write it again


def _sharded(meta: dict[str, Any]) -> _Sharded | None:
    """How the chunk objects of the array whose zarr v3 metadata is ``meta`` are checked without decoding them, or None
    where they are not: the one codec is ``sharding_indexed``, its index at the end encoded ``bytes`` (little endian)
    then ``crc32c``, and its inner chunks' last codec ``crc32c`` (FORMAT.md §3.1: every data array kdcache writes; an
    array another tool added is checked alike where it has this shape, whatever its codecs before ``crc32c``)."""
    try:
        (codec,) = meta["codecs"]
        config = codec["configuration"]
        index = config["index_codecs"]
        shard = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        inner = [int(n) for n in config["chunk_shape"]]
        if (codec["name"] != "sharding_indexed" or config.get("index_location", "end") != "end"
                or [c["name"] for c in index] != ["bytes", "crc32c"] or (index[0].get("configuration") or {}).get("endian") != "little"
                or config["codecs"][-1]["name"] != "crc32c" or meta["chunk_grid"]["name"] != "regular"):
            return None
        rows = int(meta["shape"][0])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    if not shard or len(inner) != len(shard) or any(i < 1 or n % i for n, i in zip(shard, inner)):
        return None  # not a sharding zarr reads
    slots = int(np.prod([n // i for n, i in zip(shard, inner)]))
    return _Sharded(slots, rows, shard[0], inner[0] if inner[1:] == shard[1:] else None)


def _check_whole(shape: _Sharded, location: str, path: str, key: str, data: bytes) -> None:
    """``_Checksums`` of a chunk object read whole, ``data``: a DamagedShardError where one does not match."""
    _Checksums(shape, location, path, key, len(data), lambda n: data[-n:]).feed(data)


class _Checksums:
    """The crc32c checksums of one shard object (FORMAT.md §3.1) checked on its bytes as they are copied, never decoded:
    the index's (read first from the object's end, where it tells where the inner chunks lie) and every stored inner
    chunk's (its last 4 bytes: the crc32c of the rest). A mismatch raises a DamagedShardError naming the array, shard, inner
    chunk and the fix, as soon as the bytes are there. ``tail(n)``: the object's last ``n`` bytes."""

    def __init__(self, shape: _Sharded, location: str, path: str, key: str, size: int, tail: Callable[[int], bytes]) -> None:
        self.shape, self.location, self.path, self.key, self.size = shape, location, path, key, size
        index_bytes = 16 * shape.slots + 4
        if size < index_bytes:
            raise self.damaged(None, f"it holds {size:,} bytes, fewer than its shard index ({index_bytes:,})")
        index = np.frombuffer(tail(index_bytes), dtype=np.uint8)
        if google_crc32c.value(index[:-4]) != int(index[-4:].view("<u4")[0]):
            raise self.damaged(None, "its shard index fails its crc32c checksum")
        entries = index[:-4].view("<u8").reshape(-1, 2)  # (slots, 2): each inner chunk's offset and length
        stored = np.flatnonzero(~(entries == 2**64 - 1).all(axis=1))  # an absent inner chunk (both 2**64 - 1) is the fill value
        offset, length, limit = entries[stored, 0], entries[stored, 1], size - index_bytes
        too_short, outside = length < 4, (length > limit) | (offset > limit - np.minimum(length, limit))
        if too_short.any() or outside.any():
            first = int(np.flatnonzero(too_short | outside)[0])
            chunk = int(stored[first])
            raise self.damaged(chunk, f"is {int(length[first])} bytes (at byte {int(offset[first])}), fewer than its 4-byte crc32c" if too_short[first] else
                               f"lies at bytes {int(offset[first])}+{int(length[first])}, outside the object's {limit:,} bytes of chunks")
        order = np.argsort(offset, kind="stable")
        # the byte ranges ending in the crc32c of the rest, by where they begin (int64: each lies within the object), the
        # index last (checked again as it is copied): [lo, hi) and the inner chunk's number (-1: the index)
        self.lo = np.append(offset[order], limit).astype(np.int64)
        self.hi = np.append(offset[order] + length[order], size).astype(np.int64)
        self.chunk = np.append(stored[order], -1)
        self.next, self.at = 0, 0  # the first range not begun; the bytes fed
        self.open: dict[int, tuple[int, bytes]] = {}  # ranges begun, not ended: their checksum so far and stored bytes so far

    def feed(self, block: bytes) -> None:
        """Check the object's next bytes ``block``: the ranges it holds whole at once (one crc32c call each, their stored
        checksums gathered in one step: an object of many small inner chunks costs little more than its copy); one it
        begins or ends is carried over."""
        data, start = np.frombuffer(block, dtype=np.uint8), self.at
        end = self.at = start + len(block)
        for i in list(self.open):  # begun in an earlier block
            self._extend(i, data, start, end)
        first, self.next = self.next, int(np.searchsorted(self.lo, end))  # the ranges beginning in this block
        whole = first + np.flatnonzero(self.hi[first : self.next] <= end)
        for i in np.setdiff1d(np.arange(first, self.next), whole).tolist():
            self.open[i] = (0, b"")
            self._extend(i, data, start, end)
        ends = self.hi[whole] - start
        crcs = [google_crc32c.value(data[lo:hi]) for lo, hi in zip((self.lo[whole] - start).tolist(), (ends - 4).tolist())]
        stored = data[(ends - 4)[:, None] + np.arange(4)].view("<u4").ravel()
        bad = np.flatnonzero(np.array(crcs, dtype=np.uint32) != stored)
        if len(bad):
            raise self._mismatch(int(self.chunk[whole[bad[0]]]))

    def _extend(self, i: int, data: np.ndarray, start: int, end: int) -> None:
        """Extend the open range ``i`` by its part of the bytes ``data`` (the object's ``start:end``); compare it once it ends there."""
        lo, hi = int(self.lo[i]), int(self.hi[i])
        crc, stored = self.open[i]
        crc = google_crc32c.extend(crc, data[max(lo, start) - start : max(min(hi - 4, end) - start, 0)])
        stored += data[max(hi - 4, start) - start : max(min(hi, end) - start, 0)].tobytes()
        if hi > end:
            self.open[i] = (crc, stored)
            return
        del self.open[i]
        if crc != int.from_bytes(stored, "little"):
            raise self._mismatch(int(self.chunk[i]))

    def _mismatch(self, chunk: int) -> DamagedShardError:
        return self.damaged(chunk, "fails its crc32c checksum") if chunk >= 0 else self.damaged(None, "its shard index fails its crc32c checksum")

    def finish(self) -> None:
        """Refuse an object that ended before the bytes its size and index promised (every range was compared then)."""
        if self.at < self.size:
            raise self.damaged(None, f"it was cut short as it was copied ({self.at:,} of {self.size:,} bytes)")

    def damaged(self, chunk: int | None, why: str) -> DamagedShardError:
        """The error for the inner chunk ``chunk`` that ``why`` (None: the object, ``why`` naming what of it); its
        ``problem``, that alone (``kdcache verify``'s line)."""
        shape, suffix = self.shape, self.key[len(self.path) + 1:]
        coords = [int(p) for p in re.split(r"[./]", suffix.removeprefix("c/").removeprefix("c.")) if p.isdigit()]
        shard = "" if not coords else f" shard {coords[0] if not any(coords[1:]) else tuple(coords)}"
        where = f"array {self.path!r}{shard} (object {self.key!r})"
        if chunk is None:
            where += ":"
        else:
            where += f" inner chunk {chunk}"
            first = coords[0] * shape.shard_rows + chunk * shape.chunk_rows if shape.chunk_rows is not None and coords else shape.rows
            if first < shape.rows:  # past the array's end (its last shard's absent inner chunks): no rows to name
                where += f" (rows {first}-{min(first + shape.chunk_rows, shape.rows) - 1})"  # type: ignore[operator] - not None here
        fix = "copy the store again, or write the array again with the tool that added it" if shape.added else "re-extract the store or copy it again"
        return DamagedShardError(f"cannot pack {self.location!r}: {where} {why}, damaged on disk or on the way; {fix} "
                                 f"(kdcache verify {self.location} lists every damaged shard); nothing was written",
                                 f"{where} {why}")


def _part_name(out: Path) -> Path:
    """A temporary file beside ``out`` of its own (``OUT.TOKEN.part``): two packs or exports to one OUT never share one."""
    return out.with_name(f"{out.name}.{secrets.token_hex(6)}.part")


@contextmanager
def _part_file(part: Path, out: Path) -> Iterator[int]:
    """Create ``part`` (never an existing file) and hold ``flock`` on it while the block writes it through the fd
    yielded; first remove the temporary files of ``out`` that writers killed on the way left (``OUT.TOKEN.part``
    whose flock can be taken: its writer is gone; on a file system without flock none is removed)."""
    pattern = re.compile(re.escape(out.name) + r"\.[0-9a-f]{12}\.part")
    with suppress(OSError):
        for left in sorted(out.parent.iterdir()):
            if pattern.fullmatch(left.name) and left != part:
                _remove_if_abandoned(left)
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: only a file system without flock refuses
        yield fd
    finally:
        os.close(fd)


def _put_in_place(fd: int, part: Path, out: Path) -> None:
    """Rename the written ``part`` (open as ``fd``) to ``out``, flushed to the disk first and its folder after: after a power
    loss ``out`` is the whole new file or what was there before, never one renamed into place empty."""
    storage.sync(fd)
    os.replace(part, out)
    storage.sync_folder(out.parent)


def _remove_if_abandoned(left: Path) -> None:
    """Remove ``left``, a temporary file of pack/export, if no writer holds its flock, saying so on stderr."""
    try:
        fd = os.open(left, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # being written (or flock unsupported): an OSError, kept
        if os.path.samestat(os.fstat(fd), os.stat(left, follow_symlinks=False)):
            size = os.fstat(fd).st_size
            left.unlink()
            print(f"note: removed {str(left)!r} ({size:,} bytes), the temporary file of a pack or export that was killed "
                  "before it finished", file=sys.stderr)
    except OSError:
        pass
    finally:
        os.close(fd)


def export_hdf5(location: str | os.PathLike[str], out: str | os.PathLike[str], *, compression: str = "gzip", storage_options: dict[str, Any] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write a complete store as one HDF5 file: the same paths as groups/datasets, chunked like the
    store's inner chunks, compressed with ``compression`` (gzip, lzf or none); the manifest as the
    JSON string root attribute ``kdcache``."""
    need("h5py", "hdf5", "kdcache export")
    location, out = storage.location_arg(location, "location"), storage.location_arg(out, "out")
    storage.options_arg(storage_options)
    overwrite = storage.flag_arg(overwrite, "overwrite")
    if compression not in HDF5_COMPRESSION:
        raise StoreError(f"unknown HDF5 compression {compression!r}; choose one of {', '.join(HDF5_COMPRESSION)}")
    _local_out(out)
    out = Path(out)
    _refuse_store_name(out)
    storage.refuse_inside_store(location, out, "OUT", "it would replace or add one of its objects")
    _check_out(out, overwrite)
    dest = _written(out)
    source = _local_file(location)
    if source is not None and out.exists() and source.exists() and out.samefile(source):
        raise StoreError(f"OUT {str(out)!r} is the store being exported; --overwrite would replace the .zarr.zip with the HDF5 "
                         f"file: write it elsewhere (e.g. {str(out.with_name(out.name.removesuffix('.zarr.zip') + '.h5'))!r})")
    with locking.reading_lock(location, storage_options, "export") as held:  # writers kept out until the file is in place (pack)
        store = _complete(location, storage_options, "export")
        _check_replaced(out, "export")
        part = _part_name(dest)
        with _writing(part, dest), _part_file(part, dest) as fd:
            with _hdf5_file(fd) as (f, check):
                arrays = _write_hdf5(store, f, check, compression)
            held()
            _put_in_place(fd, part, dest)
    return {"out": str(out), "arrays": arrays, "file_bytes": out.stat().st_size, "compression": compression}


def _refuse_store_name(out: Path) -> None:
    """Refuse an export OUT named as a store: ``*.zarr`` (the HDF5 file was written under it, which info and train then
    refused as no store) or ``*.zip``, read as a zip store by its name, where it is not an existing file (whose kind an
    --overwrite names: ``_check_replaced``)."""
    name = out.name.lower()
    if name.endswith(".zarr") or name.endswith(".zip") and not out.is_file():
        stem = re.sub(r"(\.zarr)?(\.zip)?$", "", out.name, flags=re.IGNORECASE) or "store"
        raise StoreError(f"OUT {str(out)!r} is named as a store, but kdcache export writes one HDF5 file: name it *.h5 (e.g. "
                         f"{str(out.with_name(stem + '.h5'))!r}); a store in one file is what kdcache pack writes (kdcache pack STORE "
                         f"{stem}.zarr.zip), and a copy of the store's folder is a store")


def _write_hdf5(store: layout.Store, f: Any, check: Any, compression: str) -> int:
    """Write ``store`` into the open HDF5 file ``f`` (FORMAT.md §16), one shard of a dataset in memory at a time, calling
    ``check`` (``_hdf5_file``'s) after each; returns how many datasets it wrote."""
    f.attrs[layout.ATTRS] = json.dumps(store.manifest)
    f.attrs["kdcache_hdf5_version"] = HDF5_LAYOUT_VERSION
    progress = [layout.DONE] + ([layout.DIGEST] if store.has_digests() else [])  # digests: checked again on import
    for path in store.paths():  # each layout checked before it shapes the file, in the order the datasets are made
        store.checked_array(path)
    # one stream of every array's shards, one shard in memory at a time (from object storage: a few, the next array's first
    # asked for while this one's last are written: the arrays were read one after another, a round trip waited between)
    reads = store.read_ahead([(path, shard) for path in store.paths() for shard in range(store.num_shards)])
    try:
        for path in store.paths() + progress:
            arr = store.array(path)  # its layout checked above
            chunks = (min(int(arr.chunks[0]), arr.shape[0]), *arr.shape[1:]) if path not in progress else None  # h5py: never past N
            ds = f.create_dataset(path, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                  compression=None if compression == "none" or path in progress else compression)
            if path in progress:  # the markers and digests the reads checked rows against (read once, by _complete and the first read)
                ds[:] = store.done_snapshot() if path == layout.DONE else store.digests_snapshot()
                continue
            for shard in range(store.num_shards):
                start, stop = store.shard_rows(shard)
                with _reading(store, path):
                    rows = next(reads).result()
                ds[start:stop] = rows
                check()  # a full disk stops the export at once
    finally:
        reads.close()  # an export stopped: the reads asked for ahead and not started are called off
    return len(store.paths()) + len(progress)


def import_hdf5(source: str | os.PathLike[str], location: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Convert an HDF5 file written by ``export_hdf5`` back into a store at ``location`` (any writable
    location), with the manifest's geometry; resumable like extract (only shards not yet done are written). Returns the
    store's ``info()`` with ``shards_written``, as ``extract`` does."""
    need("h5py", "hdf5", "kdcache import")
    source, location = storage.location_arg(source, "source"), storage.location_arg(location, "location")
    storage.refuse_empty_segments(location)  # a URL that lost a slash, before the file is looked at (as extract's --out)
    storage.refuse_wildcards(location)  # before the lock object is made beside it (the store is refused again where it is created)
    storage.options_arg(storage_options)
    overwrite = storage.flag_arg(overwrite, "overwrite")
    if re.search(r"\.(h5|hdf5)/*$", location, re.IGNORECASE):  # a store folder was made under it, which h5py then could not open
        named = re.sub(r"\.(h5|hdf5)/*$", ".zarr", location, flags=re.IGNORECASE)
        raise StoreError(f"STORE {location!r} is named as an HDF5 file, but kdcache import writes a store (a folder of zarr objects): "
                         f"name it *.zarr (e.g. {named!r}); the HDF5 file is what kdcache export writes")
    import h5py

    try:
        f = h5py.File(source, "r")
    except OSError as e:
        local = _local_file(source)
        if local is not None and local.is_file() and zipfile.is_zipfile(local):  # a packed store, given to be unpacked
            raise StoreError(f"{source!r} is a zip file (a store kdcache pack wrote?), not an HDF5 file written by kdcache export: a "
                             "packed store is a store already, which info, train and verify read as it is (to write to it, unzip "
                             "it into a folder)") from None
        raise _open_error(source, e) from None
    with f:
        raw = f.attrs.get(layout.ATTRS)
        if raw is None:  # another tool's file (its own dataset names, no manifest): say what it holds
            held = sorted(f.keys())
            named = ", ".join(map(repr, held[:6])) + (f" and {len(held) - 6} more" if len(held) > 6 else "") if held else "nothing"
            raise StoreError(f"{source!r} has no kdcache manifest (root attribute {layout.ATTRS!r}; its root holds {named}): kdcache "
                             "import reads only files written by kdcache export (FORMAT.md §16), which carry the fingerprints "
                             "training checks its inputs by; pass one (kdcache export STORE OUT.h5), or extract a store from "
                             "the teacher with kdcache extract")
        try:
            manifest = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except (TypeError, ValueError, RecursionError):
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != layout.FORMAT:
            seen = (f"a manifest of format {manifest.get('format')!r}, not {layout.FORMAT!r}" if isinstance(manifest, dict)
                    else f"not a JSON object: {str(raw)[:40]!r}")
            raise StoreError(f"{source!r} has no kdcache manifest (root attribute {layout.ATTRS!r} is {seen}); pass a file "
                             "written by kdcache export")
        if type(manifest.get("format_version")) is not int or manifest["format_version"] not in layout.FORMAT_VERSIONS:  # true == 1 in Python
            raise StoreError(f"{source!r} holds store format version {manifest.get('format_version')!r}; this kdcache reads "
                             f"version {' or '.join(map(str, layout.FORMAT_VERSIONS))}: upgrade kdcache")
        version = f.attrs.get("kdcache_hdf5_version")
        version = version.item() if isinstance(version, np.generic) else version  # h5py gives an int attribute as np.int64
        if version is None:
            raise StoreError(f"{source!r} has no root attribute 'kdcache_hdf5_version' (FORMAT.md §16); pass a file written by kdcache export")
        if type(version) is not int:  # "1", 1.0, True: no kdcache writes it so; a newer kdcache would not read it either
            raise StoreError(f"{source!r}: root attribute 'kdcache_hdf5_version' is {short(version)} ({type(version).__name__}), "
                             f"not an integer (FORMAT.md §16: {HDF5_LAYOUT_VERSION}); the file was not written by kdcache export: "
                             "export the store again (kdcache export STORE FILE)")
        if version != HDF5_LAYOUT_VERSION:  # another layout would be read as this one's
            raise StoreError(f"{source!r} holds HDF5 layout version {version!r} (root attribute 'kdcache_hdf5_version'); this kdcache "
                             f"reads version {HDF5_LAYOUT_VERSION}: upgrade kdcache, or export the store again with this one")
        layout.check_manifest(manifest, source)
        fresh = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "created", "completed")}
        expect, digests = _check_datasets(f, source, manifest)  # all of it before the store is created (or an old one replaced)
        paths = expect.paths()
        _check_location(location)
        if overwrite:
            _check_source_outside(source, location)
        locking.refuse_if_being_written(location, storage_options)  # and an S3 endpoint that never answers: named in seconds
        if overwrite and storage.exists(str(location), storage_options):
            _check_readable(f, source, expect, digests, location)  # an existing store is replaced only by a file that reads whole
        with locking.writer_lock(location, storage_options):  # one writer per store
            store = layout.create_or_resume(location, lambda _: fresh, overwrite=overwrite, storage_options=storage_options, named="STORE")
            classes = _topk_classes(expect)
            pending = store.resume_pending()
            for shard in pending:
                start, stop = store.shard_rows(shard)
                arrays = {}
                for path in paths:
                    try:
                        arrays[path] = f[path][start:stop]
                    except (OSError, ValueError, RuntimeError) as e:  # a damaged chunk (a filter or checksum that fails)
                        raise _unreadable(source, path, shard, start, stop, f"cannot be read ({_why(e)})", store) from None
                    problem = _digest_problem(expect, digests, path, shard, arrays[path]) or _value_problem(path, start, arrays[path], classes)
                    if problem:
                        raise _unreadable(source, path, shard, start, stop, problem, store)
                store.write_shard(shard, arrays)
            store.finish()
    return {**store.info(), "shards_written": len(pending)}  # as extract's: counted under the writer lock


_BUSY = ": another process has it open for writing (HDF5 locks the file); close it there and rerun"
_NO_LOCKS = (": its file system does not support the file lock HDF5 takes on opening (NFS, Lustre); set the environment "
             "variable HDF5_USE_FILE_LOCKING=FALSE and rerun")
_OPEN_FIXES = {  # what to do about an HDF5 file that did not open, by the errno h5py gives
    errno.ENOENT: "; check the path",
    errno.EAGAIN: _BUSY, errno.EWOULDBLOCK: _BUSY,  # HDF5's flock of the file, held by a writer
    errno.ENOLCK: _NO_LOCKS, errno.ENOSYS: _NO_LOCKS,  # "unable to lock file": flock refused by the file system
}


def _open_error(source: str, e: OSError) -> StoreError:
    """The error for an HDF5 file that did not open (``e``): its reason in a few words (h5py's message repeats the name,
    flags and errno: the errno's words say it), and what to do."""
    cut = re.search(r"truncated file: eof = (\d+),.* stored_eof = (\d+)", str(e))  # HDF5's own words, no errno
    if cut:
        return StoreError(f"cannot read {source!r} as HDF5: it is truncated, {int(cut[1]):,} of the {int(cut[2]):,} bytes it was "
                          "written with (an incomplete copy or download); copy it again")
    fix = _OPEN_FIXES.get(getattr(e, "errno", None), "; pass a file written by kdcache export")
    return StoreError(f"cannot read {source!r} as HDF5 ({_why(e)}){fix}")


def _check_datasets(f: Any, source: str, manifest: dict[str, Any]) -> tuple[layout.Store, np.ndarray | None]:
    """Every dataset the manifest needs, with its shape, dtype and filters, checked from the file's metadata alone
    (and the small done list read: every shard done): a file that cannot be imported is refused before any store is
    touched. Returns the manifest's layout (an empty store in memory) and the digests (None if it has none)."""
    import h5py
    import zarr

    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    layout.write_layout(group, manifest, source)  # the manifest's layout, in memory: nothing written anywhere
    expect = layout.Store(group, source, writable=False)
    fix = "re-export it from the store (kdcache export STORE FILE) or copy it again"
    wants = {path: expect.expected(path) for path in expect.paths()}
    wants[layout.DONE] = ((expect.num_shards,), "bool")
    for path, (shape, dtype) in wants.items():
        try:
            ds = f.get(path)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise StoreError(f"{source!r} is damaged: dataset {path!r} cannot be opened ({_why(e)}); {fix}") from None
        if not isinstance(ds, h5py.Dataset) or ds.shape != shape or ds.dtype != np.dtype(dtype):  # shape None: a null dataspace
            seen = ("missing" if ds is None else "a group, not a dataset" if not isinstance(ds, h5py.Dataset)
                    else "an empty dataset (HDF5 null dataspace)" if ds.shape is None else f"{ds.shape} {ds.dtype}")
            raise StoreError(f"{source!r}: dataset {path!r} is {seen}, the manifest says {shape} {dtype}; {fix}")
        _check_storage(f, ds, path, source, fix)
        if path != layout.DONE:
            _check_chunks(ds, path, source, expect)
    try:
        done = np.asarray(f[layout.DONE][:], dtype=bool)
    except (OSError, ValueError, RuntimeError) as e:
        raise StoreError(f"{source!r} is damaged: dataset {layout.DONE!r} cannot be read ({_why(e)}); {fix}") from None
    if not done.all():  # its shards' rows would be left out: a partial store, made with exit 0 (over a whole one, with --overwrite)
        shards = [int(s) for s in np.flatnonzero(~done)]
        start, stop = expect.shard_rows(shards[0])
        first = f"shard {shards[0]}, rows {start}-{stop - 1}" + (f", and {len(shards) - 1} more" if len(shards) > 1 else "")
        raise StoreError(f"{source!r}: dataset {layout.DONE!r} marks {len(shards)} of {expect.num_shards} shards not done ({first}), "
                         f"but kdcache export writes complete stores only (FORMAT.md §16: all true); {fix}")
    return expect, _digests(f, source, expect, fix)


def _check_storage(f: Any, ds: Any, path: str, source: str, fix: str) -> None:
    """Refuse a dataset whose data is in another file, or that needs a filter this h5py lacks."""
    import h5py

    elsewhere = ("an external link to " + repr(ds.file.filename) if ds.file.filename != f.filename
                 else "a virtual dataset" if ds.is_virtual else "external storage" if ds.external else None)
    if elsewhere:  # an import would copy another file's bytes (any file of the recipient's) into the store
        raise StoreError(f"{source!r}: dataset {path!r} keeps its data in another file ({elsewhere}); kdcache import reads "
                         f"only data stored in the file itself: {fix}")
    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(i)
        if not h5py.h5z.filter_avail(code):
            name = name.decode(errors="replace") if isinstance(name, bytes) else name
            raise StoreError(f"{source!r}: dataset {path!r} needs the HDF5 filter {name or code!r}, which this h5py lacks; "
                             "re-export the store with --compression gzip (or install the filter plugin)")


def _check_chunks(ds: Any, path: str, source: str, expect: layout.Store) -> None:
    """Refuse a data dataset chunked in more rows than a shard (rechunked by another tool): HDF5 decompresses a whole
    chunk for each shard read from it, so one chunk of the whole dataset took memory and time growing with the file."""
    rows = expect.rows_per_shard
    if ds.chunks is None or ds.chunks[0] <= rows:  # contiguous: read by byte range
        return
    inner = (expect.manifest["geometry"]["chunk_rows"].get(path) or rows, *ds.shape[1:])
    raise StoreError(f"{source!r}: dataset {path!r} is chunked in {ds.chunks[0]:,} rows, more than a shard's {rows:,} (FORMAT.md "
                     f"§16: the store's inner chunk, {inner[0]:,} rows): each shard read would decompress whole chunks, memory and "
                     f"time growing with the file; re-export it from the store (kdcache export STORE FILE) or rechunk it "
                     f"(h5repack -l {path}:CHUNK={'x'.join(map(str, inner))})")


def _digests(f: Any, source: str, expect: layout.Store, fix: str) -> np.ndarray | None:
    """The file's ``progress/digest`` (FORMAT.md §7.1: exported from a store that has them), None without one (a file
    whose manifest has no ``compression.shard_digests``: exported by kdcache <= 0.1.1)."""
    import h5py

    if layout.DIGEST not in f:
        kept = (expect.manifest.get("compression") or {}).get("shard_digests")
        if kept:  # every kdcache that writes this key exports the digests: deleted, rows out of place would go unchecked
            raise StoreError(f"{source!r}: dataset {layout.DIGEST!r} is missing, the manifest says the store kept shard digests "
                             f"(compression.shard_digests = {kept!r}); {fix}")
        return None
    ds, shape = f[layout.DIGEST], (expect.num_shards, len(expect.paths()))
    if not isinstance(ds, h5py.Dataset) or ds.shape != shape or ds.dtype != np.dtype("uint32") or ds.is_virtual or ds.external:
        raise StoreError(f"{source!r}: dataset {layout.DIGEST!r} is not {list(shape)} uint32 stored in the file; {fix}")
    try:
        return np.asarray(ds[:])
    except (OSError, ValueError, RuntimeError) as e:
        raise StoreError(f"{source!r} is damaged: dataset {layout.DIGEST!r} cannot be read ({_why(e)}); {fix}") from None


def _digest_problem(expect: layout.Store, digests: np.ndarray | None, path: str, shard: int, rows: np.ndarray) -> str | None:
    """What is wrong with rows ``shard`` of dataset ``path`` by the digest the store's writer recorded (FORMAT.md §7.1),
    where the file carries one; None when they match."""
    if digests is None:
        return None
    if not digests[shard].any():  # as in a store (Store.digest_problem): a done shard's row is written whole, never all 0
        return f"have no digest in {layout.DIGEST} (its row for shard {shard} is all 0, so their place could not be checked)"
    recorded = int(digests[shard, expect.digest_column(path)])
    if recorded and layout.shard_digest(path, shard, [rows]) != recorded:
        return f"are not the rows the store held there (their digest is not the one in {layout.DIGEST})"
    return None


def _topk_classes(expect: layout.Store) -> int:
    """The class count of the top-k logits of the store a file's manifest describes (``expect``), 0: none; found once per
    file, not for each shard of each dataset (a store of many targets: shards x targets, looked through each time)."""
    from kdcache.verify import topk_classes

    return topk_classes(expect.targets.values())


def _value_problem(path: str, start: int, rows: np.ndarray, classes: int) -> str | None:
    """What in rows ``start..`` of dataset ``path`` no store may hold, where a file's digests agree with them (a file
    written by another tool; ``classes``: ``_topk_classes`` of the store its manifest describes): what ``kdcache
    verify``'s values check refuses. None: none."""
    from kdcache.verify import value_problem

    problem = value_problem(path, start, rows, classes)
    return f"hold {problem}" if problem else None


def _check_readable(f: Any, source: str, expect: layout.Store, digests: np.ndarray | None, location: str) -> None:
    """Read every shard of every dataset once (one shard in memory at a time): a damaged chunk is only
    found by reading, and an ``--overwrite`` must not delete the store it would replace for a file that fails."""
    classes = _topk_classes(expect)
    for shard in range(expect.num_shards):
        start, stop = expect.shard_rows(shard)
        for path in expect.paths():
            try:
                rows = f[path][start:stop]
                why = _digest_problem(expect, digests, path, shard, rows) or _value_problem(path, start, rows, classes)
            except (OSError, ValueError, RuntimeError) as e:
                why = f"cannot be read ({_why(e)})"
            if why:
                raise StoreError(f"{source!r} is damaged: dataset {path!r} rows {start}-{stop - 1} {why}; "
                                 f"re-export the file from its store (kdcache export STORE FILE) or copy it again "
                                 f"(nothing was changed: {location!r} is kept)")


def _check_location(location: str) -> None:
    """Refuse a local STORE that is a file or lies under one, naming the argument (before its lock is taken)."""
    if storage.location_kind(location) != "local":
        return
    path = Path(storage.local_path(location))
    if path.exists() and not path.is_dir():
        raise StoreError(f"{location!r} is a file, not a store; choose another STORE location for kdcache import or remove it")
    _check_folder(path.parent, f"choose another STORE location for kdcache import than {location!r}")


def _check_source_outside(source: str, location: str) -> None:
    """Refuse an ``--overwrite`` of a local STORE folder that holds SOURCE (an old export kept in the store): replacing
    the store deleted the very file being imported."""
    if storage.location_kind(location) != "local":
        return
    folder = Path(storage.local_path(location))
    if folder.is_dir() and Path(source).resolve().is_relative_to(folder.resolve()):
        raise StoreError(f"{source!r} is inside the store {location!r} that {option('--overwrite')} replaces (the file would be deleted with "
                         f"it); move it out of the store folder first (e.g. to {str(folder.resolve().parent / Path(source).name)!r})")


def _unreadable(source: str, path: str, shard: int, start: int, stop: int, why: str, store: layout.Store) -> StoreError:
    """A chunk of the HDF5 file that does not read back (``why``), found while importing: what was imported is kept."""
    done = int(store.done().sum())
    return StoreError(
        f"{source!r} is damaged: dataset {path!r} rows {start}-{stop - 1} {why}; "
        f"{store.location!r} is left partial ({done}/{store.num_shards} shards imported): re-export the file from its store "
        f"(kdcache export STORE FILE) or copy it again, then rerun kdcache import FILE {store.location} to import the rest"
    )


def _complete(location: str, storage_options: dict[str, Any] | None, verb: str) -> layout.Store:
    store = layout.open_store(location, storage_options=storage_options)
    done = store.done_snapshot()  # the markers the reads check rows against: read once for both (one object a shard)
    if not done.all():
        raise StoreError(f"{location!r} is incomplete ({int(done.sum())}/{store.num_shards} shards done); finish kdcache extract before you {verb} it")
    return store


def _layout_keys(store: layout.Store) -> set[str]:
    """The key of every object a complete store of this layout holds (FORMAT.md §3), from its manifest alone: the
    groups' and arrays' ``zarr.json``, every shard of every data array, every done marker and digest row."""
    arrays = _kdcache_arrays(store)
    keys = {"zarr.json"}
    for path in arrays:
        parts = path.split("/")
        keys.update("/".join(parts[:i]) + "/zarr.json" for i in range(1, len(parts) + 1))
    keys.update(store.shard_key(path, shard) for path in arrays for shard in range(store.num_shards))
    return keys


def _check_objects(store: layout.Store, verb: str) -> None:
    """Refuse a store whose arrays do not open or whose done shards lack their storage object or their digest (a copy
    would claim to be complete without them: an absent object reads as zeros, a shard without its digest is refused)."""
    for path in store.paths():
        store.checked_array(path)  # a damaged zarr.json is a StoreError naming it
    problems = store.damaged_shards()
    # None: a store written before digests; else a done shard's row is never all 0 (FORMAT.md §7.1). The markers and digests
    # _complete and the layout check read (one object a shard, read once: pack read each marker four times, its copy included)
    digests = store.digests_snapshot()
    if digests is not None:
        for shard in (int(s) for s in np.flatnonzero(store.done_snapshot())):
            if not digests[shard].any():
                start, stop = store.shard_rows(shard)
                problems.append(f"shard {shard} (rows {start}-{stop - 1}) has no digest: object '{layout.DIGEST}/c/{shard}/0' is "
                                "missing or all 0 although the shard is marked done")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"cannot {verb} {store.location!r}: {problems[0]}{more}; run kdcache verify {store.location} "
                         "to list the damage, and re-extract the store or copy it again")


def _check_layout(store: layout.Store, verb: str) -> None:
    """Refuse a store whose arrays ``kdcache verify``'s layout check fails (an array another tool rewrote unsharded, or
    in other shards): its copy would fail that check too."""
    from kdcache.verify import layout_check

    check = layout_check(store)
    if not check.ok:
        more = f" (and {check.count - 1} more)" if check.count > 1 else ""
        raise StoreError(f"cannot {verb} {store.location!r}: {check.problems[0]}{more}, as kdcache verify's layout check says; "
                         "re-extract the store (or write the array back as kdcache wrote it)")


@contextmanager
def _reading(store: layout.Store, what: str) -> Iterator[None]:
    """An OSError reading the source store (not the output) as a one-line error naming it."""
    try:
        yield
    except OSError as e:
        raise StoreError(f"cannot read {what!r} of {store.location!r}: {e.strerror or e}; check that the store is readable "
                         f"(kdcache verify {store.location}) and rerun") from None


class _Sink:
    """The file h5py writes an export through (its ``fileobj`` driver), unbuffered. A write that fails is never
    HDF5's to see: HDF5 does not recover from a failed write (a dataset whose flush failed, freed later, crashed the
    process), so the first error is kept for ``check`` to raise, and from then on every write is dropped, so that
    HDF5 goes on and closes the file (which is then removed)."""

    def __init__(self, fd: int) -> None:
        self.file = open(fd, "w+b", buffering=0, closefd=False)  # noqa: SIM115 - closed by _hdf5_file
        self.error: OSError | None = None

    def check(self) -> None:
        """Raise the first failed write's error, if any."""
        if self.error is not None:
            raise self.error

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer: Any) -> int:
        return self.file.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        end = self.file.tell() + len(view)
        if self.error is None:
            try:
                done = 0
                while done < len(view):  # a raw write may store part of it
                    done += self.file.write(view[done:])
            except OSError as e:
                self.error = e
        self.file.seek(end)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.file.truncate(size)
            except OSError as e:
                self.error = e
        return self.file.tell() if size is None else size

    def flush(self) -> None:
        pass  # unbuffered: nothing is held here


@contextmanager
def _hdf5_file(fd: int) -> Iterator[tuple[Any, Any]]:
    """``(h5py.File writing the file open as fd, check)``: ``check()`` raises the error of a write that failed (a full
    disk: ENOSPC, EFBIG), which HDF5 never sees (_Sink); the file is closed whatever happens, and a failed write raised."""
    import h5py

    sink = _Sink(fd)
    try:
        with h5py.File(sink, "w") as f:
            yield f, sink.check
        sink.check()  # the last flush, as the file closed
    except Exception:
        sink.check()  # a failed write is the cause of what HDF5 (or the block) raised after it: say that
        raise
    finally:
        sink.file.close()


@contextmanager
def _writing(part: Path, out: Path) -> Iterator[None]:
    """Make ``out``'s folder and run the block that writes the temporary file ``part`` (renamed to ``out``).
    If it fails, ``part`` and any folder made here are removed (a failure to remove them never hides the
    error), and an OSError is a one-line error naming ``out`` and the fix."""
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # removed again on failure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException as e:
        with suppress(OSError):
            part.unlink(missing_ok=True)
        for folder in made:  # deepest first
            with suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError):
            raise StoreError(f"cannot write {str(out)!r}: {_why(e)}; {write_fix(e)} and rerun (nothing was written)") from None
        raise


def _why(e: Exception) -> str:
    """The reason of an error in a few words (h5py's OSErrors repeat the file name and flags: their errno is used)."""
    if getattr(e, "errno", None):
        return os.strerror(e.errno)  # type: ignore[attr-defined]
    return one_line(e, 200)


def _local_out(out: str | os.PathLike[str]) -> None:
    """OUT of pack/export is a local file: a URL would become a folder named ``s3:`` in the current one."""
    if "://" in str(out) or "::" in str(out):
        raise StoreError(f"OUT {str(out)!r} is a URL; pack and export write a local file: write it here, then upload it "
                         "(e.g. aws s3 cp FILE s3://...)")


def _local_file(location: str) -> Path | None:
    """The local file or folder a location reads: PATH, file://PATH, and a zip chain over one (zip::file://PATH, which
    fsspec opens); None for a remote location."""
    inner = location[len("zip::"):] if location.lower().startswith("zip::") else location
    if "://" in inner and not inner.lower().startswith("file://"):
        return None
    return Path(storage.local_path(inner))


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output path that cannot be written as a file, before anything is read or written. A broken symlink (or a
    path under one) is refused too: the file was renamed over the link, not written where it leads, and exit 0. Under
    one, the fix is the folder's: its target is no file to pass as OUT, nor would the file replace that link."""
    fix = ("the file would replace the link, not go where it leads: pass that path as OUT (its folder is made), remove the "
           "link, or choose another OUT") if out.is_symlink() else ("its folder cannot be made through the link: create the "
                                                                    "folder it leads to, remove the link, or choose another OUT")
    storage.refuse_broken_link(out, "OUT", fix)
    if out.is_dir():
        raise StoreError(f"{str(out)!r} is a folder; pass the path of the file to write (e.g. {str(out / out.name)!r})")
    if out.exists() and not overwrite:
        raise StoreError(f"{str(out)!r} exists; choose another output or pass --overwrite")
    _check_folder(out.parent, f"choose another output path than {str(out)!r}")


def _written(out: Path) -> Path:
    """The file pack/export writes for OUT: OUT, or the file a symlink OUT leads to (through every link on the way; a
    broken one is refused: ``_check_out``), its temporary file written beside that file and renamed over it, the link
    kept, as cp writes through a link: the file was renamed over the link, which became a regular file, and the file it
    led to (``out.zip -> /big/disk/out.zip``) was left as it was."""
    return Path(os.path.realpath(out)) if out.is_symlink() else out


MAX_REPLACED_MANIFEST_BYTES = 2**26  # a zip's root zarr.json read to tell a packed store: larger, no kdcache manifest


def _check_replaced(out: Path, command: str) -> None:
    """Refuse an ``--overwrite`` of an OUT that is not a file kdcache ``command`` writes (``pack``: a zip holding a
    kdcache store; ``export``: an HDF5 file with the root attribute ``kdcache``), naming what it is, before anything is
    read: a user's ``data.h5``, ``photos.zip`` or ``notes.txt``, or a packed store given to ``export``, was replaced
    with no word. An empty file holds nothing to lose. A FIFO, a device or a socket (or a link to one: ``/dev/null``,
    which a write through the link would replace) is no file at all: refused as well."""
    if out.exists() and not out.is_file():  # a folder is refused before (_check_out)
        mode = out.stat().st_mode
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or other special file"
        led = f"a link to {os.path.realpath(out)!r}, {kind}" if out.is_symlink() else kind
        raise StoreError(f"{str(out)!r} is {led}, not a file kdcache {command} writes; {option('--overwrite')} replaces only such a "
                         "file: choose another OUT")
    if not out.is_file() or out.stat().st_size == 0:
        return
    what = _kdcache_file(out)
    if what != command:
        wrote = "a zip of a kdcache store" if command == "pack" else "an HDF5 file with the root attribute 'kdcache'"
        raise StoreError(f"{str(out)!r} is {_kinds.get(what, what)}, not a file kdcache {command} writes ({wrote}); "
                         f"{option('--overwrite')} replaces only such a file: choose another OUT or move that file away")


_kinds = {"pack": "a kdcache store's zip (kdcache pack's)", "export": "an HDF5 export of a kdcache store (kdcache export's)"}


def _kdcache_file(path: Path) -> str:
    """``"pack"`` where the file ``path`` is a zip with a kdcache store at its root, ``"export"`` an HDF5 file with the
    root attribute ``kdcache``, else what it is in a few words."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                if any(m.flag_bits & storage.ZIP_ENCRYPTED for m in z.infolist()):  # pack writes none; zipfile cannot read one
                    return "an encrypted zip file (written with a password)"
                if z.getinfo("zarr.json").file_size <= MAX_REPLACED_MANIFEST_BYTES:
                    if layout.ATTRS in json.loads(z.read("zarr.json")).get("attributes", {}):
                        return "pack"
        # NotImplementedError: a zarr.json in a method zipfile has no decompressor for (deflate64, ...), not pack's
        except (KeyError, OSError, ValueError, AttributeError, NotImplementedError, zipfile.BadZipFile):
            pass
        return "a zip file without a kdcache store at its root"
    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        try:
            import h5py

            with h5py.File(path, "r") as h:
                if layout.ATTRS in h.attrs:
                    return "export"
        except (ImportError, OSError):
            return "an HDF5 file that cannot be read"
        return "an HDF5 file without the root attribute 'kdcache'"
    return f"neither a zip nor an HDF5 file (it begins {head!r})"


def _check_folder(folder: Path, fix: str) -> None:
    """Refuse a folder path through a file (``afile/x.h5``): the first part of it that exists must be a folder."""
    existing = next((d for d in (folder, *folder.parents) if d.exists()), None)
    if existing is not None and not existing.is_dir():
        raise StoreError(f"{str(existing)!r} is a file, not a folder; {fix} (or move that file away)")
