"""Pipeline files: TOML holding values and import paths, read into frozen dataclasses.

A pipeline never executes anything by itself: the only code that runs is the factory an
import path names (``package.module:attr`` or ``path/to/file.py:attr``, the latter resolved
relative to the pipeline file's folder), and only when a stage asks for it — ``train`` never
resolves ``teacher.factory``.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kdcache.errors import KdcacheError, PipelineError, option, raised, short
from kdcache.threads import CORES, MAX_PARALLEL


@dataclass(frozen=True)
class TeacherSection:
    factory: str = ""


@dataclass(frozen=True)
class DataSection:
    factory: str = ""
    split: str = "train"


@dataclass(frozen=True)
class TargetsSection:
    logits: bool = True
    layers: tuple[str, ...] = ()
    dtype: str = "float16"
    # target name ("logits" or a layer name) -> which part of a structured output to keep
    select: dict[str, str] = field(default_factory=dict)
    # the key of the dataset's dict inputs holding each item's (tokens,) padding mask, true where a position counts: a
    # select's mean averages the valid positions only, its last takes the last valid one ("": mean pools every position)
    mask: str = ""
    # > 0: the logits keep only their K largest values per position (and their classes), not every class's (0: all of them)
    topk: int = 0


@dataclass(frozen=True)
class ExtractSection:
    batch_size: int = 256
    device: str = "auto"
    precision: str = "fp32"
    num_workers: int = 0
    compression: str = "zstd"
    compression_level: int = 1
    rows_per_shard: int = 0  # 0: chosen from bytes per sample
    shard_mb: float = 64.0
    chunk_mb: float = 1.0
    queue_depth: int = 4
    threads: int = 0  # > 0: torch intra-op threads for the run (0: torch's default)


@dataclass(frozen=True)
class StudentSection:
    factory: str = ""
    select: str = "auto"  # which part of the student's output is its logits, as [targets.select] for the teacher's
    # the keys of the dataset's dict items the student is called with ((): every entry but the label, as the teacher is)
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class LossSection:
    kl: float = 1.0
    temperature: float = 4.0
    mse: float = 0.0
    mse_on: str = "logits"  # or "probabilities": softmax(logits / temperature) of both, as kl compares
    ce: float = 0.0


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 5
    steps: int = 0  # > 0: total optimizer steps, overriding epochs
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    schedule: str = "cosine"
    device: str = "auto"
    seed: int = 0
    eval_split: str = ""
    eval_cache: str = ""
    subset: int = 0  # > 0: train on a seeded choice of this many rows
    num_workers: int = 0
    memory_budget_mb: float = 2048.0
    shuffle_buffer_shards: int = 4
    fingerprint_check: float = 1.0  # fraction of rows checked in a run's first epoch
    fingerprint_recheck: float = 0.05  # fraction of rows re-checked in each later epoch
    eval_every: int = 1  # evaluate every N epochs (0: only after the last); the last epoch always is
    checkpoint_every: int = 0  # > 0: also save a checkpoint every N steps inside an epoch (resumed from there)
    threads: int = 0  # > 0: torch intra-op threads for the run (0: torch's default)
    # > 1: each step joins one batch from each of this many disjoint parts of the epoch's plan; torchrun
    # with K ranks uses K (one part per rank), and streams = K in one process reproduces it (docs/CLUSTER.md)
    streams: int = 1
    drop_last: bool = False  # leave out the incomplete last batch of each buffer (BatchNorm cannot train on one sample)
    precision: str = "fp32"  # bf16 / fp16: autocast for the student's forward (fp16 with a dynamic loss scale)
    # the key of the dataset's dict inputs holding each item's (tokens,) padding mask, true where a position counts: kl,
    # mse and per-token feature terms average each row over its valid positions ("": every position counts)
    mask: str = ""
    # under torchrun: how long a rank waits for the others in a training step's collectives (a hung or lost rank), in
    # seconds; start-up, checkpoints and the run's end wait up to distributed.TIMEOUT (docs/CLUSTER.md)
    rank_timeout_s: float = 1800.0
    loss: LossSection = field(default_factory=LossSection)
    # teacher layer -> {"student": module name, "weight": float, "select": part of the module's output} (FEATURE_DEFAULTS)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)


FEATURE_DEFAULTS = {"weight": 1.0, "select": "auto"}  # what a train.features entry that leaves them out has


@dataclass(frozen=True)
class Pipeline:
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    targets: TargetsSection = field(default_factory=TargetsSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    student: StudentSection = field(default_factory=StudentSection)
    train: TrainSection = field(default_factory=TrainSection)
    root: Path = Path(".")  # folder that relative import paths are resolved against
    source: str = "<dict>"  # where the values came from, for messages
    # the overrides applied over source, in order: (the key each sets, as messages spell it; how the user gave it)
    set_by: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The values as plain JSON-able data (what a store and a checkpoint record)."""
        out = dataclasses.asdict(self)
        out.pop("root"), out.pop("source"), out.pop("set_by")
        return _jsonable(out)

    def where(self, key: str) -> str:
        """Where the value of ``key`` (``"train.lr"``) came from, to begin a message about it: the override that set it
        (or a table holding it: ``train={lr=0}``; or, for a table, a key in it: ``--set train.features.conv.weight=1``
        made the entry ``'conv'``), as the user gave it (``--set train.lr=0``, ``--epochs 0``), else the pipeline file,
        whose value the message would otherwise seem to quote."""
        return next((given for set_key, given in reversed(self.set_by)
                     if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + ".")), self.source)

    def resolve(self, import_path: str) -> Callable[..., Any]:
        return resolve(import_path, self.root)

    def call(self, key: str, *args: Any) -> Any:
        """Call the factory at ``key`` (``"data.factory"``; required) with ``args``.

        An exception the factory raises becomes a PipelineError naming the factory, the exception and
        the line that raised it (the original is kept as its ``__cause__``).
        """
        section, name = key.split(".")
        path = require(getattr(getattr(self, section), name), key, self)
        try:
            factory = self.resolve(path)
        except PipelineError as e:  # named as every value's error is: where it came from, and its key
            raise PipelineError(f"{self.where(key)}: {key}: {e}") from e
        try:
            return factory(*args)
        except KdcacheError:
            raise
        except Exception as e:
            called = f" (called with {', '.join(map(repr, args))})" if args else ""
            raise PipelineError(
                f"{key} {path!r} raised {raised(e)}{called}; fix the factory or its arguments (call it in Python to see the full traceback)"
            ) from e


