"""A seeded fuzzer of train's pairing: random stores and training settings, every batch the student trains on checked
row by row against targets recomputed from its own input.

Not part of the default suite (tests/test_fuzz_alignment.py runs a few of its runs; 400 runs: about 15 minutes on one
core). Run from the repository root::

    python tests/fuzz_alignment.py [--seed 0] [--runs 200] [--jobs 1] [--minutes M] [--replay RUN ...] [--first]
                                   [--json report.json]

The datasets, teacher and student are ``tests/fixtures/aligned.py``'s: item ``i``'s input holds its number ``v = i``
in every value it has (a tensor, an ``(input, label)`` tuple, or a dict with a padding mask), the teacher's logits are
``v + (c + v) % 4`` for class c (per token for dicts; the order of the classes turns with v) and its layer ``body``
eight values of ``v``, so nothing of kdcache's is trusted for what a row's targets must be. The student keeps the input of its every forward; ``Run.losses`` (the step's
loss, given the batch) is wrapped to take, for each step, what the student was called with and the targets, labels and
mask the step was given. Each run draws:

- the items: their form, read one by one or by a batched ``__getitems__``, a dict's ``x`` alone given to the student
  (``student.inputs``) or with its mask; N from 1 to 97 (below the batch, not a multiple of the shard); in about a
  third of the runs a dataset that is not thread-safe (``aligned.OneCursor``: read as from one open file, a seek then
  the read, one per split in the process as a factory caching its open file gives, so a resume in the same process
  reads the one the stopped run read); extract's DataLoader workers, 0 to 2 (these two drawn apart: a seed's other
  draws are as before);
- the store: ``extract.rows_per_shard`` and ``extract.batch_size``, ``targets.dtype``, ``targets.topk``,
  ``targets.layers`` (then ``train.features`` with a projection head), and its making: ``extract``; on dask
  (``--workers``); resumed, in batches of another size or not, after some shards' markers and objects are removed;
  ``pack``ed to a zip; ``export``ed to HDF5 and ``import``ed back; some shards' markers cleared and trained with
  ``allow_partial``;
- train's ``batch_size``, ``seed``, ``epochs`` or ``steps``, ``num_workers`` 0 to 2, ``memory_budget_mb`` (in memory or
  streamed), ``shuffle_buffer_shards``, ``streams``, ``subset``, ``drop_last``, ``fingerprint_check``,
  ``checkpoint_every``, the loss terms, ``train.mask``, and ``train.eval_cache`` (a store of other samples, of its own
  top-k, shards and dtype, whose eval batches' stored logits are checked as the steps' are, through ``train._agreement``);
- a stop at a drawn step: SIGTERM (the hook sends it to its own process: the run saves a checkpoint there), SIGTERM in
  the evaluation after that step (``train._agreement``'s hook sends it), an exception from the step (a crash: the
  steps after the last checkpoint are trained again), or a plan ending there (``train.steps``), then a resume
  (``resume="auto"`` or ``True``; as many DataLoader workers or another number, to 3, in memory or streamed as before
  or not; from a partial store, its other shards completed meanwhile or not), stopped again or not.

Checked, each a defect where it fails: every row of every step holds one number throughout its input (``mixed``); its
targets (each stored array: logits, top-k values and classes, the layer), label and mask are those of that number
(``paired``); the batch's ``index`` is that number (``index``); no row of a shard not done is trained on, and each row
trained on is trained on once per epoch (``coverage``: with ``drop_last``, at most once); each part of a stopped run
trains on the uninterrupted run's rows, step by step, from its checkpoint's step, which after a SIGTERM is where the
part before it stopped (``resume``); a dataset that is not thread-safe is read by one thread of this process at a time (``threads``: extract's
and train's threads, and those of a run that returned or raised; a DataLoader worker reads its own copy). A run kdcache refuses with one of the errors it documents for settings of the space
(``REFUSALS``: drop_last leaving no batch, a subset or streams larger than the rows, a resume that would serve its
batches in another order) is ``refused``, counted, no defect; another of its errors is a defect (``refused``: a run it
should train), and so is any other exception (``traceback``). Each defect is printed with its settings and the
``--replay`` that runs it again.

Planted slips, one at a time in a copy of the tree (``--first``, 40 to 60 runs each; tests/mutate_alignment.py's ids):
reported within 1 to 17 runs: C1, C2, C3, C5, S1 (a traceback), S4 (``coverage``), E6 (``refused``), E7, E8 and three
target shifts in cache.py (``paired``: the store's last row given the row before it's targets in RAM, a streamed buffer
of several shards its targets one row on, each batch's targets one row on), C9, C10, T1 (``resume``); C13 (joined
streams: at run 22 of 40; 4 of 8 runs drawn for it) and T4 (a partial store completed between stop and resume: 1 of 8
runs drawn for it, none of 140 others). Not reported, being no slip of train's pairing here: C4, C7, C19, S3, E3
(equivalent for train: its rows are sorted and of done shards, a buffer's shards sorted, extract's batches in order),
C6, C8, C12, C18, C21, T2 (order, checks or RNG alone, alike in the runs compared); C11 (3 workers resumed inside an
epoch) was missed in 100 runs. Undone in a copy, a8f4392 (the next epoch's batches read the dataset beside the thread
making the epoch's last): seed 0, 5 of its first 80 runs (the first at run 56), each ``threads`` (two kdcache-prefetch
threads), 2 also ``paired`` and ``index`` (trained on as if fine), 3 refused by kdcache's own fingerprint check.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path[:0] = [str(ROOT), str(FIXTURES)]

SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 23, 31, 32, 33, 47, 50, 64, 97]
# what kdcache refuses of the space, as documented; any other refusal is a defect (``refused``: a run it should train)
REFUSALS = [r"train\.drop_last = true leaves no batch in epoch", r"train\.subset = \d+ exceeds the \d+ rows available",
            r"streams = \d+ \(train\.streams.*is more than the \d+ rows trained on",
            r"resume=\S+: this run served its batches (from RAM|streamed by \d+ DataLoader reader\(s\)), now "]


# ------------------------------------------------------------------------------------------------ the space


def draw(rng: random.Random) -> dict[str, Any]:
    """One run's settings."""
    form = rng.choice(["tensors", "tuples", "dicts"])
    n = rng.choice(SIZES)
    c: dict[str, Any] = {
        "form": form, "n": n, "rows_per_shard": rng.choice([1, 2, 3, 4, 5, 7, 8, 16, 32, rng.randint(1, 40)]),
        "extract_batch": rng.choice([1, 3, 8, 16, rng.randint(1, 40)]), "dtype": rng.choice(["float32", "float16"]),
        "topk": rng.choice([0, 0, 1, 2, 3]), "layers": rng.random() < 0.4,
        "making": rng.choices(["extract", "dask", "resumed", "zip", "hdf5", "partial"], [5, 1, 2, 2, 2, 2])[0],
        "batch": rng.choice([1, 2, 3, 4, 7, 8, 16, 64, rng.randint(1, 40)]), "seed": rng.randrange(1000),
        "epochs": rng.choice([1, 2, 3]), "steps": 0, "workers": rng.choices([0, 1, 2], [3, 1, 1])[0],
        "budget": rng.choice([2048.0, 2048.0, 0.0]), "buffer": rng.randint(1, 4), "streams": 1,
        "subset": 0, "drop_last": rng.random() < 0.2, "check": rng.choice([1.0, 0.5, 0.0]),
        "kl": 1.0, "mse": 0.0, "ce": 0.0, "mask": False, "eval": False, "stop_at": 0,
    }
    if rng.random() < 0.2:
        c["steps"] = rng.randint(1, 12)
    if c["budget"] == 0.0 and rng.random() < 0.4:
        c["streams"] = 2
    if rng.random() < 0.2 and n > 1:
        c["subset"] = rng.randint(1, n - 1)
    if c["topk"] == 0 and rng.random() < 0.3:
        c["mse"] = 1.0
    if form == "tuples" and rng.random() < 0.4:
        c["ce"] = 0.5
    if c["layers"] and rng.random() < 0.3:
        c["kl"] = 0.0  # the layer alone
    if form == "dicts":
        c["mask"] = rng.random() < 0.7
    elif rng.random() < 0.25:
        c["eval"] = rng.choice([1, 3, 9, 20])
    if rng.random() < 0.45:  # where in the run's steps (a fraction of them) it stops
        c["stop_at"] = round(rng.random(), 3) or 0.5
    # drawn last: the draws before stay a seed's
    c["resume_workers"] = rng.choice([c["workers"], c["workers"], 0, 1, 2, 3])
    c["resume"] = rng.choice(["auto", True])
    c["resume_extract_batch"] = rng.choice([c["extract_batch"], rng.randint(1, 40)])
    c["stop_kind"] = rng.choice(["term", "term", "crash"])
    c["checkpoint_every"] = rng.choice([0, 0, 1, 2, 3, 5])
    c["complete_between"] = c["making"] == "partial" and rng.random() < 0.8
    c["resume_budget"] = rng.choice([c["budget"], c["budget"], c["budget"], 0.0, 2048.0])
    c["stop_again"] = rng.choice([0, 0, round(rng.random(), 3) or 0.5])  # of the resumed run's steps
    c["getitems"] = rng.random() < 0.3
    c["student_inputs"] = ["x"] if form == "dicts" and rng.random() < 0.3 else []
    if c["eval"] and c["stop_at"] and rng.random() < 0.4:
        c["stop_kind"] = "eval"  # SIGTERM in the evaluation after that step: the epoch's checkpoint, then the stop
    if c["stop_at"] and rng.random() < 0.2:
        c["stop_kind"] = "plan"  # a plan of train.steps that ends there, then resume=True with the whole plan
    c["eval_store"] = {"topk": rng.choice([c["topk"], c["topk"], 0, 2]),
                       "rows_per_shard": rng.choice([c["rows_per_shard"], rng.randint(1, 9)]),
                       "dtype": rng.choice(["float32", "float16"])}
    # drawn apart (the draws above, and those making the store, stay a seed's): a dataset that is not thread-safe, and
    # extract's DataLoader workers
    own = random.Random(f"{rng.getstate()[1][:4]}:cursor")  # rng not advanced
    c["cursor"] = own.random() < 0.35
    c["extract_workers"] = own.choice([0, 0, 0, 0, 1, 2])
    return c


