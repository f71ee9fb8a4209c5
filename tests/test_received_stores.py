"""Stores received from elsewhere (SHARING.md, safety model): a folder, a ``.zarr.zip`` or an HDF5 export made by
someone else, or damaged on the way. Opening, checking, packing, importing or printing one must stay within
the store, bounded, and end in one line, whatever its files are: links out of the folder, special files,
compressed zip members, HDF5 datasets whose data lives in other files, control characters in its strings.

Commands that would hang or exhaust memory before the fix run in a subprocess with a time and memory limit.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.errors import StoreError
from kdcache.interop import export_hdf5, import_hdf5, pack
from kdcache.store import LOGITS, open_store

ROOT = Path(__file__).resolve().parent.parent
SHARD = f"{LOGITS}/c/1/0"  # shard 1 of the tiny store's logits (rows 16-31)
SECRET = b"not-for-the-store " * 40  # 720 bytes; logits are [50, 4] float16: 400 bytes


def limited(*args: object, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    """``python -m kdcache.cli ARGS`` with at most 2 GiB of address space and ``timeout`` seconds."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env=env, cwd=ROOT)


def copy(tiny_store: str, tmp_path: Path) -> Path:
    store = tmp_path / "received.zarr"
    shutil.copytree(tiny_store, store)
    return store


@pytest.mark.parametrize("kind", ["link-to-dev-zero", "fifo"])
@pytest.mark.parametrize("verb", ["verify", "stats"])
def test_a_shard_object_that_is_not_a_regular_file_is_named_not_read(tiny_store: str, tmp_path: Path, kind: str, verb: str) -> None:
    """A shard object that is a link to /dev/zero made verify read until memory ran out (MemoryError traceback under
    a limit, the OOM killer without); a FIFO made verify and stats wait forever."""
    store = copy(tiny_store, tmp_path)
    (store / SHARD).unlink()
    if kind == "fifo":
        os.mkfifo(store / SHARD)
    else:
        (store / SHARD).symlink_to("/dev/zero")
    proc = limited(verb, store)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert f"object '{SHARD}' is" in out and ("not a regular file" in out or "outside the store folder" in out), out


