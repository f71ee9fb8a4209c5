"""Where a store lives: a local folder, a ``.zip`` file, an object store (``s3://``, any fsspec URL) or a web server
(``http(s)://``). The zarr Store and the fsspec filesystem for a location and its storage options, the first look at an
endpoint (short timeouts, so one that never answers is named in seconds), and the error for one that cannot be reached.
What the store holds is ``store``'s; who may write it, ``locking``'s (docs/FORMAT.md §13, docs/SHARING.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import errno
import fcntl
import functools
import html
import importlib.util
import json
import os
import posixpath
import re
import shutil
import stat
import sys
import time
import uuid
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import numpy as np
import zarr

from kdcache.errors import DamagedStoreError, StoreError, one_line, short

REMOTE_EXTRA = ("fsspec", "s3fs", "aiohttp")  # what kdcache[remote] installs (pyproject.toml): s3:// and http(s)://


MAX_METADATA_BYTES = 128 * 2**20  # a zarr.json larger than this is refused unread (a kdcache manifest takes a few KB)


def object_at_most(bounds: dict[str, int] | dict[str, int | None], key: str) -> int | None:
    """The most bytes the object ``key`` of a store may hold (FORMAT.md §13): a ``zarr.json``, ``MAX_METADATA_BYTES``; a
    chunk object, its array's bound in ``bounds`` (array path → bound: ``Store.array`` sets it); None: not known."""
    if key == "zarr.json" or key.endswith("/zarr.json"):
        return MAX_METADATA_BYTES
    path, sep, _ = key.rpartition("/c/")  # a chunk's key: its array's path, "/c/", the chunk's grid coordinates
    return bounds.get(path) if sep else None


def too_large(location: str, key: str, size: int | None, bound: int, done: str = "read") -> StoreError:
    """The error for the object ``key`` of the store at ``location`` holding ``size`` bytes (None: more than ``bound``,
    where the read stopped), more than it can (``bound``): it is not ``done`` (read, packed)."""
    holds = f"{size:,} bytes, more than it can ({bound:,}" if size is not None else f"more than {bound:,} bytes, the most it can (the read stopped there"
    return DamagedStoreError(f"{location!r} is damaged: object {short(key)} holds {holds}: FORMAT.md §13), and is not {done}; "
                      f"run kdcache verify {location}, and copy the store again from its source")


