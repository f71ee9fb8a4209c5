"""``kdcache verify``: is a store whole, intact and what its manifest says — and, optionally, still the
teacher's output?

Checks, each reported with every problem it found (named: array, shard, inner chunk, row):

- ``open`` (reported only when it fails): the store opens: its root and group metadata (``samples``,
  ``targets``, ``targets/layers``, ``progress``: zarr v3 group ``zarr.json`` objects), its manifest's
  header and types, and its done markers' array, where they are damaged (``DamagedStoreError``). Anything else that
  stops it opening (no store there, a newer format version, a refused option, a read that fails on the way) is
  raised, as every command does: nothing was checked;
- ``completeness``: every shard done, every done marker one byte 0 or 1 and, in a zip, a sound member (a damaged
  one's shard is not checked);
- ``layout``: every array of the manifest exists with its shape, dtype and chunk/shard geometry;
- ``checksums``: every done shard's object exists, its shard index and each inner chunk's crc32c
  match (the raw bytes are checked, so a truncated or emptied shard is caught, not read as zeros); an added array's
  chunk objects are checked as ``kdcache pack`` checks them (``interop.check_added_arrays``);
- ``values``: every done shard decodes; targets are finite; ``index[r] == r``; fingerprints non-zero, and those of the
  manifest's ``dataset.probe_fingerprints`` (rows 0 and N-1) the stored ones;
- ``teacher`` (``teacher_check=N``): the pipeline's teacher recomputes N random stored rows; max
  abs/rel error and KL per target must stay within a float16-appropriate tolerance; each row's input
  fingerprint, and its label where the store and the dataset have labels, must be the stored one.

One shard of one array is in memory at a time.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from collections.abc import Iterable
from typing import Any

import numpy as np

from kdcache import locking, store as layout
from kdcache.errors import DamagedShardError, DamagedStoreError, PipelineError, StoreError, UnreachableError, count, one_line, option, short

MAX_LISTED = 20  # problems listed per check; the count is always exact

# Relative tolerance of a recomputed target by the precision of the teacher's forward pass and the
# stored dtype: float16 rounding alone is 2^-11 relative; bf16/fp16 autocast on other hardware adds more.
RTOL = {("fp32", "float32"): 1e-4, ("fp32", "float16"): 1e-2, ("fp16", "float16"): 2e-2, ("fp16", "float32"): 2e-2,
        ("bf16", "float16"): 5e-2, ("bf16", "float32"): 5e-2}


@dataclass
class Check:
    name: str
    summary: str = ""
    problems: list[str] = field(default_factory=list)
    count: int = 0

    def fail(self, problem: str) -> None:
        self.count += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(problem)

    @property
    def ok(self) -> bool:
        return self.count == 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "summary": self.summary, "problem_count": self.count, "problems": self.problems}


def verify(location: str, *, storage_options: dict[str, Any] | None = None, teacher_check: int = 0, pipeline: Any = None,
           seed: int = 0, tolerance: float | None = None) -> dict[str, Any]:
    """Check the store at ``location``; returns a report whose ``ok`` is true only when every check holds. What stops the
    checks before they end (a read failed on the way, the teacher raised) is raised, holding the checks done before it in
    its ``report`` (its ``ok`` false)."""
    for name, value in (("teacher_check", teacher_check), ("seed", seed)):  # 2.5 or None was a TypeError deep in numpy
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise PipelineError(f"{name} must be an integer >= 0, got {short(value)}")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, int | float | np.floating)
                                  or not (math.isfinite(tolerance) and tolerance >= 0)):
        raise PipelineError(f"tolerance must be a finite number >= 0, got {short(tolerance)}")
    if teacher_check > 0 and pipeline is None:  # refused before anything is read (it was, after every other check had run)
        raise StoreError(f"{option('--teacher-check')} needs the pipeline that built the teacher; pass "
                         f"{option('--pipeline PIPELINE', 'pipeline=kdcache.load_pipeline(PATH)')}")
    if teacher_check > 0:  # a path or dict failed after every other check, as an AttributeError
        from kdcache.pipeline import check_pipeline

        pipeline = check_pipeline(pipeline)
    try:
        store = layout.open_store(location, storage_options=storage_options)
        store.damaged_markers = {}  # a damaged done marker is completeness's problem, its shard taken as not done
        store.replaced_when = ("while kdcache verify read it", "verify began")
        # a done marker array that cannot be read fails here, as an "open" problem. The markers read here are every check's
        # below and the reads' (done_snapshot: one object a shard, read once; it was read 4 times)
        store.done_snapshot()
    except DamagedStoreError as e:  # any other error (no store there, a newer format, a read failed on the way) is raised:
        # nothing was checked, so no check failed
        check = Check("open")
        check.fail(f"{location!r} is damaged: {_invalid(*e.metadata_problem)}" if hasattr(e, "metadata_problem") else str(e))
        return _report(location, [check], None)
    checks: list[Check] = []
    try:
        teacher = _run_checks(store, checks, teacher_check, pipeline, seed, tolerance)
        if not all(c.ok for c in checks):  # what failed may be a store replaced meanwhile, read by the first one's metadata
            store.check_not_replaced()
    except (Exception, KeyboardInterrupt) as e:  # a read failed on the way, the teacher raised, Ctrl-C: the checks done are
        e.report = {**_report(location, checks, None), "ok": False}  # type: ignore[attr-defined] - kept (verify --json prints them)
        raise
    return _report(location, checks, teacher)


def _run_checks(store: layout.Store, checks: list[Check], teacher_check: int, pipeline: Any, seed: int,
                tolerance: float | None) -> dict[str, Any] | None:
    """Run the checks in order, each appended to ``checks`` once done; returns the teacher check's figures (None: not run)."""
    checks.append(_completeness(store))
    checks.append(layout_check(store))
    if checks[1].ok:
        checks += _contents(store)
    if teacher_check == 0:
        if pipeline is not None:  # given for the teacher check (verify --teacher-check 0 --pipeline P): it said nothing of it
            checks.append(Check("teacher", f"not checked: {option('--teacher-check')} is 0, so no row was recomputed; pass "
                                           f"{option('--teacher-check N', 'teacher_check=N')} (N > 0) to recompute N random rows"))
        return None
    check, teacher = _teacher(store, pipeline, teacher_check, seed, tolerance)
    checks.append(check)
    return teacher


