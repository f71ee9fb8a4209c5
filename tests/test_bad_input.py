"""The bad-input matrix: every user mistake we know of, through the CLI, in one table.

Each case runs ``kdcache ...`` (click's CliRunner, in this process) and checks: the exit status
(1 for a user mistake, 2 for a click usage error); exactly one ``Error: ...`` line on stderr
holding the expected fragments (what was wrong, the value seen, the fix); no traceback; and, for
a case run against an existing store or training run, that not one byte or mtime of it changed. ``verify``
reports a damaged store as its report (exit 1), not as an ``Error:`` line. A few representative
cases run again in a real ``kdcache`` process (``slow``) to prove stderr holds no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from click.testing import CliRunner

from kdcache.cli import main
from reference import FIXTURES, write_toml

# the line of tests/fixtures/bad_input.py that a wrong-input error names
WRONG_INPUT_LINE = next(i for i, line in enumerate((FIXTURES / "bad_input.py").read_text().splitlines(), 1) if "wrong-input error" in line)

TINY = FIXTURES / "tiny.toml"
KDCACHE = Path(sys.executable).with_name("kdcache")  # the console script of this environment
LOGITS_SHARD_1 = "targets/logits/c/1/0"
FEATURES_SHARD_2 = "targets/layers/features.3/c/2/0/0/0"
NEAR_A_MODULE = "import numpy as np\nfrom torch import nn\nnets = [64, 4]\n\ndef net():\n    return nn.Linear(64, 4)\n"
TRAIN = "tiny.zarr"  # name of the private copy of the tiny store a case trains from / inspects


# ----------------------------------------------------------------------------------- helpers


@dataclass
class Ctx:
    """What a case's arguments are built from: its folder and (with ``store=True``) its copy of the tiny store."""

    tmp: Path

    @property
    def store(self) -> Path:
        return self.tmp / TRAIN

    @property
    def new(self) -> Path:
        """A store location that does not exist (a failed validation must leave it so)."""
        return self.tmp / "new.zarr"

    @property
    def run(self) -> Path:
        return self.tmp / "run"