class _LocalStore(zarr.storage.LocalStore):
    """zarr's local folder store, reading only regular files inside the folder (``local_object``): a store received
    from elsewhere may hold a link to any file of the recipient's (which ``pack`` would copy into the zip it hands on),
    to ``/dev/zero`` (a read that never ends), or a FIFO (a read that waits forever). Nor does it read an object larger
    than it can be (``at_most``): a sparse file of 100 GB takes 4 KB on disk and survives a tarball, and zarr reads an
    object (a shard's inner chunk: any range its index names) whole into memory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.object_bounds: dict[str, int] = {}  # array path → most bytes one of its chunk objects holds (Store.array sets it)

    def at_most(self, key: str) -> int | None:
        return object_at_most(self.object_bounds, key)

    async def delete_dir(self, prefix: str) -> None:
        """zarr's, but the store's own folder (``prefix`` "": ``mode="w"`` clearing it for a new store or an
        ``--overwrite``) is emptied, not deleted and made again: zarr's ``rmtree`` of it failed on ``--out .`` (EINVAL, once
        an ``--overwrite`` had deleted the store inside: "shards already done are kept"), and of a mount point (EBUSY);
        elsewhere the folder made again lost its owner, group and mode (a team's shared folder) and left a shell in it
        in a deleted folder."""
        if prefix.strip("/"):
            return await super().delete_dir(prefix)
        self._check_writable()
        if not os.path.isdir(self.root):
            return
        # the root zarr.json first: a deletion stopped midway leaves no store to resume, but its remains (FORMAT.md §13)
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name != "zarr.json"):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    async def set(self, key: str, value: Any) -> None:
        await self._write(key, value, exclusive=False)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        try:
            await self._write(key, value, exclusive=True)
        except FileExistsError:
            pass

    async def _write(self, key: str, value: Any, exclusive: bool) -> None:
        """zarr's write of an object (into ``STEM.UUID.partial`` beside it, renamed over it), its bytes flushed to the disk
        before the rename (``write_file``): a power loss leaves the metadata and the manifest whole, old or new. The
        root's ``zarr.json`` (the manifest) also has its folder flushed after: the store is one once it is written."""
        if not self._is_open:
            await self._open()
        self._check_writable()
        file = object_to_write(self.root, key)
        tmp = file.with_suffix(f".{uuid.uuid4().hex}.partial")  # zarr's own temp name (FORMAT.md §13.1)
        await asyncio.to_thread(write_file, file, [value.as_buffer_like()], tmp, exclusive=exclusive)
        if key == "zarr.json":
            await asyncio.to_thread(sync_folder, self.root)

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        local_object(self.root, key, self.at_most(key))
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            local_object(self.root, key, self.at_most(key))
        return await super().get_partial_values(prototype, key_ranges)

    async def getsize(self, key: str) -> int:
        if Path(self.root, *key.split("/")).is_dir():  # a folder is no object: read as absent (get), so missing, not 4,096 bytes
            raise FileNotFoundError(key)
        return await super().getsize(key)


class _ZipStore(zarr.storage.ZipStore):
    """zarr's zip store, whose read of a member that ends before the size the zip's central directory gives it (a
    damaged or crafted zip) is a ``BadZipFile`` naming it, as a member failing its CRC-32 is, not zipfile's bare
    ``EOFError`` (which click's command line took for an aborted prompt: every command said only "Aborted!")."""

    def _get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        try:
            return super()._get(key, prototype, byte_range)
        except EOFError:
            raise zipfile.BadZipFile(f"member {key!r} is cut short (the zip's central directory gives it more bytes)") from None

    def members(self, keys: list[str]) -> set[str]:
        """Those of ``keys`` that are members of the zip, looked up in its central directory as read at opening (none
        read): ``exists``, one key at a time through the event loop, took 1 s for 50,000 keys (a 10,000-shard store)."""
        if not self._is_open:
            self._sync_open()
        with self._lock:
            names = self._zf.NameToInfo
            return {key for key in keys if key in names}


class _RemoteStore(zarr.storage.FsspecStore):
    """zarr's fsspec store (object storage, ``http(s)://``), reading no object larger than it can be (``at_most``, as
    ``_LocalStore``): a server may send any number of bytes for an object (a crafted or broken store's multi-GB
    ``zarr.json`` or shard; fsspec reads a body whole, and its http ignores a Range the server did not honour), so an
    object of s3 or http(s) is streamed and the read stops past its bound (``read_bounded``); one of another backend
    (a zip behind a URL: its member's size in the zip's directory) is refused by the size its filesystem gives first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.object_bounds: dict[str, int] = {}  # array path → most bytes one of its chunk objects holds (Store.array sets it)
        self.location = ""  # the store's location as the user named it, for errors (``_url_store`` sets it)

    def at_most(self, key: str) -> int | None:
        return object_at_most(self.object_bounds, key)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return await self.get_at_most(key, prototype, byte_range, self.at_most(key))

    async def delete_dir(self, prefix: str) -> None:
        """zarr's (``mode="w"`` clears a store's prefix for a new store or an ``--overwrite``), deleting the objects
        under ``PREFIX/`` alone, in batches: s3fs's recursive delete of a bucket's root (``s3://BUCKET``: a store there)
        deletes the bucket itself, and in a versioned bucket every version of every object first; of a prefix, the
        object named as the prefix too (``s3://BUCKET/run``, beside the store ``s3://BUCKET/run/``). The bucket, its
        settings, other versions and that object are kept."""
        from zarr.storage._fsspec import _dereference_path

        path = _dereference_path(self.path, prefix).rstrip("/")
        self._check_writable()
        with contextlib.suppress(*self.allowed_exceptions):
            # only the objects below PREFIX/: s3fs's recursive delete of a prefix deletes the object named PREFIX too
            # (s3://bucket/run beside the store s3://bucket/run/, a user's file: an --overwrite deleted it)
            objects = [o for o in await self.fs._find(path) if o.startswith(path + "/")]
            if objects:
                await self.fs._rm(objects)  # a list: its objects alone, never the bucket (what a path with no key names)

    def _key(self, key: str) -> str:
        """``key`` as it goes into its object's URL: percent-encoded over http(s), where a store's keys hold ``%``
        (FORMAT.md §6: the layer ``a/b`` is the folder ``targets/layers/a%2Fb``, at ``…/a%252Fb``; sent as it was, the
        server read ``a/b`` and the array was "missing"), a space, ``~``; as it is elsewhere."""
        return quote(key, safe="/") if _http(self.fs) else key

    async def get_at_most(self, key: str, prototype: Any, byte_range: Any, at_most: int | None) -> Any:
        """``get`` of an object known to hold at most ``at_most`` bytes (None: zarr's own read)."""
        if at_most is None and not _http(self.fs):  # over http(s), every GET is kdcache's own (``_response``: its redirects)
            return await super().get(self._key(key), prototype, byte_range)
        at_most = sys.maxsize if at_most is None else at_most
        if not self._is_open:
            await self._open()
        from zarr.storage._fsspec import _dereference_path

        path = _dereference_path(self.path, self._key(key))
        refuse = functools.partial(too_large, self.location or self.path, key, bound=at_most)
        try:
            if _streamed(self.fs):
                return prototype.buffer.from_bytes(await read_bounded(self.fs, path, byte_range, at_most, refuse, root=self.path))
            size = (await self.fs._info(path)).get("size")
        except self.allowed_exceptions:
            return None
        except OSError as e:
            if "not satisfiable" in str(e):  # zarr's words: s3's answer to a range of an empty object
                return prototype.buffer.from_bytes(b"")
            raise
        if isinstance(size, int) and size > at_most:
            raise refuse(size)
        return await super().get(self._key(key), prototype, byte_range)

    async def exists(self, key: str) -> bool:
        """zarr's; over http(s) fsspec's GET (an answer below 400), but kdcache's own (``_response``: its redirects)."""
        if not _http(self.fs):
            return await super().exists(key)
        import aiohttp
        from zarr.storage._fsspec import _dereference_path

        try:
            async with _response(self.fs, _dereference_path(self.path, self._key(key)), None, self.path):
                return True
        except (FileNotFoundError, aiohttp.ClientError):
            return False

    async def getsize(self, key: str) -> int:
        return await super().getsize(self._key(key))

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))

    async def list(self) -> Any:
        async for key in (self.list_prefix("") if _http(self.fs) else super().list()):
            yield key

    async def list_except(self, skip: Collection[str]) -> Any:
        """``list``'s keys but those below the folders ``skip`` names (``targets/logits/c``): an http(s) store's index
        pages of those folders are not read (``_http_keys``); an object store's flat listing gives them, left out here."""
        if _http(self.fs):
            for key in await self._http_keys("", skip):
                yield key
            return
        async for key in super().list():
            if not any(key.startswith(f"{folder}/") for folder in skip):
                yield key

    async def list_prefix(self, prefix: str) -> Any:
        """zarr's, but an http(s) store's index pages are walked by kdcache (``_http_keys``)."""
        if not _http(self.fs):
            async for key in super().list_prefix(prefix):
                yield key
            return
        for key in sorted(await self._http_keys(prefix.strip("/"))):
            yield key

    async def _http_keys(self, folder: str, skip: Collection[str] = ()) -> set[str]:
        """The keys of the objects below the folder ``folder`` (``""``: the store's root) of an http(s) store, as its
        index pages link to them (``_index_links``), ``LISTING_PAGES_AT_ONCE`` pages at a time. Each folder a page links
        below it is listed in turn, once however many spellings link to it, down to ``MAX_LISTING_DEPTH`` below
        ``folder``, but for the folders ``skip`` names (their objects not wanted); more than ``MAX_LISTING_FOLDERS`` folders
        in all is a StoreError: a server may link folders without end, and each is a request or two."""
        files: set[str] = set()
        pending, seen = [folder], {folder}
        while pending:
            wave, pending = pending[-LISTING_PAGES_AT_ONCE:], pending[:-LISTING_PAGES_AT_ONCE]
            for links in await asyncio.gather(*(self._index_links(f) for f in wave)):
                files |= {link for link in links if not link.endswith("/")}
                for sub in sorted(link.rstrip("/") for link in links if link.endswith("/")):
                    if sub not in seen and sub not in skip and sub.count("/") - folder.count("/") + (not folder) <= MAX_LISTING_DEPTH:
                        seen.add(sub)
                        pending.append(sub)
            if len(seen) > MAX_LISTING_FOLDERS:
                raise _listing_too_long(self.location or self.path, folder)
        return files

    async def _index_links(self, folder: str) -> set[str]:
        """The keys of the objects and folders (ending in ``/``) below the folder ``folder`` that its index page links to
        (``_links``), the page at ``folder/`` or, where that lists nothing, at ``folder``, as fsspec's walk asks (a server
        may serve a folder's page without the ``/`` alone); a folder that cannot be listed (a 404, a 403: any 4xx answer
        but 408 and 429, a page refused for now) has none. Each page is read by ``read_bounded``: a server may send any
        number of bytes for it, and fsspec's listing read it whole."""
        import aiohttp

        url = f"{self.path}/{self._key(folder)}".rstrip("/")
        refuse = functools.partial(_listing_too_large, self.location or self.path, f"{folder}/" if folder else "/")
        for asked in (url + "/", url):
            try:
                page = await read_bounded(self.fs, asked, None, MAX_LISTING_BYTES, refuse, root=self.path)
            except FileNotFoundError:  # no index page there (a 404): fsspec's walk lists nothing there. Not a page that
                continue  # could not be read (a timeout, a connection reset): its objects would be left out of pack's zip
            except aiohttp.ClientResponseError as e:  # a folder the server will not list (nginx without autoindex: 403)
                if e.status >= 500 or e.status in (408, 429):  # not a folder without a page: one not had this time (a
                    raise  # request timeout, too many requests at once), whose objects pack's zip would leave out
                continue
            links = _links(page.decode(errors="ignore"), url + "/", self.fs.simple_links)
            if links:
                return {f"{folder}/{link}" if folder else link for link in links}
        return set()


REMOTE_READS = 16  # whole-shard reads in flight at once from an object store or http server (each waits on the network)
MAX_LISTING_BYTES = 256 * 2**20  # an http(s) folder's index page larger than this is refused (one of 100,000 shards: 4-30 MB)
MAX_LISTING_DEPTH = 32  # http(s) folders below a store's root listed (a store's keys are at most 8 + its arrays' dimensions deep)
LISTING_PAGES_AT_ONCE = 4  # http(s) index pages asked for at once (a store of 2,000 shards has ~10,000 folders: at 20 ms a
# page, 200 s one at a time). Not more: `python -m http.server` queues 5 connections, and a connection past them waits for
# the client's SYN retry (1 s); 144 folders at 20 ms: 3.4 s one at a time, 1.0 s 4 at once, 4.7 s 8, 9.4 s 16 (0.45 s 16
# at once where the server queues 128)
MAX_LISTING_FOLDERS = 2**20  # http(s) folders of a store listed in all (a store of 10 arrays of 100,000 shards has ~3 million
# objects, in ~300,000 folders to 1,000,000 for arrays of 4 dimensions or more; a store that large is packed where it lives)


def _links(page: str, folder: str, simple: bool) -> set[str]:
    """The paths below the http(s) folder ``folder`` (a URL ending in ``/``) that its index ``page`` links to, as
    fsspec's http finds links (``href``s; with ``simple``, any URL in the text): percent-decoded (a server encodes
    every name it links: ``a%252Fb/`` for the folder ``a%2Fb``), relative to the folder, a folder's ending in ``/``.
    A link is resolved as a browser resolves it (``./x``, ``../x``, ``/t.zarr/x``, ``//host/x``, a full URL); one that
    does not lead below the folder is left out: to the folder itself under another spelling, its parent or anywhere
    else outside it, another scheme, host or port, a query or fragment (Apache's sort links, ``?C=N;O=D``)."""
    from urllib.parse import unquote, urljoin, urlsplit

    from fsspec.implementations.http import ex, ex2

    base = urlsplit(folder)
    inside = posixpath.normpath(unquote(base.path)).rstrip("/") + "/"
    found = set()  # a link's server as a redirect's is judged (_server): http://host/ and http://HOST:80/ are one
    for link in [html.unescape(u[2]) for u in ex.findall(page)] + (ex2.findall(page) if simple else []):
        try:
            joined = urljoin(folder, link)
            url = urlsplit(joined)
        except ValueError:  # no URL ("http://[bad"): a link to nothing
            continue
        if (_server(joined), url.query, url.fragment) != (_server(folder), "", ""):
            continue
        path = posixpath.normpath(unquote(url.path))
        if path.startswith(inside) and path != inside:
            found.add(path[len(inside):] + "/" * url.path.endswith("/"))
    return found


def _listing_too_long(location: str, folder: str) -> StoreError:
    """The error for an http(s) store at ``location`` whose index pages below its folder ``folder`` link to more than
    ``MAX_LISTING_FOLDERS`` folders."""
    return StoreError(f"{location!r}: the index pages below its folder {short(folder + '/' if folder else '/')} link to more than "
                      f"{MAX_LISTING_FOLDERS:,} folders, more than kdcache lists of a store; serve the store without index pages "
                      "(kdcache reads the objects its layout names), or pack it where it is stored (kdcache pack FOLDER OUT) and "
                      "serve the zip")


def _listing_too_large(location: str, folder: str, size: int | None) -> StoreError:
    """The error for the index page of the http(s) folder ``folder`` of the store at ``location`` holding ``size`` bytes
    (None: more than ``MAX_LISTING_BYTES``, where the read stopped)."""
    holds = f"{size:,} bytes" if size is not None else f"more than {MAX_LISTING_BYTES:,} bytes (the read stopped there)"
    return StoreError(f"{location!r}: the index page of its folder {short(folder)} holds {holds}, more than kdcache reads of one "
                      f"({MAX_LISTING_BYTES:,}); it lists no store's objects: serve the store without index pages (kdcache reads "
                      "the objects its layout names), or pack it where it is stored (kdcache pack FOLDER OUT) and serve the zip")


READ_BLOCK = 2**20  # a bounded read's step (what it asks the body for at a time)


def _streamed(fs: Any) -> bool:
    """Whether ``read_bounded`` reads from the filesystem ``fs``: s3fs's, or fsspec's http(s)."""
    return hasattr(fs, "call_s3") or _http(fs)


def _http(fs: Any) -> bool:
    """Whether ``fs`` is fsspec's http(s) filesystem."""
    return "http" in (getattr(fs, "protocol", ()) or ())


async def read_bounded(fs: Any, path: str, byte_range: Any, at_most: int, refuse: Any, *, root: str) -> bytes:
    """The bytes of ``path`` (s3fs or fsspec's http; ``byte_range``: a zarr ``ByteRequest`` or None) of an object of at
    most ``at_most`` bytes, read in blocks of ``READ_BLOCK``: a Content-Length past the bound is ``refuse(size)``, a
    body past it ``refuse(None)`` once one byte more is read (both StoreErrors). A server that ignores the Range sends
    the whole object: the range is cut from it, its bytes read only as far as the range ends. On s3, a read whose body
    fails part way (a dropped connection, a timeout) is made again, up to s3fs's ``retries``, as its own reads are.
    ``root``: the URL of the store ``path`` is in (``_redirect``'s error names where the store is on another server)."""
    if hasattr(fs, "call_s3"):
        from s3fs.core import _error_wrapper

        return await _error_wrapper(_read_bounded, args=(fs, path, byte_range, at_most, refuse, root), retries=fs.retries)
    return await _read_bounded(fs, path, byte_range, at_most, refuse, root)


async def _read_bounded(fs: Any, path: str, byte_range: Any, at_most: int, refuse: Any, root: str) -> bytes:
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    if isinstance(byte_range, RangeByteRequest) and byte_range.start >= byte_range.end:
        return b""
    asked = {RangeByteRequest: lambda r: f"bytes={r.start}-{r.end - 1}", OffsetByteRequest: lambda r: f"bytes={r.offset}-",
             SuffixByteRequest: lambda r: f"bytes=-{r.suffix}"}
    header = None if byte_range is None else asked[type(byte_range)](byte_range)
    async with _response(fs, path, header, root) as (status, length, read):
        whole = header is None or status != 206  # 206: the range alone came
        enough = byte_range.end if whole and isinstance(byte_range, RangeByteRequest) else None
        data = await read_body(length, read, at_most, refuse, enough)
    if not whole or byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    return data[byte_range.offset :] if isinstance(byte_range, OffsetByteRequest) else data[len(data) - min(byte_range.suffix, len(data)) :]


async def read_body(length: int | None, read: Any, at_most: int, refuse: Any, enough: int | None = None) -> bytes:
    """The body of a response (``length``: its Content-Length, or None; ``read(n)``: its next bytes) of at most
    ``at_most`` bytes, read in blocks of ``READ_BLOCK``: a Content-Length past the bound is ``refuse(size)``, a body
    past it ``refuse(None)`` once one byte more is read. ``enough``: read no further than this many bytes."""
    if length is not None and length > at_most:
        raise refuse(length)
    enough = at_most + 1 if enough is None else min(enough, at_most + 1)
    blocks, got = [], 0
    while got < enough and (block := await read(min(READ_BLOCK, enough - got))):
        blocks.append(block)
        got += len(block)
    if got > at_most:
        raise refuse(None)
    return b"".join(blocks)


@contextlib.asynccontextmanager
async def _response(fs: Any, path: str, byte_range: str | None, root: str) -> Any:
    """A GET of ``path`` through ``fs`` (s3fs, or fsspec's http), ``byte_range`` its Range header (or none): ``(HTTP
    status, Content-Length or None, read(n))``, the body unread. A missing object is FileNotFoundError, as fsspec says.
    Over http(s), a redirect is followed only on the same server (``_redirect``; ``root``: the URL of the store ``path``
    is in)."""
    ranged = {} if byte_range is None else {"Range": byte_range}
    if hasattr(fs, "call_s3"):
        bucket, key, version = fs.split_path(path)
        r = await fs._call_s3("get_object", Bucket=bucket, Key=key, **({"VersionId": version} if version else {}), **ranged)
        try:
            yield r["ResponseMetadata"]["HTTPStatusCode"], r.get("ContentLength"), r["Body"].read
        finally:
            r["Body"].close()
        return
    kwargs = dict(fs.kwargs, allow_redirects=False)
    kwargs["headers"] = {**(kwargs.get("headers") or {}), **ranged}
    session = await fs.set_session()
    url = path
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(fs.encode_url(url), **kwargs) as r:
            if r.status in (301, 302, 303, 307, 308) and "Location" in r.headers:
                url = _redirect(path, url, r.headers["Location"], root)
                continue
            fs._raise_not_found_for_status(r, path)
            yield r.status, r.content_length, r.content.read
            return
    raise StoreError(f"{path!r} redirects more than {MAX_REDIRECTS} times (last to {short(url)}): a redirect loop; check the URL "
                     "and the server's redirect rules")


MAX_REDIRECTS = 10  # an http(s) object's redirects followed (aiohttp's default)


def _redirect(path: str, url: str, location: str, root: str) -> str:
    """Where the answer to a GET of ``url`` (asked for the object ``path`` of the store at the URL ``root``) redirects
    to, its ``Location`` header ``location``: a URL on the same server (``_server``) alone. One on another server is a
    StoreError naming the URL the store would be at there (``path``'s key kept by the redirect: ``…/t.zarr/zarr.json`` →
    ``https://other/t.zarr/zarr.json`` is ``https://other/t.zarr``): its objects would come from a server the user did
    not name, and the request headers given (credentials among them: aiohttp drops only ``Authorization``) would go to it."""
    from urllib.parse import urljoin, urlsplit

    target = urljoin(url, location)
    web = urlsplit(target).scheme.lower() in ("http", "https")
    if web and _server(target) == _server(url):
        return target
    key = path[len(root.rstrip("/")):] if path.startswith(root.rstrip("/")) else None  # "/zarr.json"; "": the store's file
    moved = target[: len(target) - len(key)] if web and key is not None and target.endswith(key) else None
    fix = f"pass the URL it is at there, {moved!r}, if you trust that server" if moved else "check the URL"
    raise StoreError(f"{path!r} redirects to {short(target)}, on another server: kdcache follows redirects on the store's "
                     f"server alone; {fix}")


def _server(url: str) -> tuple[str, str | None, int | None]:
    """The server of the http(s) URL ``url`` as a redirect is judged: its scheme and host, in any case, and its port
    (the scheme's own where none is written: ``https://host`` is ``https://HOST:443``)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:  # a port that is none ("host:x"): no server's
        port = -1
    return parts.scheme.lower(), parts.hostname, port


class _ZipChainStore(_RemoteStore):
    """zarr's fsspec store for a zip behind a URL (``zip::https://…``), whose read of a member cut short is a
    ``BadZipFile`` naming it, as ``_ZipStore``'s is."""

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        try:
            return await super().get(key, prototype, byte_range)
        except EOFError:
            raise zipfile.BadZipFile(f"member {key!r} is cut short (the zip's central directory gives it more bytes)") from None

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
        key_ranges = list(key_ranges)
        try:
            return await super().get_partial_values(prototype, key_ranges)
        except EOFError:
            keys = sorted({key for key, _ in key_ranges})
            raise zipfile.BadZipFile(f"member {short(keys[0])} is cut short (the zip's central directory gives it more bytes)") from None


def local_object(root: str | os.PathLike[str], key: str, at_most: int | None = None) -> Path:
    """The file of the object ``key`` of the local store folder ``root``, once it is found to be a regular file inside
    the folder (or absent: read as missing) of at most ``at_most`` bytes (when given). A link to a file elsewhere, a
    special file (a FIFO, a device, a socket) or a file larger than the object can be is a StoreError naming it:
    nothing of it is read."""
    path = Path(root, *key.split("/"))
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return path
    mode = found.st_mode
    if stat.S_ISDIR(mode):
        return path  # not an object: zarr reads it as absent
    real = os.path.realpath(path)
    # no link on the way (the path resolves to itself, and the key has no "." or ".." part): the object is inside the folder,
    # whose own path resolved to itself on the way; else the folder's real path is worked out to compare with
    plain = real == os.path.abspath(path) and all(part not in ("", ".", "..") for part in key.split("/"))
    folder = os.path.abspath(root) if plain else os.path.realpath(root)
    if os.path.commonpath([real, folder]) != folder:
        why = f"is a link to {short(real)}, outside the store folder"
    elif not stat.S_ISREG(mode):
        why = f"is not a regular file (it leads to {'a FIFO' if stat.S_ISFIFO(mode) else 'a device or socket'} {short(real)})"
    elif at_most is not None and found.st_size > at_most:
        raise too_large(str(root), key, found.st_size, at_most)
    else:
        return path
    raise DamagedStoreError(f"{str(root)!r} is unsafe to read: object {short(key)} {why}; kdcache reads only regular files inside a "
                     "store folder: replace it with the object's own file, or copy the store again from its source")


def object_to_write(root: str | os.PathLike[str], key: str) -> Path:
    """The file to write the object ``key`` of the local store folder ``root`` as, once the folder it goes in is found
    to be inside the store folder (a link to a folder elsewhere on the way is a StoreError naming it, before anything
    is written or removed): an incomplete store received from elsewhere, finished by extract or import, may hold
    ``targets/logits/c`` linked to any folder of yours, where its shards, done markers and temp files would go."""
    path = Path(root, *key.split("/"))
    folder, real = os.path.realpath(root), os.path.realpath(path.parent)  # the parts not there yet are taken as named
    if os.path.commonpath([real, folder]) != folder:
        raise StoreError(f"{str(root)!r} is unsafe to write: {key.rpartition('/')[0]!r} leads to {real!r}, outside the store "
                         "folder; kdcache writes only inside a store folder: replace the link with a copy of what it names, "
                         "or copy the store again from its source")
    return path


def read_local_object(root: str | os.PathLike[str], key: str, at_most: int | None = None) -> np.ndarray | None:
    """The bytes (uint8) of the object ``key`` of the local store folder ``root``, or None where it is absent (or a
    folder): ``local_object``'s checks, made on the very file read (``LocalObjects``)."""
    with LocalObjects(root) as objects:
        return objects.read(key, at_most)


class LocalObjects:
    """Reads objects of the local store folder ``root`` as ``local_object`` followed by a read would, with the checks
    made on the very file read and a few system calls each. Each folder below ``root`` is opened without following a
    link, and kept open for the next read below it until ``close()`` (a buffer's shards share their array's folders);
    the file is checked (a regular file, at most ``at_most`` bytes) and read through its own descriptor, so nothing can
    be swapped in between the check and the read. A link on the way, or anything else this does not settle, goes
    through ``local_object``: a link inside the folder is read, any other is refused by name. A streaming epoch reads
    every shard of every column again: system calls release and retake the GIL, each a hand-off to the threads making
    batches and training, and ``local_object`` makes a dozen (``realpath``'s ``lstat`` of every part of the path)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = root
        self._folders: dict[str, int | None] = {}  # a folder's key ("" the root) -> its descriptor (None: absent)

    def __enter__(self) -> LocalObjects:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        folders, self._folders = self._folders, {}
        for fd in folders.values():
            if fd is not None:
                os.close(fd)

    def read(self, key: str, at_most: int | None = None) -> np.ndarray | None:
        folder_key, _, name = key.rpartition("/")
        if not _DIR_FD or any(part in ("", ".", "..") for part in key.split("/")):
            return _read_file(local_object(self.root, key, at_most))
        try:
            self._keep_only(folder_key)
            folder = self._folder(folder_key)
            if folder is None:
                return None
            found = os.stat(name, dir_fd=folder, follow_symlinks=False)
            if stat.S_ISDIR(found.st_mode):
                return None  # not an object: zarr reads it as absent
            if not stat.S_ISREG(found.st_mode) or at_most is not None and found.st_size > at_most:
                return _read_file(local_object(self.root, key, at_most))  # refused there, by name
            file = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
        except FileNotFoundError:
            return None
        except OSError:  # ELOOP: a link on the way; ENOTDIR: a file where a folder should be; EACCES...
            return _read_file(local_object(self.root, key, at_most))
        try:
            opened = os.fstat(file)
            if (opened.st_dev, opened.st_ino, opened.st_size) != (found.st_dev, found.st_ino, found.st_size):
                return _read_file(local_object(self.root, key, at_most))  # replaced since it was looked at: looked at again
            out = np.empty(opened.st_size, dtype=np.uint8)
            done = 0
            while done < len(out):
                n = os.preadv(file, [out[done:]], done)
                if n == 0:  # cut short since: what was read (its checksums fail)
                    return out[:done]
                done += n
            return out
        finally:
            os.close(file)

    def _keep_only(self, key: str) -> None:
        """Close the folders not on the way to the folder ``key``: one chain held open at a time (each shard has a
        folder of its own: a buffer of a thousand shards held a thousand descriptors, and ran out of them, EMFILE)."""
        on_the_way = {"", key} | {key[:i] for i, c in enumerate(key) if c == "/"}
        for other in [k for k in self._folders if k not in on_the_way]:
            fd = self._folders.pop(other)
            if fd is not None:
                os.close(fd)

    def _folder(self, key: str) -> int | None:
        """The descriptor of the folder ``key`` below the root, opened part by part without following links (the root
        itself as the user named it, links and all: ``local_object`` resolves it too); None where it is absent.
        OSError (ELOOP, ENOTDIR) where something on the way is not a plain folder."""
        if key in self._folders:
            return self._folders[key]
        parent_key, _, name = key.rpartition("/")
        if not key:
            fd = _open_absent(lambda: os.open(self.root, _FOLDER))
        else:
            parent = self._folder(parent_key)
            fd = None if parent is None else _open_absent(lambda: os.open(name, _FOLDER | os.O_NOFOLLOW, dir_fd=parent))
        self._folders[key] = fd
        return fd


def _open_absent(opening: Any) -> int | None:
    try:
        return opening()
    except FileNotFoundError:
        return None


_DIR_FD = os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd and hasattr(os, "preadv") and hasattr(os, "O_NOFOLLOW")
_FOLDER = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def write_file(file: Path, parts: list[Any], tmp: Path, *, exclusive: bool = False) -> None:
    """Write ``parts`` (buffers, in order) as the file ``file``: into ``tmp`` beside it with ``writev``, flushed to the
    disk (``sync``), then renamed over it (``exclusive``: linked in place, FileExistsError if ``file`` exists). A reader
    never sees a half-written file, and after a power loss or an OS crash ``file`` is the old one or the whole new one:
    a rename alone orders nothing on disk (a done marker could survive the shard it vouches for, or a file be renamed
    into place empty). On failure ``tmp`` is removed (a full disk gets its space back)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)  # less the umask, as open() makes files
    try:
        try:
            views = [memoryview(p).cast("B") for p in parts]
            while views:  # writev may write less than asked; an iovec list is capped (IOV_MAX)
                done = os.writev(fd, views[:1024])
                while views and done >= len(views[0]):
                    done -= len(views.pop(0))
                if done:
                    views[0] = views[0][done:]
            sync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, file)
            os.unlink(tmp)
        else:
            os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync(fd: int) -> None:
    """Flush what was written to the open file ``fd`` (or the names made in the folder ``fd``) to its disk (fsync). A file
    system that cannot (EINVAL, ENOTSUP: some FUSE and network mounts) is left as it is: there is nothing better to do."""
    try:
        if _FULL_FSYNC is not None:  # macOS: fsync leaves the bytes in the drive's cache, F_FULLFSYNC has the drive write them
            with contextlib.suppress(OSError):  # a file system without it: fsync
                fcntl.fcntl(fd, _FULL_FSYNC)
                return
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC:
            raise


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """``sync`` a folder: the names renamed into it (or removed from it) survive a power loss in the order they were made."""
    fd = os.open(folder, _FOLDER)
    try:
        sync(fd)
    finally:
        os.close(fd)


