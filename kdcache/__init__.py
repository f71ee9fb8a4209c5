"""kdcache: run an expensive teacher once, distil students from its cached outputs.

Public API (the CLI is thin glue over these):

- ``load_pipeline(path, overrides)`` — read a pipeline TOML file.
- ``extract(pipeline, out)`` / ``dry_run(pipeline)`` — score a dataset into a store.
- ``open_store(location)`` — open a store read-only; ``store.info()`` summarises it.
- ``train(pipeline, cache, out)`` — train a student from a store alone.
"""

from __future__ import annotations

__version__ = "0.1.2"

from kdcache.errors import KdcacheError
from kdcache.extract import dry_run, extract
from kdcache.pipeline import Pipeline, load as load_pipeline
from kdcache.store import Store, open_store
from kdcache.train import train

__all__ = ["KdcacheError", "Pipeline", "Store", "dry_run", "extract", "load_pipeline", "open_store", "train", "__version__"]