def test_a_link_out_of_the_store_is_never_read_or_packed(tiny_store: str, tmp_path: Path) -> None:
    """pack copied the file a link in the store points at (anywhere on the recipient's disk) into the zip it hands on;
    a shard object that links to a file outside was read as the store's rows."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    store = copy(tiny_store, tmp_path)
    (store / "notes").symlink_to(secret)
    out = tmp_path / "out.zarr.zip"
    r = CliRunner().invoke(main, ["pack", str(store), str(out)])  # not an object of the store: left out, never read
    assert r.exit_code == 0 and "note: left out 1 file of" in r.stderr and "'notes'" in r.stderr, r.output
    assert SECRET not in out.read_bytes() and "notes" not in zipfile.ZipFile(out).namelist()
    out.unlink()

    (store / "notes").unlink()
    other = tmp_path / "elsewhere.bin"
    other.write_bytes((store / SHARD).read_bytes())  # a valid shard, outside the store
    (store / SHARD).unlink()
    (store / SHARD).symlink_to(other)
    with pytest.raises(StoreError, match=f"object '{SHARD}' is a link to .*outside the store folder"):
        open_store(str(store)).read(LOGITS, 16, 32)
    r = CliRunner().invoke(main, ["pack", str(store), str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"object '{SHARD}' is a link to" in r.output and "outside the store folder" in r.output, r.output
    assert not out.exists() and not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_each_read_of_a_folders_zarr_store_refuses_a_link_out_of_it(tiny_store: str, tmp_path: Path) -> None:
    """The zarr Store of a folder checks an object before zarr reads it in each of the Store's reads: ``get`` (zarr 3.1
    reads through it alone, a whole object or a range) and ``get_partial_values`` (several objects or ranges at once,
    which the Store API offers zarr, another version of it, or anyone holding the Store)."""
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from kdcache.storage import zarr_store

    store = copy(tiny_store, tmp_path)
    other = tmp_path / "elsewhere.bin"
    other.write_bytes(SECRET)
    (store / SHARD).unlink()
    (store / SHARD).symlink_to(other)
    opened, prototype = zarr_store(str(store)), default_buffer_prototype()
    got = sync(opened.get_partial_values(prototype, [(f"{LOGITS}/c/0/0", None), (f"{LOGITS}/c/2/0", RangeByteRequest(0, 8))]))
    assert got[0].to_bytes() == (store / LOGITS / "c" / "0" / "0").read_bytes()
    assert got[1].to_bytes() == (store / LOGITS / "c" / "2" / "0").read_bytes()[:8]
    for read in (lambda: opened.get(SHARD, prototype), lambda: opened.get_partial_values(prototype, [(f"{LOGITS}/c/0/0", None), (SHARD, None)])):
        with pytest.raises(StoreError, match=f"object '{SHARD}' is a link to .*outside the store folder"):
            sync(read())


def test_a_link_inside_the_store_and_a_linked_store_folder_still_read(tiny_store: str, tmp_path: Path) -> None:
    store = copy(tiny_store, tmp_path)
    moved = store / SHARD.replace("/0", "/moved")
    (store / SHARD).rename(moved)
    (store / SHARD).symlink_to(moved)
    (tmp_path / "link.zarr").symlink_to(store)
    for location in (store, tmp_path / "link.zarr"):
        assert np.array_equal(open_store(str(location)).read(LOGITS, 0, 50), open_store(tiny_store).read(LOGITS, 0, 50))


def test_local_object_needs_the_folders_real_path_only_where_no_link_is_on_the_way(tmp_path: Path) -> None:
    """local_object skips resolving the folder's own path where the object's resolves to itself; a key with "." or
    "..", a link in the folder's path or under it still has it compared with the folder's real path."""
    from kdcache.storage import local_object

    store = tmp_path / "s.zarr"
    (store / "a").mkdir(parents=True)
    (store / "a" / "x").write_bytes(b"1")
    (tmp_path / "x").write_bytes(b"2")
    (tmp_path / "link.zarr").symlink_to(store)
    (store / "b").symlink_to(tmp_path)
    assert local_object(store, "a/x") == store / "a" / "x"
    assert local_object(tmp_path / "link.zarr", "a/x") == tmp_path / "link.zarr" / "a" / "x"
    assert local_object(store, "a/./x") == store / "a" / "x"
    for key in ("../x", "a/../../x", "b/x", "b/s.zarr/../x"):
        with pytest.raises(StoreError, match="outside the store folder"):
            local_object(store, key)
    with pytest.raises(StoreError, match="outside the store folder"):
        local_object(tmp_path / "link.zarr", "../x")


def test_read_local_object_reads_what_local_object_lets_through_and_refuses_the_rest(tmp_path: Path) -> None:
    """The whole-shard reads' path (a folder opened at a time, never through a link, the file checked on its own
    descriptor) answers as ``local_object`` followed by a read: bytes of a regular file inside the folder (through a
    link inside it, or a linked store folder, too), None for an absent object or a folder, and the same refusals for a
    link out (as the object or as a folder on the way), a FIFO (never waited on), a device and a file past its bound."""
    from kdcache.storage import read_local_object

    store = tmp_path / "s.zarr"
    (store / "a" / "c" / "0").mkdir(parents=True)
    (store / "a" / "c" / "0" / "0").write_bytes(b"shard")
    (store / "a" / "c" / "1").mkdir()
    (store / "a" / "c" / "1" / "0").symlink_to(store / "a" / "c" / "0" / "0")  # inside: read
    (tmp_path / "link.zarr").symlink_to(store)
    outside = tmp_path / "outside"
    (outside / "0").mkdir(parents=True)
    (outside / "0" / "0").write_bytes(b"secret")
    (store / "a" / "c" / "2").symlink_to(outside / "0")  # a folder on the way leads out
    (store / "a" / "c" / "3").mkdir()
    (store / "a" / "c" / "3" / "0").symlink_to(outside / "0" / "0")
    (store / "a" / "c" / "4").mkdir()
    os.mkfifo(store / "a" / "c" / "4" / "0")
    (store / "a" / "c" / "5").mkdir()
    (store / "a" / "c" / "5" / "0").symlink_to("/dev/zero")
    for root in (store, tmp_path / "link.zarr"):
        for key in ("a/c/0/0", "a/c/1/0", "a/./c/0/0"):
            assert read_local_object(root, key).tobytes() == b"shard", key
        assert read_local_object(root, "a/c/9/0") is None and read_local_object(root, "a/c/0") is None
        assert read_local_object(root, "a/c/0/0/x") is None  # a file where a folder should be: absent, as zarr reads it
        for key in ("a/c/2/0", "a/c/3/0", "a/c/5/0", "../outside/0/0"):
            with pytest.raises(StoreError, match="outside the store folder"):
                read_local_object(root, key)
        with pytest.raises(StoreError, match="is not a regular file .*a FIFO"):
            read_local_object(root, "a/c/4/0")
        with pytest.raises(StoreError, match="holds 5 bytes, more than it can"):
            read_local_object(root, "a/c/0/0", at_most=4)
        assert read_local_object(root, "a/c/0/0", at_most=5).tobytes() == b"shard"
    assert read_local_object(tmp_path / "nowhere", "a/c/0/0") is None


class _DeflatedZeros:
    """zipfile's compressor for a member written as 16 MiB blocks of zeros: the block deflated once (a full flush resets
    the compressor, so every block deflates to these bytes), then an empty final block. 4 GiB in a second, not ten."""

    zeros = bytes(2**24)
    _c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = _c.compress(zeros) + _c.flush(zlib.Z_FULL_FLUSH)

    def compress(self, data: bytes) -> bytes:
        assert data == self.zeros
        return self.block

    def flush(self) -> bytes:
        return zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def test_a_zip_with_compressed_members_is_refused_before_reading(tiny_store: str, tmp_path: Path, monkeypatch) -> None:
    """A 4 MB zip whose shard member deflates to 4 GiB made verify allocate it all (MemoryError traceback under a
    limit). FORMAT.md §17: members are stored; a compressed one is refused on opening, naming it."""
    packed = tmp_path / "t.zarr.zip"
    pack(tiny_store, packed)
    bomb = tmp_path / "bomb.zarr.zip"
    stored = zipfile._get_compressor
    monkeypatch.setattr(zipfile, "_get_compressor", lambda kind, *args: _DeflatedZeros() if kind == zipfile.ZIP_DEFLATED else stored(kind, *args))
    with zipfile.ZipFile(packed) as src, zipfile.ZipFile(bomb, "w") as out:
        for info in src.infolist():
            if info.filename != SHARD:
                out.writestr(info, src.read(info))
                continue
            member = zipfile.ZipInfo(SHARD)
            member.compress_type = zipfile.ZIP_DEFLATED
            with out.open(member, "w", force_zip64=True) as w:
                for _ in range(256):
                    w.write(_DeflatedZeros.zeros)  # 4 GiB of zeros
    monkeypatch.undo()
    with zipfile.ZipFile(bomb) as z, z.open(SHARD) as r:  # a valid member: the first MiB inflates to zeros
        assert r.read(2**20) == bytes(2**20)
    assert bomb.stat().st_size < 8 * 2**20
    for verb in ("info", "verify", "stats"):
        proc = limited(verb, bomb)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "Traceback" not in out, (verb, out)
        assert f"member '{SHARD}' is compressed (deflate, 4,294,967,296 bytes)" in out and "kdcache pack" in out, (verb, out)


def test_a_local_zip_named_through_fsspecs_chain_is_the_zip_itself(tiny_store: str, tmp_path: Path) -> None:
    """zip::PATH said 'no store ... (no such file)' of a zip that exists (and suggested kdcache pack STORE zip::PATH,
    which pack refuses); zip::file://PATH went through fsspec's zip filesystem, which read a deflated member."""
    packed = tmp_path / "t.zarr.zip"
    pack(tiny_store, packed)
    for location in (f"zip::{packed}", f"zip::file://{packed}"):
        store = open_store(location)
        assert np.array_equal(store.read(LOGITS, 0, 50), open_store(tiny_store).read(LOGITS, 0, 50))
        assert store.nbytes_stored() == packed.stat().st_size
    r = CliRunner().invoke(main, ["info", f"zip::{tmp_path / 'absent.zarr.zip'}"])
    assert r.exit_code == 1 and f"write it with kdcache pack STORE {tmp_path / 'absent.zarr.zip'}\n" in r.output, r.output
    deflated = tmp_path / "deflated.zarr.zip"
    with zipfile.ZipFile(packed) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))  # as `zip -r` writes it
    for location in (deflated, f"zip::{deflated}", f"zip::file://{deflated}"):
        with pytest.raises(StoreError, match=r"zip member '.*' is compressed \(deflate, "):
            open_store(str(location))


