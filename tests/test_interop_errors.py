"""export / import / pack / demo: user and environment mistakes are one ``Error:`` line (exit 1, no traceback),
and a failing command leaves an existing store (or output file) exactly as it was."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import kdcache
from kdcache import interop
from kdcache.cli import main
from kdcache.demo import demo
from kdcache.errors import StoreError
from kdcache.store import open_store
from conftest import TINY_TOML, extract_tiny
from test_bad_input import read_only_dir, snapshot
from test_interop import assert_same
from test_received_stores import encrypted


def cli(*args: object) -> tuple[int, str]:
    """Run ``kdcache ARGS`` in this process; returns the exit code and the one ``Error:`` line (asserted to be alone)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return result.exit_code, lines[0]


@pytest.fixture(scope="module")
def exported(tiny_store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny store exported once (gzip). Read-only: copy it to change it."""
    h5 = tmp_path_factory.mktemp("h5") / "tiny.h5"
    interop.export_hdf5(tiny_store, h5)
    return h5


def copy_of(src: str | Path, dst: Path) -> Path:
    (shutil.copytree if Path(src).is_dir() else shutil.copy)(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ import


def missing(f: h5py.File) -> None:
    del f["targets/logits"]


def wrong_shape(f: h5py.File) -> None:
    del f["targets/logits"]
    f["targets/logits"] = np.zeros((50, 3), np.float16)


def wrong_dtype(f: h5py.File) -> None:
    del f["samples/index"]
    f["samples/index"] = np.zeros(50, np.int32)


def group_not_dataset(f: h5py.File) -> None:
    del f["targets/layers/features.3"]
    f.create_group("targets/layers/features.3")


def no_done(f: h5py.File) -> None:
    del f["progress/done"]


def shard_2_not_done(f: h5py.File) -> None:
    f["progress/done"][2] = False  # imported as a store without shard 2's rows, exit 0 (its info said INCOMPLETE)


def empty(path: str) -> Callable[[h5py.File], None]:
    """``path`` replaced by a dataset of HDF5's null dataspace (no shape: h5py's ``shape`` is None; was a TypeError traceback)."""
    def edit(f: h5py.File) -> None:
        dtype = f[path].dtype
        del f[path]
        f.create_dataset(path, shape=None, dtype=dtype)
    return edit


@pytest.mark.parametrize("call, match", [
    (lambda store, h5: interop.pack(None, "t.zarr.zip"), r"^location must be the location of a store or folder, got NoneType None"),
    (lambda store, h5: interop.pack(store, None), r"^out must be .* got NoneType None"),
    (lambda store, h5: interop.pack(open_store(store), "t.zarr.zip"), r"^location must be .* got Store .*pass its location"),
    (lambda store, h5: interop.export_hdf5(None, "t.h5"), r"^location must be .* got NoneType None"),
    (lambda store, h5: interop.export_hdf5(store, None), r"^out must be .* got NoneType None"),
    (lambda store, h5: interop.import_hdf5(None, "t.zarr"), r"^source must be .* got NoneType None"),
    (lambda store, h5: interop.import_hdf5(h5, None), r"^location must be .* got NoneType None"),
], ids=["pack-store", "pack-out", "pack-opened-store", "export-store", "export-out", "import-source", "import-store"])
def test_pack_export_and_import_refuse_a_location_of_another_type(exported, tiny_store, tmp_path, monkeypatch, call, match):
    """README: a location that is not a str or Path (None, an opened Store) is a TypeError naming the argument, as for
    kdcache.extract; pack and export raised an AttributeError or TypeError from inside ('NoneType' object has no attribute
    'lower'), and import read None as a file named 'None'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=match):
        call(tiny_store, str(exported))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit, match", [
    (missing, "dataset 'targets/logits' is missing, the manifest says (50, 4) float16"),
    (wrong_shape, "dataset 'targets/logits' is (50, 3) float16, the manifest says (50, 4) float16"),
    (wrong_dtype, "dataset 'samples/index' is (50,) int32, the manifest says (50,) int64"),
    (group_not_dataset, "dataset 'targets/layers/features.3' is a group, not a dataset"),
    (no_done, "dataset 'progress/done' is missing, the manifest says (4,) bool"),
    (shard_2_not_done, "dataset 'progress/done' marks 1 of 4 shards not done (shard 2, rows 32-47), but kdcache export writes "
                       "complete stores only (FORMAT.md §16: all true)"),
    (empty("progress/done"), "dataset 'progress/done' is an empty dataset (HDF5 null dataspace), the manifest says (4,) bool"),
    (empty("targets/logits"), "dataset 'targets/logits' is an empty dataset (HDF5 null dataspace), the manifest says (50, 4) float16"),
    (empty("progress/digest"), "dataset 'progress/digest' is not [4, 5] uint32 stored in the file"),
])
def test_import_overwrite_of_a_malformed_file_keeps_the_store(exported, tiny_store, tmp_path, edit, match):
    h5 = copy_of(exported, tmp_path / "bad.h5")
    with h5py.File(h5, "a") as f:
        edit(f)
    victim = copy_of(tiny_store, tmp_path / "victim.zarr")
    before = snapshot(victim)
    _, line = cli("import", h5, victim, "--overwrite")
    assert match in line and "bad.h5" in line and "re-export it" in line, line
    assert snapshot(victim) == before  # was wiped before the check
    cli("import", h5, tmp_path / "new.zarr")
    assert not (tmp_path / "new.zarr").exists()


@pytest.mark.parametrize("manifest, match", [
    ("{not json", "has no kdcache manifest (root attribute 'kdcache' is not a JSON object: '{not json'); pass a file written "
                  "by kdcache export"),
    (lambda m: {**m, "format": "other"}, "has no kdcache manifest (root attribute 'kdcache' is a manifest of format 'other', not "
                                         "'kdcache-store')"),
    (lambda m: {**m, "format_version": 99}, "holds store format version 99; this kdcache reads version "),
    (lambda m: {**m, "format_version": True}, "holds store format version True; this kdcache reads version "),
], ids=["not-json", "another-format", "version-99", "version-true"])
def test_import_refuses_a_file_whose_manifest_it_cannot_read(exported, tmp_path, manifest, match):
    """The manifest root attribute not JSON, not kdcache's, or of a store format version this kdcache does not read: one
    line before any store is touched."""
    h5 = copy_of(exported, tmp_path / "m.h5")
    with h5py.File(h5, "a") as f:
        f.attrs["kdcache"] = manifest if isinstance(manifest, str) else json.dumps(manifest(json.loads(f.attrs["kdcache"])))
    _, line = cli("import", h5, tmp_path / "new.zarr")
    assert match in line and "m.h5" in line, line
    assert not (tmp_path / "new.zarr").exists()


def test_import_of_another_tools_file_names_what_it_holds_and_what_import_reads(tmp_path):
    """An HDF5 file of logits written by another tool, with dataset names of its own: the line said only that there was
    no manifest; it names the datasets the file holds, and why only an export's file imports (no fingerprints)."""
    h5 = tmp_path / "theirs.h5"
    with h5py.File(h5, "w") as f:
        f["logits"], f["labels"] = np.zeros((8, 10), np.float32), np.zeros(8, np.int64)
    _, line = cli("import", h5, tmp_path / "new.zarr")
    assert re.search(r"'.*theirs\.h5' has no kdcache manifest \(root attribute 'kdcache'; its root holds 'labels', 'logits'\): "
                     r"kdcache import reads only files written by kdcache export .*; pass one \(kdcache export STORE OUT\.h5\)", line), line
    assert not (tmp_path / "new.zarr").exists()


def test_export_refuses_an_unknown_compression_before_anything_is_written(tiny_store, tmp_path):
    """The CLI offers gzip, lzf and none; through the API another name is one line naming the choices, not h5py's error."""
    with pytest.raises(StoreError, match=r"^unknown HDF5 compression 'zstd'; choose one of gzip, lzf, none$"):
        interop.export_hdf5(tiny_store, tmp_path / "t.h5", compression="zstd")
    assert list(tmp_path.iterdir()) == []


def test_pack_and_export_to_a_folder_name_the_file_to_pass(tiny_store, tmp_path):
    """The CLI refuses a folder OUT itself (click's Path); through the API it is one line naming a file to pass."""
    for call, name in ((interop.pack, "out.zarr.zip"), (interop.export_hdf5, "out.h5")):
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(StoreError, match=rf"^{re.escape(repr(str(folder)))} is a folder; pass the path of the file to write "
                                             rf"\(e\.g\. {re.escape(repr(str(folder / name)))}\)$"):
            call(tiny_store, folder)
        assert list(folder.iterdir()) == []