def _report(location: str, checks: list[Check], teacher: dict[str, Any] | None) -> dict[str, Any]:
    listed = [{**c.to_dict(), "problems": [_here(os.fspath(location), p) for p in c.problems]} for c in checks]  # a Path too
    return {"location": location, "ok": all(c.ok for c in checks), "checks": listed, "teacher_check": teacher}


def _here(location: str, problem: str) -> str:
    """``problem`` less the store's advice to run ``kdcache verify`` (its errors, which verify lists, send every other
    command's user here), leaving the next step: ``…; run kdcache verify STORE, and copy the store again from its
    source`` is ``…; copy the store again from its source``."""
    verify = rf"(?:run )?kdcache verify {re.escape(location)}(?: lists [^;]*;| for any other damage, then|, and|, or) "
    return re.sub(verify, "", problem)


def _completeness(store: layout.Store) -> Check:
    done = store.done_snapshot()
    writer = None if done.all() else locking.active_writer(store.location, store.storage_options)
    check = Check("completeness", f"{int(done.sum())}/{count(store.num_shards, 'shard')} done" + (f", being written by {writer}" if writer else ""))
    fix = "its writer is still running" if writer else "resume kdcache extract"
    damaged = store.damaged_markers or {}  # their shards are taken as not done: the checks below pass them by
    for marker in damaged.values():
        check.fail(f"done marker {marker} (its shard is not checked); {layout.marker_fix(store.location)}")
    for s in np.flatnonzero(~done):
        if int(s) in damaged:
            continue
        start, stop = store.shard_rows(int(s))
        check.fail(f"shard {int(s)} (rows {start}-{stop - 1}) is not done; {fix}")
    return check