def evaluated(c: dict[str, Any]) -> dict[str, Any]:
    """The settings of the eval store's extract (``train.eval_cache``): its own top-k, shards and dtype, no layer."""
    return {**c, **c["eval_store"], "layers": False}


def pipeline_dict(c: dict[str, Any], split: str) -> dict[str, Any]:
    targets: dict[str, Any] = {"logits": True, "dtype": c["dtype"], "topk": c["topk"]}
    if c["layers"]:
        targets["layers"] = ["body"]
    loss = {"kl": c["kl"], "mse": c["mse"], "ce": c["ce"]}
    train: dict[str, Any] = {
        "epochs": c["epochs"], "steps": c["steps"], "batch_size": c["batch"], "seed": c["seed"], "device": "cpu",
        "lr": 1e-3, "num_workers": c["workers"], "memory_budget_mb": c["budget"], "shuffle_buffer_shards": c["buffer"],
        "streams": c["streams"], "subset": c["subset"], "drop_last": c["drop_last"], "fingerprint_check": c["check"],
        "fingerprint_recheck": c["check"], "loss": loss, "checkpoint_every": c["checkpoint_every"]}
    if c["layers"]:
        train["features"] = {"body": {"student": "fc", "weight": 1.0}}
    if c["mask"]:
        train["mask"] = "mask"
    return {"teacher": {"factory": "aligned.py:teacher"}, "data": {"factory": f"aligned.py:{c['form']}", "split": split},
            "targets": targets, "student": {"factory": "aligned.py:student", "inputs": c.get("student_inputs", [])},
            "extract": {"batch_size": c["extract_batch"], "device": "cpu", "rows_per_shard": c["rows_per_shard"],
                        "num_workers": c.get("extract_workers", 0)},
            "train": train}