def test_pack_and_export_of_a_done_shard_without_its_digest_are_refused(tiny_store, tmp_path):
    """A done shard whose digest object is missing (an incomplete copy): its rows' place cannot be checked, and a copy
    would carry the gap on (import refuses the file); pack and export refuse the store, naming the shard and the fix."""
    store = copy_of(tiny_store, tmp_path / "s.zarr")
    (store / "progress" / "digest" / "c" / "1" / "0").unlink()
    _, line = cli("pack", store, tmp_path / "s.zarr.zip")
    assert line == (f"Error: cannot pack {str(store)!r}: shard 1 (rows 16-31) has no digest: object 'progress/digest/c/1/0' is missing "
                    f"or all 0 although the shard is marked done; run kdcache verify {store} to list the damage, and re-extract the "
                    "store or copy it again"), line
    _, line = cli("export", store, tmp_path / "s.h5")
    assert "shard 1 of samples/index (rows 16-31) has no digest in progress/digest" in line and "kdcache verify" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_pack_leaves_out_a_zarr_json_that_is_no_zarr_v3_node(tiny_store, tmp_path):
    """A ``zarr.json`` under the root group that is not a zarr v3 group's or array's metadata (not JSON; a zarr v2 or
    other file of that name) is no node of the store (FORMAT.md §17): left out as a stray, named in the note."""
    import zipfile

    store = copy_of(tiny_store, tmp_path / "s.zarr")
    (store / "notes").mkdir()
    (store / "notes" / "zarr.json").write_text("{not json")
    (store / "old").mkdir()
    (store / "old" / "zarr.json").write_text(json.dumps({"zarr_format": 2, "node_type": "group"}))
    out = tmp_path / "s.zarr.zip"
    r = CliRunner().invoke(main, ["pack", str(store), str(out)])
    assert r.exit_code == 0, r.output
    assert r.stderr == (f"note: left out 2 files of {str(store)!r} that are not objects of the store (FORMAT.md §17): "
                        "'notes/zarr.json', 'old/zarr.json'\n"), r.stderr
    with zipfile.ZipFile(out) as z:
        assert not any(n.startswith(("notes/", "old/")) for n in z.namelist())


@pytest.mark.parametrize("version, match", [
    (2, "holds HDF5 layout version 2 (root attribute 'kdcache_hdf5_version'); this kdcache reads version 1: upgrade kdcache"),
    ("1", "root attribute 'kdcache_hdf5_version' is '1' (str), not an integer (FORMAT.md §16: 1); the file was not written "
          "by kdcache export: export the store again"),  # was "upgrade kdcache", which cannot help
    (1.0, "root attribute 'kdcache_hdf5_version' is 1.0 (float), not an integer"),
    (None, "has no root attribute 'kdcache_hdf5_version' (FORMAT.md §16); pass a file written by kdcache export"),
], ids=["2", "a-string", "a-float", "missing"])
def test_import_refuses_another_hdf5_layout_version(exported, tiny_store, tmp_path, version, match):
    """FORMAT.md §16's layout version was written by export and never read: a file of another layout was imported as this one."""
    h5 = copy_of(exported, tmp_path / "other.h5")
    with h5py.File(h5, "a") as f:
        if version is None:
            del f.attrs["kdcache_hdf5_version"]
        else:
            f.attrs["kdcache_hdf5_version"] = version
    victim = copy_of(tiny_store, tmp_path / "victim.zarr")
    before = snapshot(victim)
    _, line = cli("import", h5, victim, "--overwrite")
    assert match in line and "other.h5" in line, line
    assert snapshot(victim) == before
    cli("import", h5, tmp_path / "new.zarr")
    assert not (tmp_path / "new.zarr").exists()


def corrupt_chunk(h5: Path, path: str = "targets/logits", chunk: int = 1) -> None:
    """Overwrite the compressed bytes of one chunk (rows 16-31 of ``path``) with garbage: its gzip stream fails."""
    with h5py.File(h5, "r") as f:
        info = f[path].id.get_chunk_info(chunk)
    data = bytearray(h5.read_bytes())
    data[info.byte_offset : info.byte_offset + info.size] = b"\x5a" * info.size
    h5.write_bytes(bytes(data))


def test_a_reader_of_what_an_import_killed_as_it_created_the_store_left_says_to_rerun_the_import(exported, tiny_store, tmp_path):
    """A ``kdcache import`` killed (SIGKILL, a real process) once it had written the new store's root group leaves what an
    extract stopped there leaves, and a reader of it said "rerun that extract", a command the user of an HDF5 file had
    not run and has no pipeline for. It names the import too; the import run again creates the store whole."""
    from conftest import FIXTURES

    store = tmp_path / "s.zarr"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KDCACHE_FAULT")} | {"KDCACHE_FAULT": "kill:3"}
    killed = subprocess.run([sys.executable, str(FIXTURES / "faults.py"), "import", str(exported), str(store)], env=environment,
                            capture_output=True, timeout=300)
    assert killed.returncode == -9 and sorted(p.name for p in store.iterdir()) == ["zarr.json"], killed.stderr  # its root group
    code, line = cli("info", store)
    assert "is an empty zarr group, as an extract stopped while it created the store leaves it, or an import" in line, line
    assert "rerun that extract or import, which creates it again" in line, line
    assert CliRunner().invoke(main, ["import", str(exported), str(store)]).exit_code == 0
    assert_same(str(store), tiny_store)


def test_import_of_a_corrupt_chunk_is_one_line_and_a_rerun_resumes_and_says_so(exported, tiny_store, tmp_path):
    h5 = copy_of(exported, tmp_path / "corrupt.h5")
    corrupt_chunk(h5)
    out = tmp_path / "new.zarr"
    _, line = cli("import", h5, out)
    for fragment in ("corrupt.h5' is damaged: dataset 'targets/logits' rows 16-31 cannot be read",
                     "left partial (1/4 shards imported)", "re-export the file", f"rerun kdcache import FILE {out}"):
        assert fragment in line, line
    assert int(open_store(str(out)).done().sum()) == 1
    r = CliRunner().invoke(main, ["import", str(exported), str(out)])  # a good copy: resumes the other shards
    assert r.exit_code == 0, r.output
    assert_same(tiny_store, str(out))
    # said as extract says it (no line at all before)
    assert r.stderr == f"resumed {out}: 1 of 4 shards was already done; this run wrote the others\n", r.stderr
    r = CliRunner().invoke(main, ["import", str(exported), str(out)])
    assert r.exit_code == 0 and r.stderr == f"{out} is already complete (50 samples); nothing to do (--overwrite to redo it)\n", r.stderr
    r = CliRunner().invoke(main, ["import", str(exported), str(out), "--overwrite"])
    assert r.exit_code == 0 and r.stderr == "", r.stderr


def test_import_overwrite_of_a_corrupt_chunk_keeps_the_store(exported, tiny_store, tmp_path):
    h5 = copy_of(exported, tmp_path / "corrupt.h5")
    corrupt_chunk(h5, "targets/layers/features.3", 3)
    victim = copy_of(tiny_store, tmp_path / "victim.zarr")
    before = snapshot(victim)
    _, line = cli("import", h5, victim, "--overwrite")
    assert "dataset 'targets/layers/features.3' rows 48-49 cannot be read" in line and "nothing was changed" in line, line
    assert snapshot(victim) == before


def swap_rows(h5: Path, path: str = "targets/logits") -> None:
    """Rows 0-15 and 16-31 of ``path`` exchanged, written back through h5py: every HDF5 chunk reads, values are sound."""
    with h5py.File(h5, "r+") as f:
        rows = f[path][:32]
        f[path][:32] = np.concatenate([rows[16:], rows[:16]])


def test_import_checks_the_exported_shard_digests(exported, tiny_store, tmp_path):
    """FORMAT.md §7.1 / §16: ``export`` carries progress/digest; ``import`` checks every shard's rows against it before
    writing them (it computes the new store's own digests from the rows it writes: a file with rows out of place
    would be made into a store that verifies). A first shard that is out of place leaves nothing imported; with
    --overwrite the old store is kept."""
    with h5py.File(exported, "r") as f:
        np.testing.assert_array_equal(f["progress/digest"][:], open_store(tiny_store).digests())
    h5 = copy_of(exported, tmp_path / "swapped.h5")
    swap_rows(h5)
    out = tmp_path / "new.zarr"
    _, line = cli("import", h5, out)
    for fragment in ("swapped.h5' is damaged: dataset 'targets/logits' rows 0-15 are not the rows the store held there",
                     "(their digest is not the one in progress/digest)", "left partial (0/4 shards imported)", "re-export the file"):
        assert fragment in line, line
    victim = copy_of(tiny_store, tmp_path / "victim.zarr")
    before = snapshot(victim)
    _, line = cli("import", h5, victim, "--overwrite")
    assert "rows 0-15 are not the rows the store held there" in line and "nothing was changed" in line, line
    assert snapshot(victim) == before