CHOICES = {
    ("targets", "dtype"): ("float16", "float32"),
    ("extract", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("extract", "compression"): ("zstd", "none"),
    ("train", "optimizer"): ("adamw", "sgd"),
    ("train", "schedule"): ("cosine", "constant"),
    ("train.loss", "mse_on"): ("logits", "probabilities"),
}
FRACTIONS = {("train", "fingerprint_check"), ("train", "fingerprint_recheck")}
# whole numbers whose least value is 1, not 0 (train.epochs: 0 too where train.steps > 0, which overrides it): a negative
# one is refused here naming that minimum, 0 by extract.setup and train.check_values, with their hints
COUNTS = {("extract", "batch_size"), ("extract", "queue_depth"), ("train", "batch_size"), ("train", "shuffle_buffer_shards"),
          ("train", "streams"), ("train", "epochs")}
_THREADS = (MAX_PARALLEL, f"use at most the number of cores ({CORES} here), or 0 for torch's default")
_WORKERS = (MAX_PARALLEL, f"a few per core is plenty ({CORES} cores here); 0 loads in the main process")
LIMITS = {  # upper bounds (inclusive), with what to use instead
    ("extract", "compression_level"): (22, "zstd levels run from 0 (zstd's default, 3) to 22; 1 is fast, 3-5 smaller"),
    ("extract", "shard_mb"): (4096, "the writer holds a shard in memory until it is complete; 64 is the default"),
    ("extract", "threads"): _THREADS, ("train", "threads"): _THREADS,
    ("extract", "num_workers"): _WORKERS, ("train", "num_workers"): _WORKERS,
    ("train", "loss", "temperature"): (1000.0, "use e.g. 1.0 (plain KL) or 2.0-4.0 (softer targets)"),
}
# what a number must be where its range is narrower than its type's "a finite number >= 0", for the message of a value
# that is not one (a string, a negative number): train.loss.temperature = -1 was told ">= 0", and 0 then "at least 0.01"
RANGES = {("train", "lr"): "a finite number > 0", ("train", "rank_timeout_s"): "a finite number > 0",
          ("extract", "shard_mb"): "a finite number > 0", ("extract", "chunk_mb"): "a finite number > 0",
          ("train.loss", "temperature"): "a number from 0.01 to 1000",
          **{key: "a fraction from 0 to 1" for key in FRACTIONS}}
FLOAT32_MAX = 3.4028234663852886e38  # torch computes in float32: a larger value overflows


PIPELINE_FIRST = ("pass the pipeline's .toml file there: kdcache extract PIPELINE --out STORE, kdcache train PIPELINE --cache "
                  "STORE --out RUN, kdcache verify STORE --pipeline PIPELINE")


def not_a_pipeline(path: str | Path) -> str | None:
    """What ``path`` is where it is one of kdcache's own outputs given in a pipeline file's place (the arguments swapped,
    ``kdcache train STORE --cache PIPELINE``): a store folder, a training run's folder, a packed store or an HDF5 export;
    None otherwise. Reads a few bytes at most."""
    path = Path(path)
    try:
        if path.is_dir():
            if (path / "zarr.json").is_file():
                return "a zarr store folder (kdcache extract's output)"
            if (path / "pipeline.json").is_file():
                return "a training run's folder (kdcache train --out)"
            return None
        with path.open("rb") as f:
            head = f.read(8)
        if head == b"\x89HDF\r\n\x1a\n":
            return "an HDF5 file (kdcache export's output)"
        if head[:4] == b"PK\x03\x04" and path.name.endswith(".zarr.zip"):
            return "a zip file (kdcache pack's output)"
    except OSError:
        return None
    return None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, given: dict[str, str] | None = None) -> Pipeline:
    """Read a pipeline TOML file and apply ``section.key=value`` overrides. ``given``: how the user gave an override, where
    not as ``--set`` (the CLI's shortcut flags: ``{"train.epochs=0": "--epochs 0"}``), for messages about its value."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (some Windows editors) is not TOML
    except FileNotFoundError:
        raise PipelineError(f"pipeline file {str(path)!r} does not exist; pass the path of a .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"pipeline file {str(path)!r} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, unreadable, binary
        kind = not_a_pipeline(path)
        if kind is not None:
            raise PipelineError(f"pipeline file {str(path)!r} is {kind}, not a pipeline file; {PIPELINE_FIRST}") from None
        raise PipelineError(f"pipeline file {str(path)!r} cannot be read as UTF-8 text ({e}); pass the path of a .toml file") from None
    if isinstance(overrides, str):  # one override, not a list of them: each character would be read as an override
        raise PipelineError(f"overrides is the string {overrides!r}, not a list of section.key=value strings; pass [{overrides!r}]")
    if overrides is None:
        overrides = ()
    if isinstance(overrides, dict):  # {"extract.batch_size": 64}: iterating it would give the keys alone
        flat = not any(isinstance(v, dict) for v in overrides.values())
        example = [f"{k}={json.dumps(v)}" for k, v in overrides.items()] if flat else ["extract.batch_size=64"]
        raise PipelineError(f"overrides is a dict, {short(overrides)}, not a list of section.key=value strings; pass {short(example)}")
    set_by = []
    for item in overrides:
        if not isinstance(item, str):
            raise PipelineError(f"override {short(item)} is a {type(item).__name__}, not a section.key=value string (e.g. 'extract.batch_size=64')")
        set_by.append((_spelled(apply_override(raw, item)), (given or {}).get(item) or option(f"--set {item}", f"override {item!r}")))
    source = str(path)
    try:
        pipeline = from_dict(raw, root=path.resolve().parent, source=source)
    except PipelineError as e:  # a value an override set is named as the override, not as the file's (which it replaced)
        text = str(e).removeprefix(f"{source}: ")
        where = Pipeline(source=source, set_by=tuple(set_by)).where(_subject(text))
        if where == source or text == str(e):
            raise
        raise type(e)(f"{where}: {text}") from None
    return dataclasses.replace(pipeline, set_by=tuple(set_by))


def _subject(text: str) -> str:
    """The key a ``from_dict`` message (less its source) is about: its first word (``train.lr must be ...``), a
    section's (``[train] must be a table``), or an unknown key's (``unknown key 'train.lrr'; ...``: a --set's typo)."""
    if text.startswith("unknown key "):
        spelled = text.removeprefix("unknown key ").split(";", 1)[0]
        try:
            return str(ast.literal_eval(spelled))
        except (ValueError, SyntaxError):
            return ""
    return text.split(" ", 1)[0].removeprefix("[").removesuffix("]")


def _spelled(parts: list[str]) -> str:
    """A key's parts as messages spell the key: a layer's name under ``train.features`` or ``targets.select`` quoted
    (``train.features.'features.3'.weight``), every other part as it is."""
    return ".".join(repr(part) if tuple(parts[:i]) in (("train", "features"), ("targets", "select")) else part
                    for i, part in enumerate(parts))


def check_pipeline(value: Any) -> Pipeline:
    """The ``pipeline`` argument of ``extract``/``dry_run``/``train``: a loaded Pipeline, not the path of its file or a dict
    (which failed deep inside with an AttributeError)."""
    if isinstance(value, Pipeline):
        return value
    if isinstance(value, (str, os.PathLike)):
        fix = f"load it first: kdcache.load_pipeline({os.fspath(value)!r})"
    elif isinstance(value, dict):
        fix = "load a pipeline file with kdcache.load_pipeline(PATH), or validate a dict with kdcache.pipeline.from_dict(raw, root=FOLDER)"
    else:
        fix = "load one with kdcache.load_pipeline(PATH)"
    raise TypeError(f"pipeline must be a kdcache.Pipeline, got {type(value).__name__} {short(value)}; {fix}")


def apply_override(raw: dict[str, Any], item: str) -> list[str]:
    """Apply one ``a.b.c=value`` override in place (returns the key's parts); the value is parsed as TOML, else taken as a string.

    The key is a TOML dotted key, so a part holding dots is quoted: ``targets.select."encoder.layers.1"=0``.
    """
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"override {item!r} is not of the form section.key=value (e.g. extract.batch_size=64)")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *parents, leaf = parts = _key_parts(key.strip(), item)
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(f"override {item!r}: {part!r} is a value, not a section")
    node[leaf] = value
    return parts