def text_file(ctx: Ctx, name: str, text: str | bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def tiny_plus(ctx: Ctx, extra: str) -> Path:
    """tiny.toml with ``extra`` appended, written to the case's folder (factory paths made absolute)."""
    text = TINY.read_text().replace('"tiny.py:', f'"{FIXTURES}/tiny.py:')
    return text_file(ctx, "p.toml", text + "\n" + extra + "\n")


def zoo(ctx: Ctx, *overrides: str) -> Path:
    return write_toml(ctx.tmp / "zoo.toml", *overrides)


def extract(*args: Any) -> list[Any]:
    return ["extract", TINY, *args]


def train(ctx: Ctx, *args: Any) -> list[Any]:
    return ["train", TINY, "--cache", ctx.store, "--out", ctx.run, *args]


def edit_manifest(store: Path, **values: Any) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["kdcache"].update(values)
    (store / "zarr.json").write_text(json.dumps(meta))


def flip_byte(store: Path, key: str, at: int = 5) -> None:
    data = bytearray((store / key).read_bytes())
    data[at] ^= 0xFF
    (store / key).write_bytes(bytes(data))


def truncate(store: Path, key: str, keep: float = 0.5) -> None:
    data = (store / key).read_bytes()
    (store / key).write_bytes(data[: int(len(data) * keep)])


def unmark(store: Path, shard: int) -> None:
    """Make a complete store partial: shard ``shard`` no longer done (its data stays)."""
    (store / "progress/done/c" / str(shard)).unlink()


def factory_file(ctx: Ctx, name: str, text: str) -> str:
    """A teacher.factory override naming ``teacher`` in a file of the case's folder holding ``text``."""
    return f"teacher.factory={text_file(ctx, name, text)}:teacher"


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def invoke_ok(args: list[Any]) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def no_logits(ctx: Ctx, split: str = "train") -> Path:
    """The location of a store of tiny.toml's ``split`` holding ``features.3`` alone (targets.logits = false)."""
    return ctx.tmp / f"{split}-no-logits.zarr"


def extract_no_logits(ctx: Ctx, split: str = "train") -> None:
    invoke_ok(extract("--out", no_logits(ctx, split), "--set", "targets.logits=false", "--set", f"data.split={split!r}"))


def trained(ctx: Ctx) -> Path:
    """A finished one-epoch training run in ``ctx.run`` (from the case's store)."""
    result = CliRunner().invoke(main, [str(a) for a in train(ctx, "--epochs", "1")])
    assert result.exit_code == 0, result.output
    return ctx.run


def another_tools_run(run: Path) -> None:
    """``run`` made by another tool: its checkpoint.pt without kdcache's keys, a student.pt, no pipeline.json."""
    run.mkdir()
    torch.save({"model": {"weight": torch.zeros(2)}, "optimizer": {}}, run / "checkpoint.pt")
    torch.save({"weight": torch.zeros(2)}, run / "student.pt")


def unrecorded(run: Path) -> None:
    """A run of an earlier kdcache that lost its pipeline.json: its checkpoint records no values either."""
    (run / "pipeline.json").unlink()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    del checkpoint["pipeline"]
    torch.save(checkpoint, run / "checkpoint.pt")


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and mtime (ns)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """A folder nothing can be written into (made, where it is not there yet, empty): as root (chmod binds no root) a
    read-only bind mount of it over itself, else chmod 555."""
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    for how in (["--bind"], ["-o", "remount,bind,ro"]):
        mounted = subprocess.run(["mount", *how, str(path), str(path)], capture_output=True, text=True)
        if mounted.returncode != 0:
            if how != ["--bind"]:
                subprocess.run(["umount", str(path)], check=True)
            pytest.skip(f"running as root and cannot mount {str(path)!r} read-only ({mounted.stderr.strip()}); chmod binds no root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def environment(values: tuple[tuple[str, str | None], ...]) -> Iterator[None]:
    """The environment variables ``values`` set (a None one unset) inside the block, as they were after it."""
    def put(name: str, value: str | None) -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    before = {name: os.environ.get(name) for name, _ in values}
    try:
        for name, value in values:
            put(name, value)
        yield
    finally:
        for name, value in before.items():
            put(name, value)


# ----------------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Ctx], list[Any]]
    match: tuple[str, ...]  # fragments of the one Error line (or of the verify report)
    code: int = 1
    store: bool = False  # the case runs against its own copy of the tiny store, which must stay unchanged
    damage: Callable[[Path], None] | None = None  # done to that copy before the run (and the snapshot)
    prior: Callable[[Ctx], None] | None = None  # run before (e.g. a first training run into ctx.run)
    report: bool = False  # kdcache verify: the failure is its report, not an Error line
    writes: bool = False  # the run may create ctx.new (it fails mid-run)
    read_only: bool = False  # ctx.tmp / "ro" is a read-only folder during the run
    read_only_run: bool = False  # ctx.run (the prior step's training run) is read-only during the run
    cuda: bool = False  # only meaningful where CUDA is absent
    env: tuple[tuple[str, str | None], ...] = ()  # environment variables set (None: unset) during the run


CASES = [
    # -- the pipeline file and overrides
    Case("missing-pipeline", lambda c: ["extract", c.tmp / "missing.toml", "--out", c.new],
         ("missing.toml' does not exist", "pass the path of a .toml file")),
    Case("toml-syntax", lambda c: ["extract", text_file(c, "bad.toml", '[teacher]\nfactory = "tiny.py:teacher"\nbatch = \n'), "--out", c.new],
         ("bad.toml' is not valid TOML", "line 3")),
    Case("not-utf8", lambda c: ["extract", text_file(c, "bin.toml", b"\xff\xfe\x00bad"), "--out", c.new],
         ("bin.toml' cannot be read as UTF-8 text", "pass the path of a .toml file")),
    Case("section-not-table", lambda c: ["extract", text_file(c, "p.toml", 'teacher = "tiny.py:teacher"\n'), "--out", c.new],
         ("[teacher] must be a table, got 'tiny.py:teacher'", "write a [teacher] section header")),
    # a TOML date where a number or a table goes: once quoted as Python shows it, datetime.date(1979, 5, 27)
    Case("date-for-a-number", lambda c: extract("--out", c.new, "--set", "extract.batch_size=1979-05-27"),
         ("--set extract.batch_size=1979-05-27: extract.batch_size must be a whole number >= 1, got 1979-05-27",)),
    Case("date-for-a-section", lambda c: ["extract", text_file(c, "p.toml", "teacher = 1979-05-27\n"), "--out", c.new],
         ("[teacher] must be a table, got 1979-05-27; write a [teacher] section header",)),
    Case("date-in-a-list", lambda c: extract("--out", c.new, "--set", "targets.layers=[1979-05-27]"),
         ("targets.layers must be a list of names, e.g. [\"a\", \"b\"], got [1979-05-27]",)),
    Case("date-in-a-table", lambda c: train(c, "--set", 'train.features={"features.3"={student=1979-05-27}}'),
         ("train.features.\"features.3\".student must be a quoted string, the name of a student module", "got 1979-05-27 (TOML reads"), store=True),
    Case("unknown-section", lambda c: ["extract", tiny_plus(c, "[trian]\nepochs = 1"), "--out", c.new],
         ("unknown key 'trian'", "did you mean train?")),
    Case("unknown-key-in-file", lambda c: ["extract", text_file(c, "p.toml", '[teacher]\nfactroy = "tiny.py:teacher"\n'), "--out", c.new],
         ("p.toml: unknown key 'teacher.factroy'", "did you mean teacher.factory?")),
    Case("key-of-another-section", lambda c: extract("--out", c.new, "--set", "extract.dtype=float32"),
         ("unknown key 'extract.dtype'; did you mean targets.dtype? (extract has no 'dtype')",)),
    Case("unknown-key-root", lambda c: extract("--out", c.new, "--set", 'root="/etc"'), ("unknown key 'root'",)),
    Case("key-without-its-section", lambda c: extract("--out", c.new, "--set", "batch_size=64"),
         ("--set batch_size=64: unknown key 'batch_size'; did you mean extract.batch_size or train.batch_size? (every key sits "
          "in a section: [extract] batch_size = … in a file, --set extract.batch_size=… on a command line)",)),
    Case("layer-listed-twice", lambda c: extract("--out", c.new, "--layers", "features.3,features.3"),
         ("targets.layers lists 'features.3' twice; list each layer once",)),
    Case("layers-differ-in-case", lambda c: extract("--dry-run", "--layers", "features.3,Features.3"),
         ("layer names 'features.3' and 'Features.3' differ only in case",)),
    Case("unknown-key", lambda c: extract("--out", c.new, "--set", "extract.batch_sise=4"),
         ("unknown key 'extract.batch_sise'", "did you mean extract.batch_size?")),
    Case("set-not-key-value", lambda c: extract("--out", c.new, "--set", "extract.batch_size"),
         ("override 'extract.batch_size' is not of the form section.key=value",)),
    Case("set-wrong-type", lambda c: extract("--out", c.new, "--set", "extract.batch_size=abc"),
         ("extract.batch_size must be a whole number >= 1, got 'abc'",)),
    Case("set-not-a-choice", lambda c: extract("--out", c.new, "--set", "targets.dtype=bfloat16"),
         ("targets.dtype = 'bfloat16' is not one of float16, float32",)),
    # -- import paths and factories
    Case("import-file-missing", lambda c: extract("--out", c.new, "--set", "teacher.factory=nowhere.py:teacher"),
         ("import path 'nowhere.py:teacher'", "nowhere.py' does not exist", "relative to the pipeline file's folder")),
    Case("import-module-missing", lambda c: extract("--out", c.new, "--set", "teacher.factory=no_such_pkg.models:teacher"),
         ("module 'no_such_pkg' not found", "install it")),
    Case("import-path-malformed", lambda c: extract("--out", c.new, "--set", "teacher.factory=tiny.py"),
         ("import path 'tiny.py' is not of the form package.module:attr or path/to/file.py:attr",)),
    Case("import-syntax-error", lambda c: extract("--out", c.new, "--set", factory_file(c, "syn.py", "def teacher(:")),
         ("importing it raised SyntaxError: invalid syntax (at syn.py:1)", "fix that file")),
    Case("import-raises", lambda c: extract("--out", c.new, "--set", factory_file(c, "boom.py", 'x = 1\nraise RuntimeError("no GPU config")')),
         ("importing it raised RuntimeError: no GPU config (at boom.py:2)",)),
    Case("import-missing-dependency", lambda c: extract("--out", c.new, "--set", factory_file(c, "dep.py", "import no_such_dep_xyz")),
         ("importing it raised ModuleNotFoundError: No module named 'no_such_dep_xyz' (at dep.py:1)",)),
    Case("attribute-missing", lambda c: extract("--out", c.new, "--set", "teacher.factory=tiny.py:teachr"),
         ("has no attribute 'teachr'", "did you mean teacher?")),
    Case("attribute-missing-near-a-module", lambda c: extract("--out", c.new, "--set", f"teacher.factory={text_file(c, 'm.py', NEAR_A_MODULE)}:nett"),
         ("has no attribute 'nett'; did you mean net?",)),  # not nn, a module (nor nets, a list): a factory is called
    Case("teacher-factory-raises", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:raising_teacher"),
         ("teacher.factory 'bad_input.py:raising_teacher' raised RuntimeError: weights file teacher.pt not found",)),
    Case("data-factory-raises", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:raising_dataset"),
         ("data.factory 'bad_input.py:raising_dataset' raised FileNotFoundError: no such folder: data/train",)),
    Case("teacher-wrong-input", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:wrong_input", "--layers", ""),
         (f"the teacher model raised RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x64 and 10x4) (at bad_input.py:{WRONG_INPUT_LINE}) "
          "on a batch of float32[8, 1, 8, 8]", "make teacher.factory's model take data.factory's items")),
    Case("dry-run-teacher-wrong-input", lambda c: extract("--dry-run", "--set", "teacher.factory=bad_input.py:wrong_input", "--set", "targets.layers=[]"),
         ("the teacher model raised RuntimeError: mat1 and mat2 shapes",)),
    Case("student-wrong-input", lambda c: train(c, "--set", "student.factory=bad_input.py:wrong_input", "--set", "train.features={}"),
         (f"the student model raised RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x64 and 10x4) (at bad_input.py:{WRONG_INPUT_LINE})",
          "make student.factory's model take data.factory's items"), store=True),
    # a model of bfloat16 parameters given float32 inputs: the error says so, and how to run it (autocast, or such inputs)
    Case("teacher-bfloat16-float32-inputs", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:bfloat16_teacher", "--layers", ""),
         ("the teacher model raised RuntimeError:", "on a batch of float32[8, 1, 8, 8]; its parameters are bfloat16 and the inputs float32",
          'return it in float32 and set extract.precision = "bf16" (autocast), or give it bfloat16 inputs; else make teacher.factory')),
    # a GPU's out-of-memory error (raised here by the model on any device): one line naming the batch and the fix
    Case("teacher-out-of-device-memory", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:out_of_device_memory", "--layers", ""),
         ("the teacher model raised OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (at bad_input.py:",
          "on a batch of float32[8, 1, 8, 8]; lower extract.batch_size")),
    # ... or after the forward, converting its output (the run's targets.dtype, the setup checks', verify's float32 copies)
    Case("teacher-targets-out-of-device-memory", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:full_device", "--layers", ""),
         ("storing the teacher's targets (select steps, conversion to targets.dtype) raised OutOfMemoryError: CUDA out of memory. "
          "Tried to allocate 1.00 GiB (at bad_input.py:", "on a batch of float32[8, 1, 8, 8]; lower extract.batch_size"), writes=True),
    Case("teacher-probe-out-of-device-memory", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:half_on_full_device",
                                                                 "--layers", ""),
         ("the teacher's probe batch (its targets' select steps, the setup checks) raised OutOfMemoryError: CUDA out of memory.",
          "on a batch of float32[8, 1, 8, 8]; lower extract.batch_size")),
    Case("verify-teacher-check-out-of-device-memory",
         lambda c: ["verify", c.store, "--teacher-check", "3", "--pipeline", TINY, "--set", "teacher.factory=bad_input.py:half_on_full_device",
                    "--set", "extract.batch_size=1"],
         ("the teacher's recomputed targets (select steps, float32 copies) raised OutOfMemoryError: CUDA out of memory.",
          "on a batch of float32[1, 1, 8, 8]; lower extract.batch_size"), store=True),
    # a model larger than the device's free memory: moving it there (model.to) is one line naming its size and the ways out
    Case("teacher-too-large-for-device", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:too_large_for_device"),
         ("the teacher (teacher.factory 'bad_input.py:too_large_for_device'), 0.00 GB of parameters and buffers", ", does not fit in the "
          "memory of cpu: moving it there raised OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB (at bad_input.py:",
          'use a device with more free memory, or set extract.device = "cpu" (extract --device cpu)', "model.to(torch.bfloat16)")),
    Case("extract-resume-teacher-too-large-for-device", lambda c: extract("--out", c.store, "--set", "teacher.factory=bad_input.py:too_large_for_device"),
         ("the teacher (teacher.factory 'bad_input.py:too_large_for_device')", "does not fit in the memory of cpu"), store=True,
         damage=lambda s: unmark(s, 3)),
    # a --pipeline that is not the store's: of fewer targets, or of a dataset of another length
    Case("verify-teacher-check-pipeline-of-fewer-targets",
         lambda c: ["verify", c.store, "--teacher-check", "3", "--pipeline", TINY, "--set", "targets.layers=[]"],
         ("(teacher tiny.py:teacher) does not produce stored targets ['features.3'] of '", f"/{TRAIN}' (extracted with teacher "
          "tiny.py:teacher); pass the pipeline the store was extracted with"), store=True),
    Case("verify-teacher-check-dataset-of-another-length",
         lambda c: ["verify", c.store, "--teacher-check", "3", "--pipeline", TINY, "--set", "data.factory=numbered.py:tiny_short"],
         ("the pipeline's dataset numbered.py:tiny_short('train') has 40 samples, the store 50 (extracted from "
          "tiny.py:dataset('train')); pass the pipeline the store was extracted with",), store=True),
    Case("verify-teacher-check-teacher-too-large-for-device",
         lambda c: ["verify", c.store, "--teacher-check", "3", "--pipeline", TINY, "--set", "teacher.factory=bad_input.py:too_large_for_device"],
         ("the teacher (teacher.factory 'bad_input.py:too_large_for_device')", "does not fit in the memory of cpu",
          'set extract.device = "cpu" (verify --set extract.device=cpu)'), store=True),  # verify has no --device (extract's flag)
    Case("student-too-large-for-device", lambda c: train(c, "--set", "student.factory=bad_input.py:too_large_for_device", "--set", "train.features={}"),
         ("the student (student.factory 'bad_input.py:too_large_for_device'), 0.00 GB of parameters and buffers", "does not fit in the memory of cpu: moving it there "
          "raised OutOfMemoryError", 'set train.device = "cpu" (train --device cpu)'), store=True),
    Case("overwrite-student-too-large-for-device", lambda c: train(c, "--overwrite", "--set", "student.factory=bad_input.py:too_large_for_device",
                                                                   "--set", "train.features={}"),
         ("the student (student.factory 'bad_input.py:too_large_for_device')", "does not fit in the memory of cpu"), store=True,
         prior=lambda c: trained(c)),
    Case("student-out-of-device-memory", lambda c: train(c, "--set", "student.factory=bad_input.py:out_of_device_memory", "--set", "train.features={}"),
         ("the student model raised OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (at bad_input.py:",
          "lower train.batch_size"), store=True),
    Case("student-backward-out-of-device-memory", lambda c: train(c, "--set", "student.factory=bad_input.py:backward_out_of_device_memory",
                                                                   "--set", "train.features={}"),
         ("the student's backward pass or optimizer step raised OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB",
          "on a batch of float32[8, 1, 8, 8]; lower train.batch_size"), store=True),
    Case("teacher-not-a-module", lambda c: extract("--out", c.new, "--set", "teacher.factory=extract_zoo.py:not_a_module"),
         ("teacher.factory returned str, not a torch.nn.Module", "make the factory return the model")),
    Case("student-without-parameters", lambda c: train(c, "--set", "student.factory=bad_input.py:no_parameters", "--set", "train.features={}"),
         ("'bad_input.py:no_parameters' builds a student with no parameters", "return a model with trainable parameters"), store=True),
    # a run into another store's folder (its targets/ group too) trained, exit 0, and then kept an extract --overwrite of
    # that store refused (pack left it out), as a run inside its own --cache did
    Case("train-out-inside-another-store", lambda c: ["train", TINY, "--cache", c.tmp / "cache.zarr", "--out", c.store / "targets" / "run"],
         (f"/{TRAIN}/targets/run' is inside the store '", f"/{TRAIN}' (an extract --overwrite of that store",
          "write it outside the store folder (e.g. '"), store=True, prior=lambda c: shutil.copytree(c.store, c.tmp / "cache.zarr")),
    # a new store in another store's folder: extract wrote it, exit 0, and an --overwrite of the outer store was then refused
    # for it (its pack copied it in as the outer store's objects)
    Case("extract-out-inside-a-store", lambda c: extract("--out", c.store / "eval.zarr"),
         (f"/{TRAIN}/eval.zarr' is inside the store '", "choose another --out outside the store folder (e.g. '", "/eval.zarr')"),
         store=True),
    Case("train-out-is-the-store", lambda c: ["train", TINY, "--cache", c.store, "--out", c.store],
         ("is a zarr store, not a training run's folder; choose another --out",), store=True),
    Case("student-not-a-module", lambda c: train(c, "--set", "student.factory=extract_zoo.py:not_a_module"),
         ("student.factory returned str, not a torch.nn.Module",), store=True),
    Case("student-factory-missing", lambda c: train(c, "--set", 'student.factory=""'),
         ("student.factory is required",), store=True),
    # -- targets and the teacher's outputs
    Case("unknown-layer", lambda c: extract("--out", c.new, "--layers", "features.9"),
         ("layer 'features.9' is not a module of the teacher; did you mean 'features.3', 'features.2'",)),
    Case("dry-run-unknown-layer", lambda c: extract("--dry-run", "--layers", "featurs.3"), ("did you mean 'features.3'",)),
    Case("layer-never-called", lambda c: ["extract", zoo(c, "teacher.factory=extract_zoo.py:unused", "targets.layers=['spare']"), "--out", c.new],
         ("layer 'spare' did not run in the teacher's forward pass", "hook a module that runs for every batch")),
    Case("nothing-to-store", lambda c: extract("--out", c.new, "--set", "targets.logits=false", "--set", "targets.layers=[]"),
         ("nothing to store", "targets.logits = true")),
    # once without the rows whose batch changed
    Case("output-shape-changes-in-a-later-batch", lambda c: extract("--out", c.new, "--layers", "", "--set",
                                                                    "teacher.factory=bad_input.py:padded_to_the_batch"),
         ("target 'logits' (rows 48..49) changed shape from [4] to [5] per sample; kdcache stores fixed-shape targets (pad or "
          "pool variable-length outputs in the model to one shape)",), writes=True),
    Case("output-unsupported-type", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:string_output"),
         ("target 'logits': cannot pick a tensor from an output of type str", "[targets.select]")),
    Case("select-reaches-none", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:none_beside",
                                                  "--set", "targets.select={ logits = '1' }"),
         ("target 'logits': element '1' of the output is None", "need_weights=False", "choose another [targets.select] 'logits'")),
    Case("select-unknown-target", lambda c: extract("--out", c.new, "--set", "targets.select={ pool = '0' }"),
         ("targets.select names ['pool'], which are not stored targets",)),
    Case("select-wrong-part", lambda c: extract("--out", c.new, "--set", "targets.select={ logits = 'hidden' }"),
         ("output of type Tensor (per-sample shape [4]) has no element 'hidden'", "fix [targets.select] 'logits'", 'a slice ("1:")')),
    Case("select-name-typo", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:named_outputs", "--layers", "",
                                               "--set", "targets.select={ logits = 'last_hiden_state' }"),
         ("has no element 'last_hiden_state' (it holds 'logits', 'last_hidden_state')",
          "fix [targets.select] 'logits' (did you mean 'last_hidden_state'?)")),
    Case("select-index-outside", lambda c: extract("--out", c.new, "--set", "targets.select={ logits = '4' }"),
         ("target 'logits': index 4 is outside the 4 entries of the sample's first axis", "an index from -4 to 3")),
    # were stored converted to targets.dtype without a word: class ids rounded, the imaginary part dropped
    Case("target-of-integers", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:predictions", "--layers", "",
                                                 "--set", "targets.select={ logits = '1' }"),
         ("target 'logits' is int64 (per-sample shape [])", "not integers or booleans", "the logits before an argmax")),
    Case("dry-run-target-complex", lambda c: extract("--dry-run", "--set", "teacher.factory=bad_input.py:spectral", "--layers", ""),
         ("target 'logits' is complex64 (per-sample shape [4])", "would drop the imaginary part", "torch.view_as_real")),
    # a mean step cast complex values to float32 first: the real part was stored, without a word
    Case("target-complex-mean", lambda c: extract("--dry-run", "--set", "teacher.factory=bad_input.py:spectral", "--layers", "",
                                                  "--set", "targets.select={ logits = 'mean' }"),
         ("target 'logits' is complex64 (per-sample shape [])", "would drop the imaginary part", "torch.view_as_real")),
    # was a NotImplementedError traceback from the probe's comparison of sample 0 alone (a sparse tensor has no mean)
    Case("target-sparse", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:sparse_output", "--layers", ""),
         ("target 'logits': the output is a sparse_coo tensor", "x.to_dense()")),
    Case("float16-overflow", lambda c: ["extract", zoo(c, "teacher.factory=extract_zoo.py:overflow_logits", "targets.layers=[]"), "--out", c.new],
         ("target 'logits' (rows 16..23) has values beyond the float16 range", 'set targets.dtype = "float32"'), writes=True),
    # the dry run's one batch is the run's first: the float16 overflow or NaN the run would stop on there, the dry run names
    Case("dry-run-float16-overflow", lambda c: ["extract", zoo(c, "teacher.factory=extract_zoo.py:overflow_layer", "targets.layers=['amp']",
                                                                "extract.batch_size=32"), "--dry-run"],
         ("target 'amp' (rows 0..31) has values beyond the float16 range", 'set targets.dtype = "float32"')),
    Case("dry-run-nan-in-teacher-output", lambda c: ["extract", zoo(c, "teacher.factory=extract_zoo.py:nan_at_30", "targets.layers=[]",
                                                                     "extract.batch_size=32"), "--dry-run"],
         ("the teacher produced NaN in target 'logits' (rows 0..31)",)),
    Case("nan-in-teacher-output", lambda c: ["extract", zoo(c, "teacher.factory=extract_zoo.py:nan_at_30", "targets.layers=[]"), "--out", c.new],
         ("the teacher produced NaN in target 'logits' (rows 24..31)",), writes=True),
    # -- the dataset
    Case("item-unsupported-type", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:string_items"),
         ("dataset item 0 of type str is not supported", "return a tensor, (input, label) or a dict of tensors")),
    Case("item-an-empty-tuple", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:empty_tuples"),
         ("dataset item 0 is an empty tuple; return a tensor, (input, label) or a dict of tensors",)),
    Case("item-dict-keys-of-no-order", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:tuple_keyed"),
         ("a dataset item holds a dict with keys [('view', 0), (0, 'view')], which cannot be put in one order to fingerprint; "
          "use string keys",)),
    # a dict's 'labels' of one label per position (a causal language model's copy of its input ids) was told to "return
    # (input, int label)", with the tensor's repr (several lines for a 2-D one)
    Case("item-dict-with-per-position-labels", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:per_position_labels"),
         ("dataset item 0's 'labels' entry (int64[8]) is not an integer class index", "leave the entry out of the item")),
    Case("item-dict-with-a-string", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:with_ids"),
         ("the teacher model raised TypeError: ", "got an unexpected keyword argument 'id'",
          "on a batch of {'x': float32[8, 1, 8, 8], 'id': [8 x str]}; make teacher.factory's model take")),
    # raised in a DataLoader worker: torch re-raises it with the worker's traceback as its text; still one line
    Case("item-unsupported-type-in-a-worker", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:late_string_item",
                                                                "--set", "extract.num_workers=2"),
         ("Error: dataset item 40 of type str is not supported",), writes=True),
    # a label found wrong after the probe batch did not say which item's it was
    Case("item-label-a-float-in-a-later-batch", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:float_label_at_40"),
         ("Error: dataset item 40's label 2.0 is not an integer class index", "return (input, int label)"), writes=True),
    # a list of token ids was read as (input, label, ...): the first id went to the teacher alone, the second was stored as its label
    Case("item-a-list-of-token-ids", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:token_lists"),
         ("dataset item 0 is a list of 6 numbers ([", "first number alone and take the second as the label", "torch.tensor(ids)")),
    Case("item-entry-a-nested-list", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:nested_lists"),
         ("the teacher model raised TypeError", "entry 'x' is a list of tensors, one per position", "with_format('torch')")),
    # a tokenizer's return_tensors="pt" output per item: every entry a (1, tokens) row, batched to (B, 1, tokens)
    Case("item-entries-tokenizer-rows", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:tokenizer_rows",
                                                          "--set", "teacher.factory=bad_input.py:token_teacher", "--layers", ""),
         ("the teacher model raised ValueError: too many values to unpack", "on a batch of {'input_ids': int64[8, 1, 6]",
          "every entry of the items is one row of shape [1, 6]", 'return_tensors="pt"', ".squeeze(0)")),
    # items refilling one buffer only after the probe batch were written under other indices, each row consistent with
    # its fingerprint (verify --teacher-check passed); training found them, naming random augmentation
    Case("items-refill-one-buffer-after-the-probe-batch", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:partly_refilled"),
         ("dataset index 16, read in a batch, was the input of index 23, the batch's last item (alone it is its own)",
          "return a new tensor or array per item"), writes=True),
    # a length that changed between two len() calls wrote a store whose own manifest was then refused as damaged
    Case("dataset-length-changes-between-calls", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:changing_length"),
         ("dataset gave 50, then 49: its length changed between two calls", "make __len__ return one number")),
    Case("dataset-changed-in-a-worker", lambda c: train(c, "--set", "data.factory=numbered.py:tiny_modified", "--set", "train.num_workers=2"),
         ("Error: store row 17 (dataset index 17) of ", "the dataset changed since extraction"), store=True),
    Case("items-ragged-arrays", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:ragged_arrays"),
         ("dataset items cannot be batched (index 0 is ndarray float32[1, 8, 8], index 1 is ndarray float32[1, 8, 7])",
          "make every input the same shape and type")),
    Case("item-entry-none", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:none_entry"),
         ("dataset items cannot be batched (index 0 is {'x': float32[1, 8, 8], 'mask': NoneType})", "found <class 'NoneType'>",
          "leave None entries out of the item")),
    Case("items-big-endian-arrays", lambda c: extract("--dry-run", "--set", "data.factory=bad_input.py:big_endian"),
         ("(index 0 is ndarray >f4[1, 8, 8]): ValueError: given numpy array has byte order different", "native byte order")),
    Case("items-negative-stride-arrays", lambda c: extract("--dry-run", "--set", "data.factory=bad_input.py:flipped"),
         ("(index 0 is ndarray float32[1, 8, 8]): ValueError: At least one stride in the given numpy array is negative",
          "np.ascontiguousarray(x)")),
    Case("item-object-array", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:object_array"),
         ("a dataset item holds a numpy array of dtype object (shape [1, 8, 8])", "x.astype(np.float32)")),
    # the probe batch (0..7) decides whether the store holds labels; a later batch that disagrees was a traceback (labels stop)
    # or had its labels dropped without a word (labels start)
    Case("labels-stop-in-a-later-batch", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:labels_stop"),
         ("dataset indices 16..23 have no label, but the first batch's items have one", "return labels for all items or none"),
         writes=True),
    Case("labels-start-in-a-later-batch", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:labels_start"),
         ("dataset indices 16..23 have a label, but the first batch's items do not",), writes=True),
    Case("labels-on-some-items-of-a-batch", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:labels_stop",
                                                              "--batch-size", "12", "--set", "extract.rows_per_shard=32"),
         ("some dataset items have a label and some do not (index 12 has one, index 16 has none)",), writes=True),
    # items that are one buffer refilled at each read were taken for random augmentation ("gives a different input each time")
    Case("items-reuse-one-buffer", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:reused_buffer"),
         ("dataset index 0, read in a batch, was the input of index 7, the batch's last item (alone it is its own)",
          "return a new tensor or array per item")),
    Case("train-items-reuse-one-buffer", lambda c: train(c, "--set", "data.factory=bad_input.py:reused_buffer"),
         ("read in a batch, was the input of index", "refills for each item", "return a new tensor or array per item"), store=True),
    Case("empty-dataset", lambda c: extract("--out", c.new, "--set", "data.factory=bad_input.py:empty"),
         ("bad_input.py:empty('train') is empty", "check data.factory and data.split")),
    Case("dataset-length-differs", lambda c: train(c, "--set", "data.factory=numbered.py:tiny_short"),
         ("dataset numbered.py:tiny_short('train') has 40 samples but the store has 50 (extracted from tiny.py:dataset('train'), "
          "another data.factory); use the dataset the store was made from",),
         store=True),
    Case("eval-split-missing", lambda c: train(c, "--set", "train.eval_split=valid"),
         ("train.eval_split = 'valid': data.factory 'tiny.py:dataset' raised ValueError: unknown split 'valid'",
          'or set train.eval_split = "" (no evaluation)'), store=True),
    # -- sizes, devices
    Case("compression-level-above-limit", lambda c: extract("--out", c.new, "--set", "extract.compression_level=99"),
         ("extract.compression_level = 99 is above its limit of 22", "zstd levels run from 0")),
    Case("overwrite-keeps-the-store-on-a-bad-level", lambda c: extract("--out", c.store, "--overwrite", "--set", "extract.compression_level=23"),
         ("extract.compression_level = 23 is above its limit of 22",), store=True),
    Case("rows-per-shard-huge", lambda c: extract("--out", c.new, "--set", "extract.rows_per_shard=10000000000000"),
         ("extract.rows_per_shard = 10000000000000 makes shards of", "a shard is held in memory until complete", "use at most")),
    Case("samples-too-large-for-any-shard", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:broadcast", "--layers", "",
                                                              "--set", "extract.rows_per_shard=0", "--set", "targets.dtype=float32"),
         ("a sample's targets take 268,435,480 bytes, so the smallest shard extract.shard_mb chooses (16 rows) would be 4 GiB",
          "set extract.rows_per_shard = 15 or fewer", "targets.select")),
    Case("shard-mb-0", lambda c: extract("--out", c.new, "--set", "extract.shard_mb=0"),
         ("extract.shard_mb = 0: both must be > 0",)),
    Case("chunk-larger-than-shard", lambda c: extract("--out", c.new, "--set", "extract.chunk_mb=1000", "--set", "extract.shard_mb=1"),
         ("extract.chunk_mb = 1000 and extract.shard_mb = 1", "an inner chunk no larger than its shard")),
    Case("batch-size-0", lambda c: extract("--out", c.new, "--batch-size", "0"), ("extract.batch_size must be >= 1, got 0",)),
    Case("batch-size-negative", lambda c: extract("--out", c.new, "--batch-size", "-4"), ("extract.batch_size must be a whole number >= 1, got -4",)),
    Case("train-batch-size-0", lambda c: train(c, "--batch-size", "0"), ("train.batch_size must be >= 1, got 0",), store=True),
    # a store of layers alone, trained from or scored against as if it held the teacher's logits
    Case("train-kl-without-stored-logits", lambda c: ["train", TINY, "--cache", no_logits(c), "--out", c.run],
         ("Error: train.loss.kl/mse need stored logits but '", "train-no-logits.zarr' has none; set them to 0 or extract with targets.logits = true"),
         prior=extract_no_logits),
    Case("train-eval-cache-without-stored-logits", lambda c: train(c, "--set", f"train.eval_cache='{no_logits(c, 'test')}'"),
         ("Error: train.eval_cache '", "test-no-logits.zarr' stores no logits to compare with; extract it with targets.logits = true"),
         store=True, prior=lambda c: extract_no_logits(c, "test")),
    Case("queue-depth-0", lambda c: extract("--out", c.new, "--set", "extract.queue_depth=0"),
         ("extract.queue_depth must be >= 1 (batches in flight to the writer), got 0", "use e.g. 4")),
    Case("shuffle-buffer-shards-0", lambda c: train(c, "--set", "train.shuffle_buffer_shards=0"),
         ("train.shuffle_buffer_shards must be >= 1 (shards read per shuffle buffer), got 0", "use e.g. 4"), store=True),
    Case("student-select-not-a-string", lambda c: train(c, "--set", "student.select=true"),
         ("student.select must be a string such as", "got True"), store=True),
    Case("student-select-wrong-part", lambda c: train(c, "--set", "student.select=hidden"),
         ("the student output: output of type Tensor (per-sample shape [4]) has no element 'hidden'", "fix student.select"), store=True),
    Case("student-select-name-typo", lambda c: train(c, "--set", "student.factory=bad_input.py:named_outputs", "--set", "student.select=logit"),
         ("the student output: output of type dict has no element 'logit'", "fix student.select (did you mean 'logits'?)"), store=True),
    # a select stepping into the classes (one logit per sample): the eval check, then kl, named the output's shape alone and
    # told to drop the evaluation, or to distil a regression with mse; neither named student.select, the value to fix
    Case("student-select-picks-one-class", lambda c: train(c, "--set", "student.select=0"),
         ("train.eval_split = 'test': eval_accuracy and eval_agreement compare", "student.select = '0' picks a part of the student's "
          "output of shape [1] for a batch of one sample", "set student.select to the part holding the classes"), store=True),
    Case("student-select-picks-one-class-for-kl", lambda c: train(c, "--set", "student.select=-1", "--set", "train.eval_split=''"),
         ("kl_divergence: student.select = '-1' picks a part of the student's output of per-sample shape [], fewer axes than the "
          "stored logits' [4]", "set it to that part"), store=True),
    Case("unknown-device", lambda c: extract("--out", c.new, "--device", "tpu"),
         ("--device tpu: extract.device = 'tpu' is not a torch device", "use auto, cpu, cuda or cuda:N")),
    Case("train-unknown-device", lambda c: train(c, "--device", "tpu"), ("--device tpu: train.device = 'tpu' is not a torch device",), store=True),
    Case("device-mps", lambda c: extract("--out", c.new, "--device", "mps"),
         ("--device mps: extract.device = 'mps' is not supported", "use auto, cpu, cuda or cuda:N")),
    Case("device-meta", lambda c: extract("--out", c.new, "--device", "meta"), ("--device meta: extract.device = 'meta' is not supported",)),
    Case("train-device-xpu", lambda c: train(c, "--device", "xpu"), ("--device xpu: train.device = 'xpu' is not supported",), store=True),
    Case("threads-above-limit", lambda c: extract("--out", c.new, "--set", "extract.threads=100000"),
         ("extract.threads = 100000 is above its limit of", "use at most the number of cores")),
    Case("train-threads-overflow", lambda c: train(c, "--set", "train.threads=10000000000000"),
         ("train.threads = 10000000000000 is above its limit",), store=True),
    Case("workers-above-limit", lambda c: extract("--out", c.new, "--set", "extract.num_workers=1000"),
         ("extract.num_workers = 1000 is above its limit of", "0 loads in the main process")),
    Case("cuda-absent", lambda c: extract("--out", c.new, "--device", "cuda"),
         ("--device cuda: extract.device = 'cuda' asked for but CUDA is not available here", 'use "cpu" or "auto"'), cuda=True),
    Case("train-cuda-absent", lambda c: train(c, "--device", "cuda:1"),
         ("--device cuda:1: train.device = 'cuda:1' asked for but CUDA is not available here",), store=True, cuda=True),
    # -- where extract writes
    Case("out-is-a-file", lambda c: extract("--out", text_file(c, "s", "a file")),
         ("exists and is not a kdcache store", "choose another --out or remove it")),
    Case("out-is-a-zip", lambda c: extract("--out", c.tmp / "s.zarr.zip"), ("a zip store is write-once",)),
    Case("out-read-only", lambda c: extract("--out", c.tmp / "ro" / "s.zarr"),
         ("ro/s.zarr", "Read-only file system", "make the folder writable (or choose another location)"), read_only=True),
    Case("store-of-an-unseeded-teacher", lambda c: extract("--out", c.tmp / "u.zarr", "--set", "teacher.factory=bad_input.py:unseeded"),
         ("was made with different teacher weights", "if the pipeline is unchanged, teacher.factory builds other weights on each call: "
          "seed it with torch.manual_seed"), prior=lambda c: invoke_ok(extract("--out", c.tmp / "u.zarr", "--set", "teacher.factory=bad_input.py:unseeded"))),
    Case("store-of-another-teacher", lambda c: extract("--out", c.store, "--set", "teacher.factory=bad_input.py:other_teacher"),
         ("was made with different teacher weights (teacher.weights_sha256: store has '", "--overwrite to start afresh"),
         store=True, damage=lambda s: unmark(s, 3)),
    Case("store-of-other-targets", lambda c: extract("--out", c.store, "--set", "targets.dtype=float32"),
         ("different targets (targets.logits.dtype: store has 'float16', now 'float32')",), store=True, damage=lambda s: unmark(s, 3)),
    # a key one manifest lacks was named "store has None, now 4" (and "store has 4, now None"): top-k of all 4 classes keeps the shape
    Case("store-of-full-logits-resumed-with-topk", lambda c: extract("--out", c.store, "--set", "targets.topk=4"),
         ("different targets (the store has no targets.logits.topk, now 4)",), store=True, damage=lambda s: unmark(s, 3)),
    Case("store-of-topk-logits-resumed-without", lambda c: extract("--out", c.tmp / "k.zarr"),
         ("different targets (targets.logits.topk: store has 4, now none)",),
         prior=lambda c: (invoke_ok(extract("--out", c.tmp / "k.zarr", "--set", "targets.topk=4")), unmark(c.tmp / "k.zarr", 3))),
    Case("store-of-another-precision", lambda c: extract("--out", c.store, "--set", 'extract.precision="bf16"'),
         ("different teacher precision (precision: store has 'fp32', now 'bf16')",), store=True, damage=lambda s: unmark(s, 3)),
    Case("train-other-fingerprint-algorithm", lambda c: train(c),
         ("records input fingerprints made with 'sha1-64', but this kdcache computes 'blake2b-64-v2' or 'blake2b-64'",), store=True,
         damage=lambda s: edit_manifest(s, fingerprint={"algorithm": "sha1-64", "of": "bytes"})),
    Case("verify-teacher-check-other-fingerprint-algorithm", lambda c: ["verify", c.store, "--teacher-check", "3", "--pipeline", TINY],
         ("records input fingerprints made with 'sha1-64'",), store=True,
         damage=lambda s: edit_manifest(s, fingerprint={"algorithm": "sha1-64", "of": "bytes"})),
    Case("resume-other-fingerprint-algorithm", lambda c: extract("--out", c.store),
         ("different fingerprint algorithm (fingerprint.algorithm: store has 'sha1-64', now 'blake2b-64-v2')",), store=True,
         damage=lambda s: (unmark(s, 3), edit_manifest(s, fingerprint={"algorithm": "sha1-64", "of": "bytes"}))),
    # a sequence-first layer: its first axis is time, as long as the batch (8) here; a batch of one shows it
    Case("target-sequence-first", lambda c: extract("--out", c.new, "--set", "teacher.factory=bad_input.py:seq_first", "--layers", "rnn"),
         ("target 'rnn' has shape [8, 1, 6] for a batch of 1 samples, but its first axis must be the samples",
          "(kdcache runs one sample through the teacher to see this)", "batch_first=True")),
    Case("target-sequence-first-other-batch", lambda c: extract("--dry-run", "--set", "teacher.factory=bad_input.py:seq_first",
                                                                "--layers", "rnn", "--batch-size", "4"),
         ("target 'rnn' has shape [8, 4, 6] for a batch of 4 samples",)),
    # -- stores that cannot be read
    Case("info-no-store", lambda c: ["info", c.tmp / "nothing.zarr"], ("no store at", "run kdcache extract")),
    Case("info-folder-not-store", lambda c: ["info", c.tmp], ("no store at",)),
    Case("info-newer-format", lambda c: ["info", c.store],
         ("has store format version 3; this kdcache reads version 1 or 2", "upgrade kdcache"), store=True,
         damage=lambda s: edit_manifest(s, format_version=3)),
    Case("train-newer-format", lambda c: train(c), ("has store format version 3",), store=True,
         damage=lambda s: edit_manifest(s, format_version=3)),
    # a later kdcache's store is not damaged: verify's one Error line, as every command's (once its failed open check)
    Case("verify-newer-format", lambda c: ["verify", c.store], ("has store format version 3",), store=True,
         damage=lambda s: edit_manifest(s, format_version=3)),
    Case("extract-resume-newer-format", lambda c: extract("--out", c.store), ("has store format version 3",), store=True,
         damage=lambda s: edit_manifest(s, format_version=3)),
    Case("info-missing-array", lambda c: ["info", c.store], ("targets/logits", "missing"), store=True,
         damage=lambda s: shutil.rmtree(s / "targets/logits")),
    Case("train-missing-array", lambda c: train(c), ("targets/logits", "missing"), store=True,
         damage=lambda s: shutil.rmtree(s / "targets/logits")),
    Case("verify-missing-array", lambda c: ["verify", c.store], ("targets/logits: missing",), store=True, report=True,
         damage=lambda s: shutil.rmtree(s / "targets/logits")),
    Case("verify-flipped-byte", lambda c: ["verify", c.store],
         ("targets/logits: shard 1 inner chunk 0 (rows 16-31): crc32c checksum mismatch",), store=True, report=True,
         damage=lambda s: flip_byte(s, LOGITS_SHARD_1)),
    Case("verify-truncated-chunk", lambda c: ["verify", c.store], ("targets/layers/features.3: shard 2", "truncated"),
         store=True, report=True, damage=lambda s: truncate(s, FEATURES_SHARD_2)),
    Case("train-flipped-byte", lambda c: train(c), ("targets/logits", "rows 16", "kdcache verify"), store=True,
         damage=lambda s: flip_byte(s, LOGITS_SHARD_1)),
    Case("train-flipped-byte-streaming", lambda c: train(c, "--set", "train.memory_budget_mb=0"),
         ("targets/logits", "rows 16", "kdcache verify"), store=True, damage=lambda s: flip_byte(s, LOGITS_SHARD_1)),
    Case("train-truncated-chunk", lambda c: train(c), ("targets/layers/features.3", "rows 32", "kdcache verify"), store=True,
         damage=lambda s: truncate(s, FEATURES_SHARD_2)),
    Case("train-truncated-chunk-streaming", lambda c: train(c, "--set", "train.memory_budget_mb=0"),
         ("targets/layers/features.3", "rows 32", "kdcache verify"), store=True, damage=lambda s: truncate(s, FEATURES_SHARD_2)),
    # found by listing the objects before the run begins (streaming, the read reached it hours in, OUT written)
    Case("train-missing-shard-object", lambda c: train(c),
         ("lacks objects of 1 shard of the 4 marked done that this run reads", f"shards [1], object '{LOGITS_SHARD_1}' missing",
          "kdcache extract PIPELINE --out", "kdcache verify"), store=True, damage=lambda s: (s / LOGITS_SHARD_1).unlink()),
    Case("train-empty-shard-object-streaming", lambda c: train(c, "--set", "train.memory_budget_mb=0"),
         (f"shards [2], object '{FEATURES_SHARD_2}' empty",), store=True, damage=lambda s: truncate(s, FEATURES_SHARD_2, 0)),
    Case("export-flipped-byte", lambda c: ["export", c.store, c.tmp / "out.h5"], ("shard 1 of targets/logits (rows 16-31)", "crc32c"),
         store=True, damage=lambda s: flip_byte(s, LOGITS_SHARD_1)),
    Case("stats-flipped-byte", lambda c: ["stats", c.store], ("targets/logits", "kdcache verify"),
         store=True, damage=lambda s: flip_byte(s, LOGITS_SHARD_1)),
    Case("stats-missing-shard-object", lambda c: ["stats", c.store], ("shard 1 of targets/logits", "missing"),
         store=True, damage=lambda s: (s / LOGITS_SHARD_1).unlink()),
    Case("pack-incomplete-store", lambda c: ["pack", c.store, c.tmp / "p.zarr.zip"], ("incomplete",), store=True,
         damage=lambda s: unmark(s, 2)),
    Case("import-not-hdf5", lambda c: ["import", text_file(c, "x.h5", "not hdf5"), c.new], ("x.h5",)),
    Case("export-out-exists", lambda c: ["export", c.store, text_file(c, "out.h5", "keep me")], ("out.h5", "--overwrite"), store=True),
    Case("train-incomplete-store", lambda c: train(c), ("is incomplete (34/50 samples)", "--allow-partial"), store=True,
         damage=lambda s: unmark(s, 2)),
    Case("train-no-store", lambda c: ["train", TINY, "--cache", c.tmp / "nothing.zarr", "--out", c.run], ("no store at",)),
    # a typo of a store beside it was told "run kdcache extract PIPELINE --out tiny.zar first"
    Case("train-store-name-misspelt", lambda c: ["train", TINY, "--cache", c.tmp / "tiny.zar", "--out", c.run],
         ("no store at '", "tiny.zar'; did you mean '", "tiny.zarr', a store beside it? If not, run kdcache extract"), store=True),
    Case("info-packed-store-name-misspelt", lambda c: ["info", c.tmp / "tiny.zip"],
         ("tiny.zip' (no such file); did you mean '", "tiny.zarr.zip', a store beside it?"), store=True,
         prior=lambda c: invoke_ok(["pack", c.store, c.tmp / "tiny.zarr.zip"])),
    # the pipeline and the store swapped: "Invalid value for 'PIPELINE': File '…tiny.zarr' is a directory", no word of the order
    Case("train-store-given-as-the-pipeline", lambda c: ["train", c.store, "--cache", TINY, "--out", c.run],
         ("tiny.zarr' is a zarr store folder (kdcache extract's output), not a pipeline file",
          "kdcache train PIPELINE --cache STORE --out RUN"), code=2, store=True),
    Case("extract-export-given-as-the-pipeline", lambda c: ["extract", c.tmp / "t.h5", "--out", c.new],
         ("t.h5' is an HDF5 file (kdcache export's output), not a pipeline file", "kdcache extract PIPELINE --out STORE"),
         code=2, store=True, prior=lambda c: invoke_ok(["export", c.store, c.tmp / "t.h5"])),
    # named the setting alone ('train.eval_cache: no store at …, or drop train.eval_cache'), not the flag that gave it
    Case("eval-cache-no-store", lambda c: train(c, "--eval-cache", c.tmp / "nothing.zarr"),
         ("Error: --eval-cache ", "nothing.zarr: train.eval_cache: no store at", "or leave --eval-cache out"), store=True),
    Case("eval-cache-no-store-set", lambda c: train(c, "--set", f"train.eval_cache='{c.tmp / 'nothing.zarr'}'"),
         ("Error: train.eval_cache: no store at", "nothing.zarr'; extract the eval split there first", "or drop train.eval_cache"), store=True),
    Case("eval-cache-name-misspelt", lambda c: train(c, "--set", f"train.eval_cache='{c.tmp / 'tiny.zar'}'"),
         ("Error: train.eval_cache: no store at", "tiny.zar'; did you mean '", "tiny.zarr', a store beside it? If not, extract the eval split"),
         store=True),
    Case("eval-cache-incomplete", lambda c: train(c, "--allow-partial", "--eval-cache", c.store),
         ("is incomplete (34/50 samples)", "applies to the training store alone), or leave --eval-cache out"), store=True,
         damage=lambda s: unmark(s, 2)),
    # -- the student and the losses
    # was a RuntimeError traceback from backward(): "element 0 of tensors does not require grad"
    Case("student-output-without-gradient", lambda c: train(c, "--set", "student.factory=bad_input.py:one_hot_student",
                                                            "--set", "train.features={}"),
         ("loss term 'kl' does not depend on the student's parameters", "an integer or boolean tensor", "return the logits"), store=True),
    # a complex output was cast to float32 by the losses: its imaginary part dropped, with only torch's UserWarning
    Case("student-output-complex", lambda c: train(c, "--set", "student.factory=bad_input.py:spectral_student", "--set", "train.features={}"),
         ("the student's output is complex64 (shape [8, 4])", "would drop its imaginary part", "torch.view_as_real",
          "student.select"), store=True),
    Case("student-feature-complex", lambda c: train(c, "--set", "student.factory=bad_input.py:spectral_student", "--set", "train.loss.kl=0",
                                                    "--set", "train.features={ 'features.3' = { student = 'spectrum' } }"),
         ("train.features 'features.3': student module 'spectrum''s output is complex64 (shape [2, 4])", "would drop its imaginary part",
          "train.features.'features.3'.select"), store=True),
    Case("student-output-shape", lambda c: train(c, "--set", "student.factory=bad_input.py:three_classes"),
         ("kl_divergence: student shape (8, 3) does not match teacher shape (8, 4)", "produce 4 classes"), store=True),
    Case("feature-cannot-be-projected", lambda c: train(c, "--set", "train.features={ 'features.3' = { student = 'fc' } }"),
         ("features.3", "(4,)", "(16, 8, 8)"), store=True),
    # the student's shape is the part its select picked: the line named the shape alone, not the select that made it
    Case("feature-select-cannot-be-projected", lambda c: train(c, "--set", "train.features.'features.3'.select=0"),
         ("target 'features.3': no projection from student shape (8, 8) (what train.features.'features.3'.select = '0' picks "
          "from the output of student module 'conv') to teacher shape (16, 8, 8)",), store=True),
    Case("feature-layer-not-stored", lambda c: train(c, "--set", "train.features={ pool = { student = 'conv' } }"),
         ("train.features names teacher layer 'pool', which", "does not store (its layers: ['features.3']); name one of them, "
          "or extract a store with 'pool' in targets.layers (--layers)"), store=True),
    Case("feature-student-module-never-runs",
         lambda c: train(c, "--set", "student.factory=bad_input.py:with_spare", "--set", "train.features={ 'features.3' = { student = 'spare' } }"),
         ("student module 'spare' did not run in the student's forward pass", "name a student module that runs for every batch"),
         store=True),
    Case("student-output-dict-without-logits", lambda c: train(c, "--set", "student.factory=bad_input.py:dict_output", "--set", "train.features={}"),
         ("'student output' of the student is a dict kdcache cannot pick a tensor from", "make the student return its logits"),
         store=True),
    Case("ce-label-beyond-the-student-s-classes",
         lambda c: train(c, "--set", "student.factory=bad_input.py:three_classes", "--set", "train.loss.kl=0", "--set", "train.features={}"),
         ("train.loss.ce: the store holds label 3 but the student's output has 3 classes", "labels must be 0..2",
          "or set train.loss.ce = 0"), store=True),
    Case("feature-student-module-unknown", lambda c: train(c, "--set", "train.features={ 'features.3' = { student = 'convv' } }"),
         ("layer 'convv' is not a module of the student", "did you mean 'conv'"), store=True),
    Case("unknown-loss", lambda c: train(c, "--set", "train.loss.kld=1.0"),
         ("unknown key 'train.loss.kld'", "did you mean train.loss.kl?"), store=True),
    Case("negative-temperature", lambda c: train(c, "--set", "train.loss.temperature=-1"),
         ("train.loss.temperature must be a number from 0.01 to 1000, got -1",), store=True),
    Case("zero-temperature", lambda c: train(c, "--set", "train.loss.temperature=0"),
         ("train.loss.temperature must be at least 0.01", "got 0;"), store=True),
    Case("temperature-too-small", lambda c: train(c, "--set", "train.loss.temperature=1e-300"),
         ("train.loss.temperature must be at least 0.01 (logits / T overflows below), got 1e-300",), store=True),
    Case("temperature-above-limit", lambda c: train(c, "--set", "train.loss.temperature=5000"),
         ("train.loss.temperature = 5000 is above its limit of 1000",), store=True),
    Case("mse-on-unknown", lambda c: train(c, "--set", "train.loss.mse_on=probs"),
         ("train.loss.mse_on = 'probs' is not one of logits, probabilities",), store=True),
    Case("zero-temperature-for-probability-mse",
         lambda c: train(c, "--set", "train.loss.kl=0", "--set", "train.loss.mse=1", "--set", "train.loss.mse_on=probabilities",
                         "--set", "train.loss.temperature=0"),
         ("train.loss.temperature must be at least 0.01", "got 0;"), store=True),
    Case("streams-0", lambda c: train(c, "--set", "train.streams=0"),
         ("--set train.streams=0: train.streams must be >= 1, got 0", "use 1 (the default)"), store=True),
    # train counted the batches of every epoch before its first step: 10**12 epochs never began
    Case("epochs-beyond-the-limit", lambda c: train(c, "--epochs", "1000000000000"),
         ("--epochs 1000000000000: train.epochs = 1000000000000 is above its limit of 1,000,000; train.steps counts a longer run",),
         store=True),
    # more streams than rows: each epoch listed every stream's batches (10**12 of them: a run that never began)
    Case("streams-beyond-the-rows", lambda c: train(c, "--set", "train.streams=1000000000000"),
         ("streams = 1000000000000 (train.streams, or the ranks under torchrun) is more than the 50 rows trained on",
          "use at most 50, e.g. 1 (the default)"), store=True),
    Case("lr-0", lambda c: train(c, "--set", "train.lr=0"), ("train.lr must be > 0, got 0", "use e.g. 1e-3"), store=True),
    Case("rank-timeout-0", lambda c: train(c, "--set", "train.rank_timeout_s=0"),
         ("train.rank_timeout_s must be > 0 and at most 1e+09 (seconds; torch.distributed's clock overflows beyond), got 0", "use e.g. 1800"),
         store=True),
    # 'never': torch.distributed's deadline, in nanoseconds from now, wrapped: under torchrun every step's all-reduce timed
    # out at once (gloo: "Timed out waiting 10000000000000ms" after 10 ms), said as a hung rank; 1e13 a traceback
    Case("rank-timeout-beyond-the-clock", lambda c: train(c, "--set", "train.rank_timeout_s=1e10"),
         ("train.rank_timeout_s must be > 0 and at most 1e+09", "got 1e+10"), store=True),
    Case("lr-without-a-leading-digit", lambda c: train(c, "--set", "train.lr=.001"),
         ("train.lr must be a finite number > 0, got '.001' (text: a TOML number has digits on both sides of its point, e.g. 0.001",),
         store=True),
    Case("seed-beyond-int64", lambda c: train(c, "--set", "train.seed=100000000000000000000"),
         ("train.seed = 100000000000000000000 is beyond a 64-bit integer's range",), store=True),
    Case("feature-weight-not-a-number", lambda c: train(c, "--set", 'train.features={"features.3"={student="conv",weight="abc"}}'),
         ("train.features.'features.3'.weight must be a finite number >= 0, got 'abc'",), store=True),
    Case("feature-weight-nan", lambda c: train(c, "--set", 'train.features={"features.3"={student="conv",weight=nan}}'),
         ("train.features.'features.3'.weight must be a finite number >= 0, got nan",), store=True),
    Case("feature-weight-negative", lambda c: train(c, "--set", 'train.features={"features.3"={student="conv",weight=-1}}'),
         ("train.features.'features.3'.weight must be a finite number >= 0, got -1",), store=True),
    Case("features-name-the-logits", lambda c: train(c, "--set", 'train.features={"logits"={student="fc",weight=1}}'),
         ("train.features names 'logits', the teacher's output, not a layer", "train.loss.kl"), store=True),
    Case("negative-weight", lambda c: train(c, "--set", "train.loss.kl=-0.5"), ("train.loss.kl must be a finite number >= 0, got -0.5",), store=True),
    Case("all-weights-zero", lambda c: train(c, "--set", "train.loss.kl=0", "--set", "train.loss.ce=0", "--set", "train.features={}"),
         ("every loss weight is 0 and train.features is empty",), store=True),
    Case("epochs-0", lambda c: train(c, "--epochs", "0"), ("train.epochs must be >= 1", "got 0"), store=True),
    Case("epochs-negative", lambda c: train(c, "--epochs", "-2"), ("train.epochs must be a whole number >= 1, got -2",), store=True),
    Case("subset-too-large", lambda c: train(c, "--set", "train.subset=500"),
         ("train.subset = 500 exceeds the 50 rows available",), store=True),
    Case("unknown-train-precision", lambda c: train(c, "--set", "train.precision=fp8"),
         ("train.precision = 'fp8' is not one of fp32, bf16, fp16",), store=True),
    Case("unknown-optimizer", lambda c: train(c, "--set", "train.optimizer=adam"),
         ("train.optimizer = 'adam' is not one of adamw, sgd",), store=True),
    # -- where train writes
    Case("resume-without-checkpoint", lambda c: train(c, "--resume"),
         ("--resume: no checkpoint.pt in", "run without --resume"), store=True),
    Case("resume-another-student", lambda c: train(c, "--resume", "--set", "student.factory=bad_input.py:three_classes"),
         ("--resume: student.factory was 'tiny.py:student' in this run (", "pipeline.json'), now 'bad_input.py:three_classes'",
          "resume with the run's values", "or start afresh with --overwrite"), store=True, prior=lambda c: trained(c)),
    Case("resume-another-student-no-record", lambda c: train(c, "--resume", "--set", "student.factory=bad_input.py:three_classes"),
         ("--resume:", "checkpoint.pt' holds another student", "size mismatch for fc.weight", "its pipeline.json"), store=True,
         prior=lambda c: unrecorded(trained(c))),
    Case("resume-another-student-pipeline-json-lost", lambda c: train(c, "--resume", "--set", "student.factory=bad_input.py:three_classes"),
         ("--resume: student.factory was 'tiny.py:student' in this run (", "checkpoint.pt'), now 'bad_input.py:three_classes'"),
         store=True, prior=lambda c: (trained(c) / "pipeline.json").unlink()),
    Case("resume-targets-streamed-not-in-ram", lambda c: train(c, "--resume", "--set", "train.memory_budget_mb=0.0001"),
         ("--resume: this run served its batches from RAM, now streamed by 1 DataLoader reader(s)",
          "resume with the run's train.memory_budget_mb and train.num_workers"), store=True, prior=lambda c: trained(c)),
    Case("resume-shorter-than-trained", lambda c: train(c, "--resume", "--set", "train.steps=3"),
         ("--resume: this run has trained 7 steps in 1 epoch, more than train.steps = 3 plans", "resume with train.steps >= 7 to go on",
          "--overwrite"), store=True, prior=lambda c: trained(c)),
    Case("resume-fewer-epochs-than-trained", lambda c: train(c, "--resume", "--epochs", "1"),
         ("--resume: this run has trained 14 steps in 2 epochs, more than train.epochs = 1 (7 steps) plans",
          "resume with train.epochs >= 2 (or train.steps >= 14) to go on"), store=True, prior=lambda c: invoke_ok(train(c, "--epochs", "2"))),
    Case("resume-other-values", lambda c: train(c, "--resume", "--set", "train.lr=0.5"),
         ("--resume: train.lr was 0.01 in this run", "now 0.5", "may change"), store=True, prior=lambda c: trained(c)),
    Case("resume-other-precision", lambda c: train(c, "--resume", "--set", "train.precision=bf16"),
         ("--resume: train.precision was 'fp32' in this run", "now 'bf16'", "may change"), store=True, prior=lambda c: trained(c)),
    Case("resume-store-of-other-targets", lambda c: ["train", TINY, "--cache", c.tmp / "other.zarr", "--out", c.run, "--resume"],
         ('--resume: this run trained from another store (targets.logits.dtype: "float16" then, "float32" in',), store=True,
         prior=lambda c: (trained(c), invoke_ok(extract("--out", c.tmp / "other.zarr", "--set", "targets.dtype=float32")))),
    Case("resume-other-store", lambda c: ["train", TINY, "--cache", c.tmp / "other.zarr", "--out", c.run, "--resume"],
         ("--resume: this run trained from another store (weights_sha256: ", "other.zarr'",
          "resume with the run's own --cache"), store=True,
         prior=lambda c: (trained(c), invoke_ok(extract("--out", c.tmp / "other.zarr", "--set", "teacher.factory=bad_input.py:other_teacher")))),
    # a shard the run trained on no longer done (being extracted again, its marker removed): once "this run trained on
    # shards '...tiny.zarr' no longer has completed", naming none
    Case("resume-on-shards-no-longer-done", lambda c: train(c, "--resume", "--allow-partial", "--epochs", "2"),
         ("--resume: this run trained on shards [1] of ", "tiny.zarr', no longer completed there; complete the store again (kdcache "
          "extract with its pipeline and --out ", "or start afresh with --overwrite"), store=True,
         prior=lambda c: (trained(c), unmark(c.store, 1))),
    Case("resume-corrupt-checkpoint", lambda c: train(c, "--resume"), ("checkpoint.pt' cannot be read", "--overwrite"),
         store=True, prior=lambda c: truncate(trained(c), "checkpoint.pt", 0.1)),
    Case("train-out-holds-a-run", lambda c: train(c), ("already holds a training run", "--resume", "--overwrite"), store=True,
         prior=lambda c: trained(c)),
    # another tool's checkpoint.pt and a user's student.pt, no kdcache pipeline.json: once "already holds a training run"
    # (pass --overwrite), and --overwrite deleted them
    Case("train-out-holds-another-tools-checkpoint", lambda c: train(c, "--overwrite"),
         ("run' holds 'checkpoint.pt', 'student.pt' but no kdcache training run ('checkpoint.pt' is not a kdcache checkpoint: "
          "a dict without ['student', ", "no pipeline.json", "--overwrite replaces only a kdcache run's files; move them away or "
          "choose another --out"), store=True, prior=lambda c: another_tools_run(c.run)),
    Case("resume-another-tools-checkpoint", lambda c: train(c, "--resume"),
         ("checkpoint.pt' is not a kdcache checkpoint (a dict without ['student', ", "run' holds no kdcache run's pipeline.json "
          "either (--overwrite replaces only a kdcache run's files): move the file away or choose another --out"),
         store=True, prior=lambda c: another_tools_run(c.run)),
    Case("overwrite-keeps-the-run-when-it-fails", lambda c: train(c, "--overwrite", "--set", "student.factory=extract_zoo.py:not_a_module"),
         ("student.factory returned str",), store=True, prior=lambda c: trained(c)),
    Case("resume-empty-checkpoint", lambda c: train(c, "--resume"), ("checkpoint.pt' cannot be read (EOFError: empty or truncated)", "--overwrite"),
         store=True, prior=lambda c: truncate(trained(c), "checkpoint.pt", 0)),
    Case("resume-bare-state-dict", lambda c: train(c, "--resume"),
         ("checkpoint.pt' is not a kdcache checkpoint (a dict without ['student', 'heads', 'optimizer', 'schedule', 'rng',",
          "--overwrite instead of --resume"),
         store=True, prior=lambda c: torch.save({"weight": torch.zeros(2)}, trained(c) / "checkpoint.pt")),
    Case("resume-checkpoint-not-a-dict", lambda c: train(c, "--resume"), ("checkpoint.pt' is not a kdcache checkpoint (list)",),
         store=True, prior=lambda c: torch.save([1, 2], trained(c) / "checkpoint.pt")),
    Case("resume-damaged-metrics", lambda c: train(c, "--resume", "--epochs", "2"), ("metrics.jsonl' line 2 is not JSON", "'{bad'", "delete that line"),
         store=True, prior=lambda c: append(trained(c) / "metrics.jsonl", "{bad\n")),
    Case("resume-metrics-not-an-epoch", lambda c: train(c, "--resume", "--epochs", "2"), ("line 2 is not an epoch's metrics", "'[1, 2]'"),
         store=True, prior=lambda c: append(trained(c) / "metrics.jsonl", "[1, 2]\n")),
    Case("overwrite-keeps-the-run-on-a-bad-lr", lambda c: train(c, "--overwrite", "--set", "train.lr=1e300"),
         ("train.lr = 1e+300 is beyond float32's range",), store=True, prior=lambda c: trained(c)),
    Case("train-diverges", lambda c: train(c, "--set", "train.lr=1e30", "--set", 'train.optimizer="sgd"'),
         ("training diverged in epoch 0: loss_kl = nan", "lower train.lr", "no checkpoint was written"), store=True),
    Case("train-out-read-only", lambda c: ["train", TINY, "--cache", c.store, "--out", c.tmp / "ro" / "run"],
         ("ro/run", "Read-only file system"), store=True, read_only=True),
    # OUT a folder the run cannot write into (its parent, where the lock file goes, writable): pipeline.json, the checkpoint's
    # .next beside a checkpoint.pt (an --overwrite stopped before it replaced the run: --resume removes it), an --overwrite's
    # replacement of the earlier run's files, under way (--resume takes its steps again)
    Case("train-out-folder-read-only", lambda c: ["train", TINY, "--cache", c.store, "--out", c.tmp / "ro"],
         ("cannot write ", "/ro'", "make the folder writable (or choose another location) and rerun"), store=True, read_only=True),
    Case("resume-out-read-only-beside-a-next-checkpoint", lambda c: train(c, "--resume", "--epochs", "2"),
         ("cannot write ", "/run", "make the folder writable (or choose another location) and rerun with --resume"), store=True,
         prior=lambda c: shutil.copyfile(trained(c) / "checkpoint.pt", c.run / "checkpoint.pt.next"), read_only_run=True),
    Case("resume-out-read-only-while-an-overwrite-replaces-it", lambda c: train(c, "--resume", "--epochs", "2"),
         ("cannot write ", "/run", "make the folder writable (or choose another location) and rerun with --resume"), store=True,
         prior=lambda c: os.replace(trained(c) / "checkpoint.pt", c.run / "checkpoint.pt.next"), read_only_run=True),
    Case("train-out-is-a-file", lambda c: ["train", TINY, "--cache", c.store, "--out", text_file(c, "run", "a file")],
         ("run' is a file", "--out"), store=True),
    # -- click usage errors (exit 2)
    Case("storage-option-on-a-local-path", lambda c: ["info", c.store, "--storage-option", "anon=true"],
         ("storage options ['anon'] apply to URL locations", "not the local path"), store=True),
    Case("storage-option-flag-spelled-as-python", lambda c: ["info", "s3://bucket/t.zarr", "--storage-option", "anon=False"],
         ("storage option anon is true or false, got the string 'False', which the filesystem would take as true",
          "pass --storage-option anon=false or anon=true")),
    Case("storage-option-flag-in-a-chain", lambda c: ["info", "zip::s3://bucket/t.zarr.zip", "--storage-option", "s3.use_ssl=no"],
         ("storage option s3.use_ssl is true or false, got the string 'no'", "--storage-option s3.use_ssl=false",
          "or {'s3': {'use_ssl': False}} from Python")),  # the chain's layer: once {'use_ssl': False}, the outer layer's
    # a mapping given one value (the setting's name left out): once "cannot reach ...: 'str' object has no attribute 'copy'"
    Case("storage-option-mapping-given-a-string", lambda c: ["info", "s3://bucket/t.zarr", "--storage-option", "client_kwargs=eu-west-1"],
         ("storage option client_kwargs is a mapping of settings, got str 'eu-west-1'",
          "pass each setting as --storage-option client_kwargs.NAME=VALUE (e.g. client_kwargs.region_name=eu-west-1)")),
    Case("storage-option-mapping-in-a-chain", lambda c: ["info", "zip::http://127.0.0.1:9/t.zarr.zip", "--storage-option", "http.headers=TOKEN"],
         ("storage option http.headers is a mapping of settings, got str 'TOKEN'", "--storage-option http.headers.NAME=VALUE",
          "or {'http': {'headers': {...}}} from Python")),
    # the timeouts an unreachable endpoint's error says to raise, given with a unit: once "unsupported operand type(s) for +"
    Case("storage-option-timeout-with-a-unit", lambda c: ["info", "s3://bucket/t.zarr", "--storage-option", "config_kwargs.read_timeout=60s"],
         ("storage option config_kwargs.read_timeout is seconds, got str '60s'; pass a number, e.g. --storage-option "
          "config_kwargs.read_timeout=60",)),
    Case("storage-option-timeout-with-a-unit-in-a-chain", lambda c: ["info", "zip::s3://bucket/t.zarr.zip", "--storage-option",
                                                                      "s3.config_kwargs.read_timeout=60s"],
         ("storage option s3.config_kwargs.read_timeout is seconds, got str '60s'; pass a number, e.g. --storage-option "
          "s3.config_kwargs.read_timeout=60",)),  # the chain's layer: once "cannot reach ...: unsupported operand type(s) for +"
    Case("storage-option-http-timeout-with-a-unit", lambda c: ["info", "http://127.0.0.1:9/t.zarr", "--storage-option",
                                                               "client_kwargs.timeout.sock_read=1m"],
         ("storage option client_kwargs.timeout.sock_read is seconds, got str '1m'",)),
    Case("storage-option-misspelt", lambda c: ["info", "s3://bucket/t.zarr", "--storage-option", "endpoint-url=http://127.0.0.1:9"],
         ("a storage option the filesystem does not take", "unexpected keyword argument 'endpoint-url'); did you mean endpoint_url? check")),
    Case("storage-option-misspelt-over-http", lambda c: ["info", "http://127.0.0.1:9/t.zarr", "--storage-option", "header.Authorization=x"],
         ("unexpected keyword argument 'header'); did you mean headers? check",)),
    Case("storage-option-misspelt-in-a-chain", lambda c: ["info", "zip::s3://bucket/t.zarr.zip", "--storage-option",
                                                          "s3.endpoint-url=http://127.0.0.1:9"],
         ("with storage options ['s3']", "unexpected keyword argument 'endpoint-url'; did you mean s3.endpoint_url? check")),
    Case("storage-option-botocore-setting-misspelt-in-a-chain", lambda c: ["info", "zip::s3://bucket/t.zarr.zip", "--storage-option",
                                                                          "s3.config_kwargs.read_timout=60"],
         ("unexpected keyword argument 'read_timout'; did you mean s3.config_kwargs.read_timeout? check",)),
    Case("storage-option-botocore-setting-misspelt", lambda c: ["info", "s3://bucket/t.zarr", "--storage-option", "config_kwargs.read_timout=60"],
         ("unexpected keyword argument 'read_timout'); did you mean config_kwargs.read_timeout? check",)),
    Case("usage-missing-out", lambda c: extract(), ("Missing option '--out'",), code=2),
    Case("usage-not-an-integer", lambda c: extract("--out", c.new, "--batch-size", "many"), ("'many' is not a valid integer",), code=2),
    Case("usage-pipeline-is-a-folder", lambda c: ["extract", FIXTURES, "--out", c.new], ("is a directory",), code=2),
    Case("usage-teacher-check-without-pipeline", lambda c: ["verify", c.store, "--teacher-check", "4"],
         ("--teacher-check needs --pipeline PIPELINE",), code=2, store=True),
    # one option given a value and settings under it: once "'a.b' nests under a value already set", or (the other order)
    # the settings dropped with no word
    Case("usage-storage-option-nested-under-a-value", lambda c: ["info", "s3://bucket/t.zarr", "--storage-option", "anon=true",
                                                                 "--storage-option", "anon.x=1"],
         ("anon.x=1 nests under anon, already given the value True; give anon either one value or settings anon.NAME=VALUE, not both",),
         code=2),
    Case("usage-storage-option-value-over-settings", lambda c: ["info", "s3://bucket/t.zarr", "--storage-option",
                                                                "client_kwargs.region_name=x", "--storage-option", "client_kwargs=y"],
         ("client_kwargs=y would replace the settings ['region_name'] already given under client_kwargs; give client_kwargs either "
          "one value or settings client_kwargs.NAME=VALUE, not both",), code=2),
    Case("usage-storage-option", lambda c: ["info", c.store, "--storage-option", "region"], ("expected KEY=VALUE, got 'region'",),
         code=2, store=True),
]