def test_a_file_exported_before_digests_imports_into_a_store_with_them(exported, tiny_store, tmp_path):
    h5 = copy_of(exported, tmp_path / "old.h5")
    with h5py.File(h5, "r+") as f:  # as kdcache <= 0.1.1 exported it: no digests, and a manifest that does not say it kept them
        del f["progress/digest"]
        manifest = json.loads(f.attrs["kdcache"])
        del manifest["compression"]["shard_digests"]
        f.attrs["kdcache"] = json.dumps(manifest)
    out = tmp_path / "new.zarr"
    assert CliRunner().invoke(main, ["import", str(h5), str(out)]).exit_code == 0
    old = copy_of(tiny_store, tmp_path / "old.zarr")  # the store such a file came from: the same, less the manifest's key
    root = json.loads((old / "zarr.json").read_text())
    del root["attributes"]["kdcache"]["compression"]["shard_digests"]
    (old / "zarr.json").write_text(json.dumps(root))
    assert_same(str(old), str(out))
    np.testing.assert_array_equal(open_store(str(out)).digests(), open_store(tiny_store).digests())


def test_a_file_whose_manifest_kept_digests_must_carry_them(exported, tiny_store, tmp_path):
    """Deleting progress/digest from a file whose manifest says compression.shard_digests (every such file is exported
    with them) switched the check off: rows moved inside the file were made into a store that verifies."""
    h5 = copy_of(exported, tmp_path / "edited.h5")
    swap_rows(h5)
    with h5py.File(h5, "r+") as f:
        del f["progress/digest"]
    victim = copy_of(tiny_store, tmp_path / "victim.zarr")
    before = snapshot(victim)
    _, line = cli("import", h5, victim, "--overwrite")
    assert ("edited.h5': dataset 'progress/digest' is missing, the manifest says the store kept shard digests "
            "(compression.shard_digests = 'crc32c'); re-export it") in line, line
    assert snapshot(victim) == before
    cli("import", h5, tmp_path / "new.zarr")
    assert not (tmp_path / "new.zarr").exists()


def test_a_digest_row_of_zeros_in_the_file_is_damage_not_unchecked(exported, tiny_store, tmp_path):
    """A shard whose progress/digest row is all 0 is refused, as in a store (FORMAT.md §7.1): zeroing it let rows swapped
    inside that shard through unchecked."""
    h5 = copy_of(exported, tmp_path / "zeroed.h5")
    swap_rows(h5)
    with h5py.File(h5, "r+") as f:
        f["progress/digest"][0] = 0
        f["progress/digest"][1] = 0
    victim = copy_of(tiny_store, tmp_path / "victim.zarr")
    before = snapshot(victim)
    _, line = cli("import", h5, victim, "--overwrite")
    assert ("zeroed.h5' is damaged: dataset 'samples/index' rows 0-15 have no digest in progress/digest (its row for shard 0 "
            "is all 0") in line and "nothing was changed" in line, line
    assert snapshot(victim) == before


def set_rows(h5: Path, path: str, shard: int, edit) -> None:
    """Change rows of dataset ``path`` in shard ``shard`` (16 rows) by ``edit``, with the file's digest made to agree,
    as another tool writing the file (or a hand) would: only the values say what is wrong."""
    from kdcache.store import shard_digest

    with h5py.File(h5, "r+") as f:
        rows = f[path][shard * 16 : shard * 16 + 16]
        edit(rows)
        f[path][shard * 16 : shard * 16 + 16] = rows
        digests = f["progress/digest"][:]
        paths = sorted(["samples/index", "samples/fingerprint", "samples/label", "targets/logits", "targets/layers/features.3"])
        digests[shard, paths.index(path)] = shard_digest(path, shard, [rows])
        f["progress/digest"][:] = digests


@pytest.mark.parametrize("path, edit, match", [
    ("targets/logits", lambda r: r.__setitem__((4, 1), np.nan), "dataset 'targets/logits' rows 16-31 hold NaN or inf in 1 row (first row 20)"),
    ("targets/layers/features.3", lambda r: r.__setitem__((3, 0, 0, 0), np.inf),
     "dataset 'targets/layers/features.3' rows 16-31 hold NaN or inf in 1 row (first row 19)"),
    ("samples/index", lambda r: r.__setitem__(5, 7), "dataset 'samples/index' rows 16-31 hold index[r] != r at 1 row (first row 21: 7)"),
    ("samples/fingerprint", lambda r: r.__setitem__(2, 0), "dataset 'samples/fingerprint' rows 16-31 hold 1 row without a fingerprint"),
])
def test_import_refuses_values_no_store_may_hold(exported, tiny_store, tmp_path, path, edit, match):
    """FORMAT.md §5/§7: a store holds finite targets, index[r] == r and a fingerprint per row (extract refuses the
    teacher's NaN). import wrote such rows from a file whose digests agreed with them: the store then failed verify,
    and training from it ended "training diverged ... lower train.lr" for a NaN target."""
    h5 = copy_of(exported, tmp_path / "values.h5")
    set_rows(h5, path, 1, edit)
    _, line = cli("import", h5, tmp_path / "new.zarr")
    assert match in line and "left partial (1/4 shards imported)" in line, line
    victim = copy_of(tiny_store, tmp_path / "victim.zarr")
    before = snapshot(victim)
    _, line = cli("import", h5, victim, "--overwrite")
    assert match in line and "nothing was changed" in line, line
    assert snapshot(victim) == before


def test_import_names_its_store_argument(exported, tmp_path):
    (tmp_path / "afile").write_text("keep")
    for store in ("afile", "afile/x.zarr"):
        _, line = cli("import", exported, tmp_path / store)
        assert "'afile' is a file" in line or f"{tmp_path / 'afile'!s}' is a file" in line, line
        assert "STORE" in line and "--out" not in line, line
    assert (tmp_path / "afile").read_text() == "keep"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("keep")
    _, line = cli("import", exported, tmp_path / "folder")
    assert "exists and is not a kdcache store; choose another STORE or remove it" in line, line
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["notes.txt"]


def test_import_into_a_training_runs_folder_names_it_as_such(exported, tiny_store, tmp_path):
    """``kdcache import teacher.h5 RUN`` where RUN is a kdcache train --out folder said "exists and is not a kdcache store",
    as of any folder: which of the user's folders was named went untold. It is named as a training run's folder (as a
    pipeline argument is, ``pipeline.not_a_pipeline``), and left as it was."""
    run = tmp_path / "run"
    kdcache.train(kdcache.load_pipeline(TINY_TOML, ["train.epochs=1", "train.eval_split=''"]), tiny_store, run)
    before = snapshot(run)
    _, line = cli("import", exported, run)
    assert line == (f"Error: {str(run)!r} is a training run's folder (kdcache train --out), not a kdcache store; choose another "
                    "STORE or remove it"), line
    assert snapshot(run) == before


def test_import_into_a_store_made_from_another_file_says_how_to_go_on(exported, tmp_path):
    """A store that is not this file's copy: import has no pipeline, so the fix is not 'use the original pipeline'."""
    other = Path(extract_tiny(tmp_path / "other.zarr", "targets.layers=[]"))
    before = snapshot(other)
    _, line = cli("import", exported, other)
    assert "was made with different targets" in line, line
    assert line.endswith("; import the file it was made from to resume it, choose another STORE, or pass --overwrite to replace it"), line
    assert snapshot(other) == before



@pytest.mark.parametrize("zip_at", ["zip::{tmp}/t.zip", "{tmp}/t.zarr.zip", "zip::memory://t.zarr.zip"])
def test_import_into_a_zip_says_to_import_to_a_folder_then_pack_it(exported, tmp_path, zip_at):
    """A zip is write-once: ``import`` into one said extract's fix ('extract to a folder …, then kdcache pack it');
    it names import's own, and extract's stays."""
    location = zip_at.format(tmp=tmp_path)
    _, line = cli("import", exported, location)
    assert line == (f"Error: {location!r}: a zip store is write-once and opened read-only; import to a folder or an object store, "
                    "then kdcache pack it"), line
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError, match="; extract to a folder or an object store, then kdcache pack it$"):
        kdcache.extract(kdcache.load_pipeline(TINY_TOML), location)


