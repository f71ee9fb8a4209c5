"""Tests for kdcache.pipeline: TOML files, ``--set`` overrides, validation messages and import paths."""

from __future__ import annotations

import re
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

import kdcache
from kdcache.errors import PipelineError
from conftest import TINY_TOML
from kdcache.extract import setup as extract_setup
from kdcache.pipeline import COUNTS, Pipeline, apply_override, from_dict, load, resolve
from kdcache.train import check_values
from reference import FIXTURES, write_toml

TINY = FIXTURES / "tiny.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ----------------------------------------------------------------------------------- files


def test_load_reads_values_and_defaults():
    p = load(TINY)
    assert p.teacher.factory == "tiny.py:teacher" and p.data.split == "train"
    assert p.targets.layers == ("features.3",) and p.targets.dtype == "float16" and p.targets.logits is True
    assert p.extract.batch_size == 8 and p.extract.rows_per_shard == 16 and p.extract.device == "cpu"
    assert p.extract.compression == "zstd" and p.extract.shard_mb == 64.0  # defaults
    assert p.root == FIXTURES and p.source == str(TINY)


def test_to_dict_round_trips():
    p = load(TINY, ["targets.select.logits=tensor", "train.loss.kl=0.5", "train.features.a.student=b"])
    again = from_dict(p.to_dict(), root=p.root, source=p.source)
    assert again == p
    assert p.to_dict()["targets"]["layers"] == ["features.3"]  # tuples become JSON lists


def test_write_toml_round_trips(tmp_path):
    path = write_toml(tmp_path / "p.toml", 'targets.select."encoder.layers.1"="0"', "extract.shard_mb=0.5")
    p = load(path)
    assert p.targets.select == {"encoder.layers.1": "0"} and p.extract.shard_mb == 0.5
    assert p.teacher.factory == str(FIXTURES / "extract_zoo.py") + ":first_pixel"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.toml", r"pipeline file '.*missing.toml' does not exist; pass the path of a .toml file"),
        (lambda d: write(d / "bad.toml", "[teacher\nfactory = 1\n"), r"pipeline file '.*bad.toml' is not valid TOML: "),
        (lambda d: write(d / "dup.toml", "[extract]\nbatch_size = 1\nbatch_size = 2\n"), r"is not valid TOML"),
        (lambda d: d, r"pipeline file '.*' cannot be read as UTF-8 text"),
        (lambda d: (d / "bin.toml").write_bytes(b"\xff\xfe\x00 binary") and d / "bin.toml", r"cannot be read as UTF-8 text"),
        (lambda d: write(d / "t.toml", "teacher = 5\n"), r"\[teacher\] must be a table, got 5"),
        # kdcache's own outputs in a pipeline's place (the arguments swapped): once "cannot be read as UTF-8 text (Is a directory)"
        (lambda d: write(d / "t.zarr" / "zarr.json", "{}").parent, r"'.*t.zarr' is a zarr store folder .*kdcache train PIPELINE --cache STORE"),
        (lambda d: write(d / "run" / "pipeline.json", "{}").parent, r"'.*run' is a training run's folder \(kdcache train --out\)"),
        (lambda d: (d / "t.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(8)) and d / "t.h5", r"'.*t.h5' is an HDF5 file"),
        (lambda d: write(d / "t.toml", "[techer]\nfactory = 'x.py:f'\n"), r"unknown key 'techer'; did you mean teacher\?"),
    ],
)
def test_unreadable_or_invalid_files(tmp_path, make, match):
    with pytest.raises(PipelineError, match=match):
        load(make(tmp_path))


