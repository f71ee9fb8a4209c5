"""2. Writer bandwidth: store write MB/s ÷ ``numpy.tofile`` MB/s to the same folder.

Float16 activation maps (ReLU'd seeded normals, ``[N, 64, 32, 32]``, 128 KB/sample) go through
the writer extract uses (``extract.ShardWriter`` gathering batches into shards, ``Store.write_shard``),
with compression ``none`` (the goal: >= 0.5) and ``zstd`` level 1 (reported; compression is CPU-bound).
The store flushes each shard to the disk before marking it done (fsync, FORMAT.md §13.1), which ``numpy.tofile``
does not: where the page cache takes all of tofile's bytes, the ratio compares the disk with memory. ``tofile`` then
``fsync`` (the same bytes made as durable) is measured beside it and its ratio reported, without a goal.

    python benchmarks/bench_writer.py [--check] [--out writer.json]
"""

from __future__ import annotations

import importlib
import os
import shutil

import numpy as np
import torch

import harness
from kdcache import store as layout
from kdcache.progress import Progress

kx = importlib.import_module("kdcache.extract")
SHAPE = (64, 32, 32)


def relu_maps(n: int) -> np.ndarray:
    """``n`` float16 activation maps of SHAPE: ReLU'd seeded normals (half zeros, as real ReLU maps; they compress)."""
    return np.maximum(np.random.default_rng(0).standard_normal((n, *SHAPE), dtype=np.float32), 0).astype(np.float16)


def write_store(location: str, maps: np.ndarray, codec: str, batch: int) -> None:
    n = len(maps)
    target = layout.Target("layer1", layout.layer_path("layer1"), SHAPE, "float16", "layer1", "tensor")
    bps = {layout.INDEX: 8, layout.FINGERPRINT: 8, target.path: maps[0].nbytes}
    manifest = {"num_samples": n, "has_labels": False, "targets": {"layer1": target.to_dict()}, "kdcache_version": "bench",
                "teacher": {"factory": "-", "class": "-", "weights_sha256": "-", "num_parameters": 0},
                "dataset": {"factory": "-", "split": "-", "length": n, "probe_fingerprints": {"0": "0" * 16, str(n - 1): "0" * 16}},
                "geometry": layout.plan_geometry(n, bps), "compression": {"codec": codec, "level": 1, "checksum": "crc32c"}}
    store = layout.create_or_resume(location, lambda _: manifest, overwrite=True)
    total = torch.zeros(())  # extract.to_host: the batch's float32 sum (finite: no value to look at)
    with kx.ShardWriter(store, 4, Progress(n, "write", enabled=False)) as writer:
        for shard in range(store.num_shards):
            start, stop = store.shard_rows(shard)
            for lo in range(start, stop, batch):
                rows = np.arange(lo, min(lo + batch, stop))
                b = {"index": rows, "fingerprint": rows.astype(np.uint64), "label": None}
                writer.put(b, {target.path: torch.from_numpy(maps[lo : lo + len(rows)]), target.path + "#sum": total}, None)


def durable_tofile(maps: np.ndarray, path) -> None:
    """``numpy.tofile``, then the file flushed to the disk (what the store does for each shard)."""
    with open(path, "wb") as f:
        maps.tofile(f)
        f.flush()
        os.fsync(f.fileno())


def clean(work) -> None:
    """Delete what a timed write left, so each write creates new files (as extract does)."""
    for path in work.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=0, help="samples (default 4096: 512 MiB of float16)")
    args = p.parse_args()
    n = args.n or (1024 if args.quick else 4096)
    work = harness.workdir(args)
    report = harness.Report("writer", args)
    maps = relu_maps(n)
    mb = maps.nbytes / 1e6
    print(f"writer bandwidth: {n} x {list(SHAPE)} float16 = {mb:,.0f} MB into {work}")
    rounds = harness.interleaved({
        "tofile": lambda: maps.tofile(work / "maps.bin"),
        "tofile_fsync": lambda: durable_tofile(maps, work / "durable.bin"),
        "none": lambda: write_store(str(work / "none.zarr"), maps, "none", 256),
        "zstd": lambda: write_store(str(work / "zstd.zarr"), maps, "zstd", 256),
    }, args.repeats, cleanup=lambda: clean(work))
    for k in rounds[0]:
        report.figure(f"{k}_MB_per_s", harness.median_of(rounds, lambda r: mb / r[k]))
    write_store(str(work / "none.zarr"), maps, "none", 256)
    back = layout.open_store(str(work / "none.zarr")).read(layout.layer_path("layer1"), 0, n)
    assert np.array_equal(back.view(np.uint16), maps.view(np.uint16)), "store does not read back what was written"
    none, zstd = (harness.median_of(rounds, lambda r: r["tofile"] / r[k]) for k in ("none", "zstd"))
    report.figure("ratio_none_vs_tofile", none)
    report.figure("ratio_zstd1_vs_tofile", zstd, "(reported, no goal: zstd is CPU-bound)")
    durable = harness.median_of(rounds, lambda r: r["tofile_fsync"] / r["none"])
    report.figure("ratio_none_vs_tofile_fsync", durable, "(reported, no goal: both flushed to the disk)")
    report.goal("store write (none) / numpy.tofile", none, ">=", 0.5)
    shutil.rmtree(work, ignore_errors=True)
    report.finish()


if __name__ == "__main__":
    main()