@dataclass
class Prepared:
    """A case ready to run: its arguments and the snapshot of the store it runs against."""

    case: Case
    ctx: Ctx
    args: list[str]
    before: dict[Path, dict[str, tuple[bytes, int]]]  # the case's store and earlier training run, as they were

    def check_untouched(self) -> None:
        for root, files in self.before.items():
            assert snapshot(root) == files, f"{self.case.id}: {root.name} was changed by a command that failed"
        if not self.case.writes:
            assert not self.ctx.new.exists(), f"{self.case.id}: a failed validation created the output store"


def prepare(case: Case, folder: Path, tiny_store: str) -> Prepared:
    """Copy (and damage) the case's store, run its prior step, snapshot both; ``folder`` must exist."""
    if case.cuda and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so asking for it is no mistake")
    ctx = Ctx(folder)
    if case.store:
        shutil.copytree(tiny_store, ctx.store)
        if case.damage:
            case.damage(ctx.store)
    if case.prior:
        case.prior(ctx)
    before = {root: snapshot(root) for root in (ctx.store, ctx.run) if root.is_dir()}
    return Prepared(case, ctx, [str(a) for a in case.args(ctx)], before)


def check_output(case: Case, code: int, stdout: str, stderr: str) -> None:
    """Exit status, one Error line (or a failed verify report) with every fragment, no traceback."""
    assert code == case.code, f"{case.id}: exit {code}, expected {case.code}\nstdout: {stdout}\nstderr: {stderr}"
    assert "Traceback" not in stdout + stderr, stdout + stderr
    if case.report:
        assert "NOT verified" in stdout and stderr == "", stdout + stderr
        text = stdout
    else:
        lines = stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("Error: ")]
        assert len(errors) == 1 and errors[0] == lines[-1], stderr
        if case.code == 1:
            assert len(lines) == 1, stderr  # a usage error (2) also prints the usage lines before it
        text = errors[0]
    for fragment in case.match:
        assert fragment in text, f"{case.id}: {fragment!r} not in {text!r}"