def test_a_zip_of_another_name_is_named_with_zip_colons(tiny_store: str, tmp_path: Path) -> None:
    """A packed store named without .zip ('any.bin') was "a file, not a store; pass ... a .zarr.zip": zip::any.bin reads
    it (SHARING.md), and the error says so."""
    packed = tmp_path / "any.bin"
    pack(tiny_store, tmp_path / "t.zarr.zip")
    (tmp_path / "t.zarr.zip").rename(packed)
    r = CliRunner().invoke(main, ["info", str(packed)])
    assert r.exit_code == 1 and f"'{packed}' is a zip file not named .zip; pass it as zip::{packed} (a zip of any name" in r.output, r.output
    assert CliRunner().invoke(main, ["info", f"zip::{packed}"]).exit_code == 0
    (tmp_path / "notes.txt").write_text("x")
    r = CliRunner().invoke(main, ["info", str(tmp_path / "notes.txt")])
    assert r.exit_code == 1 and "is a file, not a store; pass a store folder, a .zarr.zip written by kdcache pack, or zip::PATH" in r.output


def test_a_zip_behind_a_url_with_a_compressed_member_is_refused(tiny_store: str, tmp_path: Path) -> None:
    """The compressed-member check held for a local zip only: through a chain (zip::https://…, here memory://) a
    deflated member was read whole, however large it inflates."""
    import fsspec

    packed = tmp_path / "t.zarr.zip"
    pack(tiny_store, packed)
    with zipfile.ZipFile(packed) as src, fsspec.open("memory://deflated.zarr.zip", "wb") as f, zipfile.ZipFile(f, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED if info.filename == SHARD else zipfile.ZIP_STORED)
    with pytest.raises(StoreError, match=f"zip member '{SHARD}' is compressed \\(deflate, "):
        open_store("zip::memory://deflated.zarr.zip")


def test_a_zip_naming_a_member_twice_is_refused(tiny_store: str, tmp_path: Path) -> None:
    """Two members of one name: Python's zipfile (so kdcache, and verify) reads the last, other tools the first, so a
    store that verified could hand other rows to another reader. Refused on opening, naming the member."""
    packed = tmp_path / "t.zarr.zip"
    pack(tiny_store, packed)
    twice = tmp_path / "twice.zarr.zip"
    with zipfile.ZipFile(packed) as src, zipfile.ZipFile(twice, "w") as out, pytest.warns(UserWarning, match="Duplicate name"):
        out.writestr(SHARD, b"another object")
        for info in src.infolist():
            out.writestr(info, src.read(info))
    for verb in ("info", "verify"):
        r = CliRunner().invoke(main, [verb, str(twice)])
        assert r.exit_code == 1 and f"zip member '{SHARD}' appears more than once" in r.output, (verb, r.output)


GROUP = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'


def test_pack_never_copies_a_member_named_outside_the_folder_it_is_unzipped_into(tiny_store: str, tmp_path: Path) -> None:
    """A listing may name keys no store object has: a received zip any member name, an S3 key any string, an http index
    page any link (``../zarr.json`` fetched the server's file above the store). Taken as the zarr.json of a group under
    the root, pack copied them into the zip it hands on, where unzipping writes ``../zarr.json`` beside the folder,
    ``/abs/zarr.json`` at the root, and ``./zarr.json`` over the store's manifest. Now they are left out, named."""
    packed = tmp_path / "t.zarr.zip"
    pack(tiny_store, packed)
    odd = ["../zarr.json", "/abs/zarr.json", "./zarr.json", "targets//zarr.json"]
    with zipfile.ZipFile(packed, "a") as z:
        for name in odd:
            z.writestr(name, GROUP)
    again = tmp_path / "again.zarr.zip"
    r = CliRunner().invoke(main, ["pack", str(packed), str(again)])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(again) as z:
        names = z.namelist()
    assert not [n for n in names if n.startswith("/") or any(part in ("", ".", "..") for part in n.split("/"))], names
    assert f"note: left out {len(odd)} files" in r.output and all(repr(name) in r.output for name in odd[:3]), r.output
    assert open_store(f"zip::{again}").complete


def claiming_more(packed: Path, member: str, out: Path, size: int = 0x7FFFFFF0) -> Path:
    """``packed`` with ``member``'s sizes in the central directory set to ``size``, far past the file's end (a damaged or
    crafted zip)."""
    import struct

    data = bytearray(packed.read_bytes())
    with zipfile.ZipFile(packed) as z:
        pos = z.start_dir
    while True:
        n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        if data[pos + 46 : pos + 46 + n].decode() == member:
            data[pos + 20 : pos + 28] = struct.pack("<II", size, size)
            out.write_bytes(data)
            return out
        pos += 46 + n + m + k


def encrypted(packed: Path, out: Path, only: str | None = None) -> Path:
    """``packed`` with its members (``only`` that one) flagged encrypted (general purpose flag bit 0, in its local header
    and the central directory), as ``zip -e`` writes them: zipfile refuses to read such a member without a password
    (RuntimeError) before reading a byte of it, as it does one of a real encrypted zip, which Python cannot write."""
    import struct

    data = bytearray(packed.read_bytes())
    with zipfile.ZipFile(packed) as z:
        members, pos = z.infolist(), z.start_dir
    for member in members:  # the central directory's entries, in its order
        n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        assert data[pos : pos + 4] == b"PK\x01\x02" and data[pos + 46 : pos + 46 + n].decode() == member.filename
        if only in (None, member.filename):
            data[pos + 8] |= 0x1
            data[member.header_offset + 6] |= 0x1
        pos += 46 + n + m + k
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("only", [None, SHARD], ids=["every-member", "one-shard"])
def test_an_encrypted_zip_is_refused_in_one_line_by_every_reader(tiny_store, tmp_path, only):
    """A store zipped with a password (zip -e; or one member of it) was read until zipfile refused a member: "RuntimeError:
    File 'zarr.json' is encrypted, password required for extraction", a traceback, from info, verify, stats, train
    --cache, export and pack of it (a shard alone: once that shard was read). Refused on opening, naming the member."""
    import fsspec

    packed = tmp_path / "t.zarr.zip"
    pack(tiny_store, packed)
    locked = encrypted(packed, tmp_path / "locked.zarr.zip", only)
    with zipfile.ZipFile(locked) as z:
        named = only or z.namelist()[0]
        with pytest.raises(RuntimeError, match="password required"):  # what zipfile makes of the flag
            z.read(named)
    said = (f"'{{}}': zip member '{named}' is encrypted (the zip was written with a password, e.g. zip -e); a store's zip holds its "
            "members unencrypted, as kdcache pack writes them: unzip it with its password into a folder and run kdcache pack FOLDER OUT")
    with fsspec.open(f"memory://{tmp_path.name}/locked.zarr.zip", "wb") as f:
        f.write(locked.read_bytes())
    for args in (["info", locked], ["stats", locked], ["verify", locked], ["info", f"zip::{locked}"],
                 ["info", f"zip::memory://{tmp_path.name}/locked.zarr.zip"], ["export", locked, tmp_path / "x.h5"],
                 ["pack", locked, tmp_path / "re.zarr.zip"], ["train", ROOT / "tests/fixtures/tiny.toml", "--cache", locked, "--out", tmp_path / "run"]):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), (args, repr(r.exception))
        assert "Traceback" not in r.output, (args, r.output)
        line = said.format(args[3] if args[0] == "train" else args[1])
        if args[0] == "verify":  # the report's failed open check
            assert "FAIL  open" in r.output and f"- {line}\n" in r.output, r.output
        else:
            assert r.stderr == f"Error: {line}\n", (args, r.stderr)
    r = CliRunner().invoke(main, ["import", str(locked), str(tmp_path / "back.zarr")])  # not read as a store: one line too
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: '{locked}' is a zip file (a store kdcache pack wrote?)"), r.output
    assert sorted(os.listdir(tmp_path)) == ["locked.zarr.zip", "t.zarr.zip"]


