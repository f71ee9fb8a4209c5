"""kdcache: run an expensive teacher once, distil students from its cached outputs.

Public API (the CLI is thin glue over these):

- ``load_pipeline(path, overrides)`` — read a pipeline TOML file.
- ``extract(pipeline, out)`` / ``dry_run(pipeline, out=None)`` — score a dataset into a store / check it all first, writing nothing.
- ``open_store(location)`` — open a store read-only; ``store.info()`` summarises it.
- ``train(pipeline, cache_location, out)`` — train a student from a store alone.
- ``TransferSet(location, dataset, paths, batch_size=...)`` — the store's targets joined with the dataset's inputs,
  alignment checked, for a training loop of one's own.

The names are imported on first use: ``kdcache info``, ``verify`` or ``--help`` never import torch
(about 2 s), and a Ctrl-C during that import is the command's to report.
"""

from __future__ import annotations

import importlib
import sys
import types

TYPE_CHECKING = False  # typing's, without importing typing: ``kdcache`` (the program) imports this package before it can
# take a Ctrl-C itself (``__main__.run``), and Python's handler raised one landing in that import as a traceback
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.15"

_API = {  # name -> (module, attribute)
    "KdcacheError": ("kdcache.errors", "KdcacheError"),
    "Pipeline": ("kdcache.pipeline", "Pipeline"),
    "Store": ("kdcache.store", "Store"),
    "TransferSet": ("kdcache.cache", "TransferSet"),
    "dry_run": ("kdcache.extract", "dry_run"),
    "extract": ("kdcache.extract", "extract"),
    "load_pipeline": ("kdcache.pipeline", "load"),
    "open_store": ("kdcache.store", "open_store"),
    "train": ("kdcache.train", "train"),
}
# modules the docs name by their dotted path (kdcache.losses.kl_divergence, except kdcache.errors.AlignmentError,
# kdcache.distributed.extract_distributed, kdcache.pipeline.from_dict, kdcache.verify.verify, kdcache.stats.stats):
# reachable after a bare ``import kdcache``, imported on first use too
_MODULES = ("distributed", "errors", "losses", "pipeline", "stats", "verify")
__all__ = ["KdcacheError", "Pipeline", "Store", "TransferSet", "dry_run", "extract", "load_pipeline", "open_store", "train", "__version__"]

if TYPE_CHECKING:
    from kdcache.cache import TransferSet
    from kdcache.errors import KdcacheError
    from kdcache.extract import dry_run, extract
    from kdcache.pipeline import Pipeline, load as load_pipeline
    from kdcache.store import Store, open_store
    from kdcache.train import train


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"kdcache.{name}")  # which binds it here
    if name not in _API:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | set(_MODULES))


class _Package(types.ModuleType):
    """``kdcache.extract`` and ``kdcache.train`` are the API's functions, in modules of the same names: importing such
    a module binds it in its package (``setattr``), which must not replace the function (as the eager imports of
    kdcache 0.1.1 and earlier left it: the function, whatever was imported first)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _API:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