def pipeline(c: dict[str, Any], split: str | None = None, extract_batch: int = 0, **train: Any) -> Any:
    from kdcache.pipeline import from_dict

    raw = pipeline_dict(c, (split or f"n{c['n']}") + ("b" if c.get("getitems") else "") + ("c" if c.get("cursor") else ""))
    raw["train"].update(train)
    raw["extract"]["batch_size"] = extract_batch or raw["extract"]["batch_size"]
    return from_dict(raw, root=FIXTURES)


# ------------------------------------------------------------------------------------------------ the stores


def cleared(location: Path, rng: random.Random, keep_one: bool) -> list[int]:
    """Some shards' done markers cleared (as a store being extracted, or one whose extract stopped); the shards cleared."""
    import zarr

    done = zarr.open_array(str(location / "progress" / "done"), mode="r+", zarr_format=3)
    shards = list(range(done.shape[0]))
    chosen = sorted(rng.sample(shards, rng.randint(1, max(1, len(shards) - (1 if keep_one else 0)))))
    if keep_one and len(chosen) == len(shards):
        return []
    for s in chosen:
        done[s] = False
    return chosen


def make_store(c: dict[str, Any], work: Path, rng: random.Random) -> tuple[str, list[int]]:
    """The training store as ``c["making"]`` makes it, and the shards not done in it (``partial``)."""
    import kdcache
    from kdcache import distributed, interop

    folder = work / "s.zarr"
    if c["making"] == "dask":
        distributed.extract_distributed(pipeline(c), str(folder), workers=2)
    else:
        kdcache.extract(pipeline(c), str(folder))
    if c["making"] == "resumed":  # as an extract stopped before those shards were written: their objects gone too
        for s in cleared(folder, rng, keep_one=False):
            for column in [*folder.glob("samples/*/c"), *folder.glob("targets/*/c"), *folder.glob("targets/layers/*/c")]:
                shutil.rmtree(column / str(s), ignore_errors=True)
                (column / str(s)).unlink(missing_ok=True)
        kdcache.extract(pipeline(c, extract_batch=c["resume_extract_batch"]), str(folder))
    if c["making"] == "partial":
        return str(folder), cleared(folder, rng, keep_one=True)
    if c["making"] == "zip":
        interop.pack(str(folder), str(work / "s.zarr.zip"))
        return str(work / "s.zarr.zip"), []
    if c["making"] == "hdf5":
        interop.export_hdf5(str(folder), str(work / "s.h5"))
        interop.import_hdf5(str(work / "s.h5"), str(work / "i.zarr"))
        return str(work / "i.zarr"), []
    return str(folder), []