# ----------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "override, get, expected",
    [
        ("extract.batch_size=64", lambda p: p.extract.batch_size, 64),
        ("extract.batch_size = 3", lambda p: p.extract.batch_size, 3),
        ("extract.device=cuda:1", lambda p: p.extract.device, "cuda:1"),  # not TOML: taken as a string
        ('extract.device="cpu"', lambda p: p.extract.device, "cpu"),
        ("extract.shard_mb=0.5", lambda p: p.extract.shard_mb, 0.5),
        ("extract.shard_mb=2", lambda p: p.extract.shard_mb, 2.0),
        ("targets.logits=false", lambda p: p.targets.logits, False),
        ("targets.layers=a,b", lambda p: p.targets.layers, ("a", "b")),
        ("targets.layers=features.0, features.3", lambda p: p.targets.layers, ("features.0", "features.3")),
        ('targets.layers=["encoder.layers.1", "head"]', lambda p: p.targets.layers, ("encoder.layers.1", "head")),
        ("targets.layers=[]", lambda p: p.targets.layers, ()),
        ("targets.dtype=float32", lambda p: p.targets.dtype, "float32"),
        ("data.split=test", lambda p: p.data.split, "test"),
        ("data.split=a=b", lambda p: p.data.split, "a=b"),  # only the first '=' separates
        ("train.loss.kl=0.25", lambda p: p.train.loss.kl, 0.25),
        ("train.loss.temperature=2", lambda p: p.train.loss.temperature, 2.0),
        ("targets.select.logits=last_hidden_state", lambda p: p.targets.select, {"logits": "last_hidden_state"}),
        ("targets.select.logits=1", lambda p: p.targets.select, {"logits": "1"}),  # an index may be written bare
        ('targets.select."encoder.layers.1"="0"', lambda p: p.targets.select, {"encoder.layers.1": "0"}),
        ("train.features.conv.student=fc", lambda p: p.train.features["conv"], {"student": "fc"}),
        ("student.factory=tiny.py:student", lambda p: p.student.factory, "tiny.py:student"),
    ],
)
def test_set_overrides(override, get, expected):
    p = load(TINY, [override])
    assert get(p) == expected
    assert type(get(p)) is type(expected)


def test_later_overrides_win_and_untouched_values_stay():
    p = load(TINY, ["extract.batch_size=1", "extract.batch_size=2", "targets.select.logits=0", 'targets.select."features.3"=1'])
    assert p.extract.batch_size == 2
    assert p.targets.select == {"logits": "0", "features.3": "1"}
    assert p.targets.layers == ("features.3",) and p.extract.rows_per_shard == 16


def test_overrides_create_missing_sections():
    raw: dict = {}
    for item in ["teacher.factory=m:f", "train.loss.ce=1", "targets.select.x=y"]:
        apply_override(raw, item)
    assert raw == {"teacher": {"factory": "m:f"}, "train": {"loss": {"ce": 1}}, "targets": {"select": {"x": "y"}}}
    p = from_dict(raw)
    assert p.train.loss.ce == 1.0 and p.train.loss.kl == 1.0


def test_overrides_given_as_one_string_are_refused_naming_the_list():
    """``load_pipeline(path, "train.epochs=1")``: not ``override 't' is not of the form ...`` (its first character)."""
    with pytest.raises(PipelineError, match=r"^overrides is the string 'train.epochs=1', not a list of section.key=value strings; "
                                            r"pass \['train.epochs=1'\]$"):
        kdcache.load_pipeline(TINY, "train.epochs=1")


def test_overrides_given_as_a_dict_or_not_as_strings_are_refused_naming_the_fix():
    """``load_pipeline(path, {"extract.batch_size": 4})`` read the dict's keys alone (``override 'extract.batch_size' is not
    of the form ...``); a tuple item failed with an AttributeError from ``str.partition``; ``None`` with a TypeError."""
    with pytest.raises(PipelineError, match=r"^overrides is a dict, .* not a list of section.key=value strings; pass "
                                            r"\['extract.batch_size=4', 'data.split=\"test\"', 'extract.compression=false'\]$"):
        kdcache.load_pipeline(TINY, {"extract.batch_size": 4, "data.split": "test", "extract.compression": False})
    with pytest.raises(PipelineError, match=r"^override \('extract.batch_size', 4\) is a tuple, not a section.key=value string"):
        kdcache.load_pipeline(TINY, [("extract.batch_size", 4)])
    assert kdcache.load_pipeline(TINY, None) == kdcache.load_pipeline(TINY)


