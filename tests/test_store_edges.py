"""Edges of the store layer that the format documents: the ``.zarr.zip`` ``kdcache pack`` writes (FORMAT.md §17)
and the refusal of layer names that differ only in case (§6)."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import zarr

from kdcache.errors import PipelineError, StoreError
from kdcache.interop import pack
from kdcache.store import DONE, check_layer_names, open_store


def test_packed_zip_layout(tiny_store: str, tmp_path: Path) -> None:
    """§17: store keys at the zip root, in sorted order (the root zarr.json last), ZIP_STORED, bytes identical to
    the folder's objects; it opens with zarr.storage.ZipStore, not by passing its path to zarr.open_group."""
    out = tmp_path / "t.zarr.zip"
    pack(tiny_store, out)
    root = Path(tiny_store)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    with zipfile.ZipFile(out) as z:
        members = z.infolist()
        assert [m.filename for m in members] == files and members[-1].filename == "zarr.json"
        assert {m.compress_type for m in members} == {zipfile.ZIP_STORED}
        assert all(z.read(m) == (root / m.filename).read_bytes() for m in members)
    group = zarr.open_group(zarr.storage.ZipStore(out, mode="r"), mode="r", zarr_format=3)
    assert group.attrs["kdcache"] == open_store(tiny_store).manifest
    with pytest.raises(FileNotFoundError):  # zarr takes a plain path as a folder: GroupNotFoundError
        zarr.open_group(str(out), mode="r")


@pytest.mark.parametrize("names, clash", [
    (["Conv", "conv"], ("Conv", "conv")),
    (["a", "block.Attn", "b", "block.attn"], ("block.Attn", "block.attn")),
    (["Ä", "ä"], None),  # percent-encoded as %C3%84 / %C3%A4: distinct on any file system
    (["x", "y", "x"], None),  # one name twice is not a collision between two layers
])
def test_layer_names_differing_only_in_case_are_refused(names: list[str], clash: tuple[str, str] | None) -> None:
    if clash is None:
        check_layer_names(names)
        return
    with pytest.raises(PipelineError, match=f"layer names '{clash[0]}' and '{clash[1]}' differ only in case"):
        check_layer_names(names)


def test_overwrite_never_replaces_a_zarr_group_that_is_not_a_kdcache_store(tmp_path: Path, monkeypatch) -> None:
    """--overwrite replaces a kdcache store only: someone else's zarr group (no kdcache manifest) is refused, and
    without --overwrite it is named as such, never as a store this very process is still creating."""
    import kdcache
    from kdcache.errors import StoreError
    from reference import make_pipeline

    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("precious", shape=(3,), dtype="int8")[:] = [1, 2, 3]
    with pytest.raises(StoreError, match="is a zarr group but not a kdcache store .*overwrite=True replaces only a kdcache store"):
        kdcache.extract(make_pipeline(), str(foreign), overwrite=True)
    with pytest.raises(StoreError) as e:
        kdcache.extract(make_pipeline(), str(foreign))
    assert "is a zarr group but not a kdcache store" in str(e.value) and "being created" not in str(e.value)
    assert zarr.open_group(str(foreign), mode="r")["precious"][:].tolist() == [1, 2, 3]


