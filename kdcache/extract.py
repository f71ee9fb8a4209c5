"""The teacher loop: batches → device → forward → async copy to host → background shard writer.

The GPU never waits for the disk: outputs are converted to the storage dtype on the device,
copied into pinned host memory without blocking, and handed to a writer thread that checks
them, gathers whole shards and hands each to a pool that writes it (compression and I/O overlap
the next forwards). On a CPU teacher the loop gathers itself (see ``ShardWriter``).
Memory is bounded by the queue depth in batches plus the shards being gathered.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import queue
import sys
from concurrent.futures import Future, ThreadPoolExecutor, wait
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import kdcache
from kdcache import data, locking, store as layout, teacher as teachers
from kdcache.errors import (AlignmentError, DeviceMemoryError, KdcacheError, ModelError, PipelineError, StoreMismatchError,
                            TargetError, option, own_messages)
from kdcache.pipeline import Pipeline, check_pipeline
from kdcache.storage import exists, flag_arg, location_arg, options_arg
from kdcache.progress import Progress

DTYPES = {"float16": torch.float16, "float32": torch.float32}
FLOAT16_MAX = 65504.0
# Shards written at once while the next is gathered (each shard has one writer); zstd and file
# writes release the GIL, so compression scales with cores.
WRITE_THREADS = min(8, max(2, (os.cpu_count() or 2) // 2))


@own_messages("extract")
def extract(pipeline: Pipeline, out: str | os.PathLike[str], *, overwrite: bool = False, progress: bool = False,
            storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the teacher once over the pipeline's dataset and write its targets into the store ``out``
    (a folder or an fsspec URL such as ``s3://bucket/run.zarr``, with ``storage_options``).

    Resumes a partial store made from the same inputs (completed shards are skipped); refuses one
    made from different inputs unless ``overwrite``. Returns the store's ``info()`` with ``shards_written``: the shards
    this run wrote (counted under the writer lock: 0 where the store was complete, another resume having finished it).
    """
    pipeline, out = check_pipeline(pipeline), location_arg(out, "out")
    options_arg(storage_options)  # before the teacher is built
    overwrite, progress = flag_arg(overwrite, "overwrite"), flag_arg(progress, "progress")
    refuse_out(out, overwrite, storage_options)  # before the teacher is built
    run = setup(pipeline)
    say_headless(pipeline, run)
    if (complete := complete_read_only(out, run, pipeline, overwrite, storage_options)) is not None:
        return written(complete, [])
    with locking.writer_lock(out, storage_options):  # one writer per store
        store = layout.create_or_resume(out, run.manifest_for(pipeline), overwrite=overwrite, storage_options=storage_options)
        pending = store.resume_pending()  # done shards whose objects are missing too
        check_done_rows(run.dataset, store, pending)
        bar = Progress(sum(store.shard_rows(s)[1] - store.shard_rows(s)[0] for s in pending), "extract", enabled=progress)
        extract_shards(run, pipeline, store, pending, bar)
        bar.close()
        store.finish()
    return written(store, pending)


def refuse_out(out: str, overwrite: bool, storage_options: dict[str, Any] | None) -> None:
    """The looks at ``out`` made before the teacher is built, by the run and its dry run alike: another job writing it
    (``locking.refuse_if_being_written``), what it holds that may be neither resumed nor replaced (``refuse_replacing``:
    a zip, a folder of other files, someone else's zarr node, a location inside a store)."""
    locking.refuse_if_being_written(out, storage_options)
    layout.refuse_replacing(out, overwrite, storage_options)


def complete_read_only(out: str, run: Run, pipeline: Pipeline, overwrite: bool, storage_options: dict[str, Any] | None) -> layout.Store | None:
    """The store at ``out`` where it is complete and this process may not write there (a read-only mount, whose writer
    lock cannot be made): nothing is left to write, so no lock is needed to say so. Refused as a resume is where another
    pipeline made it (``layout.resumable``, which writes nothing). None otherwise: an ``overwrite``, a writable location,
    a store not complete or with a done shard's object missing (the lock is then taken or refused)."""
    if overwrite or not locking.may_not_lock(out) or not exists(out, storage_options):
        return None
    store = layout.resumable(out, run.manifest_for(pipeline), storage_options=storage_options)
    if store is None or not store.complete or store.unbacked_shards():
        return None
    check_done_rows(run.dataset, store, [])
    return store


def written(store: layout.Store, pending: list[int]) -> dict[str, Any]:
    """What an extract returns: the store's ``info()`` and ``shards_written``, the ``pending`` shards it wrote."""
    return {**store.info(), "shards_written": len(pending)}


RESUMED_SHARDS, RESUMED_ROWS = 8, 4  # a resumed store's done rows read again: rows in each of at most this many done shards


def check_done_rows(dataset: Dataset, store: layout.Store, pending: list[int]) -> None:
    """Refuse to resume a store whose done rows are not the dataset's inputs now, before the teacher runs: a seeded choice of
    ``RESUMED_ROWS`` rows in each of up to ``RESUMED_SHARDS`` done shards is read from the dataset and fingerprinted. The
    manifest's identity compares the dataset's length and items 0 and N-1 only; a folder regenerated, listed in another
    order or transformed otherwise since the shards were written would make a store of two datasets (which training
    refuses, row by row, once the teacher's time is spent). A change of a few items is left to training's check."""
    done = np.setdiff1d(np.arange(store.num_shards), np.asarray(pending, dtype=np.int64))
    if len(done) == 0:
        return
    algorithm = data.check_algorithm(store.manifest, store.location)
    rng = np.random.default_rng(len(done))
    for shard in np.sort(rng.choice(done, size=min(len(done), RESUMED_SHARDS), replace=False)):
        start, stop = store.shard_rows(int(shard))
        index, stored = store.array(layout.INDEX)[start:stop], store.array(layout.FINGERPRINT)[start:stop]
        for j in np.sort(rng.choice(stop - start, size=min(stop - start, RESUMED_ROWS), replace=False)):
            seen = data.item_fingerprint(dataset, int(index[j]), algorithm)
            if seen != int(stored[j]):
                raise StoreMismatchError(
                    f"{store.location!r} was made from another dataset than data.factory's now: its done row {start + int(j)} "
                    f"(dataset index {int(index[j])}) has input fingerprint {int(stored[j]):016x}, the dataset now gives {seen:016x} "
                    "(regenerated, listed in another order or transformed otherwise since that shard was written); restore the "
                    f"dataset the store was made from to resume it, or pass {option('--overwrite')} (or another {option('--out')}) to "
                    "extract afresh")


