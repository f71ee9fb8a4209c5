"""Fuzz kdcache's handling of bad input: pipeline files and command lines (not part of the test suite).

For every key of the shipped pipelines (pipelines/*.toml) and the tests' (tests/fixtures/tiny.toml, the extract zoo's),
each value is replaced by a bad one (wrong type, empty, 0, negative, huge, a float for an int, NaN/inf, unicode, a line
break, an ANSI escape), unknown and misplaced keys are added, a section is misspelt; the mutated file is loaded
(``kdcache.pipeline.load``) and, for tiny.toml, a mutation it accepts is run: ``extract --dry-run``, ``extract`` over an
existing store and ``train`` from it (in a forked child, with a time limit); "tiny-rest" also mutates the keys tiny-full
leaves out (targets.select and mask, student.select and inputs, train.eval_cache and mask, a feature's select, train.loss's
mse and mse_on). Then each command's options get bad values and paths that are files, folders, missing or unwritable,
and (``--cli new`` alone) demo's, verify's and extract's --set, every command's --storage-option, --auto-resume,
--overwrite over a store or run by a failing command, a store, a run or a file where another is read or written, and
torchrun's environment variables (RANK, WORLD_SIZE, ...) set by hand. A finding is reported when:

- traceback: an exception that is not a kdcache one reaches the user (or the CLI leaves with one)
- multiline: the error is not one ``Error: ...`` line
- no-value: the message does not quote the value given
- accepted: an invalid value exits 0 (printed for review: some are valid, e.g. 0 meaning "default")
- hang: the command did not finish within the time limit
- damaged: an existing store or run changed under a command that failed

Run from the repository root: ``python benchmarks/fuzz_bad_input.py [--only load|stage|cli] [--cli all|new]
[--bases mnist,text,zoo,tiny,tiny-full,tiny-rest] [--timeout 60]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
sys.path.insert(0, str(ROOT))

import tomllib  # noqa: E402

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from kdcache.cli import main  # noqa: E402
from kdcache.errors import KdcacheError  # noqa: E402
from kdcache.pipeline import load  # noqa: E402

torch.set_num_threads(1)

NAN, INF = float("nan"), float("inf")
# (label, value) replacing a value; a value TOML cannot write (None) is skipped
BAD_VALUES = [
    ("string", "text"), ("list", [1, 2]), ("bool", True), ("table", {"a": 1}), ("int", 7), ("empty-string", ""),
    ("empty-list", []), ("empty-table", {}), ("zero", 0), ("negative", -1), ("negative-float", -0.5), ("huge", 10**12),
    ("huger", 10**30), ("float", 2.5), ("nan-string", "nan"), ("inf-string", "inf"), ("nan", NAN), ("inf", INF),
    ("unicode", "Ωmega✓"), ("newline", "a\nb"), ("ansi", "\x1b[31mred"), ("date", "DATE"),
]


# ----------------------------------------------------------------------------------- TOML writing


def toml_value(value: Any) -> str:
    if value == "DATE":
        return "1979-05-27"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True).replace("\\ud", "\\uD")  # surrogates never occur here
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(raw: dict[str, Any]) -> str:
    lines: list[str] = []
    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in top.items()]

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        subtables = {k: v for k, v in values.items() if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())
                     or k == "loss" and isinstance(v, dict)}
        lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items() if k not in subtables)
        for key, value in subtables.items():
            table(f"{name}.{json.dumps(key)}", value)

    for name, values in raw.items():
        if isinstance(values, dict):
            table(json.dumps(name), values)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- mutations


def keys(raw: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of ``raw``, tables included."""
    out = []
    for key, value in raw.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += keys(value, (*prefix, key))
    return out