_CANNOT_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_FULL_FSYNC = getattr(fcntl, "F_FULLFSYNC", None)  # macOS only


def _read_file(path: Path) -> np.ndarray | None:
    """The bytes of a file ``local_object`` let through, None where it is absent (or a folder)."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def location_arg(value: Any, name: str) -> str:
    """A location argument of the Python API (a path or URL as ``str``, or an ``os.PathLike``) as a string; anything else
    (``None``, a number, an opened ``Store``) is a TypeError naming the argument, before ``str()`` makes it a folder name
    (``extract(p, None)`` wrote a store named ``None`` in the working directory)."""
    if isinstance(value, str | os.PathLike):
        location = os.fspath(value)
        _refuse_unexpanded_home(location)
        return location
    if hasattr(value, "location") and hasattr(value, "manifest"):  # an opened kdcache Store
        fix = f"pass its location, {name}=store.location ({value.location!r})"
    else:
        fix = "pass a path or URL as a str or pathlib.Path"
    raise TypeError(f"{name} must be the location of a store or folder, got {type(value).__name__} {value!r}; {fix}")


def _refuse_unexpanded_home(location: str) -> None:
    """Refuse a local path that begins with ``~`` or ``~user`` where no such folder is in the working directory: only a
    shell expands it, and not in quotes, after ``--out=`` or in a pipeline file's value, so ``extract --out='~/t.zarr'``
    wrote a folder named ``~`` here (which ``rm -rf ~`` then takes for the home folder). A folder ``~`` that exists is
    taken as meant."""
    if location_kind(location) not in ("local", "zip"):
        return
    path = local_path(location)
    head = path.split("/", 1)[0]
    if not head.startswith("~") or os.path.exists(head):
        return
    home = os.path.expanduser(head)
    fix = f"pass {location.replace(path, home + path[len(head):], 1)!r}" if home != head else "pass the path meant in full"
    if head != "~":  # '~run': a folder so named, as './~run' says (not '~' itself, which 'rm -rf ~' takes for the home folder)
        fix += f", or {location.replace(path, './' + path, 1)!r} for that folder"
    what = f"{location!r} is a name that" if head == path else f"{location!r} begins with {head!r}, which"
    raise StoreError(f"{what} only a shell expands (not in quotes, after --out=, or in a pipeline file): kdcache would "
                     f"take it as a folder of that name in {os.getcwd()!r}; {fix}")


def refuse_inside_store(location: str, out: Path, named: str, why: str) -> None:
    """Refuse an output path ``out`` (``named`` so in the message) inside the local store folder ``location`` is read
    from, saying ``why``: ``export STORE STORE/zarr.json --overwrite`` replaced the store's own manifest with the HDF5
    file; a training run's folder there went with the store at its next ``extract --overwrite``."""
    if location_kind(location) != "local":
        return
    folder = Path(local_path(location))
    if folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
        raise StoreError(f"{named} {str(out)!r} is inside the store {location!r} being read ({why}); write it outside the store "
                         f"folder (e.g. {str(folder.resolve().parent / out.name)!r})")


