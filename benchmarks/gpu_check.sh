#!/usr/bin/env bash
# The one device run (see benchmarks/README.md): the CUDA tests (tests/test_gpu.py) and the extract tests, a ResNet extract on CUDA with bf16
# autocast and pinned copies, where an extract with layer1 spends its time (profile_extract.py), and
# benchmarks 1-4 with --device cuda (--check: a missed goal fails its step and the run). JSON and logs go to $OUT.
# Needs the wheels in .whl (zarr, numcodecs, donfig, google-crc32c for Python 3.12; README says how).
set -u -o pipefail
OUT=${OUT:-/tmp/kdcache-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Stop here, in seconds, where the steps could only fail or skip: without zarr every step fails on its import, and
# without CUDA tests/test_gpu.py skips every test and exits 0 (a check that passed nothing).
python3 -c "import sys, torch, zarr, numcodecs; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zarr', zarr.__version__, 'numcodecs', numcodecs.__version__)" \
  || { echo "gpu_check.sh: cannot import zarr/numcodecs; carry the wheels in .whl (benchmarks/README.md says which)"; exit 1; }
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
  || { echo "gpu_check.sh: CUDA is not available here (torch.cuda.is_available() is False); run this on the GPU machine"; exit 1; }
rc=0
# -k 5: a step still running 5 s after its SIGTERM is killed (kdcache train takes SIGTERM to save a checkpoint first,
# and ignores a second), so the limits hold
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; local r=${PIPESTATUS[0]}
  echo "=== $name: exit $r in $((SECONDS - t0)) s"; [ "$r" = 0 ] || rc=1; }
# Limits sum to 535 s, 565 s with each step's 5 s to die, ~580 s with the wheels and imports above: a device command
# may run 600 s (expected: ~300 s; the second session's steps took 7 s of tests, ~3 s per extract call); bench_extract's rounds run 7 loops (the forward
# pair brackets the extract pair), hence 5 rounds there on this steadier box; bench_train 3 (each round trains 3
# kdcache runs, one on a second store of small shards, and 4 RAM loops).
step tests 75 python3 -m pytest -q -x -p no:cacheprovider -rs tests/test_gpu.py tests/test_extract.py
step gpu_extract 50 python3 benchmarks/gpu_extract.py --out "$OUT/gpu_extract.json"
step profile_extract 50 python3 benchmarks/profile_extract.py --device cuda --out "$OUT/profile_extract.json" --workdir /tmp/kb
step bench_extract 175 python3 benchmarks/bench_extract.py --device cuda --n 8192 --repeats 5 --check --out "$OUT/extract.json" --workdir /tmp/kb
step bench_writer 40 python3 benchmarks/bench_writer.py --check --out "$OUT/writer.json" --workdir /tmp/kb
step bench_train 115 python3 benchmarks/bench_train.py --device cuda --repeats 3 --check --out "$OUT/train.json" --workdir /tmp/kb
step bench_pooling 30 python3 benchmarks/bench_pooling.py --device cuda --batch-size 256 --tokens 512 --width 512 --check --out "$OUT/pooling.json" --workdir /tmp/kb
echo "=== gpu_check.sh: exit $rc in $SECONDS s"
exit $rc