def setpath(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return raw


def mutations(raw: dict[str, Any], paths: list[tuple[str, ...]]) -> list[tuple[str, dict[str, Any], Any]]:
    """(label, mutated raw, the value a message should quote or None): of the keys ``paths``."""
    out = []
    for path in paths:
        for label, value in BAD_VALUES:
            out.append((f"{'.'.join(path)}={label}", setpath(raw, path, value), value))
        if isinstance(dict_at(raw, path), dict):
            known = next(iter(dict_at(raw, path)), "x")
            out.append((f"{'.'.join(path)}+unknown", setpath(raw, (*path, "colour"), 1), "colour"))
            out.append((f"{'.'.join(path)}+misspelt", setpath(raw, (*path, known + "s"), dict_at(raw, (*path, known))), known + "s"))
    for section in [p[0] for p in paths if len(p) == 1]:
        renamed = {(k + "s" if k == section else k): v for k, v in raw.items()}
        out.append((f"[{section}]-misspelt", renamed, section + "s"))
    for section, values in raw.items():  # a key of one section repeated in another
        for other in [p[0] for p in paths if len(p) == 1]:
            if other != section and isinstance(values, dict) and values:
                key = next(iter(values))
                if not isinstance(raw[other], dict) or key in raw[other]:
                    continue
                out.append((f"{section}.{key}-also-in-{other}", setpath(raw, (other, key), values[key]), key))
    return out


def dict_at(raw: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        raw = raw[part]
    return raw


def quoted(value: Any) -> list[str]:
    """Ways a message may quote ``value``."""
    if value == "DATE":
        return ["1979-05-27"]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return [repr(value), str(value)]
    return [repr(value), str(value), json.dumps(value) if not isinstance(value, dict) else repr(value)]


# ----------------------------------------------------------------------------------- checking one outcome


class Findings:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []
        self.runs = 0

    def add(self, kind: str, case: str, detail: str) -> None:
        self.items.append((kind, case, detail))
        print(f"  [{kind}] {case}: {detail[:400]}", flush=True)

    def summary(self) -> str:
        counts = Counter(kind for kind, _, _ in self.items)
        return f"{self.runs} runs; " + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))


def check_cli(f: Findings, case: str, outcome: dict[str, Any], value: Any, invalid: bool = True) -> bool:
    """Classify one CLI outcome; True where it failed as a user mistake should."""
    if outcome.get("hang"):
        f.add("hang", case, "no answer within the time limit")
        return False
    if outcome["traceback"]:
        f.add("traceback", case, outcome["traceback"].strip().splitlines()[-1])
        return False
    stderr = outcome["stderr"].strip()
    if outcome["code"] == 0:
        if invalid:
            f.add("accepted", case, (outcome["stdout"].strip().splitlines() or [""])[-1])
        return False
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    if not errors or (outcome["code"] == 1 and len(lines) != 1) or errors[-1] != lines[-1]:
        f.add("multiline", case, stderr)
        return True
    if value is not None and not any(q in errors[-1] for q in quoted(value)):
        f.add("no-value", case, errors[-1])
    return True


def check_load(f: Findings, case: str, path: Path, overrides: list[str], value: Any) -> bool:
    """Load in process; True where the pipeline loaded (the value was accepted)."""
    f.runs += 1
    try:
        load(path, overrides)
    except KdcacheError as e:
        text = str(e)
        if "\n" in text or "\x1b" in text:
            f.add("multiline", case, repr(text))  # the CLI escapes it (cli._message), the API does not
        elif value is not None and not any(q in text for q in quoted(value)):
            f.add("no-value", case, text)
        return False
    except Exception:
        f.add("traceback", case, traceback.format_exc().strip().splitlines()[-1])
        return False
    return True


# ----------------------------------------------------------------------------------- running the CLI in a child


