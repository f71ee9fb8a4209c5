"""kdcache verify on real stores: a sound store passes; each kind of damage is found and named."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import kdcache
from conftest import TINY_TOML, extract_tiny
from kdcache.cli import main
from kdcache.errors import PipelineError, StoreError, StoreMismatchError
from kdcache import store as layout
from kdcache.store import create_or_resume
from kdcache.verify import verify
from reference import crash_at, without_the_digest_key

LOGITS_SHARD_1 = "targets/logits/c/1/0"
FEATURES_SHARD_2 = "targets/layers/features.3/c/2/0/0/0"
MOVED = ("holds other rows than its writer wrote there (their digest is not the one recorded in progress/digest: a shard object "
         "swapped with another, or copied from another store)")


@pytest.fixture
def copy(tiny_store, tmp_path) -> Path:
    out = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, out)
    return out


def problems(report: dict, name: str) -> list[str]:
    return next(c for c in report["checks"] if c["name"] == name)["problems"]


def test_sound_store_passes_with_teacher_check(tiny_store):
    r = CliRunner().invoke(main, ["verify", tiny_store, "--teacher-check", "12", "--pipeline", str(TINY_TOML), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and [c["name"] for c in report["checks"]] == ["completeness", "layout", "checksums", "values", "teacher"]
    t = report["teacher_check"]
    assert len(t["rows"]) == 12 and t["rows"] == sorted(t["rows"])
    assert t["targets"]["logits"]["max_abs_error"] < 1e-2 and t["targets"]["logits"]["kl"] < 1e-4
    assert t["targets"]["features.3"]["kl"] is None and t["targets"]["features.3"]["ok"]


def test_the_teacher_check_of_a_regression_teacher_has_no_kl(tmp_path):
    """Logits of one value per sample have no class axis to take a softmax over: no kl (it was taken across the rows)."""
    regression = ("--set", "teacher.factory='bad_input.py:regression_teacher'", "--set", "targets.layers=[]")
    r = CliRunner().invoke(main, ["extract", str(TINY_TOML), "--out", str(tmp_path / "r.zarr"), *regression])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "r.zarr"), "--teacher-check", "8", "--pipeline", str(TINY_TOML), *regression, "--json"])
    assert r.exit_code == 0, r.output
    logits = json.loads(r.output)["teacher_check"]["targets"]["logits"]
    assert logits["kl"] is None and logits["ok"] and logits["max_abs_error"] < 1e-2


def test_flipped_byte_is_named(copy):
    p = copy / LOGITS_SHARD_1
    data = bytearray(p.read_bytes())
    data[5] ^= 0xFF
    p.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["verify", str(copy)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "targets/logits: shard 1 inner chunk 0 (rows 16-31): crc32c checksum mismatch" in r.output
    assert "NOT verified" in r.output


@pytest.mark.parametrize("keep", [0.5, 10, 0])
def test_truncated_or_emptied_shard_is_named(copy, keep):
    p = copy / FEATURES_SHARD_2
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    report = verify(str(copy))
    assert not report["ok"]
    (problem,) = problems(report, "checksums")
    assert problem.startswith("targets/layers/features.3: shard 2")
    assert ("empty" if keep == 0 else "truncated") in problem


def test_missing_shard_object_is_named(copy):
    (copy / LOGITS_SHARD_1).unlink()  # zarr alone would read zeros here
    assert problems(verify(str(copy)), "checksums") == [f"targets/logits: shard 1 object {LOGITS_SHARD_1!r} is missing"]


def test_a_missing_array_is_named_by_what_is_missing(copy):
    """The problem named the exception behind it ('missing (KeyError)', then 'missing (DamagedStoreError)')."""
    (copy / "samples/label/zarr.json").unlink()
    assert problems(verify(str(copy)), "layout") == ["samples/label: missing (no samples/label/zarr.json)"]


def test_damaged_done_metadata_is_named_once_without_sending_the_user_to_verify(copy):
    """verify's open check gave the store's error whole, which ends "run kdcache verify STORE, or re-extract the store"."""
    meta = copy / "progress/done/zarr.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "shape": [5]}))
    assert problems(verify(str(copy)), "open") == [f"{str(copy)!r} is damaged: 'progress/done/zarr.json' is not valid zarr metadata "
                                                   "(it says [5] bool, expected [4] bool); re-extract the store"]


def test_a_missing_done_array_is_an_open_problem(copy):
    """progress/done is checked as the store opens (its shape and dtype too, above): the layout check never sees it."""
    (copy / "progress/done/zarr.json").unlink()
    report = verify(str(copy))
    assert problems(report, "open") == [f"{str(copy)!r} is missing the array 'progress/done' its manifest lists (deleted, or an "
                                        "incomplete copy); re-extract or copy the store again"] and not report["ok"]


def test_an_absent_inner_chunk_reads_as_the_fill_value_and_verifies(copy):
    """FORMAT.md §3.1: an absent inner chunk (index entry 2**64-1, as zarr writes a chunk of fill values) reads as the fill
    value. A store whose shard 1 of logits is absent so, its digest that of zero rows, verifies; a checksum check that took
    the entry as an extent would have called it outside the object."""
    import google_crc32c

    index = np.full(2, 2**64 - 1, dtype="<u8").tobytes()  # the shard's one inner chunk (16 rows): absent
    (copy / "targets/logits/c/1/0").write_bytes(index + google_crc32c.value(index).to_bytes(4, "little"))
    g = zarr.open_group(str(copy), mode="r+")
    column = kdcache.open_store(str(copy)).digest_paths().index(layout.LOGITS)
    g[layout.DIGEST][1, column] = layout.shard_digest(layout.LOGITS, 1, [np.zeros((16, 4), dtype=np.float16)])
    report = verify(str(copy))
    assert report["ok"], report
    assert not kdcache.open_store(str(copy)).read(layout.LOGITS, 16, 32).any()


def test_a_damaged_done_marker_is_one_problem_and_verify_checks_the_rest(copy):
    """A done marker that is not one byte 0 or 1 once stopped verify at its open check, though the store's error (every
    other command's) says to run kdcache verify for any other damage: it is completeness's problem now, its shard taken
    as not done, and the other checks go on (here finding a flipped byte in another shard)."""
    (copy / "progress/done/c/2").write_bytes(b"zz")
    p = copy / LOGITS_SHARD_1
    data = bytearray(p.read_bytes())
    data[5] ^= 0xFF
    p.write_bytes(bytes(data))
    report = verify(str(copy))
    assert [c["name"] for c in report["checks"]] == ["completeness", "layout", "checksums", "values"] and not report["ok"]
    assert problems(report, "completeness") == [
        "done marker 'progress/done/c/2' (holds b'zz') is not one byte 0 or 1 (its shard is not checked); delete the marker "
        "and rerun kdcache extract to redo its shard, or re-extract the store"]
    assert problems(report, "checksums") == ["targets/logits: shard 1 inner chunk 0 (rows 16-31): crc32c checksum mismatch"]
    with pytest.raises(StoreError, match=r"done marker 'progress/done/c/2' \(holds b'zz'\) is not one byte 0 or 1; run kdcache verify"):
        kdcache.open_store(str(copy)).done()  # every other reader still refuses the store


def test_verify_of_a_path_object_lists_its_problems_as_of_its_string(copy):
    """``verify(Path(...))`` (open_store and pack take one) of a store with a problem raised ``TypeError: decoding to
    str: need a bytes-like object, PosixPath found`` from the report's clean-up of each problem's advice."""
    (copy / "progress/done/c/2").write_bytes(b"zz")
    assert problems(verify(copy), "completeness") == problems(verify(str(copy)), "completeness")


def test_incomplete_store_fails_completeness(tmp_path, zoo_env):
    out = crash_at(tmp_path, zoo_env, 42, name="partial.zarr")
    report = verify(str(out))
    assert not report["ok"]
    assert problems(report, "completeness") == ["shard 2 (rows 32-47) is not done; resume kdcache extract",
                                                "shard 3 (rows 48-49) is not done; resume kdcache extract"]
    assert all(c["ok"] for c in report["checks"] if c["name"] != "completeness")


def test_values_nan_zero_fingerprint_and_wrong_index_are_named(copy):
    g = zarr.open_group(str(copy), mode="r+")
    with zarr.config.set({"array.write_empty_chunks": True}):
        logits = g["targets/logits"][:]
        logits[35, 2] = np.nan
        g["targets/logits"][:] = logits
        fp = g["samples/fingerprint"][:]
        fp[3] = 0
        g["samples/fingerprint"][:] = fp
        index = g["samples/index"][:]
        index[20] = 7
        g["samples/index"][:] = index
    report = verify(str(copy))
    assert sorted(problems(report, "values")) == [  # each value named, beside its shard's digest no longer matching
        "samples/fingerprint: shard 0 (rows 0-15) " + MOVED,
        "samples/fingerprint: shard 0: 1 row without a fingerprint (first row 3)",
        "samples/index: shard 1 (rows 16-31) " + MOVED,
        "samples/index: shard 1: index[r] != r at 1 row (first row 20: 7)",
        "targets/logits: shard 2 (rows 32-47) " + MOVED,
        "targets/logits: shard 2: NaN or inf in 1 row (first row 35)",
    ]


def test_layout_mismatch_is_named(copy):
    g = zarr.open_group(str(copy), mode="r+")
    del g["samples/label"]
    g.create_array("samples/label", shape=(50,), dtype="int32", chunks=(16,))
    (problem,) = problems(verify(str(copy)), "layout")
    assert problem == "samples/label: is [50] int32, the manifest says [50] int64"


def test_teacher_check_finds_other_weights(tiny_store, zoo_env):
    p = kdcache.load_pipeline(TINY_TOML)
    stored = zarr.open_group(tiny_store, mode="r")
    report = verify(tiny_store, teacher_check=5, pipeline=p, seed=1)
    assert report["ok"]
    # a pipeline whose teacher has other weights: weights and values both flagged
    import tiny

    original = tiny.teacher

    def other():
        import torch

        torch.manual_seed(7)
        return tiny.TinyCNN()

    tiny.teacher = other
    try:
        report = verify(tiny_store, teacher_check=5, pipeline=kdcache.load_pipeline(TINY_TOML))
    finally:
        tiny.teacher = original
    teacher = problems(report, "teacher")
    assert not report["ok"] and "teacher weights" in teacher[0]
    assert any("target 'logits'" in p and "beyond tolerance" in p for p in teacher)
    assert stored.attrs["kdcache"]["teacher"]["factory"] == "tiny.py:teacher"


def test_teacher_check_recomputes_in_the_stores_precision(tiny_store):
    """The rows are recomputed under the autocast the store records (its rtol is looked up by it too), not the
    pipeline's extract.precision: an fp32 store checked with a bf16 pipeline (a --set left over) failed with
    thousands of values "beyond tolerance", naming no cause."""
    report = verify(tiny_store, teacher_check=12, pipeline=kdcache.load_pipeline(TINY_TOML, ["extract.precision=bf16"]))
    assert report["ok"], problems(report, "teacher")
    assert report["teacher_check"]["targets"]["features.3"]["max_rel_error"] < 1e-2


def test_teacher_check_finds_a_dataset_whose_labels_changed(tiny_store, monkeypatch):
    """The same inputs with other labels (a new class mapping): training refuses such a dataset row by row, but
    verify --teacher-check compared only fingerprints and targets, and said 'verified'."""
    import tiny

    def relabeled(split: str = "train"):
        images = tiny.TinyImages(split)
        images.y[[3, 20]] = (images.y[[3, 20]] + 1) % 4
        return images

    monkeypatch.setattr(tiny, "dataset", relabeled)
    report = verify(tiny_store, teacher_check=50, pipeline=kdcache.load_pipeline(TINY_TOML))
    teacher = problems(report, "teacher")
    assert not report["ok"] and len(teacher) == 2, teacher
    assert teacher[0].startswith("row 3: the dataset gives label") and "its labels changed since extraction" in teacher[0]
    assert teacher[1].startswith("row 20: ") and report["teacher_check"]["targets"]["logits"]["ok"]


@pytest.mark.parametrize("dtype", ["float16", "float32", ">f4", "float64"])
def test_all_finite_agrees_with_isfinite_on_every_kind_of_value(dtype):
    """The exponent-bits test of verify's values check against np.isfinite: NaN (quiet, signalling, negative), ±inf,
    the largest finite, subnormals, -0; contiguous or not, empty."""
    from kdcache.verify import all_finite

    info = np.finfo(np.dtype(dtype))
    special = [np.nan, -np.nan, np.inf, -np.inf, info.max, -info.max, info.tiny / 4, -0.0, 0.0, 1.0]
    rng = np.random.default_rng(0)
    for value in special:
        x = (rng.standard_normal((5, 7)) * 100).astype(dtype)
        x[rng.integers(5), rng.integers(7)] = value
        assert all_finite(x) == bool(np.isfinite(x).all()), (dtype, value)
        assert all_finite(x[:, ::2]) == bool(np.isfinite(x[:, ::2]).all()), (dtype, value)
    if dtype == "float16":  # a signalling NaN's bits (exponent all ones, quiet bit clear), and the bits of inf
        assert not all_finite(np.array([0x7D00, 0], np.uint16).view(np.float16)) and not all_finite(np.array([0xFC00], np.uint16).view(np.float16))
    assert all_finite(np.zeros((0, 3), dtype))


def test_teacher_check_needs_a_pipeline(tiny_store):
    r = CliRunner().invoke(main, ["verify", tiny_store, "--teacher-check", "3"])
    assert r.exit_code == 2 and "--pipeline" in r.output


def test_a_teacher_check_of_0_rows_with_a_pipeline_says_the_teacher_was_not_checked(tiny_store):
    """verify --teacher-check 0 --pipeline P (a script's N of 0) printed no teacher line and "every check holds", as if the
    teacher had been checked: a "teacher" check says it was not, as checksums names what it did not check (exit 0, since
    nothing failed; N is 0 by choice). Without a pipeline no teacher check is listed."""
    r = CliRunner().invoke(main, ["verify", tiny_store, "--teacher-check", "0", "--pipeline", str(TINY_TOML)])
    assert r.exit_code == 0, r.output
    assert ("ok    teacher       not checked: --teacher-check is 0, so no row was recomputed; pass --teacher-check N (N > 0) to "
            "recompute N random rows\nverified: every check holds") in r.output, r.output
    r = CliRunner().invoke(main, ["verify", tiny_store, "--teacher-check", "0", "--pipeline", str(TINY_TOML), "--json"])
    report = json.loads(r.stdout)
    assert report["ok"] and report["teacher_check"] is None and report["checks"][-1]["name"] == "teacher", report
    last = verify(tiny_store, pipeline=kdcache.load_pipeline(TINY_TOML))["checks"][-1]
    assert last["name"] == "teacher" and last["ok"] and last["summary"] == (
        "not checked: teacher_check is 0, so no row was recomputed; pass teacher_check=N (N > 0) to recompute N random rows"), last
    assert [c["name"] for c in verify(tiny_store)["checks"]] == ["completeness", "layout", "checksums", "values"]


def test_the_python_verify_names_its_arguments(tiny_store):
    """From Python, a teacher check without a pipeline named the CLI's flags (--teacher-check, --pipeline); the path of a
    pipeline file was an AttributeError once the other checks had run, a teacher_check of 2.5 or a seed of None a
    TypeError from numpy."""
    with pytest.raises(StoreError, match=r"^teacher_check needs the pipeline that built the teacher; pass "
                                         r"pipeline=kdcache.load_pipeline\(PATH\)$"):
        verify(tiny_store, teacher_check=3)
    with pytest.raises(TypeError, match=r"^pipeline must be a kdcache.Pipeline, got PosixPath .*load it first"):
        verify(tiny_store, teacher_check=3, pipeline=TINY_TOML)
    for arguments, said in [(dict(teacher_check=2.5), "teacher_check must be an integer >= 0, got 2.5"),
                            (dict(seed=None), "seed must be an integer >= 0, got None"),
                            (dict(teacher_check=-1), "teacher_check must be an integer >= 0, got -1"),
                            (dict(tolerance=float("nan")), "tolerance must be a finite number >= 0, got nan")]:
        with pytest.raises(PipelineError, match=f"^{re.escape(said)}$"):
            verify(tiny_store, **arguments)


def newer_format(tiny_store: str, tmp_path) -> str:
    """A copy of the tiny store whose manifest says format version 99 (a later kdcache's)."""
    copy = tmp_path / "newer.zarr"
    shutil.copytree(tiny_store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["kdcache"]["format_version"] = 99
    (copy / "zarr.json").write_text(json.dumps(meta))
    return str(copy)


@pytest.mark.parametrize("location, said", [
    (lambda s, t: str(t / "nothing.zarr"), "no store at '{t}/nothing.zarr'; run kdcache extract PIPELINE --out {t}/nothing.zarr first"),
    (lambda s, t: "memory://nothing.zarr", "no store at 'memory://nothing.zarr'; run kdcache extract PIPELINE --out memory://nothing.zarr first"),
    (lambda s, t: (t / "notes.txt").write_text("x") and str(t / "notes.txt"), "'{t}/notes.txt' is a file, not a store; pass a store folder"),
    (lambda s, t: f"{s}/targets", "'{s}/targets' is 'targets' inside the store '{s}', not a store itself; pass '{s}'"),
    (newer_format, "'{t}/newer.zarr' has store format version 99; this kdcache reads version 1 or 2: upgrade kdcache or re-extract the store"),
], ids=["missing", "url", "a-file", "part-of-a-store", "newer-format"])
def test_verify_of_what_is_no_store_is_one_error_line_and_json_says_so(tiny_store, tmp_path, location, said):
    """verify of something that cannot be opened at all printed a report of one failed "open" check (exit 1), where every
    other command prints one Error line: nothing was checked, so nothing failed a check. It is the Error line now (exit
    1); with --json, stdout still holds one JSON object, with ``ok`` false, no checks and the ``error``. A store that
    opens but is damaged (its group metadata, its manifest's types) is still the open check's failure."""
    where = location(tiny_store, tmp_path)
    said = said.format(s=tiny_store, t=tmp_path)
    r = CliRunner().invoke(main, ["verify", where])
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.startswith(f"Error: {said}") and r.stderr.count("\n") == 1, r.output
    r = CliRunner().invoke(main, ["verify", where, "--json"])
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {said}"), r.output
    report = json.loads(r.stdout)
    assert report == {"location": where, "ok": False, "error": r.stderr.removeprefix("Error: ").rstrip("\n"), "checks": [],
                      "teacher_check": None}
    with pytest.raises(StoreError, match=f"^{re.escape(said)}"):
        verify(where)


# ----------------------------------------------------------------------------------- shard digests (FORMAT.md §7.1)


def _giant(path: str):
    def damage(store: Path) -> Path:
        os.truncate(store / path, 64 * 2**30)  # a sparse file: nothing is written
        return store
    return damage


def _fifo_marker(store: Path) -> Path:
    (store / "progress/done/c/1").unlink()
    os.mkfifo(store / "progress/done/c/1")
    return store


def _root_linked_out(store: Path) -> Path:
    (store / "zarr.json").rename(store.parent / "elsewhere.json")
    (store / "zarr.json").symlink_to(store.parent / "elsewhere.json")
    return store


def _manifest_a_list(store: Path) -> Path:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["kdcache"] = [1]
    (store / "zarr.json").write_text(json.dumps(meta))
    return store


def _rezipped(compressed: str = "", twice: str = ""):
    """Damage: the store as a zip (as pack writes it) whose member ``compressed`` is deflated, or ``twice`` appears twice."""
    def damage(store: Path) -> Path:
        out = store.parent / "t.zarr.zip"
        with zipfile.ZipFile(out, "w") as z:
            for f in sorted(p for p in store.rglob("*") if p.is_file()):
                name = f.relative_to(store).as_posix()
                z.write(f, name, compress_type=zipfile.ZIP_DEFLATED if name == compressed else zipfile.ZIP_STORED)
                if name == twice:
                    with pytest.warns(UserWarning, match="Duplicate name"):
                        z.write(f, name)
        return out
    return damage


def _zip_cut_short(store: Path) -> Path:
    out = _rezipped()(store)
    out.write_bytes(out.read_bytes()[: out.stat().st_size // 2])  # a download stopped half way
    return out


@pytest.mark.parametrize("damage, said", [
    (_giant("zarr.json"), "is damaged: object 'zarr.json' holds 68,719,476,736 bytes, more than it can"),
    (_giant("samples/zarr.json"), "is damaged: object 'samples/zarr.json' holds 68,719,476,736 bytes"),
    (_giant("progress/done/c/1"), "is damaged: object 'progress/done/c/1' holds 68,719,476,736 bytes, more than it can (129"),
    (_fifo_marker, "is unsafe to read: object 'progress/done/c/1' is not a regular file (it leads to a FIFO"),
    (_root_linked_out, "is unsafe to read: object 'zarr.json' is a link to "),
    (_rezipped(compressed="progress/done/c/1"), "zip member 'progress/done/c/1' is compressed (deflate, 1 bytes)"),
    (_rezipped(twice="zarr.json"), "zip member 'zarr.json' appears more than once"),
    (_manifest_a_list, "not a kdcache store (its 'kdcache' root attribute holds [1], not a JSON object)"),
    (_zip_cut_short, "t.zarr.zip' is damaged: it begins as a zip file but has no end (its central directory): a copy or download cut short"),
], ids=["giant-root-zarr-json", "giant-group-zarr-json", "giant-done-marker", "fifo-done-marker", "root-linked-out",
        "zip-member-compressed", "zip-member-twice", "manifest-a-list", "zip-cut-short"])
def test_damage_found_as_the_store_opens_is_the_open_checks_failure(copy, damage, said):
    """Since verify's Error line for what is no store, damage that other modules than the store's metadata checks name (an
    object larger than it can be, one that is no regular file or a link out of the store, a zip member compressed or
    twice, a manifest that is no object) was that Error line too, saying "run kdcache verify" of verify itself: it is
    the report's failed open check again, as every damage found on opening is. A zip cut short (no end) was "not a
    readable zip file; pass a .zarr.zip written by kdcache pack": it is damage, named."""
    location = str(damage(copy))
    r = CliRunner().invoke(main, ["verify", location, "--json"])
    report = json.loads(r.stdout)
    assert r.exit_code == 1 and r.stderr == "" and "error" not in report, r.output
    assert [c["name"] for c in report["checks"]] == ["open"] and said in report["checks"][0]["problems"][0], report


def test_a_zarr_array_is_no_store_not_a_damaged_one(tmp_path):
    """A zarr v3 array (someone's, not a store) was verify's failed open check, "not a zarr v3 group (ContainsArrayError:
    ...)": a store passed wrongly, not one damaged. It is the Error line naming what it is."""
    zarr.create_array(store=str(tmp_path / "a.zarr"), shape=(4,), dtype="int8")
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "a.zarr"), "--json"])
    said = f"'{tmp_path}/a.zarr' is a zarr array, not a store (a zarr group); pass a store written by kdcache extract"
    assert r.exit_code == 1 and r.stderr == f"Error: {said}\n", r.output
    assert json.loads(r.stdout) == {"location": str(tmp_path / "a.zarr"), "ok": False, "error": said, "checks": [], "teacher_check": None}


def test_verify_json_stopped_by_the_teacher_keeps_the_checks_done(tiny_store):
    """--teacher-check whose teacher raises stops verify after its other checks: --json said checks [] (nothing checked)
    and lost them. The object holds the checks done and the error; the Error line follows on stderr, as before."""
    raising = ["--teacher-check", "4", "--pipeline", str(TINY_TOML), "--set", "teacher.factory='bad_input.py:raising_teacher'"]
    r = CliRunner().invoke(main, ["verify", tiny_store, *raising, "--json"])
    said = "teacher.factory 'bad_input.py:raising_teacher' raised RuntimeError: weights file teacher.pt not found"
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {said}") and r.stderr.count("\n") == 1, r.output
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["error"] == r.stderr.removeprefix("Error: ").rstrip("\n") and report["teacher_check"] is None
    assert [(c["name"], c["ok"]) for c in report["checks"]] == [(n, True) for n in ("completeness", "layout", "checksums", "values")]
    r = CliRunner().invoke(main, ["verify", tiny_store, *raising])  # the text form: the one Error line, as every command's
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.startswith(f"Error: {said}"), r.output
    with pytest.raises(PipelineError, match=re.escape(said)) as raised:
        verify(tiny_store, teacher_check=4, pipeline=kdcache.load_pipeline(TINY_TOML, ["teacher.factory='bad_input.py:raising_teacher'"]))
    assert [c["name"] for c in raised.value.report["checks"]] == ["completeness", "layout", "checksums", "values"]


@pytest.mark.parametrize("args, said", [
    (["--teacher-check", "4", "--pipeline", str(TINY_TOML), "--set", "extract.bogus=1"], "--set extract.bogus=1: unknown key 'extract.bogus'"),
    (["--teacher-check", "4"], "--teacher-check needs --pipeline PIPELINE"),
    (["--seed", "3"], "--seed serves --teacher-check N, which was not given"),
], ids=["bad-set", "no-pipeline", "seed-alone"])
def test_verify_json_of_a_refused_option_is_one_object(tiny_store, args, said):
    """An option refused before the store was read (a --set the pipeline does not have, --teacher-check without --pipeline)
    printed its Error line and nothing on stdout, where --json promises one object."""
    r = CliRunner().invoke(main, ["verify", tiny_store, *args, "--json"])
    assert r.exit_code in (1, 2) and r.stderr.startswith(f"Error: {said}"), r.output
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["error"].startswith(said) and report["checks"] == [], report


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_every_shard_digest_is_the_crc32c_of_its_path_number_and_rows(tiny_store, tmp_path, codec):
    """Recomputed with plain zarr and google_crc32c from the definition, not through kdcache. Codec none: the writer
    combines its inner chunks' crc32c into the digest (several chunks per shard here) instead of a second pass."""
    import google_crc32c

    if codec == "none":
        tiny_store = extract_tiny(tmp_path / "none.zarr", "extract.compression=none", "extract.chunk_mb=0.0001")
        chunks = kdcache.open_store(tiny_store).array("targets/logits").chunks[0]
        assert chunks < 16, chunks
    g = zarr.open_group(tiny_store, mode="r")
    paths = sorted(kdcache.open_store(tiny_store).paths())
    assert paths == ["samples/fingerprint", "samples/index", "samples/label", "targets/layers/features.3", "targets/logits"]
    digests = g["progress/digest"][:]
    assert digests.shape == (4, 5) and digests.dtype == np.uint32
    for s in range(4):
        for a, path in enumerate(paths):
            rows = g[path][16 * s : min(16 * s + 16, 50)]
            data = path.encode() + s.to_bytes(8, "little") + rows.astype(rows.dtype.newbyteorder("<")).tobytes()
            assert int(digests[s, a]) == google_crc32c.value(data), (s, path)
    assert google_crc32c.value(b"samples/index" + (1).to_bytes(8, "little") + np.array([16, 17], "<i8").tobytes()) == 0x15C0E0C5


@pytest.mark.parametrize("how", ["swapped", "from-another-store", "another-array"])
def test_a_shard_object_out_of_its_place_is_found_by_verify_and_refused_by_train(copy, tmp_path, how):
    """Shard objects are moved whole: every checksum holds and the rows decode. Before digests, ``verify`` passed and
    training paired samples 0-15 with the targets of samples 16-31 (or of another store's samples)."""
    logits = copy / "targets" / "logits" / "c"
    if how == "swapped":
        a, b = (logits / "0" / "0").read_bytes(), (logits / "1" / "0").read_bytes()
        (logits / "0" / "0").write_bytes(b)
        (logits / "1" / "0").write_bytes(a)
        first = "shard 0 of targets/logits (rows 0-15)"
        expect = [f"targets/logits: shard 0 (rows 0-15) {MOVED}", f"targets/logits: shard 1 (rows 16-31) {MOVED}"]
    elif how == "from-another-store":
        other = extract_tiny(tmp_path / "other.zarr", "data.split=test")  # the same layout, other samples
        shutil.copyfile(Path(other) / "targets" / "logits" / "c" / "0" / "0", logits / "0" / "0")
        first = "shard 0 of targets/logits (rows 0-15)"
        expect = [f"targets/logits: shard 0 (rows 0-15) {MOVED}"]
    else:  # the label shard where the index shard was: both [16] int64
        shutil.copyfile(copy / "samples" / "label" / "c" / "2", copy / "samples" / "index" / "c" / "2")
        first = "shard 2 of samples/index (rows 32-47)"
        expect = [f"samples/index: shard 2 (rows 32-47) {MOVED}", "samples/index: shard 2: index[r] != r at 16 rows (first row 32: 3)"]  # 3: row 32's label
    report = verify(str(copy))
    assert not report["ok"] and problems(report, "checksums") == []
    assert sorted(problems(report, "values")) == expect
    for budget in ("0", "64"):  # streamed shard by shard, loaded whole
        r = CliRunner().invoke(main, ["train", str(TINY_TOML), "--cache", str(copy), "--out", str(tmp_path / f"run{budget}"),
                                      "--set", f"train.memory_budget_mb={budget}"])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert f"is damaged: {first} {MOVED}" in r.output, r.output
        assert not (tmp_path / f"run{budget}" / "student.pt").exists()


def test_codec_none_shards_swapped_are_refused_by_the_combined_digest_check(tmp_path):
    """Codec none: a whole-shard read checks the digest combined from the inner chunks' crc32c it verified anyway
    (no second pass over the rows); shard objects swapped whole still fail it, and a partial last shard is hashed."""
    location = extract_tiny(tmp_path / "none.zarr", "extract.compression=none", "extract.chunk_mb=0.0001")
    store = kdcache.open_store(location)
    before = {s: store.read("targets/logits", *store.shard_rows(s)) for s in range(4)}
    logits = Path(location) / "targets" / "logits" / "c"
    a, b = (logits / "0" / "0").read_bytes(), (logits / "2" / "0").read_bytes()
    (logits / "0" / "0").write_bytes(b)
    (logits / "2" / "0").write_bytes(a)
    store = kdcache.open_store(location)
    with pytest.raises(kdcache.KdcacheError, match=r"shard 0 of targets/logits \(rows 0-15\) holds other rows"):
        store.read("targets/logits", 0, 16)
    with pytest.raises(kdcache.KdcacheError, match=r"shard 2 of targets/logits \(rows 32-47\) holds other rows"):
        store.read("targets/logits", 32, 50)
    np.testing.assert_array_equal(store.read("targets/logits", 16, 32), before[1])
    np.testing.assert_array_equal(store.read("targets/logits", 48, 50), before[3])
    (logits / "2" / "0").write_bytes(b)  # shard 2 back; the partial last shard swapped with the other index shard
    (logits / "0" / "0").write_bytes(a)
    index = Path(location) / "samples" / "index" / "c"
    (index / "3").write_bytes((index / "1").read_bytes())
    with pytest.raises(kdcache.KdcacheError, match=r"shard 3 of samples/index \(rows 48-49\)"):
        kdcache.open_store(location).read("samples/index", 48, 50)


def test_a_store_written_before_digests_reads_verifies_and_resumes_without_them(tmp_path):
    """A store of kdcache 0.1.0 has no progress/digest (FORMAT.md §14: readers of it ignore the new array): read and
    verified unchecked, and resumed without one, so that its shards never have digests for some shards only."""
    out = Path(extract_tiny(tmp_path / "old.zarr"))
    reference = kdcache.open_store(out).read("targets/logits", 0, 50)
    shutil.rmtree(out / "progress" / "digest")
    without_the_digest_key(out)
    (out / "progress" / "done" / "c" / "3").unlink()  # as if killed before the last shard's marker
    shutil.rmtree(out / "targets" / "logits" / "c" / "3")
    extract_tiny(out)  # resumes
    assert not (out / "progress" / "digest").exists()
    store = kdcache.open_store(out)
    assert store.complete and not store.has_digests() and store.digests() is None
    np.testing.assert_array_equal(store.read("targets/logits", 0, 50), reference)
    report = verify(str(out))
    assert report["ok"], report
    values = next(c for c in report["checks"] if c["name"] == "values")
    assert "no shard digests (no progress/digest: written before kdcache 0.1.1)" in values["summary"]
    r = CliRunner().invoke(main, ["info", str(out)])
    assert "no shard digests: positions unchecked)" in r.output.splitlines()[0], r.output
    assert json.loads(CliRunner().invoke(main, ["info", str(out), "--json"]).output)["shard_digests"] is False


def test_writers_that_do_not_say_shard_digests_never_resume_a_store_that_does(tmp_path):
    """kdcache 0.1.0 does not know progress/digest: resuming a store of a later version it would leave stale digest
    rows. Stores now say compression.shard_digests, which such a writer compares as part of the compression (as
    kdcache's difference() does for a manifest without the key); a store of 0.1.1 (the array, not the key) is
    resumed as it was made, its digests written."""
    out = Path(extract_tiny(tmp_path / "new.zarr"))
    manifest = kdcache.open_store(out).manifest
    assert manifest["compression"] == {"codec": "zstd", "level": 1, "checksum": "crc32c", "shard_digests": "crc32c"}
    old_writer = {**manifest, "compression": {k: v for k, v in manifest["compression"].items() if k != "shard_digests"}}
    with pytest.raises(StoreMismatchError, match=r"was made with different compression \(compression.shard_digests: store has "
                       r"'crc32c', now none\); use the original pipeline to resume"):
        create_or_resume(out, lambda _: old_writer)
    assert kdcache.open_store(out).manifest == manifest

    shutil.copytree(out, tmp_path / "of-0.1.1.zarr")
    of_011 = tmp_path / "of-0.1.1.zarr"
    without_the_digest_key(of_011)
    reference = kdcache.open_store(of_011).read("targets/logits", 0, 50)
    (of_011 / "progress" / "done" / "c" / "3").unlink()  # as if killed before the last shard's marker
    (of_011 / "progress" / "digest" / "c" / "3" / "0").unlink()
    shutil.rmtree(of_011 / "targets" / "logits" / "c" / "3")
    extract_tiny(of_011)  # resumes
    store = kdcache.open_store(of_011)
    assert store.complete and store.digests().all() and "shard_digests" not in store.manifest["compression"]
    np.testing.assert_array_equal(store.read("targets/logits", 0, 50), reference)
    assert verify(str(of_011))["ok"]


def test_a_done_shard_whose_digest_object_is_lost_is_damage_not_unchecked(copy, tmp_path):
    """A store that records digests writes each before its shard's done marker: a done shard without one lost its digest
    object (an incomplete copy, a sync that skipped it), and a stale data object beside it would go unchecked. Named,
    for every array of that shard, by verify and by training (which lists the objects of the shards it reads, digest
    rows with them, before its run begins)."""
    (copy / "progress" / "digest" / "c" / "2" / "0").unlink()
    report = verify(str(copy))
    lost = [p for p in problems(report, "values") if "has no digest in progress/digest" in p]
    assert len(lost) == 5 and all("shard 2 (rows 32-47)" in p for p in lost), problems(report, "values")
    r = CliRunner().invoke(main, ["train", str(TINY_TOML), "--cache", str(copy), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "Traceback" not in r.output and "shards [2], object 'progress/digest/c/2/0' missing" in r.output, r.output


def test_a_truncated_digest_row_is_named_with_the_marker_that_redoes_its_shard(copy, tmp_path):
    """A digest row object cut short (or grown) made the whole digest array fail to decode: verify and every read said
    'progress/digest does not decode' and 'run kdcache verify', never which object, so the documented fix (FORMAT.md §13:
    delete that shard's done marker, rerun extract) could not be followed. Now the object and the marker are named."""
    row = copy / "progress" / "digest" / "c" / "2" / "0"
    row.write_bytes(row.read_bytes()[:10])
    named = "digest row progress/digest/c/2/0 (shard 2: 10 bytes) is not the 20 bytes of one row"
    report = verify(str(copy))
    assert not report["ok"] and any(named in p and "progress/done/c/2" in p for p in problems(report, "layout")), report
    r = CliRunner().invoke(main, ["train", str(TINY_TOML), "--cache", str(copy), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "Traceback" not in r.output and named in r.output, r.output
    (copy / "progress" / "done" / "c" / "2").unlink()  # the fix the error names
    extract_tiny(copy)
    assert verify(str(copy))["ok"]


def test_a_store_whose_digest_array_is_gone_is_damage_not_a_store_from_before_digests(copy, tmp_path):
    """progress/digest deleted whole from a store whose manifest says it keeps digests: verify named it a store written
    before kdcache 0.1.1 and passed, pack and export copied it, training read it with the digest check off (and import
    refused the export, whose fix, re-exporting, gave the same file). Now damage, named by each."""
    import shutil

    shutil.rmtree(copy / "progress" / "digest")
    missing = "progress/digest is missing although its manifest says the store keeps shard digests (compression.shard_digests = 'crc32c')"
    report = verify(str(copy))
    assert not report["ok"] and any(missing in p for p in problems(report, "layout")), report
    for args in (["train", str(TINY_TOML), "--cache", str(copy), "--out", str(tmp_path / "run")],
                 ["pack", str(copy), str(tmp_path / "c.zarr.zip")], ["export", str(copy), str(tmp_path / "c.h5")]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and missing in r.stderr, (args[0], r.output)
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.zarr.zip").exists() and not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("compression", [5, True, "zstd", None])
def test_a_damaged_compression_in_the_stored_manifest_is_named_not_a_crash(tmp_path, compression):
    """A stored compression that is not an object is a damaged manifest, named on opening (resume, info, verify and
    train alike: has_digests reads compression.shard_digests, an AttributeError traceback once); difference() drops
    compression.shard_digests from the new manifest only where the stored one is an object without it (0.1.0/0.1.1)."""
    out = Path(extract_tiny(tmp_path / "s.zarr"))
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["kdcache"]["compression"] = compression
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=rf"has a damaged manifest: compression = {re.escape(repr(compression))}, expected an object"):
        extract_tiny(out)
    assert not verify(str(out))["ok"]


def test_the_teacher_check_does_not_judge_the_pipelines_shard_geometry(tiny_store):
    """The store has its own geometry: a pipeline whose extract.rows_per_shard would make shards larger than a shard may
    hold (an override the verify command kept from elsewhere) still recomputes the store's rows; extract refuses it."""
    r = CliRunner().invoke(main, ["verify", tiny_store, "--teacher-check", "4", "--pipeline", str(TINY_TOML),
                                  "--set", "extract.rows_per_shard=100000000", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"] and len(json.loads(r.stdout)["teacher_check"]["rows"]) == 4



def test_the_teacher_check_recomputes_the_split_the_store_was_extracted_from(tmp_path):
    """A store of the test split checked with the pipeline that extracted it through --set data.split=test, given
    without that --set (its file says "train", as train reads the store's split whatever the pipeline's): every row
    was recomputed from the train split and named as a changed input, each target beyond tolerance."""
    store = extract_tiny(tmp_path / "test.zarr", "data.split='test'")
    r = CliRunner().invoke(main, ["verify", store, "--teacher-check", "6", "--pipeline", str(TINY_TOML), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["ok"] and report["teacher_check"]["targets"]["logits"]["max_abs_error"] < 1e-2

# ----------------------------------------------------------------------------------- verify's own lines


def _flipped_member(packed: Path, member: str, out: Path) -> Path:
    """``packed`` with the first byte of ``member``'s data flipped: its bytes fail the zip's CRC-32."""
    data = bytearray(packed.read_bytes())
    with zipfile.ZipFile(packed) as z:
        info = z.getinfo(member)
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def test_a_done_marker_of_a_zip_that_fails_its_crc32_is_completeness_problem_and_the_checks_go_on(tiny_store, tmp_path):
    """A done marker whose zip member fails the zip's CRC-32 was the open check's failure, nothing else checked, though
    SHARING.md names a damaged done marker under completeness (its shard taken as not done, the checks going on), as
    a shard's damaged member is named under checksums. Its fix fits a zip: a member cannot be deleted from it."""
    from kdcache.interop import pack

    pack(tiny_store, tmp_path / "t.zarr.zip")
    location = str(_flipped_member(tmp_path / "t.zarr.zip", "progress/done/c/1", tmp_path / "m.zarr.zip"))
    report = verify(location)
    assert [c["name"] for c in report["checks"]] == ["completeness", "layout", "checksums", "values"] and not report["ok"]
    assert problems(report, "completeness") == [
        "done marker 'progress/done/c/1' is a corrupted zip member (its bytes fail the zip's CRC-32) (its shard is not "
        "checked); copy the zip again, or pack the store again from its folder (kdcache pack FOLDER OUT)"]
    assert report["checks"][2]["summary"] == "3 shards x 5 arrays" and report["checks"][2]["ok"], report
    with pytest.raises(StoreError, match=r"Bad CRC-32 for file 'progress/done/c/1' \(a corrupted zip member\)"):
        kdcache.open_store(location).done()  # every other reader still refuses the store


def test_a_damaged_done_marker_of_a_zip_names_a_fix_a_zip_allows(tiny_store, tmp_path):
    """Every reader refuses a store whose done marker is not one byte 0 or 1; for a folder the fix is to delete the marker
    and resume extract, which a zip's (or an http server's) reader cannot do: theirs is to copy the store again."""
    from kdcache.interop import pack

    pack(tiny_store, tmp_path / "t.zarr.zip")
    damaged = tmp_path / "m.zarr.zip"
    with zipfile.ZipFile(tmp_path / "t.zarr.zip") as z, zipfile.ZipFile(damaged, "w") as w:
        for info in z.infolist():
            w.writestr(info, b"zz" if info.filename == "progress/done/c/1" else z.read(info))
    with pytest.raises(StoreError, match=r"'progress/done/c/1' \(holds b'zz'\) is not one byte 0 or 1; run kdcache verify .*, then "
                                         r"copy the zip again, or pack the store again from its folder \(kdcache pack FOLDER OUT\)$"):
        kdcache.open_store(str(damaged)).done()
    assert problems(verify(str(damaged)), "completeness") == [
        "done marker 'progress/done/c/1' (holds b'zz') is not one byte 0 or 1 (its shard is not checked); copy the zip "
        "again, or pack the store again from its folder (kdcache pack FOLDER OUT)"]
    assert layout.marker_fix("https://example.org/t.zarr").startswith("ask the store's owner to delete the marker")


def _oversized_shard(store: Path) -> str:
    os.truncate(store / LOGITS_SHARD_1, 2**30)  # sparse: nothing is written
    return str(store)


def _oversized_marker(store: Path) -> str:
    os.truncate(store / "progress/done/c/1", 2**20)
    return str(store)


def _oversized_array_metadata(store: Path) -> str:
    os.truncate(store / "targets/logits/zarr.json", 2**28)
    return str(store)


def _zip_member_failing_crc(member: str):
    def damage(store: Path) -> str:
        from kdcache.interop import pack

        pack(str(store), store.parent / "t.zarr.zip")
        return str(_flipped_member(store.parent / "t.zarr.zip", member, store.parent / "damaged.zarr.zip"))
    return damage


@pytest.mark.parametrize("damage, check, fix", [
    (_oversized_shard, "checksums", "and is not read; copy the store again from its source"),
    (_oversized_marker, "open", "and is not read; copy the store again from its source"),
    (_oversized_array_metadata, "layout", "and is not read; copy the store again from its source"),
    (_zip_member_failing_crc("targets/logits/zarr.json"), "layout", "(a corrupted zip member); pack the store again or copy the zip again"),
    (_zip_member_failing_crc("progress/digest/c/1/0"), "layout", "(a corrupted zip member); pack the store again or copy the zip again"),
], ids=["oversized-shard", "oversized-marker", "oversized-array-metadata", "zip-metadata-crc", "zip-digest-row-crc"])
def test_verify_never_tells_its_user_to_run_kdcache_verify(copy, damage, check, fix):
    """The store's errors send every other command's user to kdcache verify ("run kdcache verify STORE, and copy the
    store again", "kdcache verify STORE lists every damaged chunk; …"); verify listed them as they were, telling its
    user to run what they were running. Its lines keep the next step alone."""
    location = damage(copy)
    report = verify(location)
    said = problems(report, check)
    assert len(said) == 1 and said[0].endswith(fix), said
    assert "kdcache verify" not in json.dumps(report), report


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_checks_an_added_arrays_checksums_as_pack_does_and_names_the_others_unchecked(copy, tmp_path):
    """pack checks the crc32c of an added array's chunk objects where they have the format's shape (FORMAT.md §17) and
    refuses a mismatch saying "kdcache verify STORE lists every damaged shard"; verify did not look at added arrays at
    all: a received store it passed did not pack. It checks them as pack does (the same code), in a folder and in the
    zip pack wrote, and names in its summary those it cannot check (no crc32c)."""
    from kdcache.interop import pack

    group = zarr.open_group(copy, mode="r+")
    for name, compressors in (("checked", [zarr.codecs.GzipCodec(), zarr.codecs.Crc32cCodec()]), ("unchecked", [zarr.codecs.GzipCodec()])):
        group.create_array(f"extra/{name}", shape=(8, 6), shards=(4, 6), chunks=(2, 3), dtype="int32", compressors=compressors)[:] = 7
    pack(str(copy), tmp_path / "t.zarr.zip")
    for location in (str(copy), str(tmp_path / "t.zarr.zip")):
        report = verify(location)
        assert report["ok"], report
        assert report["checks"][2]["summary"] == ("4 shards x 5 arrays + added 'extra/checked'; not checked: added "
                                                  "'extra/unchecked' (not sharded with crc32c checksums)"), report
    _flip_byte(copy / "extra/unchecked/c/1/0", 3)
    assert verify(str(copy))["ok"]  # nothing to check it by
    _flip_byte(copy / "extra/checked/c/1/0", 3)
    report = verify(str(copy))
    assert not report["ok"] and problems(report, "checksums") == [
        "array 'extra/checked' shard 1 (object 'extra/checked/c/1/0') inner chunk 0 fails its crc32c checksum"], report
    with pytest.raises(StoreError, match=r"inner chunk 0 fails its crc32c checksum, damaged on disk or on the way"):
        pack(str(copy), tmp_path / "again.zarr.zip")  # pack and verify agree


def test_a_manifest_copied_from_another_store_is_named_by_its_probe_fingerprints(copy, tmp_path):
    """Another store's zarr.json (same layout, other samples) over this one's: no checksum or digest covers the manifest,
    and verify said "every check holds", while training refused the store as "the dataset changed since extraction".
    The manifest's probe fingerprints (rows 0 and N-1) are now checked against the stored ones."""
    other = Path(extract_tiny(tmp_path / "other.zarr", "data.split=test"))
    shutil.copyfile(other / "zarr.json", copy / "zarr.json")
    report = verify(str(copy))
    assert not report["ok"] and problems(report, "checksums") == []
    found = problems(report, "values")
    assert len(found) == 2 and all(p.startswith("samples/fingerprint: row ") for p in found), found
    assert re.search(r"row 0 holds fingerprint [0-9a-f]{16}, the manifest's dataset.probe_fingerprints says [0-9a-f]{16}: the "
                     r"manifest \(zarr.json\) is not these rows'", found[0]), found
    assert "row 49 holds" in found[1]
    assert verify(str(other))["ok"]


def test_an_array_zarr_json_whose_zarr_format_is_damaged_is_named_as_such_not_missing(copy):
    """An array's zarr.json whose "zarr_format" key had a flipped byte ("{arr_format"): zarr looks for another format's
    metadata and finds none, and the array was "missing (deleted, or an incomplete copy)", which verify nested in its
    line as "'targets/logits/zarr.json' is not valid zarr metadata ('...' is missing the array 'targets/logits' ...)"."""
    meta = copy / "targets" / "logits" / "zarr.json"
    meta.write_bytes(meta.read_bytes().replace(b'"zarr_format"', b'"{arr_format"'))
    found = problems(verify(str(copy)), "layout")
    assert found == ["targets/logits: 'targets/logits/zarr.json' is not valid zarr metadata (its zarr_format is None, not 3); "
                     "re-extract the store"], found
    r = CliRunner().invoke(main, ["train", str(TINY_TOML), "--cache", str(copy), "--out", str(copy.parent / "run")])
    assert r.exit_code == 1 and "'targets/logits/zarr.json' is not valid zarr metadata (its zarr_format is None, not 3)" in r.output, r.output


@pytest.mark.parametrize("command", ["verify", "stats"])
def test_a_store_replaced_while_verify_or_stats_reads_it_is_named_as_replaced_not_damaged(numbered_store, tmp_path, monkeypatch, command):
    """Another extract --overwrite (here of float16 logits) replaced the store after verify or stats had read its first
    shard: the next shards, read by the first store's metadata and digests, were reported as damage (verify's FAIL lines
    "does not decode", whose fix is to re-extract; stats' error naming a damaged shard). It is named as the replacement."""
    from conftest import FIXTURES, NUMBERED
    from kdcache.pipeline import from_dict

    location = tmp_path / "s.zarr"
    shutil.copytree(numbered_store, location)
    other = {**NUMBERED, "targets": {**NUMBERED["targets"], "dtype": "float16"}}
    kdcache.extract(from_dict(other, root=FIXTURES), str(tmp_path / "new.zarr"))
    read_ahead, swap = layout.Store.read_ahead, threading.Lock()

    def replaced_after_the_first(self, wanted, **kwargs):  # the store swapped once its first read is done
        reads = read_ahead(self, wanted, **kwargs)
        yield next(reads)
        with swap:  # once: stats reads its blocks of shards in several dask threads
            if (tmp_path / "new.zarr").exists():
                location.rename(tmp_path / "old.zarr")
                (tmp_path / "new.zarr").rename(location)
        yield from read_ahead(self, wanted[1:], **kwargs)

    monkeypatch.setattr(layout.Store, "read_ahead", replaced_after_the_first)
    r = CliRunner().invoke(main, [command, str(location)])
    assert r.exit_code == 1 and f"Error: {str(location)!r} was replaced while kdcache {command} read it: its manifest's" in r.output, r.output
    assert "damaged" not in r.output and "re-extract" not in r.output


def test_verify_of_a_store_damaged_in_every_shard_does_not_reopen_it_for_each(numbered_store, tmp_path, monkeypatch):
    """A read that fails as damage looks whether the store was replaced (one opening of it: a few round trips to a
    bucket); verify reads every shard, and a store damaged in each of 10,000 shards would be opened 10,000 times. It is
    looked at once a second at most, and the damage is still listed shard by shard."""
    location = tmp_path / "d.zarr"
    shutil.copytree(numbered_store, location)
    for shard in range(7):
        (location / "targets" / "logits" / "c" / str(shard) / "0").unlink()
    opened = []
    open_store = layout.open_store
    monkeypatch.setattr(layout, "open_store", lambda *a, **k: opened.append(a) or open_store(*a, **k))
    report = kdcache.verify.verify(str(location))
    assert not report["ok"] and sum("targets/logits" in p and "missing" in p for c in report["checks"] for p in c["problems"]) == 7, report
    assert len(opened) <= 3, len(opened)  # the first failure's look and verify's own at its end (a slow box: one more)
