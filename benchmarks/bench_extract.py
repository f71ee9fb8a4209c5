"""1. Extract overhead: ``kdcache.extract`` throughput ÷ the same teacher's forward-only throughput.

Teacher: ``models.resnet`` (ResNet-style, seeded weights, 3x64x64 inputs), same dataset, batch,
device and precision for both loops. Cases: (a) logits only, (b) logits + pooled features,
(c) logits + ``layer1`` (64x32x32 float16 = 128 KB/sample). Throughput is per sample past the
first batch: the time of a run over n images minus that of a run over one batch, for both loops,
so a run's fixed costs (teacher build, probe batch, weight hash, store creation, finish) cancel;
they are printed, with the whole-call ratio, but have no goal. Each ratio is the median of
per-round ratios (a round runs every loop once, seconds apart; the forward-only loops run both
before and after the extract runs and their means are used), printed with its range.
Goals: (a), (b) >= 0.97 x forward-only; (c) >= 0.8 x min(forward-only, numpy.tofile of the
same bytes to the same folder).

    python benchmarks/bench_extract.py [--device cuda] [--check] [--out extract.json]
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
from torch.utils.data import DataLoader

import harness
import kdcache
import importlib

kx = importlib.import_module("kdcache.extract")  # the module (kdcache.extract is also the function)

CASES = {"a_logits": [], "b_logits_pooled": ["pool"], "c_logits_layer1": ["layer1"]}


def clean(*paths) -> None:
    """Delete what a timed run wrote, untimed, so every run writes new files: an ``overwrite=True`` extract would
    otherwise time deleting the last run's store, and the one-batch run (whose time is subtracted) would delete the
    whole run's store, taking that deletion off the extract side."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0], repeats=7)  # CPU rounds vary by +-5 %: a median of 7
    p.add_argument("--n", type=int, default=0, help="images per run (default: 512 on cpu, 16384 on cuda)")
    harness.add_extract_options(p)  # the same settings for both loops
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    common = harness.extract_options(args)
    batch, precision, workers = common["batch_size"], common["precision"], common["num_workers"]
    # past the first batch: at least 7 batches are timed (--quick: a quarter of the images, and 3 rounds)
    n = args.n or max(8 * batch, (16384 if cuda else 512) // (4 if args.quick else 1))
    if args.quick and args.repeats == 7:
        args.repeats = 3
    work = harness.workdir(args)
    report = harness.Report("extract", args)
    print(f"extract overhead: resnet, n={n}, batch={batch}, {args.device}, {precision}, workers={workers}, {args.compression}")
    model = kx.setup(harness.bench_pipeline("resnet", batch, [], args.device, **common)).model
    import models

    datasets = {size: models.images(str(size)) for size in (n, batch)}
    autocast = kx.Run(model, datasets[n], torch.device(args.device), precision, {}, True, {}).autocast

    def forward_only(size: int) -> None:
        loader = DataLoader(datasets[size], batch_size=batch, num_workers=workers, pin_memory=cuda)
        with torch.inference_mode(), autocast():
            for x, _ in loader:
                model(x.to(args.device, non_blocking=True))

    report.figure("n", n), report.figure("batch_size", batch), report.figure("precision", precision)
    for case, layers in CASES.items():
        pipelines = {size: harness.bench_pipeline("resnet", size, layers, args.device, **common) for size in (n, batch)}
        out = work / f"{case}.zarr"
        bytes_per_sample = 2 * 1000 + 2 * (512 if layers == ["pool"] else 64 * 32 * 32 if layers else 0)
        payload = np.ones((n, bytes_per_sample // 2), np.float16)
        rounds = harness.interleaved({  # the forward runs bracket the extract runs: their means sit where extract ran
            "forward": lambda: forward_only(n),
            "forward_1": lambda: forward_only(batch),
            "extract": lambda: kdcache.extract(pipelines[n], str(out), overwrite=True),
            "extract_1": lambda: kdcache.extract(pipelines[batch], str(out), overwrite=True),
            "forward_1_after": lambda: forward_only(batch),
            "forward_after": lambda: forward_only(n),
            "tofile": lambda: payload.tofile(work / "payload.bin"),
        }, args.repeats, args.device, cleanup=lambda: clean(out, work / "payload.bin"))

        def rates(r: dict[str, float]) -> dict[str, float]:
            """Samples/s past the first batch: a whole run minus a one-batch run of the same kind, so every
            fixed cost (teacher build, probe batch, weight hash, store creation, finish) cancels. The forward
            loops ran before and after extract (the VM's speed drifts within seconds): their means are used."""
            forward, forward_1 = (r["forward"] + r["forward_after"]) / 2, (r["forward_1"] + r["forward_1_after"]) / 2
            return {"forward": (n - batch) / (forward - forward_1),
                    "extract": (n - batch) / max(1e-9, r["extract"] - r["extract_1"]), "disk": n / r["tofile"]}

        def vs_forward_of(r: dict[str, float]) -> float:
            return rates(r)["extract"] / rates(r)["forward"]

        def vs_min_of(r: dict[str, float]) -> float:
            return rates(r)["extract"] / min(rates(r)["forward"], rates(r)["disk"])

        fwd, ext, disk = (harness.median_of(rounds, lambda r, k=k: rates(r)[k]) for k in ("forward", "extract", "disk"))
        report.figure(f"{case}.bytes_per_sample", bytes_per_sample)
        report.figure(f"{case}.forward_samples_per_s", fwd)
        report.figure(f"{case}.extract_samples_per_s", ext, "(past the first batch)")
        report.figure(f"{case}.extract_fixed_s", harness.median_of(rounds, lambda r: r["extract_1"] - batch / rates(r)["extract"]),
                      "(a run's fixed cost: build, probe, hash, create, finish)")
        whole = harness.median_of(rounds, lambda r: (r["forward"] + r["forward_after"]) / 2 / r["extract"])
        report.figure(f"{case}.whole_call_vs_forward", whole, f"(no goal: whole extract call, fixed costs and all, at n={n})")
        report.figure(f"{case}.tofile_samples_per_s", disk, f"({disk * bytes_per_sample / 1e6:,.0f} MB/s)")
        vs_forward = harness.median_of(rounds, vs_forward_of)
        report.figure(f"{case}.ratio_vs_forward", vs_forward, harness.spread(rounds, vs_forward_of))
        if layers == ["layer1"]:
            vs_min = harness.median_of(rounds, vs_min_of)
            report.figure(f"{case}.ratio_vs_min_forward_disk", vs_min, harness.spread(rounds, vs_min_of))
            report.goal(f"{case}: extract / min(forward, tofile)", vs_min, ">=", 0.8)
        else:
            report.goal(f"{case}: extract / forward", vs_forward, ">=", 0.97)
        shutil.rmtree(out, ignore_errors=True)
    (work / "payload.bin").unlink(missing_ok=True)
    report.finish()


if __name__ == "__main__":
    main()