@pytest.mark.parametrize("verb, member", [(verb, member) for verb in ("info", "verify", "pack") for member in ("zarr.json", "progress/done/c/1")]
                         + [("verify", SHARD), ("pack", SHARD), ("stats", SHARD)])
def test_a_zip_member_shorter_than_its_central_directory_says_is_damage_not_aborted(tiny_store, tmp_path, member, verb):
    """zipfile raises a bare EOFError for a member that ends before its size in the central directory, which click takes
    for an aborted prompt: info, verify, stats and pack said only "Aborted!" (exit 1). Now a corrupted zip member, named."""
    packed = tmp_path / "t.zarr.zip"
    pack(tiny_store, packed)
    lying = claiming_more(packed, member, tmp_path / "lying.zarr.zip")
    r = CliRunner().invoke(main, [verb, str(lying)] + ([str(tmp_path / "re.zarr.zip")] if verb == "pack" else []))
    assert r.exit_code == 1 and "Aborted" not in r.output and "Traceback" not in r.output, r.output
    said = (f"'{member}' is a corrupted zip member (cut short: the zip's central directory gives it more bytes than the file "
            "holds)" if verb == "verify" and member != "zarr.json" else f"member '{member}' is cut short")  # verify: its checksums or completeness line
    assert "CRC-32" not in r.output, r.output  # was "its bytes fail the zip's CRC-32" for a member cut short
    assert said in r.output, r.output
    assert not (tmp_path / "re.zarr.zip").exists()


@pytest.mark.parametrize("verb, member, size", [("info", "zarr.json", 2**26), ("info", "zarr.json", 0x7FFFFFF0),
                                               ("verify", "progress/done/c/1", 0x7FFFFFF0), ("stats", SHARD, 0x7FFFFFF0)])
def test_a_zip_behind_a_url_whose_member_is_cut_short_is_damage_not_aborted(tiny_store, tmp_path, verb, member, size):
    """The same through a chain (zip::https://…, here memory://): fsspec's zip filesystem raised zipfile's EOFError too.
    A member whose size in the zip's directory is more than its object can be is refused by that size, unread (a zip
    behind a URL may hold a 5 GB member: it was read whole into memory)."""
    import fsspec

    packed = tmp_path / "t.zarr.zip"
    pack(tiny_store, packed)
    with fsspec.open(f"memory://{tmp_path.name}/lying.zarr.zip", "wb") as f:
        f.write(claiming_more(packed, member, tmp_path / "lying.zarr.zip", size).read_bytes())
    r = CliRunner().invoke(main, [verb, f"zip::memory://{tmp_path.name}/lying.zarr.zip"])
    assert r.exit_code == 1 and "Aborted" not in r.output and "Traceback" not in r.output, r.output
    fits = size <= 2**27  # a zarr.json of 64 MiB may be: read, and found cut short
    said = f"member '{member}' is cut short" if fits else f"object '{member}' holds {size:,} bytes, more than it can"
    assert said in r.output, r.output


@pytest.fixture
def exported(tiny_store: str, tmp_path: Path) -> Path:
    out = tmp_path / "t.h5"
    export_hdf5(tiny_store, out, compression="none")
    return out


@pytest.mark.parametrize("kind", ["external-storage", "virtual-dataset", "external-link"])
def test_import_never_reads_data_from_other_files(exported: Path, tmp_path: Path, kind: str) -> None:
    """An HDF5 file whose targets/logits keeps its data in another file (external raw storage, a virtual dataset, an
    external link) was imported: any file of the recipient's (here a secret's bytes) became the store's targets,
    in a store made to be handed on, and it verified."""
    import h5py

    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as o:
        o.create_dataset("x", data=np.full((50, 4), 7, "float16"))
    with h5py.File(exported, "r+") as f:
        del f[LOGITS]
        if kind == "external-storage":
            f.create_dataset(LOGITS, shape=(50, 4), dtype="float16", external=[(str(secret), 0, 400)])
        elif kind == "virtual-dataset":
            layout = h5py.VirtualLayout(shape=(50, 4), dtype="float16")
            layout[:] = h5py.VirtualSource(str(other), "x", shape=(50, 4))
            f.create_virtual_dataset(LOGITS, layout)
        else:
            f[LOGITS] = h5py.ExternalLink(str(other), "/x")
    store = tmp_path / "imported.zarr"
    with pytest.raises(StoreError, match=f"dataset '{LOGITS}' keeps its data in another file"):
        import_hdf5(exported, str(store))
    assert not store.exists()
    r = CliRunner().invoke(main, ["import", str(exported), str(store)])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "re-export" in r.output and not store.exists(), r.output