def extract_shards(run: Run, pipeline: Pipeline, store: layout.Store, shards: list[int], bar: Progress,
                   background: bool | None = None) -> None:
    """Run the teacher over whole ``shards`` of an open, writable store and write them (each marked done
    once written). The one loop every way of extracting shares: ``extract`` and ``kdcache.distributed``.
    ``background``: gather shards in a writer thread (None: unless the teacher is on the CPU; see ``ShardWriter``)."""
    x = pipeline.extract
    loader = DataLoader(
        data.Indexed(run.dataset, data.check_algorithm(store.manifest, store.location)),  # a resumed store's rows keep its own
        batch_sampler=data.ShardBatches(shards, store.rows_per_shard, store.num_samples, x.batch_size),
        collate_fn=data.collate,
        num_workers=x.num_workers,
        pin_memory=run.device.type == "cuda",
        worker_init_fn=data.worker_signals,
    )
    background = run.device.type != "cpu" if background is None else background
    try:
        with data.torch_threads(x.threads), ShardWriter(store, x.queue_depth, bar, background) as writer, \
                teachers.capture(run.model, pipeline.targets.layers) as hooked, data.stopped(iter(loader), "extract") as batches:
            for batch in batches:
                if (batch["label"] is not None) != run.has_labels:  # the probe batch decided whether the store holds labels
                    first, last = int(batch["index"][0]), int(batch["index"][-1])
                    raise PipelineError(f"dataset indices {first}..{last} have {'no label' if run.has_labels else 'a label'}, but the "
                                        f"first batch's items {'have one' if run.has_labels else 'do not'}; return labels for all items or none "
                                        f"({data.NO_LABEL})")
                hooked.clear()  # a module that does not run for this batch must not leave the last batch's output
                with torch.inference_mode(), run.autocast():
                    output = data.call(run.model, data.to_device(batch["inputs"], run.device), "teacher")
                with run.device_memory("storing the teacher's targets (select steps, conversion to targets.dtype)", batch):
                    host = to_host(run.select(output, hooked, batch), run.targets, run.device)
                writer.put(batch, *host)
    except StoredInf as e:
        raise e.explained(run) from None


