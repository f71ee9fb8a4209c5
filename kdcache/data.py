"""The dataset stage: what an item is, how an input is fingerprinted, and shard-aligned batches.

Both ``extract`` and ``train`` see the dataset through ``Indexed``, so the fingerprint a store
records for row ``r`` and the one training recomputes for dataset index ``r`` come from the same
code. Hashing runs in DataLoader workers, in parallel with the model.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import queue
import signal
import struct
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, default_collate
from torch.utils.data import _utils as loader_utils

from kdcache import errors, losses, store as layout, threads
from kdcache.errors import (DataError, DeviceMemoryError, KdcacheError, ModelError, ModelTooLargeError, PipelineError, ShapeMismatchError,
                            StoreError, raised, short)

LABEL_KEYS = ("label", "labels")
NO_LABEL = "an item without a label may give -1: a label below 0 is no label"
FINGERPRINT_ALGORITHM = "blake2b-64-v2"  # what a new store records (FORMAT.md §9)
V1 = "blake2b-64"  # kdcache <= 0.1.6's: numbers and strings fed by repr() without framing, so (1, 23) and (12, 3) were one input
FINGERPRINT_ALGORITHMS = {  # what kdcache computes, to check a store made by either, and its manifest's fingerprint.of
    FINGERPRINT_ALGORITHM: "the input as the teacher saw it: each tensor's dtype, shape and bytes, numbers as their tensors, "
                           "strings, lists and mappings framed by their length",
    V1: "dtype, shape and bytes of each input tensor as the teacher saw it",
}


def known_algorithm(manifest: dict[str, Any]) -> str | None:
    """The algorithm a store's fingerprints were made with, where this kdcache computes it (FORMAT.md §9); else None."""
    seen = layout.fingerprint_algorithm(manifest)
    return seen if isinstance(seen, str) and seen in FINGERPRINT_ALGORITHMS else None


def check_algorithm(manifest: dict[str, Any], location: str) -> str:
    """``known_algorithm``, refused where there is none: the store's fingerprints could not be checked."""
    known = known_algorithm(manifest)
    if known is None:
        raise StoreError(f"{location!r} records input fingerprints made with {layout.fingerprint_algorithm(manifest)!r}, but this "
                         f"kdcache computes {' or '.join(map(repr, FINGERPRINT_ALGORITHMS))} and could not check them; use the "
                         "kdcache that wrote the store, or re-extract it")
    return known


def v1_blind_spot(inputs: Any) -> str | None:
    """What in ``inputs`` ``blake2b-64`` (FORMAT.md §9.1) cannot frame, so that another input of the same structure may
    feed it the same stream: numbers or strings (fed as bare repr()), or lists in a list (fed without their lengths).
    None for tensors, arrays and mappings and lists of them."""
    if isinstance(inputs, torch.Tensor | np.ndarray):
        return None
    if isinstance(inputs, Mapping):
        return next(filter(None, map(v1_blind_spot, inputs.values())), None)
    if isinstance(inputs, tuple | list):
        if any(isinstance(v, tuple | list) for v in inputs):
            return "lists in a list"
        return next(filter(None, map(v1_blind_spot, inputs)), None)
    return f"{type(inputs).__name__} values"


def split_item(item: Any, index: int | None = None) -> tuple[Any, int | None]:
    """An item is a tensor, an ``(input, label, ...)`` tuple, or a dict of tensors.

    A dict's ``label``/``labels`` entry is the label and is not passed to the model.
    Returns ``(inputs, label or None)``. ``index``: the dataset index the item was read at, which an error names.
    """
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, tuple | list):
        if not item:
            raise PipelineError(f"{_item(index)} is an empty tuple; return a tensor, (input, label) or a dict of tensors")
        if len(item) > 2 and all(_is_number(v) for v in item):  # token ids, a row of features: not (input, label, ...)
            raise PipelineError(
                f"{_item(index)} is a {type(item).__name__} of {len(item)} numbers ({short(list(item))}): kdcache reads a tuple or list "
                "item as (input, label, ...), which would give the teacher its first number alone and take the second as the label; "
                "return the values as one tensor (token ids: torch.tensor(ids)), as (tensor, label), or as a dict of tensors")
        return item[0], (_label(item[1], None, index) if len(item) > 1 else None)
    if isinstance(item, Mapping):
        inputs = {k: v for k, v in item.items() if k not in LABEL_KEYS}
        key = next((k for k in LABEL_KEYS if k in item), None)
        return inputs, (_label(item[key], key, index) if key is not None and item[key] is not None else None)
    raise PipelineError(
        f"{_item(index)} of type {type(item).__name__} is not supported; return a tensor, (input, label) or a dict of tensors"
    )


def _item(index: int | None) -> str:
    return "dataset item" if index is None else f"dataset item {index}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def inputs_of(item: Any, index: int | None = None) -> Any:
    """``split_item(item)[0]`` without parsing the label: the per-item hot path of training,
    whose labels come from the store."""
    if isinstance(item, torch.Tensor):
        return item
    if type(item) is tuple and 0 < len(item) <= 2:
        return item[0]
    return split_item(item, index)[0]


def _label(value: Any, key: str | None = None, index: int | None = None) -> int:
    """An item's label as an int, else a PipelineError; ``key``: the dict entry it came from (``label``/``labels``);
    ``index``: the dataset index of the item."""
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    if key is not None:  # per-token labels (a causal language model's copy of input_ids), a one-hot vector: not a class index
        raise PipelineError(
            f"{_item(index)}'s {key!r} entry ({_shown(value)}) is not an integer class index: kdcache takes an item's 'label' or 'labels' "
            "entry as its one class label and passes the other entries to the model; leave the entry out of the item (to distil a "
            "language model it is not needed), or make it one int per item"
        )
    raise PipelineError(
        f"{_item(index)}'s label {_shown(value)} is not an integer class index; return (input, int label) or only the input"
    )