def test_overwrite_replaces_what_is_left_of_a_store_whose_deletion_was_stopped(tiny_store: str, tmp_path: Path) -> None:
    """zarr deletes the store an --overwrite replaces recursively, in directory order: killed there, it can leave chunks
    and metadata without the root zarr.json. Such a folder was "exists and is not a kdcache store" even with --overwrite
    (the advertised recovery failed). Only kdcache's nodes, chunks, their temp files and folders: --overwrite replaces
    it and a run without it says so; one file (or link) of anything else keeps it refused, with --overwrite too."""
    from click.testing import CliRunner

    from conftest import TINY_TOML
    from kdcache.cli import main
    from reference import read_store, without_times

    def remains(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(tiny_store, out)
        (out / "zarr.json").unlink()
        (out / "samples/index/c/1").unlink()
        shutil.rmtree(out / "targets/logits")
        (out / "progress/done/c/.2.4242.tmp").write_bytes(b"\0")  # a killed writer's temp files: ours, zarr's
        (out / "samples/label/c/0.0123456789abcdef0123456789abcdef.partial").write_bytes(b"\0")
        (out / "targets/layers/features.3/c/3/0/0").mkdir(exist_ok=True)
        return out

    def extract(out: Path, *more: str):
        return CliRunner().invoke(main, ["extract", str(TINY_TOML), "--out", str(out), *more])

    out = remains("g.zarr")
    r = extract(out)
    assert r.exit_code == 1 and r.output.startswith(f"Error: '{out}' holds what is left of a kdcache store whose deletion was stopped") \
        and "pass --overwrite to replace it" in r.output and len(r.output.splitlines()) == 1, r.output
    assert (out / "samples/index/c/0").is_file()  # nothing deleted
    r = extract(out, "--overwrite")
    assert r.exit_code == 0, r.output
    (got_manifest, got), (want_manifest, want) = read_store(out), read_store(tiny_store)
    assert without_times(got_manifest) == without_times(want_manifest) and got.keys() == want.keys()
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]

    # anything else in it: never deleted
    for i, (extra, make) in enumerate([("notes.txt", lambda p: p.write_text("keep me")),
                                       ("samples/index/c/1.bak", lambda p: p.write_text("keep me")),
                                       ("targets/layers/features.3/zarr.json.orig", lambda p: p.write_text("keep me")),
                                       ("photos", lambda p: p.mkdir()),  # even an empty folder not of the layout
                                       ("targets/layers/x", lambda p: p.symlink_to(tiny_store))]):
        out = remains(f"other{i}.zarr")
        make(out / extra)
        r = extract(out, "--overwrite")
        assert r.exit_code == 1 and r.output.strip() == f"Error: '{out}' exists and is not a kdcache store; choose another --out or " \
            "remove it", (extra, r.output)
        assert (out / extra).is_symlink() or (out / extra).exists() and (out / "samples/index/c/0").is_file(), extra
    assert open_store(tiny_store).complete  # a link was never followed