def layout_check(store: layout.Store) -> Check:
    check = Check("layout", f"{len(store.paths())} data arrays + {layout.DONE}")
    rows, chunk_rows = store.rows_per_shard, store.manifest["geometry"]["chunk_rows"]
    for path in store.paths():
        shape, dtype = store.expected(path)
        try:
            arr = store.array(path)
        except UnreachableError:
            raise  # a read that failed on the way says nothing of the store: verify cannot go on, and says so in one line
        except (KeyError, FileNotFoundError, ValueError) as e:
            try:
                present = store.raw_object(f"{path}/zarr.json") is not None
            except UnreachableError:
                raise
            except StoreError as unreadable:  # a zip member failing its CRC-32 (named, with the fix): a problem, not verify's end
                check.fail(f"{path}: {unreadable}")
                continue
            check.fail(_bad_metadata(path, e) if present else f"{path}: missing (no {path}/zarr.json)")
            continue
        if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
            check.fail(f"{path}: is {list(arr.shape)} {arr.dtype}, the manifest says {list(shape)} {dtype}")
            continue
        c = chunk_rows.get(path)
        if arr.shards is None or tuple(arr.shards) != (rows, *shape[1:]) or c is None or tuple(arr.chunks) != (c, *shape[1:]) or rows % c:
            check.fail(f"{path}: shard {arr.shards} / inner chunk {arr.chunks} do not match geometry (rows_per_shard {rows}, chunk_rows {c})")
    # progress/done: checked as the store opened (open_store: there; Store.done: [num_shards] bool in chunks of 1), an "open" problem
    try:
        if store.has_digests():  # reads its zarr.json: in a zip, a member that may fail its CRC-32
            check.summary += f" + {layout.DIGEST}"
            store.digests_snapshot()  # the rows the reads below check against (one object a shard, read once)
    except UnreachableError:
        raise
    except StoreError as e:
        check.fail(_bad_metadata(layout.DIGEST, e) if hasattr(e, "metadata_problem") else f"{layout.DIGEST}: {e}")
    return check


def _bad_metadata(path: str, e: Exception) -> str:
    """The layout check's line for the array ``path`` whose ``zarr.json`` zarr or the store's own check refused with
    ``e``: the reason, once, and the fix (the store's message says "run kdcache verify", which is where this is)."""
    why = getattr(e, "metadata_problem", (None, None))[1] or (one_line(e, 300) if isinstance(e, StoreError) else "")
    return f"{path}: {_invalid(path, why)}"


def _invalid(path: str, why: str) -> str:
    return f"{path + '/zarr.json'!r} is not valid zarr metadata{f' ({why})' if why else ''}; re-extract the store"


def _contents(store: layout.Store) -> list[Check]:
    """Checksums of the raw bytes and the decoded values, shard by shard, over every done shard."""
    done = [int(s) for s in np.flatnonzero(store.done_snapshot())]
    sums = Check("checksums", f"{count(len(done), 'shard')} x {count(len(store.paths()), 'array')}")
    try:
        digests = "shard digests" if store.has_digests() else f"no shard digests (no {layout.DIGEST}: written before kdcache 0.1.1)"
    except UnreachableError:
        raise
    except StoreError:  # missing although the manifest says it is kept: the layout check names it
        digests = f"no shard digests ({layout.DIGEST} is missing)"
    values = Check("values", f"finite targets, index[r] == r, non-zero fingerprints, {digests}")
    classes = topk_classes(store.targets.values())
    wanted = [(path, shard) for path in store.paths() for shard in done]
    for (path, shard), read in zip(wanted, store.read_ahead(wanted, digests=False)):
        start, stop = store.shard_rows(shard)
        try:  # a shard that decodes passed every checksum on the way (the direct reader's and zarr's crc32c codec)
            block = read.result()  # its digest is checked here, beside the values
        except Exception as e:  # noqa: BLE001 - any decode failure is a finding to name, not a crash
            problems = store.check_shard(path, shard)  # the stored bytes, each problem named by inner chunk
            for p in problems:
                sums.fail(f"{path}: {p}")
            if not problems:
                problem = e.problem if isinstance(e, DamagedShardError) else f"does not decode: {type(e).__name__}: {one_line(e, 200)}"
                values.fail(f"{path}: shard {shard} (rows {start}-{stop - 1}) {problem}")
            continue
        misplaced = store.digest_problem(path, shard, block)
        if misplaced:
            values.fail(f"{path}: shard {shard} (rows {start}-{stop - 1}) {misplaced}")
        problem = value_problem(path, start, block, classes)
        if problem:
            values.fail(f"{path}: shard {shard}: {problem}")
        if path == layout.FINGERPRINT:
            for problem in _probe_problems(store.manifest, start, block):
                values.fail(f"{path}: {problem}")
    _added_arrays(store, sums)
    return [sums, values]


