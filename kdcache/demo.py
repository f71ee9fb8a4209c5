"""``kdcache demo``: the transfer-set story on the embedded MNIST pipeline, end to end, offline.

A pretrained CNN teacher scores all 50,000 MNIST training inputs once (and the 10,000 test
inputs, to measure it). Three students of one architecture get the same optimizer, schedule,
steps and seed (Hinton et al. 2015's setting: labels are expensive, inputs are plentiful):

- A: labels only, on a seeded choice of 1,000 labeled training images;
- B: distilled from the store over all training inputs, no labels (``kl`` only);
- C: reference: labels only, on all training labels.

Only the public API is used, with the same pipeline file users copy.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import kdcache
from kdcache import data, distributed, storage, store as layout
from kdcache.errors import PipelineError, StoreError, write_fix
from kdcache.pipeline import apply_override
from kdcache.train import check_values, local_folder, run_files, train

PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "mnist.toml"
LABEL_BUDGET = 1000
STUDENTS = {  # name -> (description, overrides)
    "A": ("labels only, 1,000 labeled images", ["train.loss.kl=0", "train.loss.ce=1", f"train.subset={LABEL_BUDGET}"]),
    "B": ("distilled from the store, no labels", ["train.loss.kl=1", "train.loss.ce=0"]),
    "C": ("labels only, all 50,000 labels", ["train.loss.kl=0", "train.loss.ce=1"]),
}


# set per extract and student; train.eval_split too: the students measure the test store (train.eval_cache), and another
# split there was refused only once both extracts had run ("train.eval_cache holds split 'test'")
OWN_KEYS = ("data.split", "train.loss.kl", "train.loss.ce", "train.subset", "train.eval_cache", "train.eval_split")


def demo(out: str | Path = "runs/demo", pipeline: str | Path = PIPELINE, *, overrides: tuple[str, ...] = (),
         progress: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo into ``out``; returns (and writes to ``out/summary.json``) the figures."""
    out = local_folder(str(out), "demo")
    distributed.refuse_torchrun("kdcache demo")  # in one process, before anything is made (its students' train read
    # torchrun's variables only once both extracts had run, and waited there for ranks that never came)
    train_store, test_store = out / "teacher-train.zarr", out / "teacher-test.zarr"
    extracts, students = _pipelines(pipeline, overrides, test_store)
    _check_out(out, extracts)
    _check_label_budget(extracts[0])  # after the folder's checks: it calls data.factory
    _make_out(out)

    start = time.perf_counter()
    echo(f"[1/2] extract: the teacher scores the training and test inputs once -> {train_store}, {test_store}")
    info = kdcache.extract(extracts[0], str(train_store), overwrite=True, progress=progress)
    kdcache.extract(extracts[1], str(test_store), overwrite=True, progress=progress)
    extract_seconds = time.perf_counter() - start

    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for name, (what, _) in STUDENTS.items():
        echo(f"[2/2] train student {name} ({what})")
        results[name] = train(students[name], str(train_store), out / f"student-{name}", overwrite=True, progress=progress)
    train_seconds = time.perf_counter() - start

    summary = _summary(info, results, train_store, extract_seconds, train_seconds)
    _write_summary(out, summary)
    echo(table(summary))
    return summary


def _pipelines(pipeline: str | Path, overrides: tuple[str, ...], test_store: Path) -> tuple[list[Any], dict[str, Any]]:
    """The two extracts' pipelines (train, test) and each student's, by name, all validated."""
    _refuse_own_keys(pipeline, overrides)
    base = ["train.eval_every=0"] + list(overrides)  # evaluate each student once, after its last step
    # Every pipeline (the students' too, with train's own checks of values) and the folder are validated before anything
    # is created or extracted: such a mistake in --set or --out fails in a second, not after the extracts. What needs a
    # store (a student's layers against the stored targets, the eval split) is checked when each student starts.
    extracts = [kdcache.load_pipeline(pipeline, base + [f"data.split={split}"]) for split in ("train", "test")]
    evaluation = [f"train.eval_cache={json.dumps(str(test_store))}", "train.eval_split=test"]  # the table's "test accuracy"
    students = {name: kdcache.load_pipeline(pipeline, base + student_overrides + evaluation)
                for name, (_, student_overrides) in STUDENTS.items()}
    for p in students.values():
        check_values(p)
    return extracts, students