def _key_parts(key: str, item: str) -> list[str]:
    try:
        node: Any = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        raise PipelineError(f"override {item!r}: {key!r} is not a dotted key (quote a part holding dots or spaces: a.\"b.c\"=value)") from None
    parts = []
    while isinstance(node, dict):
        (part, node), = node.items()
        parts.append(part)
    return parts


def from_dict(raw: dict[str, Any], root: str | Path = ".", source: str = "<dict>") -> Pipeline:
    """Validate plain values (as read from TOML, or built in code) into a ``Pipeline``; unknown keys are errors."""
    if not isinstance(raw, dict):  # a list of pairs, None: an AttributeError deep inside said nothing
        raise TypeError(f"raw must be a dict of pipeline sections ({{'teacher': {{'factory': ...}}, ...}}), got {type(raw).__name__} {short(raw)}")
    raw = _plain(raw)
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(Pipeline):
        if f.name in ("root", "source", "set_by"):
            continue
        value = raw.get(f.name, {})
        if not isinstance(value, dict):
            raise PipelineError(f"{source}: [{f.name}] must be a table, got {_seen(value)}; write a [{f.name}] section header and its keys below it")
        sections[f.name] = _section(_SECTIONS[f.name], value, f.name, source)
    _unknown(raw, list(_SECTIONS), "", source)
    return Pipeline(**sections, root=Path(root), source=source)