def _added_arrays(store: layout.Store, sums: Check) -> None:
    """The checksums of the chunk objects of arrays added to the store (FORMAT.md §14), checked as ``kdcache pack``
    checks them (FORMAT.md §17: where they have its shape; the others are named in the summary as not checked)."""
    from kdcache.interop import check_added_arrays, unchecked_arrays

    rewritten = unchecked_arrays(store)
    if rewritten:
        sums.summary += f"; not checked: {', '.join(map(repr, rewritten))} (no crc32c checksums: rewritten by another tool?)"
    try:
        checked, unchecked, problems = check_added_arrays(store)
    except PermissionError:  # a bucket that grants reads alone refuses its listing: no added array can be found
        sums.summary += "; added arrays not looked for (listing the location was refused)"
        return
    for problem in problems:
        sums.fail(problem)
    if checked:
        sums.summary += f" + added {', '.join(map(repr, checked))}"
    if unchecked:
        sums.summary += f"; not checked: added {', '.join(map(repr, unchecked))} (not sharded with crc32c checksums)"


def value_problem(path: str, start: int, rows: np.ndarray, classes: int = 0) -> str | None:
    """What in rows ``start..`` of the data array ``path`` no store may hold (FORMAT.md §4, §5, §5.1), whatever its checksums
    and digests say: ``index[r] != r``, a row without a fingerprint (0), a target that is not finite (extract refuses the
    teacher's NaN and float16 overflow; training on one would end "diverged"); with top-k logits of ``classes`` classes
    (``topk_classes``; 0: none), values not in descending order, or stored classes out of ``[0, classes)`` or repeated
    within a position (kl would count that class twice). None: none. ``values``' check, and ``import``'s of each shard
    of an HDF5 file."""
    if classes and path in (layout.LOGITS, layout.LOGITS_INDICES):
        problem = _topk_problem(path, start, rows, classes)
        if problem:
            return problem
    if path == layout.INDEX:
        wrong = np.flatnonzero(rows != np.arange(start, start + len(rows)))
        return f"index[r] != r at {count(len(wrong), 'row')} (first row {start + int(wrong[0])}: {int(rows[wrong[0]])})" if len(wrong) else None
    if path == layout.FINGERPRINT:
        zero = np.flatnonzero(rows == 0)
        return f"{count(len(zero), 'row')} without a fingerprint (first row {start + int(zero[0])})" if len(zero) else None
    if path.startswith("targets/") and not all_finite(rows):
        bad = np.flatnonzero(~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1))
        return f"NaN or inf in {count(len(bad), 'row')} (first row {start + int(bad[0])})"
    return None


def _probe_problems(manifest: dict[str, Any], start: int, fingerprints: np.ndarray) -> list[str]:
    """The manifest's ``dataset.probe_fingerprints`` (its first and last items') that rows ``start..`` of
    ``samples/fingerprint`` do not hold: a manifest that is not these rows' (another store's ``zarr.json`` copied over
    this one's), which no checksum or digest covers and which training takes for a dataset that changed."""
    found = []
    for i, recorded in manifest["dataset"]["probe_fingerprints"].items():
        r = int(i) - start
        if 0 <= r < len(fingerprints) and int(fingerprints[r]) != int(recorded, 16):
            found.append(f"row {i} holds fingerprint {int(fingerprints[r]):016x}, the manifest's dataset.probe_fingerprints "
                         f"says {recorded}: the manifest (zarr.json) is not these rows' (another store's copied over it?); "
                         "copy the store again from its source")
    return found