def test_import_of_a_file_another_process_holds_open_for_writing_says_so(exported, tmp_path):
    """HDF5 locks a file it opens (flock): one open for writing elsewhere (a notebook's h5py.File(..., "a")) is refused with
    EAGAIN, which was 'pass a file written by kdcache export' although the file was one."""
    h5 = copy_of(exported, tmp_path / "busy.h5")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); "
                               "sys.stdin.read()", str(h5)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        _, line = cli("import", h5, tmp_path / "new.zarr")
    finally:
        holder.communicate("")
    assert line == (f"Error: cannot read {str(h5)!r} as HDF5 (Resource temporarily unavailable): another process has it open for "
                    "writing (HDF5 locks the file); close it there and rerun"), line
    assert not (tmp_path / "new.zarr").exists()
    assert CliRunner().invoke(main, ["import", str(h5), str(tmp_path / "new.zarr")]).exit_code == 0  # once closed


NO_LOCKS = ("its file system does not support the file lock HDF5 takes on opening (NFS, Lustre); set the environment variable "
            "HDF5_USE_FILE_LOCKING=FALSE and rerun")


def test_import_of_a_file_on_a_file_system_without_locks_names_the_cause_and_the_fix(exported, tiny_store, tmp_path):
    """NFS without its lock daemon, Lustre mounted without flock: HDF5's lock of the file it opens fails with ENOLCK
    ('unable to lock file'), which was 'pass a file written by kdcache export'. Made here in a real kdcache process by a
    preloaded flock() that fails so, as such a file system's does (built with the C compiler); with
    HDF5_USE_FILE_LOCKING=FALSE, as the error says, the file is imported."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a flock() that fails with ENOLCK")
    (tmp_path / "nolock.c").write_text("#include <errno.h>\nint flock(int fd, int op) { (void)fd; (void)op; errno = ENOLCK; return -1; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "nolock.so"), str(tmp_path / "nolock.c")], check=True)
    out, env = tmp_path / "new.zarr", {**os.environ, "LD_PRELOAD": str(tmp_path / "nolock.so")}
    command = [sys.executable, "-m", "kdcache.cli", "import", str(exported), str(out)]
    r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr == f"Error: cannot read {str(exported)!r} as HDF5 (No locks available): {NO_LOCKS}\n", r.stderr
    assert not out.exists()
    r = subprocess.run(command, env={**env, "HDF5_USE_FILE_LOCKING": "FALSE"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same(tiny_store, str(out))


def test_an_hdf5_lock_not_implemented_by_the_file_system_names_the_fix_too():
    """ENOSYS ('Function not implemented'), the other errno of a file system without locks: the HDF5 here (2.0) opens
    the file anyway, older ones raise. Not made for real: the OSError is constructed as h5py constructs it from
    HDF5's error (its errno and message)."""
    e = OSError(errno.ENOSYS, "Unable to synchronously open file (unable to lock file, errno = 38, error message = 'Function not implemented')")
    assert str(interop._open_error("f.h5", e)) == f"cannot read 'f.h5' as HDF5 (Function not implemented): {NO_LOCKS}"


def test_import_of_a_truncated_file_says_to_copy_it_again(exported, tmp_path):
    """A copy or download cut short: HDF5 opens none of it, and the fix was 'pass a file written by kdcache export'."""
    h5 = tmp_path / "cut.h5"
    h5.write_bytes(exported.read_bytes()[:30000])
    _, line = cli("import", h5, tmp_path / "new.zarr")
    assert line == (f"Error: cannot read {str(h5)!r} as HDF5: it is truncated, {30000:,} of the {exported.stat().st_size:,} bytes it "
                    "was written with (an incomplete copy or download); copy it again"), line
    assert not (tmp_path / "new.zarr").exists()


def rechunk(f: h5py.File, path: str, rows: int) -> None:
    data, compression = f[path][:], f[path].compression
    del f[path]
    f.create_dataset(path, data=data, chunks=(rows, *data.shape[1:]), compression=compression)


def test_import_refuses_chunks_larger_than_a_shard_and_takes_smaller_ones(exported, tiny_store, tmp_path):
    """A file rechunked by another tool (h5repack, a copy with chunks=shape): each shard read decompressed whole chunks,
    so a file of one chunk per dataset took memory and time growing with the file (8,000 rows of 4,096 float32 logits, 32
    shards: 312 MB and 40 s against 84 MB and 3 s as exported). Chunks of at most a shard's rows cost at most a shard."""
    big = copy_of(exported, tmp_path / "one_chunk.h5")
    with h5py.File(big, "a") as f:
        rechunk(f, "targets/logits", 50)
    _, line = cli("import", big, tmp_path / "new.zarr")
    assert line == (f"Error: {str(big)!r}: dataset 'targets/logits' is chunked in 50 rows, more than a shard's 16 (FORMAT.md §16: "
                    "the store's inner chunk, 16 rows): each shard read would decompress whole chunks, memory and time growing "
                    "with the file; re-export it from the store (kdcache export STORE FILE) or rechunk it "
                    "(h5repack -l targets/logits:CHUNK=16x4)"), line
    assert not (tmp_path / "new.zarr").exists()
    small = copy_of(exported, tmp_path / "small_chunks.h5")
    with h5py.File(small, "a") as f:
        rechunk(f, "targets/logits", 5)  # straddles shards: read twice at most
    interop.import_hdf5(small, str(tmp_path / "back.zarr"))
    assert_same(tiny_store, str(tmp_path / "back.zarr"))


def test_import_overwrite_of_the_store_that_holds_the_file_is_refused(exported, tiny_store, tmp_path):
    """An old export kept inside the store folder (FORMAT.md §17 names it a stray), imported with --overwrite over that
    store: the store's removal deleted the file being imported (read on through its open handle, exit 0, file gone)."""
    store = copy_of(tiny_store, tmp_path / "s.zarr")
    source = copy_of(exported, store / "old.h5")
    before = snapshot(store)
    _, line = cli("import", source, store, "--overwrite")
    assert f"{str(source)!r} is inside the store {str(store)!r} that --overwrite replaces" in line, line
    assert f"move it out of the store folder first (e.g. to {str(tmp_path / 'old.h5')!r})" in line, line
    assert snapshot(store) == before and source.exists()
    source.rename(tmp_path / "old.h5")  # the fix named (a copy left in the folder: --overwrite refuses to delete it)
    assert CliRunner().invoke(main, ["import", str(tmp_path / "old.h5"), str(store), "--overwrite"]).exit_code == 0


# ------------------------------------------------------------------------------------- export, pack


@pytest.mark.parametrize("verb, name", [("export", "x.h5"), ("pack", "x.zarr.zip")])
def test_output_under_a_file(tiny_store, tmp_path, verb, name):
    (tmp_path / "afile").write_text("keep")
    _, line = cli(verb, tiny_store, tmp_path / "afile" / name)
    assert f"{tmp_path / 'afile'}' is a file, not a folder" in line and "choose another output path" in line, line
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("verb, name", [("export", "x.h5"), ("pack", "x.zarr.zip"), ("export", "sub/x.h5")])
def test_output_in_a_read_only_folder(tiny_store, tmp_path, verb, name):
    with read_only_dir(tmp_path / "ro") as ro:
        _, line = cli(verb, tiny_store, ro / name)
        assert f"cannot write '{ro / name}'" in line and "make the folder writable" in line, line
        assert list(ro.iterdir()) == []


def test_cleanup_never_masks_the_error(tiny_store, tmp_path, monkeypatch):
    """The write fails (disk full) and removing the partial file fails too: the write's error is reported."""
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def unlink(self, missing_ok=False):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(interop.zipfile, "ZipFile", full)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(StoreError, match=r"cannot write .*x.zarr.zip': No space left on device; free space and rerun"):
        interop.pack(tiny_store, tmp_path / "x.zarr.zip")


