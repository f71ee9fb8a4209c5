"""Tests for ``kdcache extract`` / ``kdcache info``: click's CliRunner, and real subprocesses where a process must die."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.store import open_store
from reference import FIXTURES, file_bytes, mtimes, read_store, signal_and_wait, slow_extract, without_times, write_toml

TINY = FIXTURES / "tiny.toml"
KDCACHE = Path(sys.executable).with_name("kdcache")  # the console script of this environment


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(output: str, match: str) -> None:
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert match in lines[0], lines[0]


def crash_at(tmp_path: Path, zoo_env, index: int, toml: Path, name: str = "partial.zarr") -> Path:
    """A partial store made by the CLI: the dataset raises fetching ``index``."""
    out = tmp_path / name
    zoo_env(FAIL_AT=index)
    result = invoke("extract", toml, "--out", out)
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.output, f"the dataset raised RuntimeError: simulated crash fetching index {index} (at extract_zoo.py:")
    zoo_env(FAIL_AT=None)
    return out


# ----------------------------------------------------------------------------------- happy paths


def test_extract_then_info(tmp_path):
    out = tmp_path / "tiny.zarr"
    result = invoke("extract", TINY, "--out", out)
    assert result.exit_code == 0, result.output
    assert "50/50 samples, 4/4 shards of 16 rows  complete" in result.stdout
    assert "features.3" in result.stdout and "(50, 16, 8, 8)" in result.stdout and "float16" in result.stdout

    result = invoke("info", out)
    assert result.exit_code == 0 and "tiny.py:teacher" in result.stdout and "complete" in result.stdout


def test_extract_json_is_the_info_of_the_store_and_the_shards_it_wrote(tmp_path):
    out = tmp_path / "tiny.zarr"
    result = invoke("extract", TINY, "--out", out, "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["complete"] is True and printed["samples_done"] == 50 and printed.pop("shards_written") == 4
    info = json.loads(invoke("info", out, "--json").stdout)
    assert {k: v for k, v in printed.items() if k != "bytes_stored"} == {k: v for k, v in info.items() if k != "bytes_stored"}
    assert json.loads(invoke("extract", TINY, "--out", out, "--json").stdout)["shards_written"] == 0


def test_shortcut_options_and_set(tmp_path):
    out = tmp_path / "tiny.zarr"
    result = invoke("extract", TINY, "--out", out, "--layers", "features.1, pool", "--batch-size", "5", "--device", "cpu",
                    "--set", "targets.dtype=float32", "--set", "extract.rows_per_shard=32", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert list(info["targets"]) == ["logits", "features.1", "pool"]
    assert info["targets"]["pool"] == {"path": "targets/layers/pool", "shape": [50, 16, 1, 1], "dtype": "float32", "source": "pool", "select": "tensor"}
    assert info["rows_per_shard"] == 32 and info["num_shards"] == 2
    manifest, _ = read_store(out)
    assert manifest["pipeline"]["extract"]["batch_size"] == 5 and manifest["pipeline"]["targets"]["layers"] == ["features.1", "pool"]


def test_progress_bar_goes_to_stderr(tmp_path):
    result = invoke("extract", TINY, "--out", tmp_path / "s.zarr", "--progress")
    assert result.exit_code == 0
    assert "extract 50/50" in result.stderr and "samples/s" in result.stderr
    assert "extract 50/50" not in result.stdout


def test_a_progress_field_is_read_only_when_the_line_is_drawn():
    """train's bar shows the step's loss, a tensor on the training device: reading it (float) waits for the device
    to finish the step, so it is read when the line is drawn (every 0.5 s, and at the end), not at every step."""
    import io

    from kdcache.progress import Progress

    class Value:
        reads = 0

        def __float__(self) -> float:
            Value.reads += 1
            return 0.25

    stream = io.StringIO()
    bar = Progress(100, "epoch 0", enabled=True, stream=stream, every=3600)
    for _ in range(100):
        bar.update(1, loss=Value())
    assert Value.reads == 2 and stream.getvalue().count("loss 0.25") == 2  # the first line and the last


# ----------------------------------------------------------------------------------- info --json


def check_info_schema(info: dict, *, complete: bool, samples_done: int) -> None:
    assert info["format_version"] == 1 and isinstance(info["format_version"], int)
    assert info["format"] == "kdcache-store"
    assert info["num_samples"] == 50 and isinstance(info["num_samples"], int)
    assert info["complete"] is complete
    assert info["samples_done"] == samples_done and isinstance(info["samples_done"], int)
    assert info["num_shards"] == 4 and info["rows_per_shard"] == 16 and info["shards_done"] == -(-samples_done // 16)
    assert (info["completed"] is not None) == complete
    assert set(info["targets"]) == {"logits", "conv", "fc"}
    for name, target in info["targets"].items():
        assert isinstance(target["path"], str) and isinstance(target["dtype"], str)
        assert isinstance(target["shape"], list) and all(isinstance(d, int) for d in target["shape"])
        assert target["shape"][0] == 50
    assert info["targets"]["conv"] == {"path": "targets/layers/conv", "shape": [50, 3, 4, 4], "dtype": "float16", "source": "conv", "select": "tensor"}
    assert info["targets"]["logits"]["path"] == "targets/logits" and info["targets"]["fc"]["shape"] == [50, 6]
    assert info["has_labels"] is True and info["shard_digests"] is True
    assert info["writer"] is None  # no extract running on it
    assert len(info["teacher"]["weights_sha256"]) == 64 and info["dataset"]["length"] == 50


def test_info_s_size_line_says_what_each_figure_covers(tmp_path, zoo_env, tiny_store):
    """"12.7 KB stored, 2.1 KB raw, compression 1.20x" on a tiny store: the ratio is the done rows' data alone, decoded
    over stored, while "stored" counted the metadata too. The line names the data's stored bytes and the rest."""
    from kdcache.cli import _size

    partial = crash_at(tmp_path, zoo_env, 36, write_toml(tmp_path / "p.toml"))
    for location, rest in [(tiny_store, "metadata"), (partial, "metadata, shards not done")]:
        store = open_store(location)
        i = store.info()
        data = i["bytes_raw"] / i["compression_ratio"]
        assert data == pytest.approx(sum((Path(location) / store.shard_key(path, int(shard))).stat().st_size
                                         for path in store.paths() for shard in np.flatnonzero(store.done())))
        line = next(line for line in invoke("info", location).stdout.splitlines() if line.startswith("size"))
        assert line == (f"size        {_size(i['bytes_stored'])} stored in all: the done rows' data {_size(round(data))} "
                        f"({_size(i['bytes_raw'])} decoded, compression {i['compression_ratio']:.2f}x), the rest ({rest}) "
                        f"{_size(round(i['bytes_stored'] - data))}"), line


def test_info_json_schema_on_complete_and_partial_stores(tmp_path, zoo_env):
    toml = write_toml(tmp_path / "p.toml")
    partial = crash_at(tmp_path, zoo_env, 36, toml)
    result = invoke("info", partial, "--json")
    assert result.exit_code == 0, result.output
    check_info_schema(json.loads(result.stdout), complete=False, samples_done=32)
    text = invoke("info", partial).stdout
    assert "32/50 samples, 2/4 shards" in text and "INCOMPLETE (re-run extract to resume)" in text

    resumed = invoke("extract", toml, "--out", partial)
    assert resumed.exit_code == 0
    assert f"resumed {partial}: 2 of 4 shards were already done; this run wrote the others" in resumed.stderr, resumed.stderr
    check_info_schema(json.loads(invoke("info", partial, "--json").stdout), complete=True, samples_done=50)