# ------------------------------------------------------------------------------------------------ the hook


class Crash(Exception):
    """Raised by the hook in a step: the process's end without a checkpoint (an out-of-memory, a SIGKILL)."""


class Recorder:
    """``Run.losses`` and ``train._agreement`` wrapped: each step's (student input, targets, label, mask, index) and each
    eval batch's (student input, targets); ``stop_at`` > 0: SIGTERM to this process as that step's loss is computed
    (``stop_kind`` "term"), or in the first evaluation after it ("eval"), or an exception from that step ("crash")."""

    def __init__(self) -> None:
        import importlib

        train = importlib.import_module("kdcache.train")  # the module: kdcache.train is its function
        self.steps: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.stop_at, self.stop_kind = 0, "term"
        self.run: Any = None
        self.losses, self.agreement = train.Run.losses, train._agreement
        recorder = self

        def losses(run: Any, batch: dict[str, Any]) -> Any:
            parts = recorder.losses(run, batch)
            recorder.run = run
            if batch.get("share", 1.0) != 0:
                recorder.steps.append({"seen": _copy(run.student.seen), "targets": _copy(batch["targets"]),
                                       "label": None if batch["label"] is None else batch["label"].clone(),
                                       "mask": None if batch.get("mask") is None else batch["mask"].clone(),
                                       "index": batch["index"].clone(), "rows": batch["rows"].clone()})
                if len(recorder.steps) == recorder.stop_at and recorder.stop_kind == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                elif len(recorder.steps) == recorder.stop_at and recorder.stop_kind == "crash":
                    raise Crash(f"crashed at step {recorder.stop_at}")
            return parts

        def agreement(logits: Any, targets: Any, classes: int) -> Any:
            recorder.evals.append({"seen": _copy(recorder.run.student.seen), "targets": _copy(targets)})
            if recorder.stop_kind == "eval" and 0 < recorder.stop_at <= len(recorder.steps):  # the first eval after it
                recorder.stop_at = 0
                os.kill(os.getpid(), signal.SIGTERM)
            return recorder.agreement(logits, targets, classes)

        self.train, self.wrapped = train, (losses, agreement)

    def __enter__(self) -> Recorder:
        """Wrap ``Run.losses`` and ``train._agreement`` while a run is fuzzed (a test calls ``one`` in pytest's process)."""
        self.train.Run.losses, self.train._agreement = self.wrapped
        return self

    def __exit__(self, *exc: Any) -> None:
        self.train.Run.losses, self.train._agreement = self.losses, self.agreement

    def take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        steps, evals, self.steps, self.evals, self.stop_at = self.steps, self.evals, [], [], 0
        return steps, evals