def test_info_prints_no_terminal_control_characters(tiny_store: str, tmp_path: Path) -> None:
    """A manifest string with escape sequences (set the window title, clear the screen, colour a fake line) reached
    the terminal raw through kdcache info; they are shown escaped."""
    import json

    store = copy(tiny_store, tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    evil = "Net\x1b]0;owned\x07\x1b[2J\x1b[32m\nverified: every check holds\x1b[0m\r"
    meta["attributes"]["kdcache"]["teacher"]["class"] = evil
    meta["attributes"]["kdcache"]["dataset"]["split"] = "train\x1b[1A"
    (store / "zarr.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(main, ["info", str(store)])
    assert r.exit_code == 0, r.output
    assert not any(ord(c) < 32 and c != "\n" or 127 <= ord(c) < 160 for c in r.output), repr(r.output)
    assert len(r.output.splitlines()) == len(CliRunner().invoke(main, ["info", tiny_store]).output.splitlines())  # no line added
    assert "Net\\x1b]0;owned\\x07\\x1b[2J" in r.output, r.output
    r = CliRunner().invoke(main, ["info", str(store), "--json"])
    assert json.loads(r.output)["teacher"]["class"] == evil  # JSON escapes them itself, and keeps the value


FAKE = "\x1b]0;owned\x07\x1b[2J\nverified: every check holds\r"  # set the title, clear the screen, add a line of verify's


@pytest.mark.parametrize("damage", ["fill-value", "target-name"])
@pytest.mark.parametrize("verb", ["info", "verify", "stats", "pack"])
def test_errors_and_verify_print_no_terminal_control_characters_of_a_store(tiny_store: str, tmp_path: Path, damage: str, verb: str) -> None:
    """zarr's words for a damaged zarr.json quote the value (``Invalid type: VALUE``), and a damaged manifest's key holds the
    target's name: a store's escape sequences and line breaks reached the terminal raw in the one-line error, and in
    verify's report (a line ``verified: every check holds`` of the store's making under its FAIL line). Shown escaped."""
    import json

    store = copy(tiny_store, tmp_path)
    if damage == "fill-value":
        meta_file = store / LOGITS / "zarr.json"
        meta = json.loads(meta_file.read_text())
        meta["fill_value"] = FAKE
    else:
        meta_file = store / "zarr.json"
        meta = json.loads(meta_file.read_text())
        targets = meta["attributes"]["kdcache"]["targets"]
        targets[FAKE] = targets["logits"]
    meta_file.write_text(json.dumps(meta))
    args = [verb, str(store)] + ([str(tmp_path / "t.zarr.zip")] if verb == "pack" else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert not any(ord(c) < 32 and c != "\n" or 127 <= ord(c) < 160 for c in r.output), repr(r.output)
    assert "\\x1b]0;owned\\x07\\x1b[2J\\nverified" in r.output, r.output
    lines = r.output.splitlines()
    assert len(lines) == 1 if verb != "verify" else lines[-1] == "NOT verified: see the FAIL lines above", lines


def test_a_missing_object_of_an_array_sharded_otherwise_than_the_manifest_is_damage_not_zeros(tiny_store: str, tmp_path: Path) -> None:
    """A store without digests (kdcache < 0.1.1) whose manifest says shards of 32 rows where its arrays hold 16 (which
    ``read`` reads through zarr: an array rewritten by another zarr tool): shard 1's done marker was checked against
    the object ``c/1`` (rows 16-31), zarr read rows 32-49 from ``c/2`` and ``c/3``, and a missing ``c/3`` came back as
    zeros for rows 48-49, by ``read``, ``stats`` and training alike. The objects zarr reads the rows from are checked."""
    import json

    store = copy(tiny_store, tmp_path)
    shutil.rmtree(store / "progress/digest")
    root = json.loads((store / "zarr.json").read_text())
    manifest = root["attributes"]["kdcache"]
    del manifest["compression"]["shard_digests"]
    manifest["geometry"].update(rows_per_shard=32, num_shards=2)
    (store / "zarr.json").write_text(json.dumps(root))
    done = json.loads((store / "progress/done/zarr.json").read_text())
    done["shape"] = [2]
    (store / "progress/done/zarr.json").write_text(json.dumps(done))
    for shard in (2, 3):
        (store / f"progress/done/c/{shard}").unlink()
    rows = open_store(tiny_store).read(LOGITS, 0, 50)
    np.testing.assert_array_equal(open_store(str(store)).read(LOGITS, 0, 50), rows)  # whole, it reads as zarr reads it
    (store / f"{LOGITS}/c/3/0").unlink()
    with pytest.raises(StoreError, match=r"shard 1 of targets/logits \(rows 32-49\) has the object of its rows 'targets/logits/c/3/0' "
                                         "missing although the shard is marked done"):
        open_store(str(store)).read(LOGITS, 32, 50)
    np.testing.assert_array_equal(open_store(str(store)).read(LOGITS, 32, 48), rows[32:48])  # rows of the objects there
    r = CliRunner().invoke(main, ["stats", str(store)])
    assert r.exit_code == 1 and "'targets/logits/c/3/0' missing" in r.output and len(r.output.splitlines()) == 1, r.output


def test_resuming_a_store_never_writes_through_a_link_out_of_its_folder(tiny_store: str, tmp_path: Path) -> None:
    """An incomplete store received from elsewhere, finished with extract (or import), whose ``targets/logits/c`` is a
    link to a folder elsewhere (any of yours: the link names it): the resumed extract wrote the missing shard there
    (``3/0``, overwriting a file of that name), and removed files named like kdcache's temp files there (the done markers,
    read first, were refused already). Refused before anything is written there, naming the folder."""
    store = copy(tiny_store, tmp_path)
    (store / "progress/done/c/3").unlink()
    elsewhere = tmp_path / "elsewhere"
    shutil.move(store / LOGITS / "c", elsewhere)
    (store / LOGITS / "c").symlink_to(elsewhere)
    shutil.rmtree(elsewhere / "3")  # the shard not done lost its object: written again by the resumed extract
    (elsewhere / ".3.1.tmp").write_text("a file of yours")
    before = sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*"))
    r = CliRunner().invoke(main, ["extract", str(ROOT / "tests/fixtures/tiny.toml"), "--out", str(store)])
    assert r.exit_code == 1, r.output
    assert f"is unsafe to write: '{LOGITS}/c/3' leads to {str(elsewhere / '3')!r}, outside the store folder" in r.output, r.output
    assert len(r.output.splitlines()) == 1, r.output
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == before


def test_a_store_claiming_billions_of_shards_is_refused_before_they_are_counted(tiny_store, tmp_path):
    """A manifest (and array metadata, made to agree) claiming 2**34 samples in 16-row shards: reading its 2**30 done
    markers took every byte of memory (a MemoryError traceback under a 2 GiB limit). More shards than any store has
    is a damaged manifest, named before anything is read."""
    import json

    store = copy(tiny_store, tmp_path)
    n, shards = 2**34, 2**30
    for meta in store.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") == "array":
            doc["shape"][0] = shards if meta.parent.name == "done" else n
        elif meta.parent == store:
            k = doc["attributes"]["kdcache"]
            k["num_samples"], k["dataset"]["length"] = n, n
            k["geometry"]["rows_per_shard"], k["geometry"]["num_shards"] = 16, shards
        meta.write_text(json.dumps(doc))
    for command in ("info", "verify"):
        r = limited(command, store, timeout=120)
        output = r.stdout + r.stderr  # info: an Error line; verify: its FAIL line, then NOT verified
        assert r.returncode == 1 and "Traceback" not in output, output[-2000:]
        assert "damaged manifest: geometry.num_shards = 1073741824, expected at most 16777216" in output, output
    from kdcache.errors import PipelineError
    from kdcache.store import MAX_SHARDS, plan_geometry

    # A store kdcache would write itself never has that many: extract refuses a rows_per_shard that would make them.
    assert plan_geometry(16 * MAX_SHARDS, {LOGITS: 40}, rows_per_shard=16)["num_shards"] == MAX_SHARDS
    with pytest.raises(PipelineError, match=r"extract.rows_per_shard = 16 makes 16,777,217 shards .* raise extract.rows_per_shard"):
        plan_geometry(16 * MAX_SHARDS + 1, {LOGITS: 40}, rows_per_shard=16)
    assert plan_geometry(16384 * MAX_SHARDS, {LOGITS: 40})["num_shards"] <= MAX_SHARDS  # kdcache's own choice stays under


def zstd_bomb(size: int) -> bytes:
    """A valid zstd frame of ``size`` zero bytes that declares its size: RLE blocks of 128 KiB, 4 bytes each (1 GiB in 32 KB)."""
    blocks, left = [], size
    while left:
        n = min(1 << 17, left)
        left -= n
        blocks.append((int(left == 0) | 1 << 1 | n << 3).to_bytes(3, "little") + b"\0")  # last?, RLE, size; the byte
    return b"\x28\xb5\x2f\xfd\xe0" + size.to_bytes(8, "little") + b"".join(blocks)  # 8-byte size, single segment


def with_chunk(raw: bytes, slots: int, i: int, body: bytes) -> bytes:
    """A shard object (FORMAT.md §3.1) whose inner chunk ``i`` holds ``body``, every checksum made to agree: what a sender
    who wants the recipient's reader to decompress ``body`` writes."""
    from google_crc32c import value as crc32c

    tail = slots * 16 + 4
    index = np.frombuffer(raw[-tail:-4], "<u8").reshape(slots, 2).copy()
    chunks = [None if length == 2**64 - 1 else raw[offset : offset + length] for offset, length in index]
    chunks[i] = body + crc32c(body).to_bytes(4, "little")
    out = b""
    for j, chunk in enumerate(chunks):
        if chunk is not None:
            index[j] = (len(out), len(chunk))
            out += chunk
    return out + index.tobytes() + crc32c(index.tobytes()).to_bytes(4, "little")


def bombed(tiny_store: str, tmp_path: Path, size: int) -> Path:
    """A copy of the tiny store whose logits shard 1 has a first inner chunk whose zstd frame declares ``size`` bytes (a
    decoder that trusts it allocates them). The frame is cut to its first 32 blocks (4 MiB, 141 bytes): an object larger
    than its array's chunks can compress to is refused unread (``test_safety``), and 1 GiB of zeros takes 32 KB; in an
    array of larger chunks (1 MiB: up to 32 GiB declared) the whole frame fits."""
    import json

    store = copy(tiny_store, tmp_path)
    meta = json.loads((store / LOGITS / "zarr.json").read_text())
    slots = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // meta["codecs"][0]["configuration"]["chunk_shape"][0]
    (store / SHARD).write_bytes(with_chunk((store / SHARD).read_bytes(), slots, 0, zstd_bomb(size)[: 13 + 4 * 32]))
    return store


def test_a_compression_bomb_in_a_checksum_valid_chunk_is_refused_without_decompressing_it(tiny_store, tmp_path):
    """A received store's chunk (its crc32c made to agree) whose zstd frame declares 1 GiB: every read allocated the
    gigabyte (the direct reader and then zarr's, twice), and a few MB of such chunks took more than the machine's memory
    before the size mismatch was seen. Decoding is bounded by the chunk's size: named as damage, nothing allocated."""
    import tracemalloc

    import numcodecs

    assert len(numcodecs.Zstd().decode(zstd_bomb(3 << 17))) == 3 << 17  # the frame is valid zstd
    store = open_store(str(bombed(tiny_store, tmp_path, 2**30)))
    np.testing.assert_array_equal(store.read(LOGITS, 0, 16), open_store(tiny_store).read(LOGITS, 0, 16))  # other shards read
    tracemalloc.start()
    try:
        for start, stop in ((16, 32), (20, 24)):  # the direct reader's whole shard, zarr's rows
            with pytest.raises(StoreError, match=r"shard 1 of targets/logits \(rows 16-31\).* does not decode \(ValueError: 'its zstd "
                                                 r"frame declares 1,073,741,824 bytes where the inner chunk holds \d+"):
                store.read(LOGITS, start, stop)
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "zip"])
def test_verify_and_train_of_a_store_with_a_compression_bomb_end_in_one_line(tiny_store, tmp_path, packed):
    """8 GiB declared in a chunk's frame, under a 2 GiB memory limit: verify names the shard (a MemoryError or an OOM kill before),
    a zipped copy too (read through zarr, not the direct reader), and train stops on one line."""
    store = bombed(tiny_store, tmp_path, 2**33)
    if packed:
        with zipfile.ZipFile(tmp_path / "bomb.zarr.zip", "w") as z:  # as pack writes it (pack itself refuses damage)
            for f in sorted(store.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(store).as_posix())
        store = tmp_path / "bomb.zarr.zip"
    r = limited("verify", store, timeout=120)
    output = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in output and "NOT verified" in output, output[-2000:]
    assert "its zstd frame declares 8,589,934,592 bytes" in output, output
    r = limited("train", ROOT / "tests" / "fixtures" / "tiny.toml", "--cache", store, "--out", tmp_path / "run", timeout=180)
    output = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in output, output[-2000:]
    assert output.strip().splitlines()[-1].startswith("Error: ") and "8,589,934,592 bytes" in output, output[-2000:]


def test_arrays_opened_by_several_threads_at_once_all_decode_bounded(tiny_store):
    """``Store.array`` chose the bounded zstd through zarr's global config, set and restored around the open: threads opening
    arrays at once (remote streaming reads every column at once, extract writes shards on several threads) restored each
    other's settings, so an array could be opened with zarr's unbounded zstd while another thread's open ended, and the
    config was left changed for the whole process. Opens are serialised: every array is bounded, the config restored."""
    import threading

    import zarr

    from kdcache.store import BoundedZstdCodec

    default = "zarr.codecs.zstd.ZstdCodec"
    for _ in range(5):
        stores = [open_store(tiny_store) for _ in range(8)]
        barrier, codecs = threading.Barrier(len(stores)), []

        def open_all(store):
            barrier.wait()
            for path in store.paths():
                codecs.append(type(store.array(path).metadata.codecs[0].codecs[1]))

        with zarr.config.set({"codecs.zstd": default, "array.write_empty_chunks": False}):
            workers = [threading.Thread(target=open_all, args=(s,)) for s in stores]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            assert zarr.config.get("codecs.zstd") == default and zarr.config.get("array.write_empty_chunks") is False
        assert codecs and set(codecs) == {BoundedZstdCodec}


def test_consolidated_metadata_in_a_received_store_does_not_unbound_its_zstd_decoding(tiny_store, tmp_path):
    """A root zarr.json that also carries its arrays' metadata inline (zarr's ``consolidated_metadata``, which kdcache never
    writes) had zarr parse their codecs when the group opened, outside ``Store.array``'s bounded zstd: the bomb's 1 GiB was
    allocated again. The arrays' own zarr.json are read, as for any store, and the bomb is named without decompressing it."""
    import json
    import tracemalloc

    store = bombed(tiny_store, tmp_path, 2**30)
    root = json.loads((store / "zarr.json").read_text())
    inline = {meta.parent.relative_to(store).as_posix(): json.loads(meta.read_text()) for meta in sorted(store.rglob("zarr.json")) if meta.parent != store}
    root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": inline}
    (store / "zarr.json").write_text(json.dumps(root))
    opened = open_store(str(store))
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match=r"shard 1 of targets/logits \(rows 16-31\).*its zstd frame declares 1,073,741,824 bytes"):
            opened.read(LOGITS, 20, 24)
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("path", [LOGITS, "progress/done"])
def test_a_received_store_naming_another_compressor_is_refused_before_it_decompresses(tiny_store, tmp_path, path):
    """A received store's zarr.json may name any codec zarr knows: with ``gzip`` in place of zstd (or added to the done
    markers' codecs), 260 KB of a checksum-valid chunk decompressed to 256 MiB, unbounded like the zstd bomb before it. The
    format's codecs are sharding_indexed, bytes, zstd and crc32c (FORMAT.md §3.1); any other is damaged metadata, named."""
    import json
    import tracemalloc
    import zlib

    store = copy(tiny_store, tmp_path)
    meta = json.loads((store / path / "zarr.json").read_text())
    gzip = {"name": "gzip", "configuration": {"level": 1}}
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = deflate.compress(b"\0" * (256 << 20)) + deflate.flush()
    if path == LOGITS:
        meta["codecs"][0]["configuration"]["codecs"][1] = gzip
        slots = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // meta["codecs"][0]["configuration"]["chunk_shape"][0]
        (store / SHARD).write_bytes(with_chunk((store / SHARD).read_bytes(), slots, 0, bomb))
    else:
        meta["codecs"].append(gzip)
        (store / path / "c" / "1").write_bytes(bomb)
    (store / path / "zarr.json").write_text(json.dumps(meta))
    opened = open_store(str(store))
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match=rf"is damaged: '{path}/zarr.json' is not valid zarr metadata \(its codec 'gzip' is not one of "
                                             r"the format's: sharding_indexed, bytes, zstd, crc32c\); run kdcache verify"):
            opened.read(LOGITS, 20, 24)
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20
    finally:
        tracemalloc.stop()
    r = limited("verify", store, timeout=120)
    output = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in output and "NOT verified" in output, output[-2000:]