@pytest.mark.parametrize("verb, name, made, seen", [
    ("export", "data.h5", "hdf5", "an HDF5 file without the root attribute 'kdcache'"),
    ("export", "photos.zip", "zip", "a zip file without a kdcache store at its root"),
    ("export", "notes.txt", "text", "neither a zip nor an HDF5 file (it begins b'keep me')"),
    ("export", "t.zarr.zip", "pack", "a kdcache store's zip (kdcache pack's)"),
    ("pack", "photos.zip", "zip", "a zip file without a kdcache store at its root"),
    ("pack", "old.zarr.zip", "text", "neither a zip nor an HDF5 file (it begins b'keep me')"),
    ("pack", "locked.zip", "encrypted", "an encrypted zip file (written with a password)"),
    ("pack", "t.zarr.zip", "encrypted-pack", "an encrypted zip file (written with a password)"),
    ("export", "locked.zip", "encrypted", "an encrypted zip file (written with a password)"),
    ("pack", "old.zip", "deflate64", "a zip file without a kdcache store at its root"),
])
def test_pack_and_export_overwrite_only_a_file_of_their_own_kind(tiny_store, tmp_path, verb, name, made, seen):
    """pack --overwrite and export --overwrite replaced whatever OUT was, with no word: a user's dataset.h5, a zip of
    photos, notes, a packed store given to export (meaning pack). Such an OUT is refused in one line naming what it is,
    before anything is written; a file the same command wrote is replaced. An encrypted zip (zip -e; a packed store so
    zipped too: kdcache reads none) and a zip whose zarr.json is in a method zipfile cannot read (deflate64) were looked
    into as they were, a traceback (zipfile's RuntimeError "password required", its NotImplementedError)."""
    out = tmp_path / name
    if made == "hdf5":
        with h5py.File(out, "w") as f:
            f["x"] = np.arange(5)
    elif made == "zip":
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("a.jpg", b"a photo")
    elif made == "pack":
        interop.pack(tiny_store, out)
    elif made == "encrypted":  # as zip -P secret locked.zip zarr.json writes it
        with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
            z.writestr("zarr.json", json.dumps({"attributes": {}}))
        encrypted(tmp_path / "plain.zip", out)
        (tmp_path / "plain.zip").unlink()
    elif made == "encrypted-pack":
        interop.pack(tiny_store, tmp_path / "plain.zip")
        encrypted(tmp_path / "plain.zip", out)
        (tmp_path / "plain.zip").unlink()
    elif made == "deflate64":  # zarr.json's method (local header and central directory) set to deflate64 (9)
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("zarr.json", json.dumps({"attributes": {"kdcache": {}}}))
        data = bytearray(out.read_bytes())
        with zipfile.ZipFile(out) as z:
            data[z.start_dir + 10] = data[z.getinfo("zarr.json").header_offset + 8] = 9
        out.write_bytes(data)
        with zipfile.ZipFile(out) as z, pytest.raises(NotImplementedError):
            z.read("zarr.json")
    else:
        out.write_text("keep me")
    before = out.read_bytes()
    wrote = "a zip of a kdcache store" if verb == "pack" else "an HDF5 file with the root attribute 'kdcache'"
    code, line = cli(verb, tiny_store, out, "--overwrite")
    assert code == 1 and line == (f"Error: {str(out)!r} is {seen}, not a file kdcache {verb} writes ({wrote}); --overwrite replaces only "
                                  "such a file: choose another OUT or move that file away"), line
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [name]
    ours = tmp_path / ("ours.zarr.zip" if verb == "pack" else "ours.h5")
    for _ in range(2):  # its own file, replaced
        assert CliRunner().invoke(main, [verb, str(tiny_store), str(ours), "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("verb, name", [("pack", "out.zarr.zip"), ("export", "out.h5")])
def test_pack_and_export_overwrite_write_through_a_symlink_to_the_file_it_leads_to(tiny_store, tmp_path, verb, name):
    """OUT a symlink to an existing file (out.zarr.zip -> /big/disk/out.zarr.zip), --overwrite: the new file was renamed
    over the link, which became a regular file, and the file it led to was left as it was. The file it leads to (through
    a chain of relative links too) is replaced, its temporary file written beside it; the links are kept."""
    here, disk = tmp_path / "here", tmp_path / "disk"
    here.mkdir()
    disk.mkdir()
    (disk / name).write_bytes(b"")  # an empty file: nothing to lose, replaced
    (here / name).symlink_to(Path("..") / "disk" / name)
    (here / f"again.{name}").symlink_to(name)  # a link to that link
    for out in (here / name, here / f"again.{name}"):
        before = os.readlink(out)
        r = CliRunner().invoke(main, [verb, tiny_store, str(out), "--overwrite"])
        assert r.exit_code == 0, r.output
        assert out.is_symlink() and os.readlink(out) == before, out
        assert (disk / name).is_file() and not (disk / name).is_symlink() and (disk / name).stat().st_size > 0
        assert sorted(os.listdir(disk)) == [name] and sorted(os.listdir(here)) == sorted([name, f"again.{name}"])
        if verb == "pack":
            assert np.array_equal(open_store(str(out)).read("targets/logits", 0, 50), open_store(tiny_store).read("targets/logits", 0, 50))
        else:
            with h5py.File(disk / name, "r") as f:
                assert "kdcache" in f.attrs and f["targets/logits"].shape[0] == 50
        (disk / name).write_bytes(b"")


@pytest.mark.parametrize("verb, name", [("pack", "out.zarr.zip"), ("export", "out.h5")])
@pytest.mark.parametrize("linked", [False, True], ids=["fifo", "link-to-fifo"])
def test_pack_and_export_overwrite_of_a_special_file_is_refused(tiny_store, tmp_path, verb, name, linked):
    """A FIFO as OUT, --overwrite, was replaced by the file with no word, which --overwrite does only to a file of the
    command's own kind; written through a link, a link to /dev/null would have had the device replaced. Refused in one
    line naming what it is (and the link's target), the FIFO and the link kept."""
    fifo = tmp_path / ("pipe" if linked else name)
    os.mkfifo(fifo)
    out = tmp_path / name
    if linked:
        out.symlink_to(fifo)
    _, line = cli(verb, tiny_store, out, "--overwrite")
    what = f"a link to {str(fifo)!r}, a FIFO" if linked else "a FIFO"
    assert line == f"Error: {str(out)!r} is {what}, not a file kdcache {verb} writes; --overwrite replaces only such a file: choose another OUT", line
    assert stat.S_ISFIFO(os.stat(fifo, follow_symlinks=False).st_mode) and out.is_symlink() == linked
    assert sorted(os.listdir(tmp_path)) == sorted({name, fifo.name})


@pytest.mark.parametrize("name, suggested, packed", [("copy.zarr", "copy.h5", "copy.zarr.zip"), ("COPY.ZARR", "COPY.h5", "COPY.zarr.zip"),
                                                       ("new.zarr.zip", "new.h5", "new.zarr.zip"), ("x.zip", "x.h5", "x.zarr.zip")])
def test_export_to_a_name_of_a_store_is_refused(tiny_store, tmp_path, name, suggested, packed):
    """export STORE copy.zarr wrote its HDF5 file under a store's name, which info and train then refused ("an HDF5 file,
    not a store"); a new *.zip, read as a zip store by its name, too. Refused with the names to use, nothing written."""
    _, line = cli("export", tiny_store, tmp_path / name)
    assert line == (f"Error: OUT {str(tmp_path / name)!r} is named as a store, but kdcache export writes one HDF5 file: name it *.h5 "
                    f"(e.g. {str(tmp_path / suggested)!r}); a store in one file is what kdcache pack writes (kdcache pack STORE "
                    f"{packed}), and a copy of the store's folder is a store"), line
    assert os.listdir(tmp_path) == []


def test_export_over_the_zip_it_reads_is_refused(tiny_store, tmp_path):
    """export STORE.zarr.zip STORE.zarr.zip --overwrite replaced the store with the HDF5 file under the zip's name."""
    packed = tmp_path / "t.zarr.zip"
    interop.pack(tiny_store, packed)
    before = packed.read_bytes()
    code, line = cli("export", packed, packed, "--overwrite")
    assert code == 1 and f"OUT {str(packed)!r} is the store being exported" in line and "t.h5" in line, line
    assert packed.read_bytes() == before
    code, line = cli("export", f"zip::file://{packed}", packed, "--overwrite")  # the same zip through fsspec's chain
    assert f"OUT {str(packed)!r} is the store being exported" in line and packed.read_bytes() == before, line
    code, line = cli("export", tmp_path / "missing.zarr.zip", packed, "--overwrite")  # a mistyped STORE: no store, no traceback
    assert "missing.zarr.zip" in line and "Traceback" not in line and packed.read_bytes() == before, line


@pytest.fixture(scope="module")
def chunked_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny store with 2-row inner chunks of ``features.3`` (8 per shard). Read-only: copy it to change it."""
    return extract_tiny(tmp_path_factory.mktemp("stores") / "chunked.zarr", "extract.chunk_mb=0.004")


def flip(file: Path, at: int) -> None:
    """Flip one bit of byte ``at`` of ``file`` (negative: from its end)."""
    data = bytearray(file.read_bytes())
    data[at] ^= 0x10
    file.write_bytes(bytes(data))


def inner_chunk_offset(file: Path, slots: int, chunk: int) -> int:
    """Where inner chunk ``chunk`` of the shard object ``file`` (an index of ``slots`` entries) begins."""
    index = np.frombuffer(file.read_bytes()[-(16 * slots + 4):-4], dtype="<u8").reshape(slots, 2)
    return int(index[chunk, 0])


@pytest.mark.parametrize("where, what", [
    ("chunk", "array 'targets/layers/features.3' shard 1 (object 'targets/layers/features.3/c/1/0/0/0') inner chunk 2 "
              "(rows 20-21) fails its crc32c checksum"),
    ("index", "array 'targets/layers/features.3' shard 1 (object 'targets/layers/features.3/c/1/0/0/0'): its shard index "
              "fails its crc32c checksum"),
    ("cut", "array 'targets/layers/features.3' shard 1 (object 'targets/layers/features.3/c/1/0/0/0'): it holds 10 bytes, "
            "fewer than its shard index (132)"),  # cut short: a copy that stopped
])
def test_pack_refuses_a_done_shard_whose_checksums_fail_and_leaves_out_as_it_was(chunked_store, tiny_store, tmp_path, where, what):
    """pack copied a shard object's bytes unread: a byte flipped on disk or on the way (inside an inner chunk, or in the
    shard index) went into the zip without a word, to be found by whoever received it. Each object's shard index and
    inner chunks' crc32c are now checked as it is copied (never decoded): refused naming the array, shard, inner chunk
    and rows, leaving no zip and no temp file, and an existing OUT as it was."""
    store = copy_of(chunked_store, tmp_path / "s.zarr")
    shard = store / "targets/layers/features.3/c/1/0/0/0"
    if where == "cut":
        shard.write_bytes(shard.read_bytes()[:10])
    else:
        flip(shard, inner_chunk_offset(shard, 8, 2) + 5 if where == "chunk" else -20)
    out = tmp_path / "out" / "t.zarr.zip"
    out.parent.mkdir()
    interop.pack(tiny_store, out)  # an earlier zip (--overwrite replaces only a kdcache store's zip)
    earlier = out.read_bytes()
    _, line = cli("pack", store, out, "--overwrite")
    assert line == (f"Error: cannot pack {str(store)!r}: {what}, damaged on disk or on the way; re-extract the store or copy "
                    f"it again (kdcache verify {store} lists every damaged shard); nothing was written"), line
    assert sorted(out.parent.iterdir()) == [out] and out.read_bytes() == earlier
    with pytest.raises(StoreError, match=re.escape(what)):
        interop.pack(store, tmp_path / "new.zarr.zip")
    assert not (tmp_path / "new.zarr.zip").exists() and not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("entry, what", [
    ((0, 3), "inner chunk 5 is 3 bytes (at byte 0), fewer than its 4-byte crc32c"),
    ((None, 8), "inner chunk 5 lies at bytes {limit}+8, outside the object's {limit:,} bytes of chunks"),
], ids=["shorter-than-its-crc32c", "into-the-index"])
def test_pack_names_an_index_entry_that_cannot_be_an_inner_chunk(chunked_store, tmp_path, entry, what):
    """The last shard (rows 48-49 of 50: inner chunk 0 stored, 1-7 absent) whose index (its crc32c made to agree) gives
    inner chunk 5, past the array's end, 3 bytes, or bytes within the index itself: the first was said to lie "outside
    the object's … bytes of chunks" (it lies inside), and both named "rows 58-49", rows no array has."""
    from google_crc32c import value as crc32c

    store = copy_of(chunked_store, tmp_path / "s.zarr")
    shard = store / "targets/layers/features.3/c/3/0/0/0"
    raw = shard.read_bytes()
    limit = len(raw) - (16 * 8 + 4)
    index = np.frombuffer(raw[limit:-4], "<u8").reshape(8, 2).copy()
    index[5] = (limit if entry[0] is None else entry[0], entry[1])
    shard.write_bytes(raw[:limit] + index.tobytes() + crc32c(index.tobytes()).to_bytes(4, "little"))
    with pytest.raises(StoreError, match=re.escape("array 'targets/layers/features.3' shard 3 (object 'targets/layers/features.3/c/3/0/0/0') "
                                                   + what.format(limit=limit) + ", damaged on disk or on the way")):
        interop.pack(store, tmp_path / "t.zarr.zip")


@pytest.mark.parametrize("overrides, path", [
    (["targets.topk=2", "extract.chunk_mb=0.0001"], "targets/logits_indices"),  # int32 classes
    (["extract.compression=none", "extract.chunk_mb=0.0001"], "targets/logits"),  # inner chunks: bytes, then crc32c
], ids=["topk-classes", "uncompressed"])
def test_pack_checks_every_kind_of_store_and_takes_inner_chunks_in_any_order(tmp_path, overrides, path):
    """A top-k store's int32 classes and an uncompressed store (8-row inner chunks, 2 a shard) pack when
    intact, their inner chunks stored in any order (a writer other than zarr may), and are refused with a byte flipped."""
    from google_crc32c import value as crc32c

    store = Path(extract_tiny(tmp_path / "s.zarr", *overrides))
    shard = store / path / "c/1/0"
    raw = shard.read_bytes()
    index = np.frombuffer(raw[-36:-4], "<u8").reshape(2, 2).copy()  # 2 inner chunks of 8 rows per 16-row shard
    (o0, n0), (o1, n1) = index.tolist()
    index[:] = [(n1, n0), (0, n1)]  # the second inner chunk first
    shard.write_bytes(raw[o1 : o1 + n1] + raw[o0 : o0 + n0] + index.tobytes() + crc32c(index.tobytes()).to_bytes(4, "little"))
    interop.pack(store, tmp_path / "a.zarr.zip")
    np.testing.assert_array_equal(open_store(tmp_path / "a.zarr.zip").read(path, 0, 50), open_store(store).read(path, 0, 50))
    flip(shard, 2)
    with pytest.raises(StoreError, match=rf"array '{path}' shard 1 \(object '{path}/c/1/0'\) inner chunk 1 \(rows 24-31\) fails its crc32c"):
        interop.pack(store, tmp_path / "b.zarr.zip")


def test_pack_checks_an_added_array_whose_chunks_carry_crc32c_and_copies_others_as_they_are(tiny_store, tmp_path):
    """An array another tool added (FORMAT.md §14) is checked where its chunk objects have the format's shape (sharded, a
    crc32c index at the end, inner chunks ending in their crc32c), whatever its codecs before the crc32c; any other
    (no crc32c to check) is copied as it is. The fix a damaged one's error names is not re-extracting the store."""
    import zarr

    store = copy_of(tiny_store, tmp_path / "s.zarr")
    group = zarr.open_group(store, mode="r+")
    for name, compressors in (("checked", [zarr.codecs.GzipCodec(), zarr.codecs.Crc32cCodec()]), ("unchecked", [zarr.codecs.GzipCodec()])):
        group.create_array(f"extra/{name}", shape=(8, 6), shards=(4, 6), chunks=(2, 3), dtype="int32", compressors=compressors)[:] = 7
    flip(store / "extra/unchecked/c/1/0", 3)
    interop.pack(store, tmp_path / "a.zarr.zip")  # the unchecked array's damage is the receiver's to find
    flip(store / "extra/checked/c/1/0", 3)
    with pytest.raises(StoreError, match=r"^cannot pack .*: array 'extra/checked' shard 1 \(object 'extra/checked/c/1/0'\) "
                                         r"inner chunk 0 fails its crc32c checksum, damaged on disk or on the way; copy the store "
                                         r"again, or write the array again with the tool that added it \(kdcache verify"):
        interop.pack(store, tmp_path / "b.zarr.zip")  # not "re-extract the store": extract does not write that array


@pytest.mark.slow
def test_packs_checks_of_many_small_inner_chunks_cost_little_more_than_one_crc32c_call_each(tiny_store, tmp_path):
    """pack's checksum check took ~2.7 µs of Python per inner chunk (numpy slices and a loop over every range of each MiB
    copied): a store of 2**20 inner chunks of 20 bytes (47 MB) packed in 2.9 s, where the copy alone took 0.1 s. Ranges a
    block holds whole are now checked at once (one crc32c call each): within a few times the cost of that call alone.

    Both are timed in this process's CPU seconds: by the wall clock, a loaded machine that took the CPU away during the
    pack (and not the baseline) made it look 5x the baseline (1 in 6 runs beside other work)."""
    import time

    import google_crc32c
    import zarr

    store = copy_of(tiny_store, tmp_path / "s.zarr")
    rows, slots = 2**18, 2**16
    zarr.open_group(store, mode="r+").create_array("many", shape=(rows, 4), chunks=(1, 4), shards=(slots, 4), dtype="float32",
                                                   compressors=[zarr.codecs.Crc32cCodec()], fill_value=0)
    rng, objects = np.random.default_rng(0), []
    for shard in range(rows // slots):  # written as zarr writes them (its own write takes a minute): 16 bytes and their crc32c each
        bodies = [rng.bytes(16) for _ in range(slots)]
        index = np.stack([np.arange(slots) * 20, np.full(slots, 20)], axis=1).astype("<u8").tobytes()
        objects.append(b"".join(b + google_crc32c.value(b).to_bytes(4, "little") for b in bodies)
                       + index + google_crc32c.value(index).to_bytes(4, "little"))
        (store / f"many/c/{shard}/0").parent.mkdir(parents=True, exist_ok=True)
        (store / f"many/c/{shard}/0").write_bytes(objects[-1])
    assert zarr.open_array(store / "many")[slots + 1].tobytes() == objects[1][20:36]  # zarr reads them
    # the least any check of each inner chunk costs in Python: one crc32c call per inner chunk over its bytes, timed in the
    # same round as a pack, the best round's ratio kept: a CI round at load 9 gave a pack 1.9x its quiet time against a
    # baseline at its quiet one when each was the best of three of its own (pack 3.1-3.4x the baseline here, 13x before)
    spans = [np.frombuffer(raw[-(16 * 2**16 + 4):-4], "<u8").reshape(-1, 2).tolist() for raw in objects]
    out, ratios = tmp_path / "t.zarr.zip", []
    for _ in range(3):
        started = time.process_time()
        for raw, index in zip(objects, spans):
            data = np.frombuffer(raw, np.uint8)
            [google_crc32c.value(data[o : o + n - 4]) for o, n in index]
        baseline = time.process_time() - started
        out.unlink(missing_ok=True)
        started = time.process_time()
        interop.pack(store, out)  # the tiny store's own objects: ~0.02 s
        ratios.append((time.process_time() - started) / baseline)
    assert min(ratios) < 6, ratios


@pytest.mark.parametrize("verb, name", [("export", "zarr.json"), ("export", "sub/t.h5"), ("pack", "t.zarr.zip")])
def test_output_inside_the_store_it_reads_is_refused(tiny_store, tmp_path, verb, name):
    """export STORE STORE/zarr.json --overwrite replaced the store's manifest with the HDF5 file (the store no longer
    opened); an OUT anywhere in the store folder would become one of its objects: refused, --overwrite or not."""
    store = tmp_path / "t.zarr"
    shutil.copytree(tiny_store, store)
    before = snapshot(store)
    code, line = cli(verb, store, store / name, "--overwrite")
    assert f"OUT {str(store / name)!r} is inside the store {str(store)!r}" in line and "outside the store folder" in line, line
    assert snapshot(store) == before


def test_export_onto_a_full_disk_is_one_line_not_a_crash(tiny_store, tmp_path):
    """A write that fails (here EFBIG, past RLIMIT_FSIZE, as ENOSPC on a full disk) left HDF5 unable to close the file,
    whose every flush failed: the process crashed (a segmentation fault, exit 139) after printing its one-line error."""
    import resource
    import subprocess
    import sys

    out = tmp_path / "x.h5"
    interop.export_hdf5(tiny_store, out, compression="none")  # an earlier export (--overwrite replaces only kdcache's)
    old = out.read_bytes()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))  # the export is about 120 KB

    r = subprocess.run([sys.executable, "-m", "kdcache", "export", tiny_store, str(out), "--overwrite"],
                       capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert r.returncode == 1 and r.stderr == f"Error: cannot write {str(out)!r}: File too large; lift the file size limit (ulimit -f; " \
        "or the file system's largest file, 4 GiB on FAT32) and rerun (nothing was written)\n", (r.returncode, r.stderr)
    assert out.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def test_export_overwrite_failure_keeps_the_old_file(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "x.h5"
    interop.export_hdf5(tiny_store, out, compression="none")
    old = out.read_bytes()
    monkeypatch.setattr(interop.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    _, line = cli("export", tiny_store, out, "--overwrite")
    assert "free space" in line, line
    assert out.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


# ------------------------------------------------------------------------------------------- demo


def test_demo_keeps_a_summary_json_that_is_not_an_earlier_demos(tmp_path):
    """demo --out . in a project folder replaced the project's summary.json with its own once its runs ended, with no
    word. An --out holding a summary.json that is not an earlier demo's is refused before anything is made; an earlier
    demo's is not (its stores and students are replaced too)."""
    (tmp_path / "summary.json").write_text('{"results": [1, 2]}')
    _, line = cli("demo", "--out", tmp_path)
    assert line == (f"Error: {str(tmp_path / 'summary.json')!r} is not an earlier kdcache demo's summary (no 'gap_closed' and "
                    "'students'), and the demo writes its own there; choose another --out for kdcache demo (or move that file away)"), line
    assert (tmp_path / "summary.json").read_text() == '{"results": [1, 2]}' and os.listdir(tmp_path) == ["summary.json"]
    from kdcache.demo import _refuse_foreign_summary

    (tmp_path / "summary.json").write_text(json.dumps({"gap_closed": 0.5, "students": {}}))
    _refuse_foreign_summary(tmp_path / "summary.json")  # an earlier demo's: replaced


def test_demo_keeps_stores_and_student_folders_that_are_not_an_earlier_demos(tmp_path, tiny_store):
    """demo --out replaced its teacher-train.zarr / teacher-test.zarr and trained into student-A/B/C with --overwrite
    without checking they were its own: a user's store of another teacher (their extract into --out .) was deleted, and a
    user's folder named student-A had its pipeline.json replaced and a run's files mixed in. Each is refused in one line
    before anything is made, unchanged; an earlier demo's are replaced (the same tiny demo run twice)."""
    out = tmp_path / "demo"
    out.mkdir()
    shutil.copytree(tiny_store, out / "teacher-test.zarr")  # the tiny teacher's, not the demo's
    before = snapshot(out)
    _, line = cli("demo", "--out", out)
    assert line.startswith(f"Error: {str(out / 'teacher-test.zarr')!r} is not an earlier kdcache demo's store (its teacher.factory is "
                           "'tiny.py:teacher', the demo's "), line
    assert line.endswith("and the demo extracts its teacher there; choose another --out for kdcache demo (or move that store away)")
    assert snapshot(out) == before
    shutil.rmtree(out / "teacher-test.zarr")
    (out / "student-A").mkdir()
    (out / "student-A" / "pipeline.json").write_text('{"mine": 1}')
    (out / "student-C").write_text("a file")
    before = snapshot(out)
    _, line = cli("demo", "--out", out)
    assert line == (f"Error: {str(out / 'student-A')!r} is not an earlier kdcache demo's student (a folder without a demo student's "
                    "pipeline.json), and the demo trains student A there; choose another --out for kdcache demo (or move it away)"), line
    assert snapshot(out) == before
    shutil.rmtree(out / "student-A")
    _, line = cli("demo", "--out", out)
    assert line.startswith(f"Error: {str(out / 'student-C')!r} is not an earlier kdcache demo's student (a file), "), line
    (out / "student-C").unlink()

    fixtures = Path(TINY_TOML).parent
    (tmp_path / "big.py").write_text(  # student A trains on a subset of 1,000
        f"import sys\nsys.path.insert(0, {str(fixtures)!r})\nimport tiny\n\n\ndef dataset(split='train'):\n"
        "    return tiny.TinyImages(split, n=1024)\n")
    tiny = ["--no-progress", "--set", f"teacher.factory={fixtures / 'tiny.py'}:teacher", "--set", f"data.factory={tmp_path / 'big.py'}:dataset",
            "--set", f"student.factory={fixtures / 'tiny.py'}:student", "--set", 'targets.layers=["features.3"]', "--set", "train.steps=2",
            "--set", "extract.device=cpu", "--set", "train.device=cpu"]
    for _ in range(2):  # the second replaces the first's stores and students
        result = CliRunner().invoke(main, ["demo", "--out", str(out), *tiny])
        assert result.exit_code == 0, result.output[-3000:]
    assert sorted(os.listdir(out)) == ["student-A", "student-B", "student-C", "summary.json", "teacher-test.zarr", "teacher-train.zarr"]


def test_a_broken_symlink_where_the_demo_trains_a_student_is_named_as_one(tmp_path):
    """A dangling symlink student-A in --out was refused as "a file"; it is named a broken symlink, with its target."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "student-A").symlink_to(tmp_path / "gone")
    _, line = cli("demo", "--out", out)
    assert line == (f"Error: {str(out / 'student-A')!r} is not an earlier kdcache demo's student (a broken symlink, to "
                    f"{str(tmp_path / 'gone')!r}, which does not exist), and the demo trains student A there; choose another --out "
                    "for kdcache demo (or move it away)"), line
    assert os.listdir(out) == ["student-A"] and os.readlink(out / "student-A") == str(tmp_path / "gone")


def test_an_earlier_demos_store_made_with_other_values_is_named_as_one(tmp_path):
    """A demo run again into the --out of an earlier demo made with other --set teacher.factory/data.factory values: its
    stores are refused (the demo would replace them), as before, but the line said they were "not an earlier kdcache
    demo's store". It says they are one, made with other values, names each that differs (the store's, this demo's)
    and the fixes: another --out, or that store removed. A store of the user's own keeps its line (the test above)."""
    fixtures = Path(TINY_TOML).parent
    (tmp_path / "big.py").write_text(  # student A trains on a subset of 1,000
        f"import sys\nsys.path.insert(0, {str(fixtures)!r})\nimport tiny\n\n\ndef dataset(split='train'):\n"
        "    return tiny.TinyImages(split, n=1024)\n")
    out = tmp_path / "demo"
    tiny = ["--no-progress", "--set", f"teacher.factory={fixtures / 'tiny.py'}:teacher", "--set", f"data.factory={tmp_path / 'big.py'}:dataset",
            "--set", f"student.factory={fixtures / 'tiny.py'}:student", "--set", 'targets.layers=["features.3"]', "--set", "train.steps=2",
            "--set", "extract.device=cpu", "--set", "train.device=cpu"]
    result = CliRunner().invoke(main, ["demo", "--out", str(out), *tiny])
    assert result.exit_code == 0, result.output[-3000:]
    before = snapshot(out)
    _, line = cli("demo", "--out", out)  # MNIST's teacher and data, the demo's own
    assert line == (f"Error: {str(out / 'teacher-train.zarr')!r} is an earlier kdcache demo's store, made with other values (its "
                    f"teacher.factory is '{fixtures / 'tiny.py'}:teacher', this demo's 'mnist.py:teacher'; its data.factory is "
                    f"'{tmp_path / 'big.py'}:dataset', this demo's 'mnist.py:dataset'), and this demo extracts its teacher there; choose "
                    f"another --out for kdcache demo, or remove that store to run this demo in {str(out)!r} (the earlier demo's students "
                    "and summary there are replaced too)"), line
    _, line = cli("demo", "--out", out, *tiny[:3])  # the earlier demo's teacher: its data.factory alone differs, and is named
    assert f"(its data.factory is '{tmp_path / 'big.py'}:dataset', this demo's 'mnist.py:dataset'), and this demo" in line, line
    assert snapshot(out) == before


def test_demo_out_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("keep")
    for out in ("afile", "afile/sub"):
        _, line = cli("demo", "--out", tmp_path / out)
        assert "is a file, not a folder; choose another --out" in line, line
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("override, match", [
    ("train.epochs=abc", "train.epochs must be a whole number >= 1, got 'abc'"),
    ("train.lr=0", "train.lr must be > 0"),  # train's own check, once only after both extracts
    ("train.loss.temperature=0", "train.loss.temperature must be at least"),
    # a value the demo sets itself for each student or extract (was silently overridden: the table described its own)
    ("train.subset=100", "demo --set train.subset=100: the demo sets train.subset itself (yours: train.subset = 100), for each of its extracts and students"),
    ("train={subset=100}", "demo --set train={subset=100}: the demo sets train.subset itself (yours: train.subset = 100)"),
    ("train.loss.kl=0.5", "demo --set train.loss.kl=0.5: the demo sets train.loss.kl itself"),
    ("data.split=test", "demo --set data.split=test: the demo sets data.split itself (yours: data.split = 'test')"),
    ("train.eval_cache=x.zarr", "demo --set train.eval_cache=x.zarr: the demo sets train.eval_cache itself"),
    # the students measure the test store: another split was refused only after both extracts had run
    ("train.eval_split=val", "demo --set train.eval_split=val: the demo sets train.eval_split itself"),
    # named with the value mnist.toml has: A and C still trained with kl = 0 and the eval split stayed the demo's
    ("train.loss.kl=1", "demo --set train.loss.kl=1: the demo sets train.loss.kl itself (yours: train.loss.kl = 1.0)"),
    ("train.eval_split=test", "demo --set train.eval_split=test: the demo sets train.eval_split itself"),
    # a table naming them, with the file's values (kl = 1 was overridden with 0 for A and C, silently): named as given
    ("train.loss={kl=1.0, ce=0.0}", "demo --set train.loss={kl=1.0, ce=0.0}: the demo sets train.loss.kl itself"),
    ("train={loss={ce=0.0}}", "demo --set train={loss={ce=0.0}}: the demo sets train.loss.ce itself"),
])
def test_demo_values_are_checked_before_anything_is_made(tmp_path, monkeypatch, override, match):
    monkeypatch.setattr(kdcache, "extract", lambda *a, **k: pytest.fail("extract ran before the values were checked"))
    _, line = cli("demo", "--out", tmp_path / "ddd", "--set", override)
    assert match in line, line
    assert not (tmp_path / "ddd").exists()


def test_demo_refuses_a_dataset_smaller_than_its_label_budget_before_extracting(tmp_path, monkeypatch):
    """--set data.factory= a dataset of fewer items than student A's 1,000 labeled images (train.subset, the demo's
    own): "train.subset = 1000 exceeds the 50 rows available" came once both extracts had run (minutes, at MNIST's
    size). Its length is checked before anything is extracted or made."""
    monkeypatch.setattr(kdcache, "extract", lambda *a, **k: pytest.fail("extract ran before the dataset's length was checked"))
    tiny = Path(TINY_TOML).parent / "tiny.py"
    _, line = cli("demo", "--out", tmp_path / "ddd", "--set", f"teacher.factory={tiny}:teacher", "--set", f"data.factory={tiny}:dataset",
                  "--set", f"student.factory={tiny}:student", "--set", 'targets.layers=["features.3"]')
    assert line == (f"Error: demo --set data.factory={tiny}:dataset: its train split has 50 items, fewer than the 1,000 labeled images "
                    "student A trains on (train.subset, which the demo sets itself); pass a data.factory of at least 1,000 training "
                    "items, or run kdcache extract and kdcache train with your values"), line
    assert not (tmp_path / "ddd").exists()


@pytest.mark.parametrize("env, says", [
    ({"WORLD_SIZE": "x"}, "Error: the environment variable WORLD_SIZE='x' is not a whole number >= 1; torchrun sets RANK, WORLD_SIZE,"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "Error: kdcache demo runs in one process, but the environment variable WORLD_SIZE=2 asks for 2 "
                                       "(torchrun's); run kdcache demo without torchrun, with RANK, WORLD_SIZE, LOCAL_RANK, "
                                       "LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT unset"),
], ids=["not-a-count", "two-ranks"])
def test_demo_refuses_torchrun_s_environment_before_extracting(tmp_path, monkeypatch, env, says):
    """torchrun's variables set by hand or left over from an export: the demo's extracts (one-process ones) ran whole,
    minutes at MNIST's size, and only its first student's train read them (WORLD_SIZE=x refused there; WORLD_SIZE=2
    with MASTER_ADDR and MASTER_PORT set waited for a rank 1 that never came). Refused before anything is made. A tiny
    teacher and a dataset of 1,024 items stand in for MNIST's (--set), so the old code's extracts take seconds."""
    fixtures = Path(TINY_TOML).parent
    (tmp_path / "big.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('tiny_fixture', {str(fixtures / 'tiny.py')!r})\n"
        "tiny = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(tiny)\n\n\n"
        "def dataset(split='train'):\n    return tiny.TinyImages(split, n=1024)\n")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "ddd"
    _, line = cli("demo", "--out", out, "--no-progress", "--set", f"teacher.factory={fixtures / 'tiny.py'}:teacher",
                  "--set", f"data.factory={tmp_path / 'big.py'}:dataset", "--set", f"student.factory={fixtures / 'tiny.py'}:student",
                  "--set", 'targets.layers=["features.3"]', "--set", "train.steps=4", "--set", "train.batch_size=8",
                  "--set", "extract.device=cpu", "--set", "train.device=cpu")
    assert line.startswith(says), line
    assert not out.exists()


def test_demo_read_only_out(tmp_path, monkeypatch):
    monkeypatch.setattr(kdcache, "extract", lambda *a, **k: pytest.fail("extract ran"))
    with read_only_dir(tmp_path / "ro") as ro:
        _, line = cli("demo", "--out", ro / "d")
        assert f"cannot create the folder --out '{ro / 'd'}'" in line and "make the folder writable" in line, line


def test_demo_valid_values_reach_the_extract(tmp_path, monkeypatch):
    class Reached(Exception):
        pass

    def extract(pipeline, out, **kwargs):
        assert Path(out).parent.is_dir()
        raise Reached

    monkeypatch.setattr(kdcache, "extract", extract)
    with pytest.raises(Reached):
        demo(tmp_path / "d", echo=lambda s: None)