def _copy(x: Any) -> Any:
    return {k: v.clone() for k, v in x.items()} if isinstance(x, dict) else x.clone()


RECORDER: Recorder | None = None


def recorder() -> Recorder:
    global RECORDER
    if RECORDER is None:
        RECORDER = Recorder()
    return RECORDER


# ------------------------------------------------------------------------------------------------ the checks


def numbers(seen: Any) -> tuple[np.ndarray, bool]:
    """Each row's number, and whether every row holds only its number (a dict's padding: 0)."""
    import aligned
    import torch

    if isinstance(seen, dict):
        x, mask = seen["x"], seen["mask"]
        v = x[:, 0]
        length = 1 + v.long() % aligned.T
        ok = torch.equal(mask.long(), (torch.arange(aligned.T) < length[:, None]).long()) and torch.equal(x, v[:, None] * mask)
        return v.numpy().astype(np.int64), ok
    if seen.dim() == 2:  # a dict's x alone (student.inputs = ["x"])
        return numbers({"x": seen, "mask": (torch.arange(aligned.T) < 1 + seen[:, :1].long() % aligned.T).long()})
    v = seen[:, 0, 0]
    return v.numpy().astype(np.int64), bool((seen == v[:, None, None]).all())


def expected_targets(seen: Any, c: dict[str, Any]) -> dict[str, Any]:
    """The targets the teacher gives the student's input ``seen``, as the store keeps them (dtype, top-k)."""
    import aligned
    import torch

    from kdcache import store as layout

    teacher, body = aligned.Teacher(), {}
    teacher.body.register_forward_hook(lambda m, a, out: body.setdefault("out", out))
    with torch.no_grad():
        logits = teacher(**seen) if isinstance(seen, dict) else teacher(seen)
    dtype = getattr(torch, c["dtype"])
    out: dict[str, Any] = {}
    if c["topk"]:
        top = logits.topk(c["topk"], -1)
        out[layout.LOGITS], out[layout.LOGITS_INDICES] = top.values.to(dtype), top.indices
    else:
        out[layout.LOGITS] = logits.to(dtype)
    if c["layers"]:
        out[layout.layer_path("body")] = body["out"].to(dtype)
    return out


