"""``kdcache stats``: what the teacher's stored outputs say, computed with dask over the store.

One dask block per done shard, read whole (one request from object storage, as training reads it) and
checked against its digest; reduced in parallel, memory stays bounded by a few shards per worker
whatever the store's size.

- teacher top-1 accuracy against the stored labels, and per true class (the agreement of the
  teacher with each class);
- mean entropy (nats) of softmax(logits) over the last axis (per-token logits: over every stored position, padding
  included; top-k logits, ``targets.topk``: over the K stored values, renormalised, which leaves out the mass of the
  other classes and so reads lower than the full distribution's);
- per layer target: mean and standard deviation of every stored value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache import store as layout
from kdcache.errors import count, need

MAX_CLASSES = 100_000  # per-class accuracy is skipped beyond this many distinct label values
SHOWN_CLASSES = 50  # classes the text form lists (the JSON form: all)


class _Checked:
    """One array of a store as dask reads it, block by block, through ``Store.read``: a damaged shard is
    an error naming it, never zeros."""

    def __init__(self, store: layout.Store, path: str):
        arr = store.checked_array(path)  # its shape and dtype are the manifest's
        self.store, self.path, self.shape, self.dtype, self.ndim = store, path, arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        start, stop, _ = key[0].indices(self.shape[0])
        return self.store.read(self.path, start, stop)[(slice(None), *key[1:])]


def _top1_correct(logits: np.ndarray, labels: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
    """One block's (rows, classes) logits and (rows, 1) labels -> (rows,) float64: ``losses.top1_correct``'s rule (1/k where
    the label is one of the k classes tied at the top, else 0; a label outside the classes 0) in numpy: reading a store
    never imports torch (the CLI's reading commands start in a fraction of a second). Top-k logits: ``logits`` are the
    (rows, K) stored values, ``classes`` their classes: the label is looked for among the stored classes tied at the top."""
    top, labels = logits == logits.max(axis=-1, keepdims=True), labels[:, 0].astype(np.int64)
    if classes is not None:
        return (top & (classes == labels[:, None])).any(axis=-1) / np.maximum(top.sum(axis=-1), 1)
    inside = (labels >= 0) & (labels < logits.shape[-1])
    hit = np.take_along_axis(top, np.where(inside, labels, 0)[:, None], axis=-1)[:, 0] & inside
    return hit / np.maximum(top.sum(axis=-1), 1)


def stats(location: str, *, storage_options: dict[str, Any] | None = None, scheduler: str = "threads",
          num_workers: int | None = None) -> dict[str, Any]:
    """Statistics over the done shards of the store at ``location`` (``scheduler``: a dask scheduler name)."""
    need("dask.array", "dask", "kdcache stats")
    import dask

    store = layout.open_store(location, storage_options=storage_options)
    done = [int(s) for s in np.flatnonzero(store.done())]
    rows = sum(store.shard_rows(s)[1] - store.shard_rows(s)[0] for s in done)
    lazy = _lazy_figures(store, done, rows)
    with dask.config.set(scheduler=scheduler, **({"num_workers": num_workers} if num_workers is not None else {})):
        correct, labels, known = (lazy.pop(k, None) for k in ("_correct", "_labels", "_known"))
        values = dict(zip(lazy, dask.compute(*lazy.values()))) if lazy else {}
        per_class = _per_class(values, correct, labels, known) if correct is not None else None
    return _summary(location, store, done, rows, values, per_class)


def _column(store: layout.Store, done: list[int], path: str) -> Any:
    """The array at ``path`` over the ``done`` shards, as a dask array of one block per shard."""
    import dask.array as da

    arr = store.checked_array(path)
    # a block per shard: one whole-object read each (kdcache's direct reader, one request from object storage),
    # checked against the shard's digest; name=False: a random dask name, nothing of the store hashed
    full = da.from_array(_Checked(store, path), chunks=(store.rows_per_shard, *arr.shape[1:]), name=False)
    if len(done) == store.num_shards:
        return full
    return da.concatenate([full[slice(*store.shard_rows(s))] for s in done]) if done else full[:0]


def _lazy_figures(store: layout.Store, done: list[int], rows: int) -> dict[str, Any]:
    """What ``stats`` computes, as dask values by name: the logits' entropy and the teacher's accuracy, each layer's
    mean and std (``_correct``, ``_labels``, ``_known``: the per-class figures' inputs, for ``_per_class``)."""
    lazy: dict[str, Any] = {}
    labels = _column(store, done, layout.LABEL) if store.has_labels else None
    logits_target = _logits(store)
    if logits_target is not None and rows and logits_target.shape:  # a regression's one value per sample has no classes
        x = _column(store, done, logits_target.path).astype(np.float64)
        classes = _column(store, done, layout.LOGITS_INDICES) if logits_target.topk else None  # top-k: the values' classes
        lazy.update(_logits_figures(x, labels if len(logits_target.shape) == 1 else None, classes))  # [N, classes] against [N] labels
    for t in store.targets.values():
        if t.source and rows:
            v = _column(store, done, t.path).astype(np.float64)
            lazy[f"mean:{t.name}"], lazy[f"std:{t.name}"] = v.mean(), v.std()
    return lazy


def _logits_figures(x: Any, labels: Any, classes: Any = None) -> dict[str, Any]:
    """The mean entropy of (rows, classes) float64 logits ``x``, and with (rows,) ``labels`` (None: none) the teacher's
    hits and labelled rows, as dask values by name (``classes``: top-k logits' classes, ``x`` their values)."""
    import dask.array as da

    shifted = x - x.max(axis=-1, keepdims=True)
    log_p = shifted - da.log(da.exp(shifted).sum(axis=-1, keepdims=True))
    lazy = {"entropy": (-(da.exp(log_p) * log_p).sum(axis=-1)).mean()}
    if labels is not None:
        known = labels >= 0  # below 0: no label (STL-10's unlabeled rows, -1; -100), left out of the accuracies
        # 1/k where the label is one of k classes tied at the top (float16 ties), as train's eval_teacher_accuracy
        blocks = (x, labels[:, None]) + (() if classes is None else (classes,))
        correct = da.map_blocks(_top1_correct, *blocks, drop_axis=1, dtype=np.float64)
        lazy["hits"], lazy["labelled"], lazy["label_max"] = correct.sum(), known.sum(), labels.max()
        lazy["_correct"], lazy["_labels"], lazy["_known"] = correct, da.where(known, labels, 0), known
    return lazy


def _per_class(values: dict[str, Any], correct: Any, labels: Any, known: Any) -> dict[str, dict[str, Any]] | None:
    """Per true class, its labelled rows and the teacher's accuracy on them (None: no labelled rows, or a label of
    ``MAX_CLASSES`` or more); ``correct``, ``labels``, ``known``: ``_logits_figures``'s."""
    import dask
    import dask.array as da

    if not values["labelled"] or int(values["label_max"]) >= MAX_CLASSES:
        return None
    k = int(values["label_max"]) + 1  # bincount over chunks: bounded by the number of classes
    counts, hits = dask.compute(da.bincount(labels, weights=known.astype(np.float64), minlength=k),
                                da.bincount(labels, weights=correct, minlength=k))
    return {str(c): {"count": int(counts[c]), "accuracy": float(hits[c] / counts[c])} for c in range(k) if counts[c]}


def _summary(location: str, store: layout.Store, done: list[int], rows: int, values: dict[str, Any],
             per_class: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """``stats``'s result, from the computed ``values``."""
    logits = _logits(store) if "entropy" in values else None  # the entropy's: there are logits with a class axis
    return {
        "location": location,
        "rows": int(rows),
        "shards_done": len(done),
        "num_shards": store.num_shards,
        "teacher_accuracy": float(values["hits"]) / int(values["labelled"]) if values.get("labelled") else None,
        "labeled_rows": int(values["labelled"]) if "labelled" in values else None,  # the rows teacher_accuracy is over
        "mean_entropy": float(values["entropy"]) if "entropy" in values else None,
        "entropy_positions": _positions(logits, rows) if logits else None,  # the distributions it averages
        # top-k logits: the entropy is over the K stored values' softmax (renormalised over them), not every class's
        "entropy_topk": (logits.topk or None) if logits else None,
        "per_class": per_class,
        "layers": {t.name: {"path": t.path, "mean": float(values[f"mean:{t.name}"]), "std": float(values[f"std:{t.name}"])}
                   for t in store.targets.values() if t.source and f"mean:{t.name}" in values},
    }


def _logits(store: layout.Store) -> layout.Target | None:
    """The store's target of the model's output (None: it stores none)."""
    return next((t for t in store.targets.values() if t.source == ""), None)


def _positions(logits: layout.Target, rows: int) -> int:
    """How many softmax distributions the mean entropy averages: one per row of ``[N, classes]`` logits, one per stored
    position of per-token ``[N, T, classes]`` ones (their padding included: a store keeps no mask for unpooled targets)."""
    return rows * int(np.prod(logits.shape[:-1], dtype=np.int64))


def _entropy_line(s: dict[str, Any]) -> str:
    if s["mean_entropy"] is None:
        return "entropy     n/a (no done shards)" if not s["rows"] else "entropy     n/a (no logits with a class axis)"
    positions = s.get("entropy_positions") or s["rows"]
    over = (f" over {positions:,} positions of per-token logits (every stored position: padding included, a store keeps no "
            "mask for them)") if positions != s["rows"] else ""
    topk = (f" over the top {s['entropy_topk']} stored logits, renormalised (the other classes' mass left out: lower than the "
            "full distribution's)") if s.get("entropy_topk") else ""
    return f"entropy     mean {s['mean_entropy']:.4f} nats of softmax(logits){topk}{over}"


def stats_text(s: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    labeled = s.get("labeled_rows")
    if s["teacher_accuracy"] is not None and labeled is not None:
        left_out = f" (of {s['rows']:,}: rows labeled below 0 are left out)" if labeled < s["rows"] else ""
        teacher = f"top-1 accuracy {pct(s['teacher_accuracy'])} against {labeled:,} labeled rows{left_out}"
    elif labeled == 0:
        teacher = f"top-1 accuracy n/a: none of the {s['rows']:,} rows has a label (every stored label is below 0)"
    else:
        teacher = f"top-1 accuracy {pct(s['teacher_accuracy'])} against stored labels"
    lines = [
        f"store       {s['location']}  ({count(s['rows'], 'row')} in {s['shards_done']}/{count(s['num_shards'], 'done shard')})",
        f"teacher     {teacher}",
        _entropy_line(s),
    ]
    if s["per_class"]:
        classes = list(s["per_class"].items())
        more = f"  ... and {len(classes) - SHOWN_CLASSES} more classes (--json lists every one)" if len(classes) > SHOWN_CLASSES else ""
        lines.append("per class   " + "  ".join(f"{c}: {pct(v['accuracy'])} (n={v['count']})" for c, v in classes[:SHOWN_CLASSES]) + more)
    for name, v in s["layers"].items():
        lines.append(f"layer       {name:<24} mean {v['mean']:.4g}  std {v['std']:.4g}")
    return "\n".join(layout.printable(line) for line in lines)
