"""5. Memory: peak RSS of extract and of train at N and 4N samples, each in a fresh subprocess.

Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child process that runs the one extract or
train: its own peak, not its children's, which is all of it here since both run with DataLoader workers = 0
(the CPU default; ``train.num_workers = 0`` is set explicitly).

Extract: ``models.resnet`` storing logits + ``layer1`` (128 KB/sample), so 4N writes 4x the bytes, in shards of
64 rows (8.3 MB): the writer holds the shard it gathers plus at most ``WRITE_THREADS`` being written (3 shards on
2 cores, 9 on 16), and N (default 1,024 = 16 shards; ``--quick`` 256 = 4 shards) spans more than that, so the N and
4N runs both reach the writer's most. The synthetic dataset itself lives in RAM (48 KB/image) and is subtracted.

Train: the real MNIST teacher (pretrained CNN) on stores of the first N and 4N images of MNIST train
(``models.mnist_rows``; default 10,000 and 40,000, ``--quick`` 5,000 and 20,000; the whole MNIST file is in RAM
either way) holding logits + ``features.4`` (the teacher's second ReLU map, 64x14x14 float16 = 24.5 KB/sample),
in shards of 500 rows. The student (``models.mnist_conv_student``, a one-conv CNN) distils both: ``kl`` on the
logits and ``train.features`` MSE of its ``relu`` map [8, 14, 14] against ``features.4`` through a 1x1 conv head,
so every row's 25 KB of targets is read: keeping every row would add 0.75 GB at 4N over N, against a
~0.65 GB streaming process. One epoch each, streaming (``memory_budget_mb = 0``, ``shuffle_buffer_shards = 2``: a
reader holds two buffers of 2 shards, ~50 MB, whatever the store's size; N spans 5 buffers or more, as with fewer the
N run peaks before its steady state, 2,500 rows ~60 MB lower) and in memory (``memory_budget_mb = 2048``: every row
read is loaded first). The bytes read per row (``TransferSet.row_bytes``: targets and sample columns, decoded) and
the mode each run took are recorded from the run itself; a run that did not take the mode asked for (or did not
read ``features.4``) FAILs the setup check.

Reads (``--reads``: these alone, ~15 s): tracemalloc's peak ÷ the bytes returned of training's reads of a store
(real MNIST ``val``, logits + ``features.4``, 20 shards of 500 rows, shards 1, 3, 6 and 8 read: not consecutive, as a
shuffled buffer's or a ``train.subset``'s are), each after a warm-up call: (i) the in-memory load of those shards
(``cache._read_whole``), (ii) ``Store.read_shards`` of ``features.4`` over them, (iii) a streaming buffer of their rows,
shuffled (``TransferSet._read``), from the folder and from S3 (moto in its own process, on loopback). Goals: (i) and
(ii) hold the rows once (<= 1.25; joining each shard's or run's own array held them twice), (iii) from S3 no more than
the shards decoded once and the shuffled copy (<= 2.25), as from the folder (reported).

Goals: extract's and streaming train's 4N peak within 10% of their N peak (memory does not grow with the dataset).
In-memory train grows with the targets by design; its 4N/N is the setup check: it must be >= 1.25, well above the
1.10 that streaming must stay under, or the store is too small per row to tell streaming from a reader that holds
every target in RAM (which the streaming goal would then pass) and the run FAILs.

    python benchmarks/bench_memory.py [--check] [--out memory.json] [--n 1024] [--train-n 10000] [--reads]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np

import harness

EXTRACT_ROWS = 64  # rows per shard of the extract half (8.3 MB of layer1 + logits)
TRAIN_ROWS = 500  # rows per shard of the train half's stores (12 MB of features.4 + logits)
BUFFER_SHARDS = 2  # train.shuffle_buffer_shards: a streaming reader holds 2 buffers of 2 shards
SETUP_MIN = 1.25  # in-memory train 4N / N must reach this: else the setup cannot show a reader that keeps every target
READ_SHARDS = [1, 3, 6, 8]  # the reads' shards, of 20 of 500 rows: not consecutive, as a shuffled buffer's are
ONCE, SHUFFLED = 1.25, 2.25  # the reads' peaks ÷ the bytes returned: the rows held once; and a shuffled copy beside them

CHILD = r"""
import json, resource, sys
here, kind, n, work, extract_rows, train_rows, buffer_shards = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], *map(int, sys.argv[5:8])
sys.path.insert(0, here)
import harness, kdcache
from kdcache import cache
seen = {}
if kind == "extract":
    p = harness.bench_pipeline("resnet", n, ["layer1"], "cpu", batch_size=64, threads=1, rows_per_shard=extract_rows)
    kdcache.extract(p, work + "/m.zarr", overwrite=True)