def broken_link(path: str | os.PathLike[str]) -> Path | None:
    """The symlink that leads nowhere (``ln -s /scratch/run run`` before ``/scratch/run`` is made, or where it is not
    mounted) which the local path ``path`` is, or lies under, as ``path`` spells it; None where there is none."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return None
        if p.is_symlink():
            return p
    return None


def broken_link_words(link: Path) -> str:
    """``link`` (a broken symlink: ``broken_link``) named with its target, in the words every message uses."""
    return f"a broken symlink, to {os.readlink(link)!r}, which does not exist"


def on_broken_link(path: str | os.PathLike[str]) -> str | None:
    """How the local ``path`` stands to a broken symlink (``broken_link``): "is a broken symlink, to …" or "lies under
    'L', a broken symlink, to …"; None where it is on none."""
    link = broken_link(path)
    if link is None:
        return None
    return f"{'is' if link == Path(path) else f'lies under {str(link)!r},'} {broken_link_words(link)}"


def refuse_broken_link(out: str | os.PathLike[str], named: str, fix: str) -> None:
    """Refuse an output path ``out`` (``named`` so in the message) that is, or lies under, a broken symlink, saying ``fix``:
    train and demo made the folder through it and said only "cannot write 'run': File exists; fix the cause"; pack and
    export replaced the link with their file."""
    said = on_broken_link(out)
    if said is not None:
        raise StoreError(f"{named} {str(out)!r} {said}; {fix}")


def options_arg(value: Any) -> None:
    """Refuse ``storage_options`` that are not a dict (or None): a string was read as its characters (``storage options
    ['=', 'a', 'e', ...]``), a list of ``KEY=VALUE`` strings (the CLI's ``--storage-option``) as option names."""
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"storage_options must be a dict of fsspec options, got {type(value).__name__} {short(value)}; pass e.g. "
                        "{'anon': True} (the CLI's --storage-option KEY=VALUE is {'KEY': VALUE} in Python)")


def flag_arg(value: Any, name: str, also: str = "") -> bool:
    """A flag of the Python API (``overwrite``, ``progress``, ``shuffle``...): True or False, a numpy bool too; anything
    else is a TypeError naming it, where any truthy value counted as True (``overwrite="no"`` replaced the store). An
    int (0, 1) is refused as well, as it is for the pipeline's flags (``train.drop_last = 1``). ``also``: another value
    the argument takes (checked by the caller), for the message."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    choices = f"True, False or {also}" if also else "True or False"
    raise TypeError(f"{name} must be {choices}, got {type(value).__name__} {short(value)}")


def location_kind(location: str) -> str:
    """``"local"`` (a folder; also ``file://``), ``"zip"`` (a local ``*.zip`` file, read-only; also ``zip::PATH`` and
    ``zip::file://PATH``, whatever its name),
    ``"http"`` (``http(s)://``, read-only) or ``"url"`` (any other fsspec URL: ``s3://``, ``gs://``, ``memory://``...)."""
    if _local_zip(location) is not None:  # zip::PATH, zip::file://PATH: the local zip PATH
        return "zip"
    scheme = location.split("://", 1)[0].lower() if "://" in location else ""
    if scheme in ("http", "https"):
        return "http"
    if scheme and scheme != "file":
        return "url"
    return "zip" if location.lower().endswith(".zip") else "local"


def refuse_empty_segments(location: str) -> None:
    """Refuse a URL that lost a slash after its scheme (``_refuse_collapsed_url``), and an object-store URL with an
    empty path segment (``s3://bucket//t.zarr``, ``s3://bucket/a//t.zarr``; a trailing ``/`` is fine). Its keys are not
    what every call takes them to be: s3fs reads and writes ``/t.zarr/...`` for ``s3://bucket//t.zarr`` but lists (and
    so deletes, for zarr's ``mode="w"``) ``t.zarr/...``: an extract there wiped the complete store
    ``s3://bucket/t.zarr``, no ``--overwrite`` given, and wrote another."""
    _refuse_collapsed_url(location)
    _refuse_unchained_zip(location)
    _refuse_cached_folder(location)
    if location_kind(location) != "url" or "::" in location:
        return
    scheme, _, rest = location.partition("://")
    path = rest.split("?", 1)[0].rstrip("/")
    if "//" in path:
        fixed = f"{scheme}://{'/'.join(part for part in path.split('/') if part)}"
        raise StoreError(f"{location!r} has an empty path segment ('//'), which object stores do not read, write and list "
                         f"alike; pass {fixed!r}")


# schemes read as a URL's even where fsspec is not installed (the error then names the missing backend)
URL_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "http", "https", "file", "zip", "memory", "hf"})


def _refuse_scheme_case(location: str) -> None:
    """Refuse a URL whose scheme is not in lower case (``HTTP://host/t.zarr``, ``S3://…``, ``zip::HTTPS://…``), naming
    the URL to pass: fsspec knows schemes in lower case alone (it said "cannot reach 'HTTP://…': Protocol not known:
    HTTP; check the URL, --storage-option values and credentials"). A local path (``FILE:///x``, ``ZIP::PATH``) is
    read as its lower-case spelling is."""
    if location_kind(location) not in ("http", "url"):
        return
    links = location.split("::")
    schemes = [link.partition("://")[0] if "://" in link else link for link in links[:-1]] + [links[-1].partition("://")[0]]
    fixed = "::".join(link.replace(scheme, scheme.lower(), 1) if scheme.lower() in URL_SCHEMES else link
                      for link, scheme in zip(links, schemes))
    if fixed != location:
        raise StoreError(f"{location!r}: a URL's scheme is written in lower case for fsspec, which knows no "
                         f"{next(s for s in schemes if s != s.lower() and s.lower() in URL_SCHEMES)!r}; pass {fixed!r}")


def _refuse_unchained_zip(location: str) -> None:
    """Refuse ``zip://PATH`` (a URL's spelling of kdcache's ``zip::PATH``): fsspec's ``zip://`` names a member of a zip
    chained after it (``zip://MEMBER::FILE``), and with no chain it opened the working folder as the zip: ``info`` said
    "cannot reach 'zip://t.zarr.zip': Is a directory: '…'", and ``extract --out`` ended in that IsADirectoryError's
    traceback."""
    if "::" in location or not location.lower().startswith("zip://"):
        return
    raise StoreError(f"{location!r}: fsspec's zip:// names a member of a zip chained after '::' (zip://MEMBER::FILE), and none "
                     f"is; a zip store is read as {'zip::' + location[len('zip://'):]!r}, or by its path alone where it ends "
                     "in .zip")


CACHING_LAYERS = ("simplecache", "filecache", "blockcache", "cached")  # fsspec's, chained before a URL: simplecache::https://…