def test_info_compression_ratio_is_of_the_done_rows_and_the_done_shards_objects(tiny_store, tmp_path):
    """compression_ratio compares the done rows decoded with the stored bytes of the done shards' objects: it counted the
    metadata, and the objects of shards not done (being written, or left by a killed writer: here shards 2 and 3 unmarked),
    against the done rows alone (a quarter of the ratio here). bytes_stored stays everything on disk."""
    import shutil

    from kdcache.interop import pack

    store = tmp_path / "partial.zarr"
    shutil.copytree(tiny_store, store)
    for shard in (2, 3):
        (store / "progress/done/c" / str(shard)).unlink()
    s = open_store(str(store))
    objects = {p: [store / s.shard_key(p, shard) for shard in (0, 1)] for p in s.paths()}
    packed = sum(f.stat().st_size for files in objects.values() for f in files)
    info = json.loads(invoke("info", store, "--json").stdout)
    assert info["samples_done"] == 32 and info["bytes_raw"] == s.nbytes_raw(32)
    assert info["compression_ratio"] == pytest.approx(info["bytes_raw"] / packed)
    assert info["bytes_stored"] == sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert f"compression {info['bytes_raw'] / packed:.2f}x" in invoke("info", store).stdout
    # a zip's members: the same objects
    zipped = tmp_path / "whole.zip"
    pack(tiny_store, str(zipped))
    whole = open_store(tiny_store)
    packed = sum((Path(tiny_store) / whole.shard_key(p, shard)).stat().st_size for p in whole.paths() for shard in range(4))
    assert open_store(str(zipped)).info()["compression_ratio"] == pytest.approx(whole.nbytes_raw() / packed)
    assert whole.info()["compression_ratio"] == pytest.approx(whole.nbytes_raw() / packed)


# ----------------------------------------------------------------------------------- dry run


def test_counts_of_one_are_singular(tmp_path):
    """A store of one shard: the dry run said "geometry    1 shards of 64 rows", info "1/1 shards", verify "1 shards x 5 arrays"."""
    one = ("--set", "extract.rows_per_shard=64")
    dry = invoke("extract", TINY, "--dry-run", *one)
    assert dry.exit_code == 0, dry.output
    assert "geometry    1 shard of 64 rows\n" in dry.stdout, dry.stdout
    out = tmp_path / "one.zarr"
    made = invoke("extract", TINY, "--out", out, *one)
    assert made.exit_code == 0, made.output
    assert "50/50 samples, 1/1 shard of 64 rows  complete" in made.stdout, made.stdout
    checked = invoke("verify", out)
    assert checked.exit_code == 0, checked.output
    assert "1/1 shard done" in checked.stdout and "1 shard x 5 arrays" in checked.stdout, checked.stdout