def check_batch(b: dict[str, Any], c: dict[str, Any], where: str, eval_batch: bool = False) -> list[str]:
    import aligned
    import torch

    v, whole = numbers(b["seen"])
    problems = [] if whole else [f"mixed: {where}: a row's input holds more than one number"]
    expected = expected_targets(b["seen"], c)
    for path, got in b["targets"].items():
        want = expected.get(path)
        if want is None:
            problems.append(f"paired: {where}: target {path} not expected")
        elif got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
            bad = [int(i) for i in range(len(v)) if got.shape != want.shape or not torch.equal(got[i].to(want.dtype), want[i])]
            problems.append(f"paired: {where}: {path} of rows holding {v[bad[:4]].tolist()} is not theirs "
                            f"(first: {got[bad[0]].flatten()[:4].tolist()}, want {want[bad[0]].flatten()[:4].tolist()})")
    if eval_batch:
        return problems
    if b["label"] is not None and c["form"] != "tensors" and not np.array_equal(b["label"].numpy(), v % 4):
        problems.append(f"paired: {where}: labels {b['label'].tolist()[:8]} for numbers {v.tolist()[:8]}")
    if b["mask"] is not None:
        want = torch.arange(aligned.T) < torch.as_tensor(1 + v % aligned.T)[:, None]
        if not torch.equal(b["mask"].bool(), want):
            problems.append(f"paired: {where}: the mask of rows {v.tolist()[:8]} is not theirs")
    if not np.array_equal(b["index"].numpy(), v):
        problems.append(f"index: {where}: index {b['index'].tolist()[:8]} for rows holding {v.tolist()[:8]}")
    return problems


def check(c: dict[str, Any], steps: list[dict[str, Any]], evals: list[dict[str, Any]], not_done: list[int]) -> list[str]:
    problems: list[str] = []
    for s, b in enumerate(steps):
        problems += check_batch(b, c, f"step {s + 1}")
    for e, b in enumerate(evals):
        problems += check_batch(b, evaluated(c), f"eval batch {e + 1}", eval_batch=True)
    seen = collections.Counter(int(x) for b in steps for x in numbers(b["seen"])[0])
    per_shard = c["rows_per_shard"]
    lost = sorted(x for x in seen if x // per_shard in not_done or not 0 <= x < c["n"])
    if lost:
        problems.append(f"coverage: rows {lost[:8]} of shards not done (or no row of the store) trained on")
    if c["steps"] == 0 and seen:
        counts = set(seen.values())
        if (counts != {c["epochs"]}) if not c["drop_last"] else not counts <= set(range(1, c["epochs"] + 1)):
            problems.append(f"coverage: rows trained on {sorted(counts)} times in {c['epochs']} epochs")
    return problems


def order(steps: list[dict[str, Any]]) -> list[list[int]]:
    return [numbers(b["seen"])[0].tolist() for b in steps]


# ------------------------------------------------------------------------------------------------ a run


def one(seed: int, number: int, keep: bool = False) -> dict[str, Any]:
    """Run ``number`` of seed ``seed``: its settings, outcome and problems."""
    import torch

    rng = random.Random(f"{seed}:{number}")
    c = draw(rng)
    out: dict[str, Any] = {"run": number, "settings": c, "problems": []}
    work = Path(tempfile.mkdtemp(prefix="kdcache-alignfuzz-"))
    started, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # what it changes in this process put back after the run: a test calls it in pytest's
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), recorder():  # kdcache's own lines (heads added ...)
            warnings.filterwarnings("ignore", "This DataLoader will create")  # 3 workers on 2 cores: what the run asks for
            out.update(attempt(c, work, rng))
    finally:
        torch.set_num_threads(threads)
        out["seconds"] = round(time.perf_counter() - started, 2)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return out