def topk_classes(targets: Iterable[layout.Target]) -> int:
    """The class count of a store's top-k logits (``targets``: its targets), which ``value_problem`` checks; 0: none."""
    return next((t.classes for t in targets if t.path == layout.LOGITS and t.topk), 0)


def _topk_problem(path: str, start: int, rows: np.ndarray, classes: int) -> str | None:
    """Top-k logits' rows (FORMAT.md §5.1) that break its rules: values not descending, or classes out of range or
    repeated within a position; None: none."""
    flat, per_row = rows.reshape(-1, rows.shape[-1]), math.prod(rows.shape[1:-1])  # (positions, K); positions per row
    if path == layout.LOGITS:
        bad = np.flatnonzero((np.diff(flat, axis=-1) > 0).any(-1))
        what = "top-k values not in descending order"
    else:
        outside = (flat < 0) | (flat >= classes)
        if outside.any():
            first = int(np.flatnonzero(outside.any(-1))[0])
            return (f"a class outside the manifest's {classes} classes (first row {start + first // per_row}: class "
                    f"{int(flat[first][outside[first]][0])})")
        bad = np.flatnonzero((np.diff(np.sort(flat, axis=-1), axis=-1) == 0).any(-1))
        what = "a class repeated within a position"
    return f"{what} at {len(bad)} positions (first row {start + int(bad[0]) // per_row})" if len(bad) else None


_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000)}


def all_finite(block: np.ndarray) -> bool:
    """Whether every value is finite: a float16/32 value is NaN or inf exactly when its exponent bits are all ones,
    so the largest magnitude's bits say it in one integer pass (3x ``np.isfinite(...).all()`` on float16 maps)."""
    bits = _EXPONENT.get(block.dtype)
    if bits is None or not block.size or not block.flags.c_contiguous:
        return bool(np.isfinite(block).all())
    kind, magnitude, exponent = bits
    return int((block.view(kind) & kind(magnitude)).max()) < exponent


def _teacher(store: layout.Store, pipeline: Any, n: int, seed: int, tolerance: float | None) -> tuple[Check, dict[str, Any]]:
    """Rebuild the teacher and recompute ``n`` random done rows (sorted; read whole chunks via oindex)."""
    from kdcache import data

    check = Check("teacher", "")
    algorithm = data.check_algorithm(store.manifest, store.location)
    run = _teacher_run(store, pipeline, check)
    stored_targets = store.targets
    rows = _random_rows(store, n, seed)
    recomputed, seen_fp, seen_labels = _recompute(run, pipeline, rows, algorithm, [t.path for t in stored_targets.values()])
    _check_inputs(store, run, rows, seen_fp, seen_labels, algorithm, check)
    per_target = {}
    for t in stored_targets.values():
        entry = _compare_target(store, t, rows, recomputed[t.path], run.targets[t.path].select, tolerance, check)
        if entry is not None:  # None: the stored rows are unreadable, named in the check's failures
            per_target[t.name] = entry
    check.summary = f"{len(rows)} random rows recomputed with {pipeline.teacher.factory}"
    return check, {"rows": [int(r) for r in rows], "targets": per_target, "weights_sha256": run.weights_sha256}