def test_a_chunk_grid_larger_than_memory_is_named_not_a_traceback(tiny_store, tmp_path):
    """A manifest and zarr.json made to agree on shards of 2**40 rows (one shard for 50 samples), with a checksum-valid
    chunk that declares their 8 TiB: the whole-shard reader's buffer for the chunk raised MemoryError out of Store.read, a
    traceback in train; then zarr named the shard after trying to allocate it. Such a shard is beyond the format's 4 GiB:
    the store is refused as it is opened, before any buffer is made."""
    from google_crc32c import value as crc32c
    from test_bad_input_store import geometry

    rows = 2**40
    store = copy(tiny_store, tmp_path)
    geometry(rows)(store)
    shutil.rmtree(store / "progress" / "digest" / "c")
    body = b"\x28\xb5\x2f\xfd\xe0" + (rows * 8).to_bytes(8, "little") + b"\x03\x00\x10\x00"  # 8 TiB declared (zstd_bomb's header)
    body += crc32c(body).to_bytes(4, "little")
    index = np.array([[0, len(body)]], "<u8").tobytes()
    (store / LOGITS / "c" / "0" / "0").write_bytes(body + index + crc32c(index).to_bytes(4, "little"))
    with pytest.raises(StoreError, match=r"damaged manifest: geometry.rows_per_shard = 1099511627776, expected at most 2064888 "):
        open_store(str(store)).read(LOGITS, 0, 50)