def _plain(value: Any) -> Any:
    """A dict built in code as TOML would give it: numpy scalars (``np.int64(8)`` from a sweep's ``np.arange``, refused
    as "must be a whole number >= 1, got np.int64(8)") as Python's, tuples as lists; the caller's dicts copied, not
    changed by the checks (a ``train.features`` entry's select was rewritten in place)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


_SECTIONS = {
    "teacher": TeacherSection,
    "data": DataSection,
    "targets": TargetsSection,
    "extract": ExtractSection,
    "student": StudentSection,
    "train": TrainSection,
}


def _section(cls: type, values: dict[str, Any], where: str, source: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    _unknown(values, names, where + ".", source)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, key = values[f.name], f"{where}.{f.name}"
        if (where, f.name) == ("student", "select"):
            kwargs[f.name] = _selector(value, key, source)
            continue
        if f.name == "loss":
            kwargs[f.name] = _section(LossSection, _table(value, key, source), key, source)
            continue
        kwargs[f.name] = _check(value, f.type, key, source, "a whole number >= 1" if (where, f.name) in COUNTS else RANGES.get((where, f.name)))
        limit, use = LIMITS.get((*where.split("."), f.name), (None, ""))
        if limit is not None and kwargs[f.name] > limit:
            raise PipelineError(f"{source}: {key} = {value!r} is above its limit of {limit:g}; {use}")
        if (where, f.name) in FRACTIONS and kwargs[f.name] > 1:
            raise PipelineError(f"{source}: {key} = {value!r} is a fraction of rows; use a value from 0 to 1")
        choices = CHOICES.get((where, f.name))
        if choices and kwargs[f.name] not in choices:
            raise PipelineError(f"{source}: {key} = {value!r} is not one of {', '.join(choices)}")
    if where in ("targets", "student"):  # targets.layers, student.inputs: each name once
        listed, what = ("layers", "layer") if where == "targets" else ("inputs", "key")
        names = list(kwargs.get(listed, ()))
        twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if twice is not None:
            raise PipelineError(f"{source}: {where}.{listed} lists {twice!r} twice; list each {what} once")
    if where == "targets" and "select" in kwargs:
        kwargs["select"] = {name: _selector(v, f"targets.select.{name!r}", source) for name, v in kwargs["select"].items()}
    if where == "train":
        for layer, spec in _table(values.get("features", {}), "train.features", source).items():
            spec = _table(spec, f"train.features.{layer!r}", source)
            split = next((k for k, v in spec.items() if k not in ("student", "weight", "select") and isinstance(v, dict)), None)
            if split is not None:  # train.features.features.3.weight: TOML splits the layer's name at its dot
                leaf, value = next(iter(spec[split].items()), ("weight", 1.0))
                given = f"{leaf}={json.dumps(value) if isinstance(value, int | float | str) else '...'}"
                raise PipelineError(f"{source}: unknown key {f'train.features.{layer!r}.{split}'!r}; a layer name holding dots is "
                                    f"one quoted key: train.features.\"{layer}.{split}\" (on a command line: "
                                    f"--set 'train.features.\"{layer}.{split}\".{given}')")
            _unknown(spec, ["student", "weight", "select"], f"train.features.{layer!r}.", source)
            if "student" not in spec:
                raise PipelineError(
                    f"{source}: train.features.{layer!r} needs student = \"<student module name>\", got {_seen(spec)}"
                )
            toml_layer = layer if re.fullmatch(r"[A-Za-z0-9_-]+", layer) else json.dumps(layer)  # as a TOML key spells it
            _check(spec["student"], "str", f"train.features.{toml_layer}.student", source,
                   "a quoted string, the name of a student module (student.named_modules())")
            _check(spec.get("weight", FEATURE_DEFAULTS["weight"]), "float", f"train.features.{layer!r}.weight", source)
            if "select" in spec:
                spec["select"] = _selector(spec["select"], f"train.features.{layer!r}.select", source)
    return cls(**kwargs)


def _selector(value: Any, key: str, source: str) -> str:
    """A ``[targets.select]`` (or ``train.features`` / ``student.select``) value: a non-empty string; an integer index
    is taken as its string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise PipelineError(
            f"{source}: {key} must be a string such as \"0\", \"logits\" or \"hidden_states.3\", got {_seen(value)} "
            "(quote a layer name holding dots: [targets.select] \"encoder.layers.1\" = \"0\")"
        )
    return value