def _teacher_run(store: layout.Store, pipeline: Any, check: Check) -> Any:
    """The pipeline's extract run, set up to read (the store has its geometry: the pipeline's extract.rows_per_shard is not
    used) in the store's precision. Other teacher weights than the store's are a failure of ``check``; stored targets the
    pipeline does not produce, or produces in another shape (another select), and a dataset of another length are refused:
    no row could be compared. The dataset is of the split the store records, as train reads it, whatever the pipeline's
    data.split (a store of another split was recomputed from that split's items: every row named as a changed input)."""
    from kdcache import data
    from kdcache.extract import setup

    split = store.manifest["dataset"]["split"]
    run = setup(replace(pipeline, data=replace(pipeline.data, split=split)), writing=False)
    if store.manifest.get("precision") in data.AUTOCAST:  # recomputed as stored (the rtol is the store's precision's)
        run.precision = store.manifest["precision"]
    ours = run.weights_sha256
    if ours != store.manifest["teacher"]["weights_sha256"]:
        check.fail(f"the pipeline's teacher weights (sha256 {ours[:16]}…) differ from the store's "
                   f"({store.manifest['teacher']['weights_sha256'][:16]}…)")
    stored_targets = store.targets
    missing = [t.name for t in stored_targets.values() if t.path not in run.targets]
    if missing:
        # named with both sides' teachers: the usual cause is another project's pipeline (text.toml for an MNIST store)
        made_by = store.manifest["teacher"].get("factory", "?")
        raise StoreError(f"the pipeline {pipeline.source!r} (teacher {pipeline.teacher.factory}) does not produce stored targets "
                         f"{missing} of {store.location!r} (extracted with teacher {made_by}); pass the pipeline the store was "
                         "extracted with")
    # another select keeps another part of the output: rows of another shape cannot be compared. The teacher's output
    # is compared (recomputed whole: the store's own targets.topk decides how), not the arrays the pipeline would write
    for t in stored_targets.values():
        ours_t = run.targets[t.path]
        if ours_t.output_shape != t.output_shape:
            raise StoreError(f"the pipeline stores target {t.name!r} as select {ours_t.select!r}, per-sample shape {list(ours_t.output_shape)}; "
                             f"the store holds select {t.select!r}, shape {list(t.output_shape)}; pass the pipeline the store was extracted with")
        if ours_t.mask != t.mask:  # the same shape, pooled over other positions
            raise StoreError(f"the pipeline pools target {t.name!r} (select {ours_t.select!r}) with targets.mask = {ours_t.mask!r}, the store "
                             f"was pooled with {t.mask!r}; pass the pipeline the store was extracted with")
    if len(run.dataset) != store.num_samples:  # type: ignore[arg-type]
        raise StoreError(f"the pipeline's dataset {pipeline.data.factory}({split!r}) has {len(run.dataset)} samples, the store "  # type: ignore[arg-type]
                         f"{store.num_samples} (extracted from {store.manifest['dataset'].get('factory')}({split!r})); pass the "
                         "pipeline the store was extracted with")
    return run


def _random_rows(store: layout.Store, n: int, seed: int) -> np.ndarray:
    """``n`` done rows of ``store`` drawn with ``seed`` (every done row where fewer are done), ascending."""
    from kdcache.cache import done_rows

    available = done_rows(store)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(available, size=min(n, len(available)), replace=False)) if len(available) else available


def _recompute(run: Any, pipeline: Any, rows: np.ndarray, algorithm: Any,
               paths: list[str]) -> tuple[dict[str, list[np.ndarray]], np.ndarray, np.ndarray | None]:
    """The teacher's output for dataset items ``rows``, in batches of extract.batch_size as extract ran it: per stored
    target path its float32 batches, the items' input fingerprints, and their labels (None: the items have none)."""
    import torch

    from kdcache import data, teacher as teachers

    indexed = data.Indexed(run.dataset, algorithm)
    recomputed: dict[str, list[np.ndarray]] = {path: [] for path in paths}
    fingerprints, labels = [], []
    batch_size = pipeline.extract.batch_size
    with teachers.capture(run.model, pipeline.targets.layers) as hooked:
        for lo in range(0, len(rows), batch_size):
            batch = data.collate(indexed.__getitems__([int(r) for r in rows[lo : lo + batch_size]]))
            fingerprints.append(batch["fingerprint"])
            labels.append(batch["label"])  # None: the dataset's items have no label
            hooked.clear()
            with torch.inference_mode(), run.autocast():
                output = data.call(run.model, data.to_device(batch["inputs"], run.device), "teacher")
            with run.device_memory("the teacher's recomputed targets (select steps, float32 copies)", batch):
                for path, tensor in run.select(output, hooked, batch).items():
                    if path in recomputed:
                        recomputed[path].append(tensor.detach().float().cpu().numpy())
    seen_fp = np.concatenate(fingerprints) if fingerprints else np.zeros(0, np.uint64)
    # the same input with another label (a new class mapping): training refuses it (ce would learn the stored label)
    seen_labels = np.concatenate(labels) if labels and all(y is not None for y in labels) else None
    return recomputed, seen_fp, seen_labels


