"""Costs at scale: the work a command does per object, shard or epoch must not grow with the store's size or its number
of targets. Measured by counting calls or reads, never by time (benchmarks/RESULTS.md, session 34, has the timings)."""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path
from typing import Any, Callable

import kdcache
from kdcache import interop
from kdcache.pipeline import from_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def deep_pipeline(depth: int, rows_per_shard: int = 2) -> Any:
    """scaled.py's teacher of ``depth`` layers, each layer a stored target beside the logits."""
    return from_dict({
        "teacher": {"factory": "scaled.py:teacher"},
        "data": {"factory": "scaled.py:dataset", "split": "train"},
        "targets": {"logits": True, "layers": [f"layers.{i}" for i in range(depth)], "dtype": "float32"},
        "extract": {"batch_size": 2, "device": "cpu", "rows_per_shard": rows_per_shard},
        "student": {"factory": "scaled.py:student"},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu"},
    }, root=FIXTURES)


def calls_from(module: str, fn: Callable[..., Any], *args: Any) -> tuple[int, Any]:
    """(calls made from the file ``module`` while ``fn(*args)`` runs, counted by cProfile, builtins too; fn's result)."""
    profile = cProfile.Profile()
    result = profile.runcall(fn, *args)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return sum(counts[0] for *_, callers in stats.values() for caller, counts in callers.items() if caller[0].endswith(module)), result


def test_pack_and_verify_look_up_each_objects_array_in_steps_that_do_not_grow_with_the_arrays(tmp_path: Path, zoo_env):
    """pack and verify's added-arrays check found each object's array by trying every array of the store: objects x
    arrays (a store of 200 layers of 100 shards spent 4 s on it, growing with the square of its targets)."""
    per_object = {}
    for depth in (8, 32):
        zoo_env(DEPTH=depth, N=4)
        store = str(tmp_path / f"deep{depth}.zarr")
        kdcache.extract(deep_pipeline(depth), store)
        packed, result = calls_from("interop.py", interop.pack, store, str(tmp_path / f"deep{depth}.zarr.zip"))
        checked, _ = calls_from("interop.py", interop.check_added_arrays, kdcache.open_store(store))
        per_object[depth] = (packed / result["objects"], checked / result["objects"])
    # 4x the arrays: per object, old code made 1.3x (pack) and 1.7x (the check) the calls, new 1.05x and 1.04x
    assert per_object[32][0] < 1.15 * per_object[8][0], per_object
    assert per_object[32][1] < 1.15 * per_object[8][1], per_object
