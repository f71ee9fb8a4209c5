"""``kdcache stats``: what the teacher's stored outputs say, computed with dask over the store.

Each done shard's columns read whole (one request each from object storage, as training reads them, a shard's at
once with the next shard's) and checked against their digests, its sums added to its block's: ``BLOCKS`` dask tasks
share the shards, reduced in parallel. Memory stays bounded by a shard per worker (two from object storage), and the
graph by ``BLOCKS`` tasks, whatever the store's size.

- teacher top-1 accuracy against the stored labels, and per true class (the agreement of the
  teacher with each class);
- mean entropy (nats) of softmax(logits) over the last axis (per-token logits: over every stored position, padding
  included; top-k logits, ``targets.topk``: over the K stored values, renormalised, which leaves out the mass of the
  other classes and so reads lower than the full distribution's);
- per layer target: mean and standard deviation of every stored value.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

from kdcache import store as layout
from kdcache.errors import count, need

MAX_CLASSES = 100_000  # per-class accuracy is skipped beyond this many distinct label values
BLOCKS = 64  # dask tasks a run's shards are shared among, whatever their number
SHOWN_CLASSES = 50  # classes the text form lists (the JSON form: all)


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
    need("dask", "dask", "kdcache stats")
    import dask

    store = layout.open_store(location, storage_options=storage_options)
    store.replaced_when = ("while kdcache stats read it", "stats began")  # a read failing as damage looks for that first
    done = [int(s) for s in np.flatnonzero(store.done_snapshot())]  # the markers the reads check rows against: read once for both
    rows = sum(store.shard_rows(s)[1] - store.shard_rows(s)[0] for s in done)
    what = _What.of(store)
    with dask.config.set(scheduler=scheduler, **({"num_workers": num_workers} if num_workers is not None else {})):
        sums = dask.compute(_lazy_sums(store, what, done))[0] if rows else None
    values, per_class = _values(sums, what) if sums else ({}, None)
    return _summary(location, store, done, rows, values, per_class)


def _lazy_sums(store: layout.Store, what: _What, done: list[int]) -> Any:
    """``_Sums`` of the columns ``what`` over the ``done`` shards as one dask value: ``BLOCKS`` tasks at most, each adding
    up its share of the shards one shard at a time, and their sums added. The graph does not grow with the store (a dask
    block per shard held ~60 KB of graph each, 504 MB at 8,000 shards), nor does what a task holds (one shard of each
    column read)."""
    import dask

    blocks = [dask.delayed(_block_sums, pure=False)(store, what, block.tolist())
              for block in np.array_split(np.asarray(done, dtype=np.int64), min(BLOCKS, len(done)))]
    return dask.delayed(_added, pure=False)(blocks)


class _What(NamedTuple):
    """The columns ``stats`` reads: the logits with a class axis (None: none), their top-k classes, the labels the
    accuracy is against (logits ``[N, classes]`` only), and each layer target's (name, path)."""

    logits: str | None
    classes: str | None
    labels: str | None
    layers: tuple[tuple[str, str], ...]

    @staticmethod
    def of(store: layout.Store) -> _What:
        t = _logits(store)
        logits = t.path if t is not None and t.shape else None  # a regression's one value per sample has no classes
        return _What(logits, layout.LOGITS_INDICES if logits and t.topk else None,
                     layout.LABEL if logits and store.has_labels and len(t.shape) == 1 else None,
                     tuple((t.name, t.path) for t in store.targets.values() if t.source))


class _Sums(NamedTuple):
    """What ``stats`` adds up over shards: the entropies and their count; the teacher's hits, labelled rows, largest
    label and per class (labelled rows, hits: None past ``MAX_CLASSES``); per layer (values, mean, squared deviations
    from it), added as Chan et al.'s parallel variance. Fields of absent columns are 0 / empty."""

    entropy: float
    positions: int
    hits: float
    labelled: int
    label_max: int
    per_class: tuple[np.ndarray, np.ndarray] | None
    layers: dict[str, tuple[int, float, float]]


def _block_sums(store: layout.Store, what: _What, shards: list[int]) -> _Sums:
    """``_Sums`` of the ``shards``, one at a time (each column read whole, checked against its digest: a damaged shard
    is an error naming it, never zeros)."""
    return _added([_shard_sums(what, columns) for columns in _shards_read(store, what, shards)])  # one shard's sums held each


def _shards_read(store: layout.Store, what: _What, shards: list[int]) -> Iterator[dict[str, np.ndarray]]:
    """Each of the ``shards``' columns ``what`` by path, in turn. From object storage or http each column is a request of
    its own, a shard's asked for with the next shard's while this one's sums are added (``Store.read_ahead``): the
    network's latency overlapped, not paid per column and shard (two shards held, fewer where they are large)."""
    paths = [p for p in (what.logits, what.labels, what.classes, *(path for _, path in what.layers)) if p]
    reads = store.read_ahead([(p, shard) for shard in shards for p in paths], most=2 * len(paths) - 1)
    for _ in shards:
        yield {p: next(reads).result() for p in paths}