def invoke(case: Case, tmp_path: Path, tiny_store: str) -> tuple[Prepared, Any]:
    """Prepare ``case`` in ``tmp_path`` and run it through the CLI in this process; a crash fails the test.
    Returns the prepared case and click's result (the other matrices share this)."""
    run = prepare(case, tmp_path, tiny_store)
    with contextlib.ExitStack() as stack:
        for folder in [tmp_path / "ro"] * case.read_only + [run.ctx.run] * case.read_only_run:
            stack.enter_context(read_only_dir(folder))
        stack.enter_context(environment(case.env))
        result = CliRunner().invoke(main, run.args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail("".join(traceback.format_exception(result.exception)))
    return run, result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, tiny_store: str) -> None:
    run, result = invoke(case, tmp_path, tiny_store)
    check_output(case, result.exit_code, result.stdout, result.stderr)
    run.check_untouched()


def test_the_matrix_lists_the_issue_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    for required in ("missing-pipeline", "toml-syntax", "unknown-section", "unknown-key", "import-file-missing", "attribute-missing",
                     "teacher-factory-raises", "teacher-not-a-module", "student-not-a-module", "unknown-layer", "layer-never-called",
                     "output-unsupported-type", "item-unsupported-type", "empty-dataset", "batch-size-0", "unknown-device",
                     "cuda-absent", "float16-overflow", "nan-in-teacher-output", "out-is-a-file", "store-of-another-teacher",
                     "info-newer-format", "train-newer-format", "verify-newer-format", "extract-resume-newer-format",
                     "train-missing-array", "verify-flipped-byte", "verify-truncated-chunk", "train-flipped-byte",
                     "train-truncated-chunk", "student-output-shape", "feature-cannot-be-projected", "unknown-loss",
                     "negative-temperature", "negative-weight", "epochs-0", "dataset-length-differs", "out-read-only"):
        assert required in ids, required


IN_A_PROCESS = ["toml-syntax", "teacher-factory-raises", "nan-in-teacher-output", "train-flipped-byte", "out-read-only"]


@pytest.mark.slow
def test_bad_input_in_real_processes(tmp_path: Path, tiny_store: str) -> None:
    """Representative cases in real ``kdcache`` processes (started together): stderr is the one line, no traceback."""
    runs = []
    for case in (c for c in CASES if c.id in IN_A_PROCESS):
        folder = tmp_path / case.id
        folder.mkdir()
        runs.append(prepare(case, folder, tiny_store))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with contextlib.ExitStack() as stack:
        for run in runs:
            if run.case.read_only:
                stack.enter_context(read_only_dir(run.ctx.tmp / "ro"))
        procs = [subprocess.Popen([str(KDCACHE), *run.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for run in runs]
        outputs = [proc.communicate(timeout=120) for proc in procs]
    for run, proc, (stdout, stderr) in zip(runs, procs, outputs):
        check_output(run.case, proc.returncode, stdout, stderr)
        run.check_untouched()