def _refuse_cached_folder(location: str) -> None:
    """Refuse a caching layer over a store folder (``simplecache::https://host/t.zarr``): it runs its requests outside
    zarr's event loop, and every read failed ("Timeout context manager should be used inside a task", named as a server
    not reached; over s3, a traceback listing it). Over a zip (``zip::simplecache::…``) it fetches the file whole, and works;
    written before ``zip::`` or over a zip's URL without it (``simplecache::https://host/t.zarr.zip``), that form is named."""
    layer, _, rest = location.partition("::")
    if not rest or layer.lower() not in CACHING_LAYERS:
        return
    if rest.rstrip("/").lower().endswith(".zip"):  # a zip's URL: the layers in the wrong order, or zip:: left out
        raise StoreError(f"{location!r}: fsspec's caching layer {layer}:: goes after zip::, not before it (a zip behind a URL is "
                         f"read through zip::); pass {'zip::' + layer + '::' + rest.removeprefix('zip::')!r}")
    raise StoreError(f"{location!r}: fsspec's caching layer {layer}:: cannot serve a store folder (its requests run outside "
                     f"zarr's event loop); pass the folder's URL without it, {rest!r}, or pack the store and read the zip "
                     f"through it, {layer}:: after zip:: ('zip::{layer}::https://…/STORE.zarr.zip': the file cached whole)")


def _refuse_collapsed_url(location: str) -> None:
    """Refuse ``s3:/bucket/t.zarr``, a URL whose ``//`` lost a slash (``pathlib.Path`` and ``os.path.normpath`` merge
    them): it is a local path to kdcache, and ``extract`` wrote a folder ``s3:`` in the working directory. A local folder
    of that name that exists is taken as meant. Each link of a chain (``zip::s3:/…``) is looked at. Then a URL's scheme
    that is not in lower case (``_refuse_scheme_case``)."""
    for link in location.split("::"):
        scheme, sep, rest = link.partition(":/")
        if not sep or rest.startswith("/") or scheme.lower() not in URL_SCHEMES or os.path.exists(f"{scheme}:"):
            continue
        lost = {"file": f"{scheme}:///{rest}", "zip": f"{scheme}::/{rest}"}  # zip:/x.zip: kdcache's zip::PATH (zip:// needs a chain)
        fixed = location.replace(link, lost.get(scheme.lower(), f"{scheme.lower()}://{rest}"), 1)
        raise StoreError(f"{location!r} is a local path under a folder {scheme + ':'!r}, not a URL: a URL has two slashes after "
                         f"its scheme (pathlib.Path and os.path.normpath merge them into one); pass {fixed!r}")
    _refuse_scheme_case(location)


def zarr_store(location: str, storage_options: dict[str, Any] | None = None, *, read_only: bool = True,
               command: str = "extract") -> Any:
    """The zarr Store object for a location string (see ``location_kind``) and fsspec storage options. ``command``:
    the kdcache command writing it (``extract``, ``import``), named in the error for a read-only zip."""
    options_arg(storage_options)
    refuse_empty_segments(location)
    kind = location_kind(location)
    if kind == "zip":
        return _zip_store(location, read_only, command)
    if kind == "local":
        if storage_options:
            raise StoreError(f"storage options {sorted(storage_options)} apply to URL locations (s3://..., http://...), not the local path {location!r}")
        return _LocalStore(_folder(local_path(location), read_only), read_only=read_only)
    if "::" in location and not read_only:  # zip::s3://..., zip::https://...: a zip is write-once
        raise _write_once(location, command)
    if kind == "url" and not read_only:
        refuse_wildcards(location)
    if kind == "http" and not read_only:
        raise StoreError(f"{location!r}: http(s) locations are read-only; write to a folder or an object store (s3://...)")
    try:
        return _url_store(location, storage_options, read_only)
    except StoreError:  # a ValueError: not the ValueError of a zip:: chain below
        raise
    except ImportError as e:  # fsspec names the backend's package (gcsfs, adlfs, ...): kdcache[remote] installs only its own
        raise _missing_backend(location, e) from None
    except TypeError as e:  # an option the filesystem does not take
        raise StoreError(f"cannot open {location!r} with storage options {sorted(storage_options or {})}: {one_line(e)}; "
                         f"{_closest_option(location, str(e))}check the --storage-option values") from None
    except ValueError as e:  # a zip:: chain opens the file here: a server without Range support, a file that is not a zip
        raise unreachable_error(location, e) from None


_WILDCARD = re.compile(r"[*?[]")  # glob's, which fsspec's rm expands in every path it is given


def refuse_wildcards(location: str) -> None:
    """Refuse an object-store URL to write whose path holds ``*``, ``?`` or ``[``: fsspec's delete (zarr's clearing of
    a new store's prefix, an ``--overwrite``'s, a chunk's) reads them as wildcards, and an extract to
    ``s3://bucket/exp[12]`` deleted the objects of ``exp1/`` and ``exp2/`` (``exp*``: of every prefix so named), no
    ``--overwrite`` given."""
    path = location.partition("://")[2]
    if location_kind(location) == "url" and (m := _WILDCARD.search(path)):
        fixed = location.partition("://")[0] + "://" + re.sub(r"[*?[\]]", "-", path)
        raise StoreError(f"{location!r} holds {m.group()!r}, a wildcard to fsspec's deletes: writing a store there would delete "
                         f"the objects of every prefix it matches; choose a name without '*', '?' or '[' (e.g. {fixed!r})")


def _folder(path: str, read_only: bool) -> str:
    """The folder zarr opens for a local store: written, the one a link at ``path`` leads to (``runs/t.zarr ->
    /scratch/t.zarr``); the link is kept. zarr makes the folder it opens for writing, and a link to a folder not made yet
    failed there ("File exists"); one to a folder already there is emptied through the link (``_LocalStore.delete_dir``;
    zarr's own rmtree refused a link). Its writer lock is the same: it resolves links."""
    return os.path.realpath(path) if not read_only and os.path.islink(path.rstrip("/") or "/") else path


def _write_once(location: str, command: str) -> StoreError:
    return StoreError(f"{location!r}: a zip store is write-once and opened read-only; {command} to a folder or an object store, "
                      "then kdcache pack it")


def _zip_store(location: str, read_only: bool, command: str) -> Any:
    """The zarr Store of the local zip file ``location``, read-only, its members checked (``check_zip_members``)."""
    if not read_only:
        raise _write_once(location, command)
    try:
        with open_zip(location) as z:
            check_zip_members(location, z.infolist())
        return _ZipStore(local_path(location), mode="r")
    except (OSError, zipfile.BadZipFile) as e:
        raise StoreError(f"{location!r} is not a readable zip file ({e})") from None


def _url_store(location: str, storage_options: dict[str, Any] | None, read_only: bool) -> Any:
    """The fsspec zarr Store of the URL ``location`` (a ``zip::`` chain: its file's members checked); raises what
    fsspec raises, which ``zarr_store`` names."""
    options = _fsspec_options(location, storage_options)
    if not read_only and "::" not in location and is_s3(location) and "session" not in options:
        options["session"] = _session_without_expect(os.getpid(), options.get("profile"))
    # without a trailing "/": zarr lists a store by its path plus "/" (http://host/t.zarr/ listed full URLs as keys: pack
    # wrote a zip of members named http://..., "no zarr.json at its root")
    url = location.rstrip("/") if "::" not in location and location.rstrip("/").partition("://")[2] else location
    kind_of_store = _ZipChainStore if location.lower().startswith("zip::") else _RemoteStore
    if kind_of_store is _ZipChainStore:
        _check_zip_url_directory(location, options)
    opened = kind_of_store.from_url(url, storage_options=options, read_only=read_only)
    opened.location = location
    chained = getattr(getattr(opened.fs, "sync_fs", opened.fs), "zip", None)  # zip::https://…: the file's zipfile.ZipFile
    if isinstance(chained, zipfile.ZipFile):
        check_zip_members(location, chained.infolist())
    return opened


MAX_ZIP_DIRECTORY_BYTES = 256 * 2**20  # a zip whose central directory is larger is refused unread (~2.5 million members)


def open_zip(location: str) -> zipfile.ZipFile:
    """zipfile's ZipFile of the local zip file ``location``, once ``check_zip_directory`` let it through (a missing
    file: the OSError zipfile would raise)."""
    path = local_path(location)
    with open(path, "rb") as f:
        check_zip_directory(location, f)
    return zipfile.ZipFile(path)


def _check_zip_url_directory(location: str, options: dict[str, Any]) -> None:
    """``check_zip_directory`` of the zip behind the URL ``location`` (``zip::https://…``), through the filesystem of the
    layer that fetches the file, before the zip layer opens it; a file that cannot be opened is left to that layer to name."""
    from fsspec.core import url_to_fs

    inner = location.split("::", 1)[1]
    layer = options if "::" in inner else options.get(inner.split("://", 1)[0].lower()) or {}
    try:
        fs, path = url_to_fs(inner, **{k: v for k, v in layer.items() if k != "zip"})
        file = fs.open(path, "rb")
    except Exception:  # noqa: BLE001 - no such file, no Range support, an error status: the zip layer names them
        return
    with file:
        check_zip_directory(location, file)


def check_zip_directory(location: str, file: Any) -> None:
    """Refuse the zip ``file`` (open, binary: a local file, or fsspec's of a URL) of the store at ``location`` whose
    central directory, which zipfile reads whole into memory as it opens a zip, is larger than
    ``MAX_ZIP_DIRECTORY_BYTES``: its end record may say any size (a sparse file's, or gigabytes a server claims a file
    holds). Only the end record is read, by zipfile's own reader of it; one that cannot be read is zipfile's to name."""
    try:
        end = zipfile._EndRecData(file)  # type: ignore[attr-defined] - (…, size, offset, …) of the central directory
    except Exception:  # noqa: BLE001 - not seekable, an error status, not a zip: zipfile names them as it opens it
        return
    size = end[zipfile._ECD_SIZE] if end is not None else 0  # type: ignore[attr-defined]
    if size > MAX_ZIP_DIRECTORY_BYTES:
        raise DamagedStoreError(f"{location!r} is damaged: its zip's central directory holds {size:,} bytes (its end record says), more "
                         f"than kdcache reads of one ({MAX_ZIP_DIRECTORY_BYTES:,}: about 2.5 million members of a store), and is "
                         "not read; copy the zip again from its source (kdcache pack FOLDER OUT writes one)")


def _missing_backend(location: str, e: ImportError) -> StoreError:
    """The error for a URL ``location`` whose fsspec backend, or a package that backend needs, cannot be imported (``e``)."""
    module = getattr(e.__cause__, "name", None) or e.name or ""
    missing, backend = module.split(".")[0], _backend_package(location)
    if backend and missing and missing != backend and importlib.util.find_spec(backend) is not None:  # a dependency of it
        return StoreError(f"{location!r} needs the fsspec backend {backend}, which is installed but cannot import {module!r}; "
                          f"reinstall it with its dependencies: pip install --force-reinstall {backend}")
    fix = f"pip install {missing}" if missing and missing not in REMOTE_EXTRA else "pip install 'kdcache[remote]'"
    return StoreError(f"{location!r} needs an fsspec backend that is not installed ({e}); {fix}")