def attempt(c: dict[str, Any], work: Path, rng: random.Random) -> dict[str, Any]:
    import aligned
    import kdcache
    from kdcache.errors import KdcacheError

    rec = recorder()
    rec.take()
    aligned.overlaps()
    try:
        location, not_done = make_store(c, work, rng)
        extra: dict[str, Any] = {}
        if c["eval"]:
            kdcache.extract(pipeline(evaluated(c), f"eval-n{c['eval']}"), str(work / "eval.zarr"))
            extra["eval_cache"] = str(work / "eval.zarr")
        partial = bool(not_done)
        kdcache.train(pipeline(c, **extra), location, work / "run", allow_partial=partial)
        steps, evals = rec.take()
        problems = check(c, steps, evals, not_done)
        if c["stop_at"] and steps:
            problems += stopped_and_resumed(c, location, work, extra, partial, order(steps))
        problems += threads_at_once()
        return {"outcome": "ok", "steps": len(steps), "evals": len(evals), "problems": problems}
    except KdcacheError as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        expected = any(re.search(pattern, error) for pattern in REFUSALS)
        return {"outcome": "refused", "error": error, "problems": ([] if expected else [f"refused: {error}"]) + threads_at_once()}
    except Exception as e:  # noqa: BLE001 - what the fuzzer looks for
        return {"outcome": "traceback", "error": "".join(traceback.format_exception(e))[-1500:],
                "problems": [f"traceback: {type(e).__name__}: {e}"[:300], *threads_at_once()]}


def threads_at_once() -> list[str]:
    """``threads``: the reads of a dataset that is not thread-safe (``c["cursor"]``) under way in two threads of this
    process at once, by extract or train (each of their DataLoader workers reads its own copy)."""
    import aligned

    found = collections.Counter(aligned.overlaps())
    return [f"threads: {what} ({n} times)" for what, n in found.most_common(3)]


def stopped_and_resumed(c: dict[str, Any], location: str, work: Path, extra: dict[str, Any], partial: bool,
                        full: list[list[int]]) -> list[str]:
    """The run again, stopped at the step a fraction ``c["stop_at"]`` into its steps (SIGTERM: it saves a checkpoint
    there; ``eval``: SIGTERM in the evaluation after it; ``crash``: an exception from the step, the process's end
    without a checkpoint; ``plan``: a shorter plan, ``train.steps``, that ends there), resumed, stopped again a
    fraction ``c["stop_again"]`` into the resumed run's steps where drawn, and resumed to its end. Each part must train
    on the rows of the uninterrupted run's (``full``) steps from its checkpoint's step (``checkpoint.pt``'s, read with
    torch; the start where there is none yet), which after a SIGTERM is where the part before stopped."""
    import kdcache
    import torch
    from kdcache.errors import TrainingStopped

    rec, problems, end = recorder(), [], 0
    for part, fraction in enumerate([c["stop_at"], c["stop_again"], 0]):
        checkpoint = work / "stopped" / "checkpoint.pt"
        start = int(torch.load(checkpoint, weights_only=False)["step"]) if part and checkpoint.exists() else 0
        stop_at = math.ceil(fraction * (len(full) - start))  # this part's own step
        if part and c["stop_kind"] != "crash" and start != end:
            problems.append(f"resume: part {part + 1} starts at step {start + 1}, the SIGTERM's part ended at step {end}")
        if part == 1 and c["complete_between"] and checkpoint.exists():  # other shards done since: a resumed run keeps
            kdcache.extract(pipeline(c), location)  # its own (a run begun again, with no checkpoint, takes those done now)
        # another run's settings where there is a checkpoint to resume (else the run begins again, refused on other
        # settings than its pipeline.json's: a new run would replace that run's files)
        settings = {"num_workers": c["resume_workers"], "memory_budget_mb": c["resume_budget"]} \
            if part and checkpoint.exists() else {}
        plan = c["stop_kind"] == "plan" and 0 < stop_at < len(full) - start  # a plan of train.steps ending there
        if plan:
            settings["steps"] = start + stop_at
        rec.stop_at, rec.stop_kind = 0 if plan else stop_at, c["stop_kind"]
        try:
            kdcache.train(pipeline(c, **extra, **settings), location, work / "stopped", allow_partial=partial,
                          resume=(c["resume"] if checkpoint.exists() else "auto") if part else False)
            if stop_at and start + stop_at < len(full) and c["stop_kind"] in ("term", "crash"):
                problems.append(f"resume: the {c['stop_kind']} at step {start + stop_at} did not stop the run")
            stop_at = stop_at if plan else 0
        except (TrainingStopped, Crash):
            pass
        steps, evals = rec.take()
        problems += [p.replace("step ", f"part {part + 1}'s step ") for p in check_batch_all(c, steps, evals)]
        if order(steps) != full[start:start + len(steps)]:
            problems.append(f"resume: part {part + 1} ({len(steps)} steps from step {start + 1}, stopped by {c['stop_kind']}) trains "
                            f"on other rows than the uninterrupted run's {len(full)} steps from its step "
                            f"{start + first_difference(order(steps), full[start:]) + 1}")
        end = start + len(steps)
        if not stop_at:
            if end != len(full):
                problems.append(f"resume: the resumed run ended at step {end}, the uninterrupted one at {len(full)}")
            break
    return problems


