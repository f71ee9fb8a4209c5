"""5. Memory: peak RSS of extract and of train at N and 4N samples, each in a fresh subprocess.

Extract: ``models.resnet`` storing logits + ``layer1`` (128 KB/sample), so 4N writes 4x the bytes;
N is at least one full shard (512 rows), so both runs hold the same shard buffers. The synthetic
dataset itself lives in RAM (48 KB/image) and is subtracted.
Train: the real MNIST pipeline (pretrained CNN teacher, MLP student, logits + ``classifier.1``)
on stores of the first N and 4N images of MNIST train (``models.mnist_rows``; default 10,000 and
40,000; the whole MNIST file is in RAM either way), one epoch each, streaming
(``memory_budget_mb = 0``) and in memory (``memory_budget_mb = 2048``: the used targets are loaded).
Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in a fresh child process.
Goals: extract's and streaming train's 4N peak within 10% of their N peak (memory does not grow
with the dataset). In-memory train legitimately grows with the targets' size: reported only.

    python benchmarks/bench_memory.py [--check] [--out memory.json] [--n 1024] [--train-n 10000]
"""

from __future__ import annotations

import json
import subprocess
import sys

import harness

CHILD = r"""
import json, resource, sys
sys.path.insert(0, {here!r})
import harness, kdcache
kind, n, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if kind == "extract":
    p = harness.bench_pipeline("resnet", n, ["layer1"], "cpu", batch_size=64, threads=1)
    kdcache.extract(p, work + "/m.zarr", overwrite=True)
else:
    budget = 0 if kind == "train-stream" else 2048
    p = harness.mnist_pipeline(data={{"factory": "../benchmarks/models.py:mnist_rows", "split": str(n)}},
                               targets={{"layers": ["classifier.1"]}}, extract={{"device": "cpu"}},
                               train={{"epochs": 1, "steps": 0, "eval_split": "", "memory_budget_mb": budget, "device": "cpu"}})
    store = work + f"/mnist-{{n}}.zarr"
    if kind == "train-extract":
        kdcache.extract(p, store, overwrite=True)
    else:
        kdcache.train(p, store, work + f"/student-{{kind}}-{{n}}", overwrite=True)
print(json.dumps({{"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def peak(kind: str, n: int, work: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD.format(here=str(harness.HERE)), kind, str(n), work],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["maxrss_mb"]


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=0, help="N for extract (default 1024: 4N = 512 MiB of maps)")
    p.add_argument("--train-n", type=int, default=0, help="N for train (default 10000; 4N <= 50000, the MNIST train split)")
    args = p.parse_args()
    n = args.n or (256 if args.quick else 1024)  # --quick: a quarter (the flat-memory check at a smaller scale)
    tn = args.train_n or (2500 if args.quick else 10000)
    work = harness.workdir(args)
    report = harness.Report("memory", args)
    print(f"memory: extract resnet+layer1 at {n} and {4 * n}; train (streaming and in memory) on MNIST train[:{tn}] and [:{4 * tn}]")
    image_mb = 3 * 64 * 64 * 4 / 2**20  # the in-RAM synthetic dataset, per image
    e1, e4 = peak("extract", n, str(work)) - n * image_mb, peak("extract", 4 * n, str(work)) - 4 * n * image_mb
    report.figure("extract_N_maxrss_mb", e1, "(minus the dataset)"), report.figure("extract_4N_maxrss_mb", e4, "(minus the dataset)")
    peak("train-extract", tn, str(work)), peak("train-extract", 4 * tn, str(work))
    s1, s4 = peak("train-stream", tn, str(work)), peak("train-stream", 4 * tn, str(work))
    m1, m4 = peak("train-memory", tn, str(work)), peak("train-memory", 4 * tn, str(work))
    report.figure("train_streaming_N_maxrss_mb", s1, f"({tn:,} rows, memory_budget_mb = 0)")
    report.figure("train_streaming_4N_maxrss_mb", s4, f"({4 * tn:,} rows)")
    report.figure("train_memory_N_maxrss_mb", m1, f"({tn:,} rows, memory_budget_mb = 2048)")
    report.figure("train_memory_4N_maxrss_mb", m4, f"({4 * tn:,} rows)")
    report.figure("train_memory_4N_over_N", m4 / m1, "(information: in memory grows with the targets)")
    report.goal("extract peak RSS 4N / N", e4 / e1, "<=", 1.10)
    report.goal("train streaming peak RSS 4N / N", s4 / s1, "<=", 1.10)
    report.finish()


if __name__ == "__main__":
    main()