def _table(value: Any, key: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PipelineError(f"{source}: {key} must be a table, got {_seen(value)}; use {{ key = value, ... }} or a [{key}] section")
    return value


def _check(value: Any, annotation: str, key: str, source: str, use: str | None = None) -> Any:
    """Coerce/check one value against its field annotation (a string, from __future__ annotations); ``use``: what the
    value must be, where not what its type's ``_USE`` says."""
    bad = PipelineError(f"{source}: {key} must be {use or _USE.get(annotation, 'a table, e.g. { key = value }')}, got {_seen(value)}"
                        f"{_as_text(value) if annotation in ('int', 'float') else _unquoted(value, key) if annotation == 'str' else ''}")
    if annotation == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad
        if value >= 2**63:
            raise PipelineError(f"{source}: {key} = {value!r} is beyond a 64-bit integer's range, where torch and numpy count; use a realistic value")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
            raise bad  # negative, NaN or inf
        if value > FLOAT32_MAX:
            raise PipelineError(f"{source}: {key} = {value!r} is beyond float32's range (3.4e38), where torch computes; use a realistic value")
        return float(value)
    if annotation == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if annotation == "tuple[str, ...]":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad
        return tuple(value)
    if annotation.startswith("dict"):
        if not isinstance(value, dict):
            raise bad
        return value
    raise AssertionError(f"no check for annotation {annotation!r}")


def _seen(value: Any) -> str:
    """A value a message quotes, as the pipeline file spells it where Python's repr would not: a TOML date or time
    (``1979-05-27``, which Python shows as ``datetime.date(1979, 5, 27)``), in a list or table too."""
    if isinstance(value, datetime.date | datetime.time):  # a datetime is a date
        return value.isoformat()
    if isinstance(value, list):
        return f"[{', '.join(map(_seen, value))}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k!r}: {_seen(v)}' for k, v in value.items())}}}"
    return repr(value)


def _as_text(value: Any) -> str:
    """For a number TOML reads as text (``.001``, ``1.``: a --set value that is not TOML is taken as a string), how to
    write it; else nothing."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\.\d+|\d+\.)([eE][+-]?\d+)?", value.strip()):
        return " (text: a TOML number has digits on both sides of its point, e.g. 0.001 or 1.0)"
    return ""


def _unquoted(value: Any, key: str) -> str:
    """For a string value TOML read as another scalar (a split named ``1``, a date), how to quote it: in the file, and
    with ``--set``, where the shell would strip the quotes of ``--set key="1"`` (the same error again) unless the whole
    override is quoted too."""
    if isinstance(value, bool):
        text, kind = ("true" if value else "false"), "a boolean"
    elif isinstance(value, int | float):
        text, kind = str(value), "a number"
    elif isinstance(value, datetime.date | datetime.time):  # a datetime is a date
        text, kind = value.isoformat(), "a date or time"
    else:
        return ""
    quoted = json.dumps(text)
    return f" (TOML reads {text} unquoted as {kind}: write {key} = {quoted}; on a command line, quote it for the shell too: --set '{key}={quoted}')"


_USE = {"bool": "true or false", "int": "a whole number >= 0", "float": "a finite number >= 0", "str": "a quoted string",
        "tuple[str, ...]": 'a list of names, e.g. ["a", "b"]'}  # what a value of each type must be


def _unknown(values: dict[str, Any], known: list[str], prefix: str, source: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            elsewhere = [f"{name}.{key}" for name, cls in _SECTIONS.items()  # the right key in the wrong section, or in none
                         if f"{name}." != prefix and key in {f.name for f in dataclasses.fields(cls)}]
            if close:
                hint = f"; did you mean {' or '.join(prefix + c for c in close)}?"
            elif elsewhere:
                section, _ = elsewhere[0].split(".")
                where = f"{prefix.rstrip('.')} has no {key!r}" if prefix else \
                    f"every key sits in a section: [{section}] {key} = … in a file, --set {elsewhere[0]}=… on a command line"
                hint = f"; did you mean {' or '.join(elsewhere)}? ({where})"
            else:
                hint = f"; known keys: {', '.join(known)}"
            raise PipelineError(f"{source}: unknown key {prefix + key!r}{hint}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def resolve(import_path: str, root: str | Path = ".") -> Callable[..., Any]:
    """Import ``package.module:attr`` or ``path/to/file.py:attr`` (relative to ``root``) and return the attribute."""
    module_name, sep, attr = import_path.rpartition(":")
    if not sep or not module_name or not attr:
        raise PipelineError(
            f"import path {import_path!r} is not of the form package.module:attr or path/to/file.py:attr"
        )
    if module_name.endswith(".py"):
        file = (Path(root) / module_name).resolve()
        if not file.is_file():
            raise PipelineError(f"import path {import_path!r}: file {str(file)!r} does not exist (paths are relative to the pipeline file's folder)")
        try:
            module = _import_file(file)
        except Exception as e:
            raise _import_error(import_path, e) from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if not (e.name and (module_name + ".").startswith(e.name + ".")):  # a module it imports is missing
                raise _import_error(import_path, e) from e
            raise PipelineError(f"import path {import_path!r}: module {e.name!r} not found; install it or use a path/to/file.py:attr path") from None
        except Exception as e:
            raise _import_error(import_path, e) from e
    try:
        return getattr(module, attr)
    except AttributeError:
        # a factory is called: a module the file imports (np) or a constant is no name to offer for one. Only names close to
        # it are looked at: in a lazy module (transformers') each getattr imports a submodule, which may fail
        names = [n for n in dir(module) if not n.startswith("_")]
        close = [n for n in difflib.get_close_matches(attr, names, n=10) if _callable_attr(module, n)][:3]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise PipelineError(f"import path {import_path!r}: {module.__name__!r} has no attribute {attr!r}{hint}") from None


def _callable_attr(module: Any, name: str) -> bool:
    """Whether ``module.name`` is callable; False where getting it fails (a lazy module's submodule that cannot import)."""
    try:
        return callable(getattr(module, name))
    except Exception:  # noqa: BLE001 - any failure: not a name to offer
        return False


def _import_error(import_path: str, e: Exception) -> KdcacheError:
    """An exception raised by the code an import path runs when imported, as a PipelineError naming it and where."""
    if isinstance(e, KdcacheError):
        return e
    what = f"SyntaxError: {e.msg} (at {Path(e.filename or '?').name}:{e.lineno})" if isinstance(e, SyntaxError) else raised(e)
    return PipelineError(f"import path {import_path!r}: importing it raised {what}; fix that file (import it in Python to see the full traceback)")


def _import_file(file: Path) -> Any:
    """Import a Python file once per process, under its own stem when that name is free.

    Using the stem keeps objects defined there picklable by DataLoader/dask workers that import
    the same file; the file's folder goes on ``sys.path`` (at its end) so it can import its siblings.
    """
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.endswith(file.name) and Path(path).resolve() == file:  # endswith: cheap filter before resolve
            return module
    name = file.stem
    found = None if name in sys.modules else importlib.util.find_spec(name)
    if name in sys.modules or (found is not None and not (found.origin and Path(found.origin).resolve() == file)):  # taken by another module
        name = f"{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:8]}"
    if str(file.parent) not in sys.path:  # last: a file there named like a module (json.py) must not shadow it for the
        sys.path.append(str(file.parent))  # rest of the process, or in the workers it spawns, which inherit sys.path
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def require(value: str, key: str, pipeline: Pipeline) -> str:
    """Return a required string value or fail naming the key."""
    if not value:
        raise PipelineError(f"{pipeline.where(key)}: {key} is required (e.g. {key} = \"file.py:attr\")")
    return value
