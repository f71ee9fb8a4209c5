"""6. Storage: bytes per sample for each target kind and codec, real activations vs random data.

Real: ``kdcache.extract`` over the MNIST ``val`` split (10,000 real images) with the pretrained CNN
teacher (pipelines/mnist.toml), float16, storing ``logits`` [10], ``features.1`` (ReLU map
32x28x28), ``features.4`` (ReLU map 64x14x14) and ``classifier.1`` (ReLU vector 128), once per
codec: none, zstd level 1, 3, 9 (``extract.compression`` / ``extract.compression_level``).
Random control: a store with the same manifest (shapes, geometry, codec) created by
``store.create_or_resume`` and filled by ``Store.write_shard`` with seeded standard-normal float16
data. Stored bytes of an array are the sizes of the files under its folder on disk.
Goals: each ReLU map compresses by more than 1.3x at zstd-1; random data by less than 1.15x.

    python benchmarks/bench_storage.py [--quick] [--check] [--out storage.json]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

import harness

LAYERS = ["features.1", "features.4", "classifier.1"]
RELU = set(LAYERS)  # the ReLU outputs; logits are not
CODECS = {"none": ("none", 1), "zstd-1": ("zstd", 1), "zstd-3": ("zstd", 3), "zstd-9": ("zstd", 9)}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sizes(location: Path, targets: dict) -> dict[str, int]:
    return {name: folder_bytes(location / t["path"]) for name, t in targets.items()}


def fill_random(location: Path, manifest: dict, rand: dict[str, np.ndarray]) -> None:
    """The same arrays and codecs as the real store, written by the store code with random data."""
    from kdcache import store as layout

    s = layout.create_or_resume(str(location), lambda _: manifest, overwrite=True)
    n = manifest["num_samples"]
    rng = np.random.default_rng(1)
    index = np.arange(n, dtype=np.int64)
    fingerprint = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    label = rng.integers(0, 10, n, dtype=np.int64)
    for shard in range(s.num_shards):
        lo, hi = s.shard_rows(shard)
        arrays = {layout.INDEX: index[lo:hi], layout.FINGERPRINT: fingerprint[lo:hi]}
        if manifest["has_labels"]:
            arrays[layout.LABEL] = label[lo:hi]
        arrays |= {t["path"]: rand[name][lo:hi] for name, t in manifest["targets"].items()}
        s.write_shard(shard, arrays)
    s.finish()


def main() -> None:
    import kdcache
    from kdcache import store as layout

    p = harness.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    codecs = {k: v for k, v in CODECS.items() if not args.quick or k in ("none", "zstd-1")}
    work = harness.workdir(args)
    report = harness.Report("storage", args)
    print(f"storage: MNIST val (real pretrained CNN teacher), targets logits + {', '.join(LAYERS)}, float16; codecs {', '.join(codecs)}")
    rand: dict[str, np.ndarray] = {}
    table: dict[str, dict[str, dict[str, float]]] = {"real": {}, "random": {}}  # kind -> target -> codec -> bytes/sample
    raw: dict[str, int] = {}
    n = 0
    for cname, (codec, level) in codecs.items():
        pipe = harness.mnist_pipeline(data={"split": "val"}, targets={"layers": LAYERS, "dtype": "float16"},
                                      extract={"device": args.device, "compression": codec, "compression_level": level})
        real = work / f"real-{cname}.zarr"
        t0 = time.perf_counter()
        kdcache.extract(pipe, str(real), overwrite=True)
        t_real = time.perf_counter() - t0
        manifest = dict(layout.open_store(str(real)).manifest)
        n, targets = manifest["num_samples"], manifest["targets"]
        if not rand:  # seeded random normal data, shaped like each target
            g = np.random.default_rng(0)
            for name, t in targets.items():
                raw[name] = int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
                rand[name] = g.standard_normal((n, *t["shape"]), dtype=np.float32).astype(t["dtype"])
        rnd = work / f"random-{cname}.zarr"
        t0 = time.perf_counter()
        fill_random(rnd, manifest, rand)
        t_rand = time.perf_counter() - t0
        for kind, loc in (("real", real), ("random", rnd)):
            for name, nbytes in sizes(loc, targets).items():
                table[kind].setdefault(name, {})[cname] = nbytes / n
        print(f"  {cname}: extract {t_real:.1f} s, random store {t_rand:.1f} s", flush=True)
        shutil.rmtree(real), shutil.rmtree(rnd)

    names = list(raw)
    header = f"  {'data':<7}{'target':<14}{'raw B/sample':>13}" + "".join(f"{c:>16}" for c in codecs)
    print(header + "   (stored B/sample, ratio raw/stored)")
    for kind in ("real", "random"):
        for name in names:
            cells = "".join(f"{table[kind][name][c]:>9,.0f} {raw[name] / table[kind][name][c]:>5.2f}x" for c in codecs)
            print(f"  {kind:<7}{name:<14}{raw[name]:>13,}{cells}")
    for kind in ("real", "random"):
        for name in names:
            report.figures[f"{kind}:{name}"] = {"raw_bytes_per_sample": raw[name], **{
                c: {"stored_bytes_per_sample": table[kind][name][c], "ratio": raw[name] / table[kind][name][c]} for c in codecs}}
    report.figures["num_samples"] = n
    for name in names:
        if name in RELU:
            report.goal(f"real {name} (ReLU) ratio at zstd-1", raw[name] / table["real"][name]["zstd-1"], ">=", 1.3)
    for name in names:
        report.goal(f"random {name} ratio at zstd-1", raw[name] / table["random"][name]["zstd-1"], "<=", 1.15)
    shutil.rmtree(work, ignore_errors=True)
    report.finish()


if __name__ == "__main__":
    main()