def _check_label_budget(extract: Any) -> None:
    """Refuse a training split of fewer items than student A's ``LABEL_BUDGET`` (a ``--set data.factory``'s): its
    train.subset was refused only once both extracts had run. The split's length is known from the dataset (its
    factory called once more: MNIST's is cached, so extract's own call costs nothing more)."""
    n = len(data.load(extract, "train"))
    if n < LABEL_BUDGET:
        raise PipelineError(f"demo {extract.where('data.factory')}: its train split has {n:,} items, fewer than the {LABEL_BUDGET:,} "
                            f"labeled images student A trains on (train.subset, which the demo sets itself); pass a data.factory "
                            f"of at least {LABEL_BUDGET:,} training items, or run kdcache extract and kdcache train with your values")


def _summary(info: dict[str, Any], results: dict[str, dict[str, Any]], train_store: Path, extract_seconds: float,
             train_seconds: float) -> dict[str, Any]:
    """The demo's figures, from the training store's extract ``info`` and each student's ``train`` result."""
    teacher_acc = results["B"]["eval_teacher_accuracy"]
    a, b, c = (results[k]["eval_accuracy"] for k in "ABC")
    return {
        "teacher_accuracy": teacher_acc,
        "baseline_accuracy": a,
        "student_accuracy": b,
        "full_label_accuracy": c,
        "gap_closed": (b - a) / (teacher_acc - a) if teacher_acc != a else None,
        "teacher_params": info["teacher"]["num_parameters"],
        "student_params": results["B"]["params"],
        "steps": results["B"]["step"],
        "student_agreement_with_teacher": results["B"]["eval_agreement"],
        "store": {"path": str(train_store), "bytes": info["bytes_stored"], "compression_ratio": info["compression_ratio"],
                  "num_samples": info["num_samples"], "targets": {k: v["shape"] for k, v in info["targets"].items()}},
        "extract_seconds": extract_seconds,
        "train_seconds": train_seconds,
        "students": {k: {"description": STUDENTS[k][0], **v} for k, v in results.items()},
    }


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write ``summary`` to ``out/summary.json``."""
    try:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        raise StoreError(f"cannot write {str(out / 'summary.json')!r}: {e.strerror or e}; {write_fix(e)} and rerun kdcache demo") from None


def _refuse_own_keys(pipeline: str | Path, overrides: tuple[str, ...]) -> None:
    """Refuse overrides that change a value the demo sets itself for each extract and student (OWN_KEYS), in any form
    (``train.subset=100``, ``train={subset=100}``), or name one (``train.loss.kl=1`` or ``train.loss={kl=1, ce=0}``,
    the file's values: A and C still trained with kl = 0): the student's own value would win, silently, and the table
    would still describe the demo's (``--set train.subset=100`` trained B and C on 100 rows under "all 50,000")."""
    if not overrides:
        return
    given, default = kdcache.load_pipeline(pipeline, list(overrides)), kdcache.load_pipeline(pipeline, [])
    named: dict[str, Any] = {}  # what the overrides name, applied alone: train.loss={kl=1} names train.loss.kl
    for item in overrides:
        apply_override(named, item)
    for key in OWN_KEYS:
        value = functools.reduce(getattr, key.split("."), given)
        if value != functools.reduce(getattr, key.split("."), default) or _names(named, key.split(".")):
            raise PipelineError(f"demo {given.where(key)}: the demo sets {key} itself (yours: {key} = {value!r}), for each of its "
                                "extracts and students (the table describes them); leave it out, or run kdcache extract and kdcache "
                                f"train with {PIPELINE.name} and your values")


def _names(table: Any, parts: list[str]) -> bool:
    return not parts or isinstance(table, dict) and parts[0] in table and _names(table[parts[0]], parts[1:])


def _check_out(out: Path, extracts: list[Any]) -> None:
    """Refuse an --out that cannot be the demo's folder (a file, a path through a file; no write access: ``_make_out``)
    or must not be one: a zarr store or a folder inside one (``--out runs/teacher.zarr`` put the demo's two stores,
    three students and summary in the store's folder, where an ``extract --overwrite`` of it is then refused for them
    and ``pack`` leaves them out: ``train --out`` refuses both), or one holding what the demo would replace and is not
    an earlier demo's (a summary.json, a store or a student's folder), or a kdcache training run's folder (its
    pipeline.json and checkpoint.pt: the demo's stores, students and summary were put beside the run's files)."""
    existing = next((d for d in (out, *out.parents) if d.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "--out" if existing == out else f"the folder of --out {str(out)!r}"
        raise StoreError(f"{str(existing)!r} ({where}) is a file, not a folder; choose another --out for kdcache demo (or move that file away)")
    store = layout.store_above(out)
    if store is not None:
        where = "is a zarr store" if store == Path(os.path.abspath(out)) else f"is inside the zarr store {str(store)!r}"
        raise StoreError(f"--out {str(out)!r} {where}; kdcache demo writes its two stores, three students and summary into "
                         f"a folder of its own: choose another --out outside any store (e.g. {str(store.parent / 'demo')!r})")
    run = run_files(out) if out.is_dir() else []
    if run:
        raise StoreError(f"--out {str(out)!r} holds a kdcache training run ({', '.join(map(repr, run))}); kdcache demo writes its two "
                         "stores, three students and summary into a folder of its own: choose another --out (e.g. "
                         f"{str(out.parent / (out.name + '-demo'))!r})")
    _refuse_foreign_summary(out / "summary.json")
    for split, p in zip(("train", "test"), extracts):
        _refuse_foreign_store(out / f"teacher-{split}.zarr", p)
    for name in STUDENTS:
        _refuse_foreign_student(out / f"student-{name}", name)


def _make_out(out: Path) -> None:
    """Create the demo's folder (``_check_out`` accepted it), or refuse one that cannot be made (no write access)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the folder --out {str(out)!r}: {e.strerror or e}; {write_fix(e)} and rerun kdcache demo") from None


def _refuse_foreign_summary(file: Path) -> None:
    """Refuse an --out holding a ``summary.json`` that is not an earlier demo's (``--out .`` in a project folder): the
    demo replaced it with its own, after its runs, with no word. An earlier demo's (``gap_closed`` and ``students``) is
    replaced, as the demo's stores and students are."""
    if not file.exists():
        return
    try:
        summary = json.loads(file.read_text())
        ours = isinstance(summary, dict) and {"gap_closed", "students"} <= summary.keys()
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise StoreError(f"{str(file)!r} is not an earlier kdcache demo's summary (no 'gap_closed' and 'students'), and the demo "
                         f"writes its own there; choose another --out for kdcache demo (or move that file away)")


def _refuse_foreign_store(path: Path, extract: Any) -> None:
    """Refuse an --out holding, where the demo extracts a store, a kdcache store of another teacher or dataset than the
    demo's ``extract`` (a user's own ``teacher-train.zarr`` in ``--out .``): the demo's ``extract --overwrite`` replaced it
    with no word. One of the same teacher.factory, data.factory and data.split (an earlier demo's) is replaced; what is not
    a kdcache store is left to extract, which refuses it (and takes over what a killed extract left)."""
    try:
        manifest = json.loads((path / "zarr.json").read_text())["attributes"][layout.ATTRS]
        made = (manifest["teacher"]["factory"], manifest["dataset"]["factory"], manifest["dataset"]["split"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    ours = (extract.teacher.factory, extract.data.factory, extract.data.split)
    if made == ours:
        return
    if _made_by_a_demo(manifest.get("pipeline"), extract):  # an earlier demo's, with other --set values: named as such
        differ = "; ".join(f"its {key} is {then!r}, this demo's {now!r}"
                           for key, then, now in zip(("teacher.factory", "data.factory", "data.split"), made, ours) if then != now)
        raise StoreError(f"{str(path)!r} is an earlier kdcache demo's store, made with other values ({differ}), and this demo extracts "
                         f"its teacher there; choose another --out for kdcache demo, or remove that store to run this demo in "
                         f"{str(path.parent)!r} (the earlier demo's students and summary there are replaced too)")
    key, then, now = next(d for d in zip(("teacher.factory", "data.factory", "data.split"), made, ours) if d[1] != d[2])
    raise StoreError(f"{str(path)!r} is not an earlier kdcache demo's store (its {key} is {then!r}, the demo's {now!r}), and "
                     "the demo extracts its teacher there; choose another --out for kdcache demo (or move that store away)")


# what a demo's extracts record of their pipeline that no --set of the demo changes (OWN_KEYS, which it refuses: the
# pipeline file's values) and train.eval_every, which the demo sets to 0 (the default is 1): a store that records this
# demo's values of them all was made by a demo, not by an extract of the user's own
_DEMO_MARKS = ("train.loss.kl", "train.loss.ce", "train.subset", "train.eval_cache", "train.eval_split", "train.eval_every")


def _made_by_a_demo(recorded: Any, extract: Any) -> bool:
    """Whether ``recorded`` (a store manifest's ``pipeline``) has the values of ``_DEMO_MARKS`` the demo's ``extract`` has."""
    def value(values: Any, key: str) -> Any:
        return functools.reduce(lambda d, k: d[k], key.split("."), values)

    ours = extract.to_dict()
    try:
        return all(value(recorded, key) == value(ours, key) for key in _DEMO_MARKS)
    except (KeyError, TypeError):  # a store of an older kdcache, or a damaged manifest: not known to be a demo's
        return False


def _refuse_foreign_student(folder: Path, name: str) -> None:
    """Refuse an --out holding, where the demo trains student ``name``, what is not an earlier demo's student: a file, a
    broken symlink (named with its target: it was called a file), or a folder that is not empty and holds no kdcache
    run's pipeline.json measuring the demo's ``teacher-test.zarr`` (``train.eval_cache``, which the demo sets itself): a
    user's folder ``student-A`` was trained into with ``--overwrite``, its pipeline.json, metrics.jsonl and heads.pt
    replaced."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not any(folder.iterdir()):
        return
    try:
        values = json.loads((folder / "pipeline.json").read_text())
        ours = Path(values["train"]["eval_cache"]).name == "teacher-test.zarr"
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        what = ("a folder without a demo student's pipeline.json" if folder.is_dir() else "a file" if folder.exists() else
                storage.broken_link_words(folder))  # it was "a file"
        raise StoreError(f"{str(folder)!r} is not an earlier kdcache demo's student ({what}), and the demo trains student {name} "
                         "there; choose another --out for kdcache demo (or move it away)")


def table(s: dict[str, Any]) -> str:
    rows = [("teacher (pretrained CNN)", s["teacher_params"], s["teacher_accuracy"])] + [
        (f"{k}: {s['students'][k]['description']}", s["students"][k]["params"], s["students"][k]["eval_accuracy"]) for k in "ABC"
    ]
    lines = [f"{'model':<44} {'params':>9} {'test accuracy':>14}"]
    lines += [f"{name:<44} {params:>9,} {acc:>13.2%}" for name, params, acc in rows]
    store = s["store"]
    lines += [
        f"gap closed by distillation (B - A) / (teacher - A): {s['gap_closed']:.2f}",
        f"store: {store['path']}  {store['bytes'] / 1e6:.1f} MB on disk for {store['num_samples']:,} samples "
        f"({store['compression_ratio']:.2f}x compression)",
        f"extract {s['extract_seconds']:.1f}s (teacher, once), train {s['train_seconds']:.1f}s "
        f"(3 students x {s['steps']} steps, no teacher)",
    ]
    return "\n".join(lines)