@functools.lru_cache(maxsize=None)
def _session_without_expect(pid: int, profile: str | None) -> Any:
    """An aiobotocore session for writing an S3 store, whose PUTs send no ``Expect: 100-continue``. aiohttp waits for
    the answer to that header with no timeout at all, so a shard's PUT to an endpoint that stopped answering held the
    writer for ever; without it botocore's ``read_timeout`` applies, and the write fails and can be resumed. (The
    header lets a server refuse a large body before it is sent; kdcache's objects are whole shards it means to store.)
    One per process (``pid``) and profile: the same session keeps fsspec's cached filesystem, and its connections, in use."""
    import aiobotocore.session
    import botocore.handlers

    session = aiobotocore.session.AioSession(profile=profile)
    session.unregister("before-call.s3", botocore.handlers.add_expect_header)
    return session


def _backend_package(location: str) -> str:
    """The top-level package of the fsspec filesystem registered for the location's protocol (``gcsfs`` for gs://), or ""."""
    from fsspec.registry import known_implementations

    spec = known_implementations.get(location.split("://", 1)[0].lower(), {})
    return str(spec.get("class", "")).split(".")[0]


ZIP_ENCRYPTED = 0x1  # a zip member's general purpose flag bit 0: its bytes are encrypted (zipfile's _MASK_ENCRYPTED)


