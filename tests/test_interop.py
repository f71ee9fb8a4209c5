"""pack (.zarr.zip), HDF5 export/import: exact round trips of real stores, refusals of partial ones."""

from __future__ import annotations

import json
import zipfile

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import kdcache
from kdcache.cli import main
from kdcache.errors import StoreError
from kdcache.interop import export_hdf5, import_hdf5, pack
from kdcache.store import open_store
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