@dataclass
class Run:
    """What ``setup`` resolved: the teacher on its device, the dataset, and the targets a probe batch showed."""

    model: torch.nn.Module
    dataset: Dataset
    device: torch.device
    precision: str
    targets: dict[str, layout.Target]  # by array path
    has_labels: bool
    probe: dict[str, Any]
    num_samples: int = 0  # len(dataset) when the probe items were chosen: the store's rows
    mask: str = ""  # targets.mask: the key of the batches' dict inputs holding their padding mask ("": none)
    mask_where: str = ""  # where targets.mask was set, to begin messages about it

    @functools.cached_property
    def weights_sha256(self) -> str:
        """FORMAT.md §10's hash of the teacher's weights, computed once (a large teacher's takes seconds)."""
        return teachers.weights_sha256(self.model)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return data.autocast(self.device, self.precision)

    def device_memory(self, step: str, batch: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        """A GPU's out-of-memory error in ``step`` on ``batch``, after the forward (``data.call`` names the forward's), as one
        line naming the batch and the fix."""
        return data.device_memory(step, batch["inputs"], "lower extract.batch_size")

    def forward(self, rows: list[int], layers: tuple[str, ...] | list[str]) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """One batch of dataset ``rows`` through the teacher: the batch, the output and the hooked layers' outputs."""
        batch = data.collate(data.Indexed(self.dataset, data.FINGERPRINT_ALGORITHM).__getitems__(rows))
        with teachers.capture(self.model, layers) as hooked, torch.inference_mode(), self.autocast():
            output = data.call(self.model, data.to_device(batch["inputs"], self.device), "teacher")
        return batch, output, hooked

    def padding(self, batch: dict[str, Any]) -> teachers.Padding | None:
        """``targets.mask``'s padding mask of ``batch``, checked and kept on the host (``teachers.Padding.of``); None where
        no mask is set."""
        return teachers.Padding.of(batch, self.mask, "targets.mask", self.mask_where) if self.mask else None

    def target(self, t: layout.Target, output: Any, hooked: dict[str, Any], padding: teachers.Padding | None) -> torch.Tensor:
        """Target ``t`` of one batch's ``output`` (and ``hooked`` layers), pooled by ``padding`` where ``t`` records a mask."""
        raw = output if t.source == "" else teachers.hooked_output(hooked, t.source)
        return teachers.select(raw, t.select, t.name, mask=padding if t.mask else None)[0]

    def select(self, output: Any, hooked: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors to store for one ``batch``, by array path."""
        out, padding, rows = {}, self.padding(batch), len(batch["index"])
        for path, t in self.targets.items():
            tensor = self.target(t, output, hooked, padding)
            samples_first(tensor, rows, t.name)
            if tuple(tensor.shape[1:]) != t.output_shape:  # the probe batch's shape (a model that pads its output to the batch's)
                where = _where(t, int(min(batch["index"])), int(max(batch["index"])))
                raise TargetError(f"{where} changed shape from {list(t.output_shape)} to {list(tensor.shape[1:])} per sample; kdcache "
                                  "stores fixed-shape targets (pad or pool variable-length outputs in the model to one shape)")
            out[path] = tensor
        return out

    def manifest_for(self, pipeline: Pipeline) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
        """``create_or_resume``'s manifest: a store this run resumes keeps its fingerprint algorithm (its rows are all
        fingerprinted alike; kdcache <= 0.1.6 wrote "blake2b-64"); a new one, or one whose algorithm this kdcache does
        not compute (refused as different), is given the current one."""
        def manifest(existing: dict[str, Any] | None) -> dict[str, Any]:
            return self.manifest(pipeline, data.known_algorithm(existing or {}) or data.FINGERPRINT_ALGORITHM)
        return manifest

    def geometry(self, pipeline: Pipeline) -> dict[str, Any]:
        """The store's shard and chunk geometry for these targets (``layout.plan_geometry``), refused where a shard would
        take more than a shard may hold (the writer holds shards in memory until complete)."""
        x = pipeline.extract
        bytes_per_sample = {layout.INDEX: 8, layout.FINGERPRINT: 8, **({layout.LABEL: 8} if self.has_labels else {})}
        bytes_per_sample |= {p: math.prod(shape) * np.dtype(dtype).itemsize for t in self.targets.values() for p, (shape, dtype) in t.arrays.items()}
        geometry = layout.plan_geometry(self.num_samples, bytes_per_sample, shard_mb=x.shard_mb, chunk_mb=x.chunk_mb,
                                        rows_per_shard=x.rows_per_shard)
        shard_bytes = geometry["rows_per_shard"] * sum(bytes_per_sample.values())
        if shard_bytes > layout.MAX_SHARD_BYTES:  # the writer holds up to WRITE_THREADS + 1 shards in memory
            most = layout.MAX_SHARD_BYTES // sum(bytes_per_sample.values())
            if x.rows_per_shard == 0:  # kdcache chose: its smallest shard is too large for samples this large
                raise PipelineError(f"{pipeline.source}: a sample's targets take {sum(bytes_per_sample.values()):,} bytes, so the smallest shard "
                                    f"extract.shard_mb chooses ({geometry['rows_per_shard']} rows) would be {shard_bytes / 2**30:.3g} GiB, above "
                                    f"the 4 GiB a shard may hold (it is held in memory until complete); set extract.rows_per_shard = {most} "
                                    "or fewer, or store less per sample (targets.select, fewer targets.layers, targets.dtype = \"float16\")")
            raise PipelineError(f"{pipeline.where('extract.rows_per_shard')}: extract.rows_per_shard = {x.rows_per_shard} makes shards of {shard_bytes / 2**30:.3g} GiB "
                                f"({sum(bytes_per_sample.values())} bytes per sample), but a shard is held in memory until complete; "
                                f"use at most {most} rows, or 0 to choose from extract.shard_mb")
        return geometry

    def manifest(self, pipeline: Pipeline, algorithm: str = data.FINGERPRINT_ALGORITHM) -> dict[str, Any]:
        """The manifest of a store of this run, its inputs fingerprinted by ``algorithm`` (a resumed store's)."""
        x, n = pipeline.extract, self.num_samples
        now = data.check_dataset(self.dataset, f"data.factory {pipeline.data.factory!r}({pipeline.data.split!r})")
        if now != n:  # the probes' last index (n - 1) and the store's rows would disagree: a store its own reader calls damaged
            raise PipelineError(f"len() of data.factory {pipeline.data.factory!r}({pipeline.data.split!r})'s dataset gave {n}, then {now}: "
                                "its length changed between two calls (files still arriving? a __len__ that counts anew each time); "
                                "make __len__ return one number (list the items once, in the dataset's __init__), then rerun")
        geometry = self.geometry(pipeline)
        return {
            "kdcache_version": kdcache.__version__,
            "teacher": {
                "factory": pipeline.teacher.factory,
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "num_parameters": teachers.num_parameters(self.model),
                "weights_sha256": self.weights_sha256,
            },
            "dataset": {
                "factory": pipeline.data.factory,
                "split": pipeline.data.split,
                "class": f"{type(self.dataset).__module__}.{type(self.dataset).__qualname__}",
                "length": n,
                "probe_fingerprints": self.probe["fingerprints"][algorithm],
            },
            "fingerprint": {"algorithm": algorithm, "of": data.FINGERPRINT_ALGORITHMS[algorithm]},
            "num_samples": n,
            "has_labels": self.has_labels,
            "targets": {t.name: t.to_dict() for t in self.targets.values()},
            "geometry": geometry,
            # shard_digests: progress/digest is kept (FORMAT.md §7.1); kdcache 0.1.0 and 0.1.1 see other compression and never resume the store
            "compression": {"codec": x.compression, "level": x.compression_level, "checksum": "crc32c", "shard_digests": "crc32c"},
            "precision": self.precision,
            "pipeline": pipeline.to_dict(),
        }


def samples_first(tensor: torch.Tensor, rows: int, name: str, probe: bool = False) -> None:
    """Refuse a target whose first axis is not the batch's samples (a sequence-first layer, a reduced output):
    its rows would be stored as other samples' targets. ``probe``: the batch is setup's probe of one sample."""
    if tensor.ndim == 0 or tensor.shape[0] != rows:
        probe_note = " (kdcache runs one sample through the teacher to see this)" if probe else ""
        raise TargetError(f"target {name!r} has shape {list(tensor.shape)} for a batch of {rows} samples, but its first axis must be "
                          f"the samples (kdcache stores row r of every target for sample r){probe_note}; store a batch-first output "
                          "(e.g. batch_first=True for RNN/attention layers, or a module that permutes to (batch, ...))")


def _check_values(tensor: torch.Tensor, name: str) -> None:
    """Refuse a target with no values per sample (an axis of size 0): a store of it has no chunks to shape (a
    ZeroDivisionError named as a store that cannot be created) and nothing to distil."""
    if 0 in tensor.shape[1:]:
        raise TargetError(f"target {name!r} has no values per sample (per-sample shape {list(tensor.shape[1:])}), so there is "
                          f"nothing to store or distil; pick a part of the output that holds values with [targets.select] {name!r}, "
                          "or leave the target out (targets.logits = false, or drop the layer from targets.layers)")


def _check_floating(tensor: torch.Tensor, name: str, dtype: str) -> None:
    """Refuse a target that is not real floating-point: converted to ``dtype`` it would lose its imaginary part (complex),
    or its integers (class or token ids, codebook indices) would be rounded (float16 holds integers exactly only to 2048)."""
    if tensor.is_floating_point():
        return
    seen = f"target {name!r} is {str(tensor.dtype).removeprefix('torch.')} (per-sample shape {list(tensor.shape[1:])}), but kdcache stores " \
           f"real floating-point outputs (logits, activations), here as {dtype}"
    if tensor.is_complex():
        raise TargetError(f"{seen}, which would drop the imaginary part; return torch.view_as_real(...) of it from a module and hook "
                          f"that, or pick another part with [targets.select] {name!r}")
    raise TargetError(f"{seen}, not integers or booleans (class or token ids, masks; float16 rounds integers above 2048); store the "
                      f"floating-point output they come from (the logits before an argmax), or pick another part with [targets.select] {name!r}")


def setup(pipeline: Pipeline, writing: bool = True, keep_probe: bool = False) -> Run:
    """Validate, build the teacher and dataset, and run one probe batch to learn the target shapes. ``writing``: the run
    writes a store, whose shard geometry for these targets is checked before the teacher runs again (``verify
    --teacher-check`` recomputes rows of a store that has its own). ``keep_probe``: the probe batch's targets stay in
    ``run.probe["outputs"]`` (a dry run's figures), else they are freed once the setup checks have used them (one batch
    of every target, held on the host for the whole run otherwise)."""
    t, x = pipeline.targets, pipeline.extract
    if not t.logits and not t.layers:
        raise PipelineError(f"{pipeline.where('targets.logits')}: nothing to store; set targets.logits = true or list targets.layers")
    if x.batch_size < 1:
        raise PipelineError(f"{pipeline.where('extract.batch_size')}: extract.batch_size must be >= 1, got {x.batch_size}")
    if x.queue_depth < 1:
        raise PipelineError(f"{pipeline.where('extract.queue_depth')}: extract.queue_depth must be >= 1 (batches in flight to the writer), got {x.queue_depth}; "
                            "use e.g. 4 (the default)")
    if not (0 < x.chunk_mb <= x.shard_mb):
        key = "extract.chunk_mb" if pipeline.where("extract.chunk_mb") != pipeline.source else "extract.shard_mb"  # an override of either
        raise PipelineError(f"{pipeline.where(key)}: extract.chunk_mb = {x.chunk_mb:g} and extract.shard_mb = {x.shard_mb:g}: both must be > 0 "
                            "and an inner chunk no larger than its shard; e.g. chunk_mb = 1.0, shard_mb = 64.0")
    if t.topk and not t.logits:
        raise PipelineError(f"{pipeline.where('targets.topk')}: targets.topk = {t.topk} keeps the largest logits, but targets.logits = "
                            "false stores none; set targets.logits = true, or targets.topk = 0")
    layout.check_layer_names(list(t.layers))  # names that collide on a case-insensitive file system
    device = data.pick_device(x.device, "extract.device", pipeline.where("extract.device"))
    model = teachers.build(pipeline, "teacher.factory")
    teachers.check_layers(model, t.layers)
    dataset = data.load(pipeline, pipeline.data.split)
    n = len(dataset)
    if n == 0:
        raise PipelineError(f"{pipeline.data.factory}({pipeline.data.split!r}) is empty; nothing to extract (check data.factory and data.split)")
    # verify --teacher-check (not writing) has no --device: its --set sets the pipeline's extract.device, which it runs on
    cpu = "extract --device cpu" if writing else "verify --set extract.device=cpu"
    model = data.move_model(model, f"the teacher (teacher.factory {pipeline.teacher.factory!r})", device,
                            f'set extract.device = "cpu" ({cpu}) to run it on the CPU, or return it from teacher.factory '
                            "in a lower precision (model.to(torch.bfloat16); extract.precision casts only its forward)")
    run = Run(model, dataset, device, x.precision, {}, False, {}, n, t.mask, pipeline.where("targets.mask"))
    _probe_targets(run, pipeline, writing)
    if not keep_probe:
        del run.probe["outputs"]
    return run


def _probe_targets(run: Run, pipeline: Pipeline, writing: bool) -> None:
    """One batch through the teacher (the probe): each target's per-sample shape and resolved select into ``run.targets``,
    whether the items have labels, the manifest's fingerprints of items 0 and N-1 and the probe batch's targets (``run.probe``);
    then the setup checks, which run the teacher again (``writing``: the store's geometry is checked first)."""
    t, x, dataset, n = pipeline.targets, pipeline.extract, run.dataset, run.num_samples
    batch, output, hooked = run.forward(list(range(min(x.batch_size, n))), t.layers)
    run.has_labels = batch["label"] is not None
    if t.logits and teachers.LOGITS in t.layers:
        raise PipelineError(f"{pipeline.where('targets.layers')}: a layer named {teachers.LOGITS!r} would clash with the model's output target; "
                            "set targets.logits = false to store that module as the only 'logits', or rename the module")
    # the probe batch's targets (select steps) and the checks that run the teacher again, where a GPU may run out of memory too
    with run.device_memory("the teacher's probe batch (its targets' select steps, the setup checks)", batch):
        sources = ([(teachers.LOGITS, "")] if t.logits else []) + [(name, name) for name in t.layers]
        padding = run.padding(batch)
        for name, source in sources:
            select = t.select.get(name, "auto")
            pooled = padding if teachers.pools(select) else None
            on_tensor: list[tuple[str, int]] = []
            tensor, resolved = teachers.select(output if source == "" else teachers.hooked_output(hooked, source), select, name,
                                               mask=pooled, on_tensor=on_tensor)
            samples_first(tensor, len(batch["index"]), name)
            _check_values(tensor, name)
            _check_floating(tensor, name, t.dtype)
            path = layout.LOGITS if source == "" else layout.layer_path(name)
            shape, topk = tuple(tensor.shape[1:]), t.topk if source == "" else 0
            if topk:
                _check_topk(pipeline, shape, select if select != "auto" else resolved, on_tensor)
            run.targets[path] = layout.Target(name, path, (*shape[:-1], topk) if topk else shape, t.dtype, source,
                                              select if select != "auto" else resolved, t.mask if pooled else "", topk,
                                              shape[-1] if topk else 0)
        _check_mask_used(run)
        unknown = set(t.select) - {name for name, _ in sources}
        if unknown:
            raise PipelineError(f"{pipeline.where('targets.select')}: targets.select names {sorted(unknown)}, which are not stored targets; use 'logits' or a name in targets.layers")
        alone = {}  # the manifest's, by either algorithm (a resumed store's); hashed as read, for an item may be a buffer the next read refills
        for i in sorted({0, n - 1}):
            inputs = data.item_inputs(dataset, i)
            alone[i] = {a: data.fingerprint(inputs, a) for a in data.FINGERPRINT_ALGORITHMS}
        run.probe = {
            "fingerprints": {a: {str(i): f"{fps[a]:016x}" for i, fps in alone.items()} for a in data.FINGERPRINT_ALGORITHMS},
            "outputs": {p: _kept(v) for p, v in run.select(output, hooked, batch).items()},
        }
        del output, hooked  # the checks below run the teacher again: of this batch's output, only its targets are kept meanwhile
        _check_probe_items(dataset, [int(f) for f in batch["fingerprint"]], alone[0][data.FINGERPRINT_ALGORITHM])
        if writing:  # targets too large for any shard: refused before the teacher runs again (_check_alone's copies)
            run.geometry(pipeline)
        if len(batch["index"]) > 1:
            _check_alone(run, t.layers)
            _check_order(run, t.layers)


def _check_topk(pipeline: Pipeline, shape: tuple[int, ...], select: str, on_tensor: list[tuple[str, int]]) -> None:
    """Refuse ``targets.topk`` where the logits (per-sample ``shape``, reached by ``select``, whose steps on a tensor are
    ``on_tensor``) have no class axis last to take the K largest of, fewer classes than K, or a select step that took
    part of, pooled or moved their class axis (a step on a sample of one axis, or ``transpose`` of two)."""
    k, where = pipeline.targets.topk, pipeline.where("targets.topk")
    if not shape:
        raise PipelineError(f"{where}: targets.topk = {k} keeps the largest values of the logits' class axis, but the logits are one "
                            f"value per sample (per-sample shape [], select {select!r}); set targets.topk = 0 to store them whole")
    touched = next((step for step, axes in on_tensor if axes == 1 or (step == "transpose" and axes == 2)), None)
    if touched is not None:
        raise PipelineError(f"{where}: targets.topk = {k} keeps the largest values along the logits' last (class) axis, but "
                            f"[targets.select] 'logits' = {select!r} applies step {touched!r} to that axis (it takes part of, pools "
                            "or moves the classes); select the logits with their classes last and whole, or set targets.topk = 0")
    if k > shape[-1]:
        raise PipelineError(f"{where}: targets.topk = {k} is more than the {shape[-1]} classes of the logits (per-sample shape "
                            f"{list(shape)}); use at most {shape[-1]}, or 0 to store every class")


def _check_mask_used(run: Run) -> None:
    """Refuse a ``targets.mask`` that no target's select pools by: it would change nothing (the targets are stored at every
    position; ``train.mask`` leaves padding out of per-token losses)."""
    if run.mask and not any(t.mask for t in run.targets.values()):
        selects = ", ".join(f"{t.name} {t.select!r}" for t in run.targets.values())
        raise PipelineError(f"{run.mask_where}: targets.mask = {run.mask!r} pools the select steps 'mean' and 'last', but no target's "
                            f"select has one ({selects}), so it would change nothing; end a target's [targets.select] with one (e.g. "
                            "logits = \"mean\", or \"last_hidden_state.last\"), or set targets.mask = \"\" (train.mask leaves padding "
                            "out of per-token losses)")


def _kept(target: torch.Tensor) -> torch.Tensor:
    """A target of the probe batch as the setup checks keep it: on the host, so that the device holds no more than one batch's
    output when the teacher runs again (as in the run), and in memory of its own (a view, e.g. one position of a hidden
    state, would keep the whole of it)."""
    kept = target.to("cpu")
    return kept.clone() if kept.untyped_storage().nbytes() > kept.nbytes else kept


def _check_probe_items(dataset: Dataset, batch: list[int], alone: int) -> None:
    """Each item of the probe batch (fingerprints ``batch``) against the same index read alone (item 0's is ``alone``,
    the manifest's): two inputs mean random items, whose stored fingerprints no later read would match, or a
    ``__getitems__`` that serves other inputs than ``dataset[i]``, or them in another order (one that swapped positions 1 and 2 wrote rows whose
    inputs and targets were other indices', each row consistent with itself, so verify passed). Read item by item, a
    batch is its items read alone: item 0 is enough. Refused before the teacher runs over the data."""
    batched, algorithm = hasattr(dataset, "__getitems__"), data.FINGERPRINT_ALGORITHM
    for i in range(len(batch) if batched else 1):
        single = alone if i == 0 else data.item_fingerprint(dataset, i, algorithm)
        if batch[i] == single:
            continue
        # items that are one buffer each read refills put one input in several places: data.Indexed refused them as it read the batch
        reads = [single, *data.reread(dataset, i, algorithm)] + ([] if batched else [batch[i]])  # reads of dataset[i]
        if len(set(reads)) > 1:
            raise AlignmentError(data.not_deterministic(i, reads, "then rerun"))
        raise PipelineError(f"the dataset's __getitems__ gives index {i} as another input (fingerprint {batch[i]:016x}) than "
                            f"dataset[{i}] does ({single:016x}); make __getitems__ return the items dataset[i] returns, in the order asked")


def _check_alone(run: Run, layers: tuple[str, ...]) -> None:
    """Sample 0 through the teacher alone, against its row of the probe batch.

    Refuse a target whose first axis is as long as the probe batch but is not the samples (a sequence-first layer with
    as many time steps as the batch has samples): a batch of one sample shows it, as a first axis that keeps its length.
    Say so (stderr; not refused: a GPU's kernels for one sample may round otherwise) where the outputs differ beyond
    ``BATCH_RTOL``: the teacher mixes the samples of a batch (BatchNorm on batch statistics: ``track_running_stats=False``
    or a module left in training mode), so a stored row depends on its batch, ``extract.batch_size`` and where a resumed
    run began, and ``verify --teacher-check`` fails. Refuse (``_reordered``) where sample 0 alone is, within that tolerance,
    another row J of the probe batch, and sample J alone is another row than its own too: the teacher moved the rows.
    Sample 0's alone does not tell that from a teacher that mixes its batch (a confident softmax on batch statistics puts
    it in the class of another row, which that row's sample alone is in as well). A model that does not take a batch of
    one, or drops its batch axis (a squeeze), is let be: every batch of the run is checked as it comes (``samples_first``)."""
    try:
        mixed = _mixed(run, layers)
    except DeviceMemoryError as e:  # sample 0 alone, or the sample whose row it gave: the check concludes nothing
        return _skipped("the check of sample 0 alone against its row of the probe batch", e)
    if mixed and os.environ.get("RANK", "0") in ("", "0"):  # torchrun: rank 0 says it
        print(f"note: the teacher's output for sample 0 differs between its probe batch and a batch of itself alone ({', '.join(mixed)}, "
              "relative): it mixes the samples of a batch (BatchNorm on batch statistics: track_running_stats=False, or a module "
              "left in training mode), so each stored row depends on the other samples of its batch and on extract.batch_size, "
              "and verify --teacher-check will fail; put every such module in eval mode with running statistics if per-sample "
              "targets are meant", file=sys.stderr)


def _mixed(run: Run, layers: tuple[str, ...]) -> list[str]:
    """The targets (``'name' by 0.1``) whose output for sample 0 alone is not its row of the probe batch, for
    ``_check_alone`` to name; refused (``_reordered``) where the teacher moved the rows. A ``DeviceMemoryError`` of a
    batch of one is let through: the check is skipped, not concluded."""
    one = _alone(run, layers, 0)
    if one is None:
        return []
    mixed, tolerance = [], BATCH_RTOL.get(run.precision, BATCH_RTOL["fp32"])
    for path, t in run.targets.items():
        if one[t.name].ndim != len(t.shape) + 1:
            continue
        samples_first(one[t.name], 1, t.name, probe=True)
        alone, batched = one[t.name][0], run.probe["outputs"][path]
        if alone.shape == batched[0].shape and alone.numel():
            worst = teachers.row_distance(alone, batched[0])
            if worst > tolerance:
                other = teachers.moved_row(alone, batched, 0, tolerance)  # the row of another sample: not mixed, moved
                if other is not None and _moved_too(run, layers, t, other, tolerance):
                    raise _reordered(t.name, f"sample 0 read alone gives the probe batch's row {other}, not its row 0")
                mixed.append(f"{t.name!r} by {worst:.2g}")
    return mixed


def _alone(run: Run, layers: tuple[str, ...], sample: int) -> dict[str, torch.Tensor] | None:
    """Each target's output for dataset ``sample`` through the teacher alone, by name; None where the teacher refuses (a
    ``DeviceMemoryError`` is raised: out of memory is no refusal)."""
    try:
        batch, output, hooked = run.forward([sample], layers)
        padding = run.padding(batch)
        return {t.name: run.target(t, output, hooked, padding) for t in run.targets.values()}
    except DeviceMemoryError:
        raise  # _check_alone says it skipped its check
    except (ModelError, TargetError):
        return None


def _skipped(check: str, e: DeviceMemoryError) -> None:
    """Say that a setup check that runs the teacher again was skipped (``teachers.skipped_check``)."""
    teachers.skipped_check(f"{check} (a teacher that mixes or reorders the samples of a batch)", "teacher", e,
                           "the run's batches are still checked as they come, and kdcache verify --teacher-check N recomputes stored "
                           "rows afterwards")


def _moved_too(run: Run, layers: tuple[str, ...], t: layout.Target, row: int, tolerance: float) -> bool:
    """Whether the probe batch's sample ``row`` (where sample 0 alone was found) alone is, for target ``t``, another row
    of the probe batch than its own too: a teacher that moved the rows, not one that mixes them."""
    one = _alone(run, layers, row)
    alone, batched = (one or {}).get(t.name), run.probe["outputs"][t.path]
    return alone is not None and alone.ndim == batched.ndim and alone.shape[1:] == batched.shape[1:] and \
        teachers.moved_row(alone[0], batched, row, tolerance) is not None


BATCH_RTOL = {"fp32": 1e-2, "fp16": 2e-2, "bf16": 5e-2}  # far above a kernel's rounding for another batch size (TF32: ~1e-3)


def _check_order(run: Run, layers: tuple[str, ...]) -> None:
    """The probe batch again with every sample moved one place (samples 1, 2, ..., 0): each row of every target must be
    the row the sample had in the probe batch. Refuse a teacher that returns its rows in another order than its inputs
    (it sorts its batch, by length for packed sequences, and never puts the rows back): every stored row would hold
    another sample's targets under the right input's fingerprint, which no later check sees. A row found at another
    sample's place is that; one found nowhere is not (a teacher that mixes the samples of a batch is order-free; one that
    is not deterministic matches no row), and is left to ``_check_alone``. Two samples are one swap either way:
    ``_check_alone``'s sample 0 alone tells those."""
    rows = len(next(iter(run.probe["outputs"].values())))
    if rows < 3:
        return
    moved = [*range(1, rows), 0]
    try:
        batch, output, hooked = run.forward(moved, layers)
        again = run.select(output, hooked, batch)
    except DeviceMemoryError as e:
        return _skipped("the check of the probe batch with its samples moved one place", e)
    except (ModelError, TargetError):  # as _check_alone: the run's own batches say what is wrong
        return
    del output, hooked  # only the targets are compared: the rest of the output is freed first
    tolerance = BATCH_RTOL.get(run.precision, BATCH_RTOL["fp32"])
    for path, t in run.targets.items():
        before, after = run.probe["outputs"][path], again.pop(path)  # each target freed once compared
        for i, sample in enumerate(moved):
            if not after[i].numel() or teachers.row_distance(before[sample], after[i]) <= tolerance:
                continue
            other = teachers.moved_row(after[i], before, sample, tolerance)
            if other is not None:
                raise _reordered(t.name, f"with the probe batch's samples moved one place, row {i} (sample {sample}) holds sample "
                                         f"{other}'s output")
            break  # found nowhere: not a reordering


def _reordered(name: str, seen: str) -> TargetError:
    return TargetError(f"target {name!r}: {seen}: the teacher returns the rows of its output in another order than its inputs, "
                       "so each stored row would hold another sample's targets (nothing was written); make the model return row i "
                       "for input i (a model that sorts its batch, e.g. by length for packed sequences, must put its output back "
                       "in the input order: output[order.argsort()])")


def dry_run(pipeline: Pipeline, out: str | os.PathLike[str] | None = None, *, overwrite: bool = False,
            storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate the pipeline, run one batch, and report target shapes, bytes per sample and store size; write nothing.

    ``out`` (with ``overwrite`` and ``storage_options``, as ``extract`` takes them): the store ``extract`` would write,
    looked at as the run looks at it before the teacher runs over the data, and refused in the run's words (a zip,
    a folder of other files, a store of other inputs, a location it may not lock or that another job is writing);
    else ``report["out"]`` says what the run would do there (``_out_plan``). No folder is made, no lock taken (a
    lock file there is looked at, as the run does), nothing written. None: ``report["out"]`` is None."""
    pipeline = check_pipeline(pipeline)
    if out is not None:
        out = location_arg(out, "out")
        options_arg(storage_options)
        overwrite = flag_arg(overwrite, "overwrite")
        refuse_out(out, overwrite, storage_options)  # before the teacher is built, as the run
    elif overwrite is not False or storage_options is not None:
        raise TypeError("dry_run's overwrite and storage_options apply to out, the store extract would write; pass out too")
    start = time.perf_counter()
    run = setup(pipeline, keep_probe=True)
    seconds = time.perf_counter() - start
    manifest = run.manifest(pipeline)
    host, rows = _probe_values(run)
    per_sample = sum(t.row_bytes for t in run.targets.values()) + 8 * (3 if run.has_labels else 2)
    ratio = _compression_ratio(pipeline, host)
    n = manifest["num_samples"]
    inputs, input_warnings = _model_inputs(pipeline, run)
    return {
        "num_samples": n,
        "device": str(run.device),
        "teacher": manifest["teacher"],
        "has_labels": run.has_labels,
        "inputs": inputs,
        "targets": {t.name: {"path": p, "shape": [n, *t.shape], "dtype": t.dtype, "source": t.source, "select": t.select,
                             **({"mask": t.mask} if t.mask else {}), **layout.topk_info(t),
                             "bytes_per_sample": t.row_bytes} for p, t in run.targets.items()},
        "bytes_per_sample": per_sample,
        "estimated_bytes_raw": per_sample * n,
        "estimated_compression_ratio": ratio,
        "estimated_bytes": int(per_sample * n / ratio),
        "geometry": manifest["geometry"],
        "probe_batch": rows,
        "probe_seconds": seconds,
        "warnings": _headless_warnings(pipeline, run) + _layer_warnings(pipeline) + _loss_warnings(pipeline, run)
                    + _mask_warnings(pipeline, run) + input_warnings + _eval_warnings(pipeline),
        "out": None if out is None else _out_plan(out, run, pipeline, overwrite, storage_options, manifest["geometry"]["num_shards"]),
    }


def _out_plan(out: str, run: Run, pipeline: Pipeline, overwrite: bool, storage_options: dict[str, Any] | None,
              num_shards: int) -> dict[str, Any]:
    """What ``extract`` would do at ``out`` once its teacher is set up, found by its own checks in its order, writing
    nothing: refused as it refuses (a store found complete on a read-only mount, its writer lock's folder, a store of other
    inputs, its done rows against the dataset), else ``action``: "create", "replace" (``overwrite``), "resume" or
    "complete", with the shards done (of ``num_shards``, a new store's) and ``redone``: the shards marked done whose objects
    are missing, which the run writes again. ``again``: a store made afresh where a creation stopped before its manifest."""
    store = complete_read_only(out, run, pipeline, overwrite, storage_options)
    if store is None:
        locking.refuse_unlockable(out)  # writer_lock's refusals; the lock is not taken
        store = layout.resumable(out, run.manifest_for(pipeline), overwrite=overwrite, storage_options=storage_options)
    if store is None:  # made afresh: over a store (--overwrite), over what a creation stopped early left, or new
        there = exists(out, storage_options)
        return {"location": out, "action": "replace" if overwrite and there else "create", "again": there and not overwrite,
                "shards_done": 0, "num_shards": num_shards, "redone": 0}
    pending, lost = store.pending_shards()
    check_done_rows(run.dataset, store, pending)
    return {"location": out, "action": "resume" if pending else "complete", "again": False,
            "shards_done": store.num_shards - len(pending), "num_shards": store.num_shards, "redone": len(lost)}


def _model_inputs(pipeline: Pipeline, run: Run) -> tuple[dict[str, list[str]], list[str]]:
    """The keys of item 0's dict inputs each model is called with (the teacher every one, the student those
    ``student.inputs`` names; {} for inputs that are not a dict), and what ``train`` would refuse of ``student.inputs``
    (``data.picked``: a key the items lack, inputs that are not a dict), said before the extract."""
    inputs = data.item_inputs(run.dataset, 0)
    shown = {"teacher": list(inputs)} if isinstance(inputs, Mapping) else {}
    try:
        student = data.picked(inputs, pipeline.student.inputs, pipeline.where("student.inputs"))
    except KdcacheError as e:
        return shown, [f"kdcache train would refuse this store: {e}"]
    if shown:
        shown["student"] = list(student)
    return shown, []


def _probe_values(run: Run) -> tuple[dict[str, torch.Tensor], int]:
    """The probe batch's targets on the host, as extract stores them, by path, and its number of rows; refused where the
    run's first batch would be, in words that say the dry run wrote nothing."""
    host, copied = to_host(run.probe["outputs"], run.targets, run.device)
    if copied is not None:  # CUDA: the copies into pinned memory are asynchronous
        copied.synchronize()
    rows = len(host[next(iter(run.targets))])
    try:
        _check_finite(host, run.targets, 0, rows - 1)  # what the first batch of the run would stop on (float16 overflow, NaN)
    except TargetError as e:  # the run's words say what it left unwritten: a dry run writes nothing
        error = e.explained(run) if isinstance(e, StoredInf) else e
        raise TargetError(str(error).replace(UNWRITTEN, "(kdcache extract would stop at this first batch; the dry run wrote nothing)")) from None
    return {p: h for p, h in host.items() if not p.endswith("#sum")}, rows  # the values (and top-k classes), not their sums


def _compression_ratio(pipeline: Pipeline, host: dict[str, torch.Tensor]) -> float:
    """The probe's values' raw bytes over their bytes zstd-compressed at ``extract.compression_level``; 1.0 where
    ``extract.compression`` is not zstd."""
    import numcodecs

    raw = sum(h.numpy().nbytes for h in host.values())
    packed = sum(len(numcodecs.Zstd(level=pipeline.extract.compression_level).encode(h.numpy())) for h in host.values())
    return raw / packed if pipeline.extract.compression == "zstd" and packed else 1.0


def _headless_warnings(pipeline: Pipeline, run: Run) -> list[str]:
    """A teacher whose output has no ``logits`` (a model without a head: a Hugging Face ``*Model``, BertModel) has another
    field of it stored as ``logits`` by the default select (``pooler_output``, ``last_hidden_state``), which kl and mse
    would compare as logits: said where ``targets.select`` leaves the logits' select to that default."""
    logits = run.targets.get(layout.LOGITS)
    if logits is None or teachers.LOGITS in pipeline.targets.select:
        return []
    field = next((step for step in logits.select.split(".") if step in teachers.AUTO_KEYS and step != teachers.LOGITS), None)
    if field is None:
        return []
    return [f"the teacher's output has no 'logits' (a model without a head, e.g. a Hugging Face *Model): its {field!r} is stored "
            f"as 'logits', which train.loss.kl and mse compare as logits; for feature KD set targets.logits = false and hook "
            f"modules in targets.layers, or set targets.select.logits = {field!r} to store it so on purpose"]


def say_headless(pipeline: Pipeline, run: Run) -> None:
    """``_headless_warnings`` as ``warning:`` lines on stderr, as a real extract starts (a dry run lists them)."""
    for warning in _headless_warnings(pipeline, run):
        print(f"warning: {warning}", file=sys.stderr)


def _layer_warnings(pipeline: Pipeline) -> list[str]:
    """What ``train`` (train.setup) would refuse in this store for the pipeline's ``train.features``: a layer it does not store."""
    return [f"train.features names {name!r}, which targets.layers does not list: kdcache train would refuse this store; "
            "add it to targets.layers (or --layers)" for name in pipeline.train.features if name not in pipeline.targets.layers]


def _eval_warnings(pipeline: Pipeline) -> list[str]:
    """What ``train`` would warn of: ``train.eval_split`` naming the split this store holds, the split a student trained
    from it trains on (allowed, not refused: kdcache train says it in a ``warning:`` line)."""
    split = pipeline.train.eval_split
    if not split or split != pipeline.data.split:
        return []
    return [f"train.eval_split = {split!r} is the split this store holds: kdcache train from it would evaluate the student on "
            "the split it trains on (its eval metrics would measure training data); train from another split's store, and use "
            "this one as train.eval_cache"]


def _loss_warnings(pipeline: Pipeline, run: Run) -> list[str]:
    """What ``train`` (train.setup) would refuse in this store for the pipeline's loss weights, said before the extract."""
    from kdcache.train import check_classes  # the training side's check, in its words

    w, warnings = pipeline.train.loss, []
    if (w.kl or w.mse) and not pipeline.targets.logits and teachers.LOGITS in pipeline.targets.layers:  # the clash's fix
        warnings.append("train.loss.kl/mse need the teacher's stored output, which targets.logits = false leaves out (the layer "
                        "'logits' is the module of that name): kdcache train would refuse this store; set those weights to 0 and "
                        "distill the layer with train.features.logits")
    elif (w.kl or w.mse) and not pipeline.targets.logits:
        warnings.append("train.loss.kl/mse need stored logits, which targets.logits = false leaves out: kdcache train would refuse "
                        "this store; set targets.logits = true (or those weights to 0)")
    if w.mse and pipeline.targets.logits and pipeline.targets.topk:
        warnings.append(f"train.loss.mse compares every class's logit, which targets.topk = {pipeline.targets.topk} leaves out: kdcache "
                        "train would refuse this store; set train.loss.mse = 0 (kl trains from the top-k logits), or targets.topk = 0")
    if w.ce and not run.has_labels:
        warnings.append("train.loss.ce needs labels, which this dataset's items do not have: kdcache train would refuse this store; "
                        "set train.loss.ce = 0")
    try:
        check_classes(pipeline, run.targets.values())
    except KdcacheError as e:
        warnings.append(f"kdcache train would refuse this store: {e}")
    return warnings


def _mask_warnings(pipeline: Pipeline, run: Run) -> list[str]:
    """What ``train`` would refuse of ``train.mask`` with these targets and items (``kdcache.train.mask_paths``), said before the
    extract: e.g. a mask of the items' tokens against per-token targets a select keeps part of, or a student select pooled
    otherwise than the targets it is compared with, or a student ``last`` with no train.mask (with no mask set anywhere too)."""
    from kdcache.train import loss_targets, mask_paths  # the training side's rule and check, in its words

    paths = list(loss_targets(pipeline, {t.name: t for t in run.targets.values()}))
    try:
        mask_paths(pipeline, run.targets.values(), paths, run.dataset)
    except KdcacheError as e:
        return [f"kdcache train would refuse this store: {e}"]
    return []


def to_host(tensors: dict[str, torch.Tensor], targets: dict[str, layout.Target], device: torch.device) -> tuple[dict[str, torch.Tensor], Any]:
    """Convert to the storage dtype on the device and start non-blocking copies into pinned memory.

    Each target also gets a 0-d float32 sum of its converted values (NaN stays NaN, overflow became
    inf), copied alongside under ``path + "#sum"``: a finite sum proves every value finite, so the
    writer looks at the values only when it is not (``_check_finite``). One reduction pass, a sixth
    of ``isfinite().all()``'s cost on a CPU float16 map. A top-k target (``targets.topk``) keeps its K largest
    values per position, under its path, and their classes under ``layout.LOGITS_INDICES`` (``teachers.top_k``).
    Returns the host tensors and a CUDA event to wait on (None on CPU).
    """
    host: dict[str, torch.Tensor] = {}
    cuda = device.type == "cuda"
    for path, t in tensors.items():
        # On the CPU the writer keeps this tensor until its shard is written: it must own its memory
        # (a model may hand out the same buffer every call) and be contiguous (its rows are written as they are).
        # A top-k target keeps teachers.top_k's new tensors instead: its logits are only read, never copied whole.
        copy = not cuda and not targets[path].topk
        converted = t.detach().to(DTYPES[targets[path].dtype], copy=copy, memory_format=torch.contiguous_format)
        kept = {path: converted}
        if targets[path].topk:  # of the values as stored: their ties are the stored values' (teachers.top_k orders them)
            kept[path], kept[layout.LOGITS_INDICES] = teachers.top_k(converted, targets[path].topk)
        kept[path + "#sum"] = kept[path].sum(dtype=torch.float32)  # float32: 4M float16 ReLU values overflow a float16 sum
        for key, value in kept.items():
            if cuda:
                host[key] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
            else:
                host[key] = value
    event = None
    if cuda:  # on the stream the copies were queued on: the device's own (cuda:N is not the current device unless set)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
    return host, event


class ShardWriter:
    """A background thread that collects batches into whole shards and writes each once complete.

    Batches never cross shards (``data.ShardBatches``). A shard is written only when every row
    of it has arrived, then marked done; an interrupted run leaves partial shards unwritten.
    A batch's host arrays are kept as they are, not copied into a shard buffer: the write takes
    the shard's inner chunks straight from them (``Store.write_shard`` with pieces), so the only
    copy of a target on the host is the one ``to_host`` makes. Complete shards are written by a
    small pool (``WRITE_THREADS``), so collecting the next shard overlaps the compression and file
    writes of the last ones; at most ``WRITE_THREADS`` are in flight.

    ``background=False`` (a CPU teacher) collects in the caller's thread instead: the forward pass
    already runs on every core, and a collecting thread would only preempt one of its OpenMP
    workers and stall the whole parallel region.
    """

    def __init__(self, store: layout.Store, depth: int, bar: Progress, background: bool = True):
        self.store, self.bar = store, bar
        self.targets = {t.path: t for t in store.targets.values()}
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self.error: BaseException | None = None
        self.shards: dict[int, list[tuple[int, dict[str, np.ndarray]]]] = {}  # shard -> its batches so far
        self.filled: dict[int, int] = {}
        self.pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="kdcache-write")
        self.writing: list[Future[None]] = []
        self.thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True) if background else None
        self.closed = False  # the thread told to end (its last item queued)

    def __enter__(self) -> ShardWriter:
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        """Every shard write under way ends before the writer does, so before extract releases the store's lock and says
        what is done. An exception raised while it waits (a second Ctrl-C or SIGTERM, torch's SIGCHLD handler reporting a
        DataLoader worker that died) is raised once they have ended: it cut the wait short, and a write landed after extract
        had raised (a shard marked done after the rerun, or an --overwrite of the store by then, had begun)."""
        interrupted: BaseException | None = None
        while True:
            try:
                self._finish()
                break
            except BaseException as e:  # noqa: BLE001 - raised below, once the writes have ended
                interrupted = interrupted or e
        if interrupted is not None:
            raise interrupted
        if self.error is not None and exc[0] is None:
            raise self.error

    def _finish(self) -> None:
        if self.thread is not None:
            if not self.closed:
                self.queue.put(None)
                self.closed = True
            self.thread.join()
        self._reap(keep=0)
        self.pool.shutdown()

    def put(self, batch: dict[str, Any], host: dict[str, torch.Tensor], event: Any) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:
            self._absorb(batch, host, event)
        else:
            self.queue.put((batch, host, event))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._absorb(*item)
                except BaseException as e:  # handed to the main thread at its next put / exit
                    self.error = e

    def _absorb(self, batch: dict[str, Any], host: dict[str, torch.Tensor], event: Any) -> None:
        if event is not None:
            event.synchronize()
        rows = batch["index"]
        shard = int(rows[0]) // self.store.rows_per_shard
        start, stop = self.store.shard_rows(shard)
        columns = {layout.INDEX: rows, layout.FINGERPRINT: batch["fingerprint"], layout.LABEL: batch["label"]}
        _check_finite(host, self.targets, int(rows[0]), int(rows[-1]))
        piece: dict[str, np.ndarray] = {}  # this batch's rows of every array: kept, not copied, until the shard is written
        for path in self.store.paths():
            piece[path] = columns[path] if path in columns else host[path].numpy()
        self.shards.setdefault(shard, []).append((int(rows[0]) - start, piece))
        self.filled[shard] = self.filled.get(shard, 0) + len(rows)
        if self.filled[shard] == stop - start:
            del self.filled[shard]
            arrays = _joined(self.shards.pop(shard), stop - start)
            self._reap(keep=WRITE_THREADS - 1)
            if self.error is not None:
                raise self.error
            self.writing.append(self.pool.submit(self.store.write_shard, shard, arrays))
        self.bar.update(len(rows), sum(piece[p].nbytes for p in piece if p not in columns))

    def _reap(self, keep: int) -> None:
        """Wait until at most ``keep`` shard writes are in flight; a failed write becomes ``self.error`` (handed to the main
        thread at its next put / exit). An exception raised while it waits (a Ctrl-C) is raised, the write it waited for kept
        to be waited for again: it was taken for the write's error, and that write no longer waited for."""
        while len(self.writing) > keep:
            wait(self.writing[:1])
            if (error := self.writing.pop(0).exception()) is not None:
                self.error = self.error or error