def check_zip_members(location: str, members: list[zipfile.ZipInfo]) -> None:
    """Refuse a store's zip (local or behind a URL) with a compressed member (FORMAT.md §17: a deflated member of a few
    MB can hold GBs, all read into memory) or a member name that appears twice (readers disagree on which is the
    object: Python's zipfile reads the last, other tools the first, and ``verify`` checks only one), or an encrypted
    member (``zip -e``: zipfile's RuntimeError "password required" as it was read, a traceback)."""
    locked = next((m for m in members if m.flag_bits & ZIP_ENCRYPTED), None)
    if locked is not None:  # before the compressed check: an AES member's method (99) is its encryption's, not a compressor
        raise DamagedStoreError(f"{location!r}: zip member {short(locked.filename)} is encrypted (the zip was written with a "
                                "password, e.g. zip -e); a store's zip holds its members unencrypted, as kdcache pack writes them: "
                                "unzip it with its password into a folder and run kdcache pack FOLDER OUT")
    packed = next((m for m in members if m.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise DamagedStoreError(f"{location!r}: zip member {short(packed.filename)} is compressed "
                         f"({zipfile.compressor_names.get(packed.compress_type, packed.compress_type)}, "
                         f"{packed.file_size:,} bytes); a store's zip holds its members stored, as kdcache pack "
                         "writes them (the chunks are compressed already): unzip it into a folder and run kdcache pack FOLDER OUT")
    seen: set[str] = set()
    for m in members:
        if m.filename in seen:
            raise DamagedStoreError(f"{location!r}: zip member {short(m.filename)} appears more than once (which one is the object "
                             "is up to the reader); pack the store again from its folder (kdcache pack FOLDER OUT)")
        seen.add(m.filename)


def _local_zip(location: str) -> str | None:
    """The path of a local zip file named through fsspec's chain, ``zip::PATH`` or ``zip::file://PATH`` (read as
    the plain ``PATH`` is); None for any other location."""
    if not location.lower().startswith("zip::"):
        return None
    inner = location[len("zip::"):]
    if inner.lower().startswith("file://"):
        inner = inner[len("file://"):]
    return None if "::" in inner or "://" in inner or not inner else inner


def local_path(location: str) -> str:
    zipped = _local_zip(location)
    if zipped is not None:
        return zipped
    return location[len("file://"):] if location.lower().startswith("file://") else location


def filesystem(location: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """A synchronous fsspec filesystem and root path for a URL location (listing, emptiness)."""
    from fsspec.core import url_to_fs

    refuse_empty_segments(location)
    return url_to_fs(location, **_fsspec_options(location, storage_options))


def _fsspec_options(location: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` as fsspec takes them. For http(s), a ``client_kwargs.timeout`` given as seconds (the
    whole request) or as a mapping (``{"sock_read": 60}``: what the command line can say) becomes the
    ``aiohttp.ClientTimeout`` aiohttp takes; anything else there is aiohttp's to name. In a chain (``zip::https://…``)
    the http layer's options are those under its scheme (``https.client_kwargs.timeout``)."""
    options = dict(storage_options or {})
    _refuse_zip_layer_options(location, options)
    _refuse_string_flags(location, options)
    size = options.get("default_block_size")  # s3fs and gcsfs compare it with sizes at the first read: a TypeError that
    if size is not None and (isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1):  # read as "not a zarr v3 group"
        raise StoreError(f"storage option default_block_size must be a number of bytes, got {type(size).__name__} {short(size)}; "
                         "pass e.g. --storage-option default_block_size=5242880 (5 MiB)")
    for _, given, prefix in _option_layers(location, options):
        config = given.get("config_kwargs")
        for key in ("read_timeout", "connect_timeout"):  # botocore's, the settings an endpoint's error names to raise
            _refuse_not_seconds(f"{prefix}config_kwargs.{key}", config.get(key) if isinstance(config, Mapping) else None)
    if "::" not in location and not {"use_listings_cache", "listings_expiry_time"} & set(options) and \
            _lists_cached(location.split("://", 1)[0].lower() if "://" in location else "file"):
        options["use_listings_cache"] = False  # the user's own setting wins; see _lists_cached
    http = http_url(location)
    if http is None:
        return _with_s3_pool(location, options)
    if "::" not in location:
        return _with_client_timeout(options, "")
    scheme = http.split("://", 1)[0].lower()
    if isinstance(options.get(scheme), dict):
        options[scheme] = _with_client_timeout(options[scheme], f"{scheme}.")
    return options


# s3fs's connections to an endpoint (botocore's max_pool_connections, 10 by default) where the user sets none: the pool, not
# zarr's async.concurrency, held a store's done markers and digest rows to 10 GETs at once (store.PROGRESS_READS_AT_ONCE)
S3_POOL = 64


def _with_s3_pool(location: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of an S3 location with ``config_kwargs.max_pool_connections = S3_POOL`` where the user set none."""
    config = options.get("config_kwargs")
    if "::" in location or not is_s3(location) or not (config is None or isinstance(config, Mapping)) \
            or "max_pool_connections" in (config or {}):
        return options
    return {**options, "config_kwargs": {"max_pool_connections": S3_POOL, **(config or {})}}


@functools.lru_cache(maxsize=None)
def _lists_cached(protocol: str) -> bool:
    """Whether kdcache opens the filesystem of ``protocol`` with ``use_listings_cache=False``: fsspec keeps each listing an
    instance makes (s3fs's ``find``, zarr's ``list``) and answers later ``exists``, ``info`` and the size a whole read
    asks first from it, for the life of the process (instances are shared per options). A process that had listed a
    store (``pack``, a zarr listing of its own) never saw a done marker another process wrote since (a store being
    extracted stayed as done as it was), and took a prefix emptied since for a store ("not a zarr v3 group"). A
    filesystem that names it takes it, and those of ``PASS_ON``, whose constructors pass their options on to fsspec's;
    a ``**kwargs`` alone does not say where they go (fsspec's sftp gives them to paramiko's connect, webdav4's to an
    httpx client: a TypeError there), and such a filesystem keeps fsspec's default."""
    found = _constructor(protocol)
    if found is None:
        return False  # named when the store is opened
    cls, parameters = found
    return "use_listings_cache" in parameters or cls.__module__ in PASS_ON or cls.__module__.split(".")[0] in PASS_ON


# the modules of filesystems whose constructors pass use_listings_cache on to fsspec's (its listing cache's users)
PASS_ON = {"s3fs", "gcsfs", "adlfs", "huggingface_hub", "fsspec.implementations.http", "fsspec.implementations.local",
           "fsspec.implementations.memory", "fsspec.implementations.ftp"}


# options that fsspec's filesystems pass on as mappings (s3fs's to botocore, http's to aiohttp), each with an example
# setting: a string or number there failed at the first request as "'str' object has no attribute 'copy'"
MAPPINGS = {"client_kwargs": "client_kwargs.region_name=eu-west-1", "config_kwargs": "config_kwargs.read_timeout=60",
            "s3_additional_kwargs": "s3_additional_kwargs.ServerSideEncryption=AES256",
            "headers": "headers.Authorization=VALUE"}


def _refuse_string_flags(location: str, options: dict[str, Any]) -> None:
    """Refuse a string given to an option its filesystem takes as true or false (s3fs's ``anon``, ``use_ssl``,
    ``requester_pays``...; fsspec's ``use_listings_cache``): any non-empty string is true to it, so ``anon=False``
    (Python's spelling: the command line reads true and false as JSON, and keeps ``False`` a string) or ``anon=no`` made
    every request anonymous. So is anything but a mapping given to one of ``MAPPINGS``. A layer of a chain
    (``zip::s3://…``) is checked in the options under its scheme."""
    for url, given, prefix in _option_layers(location, options):
        flags = _flag_options(url.split("://", 1)[0].lower() if "://" in url else "file")
        for key, value in given.items():
            if key in MAPPINGS and value is not None and not isinstance(value, Mapping):
                raise StoreError(f"storage option {prefix}{key} is a mapping of settings, got {type(value).__name__} {short(value)}; "
                                 f"pass each setting as --storage-option {prefix}{key}.NAME=VALUE (e.g. {prefix}{MAPPINGS[key]}), "
                                 f"or {_from_python(prefix, key, '{...}')} from Python")
            if key in flags and isinstance(value, str):
                raise StoreError(f"storage option {prefix}{key} is true or false, got the string {short(value)}, which the "
                                 f"filesystem would take as true (any non-empty string is); pass --storage-option {prefix}{key}=false "
                                 f"or {prefix}{key}=true (JSON's spelling: Python's False stays a string), or {_from_python(prefix, key, 'False')} from Python")


def _option_layers(location: str, options: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """``(url, its options, the prefix that names them)`` for each layer of ``location`` given options: the URL's own
    (prefix ``""``), or in a chain (``zip::s3://…``) each layer's under its scheme (``"s3."``)."""
    parts = location.split("::")
    layers = [(parts[0], options, "")] if len(parts) == 1 else \
        [(part, options.get(scheme), f"{scheme}.") for part in parts if (scheme := part.split("://", 1)[0].lower()) in options]
    return [(url, given, prefix) for url, given, prefix in layers if isinstance(given, dict)]


def _from_python(prefix: str, key: str, value: str) -> str:
    """How storage_options from Python spell option ``key`` of the chain layer ``prefix`` (``"s3."``; ``""``: not a chain)."""
    inner = f"{{{key!r}: {value}}}"
    return f"{{{prefix.rstrip('.')!r}: {inner}}}" if prefix else inner


@functools.lru_cache(maxsize=None)
def _flag_options(protocol: str) -> frozenset[str]:
    """The options the fsspec filesystem of ``protocol`` takes as true or false: its ``__init__``'s parameters whose
    default is a bool, and fsspec's own caching flags; none where it is not installed."""
    found = _constructor(protocol)
    if found is None:
        return frozenset()
    cls, parameters = found
    strings_too = _FLAGS_OR_STRINGS.get(cls.__name__, frozenset())
    return frozenset({name for name, p in parameters.items() if isinstance(p.default, bool) and name not in strings_too}
                     | {"use_listings_cache", "skip_instance_cache"})


@functools.lru_cache(maxsize=None)
def _constructor(protocol: str) -> tuple[type, Any] | None:
    """The fsspec filesystem class of ``protocol`` and its ``__init__``'s parameters; None where it is not installed."""
    import inspect

    from fsspec.registry import get_filesystem_class

    try:
        cls = get_filesystem_class(protocol)
        return cls, inspect.signature(cls.__init__).parameters
    except (ImportError, ValueError, TypeError):
        return None


# options defaulting to a bool that their filesystem documents as taking a string too: gcsfs's requester_pays (the
# project to bill), fsspec WebHDFS's session_verify (requests' verify: a CA bundle's path)
_FLAGS_OR_STRINGS = {"GCSFileSystem": frozenset({"requester_pays"}), "WebHDFS": frozenset({"session_verify"})}


def _refuse_zip_layer_options(location: str, options: dict[str, Any]) -> None:
    """Refuse options of a zip behind a URL (``zip::s3://…``, ``zip::https://…``) not under a layer's scheme: fsspec gives
    them to the zip layer, which drops them unused, so ``endpoint_url``, credentials or ``headers`` never reached the
    layer that fetches the file ("Unable to locate credentials", or a 401 whose message asked for the very headers given)."""
    if not location.lower().startswith("zip::") or _local_zip(location) is not None:
        return
    layers = {part.split("://", 1)[0].lower() for part in location.split("::")}
    stray = sorted(key for key in options if str(key).lower() not in layers)
    if stray:
        inner = location.split("::")[-1].split("://", 1)[0].lower()
        key, value = str(stray[0]), options[stray[0]]
        while isinstance(value, dict) and value:  # headers.Authorization, as the command line spells it
            key, value = f"{key}.{next(iter(value))}", next(iter(value.values()))
        raise StoreError(f"storage options {stray} of {location!r} would go to its zip layer, which does not use them; the "
                         f"{inner} layer that fetches the file takes its options under its scheme: --storage-option "
                         f"{inner}.{key}=VALUE (storage_options={{{inner!r}: {{...}}}} from Python)")


def _refuse_not_seconds(option: str, value: Any) -> None:
    """Refuse a timeout ``option`` set to anything but seconds (or None): ``60s`` failed at the first request as
    "cannot reach …: unsupported operand type(s) for +: 'float' and 'str'"."""
    if value is not None and (isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating)):
        raise StoreError(f"storage option {option} is seconds, got {type(value).__name__} {short(value)}; pass a number, e.g. "
                         f"--storage-option {option}=60")


def _with_client_timeout(options: dict[str, Any], named: str) -> dict[str, Any]:
    """``_fsspec_options`` for one http layer's ``options`` (``named``: the prefix of its keys, for the message)."""
    client = options.get("client_kwargs")
    if not isinstance(client, dict) or "timeout" not in client:
        return options
    import aiohttp

    timeout = client["timeout"]
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        timeout = aiohttp.ClientTimeout(total=timeout)
    elif isinstance(timeout, dict):
        for key, value in timeout.items():
            _refuse_not_seconds(f"{named}client_kwargs.timeout.{key}", value)
        try:
            timeout = aiohttp.ClientTimeout(**timeout)
        except TypeError:
            raise StoreError(f"storage option {named}client_kwargs.timeout = {short(timeout)} names settings aiohttp does not have; "
                             f"use total, connect, sock_connect or sock_read (seconds), e.g. --storage-option {named}client_kwargs.timeout.sock_read=60") from None
    elif timeout is not None and not isinstance(timeout, aiohttp.ClientTimeout):  # aiohttp's own ValueError was named as an endpoint not reached
        raise StoreError(f"storage option {named}client_kwargs.timeout must be seconds or settings, got {type(timeout).__name__} "
                         f"{short(timeout)}; pass e.g. --storage-option {named}client_kwargs.timeout=60 (the whole request) or "
                         f"{named}client_kwargs.timeout.sock_read=60")
    return {**options, "client_kwargs": {**client, "timeout": timeout}}


def exists(location: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a zarr group's ``zarr.json`` is at the location (any kind)."""
    found, _ = _first_look(location, storage_options)
    return found if found is not None else _root_store(location, storage_options) is not None


def open_existing(location: str, storage_options: dict[str, Any] | None = None, *,
                  read_only: bool = True) -> tuple[Any | None, bytes | None]:
    """``zarr_store(location, …)`` where ``exists(location)``, else None; with the root ``zarr.json``'s bytes where the
    look read them (None: zarr reads it). Read-only, the store ``exists`` opened to look for the root ``zarr.json`` is
    the one returned: a ``zip::`` chain's file (``zip::https://…``) is opened once, its central directory read and
    checked once, not once to look and again to read. At an http(s) or object-store location the look is a GET of the
    root ``zarr.json`` (the first look at an endpoint's too), whose bytes ``open_store`` parses: one request, where an
    existence check (an S3 HEAD, an http GET) and zarr's read were two."""
    found, raw = _first_look(location, storage_options)
    if found is None:
        opened, raw = _root_read(location, storage_options) if "::" not in location else (_root_store(location, storage_options), None)
        if opened is None or read_only:
            return opened, raw
    elif not found:
        return None, None
    return zarr_store(location, storage_options, read_only=read_only), raw


def _first_look(location: str, storage_options: dict[str, Any] | None) -> tuple[bool | None, bytes | None]:
    """``exists`` where it is decided without opening the location's zarr Store (a folder, a local zip, the first look
    at an endpoint), with the root ``zarr.json``'s bytes where the look read them (an endpoint's); None: ``_root_store``
    decides."""
    kind = location_kind(location)
    _refuse_collapsed_url(location)
    if kind == "local":
        return Path(local_path(location), "zarr.json").is_file(), None
    if kind == "zip":
        try:
            with open_zip(location) as z:
                return "zarr.json" in z.namelist(), None
        except (OSError, zipfile.BadZipFile):
            return False, None
    http = http_url(location)  # the location, or a chain's last link (zip::https://…)
    s3 = "::" not in location and is_s3(location)
    endpoint = endpoint_of(http or location, storage_options)
    if (http or s3) and endpoint not in REACHED:  # the first look gives up soon
        raw = _s3_root(location, storage_options) if s3 else _http_exists(location, storage_options)
        REACHED.add(endpoint)  # later looks (a DataLoader worker's, the next open) ride out a slow moment with the usual retries
        if s3 or http == location:  # a chain's zip layer says whether the store is in the file
            return (True, raw) if isinstance(raw, bytes) else (raw, None)
    return None, None


def _root_store(location: str, storage_options: dict[str, Any] | None) -> Any | None:
    """The read-only zarr Store of the URL ``location`` where a zarr group's ``zarr.json`` is at its root, else None."""
    from zarr.core.sync import sync

    try:
        opened = zarr_store(location, storage_options)
        return opened if sync(opened.exists("zarr.json")) else None
    except FileNotFoundError:
        return None
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable endpoint, refused credentials... (botocore's are not OSErrors)
        raise unreachable_error(location, e) from None


def _root_read(location: str, storage_options: dict[str, Any] | None) -> tuple[Any | None, bytes | None]:
    """``_root_store`` of a URL that is no chain (``s3://``, ``https://``), with its root ``zarr.json``'s bytes: read
    (a GET bounded by ``MAX_METADATA_BYTES``, as zarr's read of it is) instead of looked for; no object, none. A read
    that fails (an error status, a dropped connection) is decided as before: ``_root_store``'s look, then zarr's read."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    try:
        opened = zarr_store(location, storage_options)
        buf = sync(opened.get_at_most("zarr.json", default_buffer_prototype(), None, MAX_METADATA_BYTES))
    except StoreError:
        raise
    except Exception:  # noqa: BLE001 - what the look says of it (an unreachable endpoint: named there)
        return _root_store(location, storage_options), None
    return (None, None) if buf is None else (opened, buf.to_bytes())


REACHED: set[str] = set()  # endpoints (and buckets) that answered a first look in this process, or in the one that forked it


def endpoint_of(location: str, storage_options: dict[str, Any] | None) -> str:
    """What a first look reaches: the location's scheme and host (the bucket, for s3://) with the options."""
    scheme, _, rest = location.partition("://")
    return json.dumps([scheme.lower(), rest.split("/")[0], storage_options or {}], sort_keys=True, default=repr)


def _s3_root(location: str, storage_options: dict[str, Any] | None) -> bytes | bool:
    """The first look at an S3 location: its root ``zarr.json``'s bytes (False: none there), read in one GET bounded by
    ``MAX_METADATA_BYTES`` (one larger is a StoreError naming it, as zarr's read of it says) through
    ``probe_filesystem``, so an endpoint that never answers is named within ``PROBE_*`` seconds (not after s3fs's
    retries, minutes) by every command that opens one. A HEAD was the look, then zarr read the object again. True: the
    object is there but its body failed part way (a dropped connection): zarr's read, with s3fs's retries, reads it."""
    from fsspec.asyn import sync as run_on  # not this module's sync (a flush)

    zarr_store(location, storage_options)  # a missing backend, options s3fs does not take: named as when opening
    started, answered = time.monotonic(), []
    refuse = functools.partial(too_large, location, "zarr.json", bound=MAX_METADATA_BYTES)

    async def look(fs: Any, key: str, root: str) -> bytes:
        async with _response(fs, key, None, root) as (_, length, read):
            answered.append(True)
            return await read_body(length, read, MAX_METADATA_BYTES, refuse)

    try:
        fs, path = probe_filesystem(location, storage_options)
        bucket, _, prefix = path.strip("/").partition("/")
        return run_on(fs.loop, look, fs, "/".join(p for p in (bucket, prefix, "zarr.json") if p), path)
    except FileNotFoundError:
        return False
    except StoreError:  # a zarr.json larger than metadata can be
        raise
    except Exception as e:  # noqa: BLE001 - unreachable endpoint, refused credentials... (botocore's are not OSErrors)
        if answered:
            return True
        raise unreachable_error(location, e, probe_gave_up(e, time.monotonic() - started, storage_options)) from None


def _http_exists(location: str, storage_options: dict[str, Any] | None) -> bytes | bool:
    """``exists`` for an http(s) location, the first look at it: its ``zarr.json`` fetched, its bytes returned (for a
    chain such as ``zip::https://…``, the file's headers: True) through a filesystem of its own that waits at most ``PROBE_CONNECT_S`` to
    connect and ``PROBE_READ_S`` for each answer (the user's own ``client_kwargs.timeout`` wins), so an endpoint that
    never answers is named in seconds, not after aiohttp's 300 s. Answers other than the store's are False:
    ``store._no_store`` says what they were (a chain's are the zip layer's to judge)."""
    import aiohttp
    import fsspec

    url, named = http_url(location) or location, ""
    options = _fsspec_options(location, storage_options)
    if url != location:
        named = f"{url.split('://', 1)[0].lower()}."
        options = dict(options.get(named[:-1]) or {})  # the http layer's own
    else:
        zarr_store(location, storage_options)  # a missing backend (aiohttp), options it does not take: named as when opening
    client = dict(options.get("client_kwargs") or {})
    client.setdefault("timeout", aiohttp.ClientTimeout(sock_connect=PROBE_CONNECT_S, sock_read=PROBE_READ_S))
    started = time.monotonic()
    try:
        fs = fsspec.filesystem(url.split("://", 1)[0].lower(), **{**options, "client_kwargs": client, "skip_instance_cache": True})
        if url != location:
            _file_info(fs, url)
            return True
        return read_http(fs, location.rstrip("/") + "/zarr.json", location)
    except StoreError:  # a zarr.json larger than metadata can be
        raise
    except Exception as failed:  # noqa: BLE001 - a 404, a refused connection, an HTTP error: store._no_store names them
        # aiohttp's connect and read timeouts are TimeoutErrors; fsspec wraps them in its own, or a FileNotFoundError (info)
        e = next((c for c in (failed.__cause__, failed) if isinstance(c, TimeoutError)), None)
        bad = next((c for c in (failed, failed.__cause__) if isinstance(c, TypeError)), None)  # fsspec's info wraps it
        if bad is not None:  # an option aiohttp does not take: raised at the first request
            raise unreachable_error(location, bad) from None
        if e is None:
            return False
        seconds = time.monotonic() - started
        setting = {"ConnectionTimeoutError": "sock_connect", "SocketTimeoutError": "sock_read"}.get(type(e).__name__, "total")
        wait = getattr(client["timeout"], setting, None)
        raise unreachable_error(location, e, f"gave up after {seconds:.0f} s" + (f" (1 try of up to {wait:g} s)" if wait else "") +
                                "; for an endpoint that is slow rather than down raise --storage-option "
                                f"{named}client_kwargs.timeout.{setting}=SECONDS; ") from None


def read_http(fs: Any, url: str, location: str, *, whole: bool = True) -> bytes:
    """The bytes of the ``zarr.json`` at ``url`` (fsspec's http filesystem ``fs``) of the store at ``location``, read
    by ``read_bounded``: one larger than ``MAX_METADATA_BYTES`` is a StoreError naming it. Not ``whole``: the first
    byte of any file (a zip's), read as far as that byte where the server ignores the Range."""
    from fsspec.asyn import sync as run_on  # not this module's sync (a flush)
    from zarr.abc.store import RangeByteRequest

    refuse = functools.partial(too_large, location, url.rpartition("/")[2], bound=MAX_METADATA_BYTES)
    if not whole:
        return run_on(fs.loop, read_bounded, fs, url, RangeByteRequest(0, 1), sys.maxsize, refuse, root=url)
    return run_on(fs.loop, read_bounded, fs, url, None, MAX_METADATA_BYTES, refuse, root=location)


def _file_info(fs: Any, url: str) -> dict[str, Any]:
    """``fs.info(url)`` of an http filesystem in one request where the server answers HEAD, or does not answer at all:
    fsspec's asks again with a GET after any failed HEAD, so a server that never answers held the probe twice its
    wait. A HEAD the server refused (405, an error status) still gets fsspec's GET."""
    from fsspec.asyn import sync as run_on  # not this module's sync (a flush)
    from fsspec.implementations.http import _file_info as head

    try:
        return run_on(fs.loop, head, fs.encode_url(url), session=run_on(fs.loop, fs.set_session), size_policy="head", **fs.kwargs)
    except TimeoutError:
        raise
    except Exception:  # noqa: BLE001 - a refused HEAD: fsspec's own HEAD, then GET, say what the server answers
        return fs.info(url)


def unreachable_error(location: str, e: BaseException, gave_up: str = "") -> StoreError:
    """``gave_up``: how long was tried and what to raise for a slow endpoint, said after the cause."""
    if isinstance(e, TypeError) and "keyword argument" in str(e):  # s3fs makes its client at the first request, not in zarr_store
        return StoreError(f"cannot open {location!r}: a storage option the filesystem does not take ({one_line(e)}); "
                          f"{_closest_option(location, str(e))}check the --storage-option values against the filesystem's own "
                          "arguments (s3fs: S3FileSystem's, e.g. default_block_size)")
    cause = one_line(e).split(" Open with block_size=0")[0].rstrip(".")  # less fsspec's advice for streaming: a zip cannot stream
    if "range requests" in cause.lower():
        fix = "serve the zip from a server that honours HTTP Range requests, or download it and pass the local file"
    else:
        fix = "check the URL, --storage-option values and credentials"
    return StoreError(f"cannot reach {location!r}: {cause}; {gave_up}{fix}")


def _closest_option(location: str, said: str) -> str:
    """``did you mean endpoint_url? `` where the keyword argument a filesystem refused (``said``: its TypeError) is
    close to one its constructor takes (``endpoint-url``, ``ENDPOINT_URL``, ``endpont_url``); else ``""``. In a chain
    (``zip::s3://…``), the layer that fetches the file's, named under its scheme (``s3.endpoint_url``)."""
    refused = re.search(r"unexpected keyword argument '([^']+)'", said)
    scheme = location.split("::")[-1].split("://", 1)[0].lower()
    found = _constructor(scheme)
    if refused is None or found is None:
        return ""
    names = [name for name, p in found[1].items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD]
    names += ["headers"] if http_url(location) else []  # aiohttp's, passed on to each request
    wanted = refused[1].lower().replace("-", "_")
    close = difflib.get_close_matches(wanted, names, n=1) or \
        [f"config_kwargs.{n}" for n in difflib.get_close_matches(wanted, _botocore_settings(), n=1)]
    return f"did you mean {scheme + '.' if '::' in location else ''}{close[0]}? " if close else ""


def _botocore_settings() -> list[str]:
    """The settings botocore's ``Config`` takes (s3fs's ``config_kwargs``, which it refuses as the filesystem's own keyword
    arguments would be refused: ``Got unexpected keyword argument``); none where botocore is not installed."""
    try:
        from botocore.config import Config
    except ImportError:
        return []
    return sorted(Config.OPTION_DEFAULTS)


def http_url(location: str) -> str | None:
    """The http(s) URL a location is read through (itself, or the last link of a chain such as ``zip::https://…``)."""
    url = location.split("::")[-1]
    return url if url.split("://", 1)[0].lower() in ("http", "https") and "://" in url else None


def http_problem(url: str, storage_options: dict[str, Any] | None, *, whole: bool) -> str | None:
    """Why ``url`` cannot be read: ``"HTTP 404"`` (the server answered), the connection error (refused, DNS, TLS...),
    or None when it can. fsspec's ``exists`` says False for all of them alike. ``whole``: GET it all (a small
    zarr.json), else its first byte."""
    import fsspec

    try:
        fs = fsspec.filesystem(url.split("://", 1)[0].lower(), **_fsspec_options(url, storage_options))
        read_http(fs, url, url.rpartition("/")[0], whole=whole)
        return None
    except StoreError:
        raise
    except FileNotFoundError:
        return "HTTP 404"
    except Exception as e:  # noqa: BLE001 - aiohttp's connection and response errors, named below
        status = getattr(e, "status", None)
        if isinstance(status, int):  # one line, cut: aiohttp's message for a response it cannot parse quotes the body
            return one_line(Exception(f"HTTP {status} {getattr(e, 'message', '')}"), 200)
        return f"{type(e).__name__}: {one_line(e)}"


# The first look at an S3 store (``locking.refuse_if_being_written``: is another writer's lock object there?) is made through a
# filesystem of its own that gives up soon: at most PROBE_ATTEMPTS tries, each waiting up to PROBE_CONNECT_S to connect
# and PROBE_READ_S for an answer. With s3fs's defaults (5 passes of botocore's 5 tries of up to 15 s) an endpoint that
# accepts connections and never answers (a proxy or firewall that swallows requests) was named after ~7 minutes (832 s
# through `kdcache extract`, which also opened the store first). The user's own config_kwargs (connect_timeout,
# read_timeout, retries.max_attempts) win; the data itself moves through fsspec's usual filesystem, with s3fs's
# defaults (FORMAT.md §13). Read where used, so tests may shorten them.
PROBE_CONNECT_S = 5.0
PROBE_READ_S = 10.0
PROBE_ATTEMPTS = 2


def is_s3(location: str) -> bool:
    """Whether ``location``'s fsspec backend is s3fs (or one like it), the one ``_probe_options`` are for."""
    from fsspec.core import split_protocol
    from fsspec.registry import get_filesystem_class

    try:
        return hasattr(get_filesystem_class(split_protocol(location)[0] or "file"), "call_s3")
    except (ImportError, ValueError):
        return False


def probe_filesystem(location: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """``filesystem`` for the first look at an S3 location: a new one (not fsspec's cached instance, which later moves
    the data) with the short timeouts of ``_probe_options`` and no s3fs retry loop of its own."""
    fs, path = filesystem(location, {**_probe_options(storage_options), "skip_instance_cache": True})
    fs.retries = 1  # s3fs's own loop around botocore's retries: one pass (not an option s3fs takes, an attribute)
    _PROBES.append(fs)
    return fs, path


# The probe filesystems, kept: s3fs closes a filesystem's client when it is garbage-collected, on the event loop running
# in the thread that collects it. Collected in zarr's loop thread (any time later), the close ran on the wrong loop, and
# with a connection kept alive (any real S3 endpoint; moto closes each) every command printed "Task exception was never
# retrieved ... attached to a different loop" and a traceback as it ended. Kept, they are closed at exit on their own loop.
_PROBES: list[Any] = []


def _probe_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with the short timeouts and few tries of the first look at an S3 store (``PROBE_*``)
    added to botocore's ``config_kwargs``, where the user did not set them."""
    options = dict(storage_options or {})
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", PROBE_CONNECT_S)
    config.setdefault("read_timeout", PROBE_READ_S)
    retries = config.get("retries") or {}
    if isinstance(retries, dict):  # anything else: botocore names it
        config["retries"] = {"max_attempts": PROBE_ATTEMPTS - 1, **retries}  # botocore's max_attempts: tries after the first
    options["config_kwargs"] = config
    return options


def probe_gave_up(e: BaseException, seconds: float, storage_options: dict[str, Any] | None) -> str:
    """What the error of a first look at an S3 store (``_s3_exists``, ``locking.refuse_if_being_written``) says after
    the cause: how long it tried, and for a timeout, the setting to raise for an endpoint that is slow rather than down."""
    said = f"gave up after {seconds:.0f} s; "
    kind = {"ConnectTimeoutError": "connect_timeout", "ReadTimeoutError": "read_timeout"}
    setting = next((kind[c.__name__] for c in type(e).__mro__ if c.__name__ in kind), None)
    if setting is None:
        return said
    config = _probe_options(storage_options)["config_kwargs"]
    retries = config["retries"] if isinstance(config.get("retries"), dict) else {}
    tries = retries.get("total_max_attempts") or 1 + retries.get("max_attempts", 0)  # botocore took them: numbers
    wait = f"{config[setting]:g}" if isinstance(config[setting], (int, float)) else config[setting]
    return (f"gave up after {seconds:.0f} s ({tries} {'try' if tries == 1 else 'tries'} of up to {wait} s each); for an "
            f"endpoint that is slow rather than down raise --storage-option config_kwargs.{setting}=SECONDS; ")
