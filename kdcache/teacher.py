"""The teacher stage: build the model, identify its weights, and capture the outputs to store.

Which part of a structured output is kept (``select``):

- ``auto`` (default): a tensor is kept as is; a tuple/list gives its first element; a dict or an
  object (e.g. a Hugging Face ``ModelOutput``) gives the first of ``logits``, ``pooler_output``,
  ``last_hidden_state`` that is present. Applied again until a tensor is reached.
- otherwise a dotted path of indices and names (a namedtuple's fields by either), e.g. ``"1"``, ``"hidden_states.3"``,
  ``"last_hidden_state"``, set per target in the pipeline's ``[targets.select]`` table. On a tensor a
  step works on each sample's first axis (the one after the batch axis): an index (``"last_hidden_state.0"``,
  a ViT's class token), a slice (``"last_hidden_state.1:"``, its patch tokens), ``mean`` (mean-pooled tokens),
  ``last`` (each sample's last valid position by its padding mask: a causal LM's sentence feature) or
  ``transpose`` (the sample's first two axes swapped: a Conv1d's ``(channels, length)`` read as ``length`` tokens).
  With a padding mask (extract's ``targets.mask``, training's ``train.mask`` for the student: ``Padding``), ``mean``
  averages only the valid positions.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import os
import re
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import torch

from kdcache import data
from kdcache.errors import DeviceMemoryError, PipelineError, ShapeMismatchError, TargetError, raised

if TYPE_CHECKING:
    from kdcache.pipeline import Pipeline

AUTO_KEYS = ("logits", "pooler_output", "last_hidden_state")
LOGITS = "logits"  # target name of the model's own output


def build(pipeline: Pipeline, key: str, before: Callable[[torch.nn.Module], Any] | None = None) -> torch.nn.Module:
    """Call the model factory at ``key`` (``"teacher.factory"``, ``"student.factory"``); the model in eval mode.
    ``before``: called with the model as the factory returned it, before it is put in eval mode."""
    model = pipeline.call(key)
    if not isinstance(model, torch.nn.Module):
        raise PipelineError(f"{key} returned {type(model).__name__}, not a torch.nn.Module; make the factory return the model")
    if before is not None:
        before(model)
    return model.eval()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict in key order: each key, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # no copy; reshape: 0-d entries (num_batches_tracked)
    return h.hexdigest()


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclasses.dataclass(frozen=True)
class Padding:
    """A batch's padding mask, for the ``mean`` and ``last`` steps: ``valid`` (B, T) bool on the host (the positions are
    read there, with no wait for the device), true where a position counts, the entry ``key`` of the batch's dict inputs
    that ``setting`` names (for messages)."""

    valid: torch.Tensor
    key: str
    setting: str = "targets.mask"

    @classmethod
    def of(cls, batch: Mapping[str, Any], key: str, setting: str, where: str) -> Padding:
        """The mask under ``key`` of ``batch``'s dict inputs (dataset rows ``batch["index"]``), as ``setting`` names it, checked
        by ``data.padding_mask`` (``where`` begins its messages): extract's of every batch, the student's of every batch it pools."""
        return cls(data.padding_mask(batch["inputs"], batch["index"], key, setting, where).to("cpu", torch.bool), key, setting)

    def fitted(self, value: torch.Tensor, step: str, label: str, setting: str) -> torch.Tensor:
        """``valid`` for a step pooling ``value``'s (B, T, ...) sample axis 1, refused where it has another count of positions;
        on the host, as bool."""
        if len(value) != len(self.valid):  # a sequence-first output: its rows are not the items the mask is of
            raise TargetError(f"{label}: step {step!r} pools by {self.setting} {self.key!r}, the mask of the batch's {len(self.valid)} "
                              f"items, but the output has shape {list(value.shape)}, whose first axis is not those items; store a "
                              "batch-first output (e.g. batch_first=True for RNN/attention layers)")
        if self.valid.shape[1] != value.shape[1]:
            raise ShapeMismatchError(
                f"{label}: {self.setting} {self.key!r} has {self.valid.shape[1]} positions per item, but step {step!r} pools the sample's "
                f"first axis of {value.shape[1]} entries (per-sample shape {list(value.shape[1:])}); give the mask one value per entry of "
                "that axis (a select keeping part of the tokens, \"1:\", needs a mask of that part under a key of its own, e.g. "
                f"attention_mask[1:]), fix {setting}, or set {self.setting} = \"\"")
        return self.valid


def select(output: Any, selector: str, target: str, label: str = "", setting: str = "",
           mask: Padding | None = None, pooled_by: str = "targets.mask",
           on_tensor: list[tuple[str, int]] | None = None) -> tuple[torch.Tensor, str]:
    """Pick the tensor to store from a model/module output; returns it and the resolved selector. ``mask``: the batch's
    padding mask, which ``mean`` and ``last`` steps pool by (``last`` needs one); ``pooled_by``: the setting that gives it
    (the teacher's ``targets.mask``, the student's ``train.mask``), named where ``last`` has none. ``on_tensor``: each
    step applied to a tensor is appended to it, with the per-sample number of axes it was applied to (``top_k``'s check).

    Errors begin with ``label`` (default: ``target 'NAME'``) and name ``setting`` to fix (default: ``[targets.select] 'NAME'``).
    """
    label, setting = label or f"target {target!r}", setting or f"[targets.select] {target!r}"
    path: list[str] = []
    steps = [] if selector in ("auto", "tensor") else selector.split(".")
    value = output
    while True:
        if isinstance(value, torch.Tensor) and value.is_nested:  # no shape: its .shape raises a RuntimeError (a traceback)
            where = f"element {'.'.join(path)!r} of the output" if path else "the output"
            raise TargetError(f"{label}: {where} is a nested tensor (samples of different lengths, as torch.nn.TransformerEncoder passes "
                              "between its layers when given a src_key_padding_mask in eval mode), which has no per-sample shape to store; "
                              "take a padded tensor instead: the encoder's own output, or its layers' with enable_nested_tensor=False")
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:  # no rows to copy; the probe's comparison raised
            where = f"element {'.'.join(path)!r} of the output" if path else "the output"
            raise TargetError(f"{label}: {where} is a {str(value.layout).removeprefix('torch.')} tensor, which kdcache cannot store "
                              "as rows of values; return x.to_dense() from the model (or from a module to hook)")
        if isinstance(value, torch.Tensor) and not steps:
            return value, ".".join(path) or "tensor"
        step = steps.pop(0) if steps else _auto_step(value, label, setting)
        if on_tensor is not None and isinstance(value, torch.Tensor):
            on_tensor.append((step, value.ndim - 1))
        value = _step(value, step, label, setting, mask, pooled_by)
        path.append(step)
        if value is None:
            raise TargetError(f"{label}: element {'.'.join(path)!r} of the output is None (the module returned no tensor "
                              f"there, e.g. attention weights with need_weights=False); choose another {setting}")


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values along the last (class) axis, in descending order, and their classes as int32: (..., C) ->
    (..., k) twice. Equal values are ordered by class, the lower first, and where equal values straddle the k-th place the
    lower classes are kept: the result depends on the values alone, never on the device, the batch or ``torch.topk``'s
    own order of ties (``verify --teacher-check`` and a resumed extract compare rows)."""
    values, classes = logits.topk(k, dim=-1)
    # equal values straddle the k-th place where the whole row has more of the k-th value than were kept
    kth = values[..., -1:]
    straddled = ((logits == kth).sum(-1) > (values == kth).sum(-1)).nonzero(as_tuple=True)
    if len(straddled[0]):  # rare: those rows again by a stable sort, which keeps equal values in class order
        again = logits[straddled].sort(dim=-1, descending=True, stable=True)
        values[straddled], classes[straddled] = again.values[..., :k], again.indices[..., :k]
    order = classes.argsort(dim=-1, stable=True)  # by class, then by value (stable): ties in class order
    values, classes = values.gather(-1, order), classes.gather(-1, order)
    order = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(-1, order), classes.gather(-1, order).to(torch.int32)


def pools(selector: str) -> bool:
    """Whether a select (``[targets.select]``, ``student.select``, a ``train.features`` one) has a step that pools by a
    padding mask (``mean``, ``last``)."""
    return any(step in ("mean", "last") for step in selector.split("."))


def _auto_step(value: Any, label: str, setting: str) -> str:
    if isinstance(value, tuple | list):
        if value:
            return "0"
    else:
        for key in AUTO_KEYS:
            if _get(value, key) is not None:
                return key
    keys = f" (its keys: {', '.join(repr(k) for k in list(value)[:12])})" if isinstance(value, Mapping) and value else ""
    raise TargetError(
        f"{label}: cannot pick a tensor from an output of type {type(value).__name__}{keys}; "
        f"set {setting} = \"<index or attribute>\""
    )


def _get(value: Any, key: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(key)
    return getattr(value, key, None)


def _step(value: Any, step: str, label: str, setting: str, mask: Padding | None = None, pooled_by: str = "targets.mask") -> Any:
    if isinstance(value, torch.Tensor):
        return _tensor_step(value, step, label, setting, mask, pooled_by)
    if isinstance(value, tuple | list) and _INDEX.fullmatch(step) and -len(value) <= int(step) < len(value):
        return value[int(step)]
    named = isinstance(value, tuple) and step in _fields(value)  # a namedtuple's field, by name
    found = getattr(value, step) if named else None if isinstance(value, tuple | list) else _get(value, step)
    if found is None:
        raise _no_element(value, step, label, setting)
    return found


def _no_element(value: Any, step: str, label: str, setting: str) -> TargetError:
    """The error for a ``step`` that names nothing in ``value``: the elements it holds, the names close to ``step`` (a typo:
    ``last_hiden_state``), and where ``step`` is one it declares but holds None (a Hugging Face ``ModelOutput`` leaves
    ``hidden_states`` None without ``output_hidden_states=True``), that."""
    named = _named(value)
    held = _indices(value) + [repr(n) for n, v in named.items() if v is not None]
    holds = f" (it holds {', '.join(held[:12])}{', …' if len(held) > 12 else ''})" if held else ""
    why = f"; its {step!r} is None: the model returned nothing there" if step in named and named[step] is None else ""
    if why and step.endswith(("hidden_states", "attentions")):
        flag = "output_hidden_states" if step.endswith("hidden_states") else "output_attentions"
        why += f" (a Hugging Face model fills {step} only with {flag}=True in its config or call)"
    close = difflib.get_close_matches(step, [n for n in named if n != step], n=3)
    example = f"did you mean {', '.join(map(repr, close))}?" if close else f"e.g. {held[0] if held else _EXAMPLES}"
    return TargetError(f"{label}: output of type {type(value).__name__} has no element {step!r}{holds}{why}; fix {setting} ({example})")


_EXAMPLES = '"0", "logits", "last_hidden_state"'


def _indices(value: Any) -> list[str]:
    """The indices a step can name in a tuple or list ``value``, quoted; none in another value."""
    if not isinstance(value, tuple | list):
        return []
    return [f'"{i}"' for i in range(len(value))] if len(value) <= 12 else [f'"0" to "{len(value) - 1}"']


def _named(value: Any) -> dict[str, Any]:
    """What a step can name in ``value`` by name, with what each holds (None for a name declared but empty): a namedtuple's
    fields, a dataclass's fields, a mapping's keys."""
    if isinstance(value, tuple | list):
        return {f: getattr(value, f, None) for f in _fields(value)}
    names: dict[str, Any] = {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names.update((f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value))
    if isinstance(value, Mapping):
        names.update((str(k), v) for k, v in value.items())
    return names


def _fields(value: tuple[Any, ...]) -> tuple[str, ...]:
    """A namedtuple's field names (``typing.NamedTuple`` too); () for a plain tuple."""
    fields = getattr(type(value), "_fields", ())
    return fields if isinstance(fields, tuple) and all(isinstance(f, str) for f in fields) else ()


_INDEX = re.compile(r"-?\d+")  # what int() reads: not "--1", nor "²" (str.isdigit() takes both)
_SLICE = re.compile(r"(-?\d+)?:(-?\d+)?")  # a bound is an integer or absent: not a "-" alone


def _tensor_step(value: torch.Tensor, step: str, label: str, setting: str, mask: Padding | None = None,
                 pooled_by: str = "targets.mask") -> torch.Tensor:
    """``step`` applied to each sample of a batch ``value``: an index or a slice of the sample's first axis, ``mean``
    over it (over its valid positions, by ``mask``, which ``pooled_by`` gives), its ``last`` valid position, or
    ``transpose`` (its first two axes swapped). The result keeps the batch axis."""
    per_sample = tuple(value.shape[1:])
    if not per_sample:
        raise TargetError(f"{label}: the output is one value per sample (a tensor of shape {tuple(value.shape)}), "
                          f"which step {step!r} cannot index; fix {setting} (drop the step)")
    if step == "mean":
        return _mean_step(value, label, setting, mask)
    if step == "last":
        return _last_step(value, label, setting, mask, pooled_by)
    if step == "transpose":
        if len(per_sample) < 2:
            raise TargetError(f"{label}: 'transpose' swaps the sample's first two axes, but the per-sample shape is {list(per_sample)}; "
                              f"fix {setting} (drop the step)")
        return value.transpose(1, 2)
    if _INDEX.fullmatch(step):
        return _index_step(value, step, label, setting)
    sliced = _SLICE.fullmatch(step)
    if sliced:
        return _slice_step(value, step, sliced, label, setting)
    close = difflib.get_close_matches(step, _TENSOR_STEPS, n=1)
    raise TargetError(
        f"{label}: output of type Tensor (per-sample shape {list(per_sample)}) has no element {step!r}"
        f"{f' (did you mean {close[0]!r}?)' if close else ''}; fix {setting}: on a tensor a step is an index of the sample's "
        f"first axis (\"0\"), a slice (\"1:\"), \"mean\", \"last\" or \"transpose\""
    )


_TENSOR_STEPS = ("mean", "last", "transpose")  # the named steps of a tensor (_tensor_step)


def _mean_step(value: torch.Tensor, label: str, setting: str, mask: Padding | None) -> torch.Tensor:
    """Step ``mean``: each sample's mean over its first axis, or over its valid positions by ``mask``; an integer or
    boolean ``value`` averaged as float32."""
    per_sample = tuple(value.shape[1:])
    if not per_sample[0]:  # the mean of no entries is NaN, stored as if the teacher had produced it
        raise TargetError(f"{label}: 'mean' averages the sample's first axis, which has no entries (per-sample shape "
                          f"{list(per_sample)}); fix {setting}")
    # complex values keep their imaginary part (refused where stored); integers and booleans have no mean of their own
    value = value if value.is_floating_point() or value.is_complex() else value.float()
    return value.mean(dim=1) if mask is None else _valid_mean(value, mask.fitted(value, "mean", label, setting))


def _last_step(value: torch.Tensor, label: str, setting: str, mask: Padding | None, pooled_by: str) -> torch.Tensor:
    """Step ``last``: each sample's last valid position by ``mask`` (required: ``pooled_by`` is the setting that gives it)."""
    if mask is None:
        whose = "the teacher's targets pool by extract's" if pooled_by == "targets.mask" else "the student's selects pool by"
        raise TargetError(f"{label}: step 'last' picks each sample's last valid position by its padding mask, and none is "
                          f"given here ({whose} {pooled_by}); set {pooled_by} = \"attention_mask\" (the key of the inputs "
                          f"holding it), or fix {setting} (\"-1\": the last position, padding or not)")
    valid = mask.fitted(value, "last", label, setting)
    last = torch.where(valid, torch.arange(valid.shape[1]), -1).amax(dim=1)  # (B,): -1 where none (data.padding_mask refuses it)
    return value[torch.arange(len(value), device=value.device), _to(last, value.device)]


def _index_step(value: torch.Tensor, step: str, label: str, setting: str) -> torch.Tensor:
    """An index step (``"0"``, ``"-1"``): that entry of each sample's first axis, which must have it."""
    per_sample = tuple(value.shape[1:])
    axis = per_sample[0]
    if not -axis <= int(step) < axis:
        valid = f"an index from {-axis} to {axis - 1}" if axis else "it has no entry to index"
        raise TargetError(f"{label}: index {step} is outside the {axis} entries of the sample's first axis (per-sample "
                          f"shape {list(per_sample)}); fix {setting} ({valid})")
    return value[:, int(step)]


def _slice_step(value: torch.Tensor, step: str, sliced: re.Match[str], label: str, setting: str) -> torch.Tensor:
    """A slice step (``"1:"``, its bounds matched in ``sliced``) of each sample's first axis, bounds past its ends clamped
    as Python's are; an empty slice is refused."""
    per_sample = tuple(value.shape[1:])
    axis = per_sample[0]
    start, stop, _ = slice(*(int(b) if b else None for b in sliced.groups())).indices(axis)  # huge bounds clamped
    part = value[:, start:stop]
    if part.shape[1] == 0:
        raise TargetError(f"{label}: slice {step!r} of the sample's first axis ({axis} entries, per-sample shape "
                          f"{list(per_sample)}) is empty; fix {setting}")
    return part


def _valid_mean(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each sample's mean of ``value`` (B, T, ...) over the positions ``valid`` (B, T, on the host) keeps: the same bits
    whatever padding and batch the sample came with, as if it had none (a sum with zeros at the padding, or one reduction
    kernel given another shape, rounds otherwise). Batched, in an order fixed by each sample alone: its valid positions
    brought to the front, in order (a view under right padding, else one ``index_select``), copied into one buffer of the
    tree's leaves (float32 at least; its only copy of them: 2x an fp16 B x T x D at most, summed in place where no
    gradient is needed), the rest zeroed, summed by a pairwise tree (``_pairwise_sum``) and divided by its length. Device
    ops (a GPU's kernel launches), whatever B: ~log2(T) + 6 forward, ~6 more backward (15 and 21 at T = 512); the per-sample loop this replaced ran B + 1
    forward and 3B + 4 with its backward (772 at B = 256), each with a Python iteration and an autograd node."""
    lengths = valid.sum(dim=1)  # (B,) on the host; data.padding_mask refused a sample with none
    batch, positions = valid.shape
    width = min(positions, 1 << (int(lengths.max()) - 1).bit_length())  # the tree's leaves: a power of two, or all T
    front = torch.arange(width) < lengths[:, None]  # (B, width): where each sample's valid positions go
    if torch.equal(valid, torch.arange(positions) < lengths[:, None]):  # right padding: they are there already
        fronted = value[:, :width]
    else:  # each sample's valid positions first, in order (a stable sort of "is padding"), as rows of the flattened batch
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :width] + positions * torch.arange(batch)[:, None]
        fronted = value.flatten(0, 1).index_select(0, _to(order.flatten(), value.device)).unflatten(0, (batch, width))
    # the tree's leaves: one float32-or-wider copy, zero past each sample's length (its only copy of the values)
    leaves = fronted.to(torch.promote_types(value.dtype, torch.float32), copy=True)
    leaves.masked_fill_(~_to(front.view(batch, width, *[1] * (value.ndim - 2)), value.device), 0)
    total = _pairwise_sum(leaves)
    # + 0.0: a sum of -0.0s is +0.0 however many zeros (past the sample's length) it met
    return ((total + 0.0) / _to(lengths.view(batch, *[1] * (total.ndim - 1)).to(total.real.dtype), total.device)).to(value.dtype)


def _to(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small ``host`` tensor (a mask's positions) on ``device``: to a GPU from pinned memory without blocking, since a
    blocking copy waits for every kernel queued before it (the forward), and the GPU then idles while the host enqueues the
    rest of the step."""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def _pairwise_sum(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (B, n, ...) summed over axis 1 by a pairwise tree over a power of two of positions, ``n`` of them given (the
    rest are zeros, never made), folded in half at each level: node i adds nodes i and i + half of the level below. A
    sample's zeros past its length add exactly nothing (x + 0 == x; the sign of a zero total aside, which the caller's
    ``+ 0.0`` makes +0.0), so the order its values are summed in depends on their positions alone, not on n or B; a sum of
    two values is the same bits in whatever order a kernel takes them."""
    while rows.shape[1] > 1:
        half = 1 << (rows.shape[1] - 1).bit_length() - 1
        paired = rows.shape[1] - half  # nodes 0 to paired - 1 have a partner in the given positions; the rest add a zero
        if rows.requires_grad and paired == half:  # a sum over an outer axis of 2: vectorised as an add, its backward an expand
            rows = rows.unflatten(1, (2, -1)).sum(dim=1)
        elif rows.requires_grad:  # the first level of n not a power of two
            rows = torch.cat([rows[:, :paired] + rows[:, half:], rows[:, paired:half]], dim=1)
        else:  # the same adds, into the first half of the caller's buffer (extract's forward: no new memory)
            rows[:, :paired].add_(rows[:, half:])
            rows = rows[:, :half]
    return rows[:, 0]


def check_layers(model: torch.nn.Module, layers: tuple[str, ...], what: str = "teacher") -> None:
    """Fail before any work on a layer name that is not in ``model.named_modules()``."""
    names = [n for n, _ in model.named_modules() if n]
    for layer in layers:
        if layer not in names:
            close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"the model has {len(names)} modules, e.g. {', '.join(names[:8])}"
            raise TargetError(f"layer {layer!r} is not a module of the {what}; {hint} (names from model.named_modules())")


@contextmanager
def capture(model: torch.nn.Module, layers: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Forward hooks on the named modules; the dict holds each module's latest raw output."""
    check_layers(model, layers)
    outputs: dict[str, Any] = {}
    handles = hook(model, layers, outputs)
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def hook(model: torch.nn.Module, layers: Iterable[str], outputs: dict[str, Any]) -> list[Any]:
    """Forward hooks putting each named module's output, owned (``own``), into ``outputs`` under its name, or
    ``RAN_AGAIN`` if it is already there (clear ``outputs`` before each forward); their handles. One hook per module."""
    modules = dict(model.named_modules())
    return [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: outputs.__setitem__(name, RAN_AGAIN if name in outputs else own(out)))
        for name in dict.fromkeys(layers)]


def own(out: Any) -> Any:
    """A hooked output as it is now: tensors are cloned, as a later in-place op (``ReLU(inplace=True)``) would change them.

    Tuples/lists/mappings become plain ones, which ``select`` reads the same way; a namedtuple stays one (its fields are
    selected by name) and a dataclass a copy of itself with owned fields.
    """
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple | list):
        if type(out) in (tuple, list):
            return type(out)(own(o) for o in out)
        owned = tuple(own(o) for o in out)
        if _fields(out):
            with contextlib.suppress(TypeError):  # a namedtuple whose constructor takes other arguments: a plain tuple
                return type(out)(*owned)
        return owned
    if isinstance(out, Mapping):
        return {k: own(v) for k, v in out.items()}
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        copied = copy.copy(out)
        for field in dataclasses.fields(out):
            if hasattr(out, field.name):
                object.__setattr__(copied, field.name, own(getattr(out, field.name)))  # a frozen dataclass's too
        return copied
    return out


RAN_AGAIN = object()  # marks a hooked module that ran more than once in one forward pass


def hooked_output(hooked: dict[str, Any], name: str, model: str = "teacher") -> Any:
    """The captured output of layer ``name`` of the ``model`` (teacher, or the student under ``train.features``);
    a TargetError when its module did not run, or ran more than once."""
    what, fix, use = ("layer", "hook a module", "store") if model == "teacher" else \
        (f"train.features: {model} module", f"name a {model} module", "distill")
    if name not in hooked:
        raise TargetError(f"{what} {name!r} did not run in the {model}'s forward pass (its forward hook never fired); "
                          f"{fix} that runs for every batch")
    if hooked[name] is RAN_AGAIN:
        raise TargetError(f"{what} {name!r} ran more than once in one forward pass (a shared module, like the relu of a "
                          f"torchvision ResNet block), so which output to {use} is ambiguous; {fix} that runs once, e.g. its parent")
    return hooked[name]


def row_distance(row: torch.Tensor, other: torch.Tensor) -> float:
    """How far ``other`` is from ``row`` (one sample's output each): the largest difference relative to ``row``'s magnitude.
    On the device of whichever of the two is not on the CPU (a row the setup checks keep on the host is copied there), in
    float32 (enough for tolerances of 1e-2; a float64 copy of a 2**26-value output took seconds), with two temporaries of
    a row's size beside the float32 copies (a large activation map's row is hundreds of MB)."""
    device = other.device if row.device.type == "cpu" else row.device
    row, other = row.to(device).float(), other.to(device).float()
    diff = (row - other).abs_()
    scale = row.abs()
    scale.add_(scale.mean()).clamp_min_(torch.finfo(torch.float32).tiny)
    return float(diff.div_(scale).max())


def moved_row(row: torch.Tensor, rows: torch.Tensor, own: int, tolerance: float) -> int | None:
    """Another of ``rows`` (a batch's output) that ``row`` (a sample's output, whose row there is ``own``) is, within
    ``tolerance``, where it is clearly not its own row (``MOVED`` times that apart): the model returned its rows in another
    order than its inputs. None otherwise: its own row, or none of them (a model that mixes the samples of a batch, or
    that is not deterministic, which a row near both its own and another's is not told from)."""
    if row_distance(row, rows[own]) <= MOVED * tolerance:
        return None
    return next((j for j in range(len(rows)) if j != own and row_distance(row, rows[j]) <= tolerance), None)


MOVED = 4  # how much farther than the tolerance a sample's output must be from its own row to be called moved


def skipped_check(check: str, model: str, e: DeviceMemoryError, still: str) -> None:
    """Say (stderr, one line, by torchrun's rank 0) that a setup ``check`` that runs the ``model`` ("teacher", "student") again
    was skipped: its forward ran out of device memory (``e``); ``still``: what checks it otherwise. Not refused: the probe
    batch fitted, and so may the run's; not silent: the check did not run, and concludes nothing."""
    if os.environ.get("RANK", "0") in ("", "0"):
        print(f"warning: {check} was skipped: the {model} ran out of device memory ({raised(e.__cause__ or e)}); {still}", file=sys.stderr)