def _joined(pieces: list[tuple[int, dict[str, np.ndarray]]], rows: int) -> dict[str, list[np.ndarray]]:
    """A complete shard's batches, ``(first row in the shard, arrays)`` each, as one list of pieces per array in
    row order; the batches must tile the shard's rows exactly (each row once, none missing)."""
    pieces = sorted(pieces, key=lambda entry: entry[0])
    at = 0
    for lo, piece in pieces:
        n = len(piece[layout.INDEX])
        if lo != at or not all(len(a) == n for a in piece.values()):
            raise RuntimeError(f"internal error: a shard's batches do not tile its {rows} rows (batch at row {lo}, expected {at})")
        at += n
    if at != rows:
        raise RuntimeError(f"internal error: a shard's batches cover {at} of its {rows} rows")
    return {path: [piece[path] for _, piece in pieces] for path in pieces[0][1]}


UNWRITTEN = "(nothing was written for this shard)"  # how a refused batch's error ends in a run


def _check_finite(host: dict[str, torch.Tensor], targets: dict[str, layout.Target], first: int, last: int) -> None:
    """Refuse a batch (dataset rows ``first..last``) whose targets hold NaN or inf, float16 overflow included: a target's
    values are looked at only where their float32 sum (``to_host``'s ``path#sum``) is not finite, which a non-finite
    value makes it, and an overflow of the sum alone too. An inf is raised as ``StoredInf``, which its catcher turns
    into the cause (``StoredInf.explained``): only the converted values reach the host."""
    for path, target in targets.items():
        if not math.isfinite(host[path + "#sum"].item()) and not torch.isfinite(host[path]).all():
            if host[path].isnan().any():
                raise TargetError(f"the teacher produced NaN in {_where(target, first, last)}; check the model and its inputs "
                                  f"{UNWRITTEN}")
            raise StoredInf(target, first, last)