def test_dry_run_prints_shapes_and_bytes_and_writes_nothing(tmp_path):
    out = tmp_path / "never.zarr"
    result = invoke("extract", TINY, "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not out.exists()
    text = result.stdout
    assert "(50, 4)" in text and "(50, 16, 8, 8)" in text
    assert "8 B/sample" in text and "2,048 B/sample" in text  # float16: 4 * 2, 16 * 8 * 8 * 2
    assert "per sample  2,080 B (with index, fingerprint, label)" in text and "4 shards of 16 rows" in text
    unlabeled = invoke("extract", TINY, "--dry-run", "--set", "data.factory=extract_zoo.py:images", "--set", "data.split=unlabeled",
                       "--set", "targets.layers=[]", "--set", "targets.dtype=float32")
    assert "per sample  32 B (with index, fingerprint)\n" in unlabeled.stdout, unlabeled.output  # no label array: 16 + 8 + 8

    result = invoke("extract", TINY, "--dry-run", "--json", "--set", "targets.dtype=float32")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["targets"]["logits"] == {"path": "targets/logits", "shape": [50, 4], "dtype": "float32", "source": "",
                                           "select": "tensor", "bytes_per_sample": 16}
    assert report["targets"]["features.3"]["bytes_per_sample"] == 4096
    assert report["bytes_per_sample"] == 16 + 4096 + 24 and report["estimated_bytes_raw"] == 50 * (16 + 4096 + 24)
    assert report["estimated_compression_ratio"] > 1 and report["estimated_bytes"] < report["estimated_bytes_raw"]
    assert report["num_samples"] == 50 and report["probe_batch"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert report["warnings"] == []

    # a feature the student would distil from a layer this extract does not store: said before the extract, not after
    result = invoke("extract", TINY, "--dry-run", "--layers", "features.0")
    assert result.exit_code == 0, result.output
    assert ("warning     train.features names 'features.3', which targets.layers does not list: kdcache train would refuse "
            "this store; add it to targets.layers (or --layers)") in result.stdout, result.stdout
    # the loss weights' needs too (train.setup refuses such a store): logits left out for kl, no labels for ce
    result = invoke("extract", TINY, "--dry-run", "--set", "targets.logits=false")
    assert result.exit_code == 0, result.output
    assert ("warning     train.loss.kl/mse need stored logits, which targets.logits = false leaves out: kdcache train would "
            "refuse this store; set targets.logits = true (or those weights to 0)") in result.stdout, result.stdout
    assert "train.loss.ce" not in result.stdout  # tiny's items are labeled
    result = invoke("extract", TINY, "--dry-run", "--set", "data.factory=extract_zoo.py:images", "--set", "data.split=unlabeled",
                    "--set", "targets.layers=[]", "--set", "train.features={}")
    assert result.exit_code == 0, result.output
    assert "warning     train.loss.ce needs labels, which this dataset's items do not have" in result.stdout, result.stdout
    assert "train.loss.kl" not in result.stdout


def listing(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``root`` and ``root`` itself: a file's bytes (None: a folder) and mtime in ns (a folder's changes
    where an entry is made in it, a lock file made and removed again too)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in [root, *sorted(root.rglob("*"))]}


@pytest.mark.parametrize("kind, flags, says", [
    ("zip", [], "new.zarr.zip': a zip store is write-once and opened read-only; extract to a folder or an object store"),
    ("occupied", [], "notes' exists and is not a kdcache store; choose another --out or remove it"),
    ("training-run", [], "run' is a training run's folder (kdcache train --out), not a kdcache store; choose another --out"),
    ("inside-a-store", [], "is inside the store"),
    ("others", ["--overwrite"], "holds 1 entry besides its store, which --overwrite would delete with it: 'NOTES.md'"),
    ("being-written", [], "s.zarr' is being written by kdcache pid"),
    ("under-a-file", [], "afile/.x.zarr.kdcache-lock': File exists; choose an --out whose parent"),
    ("read-only", [], "ro/.s.zarr.kdcache-lock': "),
    ("another-teacher", [], "s.zarr' was made with different teacher weights (teacher.weights_sha256: store has '"),
    ("another-dataset-order", [], "s.zarr' was made from another dataset than data.factory's now: its done row"),
])
def test_the_dry_run_refuses_an_out_the_run_would_refuse_in_its_words_and_writes_nothing(tmp_path, zoo_env, monkeypatch, kind,
                                                                                             flags, says):
    """``extract --dry-run --out X`` looked at nothing of X ("writes nothing, whatever --out names"): a zip, a folder of
    other files or a training run's, a store of another teacher or of the dataset in another order, a location under a
    file or on a read-only mount, a store another job is writing: all "fine", the real run refused at once. The dry run
    makes the run's checks on X, in its order, and refuses with its line and exit code; nothing under the folder is
    made, changed or locked (a lock file made and removed again changes its folder's mtime)."""
    from kdcache import locking
    from reference import mount_to_make_read_only

    monkeypatch.setattr(locking, "LOOK_TRIES", 4)  # the holder below keeps the lock throughout: told in 0.15 s, not 1 s
    toml = write_toml(tmp_path / "p.toml")
    out = {"zip": tmp_path / "new.zarr.zip", "occupied": tmp_path / "notes", "training-run": tmp_path / "run",
           "inside-a-store": tmp_path / "s.zarr" / "targets" / "x.zarr", "under-a-file": tmp_path / "afile" / "x.zarr",
           "read-only": tmp_path / "ro" / "s.zarr"}.get(kind, tmp_path / "s.zarr")
    with contextlib.ExitStack() as stack:
        if kind == "occupied":
            out.mkdir()
            (out / "notes.md").write_text("keep")
        elif kind == "training-run":  # what kdcache train --out leaves (pipeline.json marks it)
            out.mkdir()
            (out / "pipeline.json").write_text("{}")
            (out / "student.pt").write_bytes(b"weights")
        elif kind in ("inside-a-store", "others", "being-written", "another-teacher"):
            assert invoke("extract", toml, "--out", tmp_path / "s.zarr").exit_code == 0
            if kind == "others":
                (out / "NOTES.md").write_text("keep")
            if kind == "being-written":
                stack.enter_context(locking.writer_lock(out))
            if kind == "another-teacher":
                zoo_env(SEED=5)
        elif kind == "another-dataset-order":
            crash_at(tmp_path, zoo_env, 36, toml, "s.zarr")  # shards 0 and 1 done
            zoo_env(REVERSE_MIDDLE=1)  # items 0 and N-1 (the manifest's) kept: the done rows tell
        elif kind == "under-a-file":
            (tmp_path / "afile").write_text("keep")
        elif kind == "read-only":
            stack.enter_context(mount_to_make_read_only(out.parent))()
        before = listing(tmp_path)
        dry = invoke("extract", toml, "--out", out, "--dry-run", *flags)
        assert dry.exit_code == 1, dry.output
        assert_one_line_error(dry.output, says)
        assert listing(tmp_path) == before
        run = invoke("extract", toml, "--out", out, *flags)
        assert run.exit_code == 1 and run.output == dry.output, (run.output, dry.output)
        if kind != "being-written":  # its holder's lock file is there
            assert not list(tmp_path.rglob("*.kdcache-lock"))


def test_the_dry_run_says_what_the_run_would_do_at_out_and_writes_nothing(tmp_path, zoo_env):
    """``extract --dry-run --out X`` said nothing of X. It says what the run would do there, found by the run's own checks,
    writing nothing (no folder made, not even X's missing parent, nor a lock file); the run then does what it said."""
    toml = write_toml(tmp_path / "p.toml")

    def dry(out: Path, *flags: str) -> tuple[str, dict]:
        before = listing(tmp_path)
        said = invoke("extract", toml, "--out", out, "--dry-run", *flags)
        assert said.exit_code == 0, said.output
        report = json.loads(invoke("extract", toml, "--out", out, "--dry-run", "--json", *flags).stdout)
        assert listing(tmp_path) == before
        assert said.stdout.splitlines()[-1].startswith("out         "), said.stdout
        return said.stdout.splitlines()[-1].removeprefix("out         "), report["out"]

    new = tmp_path / "runs" / "new.zarr"
    line, out = dry(new)
    assert line == f"{str(new)!r} is new: would be created (4 shards)", line
    assert out == {"location": str(new), "action": "create", "again": False, "shards_done": 0, "num_shards": 4, "redone": 0}
    assert not (tmp_path / "runs").exists()

    partial = crash_at(tmp_path, zoo_env, 36, toml)  # shards 0 and 1 done
    line, out = dry(partial)
    assert line == f"{str(partial)!r} holds a partial store of this pipeline: would resume it, 2 of 4 shards done", line
    assert out["action"] == "resume" and (out["shards_done"], out["num_shards"]) == (2, 4)
    (partial / "targets" / "logits" / "c" / "1" / "0").unlink()  # shard 1 marked done, one of its objects gone
    line, _ = dry(partial)
    assert line == (f"{str(partial)!r} holds a partial store of this pipeline: would resume it, 1 of 4 shards done; 1 shard marked "
                    "done misses objects, written again"), line
    run = invoke("extract", toml, "--out", partial)
    assert run.exit_code == 0 and f"resumed {partial}: 1 of 4 shards was already done" in run.stderr, run.output

    line, out = dry(partial)
    assert line == f"{str(partial)!r} holds this pipeline's complete store: nothing to do", line
    assert out["action"] == "complete" and out["shards_done"] == 4
    line, out = dry(partial, "--overwrite")
    assert line == f"{str(partial)!r} holds a kdcache store: --overwrite would replace it (4 shards, written afresh)", line
    assert out["action"] == "replace"
    assert json.loads(invoke("extract", toml, "--dry-run", "--json").stdout)["out"] is None  # no --out: nothing said of one


# ----------------------------------------------------------------------------------- existing stores


def test_a_resume_another_resume_finished_meanwhile_says_the_store_was_already_complete(tmp_path, zoo_env):
    """Two resumes of one partial store at once, the second taking the writer lock only once the first has finished it
    (held here while it builds its teacher): both said "resumed …: 2 of 4 shards were already done; this run wrote the
    others", counted before the lock. The second wrote nothing, and says the store was already complete."""
    toml = write_toml(tmp_path / "p.toml")
    partial = crash_at(tmp_path, zoo_env, 36, toml)  # shards 0 and 1 done
    hold = tmp_path / "hold"
    hold.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")} | {"ZOO_BUILD_HOLD": str(hold)}
    second = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "extract", str(toml), "--out", str(partial), "--no-progress"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240  # 60 s, and on: a loaded box's second (torch imported) came after the first had run
    while not Path(f"{hold}.waiting").exists():
        assert second.poll() is None and time.monotonic() < deadline, second.communicate()[1] if second.poll() is not None else "not held in 240 s"
        time.sleep(0.02)
    first = invoke("extract", toml, "--out", partial)
    hold.unlink()
    assert first.exit_code == 0 and f"resumed {partial}: 2 of 4 shards were already done; this run wrote the others" in first.stderr
    said = second.communicate(timeout=120)[1]
    assert second.returncode == 0, said
    assert said == f"{partial} is already complete (50 samples); nothing to do (--overwrite to redo it)\n", said


@pytest.mark.parametrize("other, named", [("run/student.pt", "'run/'"), ("NOTES.md", "'NOTES.md'"), (".git/HEAD", "'.git/'"),
                                          ("targets/notes.txt", "'targets/notes.txt'"), ("old.zarr", "'old.zarr/' (a kdcache store)"),
                                          ("mine.zarr", "'mine.zarr/'"), ("targets/extra", "'targets/extra/'"),
                                          ("2024.06", "'2024.06'"), ("samples/7/1", "'samples/7/'"), ("run/", "'run/'"),
                                          ("samples/7/", "'samples/7/'")])
def test_overwrite_of_a_store_folder_that_holds_other_files_is_refused_naming_them(tmp_path, tiny_store, other, named):
    """zarr's mode="w" deleted the store's folder whole: a training run put inside it, notes, a .git, another store,
    someone's zarr group or an array another tool added (FORMAT.md §14; zarr.json and chunk keys below a node were all
    taken for the store's; so were chunk-key names below a group, which has no chunks: a user's ``2024.06``,
    ``samples/7/1``). An --overwrite of a folder holding entries that are not its store's is refused before
    anything is deleted, naming them; moved out, the store is replaced. An empty folder (a run's --out made ahead) was
    left out of the list, and deleted with the store: it is named too (the store's own empty folders are not: see
    test_an_overwrite_deletes_the_store_s_own_empty_folders_unnamed)."""
    import shutil

    import zarr

    out = tmp_path / "tiny.zarr"
    assert invoke("extract", TINY, "--out", out).exit_code == 0
    if other == "old.zarr":
        shutil.copytree(tiny_store, out / other)
    elif other == "mine.zarr":
        zarr.open_group(str(out / other), mode="w", zarr_format=3).create_array("x", data=np.arange(4))  # someone's data
    elif other == "targets/extra":
        zarr.open_group(str(out), mode="r+").create_array(other, data=np.arange(4))
    elif other.endswith("/"):
        (out / other).mkdir(parents=True)
    else:
        (out / other).parent.mkdir(parents=True, exist_ok=True)
        (out / other).write_text("keep me")
    before = file_bytes(out)
    result = invoke("extract", TINY, "--out", out, "--overwrite")
    assert_one_line_error(result.output, f"{str(out)!r} holds 1 entry besides its store, which --overwrite would delete with it: {named}; "
                                         "move it out of the folder (or delete it), or choose another --out")
    assert file_bytes(out) == before and (out / other).exists()
    shutil.move(out / named.split("'")[1], tmp_path / "moved")  # the entry named (a file moved out of .git/ leaves .git/)
    assert invoke("extract", TINY, "--out", out, "--overwrite").exit_code == 0 and (tmp_path / "moved").exists()


def test_an_overwrite_deletes_the_store_s_own_empty_folders_unnamed(tmp_path):
    """Empty folders are named by an --overwrite's refusal (a user's), but not the store's own: a chunk folder of one of
    its arrays (as a write killed before its chunk left it), or a node's folder whose zarr.json was not written yet."""
    out = tmp_path / "tiny.zarr"
    assert invoke("extract", TINY, "--out", out).exit_code == 0
    (out / "targets" / "logits" / "c" / "9" / "0").mkdir(parents=True)
    (out / "targets" / "layers" / "features.9").mkdir()
    result = invoke("extract", TINY, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "targets" / "logits" / "c" / "9").exists() and open_store(str(out)).complete


def test_a_store_in_the_working_folder_is_made_and_replaced_keeping_the_folder(tmp_path, monkeypatch):
    """zarr clears a new store's folder (and an --overwrite's) with rmtree of the folder itself, made again after:
    ``extract --out .`` failed (EINVAL: the working folder cannot be removed) saying "shards already done are kept", and
    with --overwrite after the store inside was deleted; elsewhere the folder made again lost its mode (a team's
    shared folder's setgid and group bits) and the working folder of a shell in it. The folder is emptied, not deleted:
    both work, and it keeps its inode and mode."""
    folder = tmp_path / "here"
    folder.mkdir()
    folder.chmod(0o2770)
    before = folder.stat()
    monkeypatch.chdir(folder)
    for extra in ([], ["--overwrite"]):
        result = invoke("extract", TINY, "--out", ".", *extra)
        assert result.exit_code == 0, result.output
        assert (folder.stat().st_ino, folder.stat().st_mode) == (before.st_ino, before.st_mode)
    assert open_store(".").complete


def test_a_path_through_dotdot_is_not_taken_for_one_inside_the_store_it_passes(tmp_path, monkeypatch):
    """Whether --out lies inside a store was told from its folders as spelled: ``--out ../t2.zarr`` run in a store's
    folder took the working folder (the store) for one above it, and ``t.zarr/../t3.zarr`` took ``t.zarr``; extract and
    train refused both as inside that store, their fix from inside it ('t2.zarr', 'run') a path inside it again. The
    path is placed as the OS places it: both are made beside the store; one truly inside it is still refused, named."""
    store = tmp_path / "t.zarr"
    assert invoke("extract", TINY, "--out", store).exit_code == 0
    monkeypatch.chdir(store)
    result = invoke("extract", TINY, "--out", "../t2.zarr")
    assert result.exit_code == 0, result.output
    result = invoke("train", TINY, "--cache", ".", "--out", "../run", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    inside = invoke("extract", TINY, "--out", "sub.zarr")
    assert_one_line_error(inside.output, f"'sub.zarr' is inside the store {str(store)!r}")
    monkeypatch.chdir(tmp_path)
    result = invoke("extract", TINY, "--out", "t.zarr/../t3.zarr")
    assert result.exit_code == 0, result.output
    assert all(open_store(str(tmp_path / name)).complete for name in ("t2.zarr", "t3.zarr"))
    assert (tmp_path / "run" / "student.pt").is_file() and not (store / "sub.zarr").exists()


def test_a_store_or_run_inside_someone_else_s_zarr_group_is_not_taken_for_one_inside_a_store(tmp_path):
    """Any folder holding a zarr.json above --out was taken for a store: ``extract --out proj.zarr/kd.zarr`` and ``train
    --out proj.zarr/run`` in a project's own zarr hierarchy were refused as "inside the store 'proj.zarr'", whose
    --overwrite and pack they would hinder, but kdcache neither replaces nor packs someone else's group. Only a kdcache
    store above counts: inside one (its targets group too), the store is still named."""
    import zarr

    project = tmp_path / "proj.zarr"
    zarr.open_group(str(project), mode="w", zarr_format=3).attrs["project"] = "mine"
    result = invoke("extract", TINY, "--out", project / "kd.zarr")
    assert result.exit_code == 0, result.output
    result = invoke("train", TINY, "--cache", project / "kd.zarr", "--out", project / "run", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert open_store(str(project / "kd.zarr")).complete and (project / "run" / "student.pt").is_file()
    inside = invoke("extract", TINY, "--out", project / "kd.zarr" / "targets" / "x.zarr")
    assert_one_line_error(inside.output, f"is inside the store {str(project / 'kd.zarr')!r}")
    assert json.loads((project / "zarr.json").read_text())["attributes"] == {"project": "mine"}


@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["one-process", "workers"])
@pytest.mark.parametrize("kind, flags, says", [
    ("others", ["--overwrite"], "holds 1 entry besides its store, which --overwrite would delete with it: 'NOTES.md'"),
    ("foreign", ["--overwrite"], "is a zarr group but not a kdcache store"),
    ("foreign", [], "is a zarr group but not a kdcache store (no 'kdcache' root attribute); choose another --out or remove it"),
    ("occupied", [], "exists and is not a kdcache store")])
def test_what_is_at_out_is_refused_before_the_teacher_is_built(tmp_path, zoo_env, workers, kind, flags, says):
    """A teacher may take minutes to build (weights of many GB): what is refused from --out and the flags alone (an
    --overwrite of a folder holding other files or of someone else's zarr group, an OUT holding what is not a store) was
    refused only once it was built. It is refused first: the teacher's build (which would leave HOLD.waiting) never starts."""
    import zarr

    toml, out = write_toml(tmp_path / "p.toml"), tmp_path / "s.zarr"
    if kind == "others":
        assert invoke("extract", toml, "--out", out).exit_code == 0
        (out / "NOTES.md").write_text("keep me")
    elif kind == "foreign":
        zarr.open_group(str(out), mode="w", zarr_format=3).create_array("x", data=np.arange(4))  # someone's data
    else:
        out.mkdir()
        (out / "data.csv").write_text("1,2\n")
    before = file_bytes(out)
    zoo_env(BUILD_HOLD=tmp_path / "hold")  # no such file: a teacher's build goes on at once, leaving hold.waiting
    result = invoke("extract", toml, "--out", out, *flags, *workers)
    assert_one_line_error(result.output, says)
    assert not (tmp_path / "hold.waiting").exists() and file_bytes(out) == before


@pytest.mark.parametrize("flags", [[], ["--overwrite"]], ids=["resume", "overwrite"])
@pytest.mark.parametrize("kind", ["group", "array"])
def test_a_zarr_node_without_chunks_at_out_is_not_taken_for_an_interrupted_creation(tmp_path, kind, flags):
    """A creation killed before its manifest leaves a root group without attributes and kdcache's nodes' metadata, and
    is created again, --overwrite or not. Someone's group without children but with attributes of its own, or a zarr
    array none of whose chunks was written (all its fill value: zarr writes none), was taken for one and replaced with
    or without --overwrite, its attributes and metadata lost. Both are refused, unchanged; an empty group is created over."""
    import shutil

    import zarr

    out = tmp_path / "s.zarr"
    if kind == "group":
        zarr.open_group(str(out), mode="w", zarr_format=3, attributes={"project": "mine"})
    else:
        zarr.create_array(str(out), shape=(100,), dtype="int32", fill_value=0, zarr_format=3, attributes={"units": "m"})
    before = file_bytes(out)
    result = invoke("extract", TINY, "--out", out, *flags)
    assert_one_line_error(result.output, f"{str(out)!r} is a zarr {kind} but not a kdcache store (no 'kdcache' root attribute); "
                                         f"{'--overwrite replaces only a kdcache store: ' if flags else ''}choose another --out or remove it")
    assert file_bytes(out) == before
    shutil.rmtree(out)
    zarr.open_group(str(out), mode="w", zarr_format=3)  # as a creation killed at once leaves it
    assert invoke("extract", TINY, "--out", out, *flags).exit_code == 0 and open_store(str(out)).complete


def _with_leftovers(store: Path) -> None:
    """A killed writer's temp files (ours, zarr's), a file system's folder record, an empty chunk folder."""
    (store / "targets" / "logits" / "c" / "1" / ".0.4242.tmp").write_bytes(b"half")
    (store / f"zarr.{'0' * 32}.partial").write_text("{")
    (store / ".DS_Store").write_bytes(b"\0")
    (store / "samples" / "index" / "c" / "9").mkdir(parents=True)


@pytest.mark.parametrize("kind", ["leftovers", "partial", "damaged", "kdcache-0.1.6"])
def test_overwrite_still_replaces_a_store_of_every_kind(tmp_path, zoo_env, kind):
    """What --overwrite must go on replacing: a store with a killed writer's temp files, a partial one, a damaged one, one
    kdcache 0.1.6 wrote."""
    import shutil

    out = tmp_path / "s.zarr"
    if kind == "partial":
        out = crash_at(tmp_path, zoo_env, 36, write_toml(tmp_path / "p.toml"), "s.zarr")
    elif kind == "kdcache-0.1.6":
        shutil.copytree(FIXTURES / "stores" / "spans-0.1.6.zarr", out)
    else:
        assert invoke("extract", TINY, "--out", out).exit_code == 0
        _with_leftovers(out) if kind == "leftovers" else (out / "targets" / "logits" / "c" / "2" / "0").write_bytes(b"")
    result = invoke("extract", TINY, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert open_store(str(out)).complete and not (out / ".DS_Store").exists()


def test_complete_store_is_left_alone_and_overwrite_redoes_it(tmp_path):
    out = tmp_path / "tiny.zarr"
    assert invoke("extract", TINY, "--out", out).exit_code == 0
    before = mtimes(out)
    created = read_store(out)[0]["created"]
    time.sleep(0.01)

    result = invoke("extract", TINY, "--out", out)
    assert result.exit_code == 0
    assert "is already complete (50 samples); nothing to do (--overwrite to redo it)" in result.stderr
    assert mtimes(out) == before

    result = invoke("extract", TINY, "--out", out, "--overwrite", "--set", "extract.rows_per_shard=32")
    assert result.exit_code == 0, result.output
    after = mtimes(out)
    assert all(after[f] != before[f] for f in after if f in before)
    manifest, arrays = read_store(out)
    assert manifest["geometry"]["rows_per_shard"] == 32 and arrays["progress/done"].tolist() == [True, True]
    assert manifest["created"] >= created


def test_partial_store_with_another_teacher_is_refused_then_overwritten(tmp_path, zoo_env):
    toml = write_toml(tmp_path / "p.toml")
    partial = crash_at(tmp_path, zoo_env, 20, toml)
    before = mtimes(partial)
    zoo_env(SEED=5)
    result = invoke("extract", toml, "--out", partial)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "was made with different teacher weights (teacher.weights_sha256: store has '")
    assert mtimes(partial) == before

    zoo_env(SEED=None)
    result = invoke("extract", toml, "--out", partial, "--set", "targets.dtype=float32")
    assert_one_line_error(result.output, "different targets (targets.logits.dtype: store has 'float16', now 'float32')")

    result = invoke("extract", toml, "--out", partial, "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["complete"] is True


def test_complete_store_with_another_teacher_is_refused(tmp_path, zoo_env):
    toml = write_toml(tmp_path / "p.toml")
    out = tmp_path / "s.zarr"
    assert invoke("extract", toml, "--out", out).exit_code == 0
    zoo_env(SEED=5)
    result = invoke("extract", toml, "--out", out)
    assert result.exit_code == 1
    assert_one_line_error(result.output, "different teacher weights")


# ----------------------------------------------------------------------------------- bad input
# The matrix of user mistakes (one Error line, exit status, no traceback, stores untouched) is tests/test_bad_input.py.


def test_info_on_a_zarr_group_that_is_not_a_store(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3).attrs["project"] = "mine"
    result = invoke("info", tmp_path / "plain.zarr")
    assert result.exit_code == 1
    assert_one_line_error(result.output, "is a zarr group but not a kdcache store")


@pytest.mark.parametrize("nodes", [[], ["samples", "targets", "progress"]])
def test_info_on_what_an_extract_stopped_at_its_start_left_says_to_rerun_it(tmp_path, nodes):
    """A root group without attributes, and kdcache's groups at most, is what an extract killed while it created the store
    leaves (the next extract creates it again): a reader says so and to rerun the extract (was: 'not a kdcache store;
    pass a store written by kdcache extract', as of someone else's group)."""
    import zarr

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    for node in nodes:
        group.create_group(node)
    result = invoke("info", tmp_path / "s.zarr")
    assert result.exit_code == 1
    assert_one_line_error(result.output, f"{str(tmp_path / 's.zarr')!r} is an empty zarr group, as an extract stopped while it "
                          "created the store leaves it, or an import (no 'kdcache' root attribute, no data); rerun that extract or "
                          "import, which creates it again")


LEAN = """
import sys, kdcache.cli
sys.argv = ["kdcache", *sys.argv[1:]]
try:
    kdcache.cli.main()
except SystemExit as e:
    print(f"exit={e.code} torch={'torch' in sys.modules}", file=sys.stderr)
"""


def test_commands_that_read_stores_never_import_torch(tiny_store, tmp_path):
    """torch takes ~2 s to import: ``--help``, ``--version``, ``info``, ``verify``, ``export``, ``pack`` and ``stats``
    read stores and print, and answer without it (a fresh process, as the console script runs them)."""
    for args in (["--help"], ["--version"], ["info", tiny_store], ["verify", tiny_store], ["export", tiny_store, str(tmp_path / "t.h5")],
                 ["pack", tiny_store, str(tmp_path / "t.zip")], ["stats", tiny_store], ["info", str(tmp_path / "missing.zarr")]):
        r = subprocess.run([sys.executable, "-c", LEAN, *args], capture_output=True, text=True, timeout=120)
        code = 1 if "missing" in args[-1] else 0
        assert r.stderr.strip().splitlines()[-1] == f"exit={code} torch=False", (args, r.stderr[-2000:])


def test_python_dash_m_kdcache_is_the_command(tiny_store):
    r = subprocess.run([sys.executable, "-m", "kdcache", "info", tiny_store, "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["num_samples"] == 50, r.stderr
    r = subprocess.run([sys.executable, "-m", "kdcache", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "Error: No such command 'nope' (see 'kdcache --help')"


def _console_script() -> list[str]:
    """The ``kdcache`` console script as pyproject.toml declares it, run as pip's wrapper runs it (the installed one may
    be of an older install of this tree)."""
    import tomllib

    module, function = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]["kdcache"].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


@pytest.mark.parametrize("program", ["console-script", "python-m"])
def test_ctrl_c_while_the_command_imports_is_one_line(tmp_path, program):
    """Ctrl-C before the command runs, while click and kdcache.cli import: one line and exit 130, as during a command,
    not a traceback from the middle of an import. The import is from source (an empty bytecode cache, as after a fresh
    checkout): the SIGINT is sent once click's bytecode is written there, while kdcache.cli imports it."""
    cache = tmp_path / "pycache"
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(cache), "PYTHONDONTWRITEBYTECODE": ""}
    args = _console_script() if program == "console-script" else [sys.executable, "-m", "kdcache"]
    proc = subprocess.Popen([*args, "info", str(tmp_path / "missing.zarr")], stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while not list(cache.glob("**/click/core.*.pyc")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    stderr = signal_and_wait(proc, signal.SIGINT)
    assert stderr.splitlines() == ["Error: interrupted before the command started; nothing was done"], stderr
    assert proc.returncode == 130


def test_ctrl_c_while_importlib_releases_a_module_lock_as_the_command_imports_is_not_lost(tmp_path):
    """A Ctrl-C as kdcache.cli imported, landing in importlib's clean-up of a module lock (a weakref callback), raised
    Python's KeyboardInterrupt there, which Python dropped: "Exception ignored" and a traceback, and the command ran to
    its end, exit 0 (tests/fuzz_signals.py: 6 of 80 Ctrl-Cs in the import were lost so, 4 more ended the process by
    SIGINT, exit -2, after its line). It is noted while the import runs and said once it has ended."""
    script = f"""
import signal, sys, threading
from kdcache.__main__ import run

def tracer(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "cb" and frame.f_code.co_filename == "<frozen importlib._bootstrap>":
        sys.settrace(None)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    return None

sys.argv = ["kdcache", "info", {str(tmp_path / "missing.zarr")!r}]
sys.settrace(tracer)
run()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (130, "Error: interrupted before the command started; nothing was done\n"), proc


def test_the_program_imports_only_its_own_two_modules_before_it_takes_a_ctrl_c_itself():
    """Until ``kdcache.__main__.run`` takes Ctrl-C itself, Python's handler raises it as KeyboardInterrupt wherever the
    program is, a traceback: the package's import of typing and the entry's import of signal (tests/fuzz_signals.py:
    import:INT:0.022 in typing's, verify:INT:0.064 in signal's enums) were in that window. Now kdcache and
    kdcache.__main__ alone, as the console script and ``python -m kdcache`` import them."""
    script = "import sys; before = set(sys.modules); import kdcache.__main__; print(*sorted(set(sys.modules) - before))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.split() == ["kdcache", "kdcache.__main__"], proc.stdout


def test_a_second_ctrl_c_ends_a_program_whose_command_line_import_hangs():
    """A Ctrl-C while the program imports its command line is noted and said once the import ends; an import that never
    ends (click's, on a stalled network file system: a finder that waits forever here) left a second and third Ctrl-C
    noted too, the program stuck. A second one ends it at once, in one line, exit 130."""
    script = ("import sys, time\n"
              "class Stalled:  # the file system holding click stops answering\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'click':\n"
              "            print('importing', flush=True)\n"
              "            time.sleep(3600)\n"
              "sys.meta_path.insert(0, Stalled())\n"
              "from kdcache.__main__ import run\n"
              "sys.argv = ['kdcache', '--version']\n"
              "run()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "importing\n"
        for _ in range(2):
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == "Error: interrupted before the command started; nothing was done\n", (proc.returncode, err)


def test_version_is_the_running_code_s_as_stores_record_it():
    """``kdcache --version`` names the version of the code that runs, which a store's manifest records as
    ``kdcache_version``, not the distribution metadata of the install (stale in an editable install after a pull)."""
    import kdcache

    result = invoke("--version")
    assert result.exit_code == 0 and result.output == f"kdcache, version {kdcache.__version__}\n", result.output


def test_the_api_names_are_the_functions_whatever_module_was_imported_first():
    """kdcache.extract and kdcache.train are functions in modules of the same names; importing those modules (as
    kdcache's own do, first) must not put the module where the function is."""
    code = ("import importlib, kdcache.distributed, kdcache.train, kdcache.extract, kdcache\n"
            "from kdcache import extract, train, load_pipeline, open_store, Store, Pipeline, KdcacheError, dry_run\n"
            "assert kdcache.extract is extract is importlib.import_module('kdcache.extract').extract\n"
            "assert kdcache.train is train is importlib.import_module('kdcache.train').train\n"
            "assert load_pipeline is importlib.import_module('kdcache.pipeline').load and callable(dry_run)\n"
            "assert set(kdcache.__all__) == set(kdcache._API) | {'__version__'} and set(kdcache.__all__) <= set(dir(kdcache))\n"
            "try:\n    kdcache.nothing\nexcept AttributeError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "module 'kdcache' has no attribute 'nothing'\n", r.stderr


def test_the_modules_the_docs_name_are_reached_from_a_bare_import():
    """README names ``kdcache.losses`` (a loop of one's own: ``kdcache.losses.kl_divergence``) and
    ``kdcache.errors.AlignmentError``, CLUSTER.md ``kdcache.distributed.extract_distributed``: after ``import kdcache``
    alone each raised "module 'kdcache' has no attribute ..." (a fresh process: the suite's imports bind them)."""
    code = ("import sys, kdcache\n"
            "assert 'torch' not in sys.modules\n"
            "assert callable(kdcache.losses.kl_divergence) and callable(kdcache.distributed.extract_distributed)\n"
            "assert issubclass(kdcache.errors.AlignmentError, kdcache.KdcacheError)\n"
            "assert {'losses', 'errors', 'distributed'} <= set(dir(kdcache))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize(
    "args, match",
    [
        (["extract", TINY], "Missing option '--out'"),
        (["extract", TINY, "--out", "x", "--batch-size", "many"], "'many' is not a valid integer"),
        (["extract", FIXTURES, "--out", "x"], "is a directory"),
        (["extract"], "Missing argument 'PIPELINE'"),
    ],
)
def test_usage_errors_exit_2(args, match):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and match in result.output


@pytest.mark.slow
def test_bad_input_in_a_real_process(tmp_path):
    result = subprocess.run([str(KDCACHE), "extract", str(TINY), "--out", str(tmp_path / "s"), "--layers", "features.3,nope"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_line_error(result.stderr, "layer 'nope' is not a module of the teacher")
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------- SIGKILL and resume


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_a_rerun_resumes(tmp_path, zoo_env):
    """Ctrl-C (SIGINT) mid-extract: one line saying the written shards are kept and how to go on, exit 130 as a
    shell reports an interrupted command; the rerun completes the store. The run is held at its last shard's first item
    until it is stopped: a loaded box may write all 30 shards (2.4 s) between the test seeing 2 done and its signal."""
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    out, hold = tmp_path / "s.zarr", tmp_path / "hold"
    hold.touch()
    proc = slow_extract(toml, out, shards=2, held=(hold, 232))
    try:
        stderr = signal_and_wait(proc, signal.SIGINT)
    finally:
        hold.unlink()
    assert proc.returncode == 130, stderr
    done = int(open_store(out).done().sum())
    assert stderr.strip().splitlines() == [f"Error: interrupted; the {done} shards done so far are kept: run the same command again to resume"]
    assert 2 <= done < 30
    zoo_env(N=240)
    assert invoke("extract", toml, "--out", out).exit_code == 0 and open_store(out).complete


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["kill", "the-whole-job"])
def test_sigterm_stops_as_ctrl_c_releasing_the_lock_and_a_rerun_resumes(tmp_path, zoo_env, group):
    """SIGTERM (a scheduler's preemption, to the process or to every process of the job: DataLoader workers too)
    mid-extract: the shards written are kept, the writer lock is released at once (a requeued job is not refused),
    one line, exit 143; the rerun completes the store. Held at the last shard's first item until it is stopped, as above."""
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4", "extract.num_workers=1")
    out, hold = tmp_path / "s.zarr", tmp_path / "hold"
    hold.touch()
    proc = slow_extract(toml, out, shards=2, new_session=group, held=(hold, 232))
    try:
        stderr = signal_and_wait(proc, signal.SIGTERM, group=group)
    finally:
        hold.unlink()
    assert proc.returncode == 143, stderr
    done = int(open_store(out).done().sum())
    assert stderr.strip().splitlines() == [f"Error: stopped by SIGTERM; the {done} shards done so far are kept: run the same command again to resume"]
    assert 2 <= done < 30
    assert not (tmp_path / ".s.zarr.kdcache-lock").exists()
    zoo_env(N=240)
    assert invoke("extract", toml, "--out", out).exit_code == 0 and open_store(out).complete


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGINT, 130, "interrupted")],
                         ids=["sigterm", "ctrl-c"])
def test_a_stop_while_a_worker_s_dataset_read_hangs_ends_the_extract_at_once(tmp_path, sig, code, said):
    """A DataLoader worker's dataset read that never returns (a stalled network mount): SIGTERM or Ctrl-C ends the extract
    at once with its one line. The worker ignores SIGTERM (a job's goes to every process; its main process ends it): torch's
    SIGTERM left it running, and the process, its line said, waited for it forever at exit; it is killed."""
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4", "extract.num_workers=1")
    out, hold = tmp_path / "s.zarr", tmp_path / "hold"
    hold.touch()
    proc = slow_extract(toml, out, shards=2, held=(hold, 80))
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("hold.held-*")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the read was not held within 120 s"
            time.sleep(0.01)
        time.sleep(1)  # the batches read before the held one are written: the run waits for it
        began = time.monotonic()
        stderr = signal_and_wait(proc, sig, timeout=30)
        took = time.monotonic() - began
    finally:
        hold.unlink()
    assert proc.returncode == code, stderr
    done = int(open_store(out).done().sum())
    assert stderr.strip().splitlines() == [f"Error: {said}; the {done} shards done so far are kept: run the same command again to resume"]
    assert 2 <= done <= 10 and took < 20, (done, took)


def test_an_overwrite_stopped_before_it_replaced_the_store_says_the_store_is_unchanged(tiny_store, tmp_path, monkeypatch):
    """extract --overwrite stopped (SIGTERM) while its teacher is built, before the earlier store is replaced: the
    line must not advise resuming "without --overwrite" (that would finish the earlier store, not make the new one)."""
    import importlib
    import shutil

    extracting = importlib.import_module("kdcache.extract")  # the module (kdcache.extract is the function)
    out = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, out)
    before = file_bytes(out)
    setup = extracting.setup

    def terminated_while_building(pipeline):
        os.kill(os.getpid(), signal.SIGTERM)
        return setup(pipeline)

    monkeypatch.setattr(extracting, "setup", terminated_while_building)
    time.sleep(1.1)  # the store's "created" has whole seconds: made before this run's second
    result = invoke("extract", TINY, "--out", out, "--overwrite")
    assert result.exit_code == 143, result.output
    assert result.output.strip() == ("Error: stopped by SIGTERM; the store there is unchanged (--overwrite had not replaced it yet): "
                                     "run the same command again to start afresh")
    assert file_bytes(out) == before


@pytest.mark.parametrize("crash, said", [
    (None, "no shard was written: run the same command again"),
    (20, "the 1 shard done so far is kept: run the same command again to resume"),
    (36, "the 2 shards done so far are kept: run the same command again to resume"),
], ids=["no-store", "one-shard", "two-shards"])
def test_a_stopped_extract_says_how_many_shards_it_kept(tmp_path, zoo_env, monkeypatch, crash, said):
    """extract stopped (SIGTERM) while its teacher is built: with no store there yet, the line said "the shards written
    so far are kept" of shards that were never written; it names the shards the store holds done."""
    extracting = importlib.import_module("kdcache.extract")
    toml = write_toml(tmp_path / "p.toml")
    out = tmp_path / "s.zarr" if crash is None else crash_at(tmp_path, zoo_env, crash, toml)
    setup = extracting.setup

    def terminated_while_building(pipeline):
        os.kill(os.getpid(), signal.SIGTERM)
        return setup(pipeline)

    monkeypatch.setattr(extracting, "setup", terminated_while_building)
    result = invoke("extract", toml, "--out", out)
    assert result.exit_code == 143, result.output
    assert result.output.strip() == f"Error: stopped by SIGTERM; {said}"


def test_a_sigterm_during_the_clean_up_of_one_is_ignored(tmp_path):
    """A scheduler may send SIGTERM more than once (Slurm signals every process of a job; torchrun passes its own on):
    the first stops the command as Ctrl-C does, and one arriving while it cleans up (writing its last shards, releasing
    its lock) must not end it there; the handler found before is put back afterwards."""

    import click

    from kdcache import cli

    cleaned = []

    @cli._errors
    def extract(out: str) -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not reached: the first SIGTERM is raised here
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the second, during the clean-up
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(click.ClickException) as stopped:
        extract(out=str(tmp_path / "s.zarr"))
    assert cleaned == [True] and stopped.value.exit_code == 143
    assert stopped.value.message == "stopped by SIGTERM; no shard was written: run the same command again"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_during_the_clean_up_after_an_error_leaves_the_error_said(tmp_path):
    """torchrun SIGTERMs rank 0 once rank 1 has said the refusal they share and ended: rank 0, cleaning up after that same
    refusal, said 'stopped by SIGTERM; the store there is unchanged' instead (two Error lines of a job that was refused)."""
    import click

    from kdcache import cli
    from kdcache.errors import StoreError

    @cli._errors
    def extract(out: str) -> None:
        try:
            raise StoreError(f"{out!r} is being written by another job; wait for it")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # while the refusal goes up through the clean-up
            time.sleep(0.05)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(click.ClickException) as refused:
        extract(out="s.zarr")
    assert refused.value.exit_code == 1 and refused.value.message == "'s.zarr' is being written by another job; wait for it"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_while_a_command_handles_an_error_it_recovers_from_still_stops_it(tmp_path):
    """A SIGTERM that lands while the command handles a KdcacheError is put off: the error may be the command's own, said
    next (above). Where the command recovers from it instead (a probe's error, a lock object read again) and goes on,
    the SIGTERM was lost: the command ran to its end, holding its writer lock, until the scheduler's SIGKILL. Now it is
    sent again once the error is handled, and stops the command; once a command has ended it is not sent."""
    import click

    from kdcache import cli
    from kdcache.errors import StoreError

    went_on = []

    @cli._errors
    def extract(out: str) -> None:
        try:
            raise StoreError("a probe's refusal")
        except StoreError:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this except block
        for _ in range(100):  # the command goes on: 5 s unless stopped
            went_on.append(True)
            time.sleep(0.05)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(click.ClickException) as stopped:
        extract(out=str(tmp_path / "s.zarr"))
    assert stopped.value.exit_code == 143 and len(went_on) < 100, len(went_on)
    assert signal.getsignal(signal.SIGTERM) is before

    @cli._errors
    def refused(out: str) -> None:
        try:
            raise StoreError("refused")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)

    with pytest.raises(click.ClickException, match="refused"):
        refused(out="s.zarr")
    time.sleep(0.3)  # had it been sent again once the handler before was back, this process would have ended
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, zoo_env, fetch_log):
    """A real ``kdcache`` process on a slow dataset (240 samples, 30 shards) is killed, re-run, and compared byte for byte.
    It is held at its last shard's first item, so that it is killed before its end however loaded the box."""
    kx = importlib.import_module("kdcache.extract")
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    killed, reference, hold = tmp_path / "killed.zarr", tmp_path / "reference.zarr", tmp_path / "hold"
    hold.touch()
    proc = slow_extract(toml, killed, shards=3, held=(hold, 232))
    try:
        stderr = signal_and_wait(proc, signal.SIGKILL, timeout=30)
    finally:
        hold.unlink()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr[-2000:]}"
    done = open_store(killed).done()
    assert 3 <= done.sum() < 30, done
    result = json.loads(invoke("info", killed, "--json").stdout)
    assert result["complete"] is False and result["samples_done"] == 8 * int(done.sum())

    zoo_env(N=240)  # no sleep from here on
    result = invoke("extract", toml, "--out", killed, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["complete"] is True
    fetched = Counter(fetch_log())
    done_rows = {r for s in np.flatnonzero(done) for r in range(8 * s, 8 * s + 8)}
    probe = set(range(4)) | {239}
    rechecked = (set(fetched) & done_rows) - probe  # the resume's check of a few done rows' inputs: read once, no teacher work
    assert len(rechecked) <= kx.RESUMED_SHARDS * kx.RESUMED_ROWS and all(fetched[i] == 1 for i in rechecked), \
        "rows of shards done before the kill were fetched again"
    assert set(range(240)) - done_rows <= set(fetched)

    zoo_env(LOG=None)
    assert invoke("extract", toml, "--out", reference).exit_code == 0
    resumed_manifest, resumed = read_store(killed)
    reference_manifest, expected = read_store(reference)
    assert without_times(resumed_manifest) == without_times(reference_manifest)
    assert resumed.keys() == expected.keys() and len(expected) == 8  # index, fingerprint, label, 3 targets, done, digest
    for path in expected:
        assert resumed[path].dtype == expected[path].dtype, path
        np.testing.assert_array_equal(resumed[path], expected[path], err_msg=path)
    np.testing.assert_array_equal(expected["samples/index"], np.arange(240))
    assert file_bytes(killed) == file_bytes(reference)


@pytest.mark.parametrize("rank, says", [("0", True), ("1", False)])
def test_under_torchrun_rank_0_alone_reports_a_ctrl_c(tmp_path, monkeypatch, rank, says):
    """Every torchrun rank gets the terminal's Ctrl-C: each exits 130, and only rank 0 prints the line."""
    import kdcache
    from kdcache import distributed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kdcache, "extract", interrupted)
    monkeypatch.setattr(distributed, "extract_torchrun", interrupted)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: a RANK 1 alone is refused (LaunchError)
    result = invoke("extract", TINY, "--out", tmp_path / "s.zarr")
    assert result.exit_code == 130, result.output
    assert (result.stderr.startswith("Error: interrupted; ") and len(result.stderr.strip().splitlines()) == 1) if says else result.stderr == ""


FROZEN_AT_EXIT = """
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))  # runs after main's own exit handlers
from kdcache.cli import main
sys.argv = ["kdcache", *sys.argv[1:]]
main()
"""


def test_a_kdcache_process_skips_the_collection_at_shutdown_and_a_call_in_a_process_does_not(tiny_store):
    """Python's collection at shutdown walked every object torch loaded: 0.3-1 s of each train or extract process after
    its work was done (measured 2.4-2.9 s vs 3.0-3.7 s for the text example's train). The console script freezes the
    objects alive as its last exit handler; a call of main inside another process (a notebook, CliRunner) leaves its
    collector alone."""
    r = subprocess.run([sys.executable, "-c", FROZEN_AT_EXIT, "info", tiny_store], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "frozen at exit: True", r.stdout + r.stderr
    import gc

    assert CliRunner().invoke(main, ["info", tiny_store]).exit_code == 0
    assert gc.get_freeze_count() == 0


def test_a_workers_cut_fd_handoff_prints_no_traceback_after_a_commands_line(tmp_path, capsys):
    """A stopped command ends its DataLoader workers mid-batch; multiprocessing's resource_sharer thread, which hands a
    batch's file descriptors over, then printed its cut connection's traceback (sys.excepthook) after the one Error
    line (seen once under a SIGTERM to the whole job). During a command such errors are dropped; others are printed."""
    import sys
    from kdcache import cli

    where = str(Path(sys.modules["multiprocessing"].__file__).parent / "resource_sharer.py")

    def failed(kind: type[BaseException], filename: str) -> tuple:
        try:
            exec(compile("raise kind('connection cut')", filename, "exec"), {"kind": kind})
        except BaseException:  # noqa: BLE001
            return sys.exc_info()

    with cli._quiet_handoffs():
        sys.excepthook(*failed(EOFError, where))
        sys.excepthook(*failed(ConnectionResetError, where))
        assert capsys.readouterr().err == ""
        sys.excepthook(*failed(EOFError, str(tmp_path / "elsewhere.py")))  # not the resource sharer's
        sys.excepthook(*failed(ValueError, where))  # not a cut connection
    err = capsys.readouterr().err
    assert err.count("Traceback") == 2 and "ValueError" in err and "EOFError" in err
    assert sys.excepthook is sys.__excepthook__ or "_quiet_handoffs" not in repr(sys.excepthook)


def test_info_and_the_dry_run_keep_their_columns_in_line_for_a_long_layer_name(tiny_store):
    """A layer name longer than the name column (``bert.encoder.layer.11.output``, 29 characters, against 24) pushed
    that line's path, shape and dtype right of the others': each column is as wide as its longest value now."""
    from kdcache.cli import _dry_run_text, _info_text

    info = json.loads(invoke("info", tiny_store, "--json").stdout)
    report = json.loads(invoke("extract", TINY, "--dry-run", "--json").stdout)
    long = "bert.encoder.layer.11.output"
    for summary, text in ((info, _info_text), (report, _dry_run_text)):
        summary["targets"][long] = dict(summary["targets"]["features.3"], path=f"targets/layers/{long}")
        lines = [line for line in text(summary).splitlines() if line.startswith("  ") and "float16" in line]
        assert len(lines) == 3, lines
        for column in ("(", "float16"):  # the shape's and the dtype's columns
            assert len({line.index(column) for line in lines}) == 1, "\n".join(lines)
