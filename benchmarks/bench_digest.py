"""8. Shard digest cost: whole-shard reads with the digest check ÷ the same reads without it.

Float16 activation maps (bench_writer's ReLU'd seeded normals, 128 KB/sample) written with codec
``none`` and ``zstd`` level 1; each round reads every shard whole (``Store.read``, the training reader's
call) with ``digests=True`` and with ``digests=False``, interleaved, in CPU seconds of this process. With codec none the digest is
combined from the inner chunks' crc32c the read checks anyway (FORMAT.md §7.1); with zstd it is one
CRC-32C pass over the decoded rows. Reported, no goal: the time of the writer's digest of one shard,
combined from the chunk checksums (codec none) and as a pass over the rows (zstd).

    python benchmarks/bench_digest.py [--check] [--out digest.json]
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Callable

import google_crc32c
import numpy as np

import harness
from bench_writer import SHAPE, relu_maps, write_store
from kdcache import store as layout

PATH = layout.layer_path("layer1")
# none: the digest is combined from checksums the read verifies anyway (a pass over the rows costs ~15 % of such a
# read); zstd: one CRC-32C over each decoded chunk (~13 GB/s) beside the decode (~1 GB/s per core): ~4-7 %.
GOALS = {"none": 1.05, "zstd": 1.10}


def read_all(store: layout.Store, digests: bool) -> None:
    for shard in range(store.num_shards):
        store.read(PATH, *store.shard_rows(shard), digests=digests)


def cpu_rounds(fns: dict[str, Callable[[], Any]], repeats: int) -> list[dict[str, float]]:
    """``harness.interleaved`` counting this process's CPU seconds, not the wall's: the check is CPU work, and the
    other agents on a shared 2-core box move a 0.1 s read's wall time by 2x (its CPU time by a few %). Every other
    round runs the functions in reverse order, so that none always follows the same one."""
    rounds = []
    for r in range(1 + repeats):  # one warm-up round
        times = {}
        for name, fn in (list(fns.items()) if r % 2 else list(fns.items())[::-1]):
            start = time.process_time()
            fn()
            times[name] = time.process_time() - start
        if r:
            rounds.append(times)
    return rounds


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0], repeats=7)
    p.add_argument("--n", type=int, default=0, help="samples (default 2048: 268 MB of float16)")
    args = p.parse_args()
    n = args.n or (512 if args.quick else 2048)
    work = harness.workdir(args)
    report = harness.Report("digest", args)
    maps = relu_maps(n)
    print(f"shard digests: {n} x {list(SHAPE)} float16 = {maps.nbytes / 1e6:,.0f} MB in {work}")
    stores = {}
    for codec in ("none", "zstd"):
        write_store(str(work / f"{codec}.zarr"), maps, codec, 256)
        stores[codec] = layout.open_store(str(work / f"{codec}.zarr"))
        assert stores[codec].has_digests() and stores[codec].digests().all(), "the store records no digests"
    rounds = cpu_rounds({f"{codec}_{check}": (lambda s=store, d=(check == "checked"): read_all(s, d))
                         for codec, store in stores.items() for check in ("checked", "unchecked")}, args.repeats)
    for codec in stores:
        cost = harness.median_of(rounds, lambda r: r[f"{codec}_checked"] / r[f"{codec}_unchecked"])
        report.figure(f"read_{codec}_checked_vs_unchecked", cost, harness.spread(rounds, lambda r: r[f"{codec}_checked"] / r[f"{codec}_unchecked"]))
        report.goal(f"whole-shard read with digest check / without, codec {codec}", cost, "<=", GOALS[codec])

    rows = maps[: stores["none"].rows_per_shard]  # the writer's side, one shard: combined vs a pass, ÷ its write
    chunk = stores["none"].array(PATH).chunks[0]
    raw = [rows[i : i + chunk].reshape(-1).view(np.uint8) for i in range(0, len(rows), chunk)]
    parts = [(google_crc32c.value(b), len(b)) for b in raw]
    assert layout.shard_digest(PATH, 0, [rows], parts) == layout.shard_digest(PATH, 0, [rows]) == int(stores["none"].digests()[0, -1])
    single = harness.interleaved({"combined": lambda: layout.shard_digest(PATH, 0, [rows], parts),
                                  "pass": lambda: layout.shard_digest(PATH, 0, [rows])}, args.repeats)
    for k in ("combined", "pass"):
        report.figure(f"write_digest_{k}_ms_per_shard", harness.median_of(single, lambda r: 1e3 * r[k]), f"(reported; {rows.nbytes / 1e6:.0f} MB shard)")
    shutil.rmtree(work, ignore_errors=True)
    report.finish()


if __name__ == "__main__":
    main()