def test_a_corrupted_zip_member_is_a_verify_failure_and_a_one_line_error(tiny_store: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kdcache.cli import main
    from kdcache.verify import verify

    out = tmp_path / "t.zarr.zip"
    pack(tiny_store, out)
    member = "targets/logits/c/1/0"
    with zipfile.ZipFile(out) as z:
        info = z.getinfo(member)
    raw = bytearray(out.read_bytes())
    data_at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # past the local file header
    raw[data_at + 5] ^= 0xFF
    out.write_bytes(bytes(raw))
    report = verify(str(out))
    assert not report["ok"]
    problems = [line for check in report["checks"] for line in check["problems"]]
    assert any(f"shard 1 object {member!r} is a corrupted zip member (its bytes fail the zip's CRC-32)" in line for line in problems), problems
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output and "corrupted zip member" in r.output, r.output


@pytest.mark.parametrize("member", ["zarr.json", "samples/zarr.json", "targets/logits/zarr.json"])
@pytest.mark.parametrize("command", ["info", "verify", "train"])
def test_a_corrupted_metadata_member_of_a_zip_is_one_line(tiny_store: str, tmp_path: Path, member: str, command: str) -> None:
    """A zarr.json member whose bytes fail the zip's CRC-32 (a bit flipped in transfer) was zipfile's traceback."""
    from click.testing import CliRunner

    from conftest import TINY_TOML
    from kdcache.cli import main

    out = tmp_path / "t.zarr.zip"
    pack(tiny_store, out)
    with zipfile.ZipFile(out) as z:
        info = z.getinfo(member)
    raw = bytearray(out.read_bytes())
    raw[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2] ^= 0x01  # in the JSON
    out.write_bytes(bytes(raw))
    args = {"train": ["train", str(TINY_TOML), "--cache", str(out), "--out", str(tmp_path / "run")]}.get(command, [command, str(out)])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = [line for line in r.output.splitlines() if "corrupted zip member" in line]
    assert len(lines) == 1 and f"Bad CRC-32 for file {member!r} (a corrupted zip member)" in lines[0], r.output
    assert "pack the store again or copy the zip again" in lines[0], r.output


@pytest.mark.parametrize("member", ["targets/logits/zarr.json", "progress/digest/zarr.json"])
def test_verify_json_reports_a_corrupted_array_metadata_member_of_a_zip(tiny_store: str, tmp_path: Path, member: str) -> None:
    """verify --json of a zip whose array zarr.json member fails its CRC-32 is a report whose layout check names it:
    it was an Error line, no JSON, telling the user to run kdcache verify."""
    from click.testing import CliRunner

    from kdcache.cli import main

    out = tmp_path / "t.zarr.zip"
    pack(tiny_store, out)
    with zipfile.ZipFile(out) as z:
        info = z.getinfo(member)
    raw = bytearray(out.read_bytes())
    raw[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2] ^= 0x01
    out.write_bytes(bytes(raw))
    r = CliRunner().invoke(main, ["verify", str(out), "--json"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    report = json.loads(r.stdout)
    layout = next(c for c in report["checks"] if c["name"] == "layout")
    assert not report["ok"] and not layout["ok"], report
    assert layout["problems"][0].startswith(member.rsplit("/", 1)[0] + ": "), layout
    assert f"Bad CRC-32 for file {member!r} (a corrupted zip member)" in layout["problems"][0], layout


def test_teacher_check_reads_stored_rows_with_the_damage_checks(tiny_store: str, tmp_path: Path) -> None:
    """verify --teacher-check compares the teacher with stored rows read as training reads them: a missing shard is
    named, never compared as zeros."""
    import shutil

    from click.testing import CliRunner

    from conftest import TINY_TOML
    from kdcache.cli import main

    store = tmp_path / "t.zarr"
    shutil.copytree(tiny_store, store)
    for shard in (store / "targets/logits/c").iterdir():
        (shard / "0").unlink()
    (store / "samples/fingerprint/c/1").unlink()  # the fingerprints compared with the dataset's, too
    r = CliRunner().invoke(main, ["verify", str(store), "--teacher-check", "50", "--pipeline", str(TINY_TOML)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "the stored rows of targets/logits cannot be compared: " in r.output and "shard 0 of targets/logits" in r.output, r.output
    assert "the stored rows of samples/fingerprint cannot be compared: " in r.output, r.output
    assert "values beyond tolerance" not in r.output, r.output  # zeros were compared with the teacher's logits


@pytest.mark.parametrize("verb", ["pack", "export"])
def test_pack_and_export_refuse_a_url_as_out(tiny_store: str, tmp_path: Path, monkeypatch, verb: str) -> None:
    from click.testing import CliRunner

    from kdcache.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, [verb, tiny_store, f"s3://bucket/x.{'zarr.zip' if verb == 'pack' else 'h5'}"])
    assert r.exit_code == 1 and "is a URL; pack and export write a local file" in r.output, r.output
    assert list(tmp_path.iterdir()) == []  # no folder named 's3:'


@pytest.mark.parametrize("mode", ["w", "a", "rw", "w-"])
def test_open_store_refuses_a_mode_other_than_reading_it(tiny_store: str, tmp_path: Path, mode: str) -> None:
    """``open_store(path, mode="w")`` (meant: writable) passed zarr's "w" on, which deleted every array and the manifest of
    the store before kdcache saw it was no longer a kdcache store; "rw" was an AssertionError from zarr's internals."""
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    before = sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))
    with pytest.raises(StoreError, match=rf"^mode must be 'r' \(read only\) or 'r\+' \(read and write an existing store\), got '{mode}'"):
        open_store(store, mode=mode)
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*")) == before and open_store(store).complete
    assert open_store(store, mode="r+").complete


@pytest.mark.parametrize(("path", "start", "stop", "message"), [
    ("logits", 0, 4, "'logits' is not a data array of .*; read one of 'samples/index', .*'targets/logits'.* store.targets\\[name\\].path"),
    ("progress/done", 0, 1, "'progress/done' is not a data array of"),
    ("targets/logits", -3, 50, "rows -3:50 of 'targets/logits' are not within the 50 samples of .*; read rows start:stop with 0 <= start <= stop <= 50"),
    ("targets/logits", 0, 51, "rows 0:51 of 'targets/logits' are not within the 50 samples"),
    ("targets/logits", 5, 2, "rows 5:2 of 'targets/logits' are not within"),
    ("targets/logits", 0.0, 4.0, "^start must be an integer row, got float 0.0; read rows start:stop with integers 0 <= start <= stop <= 50$"),
    ("targets/logits", 0, "4", "^stop must be an integer row, got str '4'"),
    ("targets/logits", None, 4, "^start must be an integer row, got NoneType None"),
    ("targets/logits", False, True, "^start must be an integer row, got bool False"),
    (None, 0, 4, "^None is not a data array of"),
], ids=["target-name", "progress-array", "negative-start", "stop-past-the-end", "start-after-stop", "floats", "a-string", "none",
        "bools", "no-path"])
def test_read_refuses_a_path_or_rows_outside_the_store(tiny_store: str, path: str, start: int, stop: int, message: str) -> None:
    """Store.read (the README's Python API) names the argument that was wrong: not a damaged store ('missing the array',
    'shard -1 ... missing'), and not numpy's IndexError or TypeError (floats), nor True read as row 1."""
    import numpy as np

    store = open_store(tiny_store)
    with pytest.raises(StoreError, match=message):
        store.read(path, start, stop)
    assert store.read("targets/logits", 48, 50).shape == (2, 4) and store.read("samples/index", 3, 3).shape == (0,)
    assert store.read("targets/logits", np.int64(48), np.uint8(50)).shape == (2, 4)  # numpy integers are rows


@pytest.mark.parametrize("path", ["logits", "nope", None, ["targets/logits"]])
def test_array_refuses_a_path_that_is_not_an_array_of_the_store(tiny_store: str, path) -> None:
    """Store.array("nope") blamed the store ("is missing the array 'nope' its manifest lists (deleted, or an incomplete
    copy)"), None or a list raised Python's TypeError: a path the store has no array at is named as the caller's."""
    store = open_store(tiny_store)
    with pytest.raises(StoreError, match=rf"^{re.escape(repr(path))} is not an array of .*; open one of 'samples/index', .*'progress/done', "
                                         r"'progress/digest' \(a target's array is store.targets\[name\].path\)$"):
        store.array(path)
    assert store.array("progress/done").shape == (4,) and store.array("targets/logits").shape == (50, 4)


def test_read_refuses_rows_of_a_shard_not_done(tiny_store: str, tmp_path: Path) -> None:
    """FORMAT.md §7: the rows of a shard not done are not data. Store.read read them as zeros (the fill value) from a store
    still being extracted; now it names the shard, and reads it once a writer has marked it done since the first read."""
    location = tmp_path / "partial.zarr"
    shutil.copytree(tiny_store, location)
    zarr.open_group(location, mode="r+")[DONE][1] = False  # rows 16..31: as a running extract leaves them
    store = open_store(str(location))
    assert store.read("targets/logits", 0, 16).shape == (16, 4)
    for start, stop in [(16, 32), (10, 20), (0, 50)]:
        with pytest.raises(StoreError, match=rf"rows {start}:{stop} of 'targets/logits' include shard 1 \(rows 16-31\), which is not "
                                             r"done: .* is incomplete \(3/4 shards done\).*store.done\(\)"):
            store.read("targets/logits", start, stop)
    assert store.read("targets/logits", 0, 50, pending=True).shape == (50, 4)  # the caller keeps the done rows only
    zarr.open_group(location, mode="r+")[DONE][1] = True  # the writer finished it
    assert (store.read("targets/logits", 16, 32) == open_store(tiny_store).read("targets/logits", 16, 32)).all()


def test_the_done_snapshot_of_a_store_opened_for_writing_is_its_markers_now(tiny_store: str, tmp_path: Path) -> None:
    """done_snapshot() is the markers a read-only Store's reads check rows against, read once; a Store opened for
    writing (mode "r+") writes shards itself, so its done_snapshot() is the markers as they are now, read anew: kept,
    a shard it wrote since would stay not done in it (a reader made from the writer's Store would leave it out)."""
    location = tmp_path / "writing.zarr"
    shutil.copytree(tiny_store, location)
    zarr.open_group(location, mode="r+")[DONE][3] = False  # shard 3 (rows 48-49) still to be written
    writer, reader = open_store(str(location), mode="r+"), open_store(str(location))
    assert writer.done_snapshot().tolist() == reader.done_snapshot().tolist() == [True, True, True, False]
    source = open_store(tiny_store)
    writer.write_shard(3, {path: source.read(path, 48, 50) for path in writer.paths()})
    assert writer.done_snapshot().tolist() == [True] * 4  # its own shard, written since
    assert reader.done_snapshot().tolist() == [True, True, True, False]  # a reader's: the markers its reads were checked against


def test_a_folders_sizes_count_regular_files_and_links_to_them_alone(tmp_path):
    """info's bytes on disk (store._local_sizes, an os.walk: 2.3x rglob's speed at 24,000 files): a regular file's size,
    a link to one counted as its target, a folder linked to not walked, and a dangling link, a link loop or a FIFO left
    out, as Path.rglob + is_file counted them."""
    import os

    from kdcache.store import _local_sizes

    (tmp_path / "a").mkdir()
    (tmp_path / "a/f").write_bytes(b"123")
    (tmp_path / "g").write_bytes(b"1")
    os.symlink(tmp_path / "a", tmp_path / "linked_folder")
    os.symlink(tmp_path / "g", tmp_path / "linked_file")
    os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.mkfifo(tmp_path / "fifo")
    assert _local_sizes(tmp_path) == {"a/f": 3, "g": 1, "linked_file": 1}