def _child(args: list[str], queue: Any, env: dict[str, str | None]) -> None:
    torch.set_num_threads(1)
    for name, value in env.items():  # the case's environment (None: unset), in this child alone
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    tb = ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(result.exception))
    queue.put({"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr, "traceback": tb})


def run_cli(args: list[Any], timeout: float) -> dict[str, Any]:
    """``kdcache ARGS`` in a forked child; ``args`` may begin with a dict: environment variables to set (None: unset)."""
    env = args[0] if args and isinstance(args[0], dict) else {}
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=([str(a) for a in args[bool(env):]], queue, env))
    child.start()
    try:
        outcome = queue.get(timeout=timeout)
    except Exception:
        child.kill()
        child.join()
        return {"hang": True}
    child.join()
    return outcome


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------- the three fuzzers


def bases(work: Path) -> dict[str, tuple[dict[str, Any], list[tuple[str, ...]]]]:
    """The parsed pipelines to mutate and the keys to mutate in each: factory paths made absolute, but tiny's (its copy
    of tiny.py sits in ``work``, so a mutated file there resumes the store tiny.toml made); "tiny-full" is tiny with
    every other key at its default, of which only those are mutated."""
    from reference import raw_pipeline

    from kdcache.pipeline import Pipeline

    shutil.copy(FIXTURES / "tiny.py", work / "tiny.py")
    out = {}
    for name in ("mnist", "text"):
        raw = absolute(tomllib.loads((ROOT / f"pipelines/{name}.toml").read_text()), ROOT / "pipelines")
        out[name] = raw, keys(raw)
    out["zoo"] = absolute(raw_pipeline(), FIXTURES), keys(raw_pipeline())
    tiny = tomllib.loads((FIXTURES / "tiny.toml").read_text())
    out["tiny"] = tiny, keys(tiny)
    full = copy.deepcopy(tiny)
    for section, values in Pipeline().to_dict().items():
        for key, value in values.items():
            if key not in full[section] and not isinstance(value, dict) and value not in ([], "") and key != "select":
                full[section][key] = value
    out["tiny-full"] = full, [path for path in keys(full) if path not in keys(tiny)]
    rest = copy.deepcopy(full)  # the keys tiny-full leaves out (empty by default, or selects), at a value tiny takes
    rest["targets"] |= {"select": {"features.3": "auto"}, "mask": ""}
    rest["student"] |= {"select": "auto", "inputs": []}
    rest["train"] |= {"eval_cache": "", "mask": ""}
    rest["train"]["features"]["features.3"]["select"] = "auto"
    rest["train"]["loss"] |= {"mse": 0.0, "mse_on": "logits"}  # tiny-full leaves the loss table as tiny has it
    out["tiny-rest"] = rest, [path for path in keys(rest) if path not in keys(full)]
    return out


def absolute(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for section in ("teacher", "data", "student"):
        factory = raw.get(section, {}).get("factory", "")
        if ".py:" in factory and not os.path.isabs(factory):
            raw[section]["factory"] = str(folder / factory)
    return raw


def fuzz_load(f: Findings, work: Path, names: list[str]) -> list[tuple[str, Path, Any]]:
    """Every mutation of every base, loaded from a file and (leaf values) as a --set; returns tiny's accepted ones."""
    accepted = []
    for name, (raw, paths) in bases(work).items():
        if name not in names:
            continue
        assert tomllib.loads(to_toml(raw)) == raw, name
        base = work / f"{name}.toml"
        base.write_text(to_toml(raw))
        for i, (label, mutated, value) in enumerate(mutations(raw, paths)):
            path = work / f"{name}-{i}.toml"
            try:
                path.write_text(to_toml(mutated))
                tomllib.loads(path.read_text())
            except (TypeError, tomllib.TOMLDecodeError) as e:
                print(f"  (skipped {name}:{label}: {e})")
                continue
            if check_load(f, f"{name}:{label}", path, [], value) and name.startswith("tiny"):
                accepted.append((label, path, value))
        for path_ in paths:
            for label, value in BAD_VALUES:
                item = f"{'.'.join(path_)}={toml_value(value)}"
                check_load(f, f"{name}:--set {item!r}", base, [item], value)
            for text in ("", "[", "{", "'", "1 2", "=", "a=b"):
                check_load(f, f"{name}:--set {'.'.join(path_)}={text!r}", base, [f"{'.'.join(path_)}={text}"], None)
    return accepted


def fuzz_stage(f: Findings, accepted: list[tuple[str, Path, Any]], store: Path, work: Path, timeout: float) -> None:
    """Run tiny's accepted mutations: extract --dry-run, extract over an existing store, train from it."""
    for label, path, value in accepted:
        section = label.split(".")[0].split("=")[0].strip("[]").split("-")[0]
        case = work / f"stage-{path.stem}"
        case.mkdir()
        copy_ = case / "tiny.zarr"
        shutil.copytree(store, copy_)
        before = snapshot(copy_)
        runs = [("extract --dry-run", ["extract", path, "--dry-run"]), ("extract over a store", ["extract", path, "--out", copy_])]
        if section in ("student", "train", "data"):
            runs.append(("train", ["train", path, "--cache", copy_, "--out", case / "run", "--set", "train.subset=16"]
                         if "subset" not in label and "steps" not in label and "epochs" not in label else
                         ["train", path, "--cache", copy_, "--out", case / "run"]))
        for what, args in runs:
            f.runs += 1
            outcome = run_cli(args, timeout)
            ok = check_cli(f, f"tiny:{label} [{what}]", outcome, value, invalid=False)
            if outcome.get("code", 0) == 0 and not outcome.get("hang"):
                print(f"  (ok {label} [{what}])")
            if ok and snapshot(copy_) != before:
                f.add("damaged", f"tiny:{label} [{what}]", "the store changed under a failed command")
        shutil.rmtree(case)


def cli_cases(store: Path, run: Path, work: Path, new_only: bool = False) -> list[tuple[str, list[Any], Any]]:
    """(id, args, value to quote) for each command's options with bad values (``new_only``: those more_cli_cases adds)."""
    tiny, a_file, a_dir, missing = FIXTURES / "tiny.toml", work / "afile.txt", work / "adir", work / "missing" / "x"
    a_file.write_text("not a store")
    a_dir.mkdir(exist_ok=True)
    ro = work / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    paths = [("file", a_file), ("dir", a_dir), ("missing", missing), ("unwritable", ro / "x"), ("empty", ""), ("blank", " "),
             ("newline", "a\nb"), ("ansi", "\x1b[31m.zarr")]
    ints = ["-1", "0", "1.5", "nan", "inf", "x", str(10**12), ""]
    cases: list[tuple[str, list[Any], Any]] = []
    for label, p in paths:
        cases += [
            (f"extract --out {label}", ["extract", tiny, "--out", p], None),
            (f"extract pipeline {label}", ["extract", p, "--out", work / "new.zarr"], None),
            (f"train --cache {label}", ["train", tiny, "--cache", p, "--out", work / "r"], None),
            (f"train --out {label}", ["train", tiny, "--cache", store, "--out", p, "--epochs", "1"], None),
            (f"train --eval-cache {label}", ["train", tiny, "--cache", store, "--out", work / "r2", "--eval-cache", p], None),
            (f"verify {label}", ["verify", p], None), (f"info {label}", ["info", p], None), (f"stats {label}", ["stats", p], None),
            (f"verify --pipeline {label}", ["verify", store, "--teacher-check", "2", "--pipeline", p], None),
            (f"pack out {label}", ["pack", store, p], None), (f"pack store {label}", ["pack", p, work / "o.zip"], None),
            (f"export out {label}", ["export", store, p], None), (f"export store {label}", ["export", p, work / "o.h5"], None),
            (f"import source {label}", ["import", p, work / "imp.zarr"], None),
            (f"import store {label}", ["import", a_file, p], None),
            (f"train --out {label} --resume", ["train", tiny, "--cache", store, "--out", p, "--resume"], None),
        ]
    for v in ints:
        cases += [
            (f"extract --batch-size {v!r}", ["extract", tiny, "--out", work / "n.zarr", "--batch-size", v, "--dry-run"], v),
            (f"extract --workers {v!r}", ["extract", tiny, "--out", work / "n.zarr", "--workers", v, "--dry-run"], v),
            (f"train --epochs {v!r}", ["train", tiny, "--cache", store, "--out", work / "re", "--epochs", v], v),
            (f"train --batch-size {v!r}", ["train", tiny, "--cache", store, "--out", work / "rb", "--batch-size", v, "--epochs", "1"], v),
            (f"verify --teacher-check {v!r}", ["verify", store, "--teacher-check", v, "--pipeline", tiny], v),
            (f"verify --seed {v!r}", ["verify", store, "--teacher-check", "2", "--pipeline", tiny, "--seed", v], v),
            (f"verify --tolerance {v!r}", ["verify", store, "--teacher-check", "2", "--pipeline", tiny, "--tolerance", v], v),
            (f"stats --workers {v!r}", ["stats", store, "--workers", v], v),
        ]
    for v in ["", "gpu", "cuda:99", "cpu:0", "Ωx", "a\nb", "\x1b[31m", "meta", "mps"]:
        cases += [(f"extract --device {v!r}", ["extract", tiny, "--out", work / "d.zarr", "--device", v, "--dry-run"], v),
                  (f"train --device {v!r}", ["train", tiny, "--cache", store, "--out", work / "rd", "--device", v, "--epochs", "1"], v)]
    for v in ["", ",", "nope", "features.3,features.3", "a\nb", "\x1b[31m", "features.3,,x"]:
        cases.append((f"extract --layers {v!r}", ["extract", tiny, "--out", work / "l.zarr", "--layers", v, "--dry-run"], v))
    for v in ["", "=", "a", "train.lr", "train.lr=", "=1", "train..lr=1", "train.lr=1=2", "train.loss=1", "[x]=1", "train.lr=[",
              "train.features.x=1", "targets.select.x=[]", "train.loss.kl=-1", "train.steps=1e3", "a.b.c.d=1"]:
        cases.append((f"train --set {v!r}", ["train", tiny, "--cache", store, "--out", work / "rs", "--set", v], None))
    for v in ["", "=", "a", "x=1", "anon=maybe", "a..b=1", "a.b=1"]:
        cases += [(f"info --storage-option {v!r}", ["info", store, "--storage-option", v], None),
                  (f"info s3 --storage-option {v!r}", ["info", "s3://b/x.zarr", "--storage-option", v], None)]
    cases += [("export --compression bad", ["export", store, work / "e.h5", "--compression", "bad"], "bad"),
              ("train --resume --overwrite", ["train", tiny, "--cache", store, "--out", run, "--resume", "--overwrite"], None),
              ("train --resume no run", ["train", tiny, "--cache", store, "--out", work / "none", "--resume"], None),
              ("extract --workers and --scheduler", ["extract", tiny, "--out", work / "w.zarr", "--workers", "1", "--scheduler", "tcp://x:1"], None),
              ("extract --scheduler bad", ["extract", tiny, "--out", work / "w.zarr", "--scheduler", "nonsense"], "nonsense"),
              ("pack store onto itself", ["pack", store, store], None),
              ("export store onto itself", ["export", store, store], None),
              ("import store onto source", ["import", a_file, a_file], None),
              ("train --cache == --out", ["train", tiny, "--cache", store, "--out", store], None),
              ("extract --out == pipeline", ["extract", work / "p.toml", "--out", work / "p.toml"], None)]
    (work / "p.toml").write_text(tiny.read_text().replace('"tiny.py:', f'"{FIXTURES}/tiny.py:'))
    return ([] if new_only else cases) + more_cli_cases(store, run, work, paths)


def more_cli_cases(store: Path, run: Path, work: Path, paths: list[tuple[str, Any]]) -> list[tuple[str, list[Any], Any]]:
    """Options and combinations added since session 35: demo's, verify's and extract's --set, every command's
    --storage-option, train's --auto-resume and --allow-partial, --overwrite of a failing command over a store or a
    run, --json on a failure, and a store, a run or a file where another of them is read or written."""
    tiny, a_file = FIXTURES / "tiny.toml", work / "afile.txt"
    demo = ["--no-progress", "--set", f"teacher.factory={FIXTURES}/tiny.py:teacher", "--set", f"data.factory={FIXTURES}/tiny.py:dataset",
            "--set", f"student.factory={FIXTURES}/tiny.py:student", "--set", "train.steps=2", "--set", "extract.device=cpu",
            "--set", "train.device=cpu", "--set", 'targets.layers=["features.3"]']
    check = ["verify", store, "--teacher-check", "2", "--pipeline", tiny]
    cases: list[tuple[str, list[Any], Any]] = []
    # not a missing or empty folder, nor a training run's (the demo's folders and summary beside its files): demo runs there
    for label, p in [*paths, ("store", store), ("inside-store", store / "targets" / "demo")]:
        if label not in ("missing", "dir"):
            cases.append((f"demo --out {label}", ["demo", "--out", p, *demo], None))
    sets = ["", "=", "a", "x=1", "train.lr=", "train.lr=-1", "train.steps=1e3", "targets.layers=[1]", "extract.batch_size=0",
            "extract.device=gpu", "teacher.factory=nowhere.py:t", "targets.select.x=[]", "train.features.x=1", "a.b.c.d=1"]
    for v in sets:
        cases += [(f"demo --set {v!r}", ["demo", "--out", work / "dm", *demo, "--set", v], None),
                  (f"verify --set {v!r}", [*check, "--set", v], None),
                  (f"extract --set {v!r}", ["extract", tiny, "--out", work / "n.zarr", "--dry-run", "--set", v], None)]
    options = ["", "=", "a", "x=1", "anon=maybe", "a..b=1", "a.b=1", "timeout=5s", "client_kwargs=3"]
    for v in options:
        for where, args in [("extract", ["extract", tiny, "--out", work / "n.zarr"]), ("extract s3", ["extract", tiny, "--out", "s3://b/n.zarr"]),
                            ("train", ["train", tiny, "--cache", store, "--out", work / "r", "--epochs", "1"]),
                            ("train s3", ["train", tiny, "--cache", "s3://b/x.zarr", "--out", work / "r"]),
                            ("verify", ["verify", store]), ("verify s3", ["verify", "s3://b/x.zarr"]), ("stats", ["stats", store]),
                            ("pack", ["pack", store, work / "o.zip"]), ("pack s3", ["pack", "s3://b/x.zarr", work / "o.zip"]),
                            ("export", ["export", store, work / "o.h5"]), ("import", ["import", a_file, work / "imp.zarr"]),
                            ("import s3", ["import", a_file, "s3://b/imp.zarr"])]:
            cases.append((f"{where} --storage-option {v!r}", [*args, "--storage-option", v], None))
    train = ["train", tiny, "--cache", store]  # the done run trained one epoch (--epochs 1): a --resume without it goes on
    cases += [
        ("train --auto-resume --resume", [*train, "--out", run, "--auto-resume", "--resume"], None),
        ("train --auto-resume --overwrite", [*train, "--out", run, "--auto-resume", "--overwrite"], None),
        ("train --auto-resume bad --set", [*train, "--out", run, "--auto-resume", "--set", "train.lr=-1"], -1),
        ("train --auto-resume other pipeline", [*train, "--out", run, "--auto-resume", "--epochs", "1", "--set", "train.lr=0.5"], None),
        ("train --auto-resume --cache a file", ["train", tiny, "--cache", a_file, "--out", run, "--auto-resume"], None),
        ("train --resume --epochs 0", [*train, "--out", run, "--resume", "--epochs", "0"], "0"),
        ("train --resume other pipeline", [*train, "--out", run, "--resume", "--epochs", "1", "--set", "train.batch_size=4"], None),
        ("train --auto-resume --allow-partial", [*train, "--out", run, "--auto-resume", "--epochs", "1", "--allow-partial"], None),
        ("train --overwrite bad --set", [*train, "--out", run, "--overwrite", "--set", "train.lr=-1"], -1),
        ("train --overwrite bad --device", [*train, "--out", run, "--overwrite", "--device", "gpu"], "gpu"),
        ("train --overwrite --cache a file", ["train", tiny, "--cache", a_file, "--out", run, "--overwrite"], None),
        ("train --overwrite --out a store", [*train, "--out", store, "--overwrite"], None),
        ("train --overwrite --out a file", [*train, "--out", a_file, "--overwrite"], None),
        ("train --cache a run", ["train", tiny, "--cache", run, "--out", work / "r"], None),
        ("train --eval-cache a run", [*train, "--out", work / "r", "--eval-cache", run], None),
        ("train --eval-cache a file", [*train, "--out", work / "r", "--eval-cache", a_file], None),
        ("train --json bad --set", [*train, "--out", work / "r", "--json", "--set", "train.lr=-1"], -1),
        ("extract --overwrite bad --set", ["extract", tiny, "--out", store, "--overwrite", "--set", "extract.batch_size=0"], 0),
        ("extract --overwrite bad factory", ["extract", tiny, "--out", store, "--overwrite", "--set", "teacher.factory=tiny.py:nope"], "nope"),
        ("extract --overwrite other dataset", ["extract", tiny, "--out", store, "--overwrite", "--set", "data.factory=tiny.py:nope"], "nope"),
        ("extract --overwrite --out a run", ["extract", tiny, "--out", run, "--overwrite"], None),
        ("extract --overwrite --out a file", ["extract", tiny, "--out", a_file, "--overwrite"], None),
        ("extract --out a run", ["extract", tiny, "--out", run], None),
        ("extract --overwrite --dry-run over a store", ["extract", tiny, "--out", store, "--overwrite", "--dry-run"], None),
        ("extract --json bad --set", ["extract", tiny, "--out", work / "n.zarr", "--json", "--set", "extract.batch_size=0"], 0),
        ("extract --json --dry-run bad layer", ["extract", tiny, "--dry-run", "--json", "--layers", "nope"], "nope"),
        ("pack --overwrite onto the store", ["pack", store, store, "--overwrite"], None),
        ("pack --overwrite onto a run", ["pack", store, run, "--overwrite"], None),
        ("pack a run", ["pack", run, work / "o.zip"], None),
        ("export --overwrite onto the store", ["export", store, store, "--overwrite"], None),
        ("export --overwrite onto a run", ["export", store, run, "--overwrite"], None),
        ("export a run", ["export", run, work / "o.h5"], None),
        ("import --overwrite onto the store, source not hdf5", ["import", a_file, store, "--overwrite"], None),
        ("import --overwrite onto a run", ["import", a_file, run, "--overwrite"], None),
        ("import a store", ["import", store, work / "imp.zarr"], None),
        ("import onto the store", ["import", a_file, store], None),
        ("verify --json a file", ["verify", a_file, "--json"], None),
        ("info --json a run", ["info", run, "--json"], None),
        ("stats --json a run", ["stats", run, "--json"], None),
        ("verify a run", ["verify", run], None),
        ("verify --teacher-check --pipeline a store", ["verify", store, "--teacher-check", "2", "--pipeline", store], None),
        ("verify --teacher-check other teacher", [*check, "--set", "teacher.factory=tiny.py:student"], None),
    ]
    # torchrun's environment set by hand or left over (each command; those that never join a process group may succeed)
    environments = [{"RANK": v} for v in ("x", "-1", "", "1", "1.5", " 0")] + [{"WORLD_SIZE": v} for v in ("0", "-1", "x", "2", "1e3")] + [
        {"LOCAL_RANK": "x"}, {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0"}, {"RANK": "3", "WORLD_SIZE": "2"},
        {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "x"}]
    for env in environments:
        env = {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None, "MASTER_ADDR": None,
               "MASTER_PORT": None} | env
        said = " ".join(f"{k}={v!r}" for k, v in env.items() if v is not None)
        for where, args in [("extract", ["extract", tiny, "--out", work / "n.zarr"]), ("extract --dry-run", ["extract", tiny, "--dry-run"]),
                            ("train", [*train, "--out", work / "r", "--epochs", "1"]), ("verify", ["verify", store]),
                            ("verify --teacher-check", [*check]), ("stats", ["stats", store]), ("info", ["info", store]),
                            ("pack", ["pack", store, work / "o.zip"]), ("export", ["export", store, work / "o.h5"])]:
            cases.append((f"{where} with {said}", [env, *args], None))
    return cases


def fuzz_cli(f: Findings, store: Path, work: Path, timeout: float, new_only: bool = False) -> None:
    run = work / "done-run"
    assert run_cli(["train", FIXTURES / "tiny.toml", "--cache", store, "--out", run, "--epochs", "1"], timeout)["code"] == 0
    for case, args, value in cli_cases(store, run, work, new_only):
        guarded = {root: snapshot(root) for root in (store, run)}
        f.runs += 1
        outcome = run_cli(args, timeout)
        failed = check_cli(f, case, outcome, value, invalid=False)
        if outcome.get("code") == 0:
            print(f"  (ok {case})")
        for root, files in guarded.items():
            if snapshot(root) != files:
                f.add("damaged", case, f"{root.name} changed{'' if failed else ' (the command succeeded)'}")
        for leftover in ("r", "r2", "re", "rb", "rd", "rs", "n.zarr", "new.zarr", "imp.zarr", "o.zip", "o.h5", "e.h5", "l.zarr", "d.zarr", "w.zarr", "dm"):
            p = work / leftover
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["load", "stage", "cli"])
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--bases", default="mnist,text,zoo,tiny,tiny-full,tiny-rest", help="pipelines to mutate (comma-separated)")
    parser.add_argument("--cli", choices=["all", "new"], default="all", help="new: only the option cases added since session 35")
    args = parser.parse_args()
    started = time.monotonic()
    f = Findings()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        os.chdir(work)
        store = work / "tiny.zarr"
        import kdcache
        kdcache.extract(kdcache.load_pipeline(FIXTURES / "tiny.toml"), str(store))
        if args.only in (None, "load", "stage"):
            accepted = fuzz_load(f, work, args.bases.split(","))
            print(f"load: {f.summary()}; tiny accepted {len(accepted)}", flush=True)
            if args.only != "load":
                fuzz_stage(f, accepted, store, work, args.timeout)
                print(f"stage: {f.summary()}", flush=True)
        if args.only in (None, "cli"):
            fuzz_cli(f, store, work, args.timeout, args.cli == "new")
        (work / "ro").chmod(0o755) if (work / "ro").exists() else None
    print(f"done in {time.monotonic() - started:.0f} s: {f.summary()}")


if __name__ == "__main__":
    main_()
