"""The store: the only module that knows the on-disk layout (specified in docs/FORMAT.md).

One zarr v3 group. Sample axis first in every array; row ``r`` of every array describes the
same sample. Rows are grouped into shards of ``rows_per_shard`` rows; every array is sharded on
that same row grid, so a shard is written whole, by one writer, and only then marked done in
``progress/done``. Everything about the store is JSON under the root attribute ``kdcache``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, unquote

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from kdcache.errors import StoreError, StoreMismatchError

FORMAT = "kdcache-store"
FORMAT_VERSION = 1
ATTRS = "kdcache"  # root attribute holding the manifest

INDEX = "samples/index"  # [N] int64: dataset index of row r
FINGERPRINT = "samples/fingerprint"  # [N] uint64: blake2b-64 of the input as the teacher saw it
LABEL = "samples/label"  # [N] int64: the dataset's label, when it has one
LOGITS = "targets/logits"  # [N, ...] the model's output
LAYERS = "targets/layers/"  # + encoded module name: [N, ...] a hooked module's output
DONE = "progress/done"  # [num_shards] bool, chunk 1: shard s fully written

MAX_SHARD_ROWS = 16384
MIN_SHARD_ROWS = 16


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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Target:
        return Target(d["name"], d["path"], tuple(d["shape"]), d["dtype"], d["source"], d["select"])


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
    return {"rows_per_shard": rows, "num_shards": max(1, math.ceil(num_samples / rows)), "chunk_rows": chunks}


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def _pow2_ceil(x: float) -> int:
    return 1 << max(0, int(math.ceil(math.log2(max(1.0, x)))))


class Store:
    """An open store: its manifest, its arrays, and shard bookkeeping.

    Opened read-only by ``open_store`` or for writing by ``create_or_resume``.
    """

    def __init__(self, group: zarr.Group, location: str, writable: bool):
        self.group = group
        self.location = location
        self.writable = writable
        attrs = dict(group.attrs)
        manifest = attrs.get(ATTRS)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{location!r} is a zarr group but not a kdcache store (no {ATTRS!r} root attribute); pass a store written by kdcache extract")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{location!r} has store format version {version!r}; this kdcache reads version {FORMAT_VERSION}: "
                "upgrade kdcache or re-extract the store"
            )
        self.manifest: dict[str, Any] = manifest
        self._arrays: dict[str, zarr.Array] = {}

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
        return {name: Target.from_dict(d) for name, d in self.manifest["targets"].items()}

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest["has_labels"])

    def sample_paths(self) -> list[str]:
        return [INDEX, FINGERPRINT] + ([LABEL] if self.has_labels else [])

    def paths(self) -> list[str]:
        return self.sample_paths() + [t.path for t in self.targets.values()]

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.num_samples)

    def read_rows(self) -> int:
        """Rows per aligned read block: the largest inner chunk of any array (divides the shard)."""
        return max(self.manifest["geometry"]["chunk_rows"].values())

    def array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            with zarr.config.set({"array.write_empty_chunks": True}):
                self._arrays[path] = self.group[path]
        return self._arrays[path]

    # -- progress ---------------------------------------------------------------------------
    def done(self) -> np.ndarray:
        """``[num_shards]`` bool: which shards are completely written."""
        return np.asarray(self.array(DONE)[:], dtype=bool)

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def samples_done(self) -> int:
        done = self.done()
        return int(sum(self.shard_rows(int(s))[1] - self.shard_rows(int(s))[0] for s in np.flatnonzero(done)))

    def pending_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.done())]

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one whole shard of every array, then mark it done (never the other way round)."""
        assert self.writable, "store opened read-only"
        start, stop = self.shard_rows(shard)
        missing = set(self.paths()) - set(arrays)
        assert not missing, f"shard {shard} lacks {sorted(missing)}"
        for path, data in arrays.items():
            assert len(data) == stop - start, (path, len(data), start, stop)
            self.array(path)[start:stop] = data
        self.array(DONE)[shard] = True

    def finish(self) -> None:
        """Record completion time once every shard is done."""
        if self.complete and not self.manifest.get("completed"):
            self.manifest["completed"] = _now()
            self.group.attrs[ATTRS] = self.manifest

    # -- reading ----------------------------------------------------------------------------
    def read(self, path: str, start: int, stop: int) -> np.ndarray:
        return self.array(path)[start:stop]

    def iter_blocks(self, shards: list[int] | None = None) -> Iterator[tuple[int, int]]:
        """Aligned ``(start, stop)`` row ranges of whole inner chunks, shard by shard."""
        step = self.read_rows()
        for shard in range(self.num_shards) if shards is None else shards:
            start, stop = self.shard_rows(shard)
            for lo in range(start, stop, step):
                yield lo, min(lo + step, stop)

    def nbytes_stored(self) -> int | None:
        """Bytes on disk (local stores), else None."""
        root = Path(self.location)
        if not root.is_dir():
            return None
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    def nbytes_raw(self) -> int:
        """Uncompressed bytes of the rows done, over every array."""
        rows = self.samples_done()
        total = 0
        for path in self.paths():
            arr = self.array(path)
            total += rows * int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
        return total

    def info(self) -> dict[str, Any]:
        """The machine-readable summary ``kdcache info --json`` prints."""
        m = self.manifest
        stored, raw = self.nbytes_stored(), self.nbytes_raw()
        return {
            "location": self.location,
            "format": FORMAT,
            "format_version": m["format_version"],
            "kdcache_version": m["kdcache_version"],
            "created": m["created"],
            "completed": m.get("completed"),
            "num_samples": self.num_samples,
            "samples_done": self.samples_done(),
            "complete": self.complete,
            "shards_done": int(self.done().sum()),
            "num_shards": self.num_shards,
            "rows_per_shard": self.rows_per_shard,
            "has_labels": self.has_labels,
            "teacher": m["teacher"],
            "dataset": m["dataset"],
            "targets": {
                name: {"path": t.path, "shape": [self.num_samples, *t.shape], "dtype": t.dtype, "source": t.source, "select": t.select}
                for name, t in self.targets.items()
            },
            "bytes_stored": stored,
            "bytes_raw": raw,
            "compression_ratio": (raw / stored) if stored else None,
        }


