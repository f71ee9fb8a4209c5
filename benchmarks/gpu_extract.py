"""GPU check (2): ResNet-style teacher extract on CUDA with bf16 autocast and pinned host copies.

Stores logits, pooled features and the 128 KB/sample ``layer1`` map; checks that ``to_host`` copies the
probe batch's targets from the device into pinned buffers that hold the device's values once its event
has fired, that the store is complete, and that stored rows match an fp32 forward on the CPU within bf16
tolerance. Prints throughput and writes JSON to ``--out``. ``--device cpu --n 64`` runs the same checks
(no pinned copies there) in seconds: ``tests/test_benchmarks.py`` does, so the script still runs where
no GPU is.

    python benchmarks/gpu_extract.py --out gpu_extract.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch

import harness
import kdcache
import models
from kdcache import store as layout

kx = importlib.import_module("kdcache.extract")


def copied_to_host(run: kx.Run) -> tuple[bool, bool]:
    """The probe batch's targets put back on the device (setup keeps them on the host) and through ``to_host``: whether
    the host copies are pinned (CUDA only) and, once the copies' event has fired, equal to the device's converted values."""
    on_device = {p: t.to(run.device) for p, t in run.probe["outputs"].items()}
    host, event = kx.to_host(on_device, run.targets, run.device)
    if event is not None:
        event.synchronize()
    pinned = run.device.type != "cuda" or all(t.is_pinned() for t in host.values())
    landed = all(torch.equal(host[p].cpu(), t.to(kx.DTYPES[run.targets[p].dtype]).cpu()) for p, t in on_device.items())
    return pinned, landed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the check), or cpu (a smoke test of the script)")
    p.add_argument("--n", type=int, default=8192, help="images (default 8192)")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    p.add_argument("--workdir", default="", help="folder for the store (default: a temp folder; removed at the end)")
    args = p.parse_args()
    n, out, cuda = args.n, args.out, args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_extract.py: --device cuda but CUDA is not available here; run it on the GPU machine, or pass --device cpu")
    batch = 256 if cuda else 32
    pipe = harness.bench_pipeline("resnet", n, ["pool", "layer1"], args.device, precision="bf16", batch_size=batch,
                                  num_workers=8 if cuda else 0)
    run = kx.setup(pipe, keep_probe=True)
    pinned, landed = copied_to_host(run)
    location = str(harness.workdir(args) / "resnet.zarr")
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
    result = {"device": torch.cuda.get_device_name(run.device) if cuda else "cpu", "n": n, "precision": "bf16",
              "pinned_host_copies": pinned, "host_copies_equal_device_values": landed,
              "complete": info["complete"], "seconds_whole_call": seconds, "samples_per_s_whole_call": n / seconds,
              "bytes_raw": info["bytes_raw"], "bytes_stored": info["bytes_stored"], "relative_max_error_vs_cpu_fp32": err,
              "targets": info["targets"]}
    print(json.dumps(result, indent=2))
    ok = pinned and landed and info["complete"] and max(err.values()) < 0.05
    print("PASS" if ok else "FAIL", "gpu extract")
    if out:
        with open(out, "w") as f:
            json.dump(result | {"pass": ok}, f, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