def _shown(value: Any) -> str:
    """A value in a message, on one line: a tensor, array or list by its type and shape (a 2-D tensor's repr has several
    lines), anything else by its repr, cut short."""
    return describe(value) if isinstance(value, torch.Tensor | np.ndarray | tuple | list | Mapping) else short(value)


def fingerprint(inputs: Any, algorithm: str = FINGERPRINT_ALGORITHM) -> int:
    """BLAKE2b-64 of the input exactly as the teacher sees it: dtype, shape and bytes of each tensor (FORMAT.md §9).

    Every part is framed: a dict by its size, in sorted key order with its keys; a list by its length; a number as the
    0-d tensor torch batches it as; a string by its length. ``algorithm``: one of ``FINGERPRINT_ALGORITHMS`` (a
    store's, to check it). Returned as an unsigned 64-bit int.
    """
    h = hashlib.blake2b(digest_size=8)
    _feed(h, inputs, algorithm == V1)
    return int.from_bytes(h.digest(), "little")


def fingerprint_rows(batch: Any, rows: Any) -> list[int] | None:
    """``fingerprint(batch[i])`` for each ``i`` in ``rows`` of a stacked batch tensor, without per-item tensor work.

    Equal to fingerprinting each item as it was before stacking (same dtype, shape and bytes), by either algorithm
    (they feed a tensor alike); None when ``batch`` is not a tensor (dicts and tuples go item by item through ``fingerprint``).
    """
    if not isinstance(batch, torch.Tensor) or batch.ndim == 0:
        return None
    t = batch.detach().cpu().contiguous()
    prefix = f"{t.dtype}{tuple(t.shape[1:])}".encode()
    raw = t.reshape(len(t), -1).view(torch.uint8).numpy() if t.numel() else np.zeros((len(t), 0), np.uint8)
    digests = _hash_map(lambda i: _digest(prefix, raw[i]), list(rows), raw.shape[1])
    return [int.from_bytes(d, "little") for d in digests]


def fingerprints(inputs: list[Any], algorithm: str = FINGERPRINT_ALGORITHM) -> list[int]:
    """``fingerprint`` of each input; large tensors are hashed on several cores."""
    first = inputs[0] if inputs else None
    return _hash_map(lambda x: fingerprint(x, algorithm), inputs, first.nbytes if isinstance(first, torch.Tensor) else 0)