@pytest.mark.parametrize("given", [str(TINY), TINY, {"teacher": {"factory": "tiny.py:teacher"}}, None])
@pytest.mark.parametrize("function", ["extract", "dry_run", "train"])
def test_api_functions_refuse_a_pipeline_not_loaded(given, function, tmp_path, monkeypatch):
    """``kdcache.extract("pipelines/mnist.toml", out)`` failed deep inside with ``AttributeError: 'str' object has no
    attribute 'targets'``; now a TypeError names the argument, the value and the fix, before anything is written."""
    monkeypatch.chdir(tmp_path)
    args = {"extract": (given, "s.zarr"), "dry_run": (given,), "train": (given, "s.zarr", "run")}[function]
    fix = f"load it first: kdcache.load_pipeline\\({str(given)!r}\\)" if isinstance(given, (str, Path)) else "kdcache.load_pipeline\\(PATH\\)"
    with pytest.raises(TypeError, match=rf"^pipeline must be a kdcache.Pipeline, got {type(given).__name__} .*{fix}"):
        getattr(kdcache, function)(*args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("function, argument", [("extract", "out"), ("train", "cache_location"), ("train", "out")])
def test_api_functions_refuse_a_location_that_is_not_a_path(function, argument, tiny_store, tmp_path, monkeypatch):
    """``kdcache.extract(p, None)`` wrote a store in a folder named ``None`` of the working directory (``str(None)``), and
    ``train(p, None, out)`` trained from it; an opened Store was named as ``no store at '<kdcache.store.Store object ...>'``."""
    monkeypatch.chdir(tmp_path)
    p = load(TINY)
    for wrong, fix in [(None, "pass a path or URL as a str or pathlib.Path"), (3, "pass a path or URL"),
                       (kdcache.open_store(tiny_store), f"pass its location, {argument}=store.location \\({tiny_store!r}\\)")]:
        args = {"out": "run", "cache_location": tiny_store} if function == "train" else {"out": "s.zarr"}
        args[argument] = wrong
        with pytest.raises(TypeError, match=rf"^{argument} must be the location of a store or folder, got {type(wrong).__name__} .*; {fix}"):
            getattr(kdcache, function)(p, *args.values()) if function == "extract" else kdcache.train(p, args["cache_location"], args["out"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("function", ["extract", "train", "open_store", "TransferSet"])
def test_api_functions_refuse_storage_options_that_are_not_a_dict(function, tiny_store, tmp_path, monkeypatch):
    """``storage_options="anon=true"`` was read as its characters (``storage options ['=', 'a', 'e', ...] apply to URL
    locations``), after extract had built its teacher; a list of the CLI's KEY=VALUE strings as option names."""
    import tiny

    monkeypatch.chdir(tmp_path)
    p = load(TINY)
    call = {"extract": lambda o: kdcache.extract(p, "s.zarr", storage_options=o),
            "train": lambda o: kdcache.train(p, tiny_store, "run", storage_options=o),
            "open_store": lambda o: kdcache.open_store(tiny_store, storage_options=o),
            "TransferSet": lambda o: kdcache.TransferSet(tiny_store, tiny.dataset(), ["logits"], batch_size=8, storage_options=o)}[function]
    for wrong in ("anon=true", ["anon=true"]):
        with pytest.raises(TypeError, match=rf"^storage_options must be a dict of fsspec options, got {type(wrong).__name__} "
                                            rf"{re.escape(repr(wrong))}; pass e.g. \{{'anon': True\}}"):
            call(wrong)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("function, argument", [("extract", "overwrite"), ("extract", "progress"), ("train", "overwrite"),
                                                ("train", "allow_partial"), ("train", "progress"), ("train", "resume"),
                                                ("TransferSet", "shuffle"), ("TransferSet", "drop_last"), ("pack", "overwrite"),
                                                ("export_hdf5", "overwrite"), ("import_hdf5", "overwrite")])
def test_api_flags_refuse_what_is_not_a_bool(function, argument, tiny_store, tmp_path, monkeypatch):
    """Any truthy value was taken as True: ``kdcache.extract(p, out, overwrite="no")`` replaced the store, ``allow_partial="no"``
    trained on a partial one, ``shuffle="False"`` shuffled. A numpy bool is a bool; an int is not (nor is it in a pipeline)."""
    import numpy as np
    import tiny
    from kdcache import interop

    monkeypatch.chdir(tmp_path)
    p = load(TINY)
    call = {"extract": lambda **f: kdcache.extract(p, "s.zarr", **f), "train": lambda **f: kdcache.train(p, tiny_store, "run", **f),
            "TransferSet": lambda **f: kdcache.TransferSet(tiny_store, tiny.dataset(), ["logits"], batch_size=8, **f),
            "pack": lambda **f: interop.pack(tiny_store, "t.zarr.zip", **f), "export_hdf5": lambda **f: interop.export_hdf5(tiny_store, "t.h5", **f),
            "import_hdf5": lambda **f: interop.import_hdf5("t.h5", "s.zarr", **f)}[function]
    choices = 'True, False or "auto"' if argument == "resume" else "True or False"
    for wrong in ("no", "False", 1, 0, None, [True]):
        with pytest.raises(TypeError, match=rf"^{argument} must be {choices}, got {type(wrong).__name__} {re.escape(repr(wrong))}$"):
            call(**{argument: wrong})
    assert list(tmp_path.iterdir()) == []
    if function == "TransferSet":  # a numpy bool is one (what numpy's comparisons and reductions give)
        assert getattr(call(**{argument: np.bool_(False)}), argument) is False


@pytest.mark.parametrize(
    "override, match",
    [
        ("extract.batch_size", r"override 'extract.batch_size' is not of the form section.key=value"),
        ("=3", r"is not of the form section.key=value"),
        ("extract.batch_size.x=1", r"override 'extract.batch_size.x=1': 'batch_size' is a value, not a section"),
        ("extract..batch_size=1", r"'extract..batch_size' is not a dotted key"),
        ("extract.batch size=1", r"is not a dotted key"),
    ],
)
def test_malformed_overrides(override, match):
    with pytest.raises(PipelineError, match=match):
        load(TINY, [override])


@pytest.mark.parametrize(
    "override, match",
    [
        ("extract.batch_sise=3", r"unknown key 'extract.batch_sise'; did you mean extract.batch_size\?"),
        ("trian.epochs=1", r"unknown key 'trian'; did you mean train\?"),
        ("targets.layer=a", r"unknown key 'targets.layer'; did you mean targets.layers\?"),
        ("train.loss.kll=1", r"unknown key 'train.loss.kll'; did you mean train.loss.kl\?"),
        ("extract.zzz=1", r"unknown key 'extract.zzz'; known keys: batch_size, device, precision"),
        ("train.features.conv.studnet=x", r"unknown key \"train.features.'conv'.studnet\"; did you mean train.features.'conv'.student"),
    ],
)
def test_unknown_keys_suggest_close_matches(override, match):
    with pytest.raises(PipelineError, match=match):
        load(TINY, [override])


@pytest.mark.parametrize(
    "override, match",
    [
        ("targets.dtype=bfloat16", r"targets.dtype = 'bfloat16' is not one of float16, float32"),
        ("extract.precision=fp8", r"extract.precision = 'fp8' is not one of fp32, bf16, fp16"),
        ("extract.compression=gzip", r"extract.compression = 'gzip' is not one of zstd, none"),
        ("train.optimizer=adam", r"train.optimizer = 'adam' is not one of adamw, sgd"),
        ("train.schedule=linear", r"train.schedule = 'linear' is not one of cosine, constant"),
    ],
)
def test_bad_choices_list_the_valid_ones(override, match):
    with pytest.raises(PipelineError, match=match):
        load(TINY, [override])


@pytest.mark.parametrize(
    "override, match",
    [
        ("extract.batch_size=-1", r"extract.batch_size must be a whole number >= 1, got -1"),
        ("extract.batch_size=true", r"extract.batch_size must be a whole number >= 1, got True"),
        ("extract.batch_size=1.5", r"extract.batch_size must be a whole number >= 1, got 1.5"),
        ("extract.batch_size=many", r"extract.batch_size must be a whole number >= 1, got 'many'"),
        ("extract.shard_mb=-2", r"extract.shard_mb must be a finite number > 0, got -2"),
        ('train.loss.temperature="2"', r"train.loss.temperature must be a number from 0.01 to 1000, got '2'"),  # not ">= 0": 0 is refused too
        ("train.fingerprint_check=-0.5", r"train.fingerprint_check must be a fraction from 0 to 1, got -0.5"),
        ("targets.logits=1", r"targets.logits must be true or false, got 1"),
        ("targets.layers=[1, 2]", r'targets.layers must be a list of names, e\.g\. \["a", "b"\], got \[1, 2\]'),
        ('targets.layers=["a", ""]', r"targets.layers must be a list of names"),
        ("data.split=[1]", r"data.split must be a quoted string, got \[1\]"),
        ("targets.select=x", r"targets.select must be a table, e\.g\. \{ key = value \}, got 'x'"),
        ("targets.select.logits=1.5", r"targets.select.'logits' must be a string such as \"0\", \"logits\""),
        ("targets.select.logits=true", r"targets.select.'logits' must be a string"),
        ("targets.select.encoder.layers.1=0", r"targets.select.'encoder' must be a string .*quote a layer name holding dots"),
        ("train.loss=1", r"train.loss must be a table, got 1"),
        ("train.features.conv=fc", r"train.features.'conv' must be a table, got 'fc'"),
        ("train.features.conv.weight=1", r"train.features.'conv' needs student = \"<student module name>\""),
        # a module named by its index in a Sequential, unquoted: once "needs student = ..., got {'student': 2}"
        ("train.features.conv.student=2", r"train.features.conv.student must be a quoted string, the name of a student module .*"
                                          r"got 2 \(TOML reads 2 unquoted as a number: .*--set 'train.features.conv.student=\"2\"'\)"),
        ("train.fingerprint_check=1.5", r"train.fingerprint_check = 1.5 is a fraction of rows; use a value from 0 to 1"),
        ("train.fingerprint_recheck=2", r"train.fingerprint_recheck = 2 is a fraction of rows"),
    ],
)
def test_wrong_types_name_the_key_and_the_value(override, match):
    with pytest.raises(PipelineError, match=match):
        load(TINY, [override])


@pytest.mark.parametrize("key", sorted(".".join(k) for k in COUNTS))
def test_a_count_whose_least_value_is_1_names_1_whether_it_is_negative_or_0(key):
    """--batch-size -3 said "a whole number >= 0", then --batch-size 0 said ">= 1": the first message named a minimum
    that did not hold. Both name 1; another whole number still says >= 0."""
    with pytest.raises(PipelineError, match=rf"^override '{key}=-3': {key} must be a whole number >= 1, got -3$"):
        load(TINY, [f"{key}=-3"])
    zero = load(TINY, [f"{key}=0"])
    with pytest.raises(PipelineError, match=rf"^override '{key}=0': {key} must be >= 1\b.*got 0"):
        check_values(zero) if key.startswith("train.") else extract_setup(zero)
    with pytest.raises(PipelineError, match=r"train.subset must be a whole number >= 0, got -3$"):
        load(TINY, ["train.subset=-3"])


@pytest.mark.parametrize("override, key, value", [
    ("data.split=1", "data.split", "1"), ("train.eval_split=true", "train.eval_split", "true"),
    ("data.split=2024-01-01", "data.split", "2024-01-01"), ("train.eval_split=0.5", "train.eval_split", "0.5"),
])
def test_a_string_read_as_another_value_names_the_quoting_that_works_on_a_command_line(override, key, value):
    """``--set data.split=1`` (a split named by number) is the number 1: "a quoted string" alone led to ``--set
    data.split="1"``, whose quotes the shell strips (the same error again). The fix the message names works as printed."""
    with pytest.raises(PipelineError) as e:
        load(TINY, [override])
    fix = re.search(r"--set ('[^']*')\)$", str(e.value))
    assert fix, str(e.value)
    section, name = key.split(".")
    (given,) = shlex.split(fix.group(1))  # as a shell passes it
    assert getattr(getattr(load(TINY, [given]), section), name) == value


def test_loading_runs_no_code(tmp_path):
    write(tmp_path / "boom.py", "raise SystemExit('imported!')\n")
    path = write(tmp_path / "p.toml", '[teacher]\nfactory = "boom.py:make"\n[data]\nfactory = "boom.py:data"\n')
    p = load(path)
    assert p.teacher.factory == "boom.py:make"
    with pytest.raises(SystemExit, match="imported!"):
        p.resolve(p.teacher.factory)
    assert "boom" not in sys.modules


# ----------------------------------------------------------------------------------- import paths


def test_file_path_is_relative_to_the_pipeline_folder_not_the_cwd(tmp_path, monkeypatch):
    write(tmp_path / "pipes" / "models" / "nets.py", "def make():\n    return 'made in nets'\n")
    path = write(tmp_path / "pipes" / "p.toml", '[teacher]\nfactory = "models/nets.py:make"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = load(path)
    assert p.root == (tmp_path / "pipes").resolve()
    assert p.resolve(p.teacher.factory)() == "made in nets"


def test_file_path_may_point_to_a_parent_folder_and_import_its_siblings(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    write(tmp_path / "shared" / "helper_for_kdcache_test.py", "VALUE = 41\n")
    write(tmp_path / "shared" / "factories.py", "import helper_for_kdcache_test\n\ndef make():\n    return helper_for_kdcache_test.VALUE + 1\n")
    write(tmp_path / "pipes" / "p.toml", "")
    assert resolve("../shared/factories.py:make", tmp_path / "pipes")() == 42


def test_a_file_is_imported_once(tmp_path):
    write(tmp_path / "once_module_for_test.py", "import itertools\nCOUNTER = itertools.count()\nFIRST = next(COUNTER)\n")
    a = resolve("once_module_for_test.py:COUNTER", tmp_path)
    b = resolve("./once_module_for_test.py:COUNTER", tmp_path)
    assert a is b and next(a) == 1


def test_a_file_named_like_an_installed_module_is_still_the_file(tmp_path):
    """And the folder's files do not shadow those modules for the rest of the process: the folder went first on sys.path,
    so a module imported later (or by a spawned dask worker, which inherits sys.path: 'json' has no attribute 'load')
    was the folder's file of that name."""
    import importlib.util

    write(tmp_path / "json.py", "def make():\n    return 'local json.py'\n")
    write(tmp_path / "tabnanny.py", "")  # a standard library module nothing here has imported
    assert resolve("json.py:make", tmp_path)() == "local json.py"
    import json

    assert hasattr(json, "dumps")  # the standard library module is untouched
    assert Path(importlib.util.find_spec("tabnanny").origin).parent != tmp_path


def test_a_file_importable_under_its_own_name_keeps_that_name(tmp_path, monkeypatch):
    """Same module name whether or not the folder is on sys.path (the store records class names from it)."""
    write(tmp_path / "stem_kept_for_test.py", "class Teacher:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = resolve("stem_kept_for_test.py:Teacher", tmp_path)
    assert cls.__module__ == "stem_kept_for_test"
    import stem_kept_for_test

    assert stem_kept_for_test.Teacher is cls


def test_two_files_with_the_same_name_stay_apart(tmp_path):
    write(tmp_path / "a" / "factory_twin.py", "WHO = 'a'\n")
    write(tmp_path / "b" / "factory_twin.py", "WHO = 'b'\n")
    assert resolve("a/factory_twin.py:WHO", tmp_path) == "a"
    assert resolve("b/factory_twin.py:WHO", tmp_path) == "b"


def test_fixture_file_resolves_to_the_module_tests_import():
    import extract_zoo

    assert resolve("extract_zoo.py:first_pixel", FIXTURES) is extract_zoo.first_pixel


@pytest.mark.parametrize(
    "path, expected",
    [("torch.nn:Identity", "Identity"), ("kdcache.pipeline:load", "load"), ("collections:OrderedDict", "OrderedDict")],
)
def test_package_module_paths(path, expected):
    assert resolve(path).__name__ == expected


@pytest.mark.parametrize(
    "path, match",
    [
        ("no_colon", r"import path 'no_colon' is not of the form package.module:attr or path/to/file.py:attr"),
        ("module:", r"is not of the form"),
        (":attr", r"is not of the form"),
        ("missing.py:make", r"import path 'missing.py:make': file '.*missing.py' does not exist \(paths are relative to the pipeline file's folder\)"),
        ("extract_zoo.py:first_pixle", r"'extract_zoo' has no attribute 'first_pixle'; did you mean first_pixel"),
        ("extract_zoo.py:zzzzzz", r"has no attribute 'zzzzzz'$"),
        ("no_such_package_xyz.models:make", r"module 'no_such_package_xyz' not found; install it or use a path/to/file.py:attr path"),
        ("kdcache.no_such_module:make", r"module 'kdcache.no_such_module' not found"),
        ("kdcache.pipeline:laod", r"'kdcache.pipeline' has no attribute 'laod'; did you mean load"),
    ],
)
def test_import_path_errors(path, match):
    with pytest.raises(PipelineError, match=match):
        resolve(path, FIXTURES)


def test_import_path_errors_from_a_pipeline(tmp_path):
    path = write(tmp_path / "p.toml", '[teacher]\nfactory = "nets.py:make"\n')
    p = load(path)
    with pytest.raises(PipelineError, match=r"file '.*nets.py' does not exist"):
        p.resolve(p.teacher.factory)


def test_a_misspelt_name_in_a_lazy_module_gets_its_suggestion_without_importing_the_rest(tmp_path):
    """A lazy module (transformers': each name imports its submodule on first use, which may fail for want of a backend):
    the suggestion looks only at names close to the one asked for (was: every name of the module got, each an import,
    and the first that failed to import ended the command in a traceback)."""
    write(tmp_path / "lazy.py", textwrap.dedent("""\
        import torch

        NAMES = ["AutoModel", "AutoModelForCausalLM", *(f"Model{i}" for i in range(1000)), "BrokenBackendModel"]
        got = []

        def __dir__():
            return NAMES

        def __getattr__(name):
            got.append(name)
            if name == "BrokenBackendModel":
                raise RuntimeError("Failed to import lazy.broken: no backend")
            if name in NAMES:
                return torch.nn.Linear
            raise AttributeError(name)
        """))
    with pytest.raises(PipelineError, match=re.escape("has no attribute 'AutoModl'; did you mean AutoModel")):
        resolve("lazy.py:AutoModl", tmp_path)
    module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str((tmp_path / "lazy.py").resolve()))
    assert len(module.got) <= 11, len(module.got)


def test_a_factory_that_cannot_be_imported_is_named_by_its_key_and_where_it_was_given(tmp_path):
    """The import error quoted the path alone: with a teacher, a student and a dataset factory, which one was it?"""
    path = write(tmp_path / "p.toml", '[teacher]\nfactory = "nets.py:make"\n')
    with pytest.raises(PipelineError, match=re.escape(f"{path}: teacher.factory: import path 'nets.py:make': file ")):
        load(path).call("teacher.factory")
    with pytest.raises(PipelineError, match=re.escape("override 'data.factory=\"kdcache.pipeline:laod\"': data.factory: import path "
                                                      "'kdcache.pipeline:laod': 'kdcache.pipeline' has no attribute 'laod'")):
        load(path, ['data.factory="kdcache.pipeline:laod"']).call("data.factory", "train")


def test_defaults_need_no_file():
    p = Pipeline()
    assert p.extract.batch_size == 256 and p.targets.dtype == "float16" and p.source == "<dict>"


def test_a_module_that_raises_when_imported_is_named_with_where(tmp_path, monkeypatch):
    (tmp_path / "kdcache_raises_at_import.py").write_text("x = 1\nx / 0\n")
    (tmp_path / "kdcache_imports_missing.py").write_text("import no_such_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PipelineError, match=r"'kdcache_raises_at_import:teacher': importing it raised ZeroDivisionError: .* \(at kdcache_raises_at_import.py:2\)"):
        resolve("kdcache_raises_at_import:teacher")
    # a dependency of the module is missing (not the module itself): named as what the module raised
    with pytest.raises(PipelineError, match=r"raised ModuleNotFoundError: No module named 'no_such_dep_xyz' \(at kdcache_imports_missing.py:1\)"):
        resolve("kdcache_imports_missing:teacher")
    with pytest.raises(PipelineError, match=r"module 'kdcache_not_there' not found; install it"):
        resolve("kdcache_not_there.sub:teacher")


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    """Some Windows editors start a UTF-8 file with a byte-order mark: TOML has no place for it, kdcache skips it."""
    path = tmp_path / "p.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'[extract]\nbatch_size = 7\n')
    assert kdcache.load_pipeline(path).extract.batch_size == 7


def test_a_value_an_override_set_is_named_as_the_override_not_as_the_file():
    """tiny.toml says train.batch_size = 8: an error about the value an override gave began 'tiny.toml: train.batch_size
    must be ..., got -2', sending the reader to a file that says 8. It names the override (the last one that set the
    key, or a table holding it); a value from the file is still named as the file's."""
    with pytest.raises(PipelineError, match=r"^override 'train.batch_size=-2': train.batch_size must be a whole number >= 1, got -2$"):
        load(TINY_TOML, ["train.batch_size=4", "train.batch_size=-2"])
    with pytest.raises(PipelineError, match=r"^override 'train=\{lr=-1\}': train.lr must be"):
        load(TINY_TOML, ["train.batch_size=4", "train={lr=-1}"])
    p = load(TINY_TOML, ["train.lr=0"])
    assert p.where("train.lr") == "override 'train.lr=0'" and p.where("train.batch_size") == str(TINY_TOML)
    assert p == load(TINY_TOML, ["train.lr=0.0"])  # where a value came from is not part of the pipeline


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'; did you mean train.lr?"),
    ("trian.lr=1", "unknown key 'trian'; did you mean train?"),
    ('train.features."features.3".wieght=1', "unknown key \"train.features.'features.3'.wieght\"; did you mean"),
    ("train=5", "[train] must be a table, got 5"),
    ("train.features.conv.weight=1", "train.features.'conv' needs student"),  # the entry the override made
])
def test_an_error_about_a_key_an_override_gave_names_the_override_not_the_file(override, message, tmp_path):
    """A typo in --set (an unknown key), a section it replaced by a value, an entry it made: each began with the pipeline
    file's name ('tiny.toml: unknown key 'train.lrr''), which holds no such key. A key the file holds is still the file's."""
    with pytest.raises(PipelineError) as e:
        load(TINY_TOML, [override])
    assert str(e.value).startswith(f"override {override!r}: {message}"), str(e.value)
    file = tmp_path / "typo.toml"  # the same typo in the file, beside an override of another key: the file's
    file.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{TINY_TOML.parent}/tiny.py:').replace("lr = 0.01", "lrr = 0.01"))
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(file))}: unknown key 'train.lrr'"):
        load(file, ["train.epochs=3"])