@pytest.mark.parametrize("verb", ["info", "train"])
def test_a_received_store_declaring_8_gib_shards_is_refused_in_one_line_before_reading(tiny_store, tmp_path, verb):
    """A manifest and the arrays' zarr.json agreeing on one shard of 2**22 rows (8 GiB of features.3, a whole-shard read's
    buffer): refused as opened, under a 2 GiB memory limit, in one line; and an array whose zarr.json alone declares 8 GiB
    shards (the manifest's geometry intact) is refused where it is first read, before zarr allocates a chunk of it."""
    from test_bad_input_store import HUGE, HUGE_LOGITS, HUGE_ROWS, array_shards, geometry

    store = copy(tiny_store, tmp_path)
    geometry(HUGE_ROWS)(store)
    args = [verb, store] if verb == "info" else ["train", ROOT / "tests" / "fixtures" / "tiny.toml", "--cache", store, "--out", tmp_path / "run"]
    r = limited(*args, timeout=180)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stdout + r.stderr[-2000:]
    assert all(part in r.stderr for part in HUGE), r.stderr
    assert not (tmp_path / "run").exists()
    shutil.rmtree(store)
    store = copy(tiny_store, tmp_path)
    array_shards(LOGITS, 2**30)(store)
    with pytest.raises(StoreError) as raised:
        open_store(str(store)).read(LOGITS, 0, 16)
    assert all(part in str(raised.value) for part in HUGE_LOGITS), raised.value


def test_the_json_of_info_stats_and_verify_has_the_documented_keys(tiny_store: str, tmp_path: Path) -> None:
    """SHARING.md names every key ``info``, ``stats`` and ``verify`` print with --json (they were not documented; nor were
    a top-k store's: info's K and bytes saved, stats' entropy_topk)."""
    import json

    from conftest import extract_tiny

    doc = (ROOT / "docs/SHARING.md").read_text()
    section = doc[doc.index("## What `--json` prints") : doc.index("## Safety model")]
    topk = extract_tiny(tmp_path / "topk.zarr", "targets.topk=2")
    for command, store in [(c, s) for c in ("info", "stats", "verify") for s in (tiny_store, topk)]:
        r = CliRunner().invoke(main, [command, store, "--json"])
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        keys = set(report) | ({k for t in report["targets"].values() for k in t} if command == "info" else set())
        keys |= {k for c in report.get("checks", []) for k in c}
        assert not [k for k in sorted(keys) if f"`{k}`" not in section], (command, sorted(keys))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts the process's descriptors in /proc/self/fd")