def _where(target: layout.Target, first: int, last: int) -> str:
    return f"target {target.name!r} (rows {first}..{last})"


class StoredInf(TargetError):
    """A target of dataset rows ``first..last`` holds inf once converted to ``targets.dtype``: the teacher produced inf,
    or a finite value beyond that dtype's range (a float64 output of 1e300 stored as float32, 1e5 as float16). The
    host holds the converted values only, so which one is told by running the batch through the teacher again, once
    found (``explained``): no cost while values are finite. Its own text, where that cannot tell, names both."""

    def __init__(self, target: layout.Target, first: int, last: int):
        self.target, self.first, self.last = target, first, last
        biggest = torch.finfo(DTYPES[target.dtype]).max
        super().__init__(f"{_where(target, first, last)} holds inf once stored as {target.dtype}: the teacher produced inf, or finite "
                         f"values beyond the {target.dtype} range (±{biggest:.6g}); check the model and its inputs, or "
                         f"{_fix(target.dtype, 0.0)} {UNWRITTEN}")

    def __reduce__(self) -> Any:  # pickled as it was made (a dask worker's error)
        return StoredInf, (self.target, self.first, self.last)

    def explained(self, run: Run) -> TargetError:
        """The error naming the cause: the batch's rows through the teacher again, this target's values before conversion."""
        t = self.target
        try:
            batch, output, hooked = run.forward(list(range(self.first, self.last + 1)), [t.source] if t.source else [])
            values = run.target(t, output, hooked, run.padding(batch))
        except Exception:  # noqa: BLE001 - the teacher does not run again as it did: this error's own text stands
            return self
        where = _where(t, self.first, self.last)
        if not torch.isfinite(values).all():
            if not t.source and not (values == math.inf).any():  # logits: a class masked with -inf
                return TargetError(f"the teacher produced -inf in {where}: a class masked with -inf (probability zero) cannot be "
                                   "stored; give it a large finite negative instead, e.g. logits.masked_fill(mask, -1e4) in the "
                                   f"model's forward (softmax still gives it 0), or check the model and its inputs {UNWRITTEN}")
            autocast = (f"; under extract.precision = \"fp16\" its float16 activations overflow at ±{FLOAT16_MAX:g}: "
                        "\"bf16\" or \"fp32\" avoids that" if run.precision == "fp16" else "")
            return TargetError(f"the teacher produced inf in {where}; check the model and its inputs{autocast} "
                               f"{UNWRITTEN}")
        if torch.isfinite(values.to(DTYPES[t.dtype])).all():  # another value than the run saw: not known which
            return self
        biggest, limit = float(values.abs().max()), torch.finfo(DTYPES[t.dtype]).max
        return TargetError(f"{where} has values beyond the {t.dtype} range (±{limit:.6g}) of targets.dtype: the "
                           f"teacher's {str(values.dtype).removeprefix('torch.')} output is finite but reaches ±{biggest:.3g}; "
                           f"{_fix(t.dtype, biggest)} {UNWRITTEN}")


def _fix(dtype: str, biggest: float) -> str:
    """What stores finite values up to ±``biggest`` that overflow ``dtype``."""
    if dtype == "float16" and biggest <= torch.finfo(torch.float32).max:
        return 'set targets.dtype = "float32"'
    return "scale them into range in the model (kdcache stores float16 or float32 targets)"