def open_store(location: str | os.PathLike[str], *, mode: str = "r") -> Store:
    """Open an existing store (read-only by default). Never runs code: the manifest is JSON."""
    location = str(location)
    if not _exists(location):
        raise StoreError(f"no store at {location!r}; run kdcache extract PIPELINE --out {location} first")
    try:
        group = zarr.open_group(location, mode=mode, zarr_format=3)
    except (FileNotFoundError, ValueError, zarr.errors.NodeTypeValidationError) as e:  # type: ignore[attr-defined]
        raise StoreError(f"{location!r} is not a zarr v3 group ({e}); pass a store written by kdcache extract") from None
    return Store(group, location, writable=mode != "r")


def _exists(location: str) -> bool:
    return Path(location, "zarr.json").is_file()


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
}


def create_or_resume(location: str | os.PathLike[str], manifest: dict[str, Any], *, overwrite: bool = False) -> Store:
    """Create a store for ``manifest`` or reopen a partial one made from the same inputs.

    Resuming is refused when anything in ``IDENTITY`` differs (naming it); ``overwrite`` starts afresh.
    The arrays are created here, once, before any shard is written.
    """
    location = str(location)
    if _exists(location) and not overwrite:
        store = open_store(location, mode="r+")
        for key, what in IDENTITY.items():
            old, new = _get(store.manifest, key), _get(manifest, key)
            if old != new:
                key, old, new = _difference(key, old, new)
                raise StoreMismatchError(
                    f"{location!r} was made with different {what} ({key}: store has {_short(old)}, now {_short(new)}); "
                    "use the original pipeline to resume, or --overwrite to start afresh"
                )
        return store
    path = Path(location)
    if path.exists() and not _exists(location) and (not path.is_dir() or any(path.iterdir())):  # never wipe other files
        raise StoreError(f"{location!r} exists and is not a kdcache store; choose another --out or remove it")
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, created=_now(), completed=None)
    group = zarr.open_group(location, mode="w", zarr_format=3)
    geometry = manifest["geometry"]
    rows, n = geometry["rows_per_shard"], manifest["num_samples"]
    level = manifest["compression"]["level"]
    compressors = [ZstdCodec(level=level), Crc32cCodec()] if manifest["compression"]["codec"] == "zstd" else [Crc32cCodec()]
    columns = {INDEX: ((), "int64"), FINGERPRINT: ((), "uint64")}
    if manifest["has_labels"]:
        columns[LABEL] = ((), "int64")
    for t in manifest["targets"].values():
        columns[t["path"]] = (tuple(t["shape"]), t["dtype"])
    for path, (shape, dtype) in columns.items():
        chunk = geometry["chunk_rows"][path]
        group.create_array(
            path,
            shape=(n, *shape),
            chunks=(chunk, *shape),
            shards=(rows, *shape),
            dtype=dtype,
            compressors=compressors,
            fill_value=0,
            dimension_names=["sample", *[f"dim_{i}" for i in range(len(shape))]],
        )
    group.create_array(DONE, shape=(geometry["num_shards"],), chunks=(1,), dtype="bool", fill_value=False, compressors=None)
    group.attrs[ATTRS] = manifest  # last: a store without its manifest is never mistaken for one
    return Store(group, location, writable=True)


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def _difference(key: str, old: Any, new: Any) -> tuple[str, Any, Any]:
    """The dotted key and values of the first leaf where two manifest values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            if old.get(k) != new.get(k):
                return _difference(f"{key}.{k}", old.get(k), new.get(k))
    return key, old, new


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