def test_local_objects_holds_one_chain_of_folders_open(tmp_path: Path) -> None:
    """``LocalObjects`` reading the shards of a buffer (each in a folder of its own: ``a/c/<shard>/0``) keeps open only
    the folders on the way to the last one read, not one per shard: a buffer of a thousand shards ran out of
    descriptors (EMFILE), and the read of the shard that met it said the store was damaged."""
    from kdcache.storage import LocalObjects

    for shard in range(200):
        (tmp_path / "a" / "c" / str(shard)).mkdir(parents=True)
        (tmp_path / "a" / "c" / str(shard) / "0").write_bytes(b"shard")
    def held() -> int:  # descriptors open on the store's folders: another test's pipes close on their own time
        paths = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sum(path.startswith(str(tmp_path)) for path in paths)

    with LocalObjects(tmp_path) as objects:
        for shard in range(200):
            assert objects.read(f"a/c/{shard}/0").tobytes() == b"shard"
        assert objects.read("a/c/7/0").tobytes() == b"shard" and objects.read("zarr.json") is None
        assert 0 < held() < 10
    assert held() == 0


def test_a_manifest_declaring_more_targets_than_a_reader_takes_is_refused_at_once(tiny_store, tmp_path):
    """A manifest may declare any number of targets: every command opens each one's array, so these 20,002 held
    verify for 3 minutes (and it named each array missing). More than MAX_TARGETS is a damaged manifest, named before any is opened;
    and no writer makes such a store (refused before anything is written)."""
    import json
    import time

    from kdcache.store import MAX_TARGETS, create_or_resume

    store = copy(tiny_store, tmp_path)
    root = json.loads((store / "zarr.json").read_text())
    manifest = root["attributes"]["kdcache"]
    shape = next(iter(manifest["targets"].values()))["shape"]
    for i in range(20_000):
        name = f"extra{i}"
        manifest["targets"][name] = {"name": name, "path": f"targets/layers/{name}", "shape": shape, "dtype": "float16",
                                     "source": name, "select": "auto"}
    (store / "zarr.json").write_text(json.dumps(root))
    n = len(manifest["targets"])
    for command in ("info", "verify"):
        started = time.monotonic()
        r = limited(command, store, timeout=120)
        output = r.stdout + r.stderr  # info: an Error line; verify: its FAIL line, then NOT verified
        assert r.returncode == 1 and "Traceback" not in output, output[-2000:]
        assert f"damaged manifest: targets declares {n:,} targets, expected at most {MAX_TARGETS:,}" in output, output[-2000:]
        assert time.monotonic() - started < 30  # verify took 3 minutes
    fresh = dict(manifest, targets=dict(list(manifest["targets"].items())[: MAX_TARGETS + 1]))
    for key in ("format", "format_version", "created", "completed"):
        fresh.pop(key, None)
    with pytest.raises(StoreError, match=rf"{MAX_TARGETS + 1:,} targets to write to .*, more than a store may hold .*nothing was written"):
        create_or_resume(tmp_path / "new.zarr", lambda existing: fresh)
    assert not (tmp_path / "new.zarr").exists()


@pytest.mark.parametrize("digests", [True, False], ids=["with-digests", "before-digests"])
def test_a_folder_where_a_shard_object_should_be_is_a_missing_object_not_zeros(tiny_store, tmp_path, digests):
    """A folder where a done shard's object should be passed the check that every done shard's object is there and
    non-empty (a folder's size is 4,096 bytes) and zarr read it as absent: the shard's fill value, zeros. In a store
    written before shard digests (readable as is), verify said "every check holds" and train trained on zero targets;
    with digests, it was "a shard object swapped with another, or copied from another store"."""
    from reference import without_the_digest_key

    store = copy(tiny_store, tmp_path)
    if not digests:
        shutil.rmtree(store / "progress" / "digest")
        without_the_digest_key(store)
    (store / SHARD).unlink()
    (store / SHARD).mkdir()
    r = CliRunner().invoke(main, ["verify", str(store)])
    assert r.exit_code == 1 and f"targets/logits: shard 1 object '{SHARD}' is missing" in r.output, r.output
    r = CliRunner().invoke(main, ["train", str(ROOT / "tests" / "fixtures" / "tiny.toml"), "--cache", str(store), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output  # found by listing the objects before the run begins
    assert f"lacks objects of 1 shard of the 4 marked done that this run reads (an incomplete copy, or objects deleted): shards [1], " \
           f"object '{SHARD}' missing" in r.output, r.output
    assert not (tmp_path / "run").exists()
    r = CliRunner().invoke(main, ["stats", str(store)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "shard 1 of targets/logits (rows 16-31) is missing although the shard is marked done" in r.output, r.output


@pytest.mark.parametrize("damage", ["cut-short", "flipped-byte"])
def test_a_root_zarr_json_that_is_not_json_is_named_as_a_damaged_copy(tiny_store, tmp_path, damage):
    """The root zarr.json (the manifest) cut short or with a byte flipped was "is not a zarr v3 group (Expecting ',' delimiter:
    line 157 column 1 (char 4077)); pass a store written by kdcache extract": the user had passed one, and the line named
    neither the object nor the damage."""
    store = copy(tiny_store, tmp_path)
    text = (store / "zarr.json").read_bytes()
    (store / "zarr.json").write_bytes(text[: len(text) // 2] if damage == "cut-short" else text[:5] + b"\xff" + text[6:])
    for verb in ("info", "verify", "stats"):
        r = CliRunner().invoke(main, [verb, str(store)])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "is not a zarr v3 group: its 'zarr.json' is not valid JSON (" in r.output, r.output
        assert "a damaged copy; copy the store again from its source, or re-extract it" in r.output, r.output


def test_a_resumed_extract_names_a_folder_where_a_shard_object_goes(tiny_store, tmp_path):
    """An extract resuming a store whose shard not done has a folder where its object goes said "cannot write shard 1 of
    'S': Is a directory; fix the cause", naming neither the folder nor what to do; nothing else of the store is lost."""
    store = copy(tiny_store, tmp_path)
    (store / "progress/done/c/1").unlink()  # shard 1 not done: the resume writes it
    (store / SHARD).unlink()
    (store / SHARD).mkdir()
    r = CliRunner().invoke(main, ["extract", str(ROOT / "tests" / "fixtures" / "tiny.toml"), "--out", str(store)])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.count("\n") == 1, r.output
    assert f"{str(store / SHARD)!r} is a folder where the object of shard 1 goes; remove that folder" in r.output, r.output
    assert (store / "progress/done/c/0").exists() and (store / SHARD).is_dir()