else:
    budget = 0 if kind == "train-stream" else 2048
    p = harness.mnist_pipeline(
        data={"factory": "../benchmarks/models.py:mnist_rows", "split": str(n)},
        targets={"layers": ["features.4"]}, extract={"device": "cpu", "rows_per_shard": train_rows},
        student={"factory": "../benchmarks/models.py:mnist_conv_student"},
        train={"epochs": 1, "steps": 0, "eval_split": "", "memory_budget_mb": budget, "device": "cpu", "num_workers": 0,
               "shuffle_buffer_shards": buffer_shards, "features": {"features.4": {"student": "relu", "weight": 1.0}}})
    store = work + f"/mnist-{n}.zarr"
    if kind == "train-extract":
        kdcache.extract(p, store, overwrite=True)
    else:
        init = cache.TransferSet.__init__
        def spy(self, *args, **kwargs):  # what the run reads, and whether it took the mode asked for
            init(self, *args, **kwargs)
            seen.update(row_bytes=int(self.row_bytes), in_memory=bool(self.in_memory), paths=list(self.paths))
        cache.TransferSet.__init__ = spy
        kdcache.train(p, store, work + f"/student-{kind}-{n}", overwrite=True)
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **seen}))
"""


def child(kind: str, n: int, work: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(harness.HERE), kind, str(n), work,
                          str(EXTRACT_ROWS), str(TRAIN_ROWS), str(BUFFER_SHARDS)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak(kind: str, n: int, work: str) -> float:
    return child(kind, n, work)["maxrss_mb"]


def train_peak(kind: str, n: int, work: str, wrong: list[str]) -> tuple[float, int]:
    """Peak RSS (MB) of one train epoch and the bytes it read per row; a run that did not take the mode asked for
    (streaming for ``train-stream``, targets in RAM for ``train-memory``) or did not read ``features.4`` goes in ``wrong``."""
    r = child(kind, n, work)
    if r.get("in_memory") is not (kind == "train-memory"):
        wrong.append(f"the {kind} run at {n:,} rows {'streamed' if kind == 'train-memory' else 'read its targets into RAM'}")
    if not any(p.endswith("features.4") for p in r.get("paths", [])):
        wrong.append(f"the {kind} run at {n:,} rows did not read features.4 (it read {r.get('paths')})")
    return r["maxrss_mb"], r["row_bytes"]


def held(fn: Callable[[], Any]) -> float:
    """tracemalloc's peak during ``fn()`` ÷ the bytes of the array (or dict of arrays, or ``TransferSet._read``'s pieces)
    it returns; a warm-up call first (the store's metadata, done markers and digests, thread pools)."""
    fn()
    tracemalloc.start()
    try:
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if isinstance(out, list):  # a streaming buffer's pieces
        out = {(p, piece.lo): c for piece in out for p, c in piece.columns.items()}
    return peak / sum(a.nbytes for a in (out.values() if isinstance(out, dict) else [out]))


def reads(report: harness.Report, work: Path) -> None:
    """Training's reads of ``READ_SHARDS``: tracemalloc's peak ÷ the bytes returned (the module's docstring)."""
    import s3fs

    import kdcache
    from bench_remote import BUCKET, moto_server
    from kdcache import cache, store as layout

    pipe = harness.mnist_pipeline(data={"split": "val"}, targets={"layers": ["features.4"]}, extract={"device": "cpu", "rows_per_shard": 500})
    local = str(work / "reads.zarr")
    kdcache.extract(pipe, local, overwrite=True)
    dataset, feature = pipe.resolve(pipe.data.factory)("val"), layout.layer_path("features.4")
    store, shards = layout.open_store(local), np.array(READ_SHARDS)
    rows = np.random.default_rng(0).permutation(cache.done_rows(store, shards))  # a shuffled buffer of those shards

    def reader(location: str, **options: Any) -> cache.TransferSet:
        return cache.TransferSet(location, dataset, [layout.LOGITS, feature], batch_size=256, memory_budget_mb=0,
                                 fingerprint_check=0, fingerprint_recheck=0, **options)

    ts = reader(local)
    print(f"reads: MNIST val, logits + features.4, shards {READ_SHARDS} of {store.num_shards} ({len(rows):,} rows, "
          f"{ts.row_bytes * len(rows) / 2**20:.1f} MiB decoded; kdcache from {Path(kdcache.__file__).parent})", flush=True)
    whole = held(lambda: cache._read_whole(store, ts.paths, shards, ts.row_bytes, 2048, local))
    report.goal("in-memory load of shards not consecutive: peak / bytes returned", whole, "<=", ONCE)
    report.goal("Store.read_shards of features.4: peak / bytes returned", held(lambda: store.read_shards(feature, READ_SHARDS)), "<=", ONCE)
    report.figure("streaming_buffer_local_peak_over_returned", held(lambda: ts._read(rows)), "(the folder's: no goal)")
    with moto_server() as endpoint:
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        fs.put(local, f"{BUCKET}/reads.zarr", recursive=True)
        remote = reader(f"s3://{BUCKET}/reads.zarr", storage_options=options)
        report.goal("streaming buffer from S3: peak / bytes returned", held(lambda: remote._read(rows)), "<=", SHUFFLED)


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=0, help="N for extract (default 1024: 4N = 512 MiB of maps)")
    p.add_argument("--train-n", type=int, default=0, help="N for train (default 10000, --quick 5000; 4N <= 50000, the MNIST train split)")
    p.add_argument("--reads", action="store_true", help="only the reads' tracemalloc peaks (about a minute)")
    args = p.parse_args()
    n = args.n or (256 if args.quick else 1024)  # --quick: a quarter (the flat-memory check at a smaller scale)
    tn = args.train_n or (5000 if args.quick else 10000)  # --quick: at least 10 shards (5 buffers) still
    if n < 1 or not 1 <= tn <= 12500:
        p.error(f"--n must be >= 1 and --train-n from 1 to 12500 (4N rows of the 50,000 of MNIST train), got {n} and {tn}")
    work = harness.workdir(args)
    report = harness.Report("memory", args)
    reads(report, work)
    if args.reads:
        report.finish()
        return
    print(f"memory: extract resnet+layer1 at {n} and {4 * n} ({EXTRACT_ROWS}-row shards); train (streaming and in memory, "
          f"logits + features.4, {TRAIN_ROWS}-row shards) on MNIST train[:{tn}] and [:{4 * tn}]", flush=True)
    image_mb = 3 * 64 * 64 * 4 / 2**20  # the in-RAM synthetic dataset, per image
    e1, e4 = peak("extract", n, str(work)) - n * image_mb, peak("extract", 4 * n, str(work)) - 4 * n * image_mb
    report.figure("extract_N_maxrss_mb", e1, "(minus the dataset)"), report.figure("extract_4N_maxrss_mb", e4, "(minus the dataset)")
    peak("train-extract", tn, str(work)), peak("train-extract", 4 * tn, str(work))
    wrong: list[str] = []
    (s1, rb), (s4, _) = train_peak("train-stream", tn, str(work), wrong), train_peak("train-stream", 4 * tn, str(work), wrong)
    (m1, _), (m4, _) = train_peak("train-memory", tn, str(work), wrong), train_peak("train-memory", 4 * tn, str(work), wrong)
    report.figure("train_bytes_read_per_sample", rb, "(TransferSet.row_bytes: logits + features.4 + sample columns, decoded)")
    report.figure("train_targets_4N_minus_N_mb", 3 * tn * rb / 2**20, "(what holding every row read would add at 4N)")
    report.figure("train_streaming_N_maxrss_mb", s1, f"({tn:,} rows, memory_budget_mb = 0)")
    report.figure("train_streaming_4N_maxrss_mb", s4, f"({4 * tn:,} rows)")
    report.figure("train_memory_N_maxrss_mb", m1, f"({tn:,} rows, memory_budget_mb = 2048)")
    report.figure("train_memory_4N_maxrss_mb", m4, f"({4 * tn:,} rows)")
    report.figure("train_streaming_4N_over_N", s4 / s1)
    report.figure("train_memory_4N_over_N", m4 / m1, "(the setup check: holding every target must show)")
    report.goal("extract peak RSS 4N / N", e4 / e1, "<=", 1.10)
    report.figures["train_setup_problems"] = wrong  # in the JSON: why the check below failed, if it did
    if not report.goal("setup check: train runs not in the mode asked for", len(wrong), "<=", 0):
        print("  setup invalid: " + "; ".join(wrong), flush=True)
    report.goal("train streaming peak RSS 4N / N", s4 / s1, "<=", 1.10)
    if not report.goal("setup check: train in memory peak RSS 4N / N", m4 / m1, ">=", SETUP_MIN):
        print(f"  setup invalid: holding every target in RAM adds {m4 - m1:.0f} MB at 4N, too little to miss the 1.10 goal "
              "clearly, so the streaming goal cannot tell streaming from it; use a larger --train-n", flush=True)
    report.finish()


if __name__ == "__main__":
    main()