def check_batch_all(c: dict[str, Any], steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[str]:
    return [p for s, b in enumerate(steps) for p in check_batch(b, c, f"step {s + 1}")] + \
        [p for e, b in enumerate(evals) for p in check_batch(b, evaluated(c), f"eval batch {e + 1}", eval_batch=True)]


def first_difference(a: list[Any], b: list[Any]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1, help="processes running runs side by side")
    p.add_argument("--minutes", type=float, default=0.0, help="start no run after this many minutes (0: no limit)")
    p.add_argument("--replay", type=int, nargs="*", help="only these runs of the seed (their numbers in the summary)")
    p.add_argument("--first", action="store_true", help="stop at the first run with a defect (--jobs 1)")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args(argv)
    return fuzz(args)


def fuzz(args: argparse.Namespace) -> int:
    numbers_ = args.replay if args.replay else list(range(args.runs))
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else float("inf")
    results: list[dict[str, Any]] = []

    def report(r: dict[str, Any]) -> None:
        results.append(r)
        if len(results) % 25 == 0:
            print(f"{len(results)} runs, {sum(bool(x['problems']) for x in results)} with a defect", file=sys.stderr, flush=True)
        if r["problems"] or r["outcome"] == "traceback":
            print(f"run {r['run']} (--seed {args.seed} --replay {r['run']}): {r['outcome']} {json.dumps(r['settings'])}", flush=True)
            for problem in r["problems"][:6]:
                print(f"    {problem}", flush=True)
            if r["outcome"] == "traceback":
                print("    " + r["error"].replace("\n", "\n    ")[-1200:], flush=True)

    if args.jobs <= 1:
        for n in numbers_:
            if time.monotonic() > deadline:
                break
            report(one(args.seed, n))
            if args.first and results[-1]["problems"]:
                break
    else:
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=_fork()) as pool:
            pending = collections.deque(numbers_)
            running: set[Any] = set()
            while pending or running:
                while pending and len(running) < args.jobs and time.monotonic() <= deadline:
                    running.add(pool.submit(one, args.seed, pending.popleft()))
                if not running:
                    break
                done, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for f in done:
                    report(f.result())
    outcomes = collections.Counter(r["outcome"] for r in results)
    refusals = collections.Counter(r["error"][:120] for r in results if r["outcome"] == "refused")
    kinds = collections.Counter(p.split(":")[0] for r in results for p in r["problems"])
    print(json.dumps({"runs": len(results), "outcomes": dict(outcomes), "problems": dict(kinds),
                      "steps": sum(r.get("steps", 0) for r in results), "eval_batches": sum(r.get("evals", 0) for r in results),
                      "seconds": round(sum(r["seconds"] for r in results), 1), "refusals": dict(refusals.most_common(12))}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    defects = [r for r in results if r["problems"]]
    print(f"{len(results)} runs, {len(defects)} with a defect"
          + (f"; --minutes {args.minutes:g} reached: {len(numbers_) - len(results)} of {len(numbers_)} runs not started"
             if len(results) < len(numbers_) and time.monotonic() > deadline else ""))
    return 1 if defects else 0


def _fork() -> Any:
    import multiprocessing

    return multiprocessing.get_context("fork")


if __name__ == "__main__":
    sys.exit(main())
