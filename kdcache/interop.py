"""Hand-over formats: a single ``.zarr.zip`` file (``pack``) and HDF5 (``export`` / ``import_hdf5``).

Everything streams one shard (or one storage object) at a time, so memory stays bounded by the
largest shard whatever the store's size. The HDF5 layout is specified in docs/FORMAT.md §16.
"""

from __future__ import annotations

import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kdcache import store as layout
from kdcache.errors import StoreError

HDF5_LAYOUT_VERSION = 1
HDF5_COMPRESSION = ("gzip", "lzf", "none")


def pack(location: str, out: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
         overwrite: bool = False) -> dict[str, Any]:
    """Copy a finished store, object by object, into one uncompressed zip file ``out`` (read back as a store).

    A zip is write-once, so only a complete store whose done shards all have their objects is packed. The
    file appears only once whole and read back as a store (written beside it as ``*.part.zip`` and renamed).
    """
    out = Path(out)
    if not out.name.endswith(".zip"):
        raise StoreError(f"pack writes a zip file; name it *.zarr.zip, not {str(out)!r}")
    _check_out(out, overwrite)
    store = _complete(location, storage_options, "pack")
    _check_objects(store, "pack")
    keys = store.object_keys()
    part = out.with_name(out.name[: -len(".zip")] + ".part.zip")  # a *.zip name: it opens as a zip store
    nbytes = 0
    with _removed_on_failure(part):
        # Chunks are already compressed: ZIP_STORED keeps byte-range reads of shards possible.
        with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for key in keys:
                data = store.raw_object(key)
                if data is None:
                    continue  # listed but gone: an absent object reads as fill, as in the source
                z.writestr(zipfile.ZipInfo(key, date_time=(1980, 1, 1, 0, 0, 0)), data)
                nbytes += len(data)
        _check_objects(_complete(str(part), None, "pack"), "pack")  # it opens as a complete store, with every shard object
    os.replace(part, out)
    return {"out": str(out), "objects": len(keys), "bytes": nbytes, "file_bytes": out.stat().st_size}


def export_hdf5(location: str, out: str | os.PathLike[str], *, compression: str = "gzip", storage_options: dict[str, Any] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write a complete store as one HDF5 file: the same paths as groups/datasets, chunked like the
    store's inner chunks, compressed with ``compression`` (gzip, lzf or none); the manifest as the
    JSON string root attribute ``kdcache``."""
    import h5py

    if compression not in HDF5_COMPRESSION:
        raise StoreError(f"unknown HDF5 compression {compression!r}; choose one of {', '.join(HDF5_COMPRESSION)}")
    out = Path(out)
    _check_out(out, overwrite)
    store = _complete(location, storage_options, "export")
    part = out.with_name(out.name + ".part")
    with _removed_on_failure(part), h5py.File(part, "w") as f:
        f.attrs[layout.ATTRS] = json.dumps(store.manifest)
        f.attrs["kdcache_hdf5_version"] = HDF5_LAYOUT_VERSION
        for path in store.paths() + [layout.DONE]:
            arr = store.array(path)
            chunks = (int(arr.chunks[0]), *arr.shape[1:]) if path != layout.DONE else None
            ds = f.create_dataset(path, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                  compression=None if compression == "none" or path == layout.DONE else compression)
            if path == layout.DONE:
                ds[:] = arr[:]
                continue
            for shard in range(store.num_shards):  # one shard in memory at a time
                start, stop = store.shard_rows(shard)
                ds[start:stop] = store.read(path, start, stop)
    os.replace(part, out)
    return {"out": str(out), "arrays": len(store.paths()) + 1, "file_bytes": out.stat().st_size, "compression": compression}


def import_hdf5(source: str | os.PathLike[str], location: str, *, storage_options: dict[str, Any] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Convert an HDF5 file written by ``export_hdf5`` back into a store at ``location`` (any writable
    location), with the manifest's geometry; resumable like extract (only shards not yet done are written)."""
    import h5py

    source = str(source)
    try:
        f = h5py.File(source, "r")
    except OSError as e:
        raise StoreError(f"cannot read {source!r} as HDF5 ({e}); pass a file written by kdcache export") from None
    with f:
        raw = f.attrs.get(layout.ATTRS)
        try:
            manifest = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else None
        except (TypeError, ValueError, RecursionError):
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != layout.FORMAT:
            raise StoreError(f"{source!r} has no kdcache manifest (root attribute {layout.ATTRS!r}); pass a file written by kdcache export")
        if manifest.get("format_version") != layout.FORMAT_VERSION:
            raise StoreError(f"{source!r} holds store format version {manifest.get('format_version')!r}; this kdcache reads "
                             f"version {layout.FORMAT_VERSION}: upgrade kdcache")
        layout.check_manifest(manifest, source)
        fresh = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "created", "completed")}
        with layout.writer_lock(location):  # one writer per store
            store = layout.create_or_resume(location, fresh, overwrite=overwrite, storage_options=storage_options)
            for path in store.paths() + [layout.DONE]:
                want = store.array(path)
                ds = f.get(path)
                if ds is None or not hasattr(ds, "shape") or tuple(ds.shape) != tuple(want.shape) or ds.dtype != want.dtype:
                    seen = "missing" if ds is None else f"{getattr(ds, 'shape', '?')} {getattr(ds, 'dtype', '?')}"
                    raise StoreError(f"{source!r}: dataset {path!r} is {seen}, the manifest says {tuple(want.shape)} {want.dtype}")
            done = f[layout.DONE][:]
            for shard in store.pending_shards():
                if not done[shard]:
                    continue  # not done in the source either: stays not done here
                start, stop = store.shard_rows(shard)
                store.write_shard(shard, {path: f[path][start:stop] for path in store.paths()})
            store.finish()
    return store.info()


def _complete(location: str, storage_options: dict[str, Any] | None, verb: str) -> layout.Store:
    store = layout.open_store(location, storage_options=storage_options)
    if not store.complete:
        done = int(store.done().sum())
        raise StoreError(f"{location!r} is incomplete ({done}/{store.num_shards} shards done); finish kdcache extract before you {verb} it")
    return store


def _check_objects(store: layout.Store, verb: str) -> None:
    """Refuse a store whose arrays do not open or whose done shards lack their storage object (a copy would
    claim to be complete without them: an absent object reads as zeros)."""
    for path in store.paths():
        store.checked_array(path)  # a damaged zarr.json is a StoreError naming it
    problems = store.damaged_shards()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"cannot {verb} {store.location!r}: {problems[0]}{more}; run kdcache verify {store.location} "
                         "to list the damage, and re-extract the store or copy it again")


@contextmanager
def _removed_on_failure(part: Path) -> Iterator[None]:
    """Remove the temporary file ``part`` if the block that writes it fails: no partial output is left."""
    try:
        yield
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise StoreError(f"{str(out)!r} exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