def _check_inputs(store: layout.Store, run: Any, rows: np.ndarray, seen_fp: np.ndarray, seen_labels: np.ndarray | None,
                  algorithm: Any, check: Check) -> None:
    """Each of ``rows`` is still the input it was: the dataset's fingerprint of item ``r`` (read alone), and its label where
    the store and the dataset have labels, must be the stored one; a failure of ``check`` names the row."""
    from kdcache import data

    stored_fp = _rows(store, layout.FINGERPRINT, rows, check)  # None: unreadable, named in the check's failures
    # a dataset's own __getitems__: each row read alone too, for one that serves a batch's items out of order (as it
    # did when the store was extracted) gives the stored fingerprints and targets again, in the wrong rows
    batched = hasattr(run.dataset, "__getitems__")
    stored_labels = _rows(store, layout.LABEL, rows, check) if store.has_labels and seen_labels is not None and len(rows) else None
    for k, (r, a, b) in enumerate(zip(rows, stored_fp if stored_fp is not None else [], seen_fp)):
        alone = data.item_fingerprint(run.dataset, int(r), algorithm) if batched else int(b)
        if a != alone:
            check.fail(f"row {int(r)}: the dataset's input fingerprint {alone:016x} differs from the stored {int(a):016x}")
        elif b != alone:
            check.fail(f"row {int(r)}: the dataset's __getitems__ gives it another input ({int(b):016x}) than dataset[{int(r)}] "
                       f"({alone:016x}): make __getitems__ return the items dataset[i] returns, in the order asked")
        elif stored_labels is not None and int(seen_labels[k]) != int(stored_labels[k]):
            check.fail(f"row {int(r)}: the dataset gives label {int(seen_labels[k])}, the store holds {int(stored_labels[k])}: its "
                       "labels changed since extraction (another class mapping?); use the dataset the store was made from, or re-extract")


def _compare_target(store: layout.Store, t: layout.Target, rows: np.ndarray, recomputed: list[np.ndarray], select: str,
                    tolerance: float | None, check: Check) -> dict[str, Any] | None:
    """Target ``t``'s stored ``rows`` against their ``recomputed`` batches (``select``: the pipeline's): errors, KL and
    the tolerance, for the report; values beyond it are a failure of ``check`` naming the worst. None: the stored rows
    are unreadable, named in the check's failures."""
    stored = _rows(store, t.path, rows, check)
    if stored is None:
        return None
    stored = stored.astype(np.float64) if len(rows) else np.zeros((0, *t.shape))
    fresh = np.concatenate(recomputed).astype(np.float64) if recomputed else np.zeros_like(stored)
    if t.topk and len(rows):
        pairs = _topk_pairs(store, t, rows, stored, fresh, check)
        if pairs is None:
            return None
        stored, fresh = pairs
    fresh_stored = fresh.astype(t.dtype).astype(np.float64)  # the value a fresh extract would store
    err = np.abs(stored - fresh_stored)
    rtol = tolerance if tolerance is not None else RTOL.get((store.manifest.get("precision", "fp32"), t.dtype), 5e-2)
    scale = float(np.mean(np.abs(fresh))) if fresh.size else 0.0
    limit = rtol * (np.abs(fresh) + scale)
    bad = err > limit
    if bad.any():
        worst = np.unravel_index(int(np.argmax(err - limit)), err.shape)
        # the store's select is provenance, which another writer may spell its own way: named as a likely cause, not refused
        hint = f" (the pipeline selects {select!r}, the store recorded {t.select!r})" if select != t.select else ""
        check.fail(f"target {t.name!r}: {int(bad.sum())} values beyond tolerance (rtol {rtol:g}); worst at row "
                   f"{int(rows[worst[0]])}: stored {stored[worst]:.6g}, recomputed {fresh[worst]:.6g}{hint}")
    return {
        "rows": int(len(rows)),
        "max_abs_error": float(err.max()) if err.size else 0.0,
        "max_rel_error": float((err / np.maximum(np.abs(fresh), scale or 1.0)).max()) if err.size else 0.0,
        # no class axis: no softmax; top-k: over the K stored classes (renormalised), the stored values against the teacher's there
        "kl": _kl(stored[..., :t.shape[-1]], fresh[..., :t.shape[-1]]) if t.source == "" and t.shape and err.size else None,
        "rtol": rtol,
        "ok": not bad.any(),
    }


