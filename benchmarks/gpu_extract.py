"""GPU check (2): ResNet-style teacher extract on CUDA with bf16 autocast and pinned host copies.

Stores logits, pooled features and the 128 KB/sample ``layer1`` map; checks that ``to_host`` gives
pinned buffers, that the store is complete, and that stored rows match an fp32 forward on the CPU
within bf16 tolerance. Prints throughput and writes JSON to ``--out``.

    python benchmarks/gpu_extract.py --out gpu_extract.json
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time

import torch

import harness
import kdcache
import models
from kdcache import store as layout

kx = importlib.import_module("kdcache.extract")


def main() -> None:
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else ""
    n = 8192
    assert torch.cuda.is_available(), "needs CUDA"
    pipe = harness.bench_pipeline("resnet", n, ["pool", "layer1"], "cuda", precision="bf16", batch_size=256, num_workers=8)
    run = kx.setup(pipe, keep_probe=True)
    host, event = kx.to_host(run.probe["outputs"], run.targets, run.device)
    pinned = all(t.is_pinned() for t in host.values())
    location = tempfile.mkdtemp() + "/resnet.zarr"
    start = time.perf_counter()
    info = kdcache.extract(pipe, location, overwrite=True)
    seconds = time.perf_counter() - start
    store = layout.open_store(location)
    rows = [0, 1, n // 2, n - 1]
    cpu = models.resnet()
    x = models.images(str(n)).x[rows]
    with torch.inference_mode():
        want_logits = cpu(x)
        want_layer1 = cpu.layer1(cpu.stem(x))
    got_logits = torch.from_numpy(store.read(layout.LOGITS, 0, n)[rows]).float()
    got_layer1 = torch.from_numpy(store.read(layout.layer_path("layer1"), 0, n)[rows]).float()
    err = {"logits": float((got_logits - want_logits).abs().max() / want_logits.abs().max()),
           "layer1": float((got_layer1 - want_layer1).abs().max() / want_layer1.abs().max())}
    result = {"device": torch.cuda.get_device_name(), "n": n, "precision": "bf16", "pinned_host_copies": pinned,
              "complete": info["complete"], "seconds_whole_call": seconds, "samples_per_s_whole_call": n / seconds,
              "bytes_raw": info["bytes_raw"], "bytes_stored": info["bytes_stored"], "relative_max_error_vs_cpu_fp32": err,
              "targets": info["targets"]}
    print(json.dumps(result, indent=2))
    ok = pinned and info["complete"] and max(err.values()) < 0.05
    print("PASS" if ok else "FAIL", "gpu extract")
    if out:
        with open(out, "w") as f:
            json.dump(result | {"pass": ok}, f, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