def _hash_map(fn: Any, items: list[Any], item_bytes: int) -> list[Any]:
    """``[fn(x) for x in items]``; large items are hashed by a thread pool (blake2b releases the GIL),
    one contiguous group of items per thread, so a hand-off is paid per group, not per item."""
    if item_bytes < PARALLEL_ROW_BYTES or len(items) < 2 or HASH_THREADS < 2:
        return [fn(x) for x in items]
    size = -(-len(items) // HASH_THREADS)
    groups = threads.pool("hash", HASH_THREADS).map(lambda group: [fn(x) for x in group], [items[i : i + size] for i in range(0, len(items), size)])
    return [h for group in groups for h in group]


PARALLEL_ROW_BYTES = 16 * 1024  # below this, per-item Python work (holding the GIL) outweighs the hash (~6 us per 3 KB row)
HASH_THREADS = min(8, threads.CORES)


def _digest(prefix: bytes, row: np.ndarray) -> bytes:
    h = hashlib.blake2b(prefix, digest_size=8)
    h.update(row)  # no copy; rows of 2 KB and more are hashed outside the GIL
    return h.digest()


def _feed(h: Any, value: Any, v1: bool) -> None:
    """Append ``value`` to the stream (FORMAT.md §9). Every part is framed — a tensor by its dtype and shape, a list or
    mapping by its length, a string by its byte length, a number as its tensor — so each input of a structure has one
    stream. ``v1`` (§9.1) feeds lists unframed, mapping keys as ``[key]`` and numbers and strings by bare repr()."""
    if isinstance(value, torch.Tensor):
        t = _dense(value, v1).detach().cpu().resolve_conj().resolve_neg().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # reshape: 0-d tensors cannot view as bytes; no copy
    elif isinstance(value, np.ndarray):  # as the tensor of its values in native byte order
        _feed(h, _array_tensor(value, v1), v1)
    elif isinstance(value, Mapping):
        if not v1:
            h.update(f"dict({len(value)},)".encode())
        for key in _sorted_keys(value):
            if v1:
                h.update(f"[{key}]".encode())
            else:
                _feed(h, key, v1)
            _feed(h, value[key], v1)
    elif isinstance(value, tuple | list):
        if not v1:
            h.update(f"list({len(value)},)".encode())  # a tuple too: default_collate batches both as lists
        for v in value:
            number = None if v1 else _number(v)  # a list of token ids: one call per element, not a recursion
            if number is not None:
                h.update(number)
            else:
                _feed(h, v, v1)
    elif v1:
        h.update(repr(value).encode())
    elif (number := _number(value)) is not None:
        h.update(number)
    elif (scalar := _numpy_scalar(value)) is not None:
        _feed(h, scalar, v1)
    else:  # strings and bytes (default_collate passes them through), or what torch cannot batch (None, objects), which stack() names
        kind, raw = ("str", value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else \
            ("bytes", bytes(value)) if isinstance(value, bytes) else (type(value).__name__, repr(value).encode("utf-8", "surrogatepass"))
        h.update(f"{kind}({len(raw)},)".encode())
        h.update(raw)


def _dense(t: torch.Tensor, v1: bool) -> torch.Tensor:
    """A strided tensor, else a PipelineError: a sparse, nested or meta tensor has no plain bytes to fingerprint, and a
    quantized one's bytes are not its values (its scale is elsewhere; ``v1`` hashed those bytes)."""
    if t.layout == torch.strided and not t.is_nested and t.device.type != "meta" and (v1 or not t.is_quantized):
        return t
    kind = "nested" if t.is_nested else "meta" if t.device.type == "meta" else "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")
    raise PipelineError(f"a dataset item holds a {kind} tensor (dtype {str(t.dtype).removeprefix('torch.')}), whose values kdcache cannot "
                        "fingerprint; return dense tensors of values (x.to_dense(), x.dequantize(), or pad nested tensors into one tensor)")


def _array_tensor(value: np.ndarray, v1: bool) -> torch.Tensor:
    """A NumPy array as the tensor of its values in native byte order (a 0-d one 0-d; ``v1``: (1,)), else a PipelineError
    naming a dtype no tensor holds (objects, strings, float128)."""
    native = value.dtype.newbyteorder("=") if value.dtype.kind in "biufc" else value.dtype
    try:
        return torch.from_numpy(np.ascontiguousarray(value, native) if v1 else np.require(value, native, "C"))
    except TypeError:
        raise PipelineError(f"a dataset item holds a numpy array of dtype {value.dtype} (shape {list(value.shape)}), which torch cannot "
                            "batch; make every input a tensor, a number or a numpy array of numbers (e.g. x.astype(np.float32))") from None


def _sorted_keys(mapping: Mapping[Any, Any]) -> list[Any]:
    """A mapping's keys in sorted order (by type name first, a string's "str": keys of several types), else a PipelineError."""
    try:
        return sorted(mapping, key=lambda k: ("str" if isinstance(k, str) else type(k).__name__, k))
    except TypeError:
        raise PipelineError(f"a dataset item holds a dict with keys {short(list(mapping))}, which cannot be put in one order "
                            "to fingerprint; use string keys") from None


def _number(value: Any) -> bytes | None:
    """A Python bool, int or float as the 0-d tensor ``default_collate`` batches it as (bool, int64, float64) feeds:
    its header and bytes, made without a tensor (2 × 512 token ids: 0.25 ms; a tensor per id took 7 ms). A ``numpy.float64``
    is a float, and feeds what the tensor of its dtype would."""
    if isinstance(value, bool):
        return b"torch.bool()\x01" if value else b"torch.bool()\x00"
    if isinstance(value, int):
        return b"torch.int64()" + value.to_bytes(8, "little", signed=True) if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return b"torch.float64()" + struct.pack("<d", value)
    return None


def _numpy_scalar(value: Any) -> torch.Tensor | None:
    """A NumPy scalar as the 0-d tensor of its dtype (``default_collate``'s); None for other values, and for a dtype torch
    has not (float128: not batched either, so framed as "anything else")."""
    if not isinstance(value, np.bool_ | np.number):
        return None
    try:
        return torch.from_numpy(np.asarray(value, value.dtype.newbyteorder("=")))
    except TypeError:
        return None


def getitems(dataset: Dataset, indices: list[int], batched: bool = True) -> list[Any]:
    """Items ``indices`` of a map-style dataset, through its batched ``__getitems__`` when it has one (and ``batched``).

    An exception the dataset raises is a ``DataError`` naming the index (or, batched, the indices), the
    exception and the line that raised it.
    """
    many = getattr(dataset, "__getitems__", None) if batched else None
    items: list[Any] = []
    reader = threading.get_ident()
    _READING.add(reader)
    try:
        if many:
            items = list(many(indices))
            if len(items) != len(indices):  # every item would be paired with another index's row, or with none
                raise PipelineError(f"the dataset's __getitems__ returned {len(items)} items for {len(indices)} indices "
                                    f"({indices[0]}..{indices[-1]}); make it return one item per index, in the order asked")
            return items
        for i in indices:
            items.append(dataset[i])
        return items
    except KdcacheError:
        raise
    except Exception as e:
        at = f"one of indices {indices[0]}..{indices[-1]}" if many and len(indices) > 1 else f"index {indices[len(items)]}"
        raise DataError(f"the dataset raised {raised(e)} reading {at}; fix data.factory's dataset "
                        "(call dataset[i] in Python to see the full traceback), then rerun") from e
    finally:
        _READING.discard(reader)


_READING: set[int] = set()  # the threads inside a dataset's code now (getitems): one stuck there is not waited for at exit


REREADS = 4  # reads of one item after a fingerprint differed: a random augmentation (a flip half the time) shows in them


def item_inputs(dataset: Dataset, index: int) -> Any:
    """The model input of ``dataset[index]``, read alone (as the manifest's probe items are). Hash it before the next
    read: a dataset may return one buffer that each read refills."""
    return split_item(getitems(dataset, [index], batched=False)[0], index)[0]


def item_fingerprint(dataset: Dataset, index: int, algorithm: str) -> int:
    """The fingerprint of ``dataset[index]`` (read alone, as the manifest's probe fingerprints are)."""
    return fingerprint(item_inputs(dataset, index), algorithm)


def reread(dataset: Dataset, index: int, algorithm: str) -> list[int]:
    """The fingerprints of ``REREADS`` reads of ``dataset[index]``: more than one value, and the item is not deterministic."""
    return [item_fingerprint(dataset, index, algorithm) for _ in range(REREADS)]


def not_deterministic(index: int, reads: list[int], then: str) -> str:
    """The message for an item whose ``reads`` (fingerprints) were different inputs."""
    return (f"dataset index {index} gives a different input each time it is read ({len(set(reads))} different fingerprints in {len(reads)} "
            "reads): kdcache pairs each stored target with its input by the input's fingerprint, so items must be deterministic; "
            f"remove random augmentation (random crops, flips, noise) from data.factory's dataset, or seed it by the index, {then}")


def reused_buffer(index: int, last: int, batch_end: bool = True) -> str:
    """The message for items that are one buffer refilled by each read: read in a batch, item ``index`` was the input of
    ``last``, the batch's last item (``batch_end``; else an item read after it) (read alone, it is its own)."""
    which = "the batch's last item" if batch_end else "read after it"
    return (f"dataset index {index}, read in a batch, was the input of index {last}, {which} (alone it is its own): "
            "__getitem__ returns one buffer that it refills for each item (a view of a shared tensor or array), so a batch would "
            "hold the last item read in every place; return a new tensor or array per item (e.g. buffer.clone(), np.array(buffer))")


def load(pipeline: Any, split: str) -> Dataset:
    """``data.factory(split)``, refused unless it is a map-style dataset (``check_dataset``)."""
    dataset = pipeline.call("data.factory", split)
    check_dataset(dataset, f"data.factory {pipeline.data.factory!r}({split!r})")
    return dataset


def check_dataset(dataset: Any, what: str, verb: str = "returned") -> int:
    """The length of a map-style dataset (``__len__`` and ``__getitem__``), else a PipelineError naming what it is:
    ``f"{what} {verb} {kind}"`` (``verb``: "returned" for a factory's, "is" for an argument)."""
    indexable = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    if isinstance(dataset, IterableDataset | Mapping | str | bytes) or not indexable:  # a dict (of splits?) is keyed, not indexed
        kind = "an IterableDataset" if isinstance(dataset, IterableDataset) else type(dataset).__name__
        raise PipelineError(f"{what} {verb} {kind}, not a map-style dataset; return an object with __len__ and "
                            "__getitem__ (e.g. a torch.utils.data.Dataset): kdcache reads items by index")
    try:
        return len(dataset)
    except Exception as e:  # noqa: BLE001 - the user's __len__ (len() itself refuses a negative one)
        raise PipelineError(f"len() of {what}'s dataset raised {raised(e)}; fix its __len__") from e


class Indexed(Dataset):
    """Item ``i`` of the wrapped dataset as ``(i, fingerprint, inputs, label)``: the fingerprint by ``algorithm``,
    or 0 where it is None (training, which checks fingerprints in ``cache``). Read a batch at a time (``__getitems__``,
    which DataLoader's batch_sampler and Subset call in torch >= 2.4), so repeated items are caught within the batch."""

    def __init__(self, dataset: Dataset, algorithm: str | None):
        self.dataset = dataset
        self.algorithm = algorithm

    def __getitems__(self, indices: list[int]) -> list[tuple[int, int, Any, int | None]]:
        split = [split_item(item, i) for i, item in zip(indices, getitems(self.dataset, indices))]
        hashes = fingerprints([inputs for inputs, _ in split], self.algorithm) if self.algorithm else [0] * len(split)
        if self.algorithm and len(set(hashes)) < len(hashes):
            _check_repeats(self.dataset, indices, hashes, self.algorithm)
        return [(i, h, inputs, label) for i, h, (inputs, label) in zip(indices, hashes, split)]


def _check_repeats(dataset: Dataset, indices: list[int], hashes: list[int], algorithm: str) -> None:
    """A batch in which some indices gave one input: real duplicates, or items that are one buffer each read refills (or a
    few, taken in turn), which the batch holds as the last item read into it in every place: then every such row would be
    stored with that item's fingerprint and targets, each consistent with the other, under other indices (and labels).
    The probe batch shows a dataset that does so everywhere; this, one that does so only for some items (a reader behind
    a ``ConcatDataset``). Each repeated input's first index is read alone once: another input means a buffer."""
    last = {h: i for i, h in zip(indices, hashes)}  # the last index read of each input
    checked = set()
    for i, h in zip(indices, hashes):
        if last[h] != i and h not in checked:  # the first of a repeated input's indices
            checked.add(h)
            if item_fingerprint(dataset, i, algorithm) != h:
                raise PipelineError(reused_buffer(i, last[h], batch_end=last[h] == indices[-1]))


def collate(items: list[tuple[int, int, Any, int | None]]) -> dict[str, Any]:
    """Batch of ``Indexed`` items: index int64 [B], fingerprint uint64 [B], inputs, label int64 [B] or None."""
    labels = [it[3] for it in items]
    if any(label is None for label in labels) and not all(label is None for label in labels):
        has, lacks = (next(it[0] for it in items if (it[3] is None) == missing) for missing in (False, True))
        raise PipelineError(f"some dataset items have a label and some do not (index {has} has one, index {lacks} has none); "
                            f"return labels for all items or none ({NO_LABEL})")
    return {
        "index": np.array([it[0] for it in items], dtype=np.int64),
        "fingerprint": np.array([it[1] for it in items], dtype=np.uint64),
        "inputs": stack([it[2] for it in items], [it[0] for it in items]),
        "label": None if labels[0] is None else np.array(labels, dtype=np.int64),
    }


def stack(inputs: list[Any], indices: list[int]) -> Any:
    """``default_collate`` of the items' inputs, as values: a tensor that requires grad (inputs computed by a module outside
    ``torch.no_grad()``) is detached, as the teacher saw it, so the student's backward does not run into the dataset's graph
    (freed after the first step) and a DataLoader worker can batch it (its ``torch.stack(out=...)`` refuses autograd). Items
    that cannot be batched (shapes differ) are a PipelineError naming two, and so are entries torch cannot batch at all
    (``None``, an object or big-endian numpy array)."""
    try:
        try:
            return _detached(default_collate(inputs))
        except RuntimeError:
            if not any(_detached(x) is not x for x in inputs):
                raise
            return default_collate([_detached(x) for x in inputs])
    except (RuntimeError, TypeError, ValueError) as e:
        first = describe(inputs[0])
        other = next(((i, describe(x)) for i, x in zip(indices, inputs) if describe(x) != first), None)
        if other is None and isinstance(e, TypeError | ValueError):  # alike, but of a kind default_collate does not take
            raise PipelineError(f"dataset items cannot be batched (index {indices[0]} is {first}): {raised(e)}; make every input "
                                "a tensor, a number or a numpy array of numbers in native byte order (x.astype(x.dtype.newbyteorder('='))) "
                                "and without negative strides (np.ascontiguousarray(x) of a flipped view such as x[:, ::-1]), "
                                "and leave None entries out of the item") from None
        if other is None:  # the items look alike: not theirs to fix (shared memory full in a DataLoader worker, say)
            raise
        raise PipelineError(f"dataset items cannot be batched (index {indices[0]} is {first}, index {other[0]} is {other[1]}); "
                            "make every input the same shape and type (pad, crop or resize in the dataset)") from None


def _detached(value: Any) -> Any:
    """``value`` with each tensor that requires grad detached; ``value`` itself where none does (no container is rebuilt)."""
    if isinstance(value, torch.Tensor):
        return value.detach() if value.requires_grad else value
    if isinstance(value, Mapping):
        parts = {k: _detached(v) for k, v in value.items()}
        return value if all(parts[k] is v for k, v in value.items()) else parts
    if isinstance(value, tuple | list):
        items = [_detached(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if _is_namedtuple(value) else items if isinstance(value, list) else tuple(items)
    return value


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple)


class ShardBatches(Sampler[list[int]]):
    """Batches of consecutive row indices that never cross a shard boundary, over the given shards."""

    def __init__(self, shards: list[int], rows_per_shard: int, num_samples: int, batch_size: int):
        self.shards, self.rows, self.n, self.batch_size = shards, rows_per_shard, num_samples, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for s in self.shards:
            start, stop = s * self.rows, min((s + 1) * self.rows, self.n)
            for lo in range(start, stop, self.batch_size):
                yield list(range(lo, min(lo + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(min((s + 1) * self.rows, self.n) - s * self.rows) // self.batch_size) for s in self.shards)


class Prefetch:
    """``items`` made ``depth`` ahead by a background thread that starts at once, so the first items are
    ready before they are asked for (``train`` starts an epoch's batches while it saves the last epoch).

    Errors re-raise in the consumer. ``close()``, or dropping the iterator, stops the thread at its next
    hand-off; the thread holds no reference to this object, so dropping it is enough. ``made`` is set once nothing of
    ``items`` runs any more (every item made, an error raised, or stopped): what makes them (a dataset read) is done.
    """

    def __init__(self, items: Iterator[Any], depth: int):
        self._buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self.made = threading.Event()
        thread = threading.Thread(target=_produce, args=(items, self._buffer, self._stop, self.made), name="kdcache-prefetch", daemon=True)
        with _PRODUCERS_LOCK:
            _PRODUCERS[thread] = self._stop
        thread.start()

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item, error = self._buffer.get()
        if item is _DONE:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        self._finished = True
        self._stop.set()

    def settled(self) -> bool:
        """Wait until every item is made (True), or until the iterator is closed first (False): its item in the making
        may never be (a dataset read that hangs), and nothing waits for it then."""
        while not self.made.wait(0.1):
            if self._stop.is_set():
                return False
        return True

    def __del__(self) -> None:
        self._stop.set()


_DONE = object()  # the producer's last entry: (_DONE, None) or (_DONE, the error it raised)
_PRODUCERS: dict[threading.Thread, threading.Event] = {}  # live producer threads and their stop events
_PRODUCERS_LOCK = threading.Lock()


def _stop_producers() -> None:
    """At exit: stop every producer and wait for the item it is making. A daemon thread still inside torch's C++ code
    (a batch being collated) when the interpreter shuts down aborts the process ("terminate called without an active
    exception", exit 134) after a run that finished: a train run that stops mid-epoch leaves its next batches in the making.
    One still inside the dataset's code after ``threads.EXIT_READ_WAIT`` seconds (a read that hangs: a stalled network mount, a
    dead remote dataset) is not waited for: a run stopped by Ctrl-C or SIGTERM ends at once, not once the read returns, and
    a daemon thread left in Python code or a system call ends with the process. All are waited for ``STOP_WAIT`` at most."""
    with _PRODUCERS_LOCK:
        live = list(_PRODUCERS.items())
    for _, stop in live:
        stop.set()
    began = time.monotonic()
    for thread, _ in live:
        thread.join(timeout=max(0.0, began + threads.EXIT_READ_WAIT - time.monotonic()))
        while thread.is_alive() and thread.ident not in _READING and (left := began + STOP_WAIT - time.monotonic()) > 0:
            thread.join(timeout=min(left, 0.1))




atexit.register(_stop_producers)


def _produce(items: Iterator[Any], buffer: queue.Queue[Any], stop: threading.Event, made: threading.Event) -> None:
    def put(entry: tuple[Any, BaseException | None]) -> bool:
        """Hand one entry over unless the consumer has stopped (then never block)."""
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put((item, None)):
                return
        made.set()  # before the end is handed over: the consumer may not take it for a while
        put((_DONE, None))
    except BaseException as e:  # handed to the consumer
        made.set()
        put((_DONE, e))
    finally:
        made.set()
        with _PRODUCERS_LOCK:
            _PRODUCERS.pop(threading.current_thread(), None)


def stop_making(batches: Any, wait: float | None = None) -> None:
    """Stop what makes batches ahead for the iterator ``batches``: a TransferSet's thread (iterated directly, or by a
    DataLoader in this process) and a DataLoader's worker processes. A failed or interrupted run's traceback (which a
    notebook keeps) holds the iterator: they would run on, holding batches and copies of the dataset, until it is dropped.
    The thread's item in the making is waited for (up to ``wait`` seconds, ``STOP_WAIT`` if None): once a run returns or
    raises, none of its threads reads the dataset, which the caller may read next (a run resumed in the same process, with a
    factory that hands out one open file: two threads at once served one item's input for another's). A run stopped by
    Ctrl-C or SIGTERM waits ``STOPPED_WAIT``: a read that hangs would keep it from ending."""
    made = getattr(getattr(batches, "_dataset_fetcher", None), "dataset_iter", batches)  # a DataLoader without workers holds it
    if isinstance(made, Prefetch):
        made.close()
        made.made.wait(STOP_WAIT if wait is None else wait)
    if hasattr(batches, "_shutdown_workers"):  # torch's DataLoader has no public way to stop its workers
        # torch waits for each worker (MP_STATUS_CHECK_INTERVAL, 5 s), SIGTERMs one still running (a read that hangs),
        # which it ignores (worker_signals), and waits as long again: a stopped run waits ``wait`` in
        # all. One still running then is killed: multiprocessing waited for it forever at exit. (Killed while torch
        # waits, torch's SIGCHLD handler raised "DataLoader worker is killed by signal" in the place of the run's stop.)
        interval = loader_utils.MP_STATUS_CHECK_INTERVAL
        loader_utils.MP_STATUS_CHECK_INTERVAL = interval if wait is None else min(interval, wait / 2)
        try:
            batches._shutdown_workers()
        except RuntimeError as e:
            # a worker that died (the OOM killer's SIGKILL) is reported again by torch's SIGCHLD handler as the others end
            # here (it looks at every worker on each SIGCHLD): the first report, said already, is the run's one line. The
            # workers' pids are forgotten, and a worker left running killed, by _shutdown_workers' finally and below
            if errors.worker_died(e) is None:
                raise
        finally:
            loader_utils.MP_STATUS_CHECK_INTERVAL = interval
        for worker in getattr(batches, "_workers", ()):
            worker.kill()  # none where it has ended


STOP_WAIT = 60.0  # seconds stop_making waits for the batch in the making (a dataset read that hangs: the run returns anyway)
STOPPED_WAIT = 2.0  # the same, for a run stopped by Ctrl-C or SIGTERM (it ends promptly, whatever the read does)


def worker_signals(worker: int) -> None:
    """A DataLoader's ``worker_init_fn``: the worker ignores SIGTERM. A scheduler signals every process of a job, and
    a worker ended by it would fail the batch its main process is still to finish (train's step, extract's shard
    writes) before that one stops; the main process ends its workers, and they end with it anyway.

    SIGBUS, SIGSEGV and SIGFPE kill the worker as they would any process, without torch's handlers' line on stderr
    ("ERROR: Unexpected bus error encountered in worker …") before the run's own: the main process names the signal and
    its fix in one line (``errors.worker_died``)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for crash in (signal.SIGBUS, signal.SIGSEGV, signal.SIGFPE):
        signal.signal(crash, signal.SIG_DFL)


def ended_workers(batches: Any, error: BaseException | None = None) -> dict[int, int]:
    """The pids and exit codes (-N: killed by signal N) of the DataLoader workers of the iterator ``batches`` that have
    ended (none without workers), read before ``stop_making`` ends the others. After an ``error`` of the transport (a
    ConnectionError, an EOFError: a worker killed as it handed a batch over) the worker's end is waited for, up to
    ``ENDED_WAIT`` seconds in all: its sockets close before its exit status can be read.

    torch's SIGCHLD handler reports a dead worker wherever the main thread is when it runs, which may be after torch
    found the worker gone otherwise (``exited unexpectedly``, a ConnectionResetError): that report is taken here (a
    moment's wait once a worker is seen dead lets it run), not raised from the clean-up after the error being ended,
    in the place of its one line."""
    workers = list(getattr(batches, "_workers", ()))
    if not workers:  # batches made in this process: no worker's end to wait for after a ConnectionError of its own reads
        return {}
    deadline = time.monotonic() + (ENDED_WAIT if isinstance(error, ConnectionError | EOFError) else 0.0)
    while True:
        try:
            ended = {w.pid: w.exitcode for w in workers if w.exitcode is not None}
            if any(ended.values()):
                time.sleep(0.01)  # the SIGCHLD handler, due now, runs here
                return ended
            if time.monotonic() >= deadline:
                return ended
            time.sleep(0.01)
        except RuntimeError as e:
            if errors.worker_died(e) is None:
                raise


ENDED_WAIT = 1.0


@contextmanager
def stopped(batches: Any, command: str = "") -> Iterator[Any]:
    """``batches`` inside the block, ``stop_making`` however it ends (stopped by Ctrl-C or SIGTERM, not waiting long).
    A DataLoader worker that died raises a DataLoaderWorkerError naming it (``errors.worker_died``; ``command``: whose
    settings its fix names), where torch's RuntimeError, or a ConnectionResetError, was a traceback."""
    wait = None
    try:
        yield batches
    except KeyboardInterrupt:
        wait = STOPPED_WAIT
        raise
    except Exception as e:
        if (died := errors.worker_died(e, command, ended_workers(batches, e))) is not None:
            raise died from None
        raise
    finally:
        stop_making(batches, wait)


def to_device(inputs: Any, device: torch.device, non_blocking: bool = True) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(v, device, non_blocking) for v in inputs)
    return inputs


def picked(inputs: Any, keys: tuple[str, ...], where: str) -> Any:
    """The entries of dict ``inputs`` (an item's, or a batch's) that ``student.inputs`` (``keys``) names, in its order; all
    of ``inputs`` where it names none. Refused in one line (``where`` begins it) where ``inputs`` is not a dict or lacks a key."""
    if not keys:
        return inputs
    if not isinstance(inputs, Mapping):
        raise PipelineError(f"{where}: student.inputs = {list(keys)} applies to dict items only, but the dataset's items' inputs "
                            f"are {describe(inputs)}, which the student is given whole; set student.inputs = [] (the default)")
    missing = next((key for key in keys if key not in inputs), None)
    if missing is not None:
        label = " (the items' label, which no model is given)" if missing in LABEL_KEYS else ""
        raise PipelineError(f"{where}: student.inputs names {missing!r}{label}, which the dataset's items do not have (their "
                            f"entries: {', '.join(map(repr, inputs))}); list some of those, or set student.inputs = [] for all")
    return {key: inputs[key] for key in keys}


def call(model: torch.nn.Module, inputs: Any, role: str) -> Any:
    """Run the ``role`` (``"teacher"`` or ``"student"``) model on a batch: a dict is passed as keyword arguments.

    An exception from the model (it does not take the dataset's inputs, or runs out of memory) is a
    ``ModelError`` naming the model, the exception, the line that raised it and the batch it was given.
    """
    try:
        with device_memory(f"the {role} model", inputs, f"lower {'extract' if role == 'teacher' else 'train'}.batch_size"):
            return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    except KdcacheError:
        raise
    except Exception as e:
        fix = f"make {role}.factory's model take data.factory's items as they come (call it in Python to see the full traceback)"
        raise ModelError(f"the {role} model raised {raised(e)} on a batch of {describe(inputs)}; {_likely_cause(model, inputs, role, e)}{fix}") from e


def _likely_cause(model: torch.nn.Module, inputs: Any, role: str, error: Exception) -> str:
    """What a batch that the ``role`` model raised ``error`` on shows of a common cause, with its fix, ending in "or "/"else ";
    "" where it shows none."""
    if role == "student" and isinstance(inputs, Mapping) and isinstance(error, TypeError) and "keyword argument" in str(error):
        return (f"it was called with the items' entries {', '.join(map(repr, inputs))} as keyword arguments: set "
                "student.inputs to the keys it takes (e.g. [\"input_ids\", \"attention_mask\"]), or ")
    if (listed := _per_position(inputs)) is not None:
        return (f"{listed} is a list of tensors, one per position, as torch batches a Python list per item: return a tensor per item "
                "(torch.tensor(ids); a Hugging Face dataset: dataset.with_format('torch')), or ")
    if (row := _one_row_each(inputs)) is not None:
        return (f"every entry of the items is one row of shape {row}, as a tokenizer's return_tensors=\"pt\" gives one sentence: "
                "give each entry's row in the dataset (tokenizer(text, ...)[\"input_ids\"][0], or .squeeze(0) on each), or ")
    if (lower := _lower_precision(model, inputs)) is not None:
        section, autocast = "extract" if role == "teacher" else "train", "bf16" if lower == "bfloat16" else "fp16"
        return (f"its parameters are {lower} and the inputs float32, which a model that does not cast its inputs (Hugging Face "
                f"models do) cannot take: return it in float32 and set {section}.precision = \"{autocast}\" (autocast), "
                f"or give it {lower} inputs; else ")
    return ""


@contextmanager
def device_memory(step: str, inputs: Any, fix: str) -> Iterator[None]:
    """A GPU's out-of-memory error in ``step`` (a model's forward, the student's backward, the teacher's targets converted
    for the store) on a batch of ``inputs`` as a one-line ``DeviceMemoryError`` naming the batch and the ``fix`` (lower the
    batch size), not a traceback."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise DeviceMemoryError(f"{step} raised {raised(e)} on a batch of {describe(inputs)}; {fix}") from e


def move_model(model: torch.nn.Module, name: str, device: torch.device, fix: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``model.to(device, dtype)``; a GPU's out-of-memory error (a model larger than the device's free memory) as a one-line
    ``DeviceMemoryError`` naming the model (``name``: "the teacher (teacher.factory 'x.py:f')"), the device, the model's
    size (its parameters and buffers) and the ``fix``, not a traceback (a ``ModelTooLargeError``: dask does not retry it)."""
    try:
        return model.to(device, dtype=dtype)
    except torch.cuda.OutOfMemoryError as e:
        size = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
        raise ModelTooLargeError(f"{name}, {size / 1e9:.2f} GB of parameters and buffers, does not fit in the memory of {device}: "
                                f"moving it there raised {raised(e)}; use a device with more free memory, or {fix}") from e


def _per_position(inputs: Any) -> str | None:
    """Where a batch holds an entry that ``default_collate`` made of per-item Python lists (a list of 1-D tensors, one per
    position), its name (``'input_ids'``, or ``the input``); else None."""
    def listed(value: Any) -> bool:  # nested lists too (an image as x.tolist(), read from JSON)
        return isinstance(value, list) and len(value) > 0 and all(isinstance(v, torch.Tensor) and v.ndim == 1 or listed(v) for v in value)
    if isinstance(inputs, Mapping):
        return next((f"entry {k!r}" for k, v in inputs.items() if listed(v)), None)
    return "the input" if listed(inputs) else None


def _one_row_each(inputs: Any) -> list[int] | None:
    """Where a dict batch's tensors are all (B, 1, T), token ids among them (each item a tokenizer's ``return_tensors="pt"``
    output for one sentence), an item's entry shape ``[1, T]``; None otherwise."""
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)] if isinstance(inputs, Mapping) else []
    if not tensors or any(t.ndim != 3 or t.shape[1] != 1 for t in tensors) or all(t.is_floating_point() for t in tensors):
        return None
    return list(tensors[0].shape[1:])


def _lower_precision(model: torch.nn.Module, inputs: Any) -> str | None:
    """The dtype of ``model``'s floating parameters where they are all one other than float32 (a model returned as
    ``.half()`` or ``.to(torch.bfloat16)``) and the batch's floating tensors are float32; None otherwise."""
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(params) != 1 or params == {torch.float32} or _float_dtypes(inputs) != {torch.float32}:
        return None
    return str(params.pop()).removeprefix("torch.")


def _float_dtypes(value: Any) -> set[torch.dtype]:
    """The dtypes of the floating tensors in a batch (a tensor, or a dict, tuple or list of them)."""
    if isinstance(value, torch.Tensor):
        return {value.dtype} if value.is_floating_point() else set()
    parts = value.values() if isinstance(value, Mapping) else value if isinstance(value, tuple | list) else ()
    return set().union(*(_float_dtypes(v) for v in parts))


def describe(inputs: Any) -> str:
    """A batch's structure in a few words: ``float32[8, 64]``, ``{'ids': int64[8, 16]}``, ``(float32[8, 3], ...)``, ``[8 x str]``,
    ``ndarray >f4[64]`` (an item's numpy array)."""
    if isinstance(inputs, torch.Tensor):
        return f"{str(inputs.dtype).removeprefix('torch.')}{list(inputs.shape)}"
    if isinstance(inputs, np.ndarray):  # an item's (before batching): its shape tells ragged items apart
        return f"ndarray {inputs.dtype}{list(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, tuple | list):
        parts = [describe(v) for v in inputs]
        if len(parts) > 2 and len(set(parts)) == 1:  # a batch of non-tensors (file names, ids) collates to a list: one word, not B
            return f"[{len(parts)} x {parts[0]}]"
        return "(" + ", ".join(parts) + ")"
    return type(inputs).__name__


def padding_mask(inputs: Any, index: Any, key: str, setting: str, where: str) -> torch.Tensor:
    """The padding mask of a batch (dataset rows ``index``) under ``key`` of its dict ``inputs``, as ``setting``
    (``train.mask``, ``targets.mask``) names it: refused unless a (rows, tokens) tensor of bool or 0/1 values keeping at
    least one position of each item (a mask true at padding keeps none of an unpadded item). ``where``: what begins a message."""
    rows = len(index)
    if not isinstance(inputs, Mapping):
        raise PipelineError(f"{where}: {setting} = {key!r} names an entry of the dataset's dict inputs, but its items' inputs are "
                            f"{describe(inputs)} (batched), not a dict; return each item as a dict of tensors holding the mask "
                            f"(e.g. {{'input_ids': ..., {key!r}: ...}}), or set {setting} = \"\"")
    if key not in inputs:
        raise PipelineError(f"{where}: {setting} = {key!r} is not an entry of the dataset's inputs (their keys: {list(inputs)}); "
                            f"name the entry holding each item's padding mask, or set {setting} = \"\"")
    mask = inputs[key]
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or len(mask) != rows:
        raise ShapeMismatchError(f"{where}: {setting} {key!r} must be one (tokens,) tensor per item, got {describe(mask)} for a "
                                 f"batch of {rows} items; return it with one value per token (e.g. mask[0] of a (1, tokens) one)")
    check_mask_values(mask, key, setting, where)
    empty = ~mask.to(torch.bool).any(dim=1)  # a mask true at padding keeps nothing of an unpadded item
    if empty.any():
        item = int(index[int(empty.nonzero()[0])])
        raise PipelineError(f"{where}: {setting} {key!r} keeps no position of item {item} (its {mask.shape[1]} values all false); it "
                            "must be true where a position counts, as a Hugging Face attention_mask is: a mask true at padding "
                            "(PyTorch's key_padding_mask, tokens == pad_id) is the opposite, return ~mask")
    return mask


def bool_mask(inputs: Any, rows: int, key: str, setting: str, where: str) -> torch.Tensor | None:
    """The ``(rows, tokens)`` padding mask under ``key`` of a batch's dict ``inputs`` as bool, its values checked first
    (``check_mask_values``, on this host copy); None where there is no such tensor (``padding_mask`` names what is wrong)."""
    mask = inputs.get(key) if isinstance(inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or len(mask) != rows:
        return None
    check_mask_values(mask, key, setting, where)
    return mask.to(torch.bool)


def check_mask_values(mask: torch.Tensor, key: str, setting: str, where: str) -> None:
    """Refuse a padding mask (``setting``'s entry ``key``) holding other values than bool or 0/1 (a mask of weights, a
    count): each would count as true. Meant for the host copy: on a GPU tensor, the device syncs."""
    odd = losses.odd_mask_value(mask)
    if odd is not None:
        raise PipelineError(f"{where}: {setting} {key!r} must hold bool or 0/1 values (true where a position counts), got "
                            f"{odd} ({str(mask.dtype).removeprefix('torch.')}); return mask != 0, or (lengths) the positions "
                            "before each item's length")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (``n <= 0``: leave torch's setting), then restore.

    Small models on few cores run faster on one thread: spinning thread pools contend with the
    DataLoader, the store reader and anything else on the machine.
    """
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # extract.precision, train.precision


def autocast(device: torch.device, precision: str) -> Any:
    """The forward pass's autocast context for ``precision`` (none for fp32): parameters stay float32."""
    dtype = AUTOCAST[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def pick_device(name: str, key: str, where: str) -> torch.device:
    """The torch device ``name``, the value of ``key`` (``"train.device"``) that ``where`` gave (Pipeline.where)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    said = f"{where}: {key} = {name!r}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"{said} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: their copies to the host are not tested here
        raise PipelineError(f"{said} is not supported; kdcache runs on the CPU or CUDA GPUs: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{said} asked for but CUDA is not available here; use \"cpu\" or \"auto\"")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise PipelineError(f"{said} asked for but this machine has {torch.cuda.device_count()} CUDA GPU(s); use cuda:0..cuda:{torch.cuda.device_count() - 1} or \"auto\"")
    return device
