"""Where one ``kdcache.extract`` call spends its time, by thread: a diagnosis for benchmark 1, not a benchmark.

Wraps the loop's stages with timers and runs one extract of ``models.resnet`` (the bench_extract
teacher) with the chosen targets. Main thread: waiting for the next batch from the DataLoader, the
forward call (on a GPU only the launch unless the copy waits), ``to_host`` and ``ShardWriter.put``
(on a GPU, time blocked on a full queue: the writer is behind). Writer thread (GPU) or main thread
(CPU): ``ShardWriter._absorb`` (event wait + gathering) and ``_reap`` (waiting for a free write
slot: the writes are behind). Write pool: ``Store.write_shard`` (encode + checksum + file write).
Input hashing runs inside the DataLoader (its workers' time is not seen here when num_workers > 0).

    python benchmarks/profile_extract.py [--device cuda] [--layers layer1] [--n N] [--out profile.json]
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import DataLoader

import harness
import kdcache
from kdcache import data, store as layout

kx = importlib.import_module("kdcache.extract")  # the module (kdcache.extract is also the function)
SPENT: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])  # (stage, thread) -> [s, calls]
LOCK = threading.Lock()


def record(stage: str, seconds: float) -> None:
    with LOCK:
        entry = SPENT[(stage, threading.current_thread().name.split("_")[0])]
        entry[0] += seconds
        entry[1] += 1


def timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record(stage, time.perf_counter() - start)
    return wrapper


def timed_iter(make: Callable[..., Any]) -> Callable[..., Any]:
    """``DataLoader.__iter__`` whose iterator records the wait for each batch."""
    def wrapper(self: Any) -> Any:
        it = make(self)

        def gen() -> Any:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                record("DataLoader next batch", time.perf_counter() - start)
                yield batch
        return gen()
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    p.add_argument("--workdir", default="", help="folder for the store (default: a temp folder)")
    p.add_argument("--n", type=int, default=0, help="images (default: 512 on cpu, 8192 on cuda)")
    p.add_argument("--layers", default="layer1", help="comma-separated teacher layers to store besides logits ('' for none)")
    harness.add_extract_options(p)  # bench_extract's settings and defaults
    args = p.parse_args()
    n = args.n or (8192 if args.device.startswith("cuda") else 512)
    options = harness.extract_options(args)
    batch, workers = options["batch_size"], options["num_workers"]
    layers = [x for x in args.layers.split(",") if x]
    pipe = harness.bench_pipeline("resnet", n, layers, args.device, **options)
    out = harness.workdir(args) / "profile.zarr"
    kdcache.extract(pipe, str(out), overwrite=True)  # warm-up: imports, kernels, page cache
    patches = [(kx, "to_host"), (data, "call"), (kx.ShardWriter, "put"), (kx.ShardWriter, "_absorb"),
               (kx.ShardWriter, "_reap"), (layout.Store, "write_shard")]
    for owner, name in patches:
        setattr(owner, name, timed(f"{owner.__name__}.{name}", getattr(owner, name)))
    DataLoader.__iter__ = timed_iter(DataLoader.__iter__)
    SPENT.clear()
    start = time.perf_counter()
    kdcache.extract(pipe, str(out), overwrite=True)
    harness.sync(args.device)
    wall = time.perf_counter() - start
    print(f"extract of {n} images, batch {batch}, {args.device}, workers {workers}, targets logits+{layers}, {args.compression}: "
          f"{wall:.2f} s ({n / wall:,.0f} samples/s, whole call)")
    stages = []
    for (stage, thread), (seconds, calls) in sorted(SPENT.items(), key=lambda kv: -kv[1][0]):
        print(f"  {thread:<14} {stage:<36} {seconds:8.3f} s  {calls:5d} calls  {100 * seconds / wall:5.1f} % of the wall")
        stages.append({"thread": thread, "stage": stage, "seconds": seconds, "calls": calls})
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "n": n, "batch_size": batch, "num_workers": workers,
                                              "layers": layers, "compression": args.compression, "wall_s": wall,
                                              "stages": stages}, indent=2) + "\n")


if __name__ == "__main__":
    main()
