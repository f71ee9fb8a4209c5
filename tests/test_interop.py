"""pack (.zarr.zip), HDF5 export/import: exact round trips of real stores, refusals of partial ones."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import kdcache
from kdcache.cli import main
from kdcache.errors import StoreError
from kdcache.interop import export_hdf5, import_hdf5, pack
from kdcache.store import open_store
from kdcache.verify import verify
from conftest import extract_tiny
from reference import make_pipeline, without_times


def assert_same(a: str, b: str) -> None:
    sa, sb = open_store(a), open_store(b)
    assert without_times(sa.manifest) == without_times(sb.manifest)
    for path in sa.paths() + ["progress/done", "progress/digest"]:
        x, y = sa.array(path), sb.array(path)
        assert x.dtype == y.dtype and x.shape == y.shape and x.chunks == y.chunks and x.shards == y.shards, path
        np.testing.assert_array_equal(x[:], y[:], err_msg=path)


@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_hdf5_round_trip_is_exact(tiny_store, tmp_path, compression):
    h5 = tmp_path / "tiny.h5"
    export_hdf5(tiny_store, h5, compression=compression)
    with h5py.File(h5) as f:
        manifest = json.loads(f.attrs["kdcache"])
        assert manifest == open_store(tiny_store).manifest
        logits = f["targets/logits"]
        assert logits.chunks == (16, 4) and logits.dtype == np.float16
        assert logits.compression == (None if compression == "none" else compression)
        assert f["targets/layers/features.3"].chunks == (16, 16, 8, 8)
        assert f["progress/done"][:].all()
    info = import_hdf5(h5, str(tmp_path / "back.zarr"))
    assert info["complete"] and info["shards_done"] == 4
    assert_same(tiny_store, str(tmp_path / "back.zarr"))


def test_a_store_smaller_than_one_inner_chunk_round_trips(tmp_path):
    """50 samples in one shard of 64-row inner chunks: the HDF5 chunk is the 50 rows (h5py refuses a chunk past the
    data; it was a traceback)."""
    store = extract_tiny(tmp_path / "small.zarr", "extract.rows_per_shard=0")
    assert open_store(store).array("targets/logits").chunks[0] == 64
    r = CliRunner().invoke(main, ["export", store, str(tmp_path / "small.h5")])
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "small.h5") as f:
        assert f["targets/logits"].chunks == (50, 4)
    import_hdf5(tmp_path / "small.h5", str(tmp_path / "back.zarr"))
    assert_same(store, str(tmp_path / "back.zarr"))


def test_pack_round_trip_and_cli(tiny_store, tmp_path):
    out = tmp_path / "hand-over.zarr.zip"
    r = CliRunner().invoke(main, ["pack", tiny_store, str(out)])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(out) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())  # byte ranges stay readable
        assert "zarr.json" in z.namelist()
    assert_same(tiny_store, str(out))
    r = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["bytes_stored"] == out.stat().st_size
    r = CliRunner().invoke(main, ["pack", tiny_store, str(out)])
    assert r.exit_code == 1 and "exists" in r.output
    r = CliRunner().invoke(main, ["pack", tiny_store, str(tmp_path / "x.tar")])
    assert r.exit_code == 1 and "*.zarr.zip" in r.output


def test_cli_export_import(tiny_store, tmp_path):
    h5, back = tmp_path / "t.h5", tmp_path / "back.zarr"
    r = CliRunner().invoke(main, ["export", tiny_store, str(h5), "--compression", "lzf"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["import", str(h5), str(back)])
    assert r.exit_code == 0 and "complete" in r.output, r.output
    assert_same(tiny_store, str(back))


def test_partial_stores_are_refused(tmp_path, zoo_env):
    out = tmp_path / "partial.zarr"
    zoo_env(FAIL_AT=42)
    with pytest.raises(RuntimeError):
        kdcache.extract(make_pipeline(), str(out))
    with pytest.raises(StoreError, match=r"incomplete \(2/4 shards done\); finish kdcache extract before you pack"):
        pack(str(out), tmp_path / "p.zarr.zip")
    with pytest.raises(StoreError, match="before you export"):
        export_hdf5(str(out), tmp_path / "p.h5")
    assert not (tmp_path / "p.zarr.zip").exists() and not (tmp_path / "p.h5").exists()


def test_import_refuses_foreign_or_damaged_hdf5(tiny_store, tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="no kdcache manifest"):
        import_hdf5(foreign, str(tmp_path / "a.zarr"))
    h5 = tmp_path / "t.h5"
    export_hdf5(tiny_store, h5)
    with h5py.File(h5, "a") as f:
        del f["targets/logits"]
        f["targets/logits"] = np.zeros((50, 3), np.float16)
    with pytest.raises(StoreError, match=r"dataset 'targets/logits' is \(50, 3\) float16, the manifest says \(50, 4\) float16"):
        import_hdf5(h5, str(tmp_path / "b.zarr"))
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(StoreError, match="cannot read"):
        import_hdf5(tmp_path / "junk.h5", str(tmp_path / "c.zarr"))
    missing = tmp_path / "missing.h5"  # h5py's message repeats the name, flags and errno: only the errno's words are kept
    with pytest.raises(StoreError) as e:
        import_hdf5(missing, str(tmp_path / "d.zarr"))
    assert str(e.value) == f"cannot read {str(missing)!r} as HDF5 (No such file or directory); check the path"


def test_pack_copies_the_stores_objects_only_streamed(tiny_store, tmp_path):
    """pack copied every file in the store folder (a notebook's checkpoints, notes, an old export) into the zip,
    each read whole into memory (a 300 MB stray file: a 640 MB peak). Now the zip holds
    the store's objects (FORMAT.md §17), an array someone added with zarr included (§14), streamed; the rest is
    left out, named in a note."""
    import shutil
    import tracemalloc

    import zarr

    store = tmp_path / "t.zarr"
    shutil.copytree(tiny_store, store)
    extra = zarr.open_group(store, mode="r+").create_array("targets/extra", shape=(2**25,), chunks=(2**25,), dtype="uint8",
                                                            compressors=None)
    extra[:] = np.random.default_rng(0).integers(0, 256, 2**25, dtype=np.uint8)  # one 32 MiB object
    (store / ".ipynb_checkpoints").mkdir()
    (store / ".ipynb_checkpoints" / "a-checkpoint.ipynb").write_text("{}")
    (store / "NOTES.txt").write_text("mine")
    (store / "targets" / "logits" / "c" / "9").mkdir()
    (store / "targets" / "logits" / "c" / "9" / "0").write_bytes(b"a shard past the array's 4")
    (store / "targets" / "logits" / "c.txt").write_bytes(b"x")
    (store / "old-export.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    out = tmp_path / "t.zarr.zip"
    tracemalloc.start()
    try:
        r = CliRunner().invoke(main, ["pack", str(store), str(out)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.exit_code == 0, r.output
    assert peak < 16 * 2**20, peak  # the 32 MiB object streamed, not read whole
    assert r.stderr == (f"note: left out 5 files of {str(store)!r} that are not objects of the store (FORMAT.md §17): "
                        "'.ipynb_checkpoints/a-checkpoint.ipynb', 'NOTES.txt', 'old-export.h5', 'targets/logits/c.txt', "
                        "'targets/logits/c/9/0'\n")
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        assert {i.external_attr >> 16 for i in z.infolist()} == {0o100644}  # unzip makes -rw-r--r-- files, not -rw-------
    assert "targets/extra/zarr.json" in names and "targets/extra/c/0" in names
    assert not any("NOTES" in n or "ipynb" in n or "export" in n or "c/9" in n or n.endswith(".txt") for n in names)
    assert_same(str(store), str(out))
    np.testing.assert_array_equal(zarr.open_group(zarr.storage.ZipStore(out, mode="r"), mode="r")["targets/extra"][:], extra[:])


def test_pack_of_an_intact_store_is_the_zip_of_its_objects_byte_for_byte(tiny_store, tmp_path):
    """pack checks each shard object's checksums as it copies it: the zip is still the objects' bytes as they are, byte
    for byte the zip of kdcache before the check (stored members, sorted, dated 1980-01-01, -rw-r--r--)."""
    out = tmp_path / "t.zarr.zip"
    result = pack(tiny_store, out)
    with zipfile.ZipFile(tmp_path / "ref.zip", "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for key in open_store(tiny_store).object_keys():
            member = zipfile.ZipInfo(key, date_time=(1980, 1, 1, 0, 0, 0))
            member.external_attr = 0o100644 << 16
            z.writestr(member, (Path(tiny_store) / key).read_bytes())
    assert result["objects"] == 40 and out.read_bytes() == (tmp_path / "ref.zip").read_bytes()


@pytest.mark.filterwarnings("ignore:Combining a `sharding_indexed` codec")
def test_pack_copies_an_added_array_sharded_within_shards_and_one_of_malformed_sharding(tiny_store, tmp_path):
    """An array someone added with zarr (FORMAT.md §14) whose inner chunks are shards themselves (zarr writes them: 64
    one-byte chunks and a 1,028-byte index in each of 4) was refused by pack as damage ('holds 4,434 bytes, more than it
    can (1,092)'): its bound counted an inner chunk's bytes, not its index. A shard within a shard is bounded as a shard;
    an added array whose sharding configuration has no chunk_shape was a KeyError traceback, it is copied as any object."""
    import shutil

    import zarr
    from zarr.codecs import BytesCodec, ShardingCodec

    store = tmp_path / "t.zarr"
    shutil.copytree(tiny_store, store)
    nested = ShardingCodec(chunk_shape=(64,), codecs=[ShardingCodec(chunk_shape=(1,), codecs=[BytesCodec()])])
    extra = zarr.open_group(store, mode="r+").create_array("targets/extra", shape=(256,), chunks=(256,), dtype="uint8",
                                                            serializer=nested, compressors=None)
    extra[:] = np.arange(256) % 251
    assert (store / "targets/extra/c/0").stat().st_size == 4434  # 4 × (64 + 64 × 16 + 4) + 4 × 16 + 4, less the two zeros
    odd = zarr.open_group(store, mode="r+").create_array("targets/odd", shape=(4,), chunks=(4,), dtype="uint8", shards=(4,))
    odd[:] = 7
    meta = json.loads((store / "targets/odd/zarr.json").read_text())
    del meta["codecs"][0]["configuration"]["chunk_shape"]
    (store / "targets/odd/zarr.json").write_text(json.dumps(meta))
    out = tmp_path / "t.zarr.zip"
    r = CliRunner().invoke(main, ["pack", str(store), str(out)])
    assert r.exit_code == 0 and r.exception is None, r.output
    with zipfile.ZipFile(out) as z:
        assert {"targets/extra/c/0", "targets/odd/c/0"} <= set(z.namelist())
    np.testing.assert_array_equal(zarr.open_group(zarr.storage.ZipStore(out, mode="r"), mode="r")["targets/extra"][:], extra[:])


def test_two_packs_to_one_out_at_once_do_not_share_a_temp_file(tiny_store, tmp_path, monkeypatch):
    """Both wrote OUT.part.zip: the second truncated the first's file and renamed it to OUT while the first still
    wrote into it (OUT corrupted, or the first failed). Each now writes a temp file of its own."""
    import threading

    out, paused, resume = tmp_path / "t.zarr.zip", threading.Event(), threading.Event()
    close = zipfile.ZipFile.close

    def slow_close(self):  # the first pack's zip is written but for its central directory: wait for the second
        if self.mode == "w" and threading.current_thread().name == "first":
            paused.set()
            assert resume.wait(60)
        close(self)

    monkeypatch.setattr(zipfile.ZipFile, "close", slow_close)
    failed = []
    first = threading.Thread(target=lambda: _pack_or_keep(tiny_store, out, failed), name="first")
    first.start()
    assert paused.wait(60)
    pack(tiny_store, out)
    resume.set()
    first.join()
    assert not failed, failed
    assert_same(tiny_store, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.zarr.zip"]


def _pack_or_keep(store, out, failed):
    try:
        pack(store, out, overwrite=True)
    except Exception as e:  # noqa: BLE001 - the test reports it
        failed.append(e)


@pytest.mark.parametrize("verb, name", [("pack", "t.zarr.zip"), ("export", "t.h5")])
def test_a_killed_packs_temp_file_is_removed_by_the_next_pack_but_a_running_ones_kept(tiny_store, tmp_path, verb, name):
    """A pack or export killed (kill -9, a lost machine) left OUT.part.zip / OUT.part (as large as it had got), which
    looked like a store and stayed; the next one to OUT removes it, not the file of one still writing."""
    import fcntl
    import os

    out = tmp_path / name
    killed, running = tmp_path / f"{name}.0123456789ab.part", tmp_path / f"{name}.ba9876543210.part"
    killed.write_bytes(b"PK" * 1000)
    running.write_bytes(b"PK")
    fd = os.open(running, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a pack writing it holds it
    try:
        r = CliRunner().invoke(main, [verb, tiny_store, str(out)])
    finally:
        os.close(fd)
    assert r.exit_code == 0, r.output
    assert r.stderr == (f"note: removed {str(killed)!r} (2,000 bytes), the temporary file of a pack or export that was killed "
                        "before it finished\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, running.name])
    assert running.read_bytes() == b"PK"


def _rewrite_logits(store: Path, **codecs: object) -> np.ndarray:
    """``targets/logits`` written again by plain zarr with ``codecs`` (its rows and attributes kept), as another tool would."""
    import zarr

    group = zarr.open_group(store, mode="r+")
    rows, attrs = group["targets/logits"][:], dict(group["targets/logits"].attrs)
    del group["targets/logits"]
    group.create_array("targets/logits", shape=rows.shape, dtype=rows.dtype, **codecs).attrs.update(attrs)
    group["targets/logits"][:] = rows
    return rows


def test_pack_refuses_a_data_array_rewritten_unsharded_and_notes_one_rewritten_without_crc32c(tiny_store, tmp_path):
    """A data array another tool rewrote unsharded was packed without a word, and verify then failed the zip's layout;
    pack refuses it with that check's line. One rewritten sharded as kdcache's but without crc32c was copied, and
    verified, as if its checksums were checked: pack and verify now say they were not."""
    import shutil

    from zarr.codecs import BytesCodec, ZstdCodec

    geometry = open_store(tiny_store).array("targets/logits")
    plain, bare = tmp_path / "plain.zarr", tmp_path / "bare.zarr"
    shutil.copytree(tiny_store, plain)
    shutil.copytree(tiny_store, bare)
    _rewrite_logits(plain, chunks=geometry.chunks)
    rows = _rewrite_logits(bare, chunks=geometry.chunks, shards=geometry.shards, serializer=BytesCodec(), compressors=[ZstdCodec()])

    r = CliRunner().invoke(main, ["pack", str(plain), str(tmp_path / "plain.zarr.zip")])
    assert r.exit_code == 1 and f"Error: cannot pack {str(plain)!r}: targets/logits: shard None / inner chunk" in r.output, r.output
    assert "as kdcache verify's layout check says; re-extract the store" in r.output and not (tmp_path / "plain.zarr.zip").exists()

    r = CliRunner().invoke(main, ["pack", str(bare), str(tmp_path / "bare.zarr.zip")])
    assert r.exit_code == 0 and f"note: copied 'targets/logits' of {str(bare)!r} without a checksum check" in r.output, r.output
    for location in (str(bare), f"{tmp_path}/bare.zarr.zip"):
        report = verify(location)
        assert report["ok"] and "not checked: 'targets/logits' (no crc32c checksums" in report["checks"][2]["summary"], report
    assert np.array_equal(open_store(f"{tmp_path}/bare.zarr.zip").read("targets/logits", 0, len(rows)), rows)
    assert "not checked" not in verify(str(tiny_store))["checks"][2]["summary"]
