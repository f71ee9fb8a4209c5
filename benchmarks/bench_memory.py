"""5. Memory: peak RSS of extract and of train at N and 4N samples, each in a fresh subprocess.

Extract: ``models.resnet`` storing logits + ``layer1`` (128 KB/sample), so 4N writes 4x the bytes;
N is at least one full shard (512 rows), so both runs hold the same shard buffers. The synthetic
dataset itself lives in RAM (48 KB/image) and is subtracted. Train: one streaming epoch
(``memory_budget_mb = 0``) on the MNIST train store, reported only (N/4N for train: not yet done).
Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in a fresh child process.
Goal: extract's 4N peak within 10% of its N peak (memory does not grow with the dataset).

    python benchmarks/bench_memory.py [--check] [--out memory.json]
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
    p = harness.mnist_pipeline(data={{"split": "train"}}, targets={{"layers": ["classifier.1"]}}, extract={{"device": "cpu"}},
                               train={{"epochs": 1, "steps": 0, "eval_split": "", "memory_budget_mb": 0, "device": "cpu"}})
    if kind == "train-extract":
        kdcache.extract(p, work + "/mnist.zarr", overwrite=True)
    else:
        kdcache.train(p, work + "/mnist.zarr", work + "/student", overwrite=True)
print(json.dumps({{"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def peak(kind: str, n: int, work: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD.format(here=str(harness.HERE)), kind, str(n), work],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["maxrss_mb"]


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=0, help="N for extract (default 1024: 4N = 512 MiB of maps)")
    args = p.parse_args()
    n = args.n or 1024
    work = harness.workdir(args)
    report = harness.Report("memory", args)
    print(f"memory: extract resnet+layer1 at {n} and {4 * n}; train (streaming) on MNIST train")
    image_mb = 3 * 64 * 64 * 4 / 2**20  # the in-RAM synthetic dataset, per image
    e1, e4 = peak("extract", n, str(work)) - n * image_mb, peak("extract", 4 * n, str(work)) - 4 * n * image_mb
    report.figure("extract_N_maxrss_mb", e1, "(minus the dataset)"), report.figure("extract_4N_maxrss_mb", e4, "(minus the dataset)")
    peak("train-extract", 0, str(work))
    t1 = peak("train", 0, str(work))
    report.figure("train_streaming_maxrss_mb", t1, "(MNIST train, 50,000 rows)")
    report.goal("extract peak RSS 4N / N", e4 / e1, "<=", 1.10)
    report.finish()


if __name__ == "__main__":
    main()