def _shard_sums(what: _What, columns: dict[str, np.ndarray]) -> _Sums:
    entropy, positions, hits, labelled, label_max, per_class = 0.0, 0, 0.0, 0, -(2**63), None
    if what.logits:
        x = columns[what.logits].astype(np.float64)
        shifted = x - x.max(axis=-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        each = -(np.exp(log_p) * log_p).sum(axis=-1)
        entropy, positions = float(each.sum()), each.size
    if what.labels:
        labels = columns[what.labels].astype(np.int64)
        classes = columns[what.classes] if what.classes else None
        # 1/k where the label is one of k classes tied at the top (float16 ties), as train's eval_teacher_accuracy
        correct, known = _top1_correct(x, labels[:, None], classes), labels >= 0  # below 0: no label (STL-10's -1), left out
        hits, labelled, label_max = float(correct.sum()), int(known.sum()), int(labels.max())
        if label_max < MAX_CLASSES:  # bincount: bounded by the number of classes
            at = np.where(known, labels, 0)
            per_class = (np.bincount(at, weights=known.astype(np.float64)), np.bincount(at, weights=correct))
    layers = {}
    for name, path in what.layers:
        v = columns[path].astype(np.float64)
        mean = float(v.mean())  # a done shard has rows, a target values (store._check_target: sizes of at least 1)
        layers[name] = (v.size, mean, float(((v - mean) ** 2).sum()))
    return _Sums(entropy, positions, hits, labelled, label_max, per_class, layers)


def _added(parts: list[_Sums]) -> _Sums:
    """The ``_Sums`` of ``parts`` together (at least one)."""
    out = parts[0]
    for p in parts[1:]:
        out = _Sums(out.entropy + p.entropy, out.positions + p.positions, out.hits + p.hits, out.labelled + p.labelled,
                   max(out.label_max, p.label_max), _classes_added(out.per_class, p.per_class),
                   {name: _moments_added(m, p.layers[name]) for name, m in out.layers.items()})
    return out


def _classes_added(a: tuple[np.ndarray, np.ndarray] | None, b: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
    if a is None or b is None:
        return None
    k = max(len(a[0]), len(b[0]))
    return tuple(np.pad(x, (0, k - len(x))) + np.pad(y, (0, k - len(y))) for x, y in zip(a, b))  # type: ignore[return-value]


def _moments_added(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Two parts' (count, mean, sum of squared deviations from the mean) as one's (Chan, Golub and LeVeque)."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * nb / n, sa + sb + delta * delta * na * nb / n


def _values(s: _Sums, what: _What) -> tuple[dict[str, Any], dict[str, dict[str, Any]] | None]:
    """``_summary``'s figures by name from the sums over the done shards (some rows) of the columns ``what``, and the
    per-class accuracies (None: no labelled rows, or a label of ``MAX_CLASSES`` or more)."""
    values: dict[str, Any] = {}
    if what.logits:
        values["entropy"] = s.entropy / s.positions
    if what.labels:
        values.update(hits=s.hits, labelled=s.labelled, label_max=s.label_max)
    for name, (n, mean, squares) in s.layers.items():
        values[f"mean:{name}"], values[f"std:{name}"] = mean, float(np.sqrt(squares / n))
    per_class = None
    if s.labelled and s.label_max < MAX_CLASSES and s.per_class is not None:
        counts, hits = s.per_class
        per_class = {str(c): {"count": int(counts[c]), "accuracy": float(hits[c] / counts[c])} for c in range(s.label_max + 1) if counts[c]}
    return values, per_class


def _summary(location: str, store: layout.Store, done: list[int], rows: int, values: dict[str, Any],
             per_class: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """``stats``'s result, from the computed ``values``."""
    stored = _logits(store)
    logits = stored if "entropy" in values else None  # the entropy's: there are logits with a class axis
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
        # the manifest's, per row: [classes] ([K]: top-k), per-token [T, classes] (T = 1 too: no one class per row), []
        "logits_shape": [int(n) for n in stored.shape] if stored is not None else None,
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
    else:  # why there is none ("n/a against stored labels" said it of a store that holds none)
        why = ("no done shards" if not s["rows"] else "no logits with a class axis" if s.get("mean_entropy") is None else
               "per-token logits: no one class per row" if len(s.get("logits_shape") or ()) > 1 else  # [N, 1, C] too
               "the store holds no labels")
        teacher = f"top-1 accuracy n/a ({why})"
    lines = [
        f"store       {s['location']}  ({count(s['rows'], 'row')} in {s['shards_done']}/{count(s['num_shards'], 'done shard')})",
        f"teacher     {teacher}",
        _entropy_line(s),
    ]
    if s["per_class"] is None and s["teacher_accuracy"] is not None:  # labeled rows, but a label past MAX_CLASSES
        lines.append(f"per class   n/a: a label reaches {MAX_CLASSES:,} or more, and that many classes are not counted one by one")
    if s["per_class"]:
        classes = list(s["per_class"].items())
        more = f"  ... and {len(classes) - SHOWN_CLASSES} more classes (--json lists every one)" if len(classes) > SHOWN_CLASSES else ""
        lines.append("per class   " + "  ".join(f"{c}: {pct(v['accuracy'])} (n={v['count']})" for c, v in classes[:SHOWN_CLASSES]) + more)
    for name, v in s["layers"].items():
        lines.append(f"layer       {name:<24} mean {v['mean']:.4g}  std {v['std']:.4g}")
    return "\n".join(layout.printable(line) for line in lines)