def _topk_pairs(store: layout.Store, t: layout.Target, rows: np.ndarray, stored: np.ndarray, fresh: np.ndarray,
                check: Check) -> tuple[np.ndarray, np.ndarray] | None:
    """A top-k target's stored values (K per position) twice, and what they are compared with: the ``fresh`` logits (every
    class) at the stored classes, then the fresh K largest. A stored class whose value is not the teacher's there, or values
    that are not its K largest, are then beyond tolerance, while two classes of near-equal values that a recomputation on
    another device ranks the other way round are not (values are compared, not the order of classes). None: the stored
    classes are unreadable or out of range, a failure of ``check``."""
    classes = _rows(store, layout.LOGITS_INDICES, rows, check)
    if classes is None:
        return None
    if classes.min() < 0 or classes.max() >= t.classes:
        check.fail(f"target {t.name!r}: {layout.LOGITS_INDICES} holds class {int(classes.min() if classes.min() < 0 else classes.max())}, "
                   f"outside the {t.classes} classes of the manifest")
        return None
    at = np.take_along_axis(fresh, classes.astype(np.int64), axis=-1)
    largest = -np.sort(-fresh, axis=-1)[..., :t.topk]
    return np.concatenate([stored, stored], axis=-1), np.concatenate([at, largest], axis=-1)


def _kl(stored: np.ndarray, fresh: np.ndarray) -> float:
    """Mean KL(softmax(fresh) || softmax(stored)) over rows, softmax over the last axis."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        m = x.max(axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(fresh), log_softmax(stored)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def report_text(report: dict[str, Any]) -> str:
    """The human form of a verify report: one line per check, its problems indented under it (control characters escaped)."""
    lines = [f"store       {report['location']}"]
    for c in report["checks"]:
        lines.append(f"{'ok  ' if c['ok'] else 'FAIL'}  {c['name']:<13} {c['summary']}" + ("" if c["ok"] else f"  ({c['problem_count']} problem{'s' * (c['problem_count'] != 1)})"))
        lines += [f"      - {p}" for p in c["problems"]]
        if c["problem_count"] > len(c["problems"]):
            lines.append(f"      ... and {c['problem_count'] - len(c['problems'])} more")
    t = report.get("teacher_check")
    if t:
        for name, e in t["targets"].items():
            kl = f"  kl {e['kl']:.3g}" if e["kl"] is not None else ""
            lines.append(f"      {name:<24} max abs {e['max_abs_error']:.3g}  max rel {e['max_rel_error']:.3g}{kl}  (rtol {e['rtol']:g})")
    lines.append("verified: every check holds" if report["ok"] else "NOT verified: see the FAIL lines above")
    return "\n".join(layout.printable(line) for line in lines)  # a problem may quote the store's strings (zarr's words do)


def _rows(store: layout.Store, path: str, rows: np.ndarray, check: Check) -> np.ndarray | None:
    """Rows ``rows`` (ascending) of the array at ``path``, read through ``Store.read`` shard by shard, as training reads
    them; a damaged or unreadable shard is a failure of ``check`` naming it (None), never zeros or a traceback."""
    parts = []
    try:
        for s in np.unique(rows // store.rows_per_shard):
            lo, hi = store.shard_rows(int(s))
            mine = rows[(rows >= lo) & (rows < hi)]
            parts.append(store.read(path, int(mine[0]), int(mine[-1]) + 1)[mine - mine[0]])
    except StoreError as e:
        check.fail(f"the stored rows of {path} cannot be compared: {e}")
        return None
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)
