"""7. Training input from object storage: a streaming epoch read from an S3-API server ÷ the same epoch read locally.

The store (real MNIST ``val``, 10,000 rows: logits and the ReLU map ``features.4``, 25 KB per row, in shards of
``--rows-per-shard`` rows) is uploaded to a moto S3 server run in its own process on loopback, reached through a
TCP proxy that holds each request for ``--latency-ms`` (20 ms: a cloud bucket from a VM in the same region
answers a GET in ~10-30 ms). Each round reads every target column of every shard once, as a streaming
``kdcache train`` epoch does (``cache.TransferSet`` with ``memory_budget_mb = 0``, fingerprint checks off: the
inputs are the same either way), from the local folder, from S3 through the proxy, and from S3 without the added
latency. Goal: the latency is hidden (whole-shard reads, many in flight: ``storage.REMOTE_READS``): an epoch with it
takes at most 1.5x one without it; and one request per shard and column read (one GET, streamed and stopped past the
object's bound: s3fs's own read sent a HEAD first, to learn the size, so two). Reported without a goal: S3 ÷ local (moto is a Python server
on these cores, much slower than S3).

    python benchmarks/bench_remote.py [--latency-ms 20] [--check] [--out remote.json]
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import harness
import kdcache
from kdcache import store as layout
from kdcache.cache import TransferSet

BUCKET = "kdcache-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3-API server in its own process (not this one's GIL): its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class DelayProxy:
    """A TCP proxy on loopback that holds every chunk a client sends (each HTTP request) for ``delay`` seconds."""

    def __init__(self, upstream_port: int):
        self.delay, self.requests = 0.0, 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port, self.upstream = self.listener.getsockname()[1], upstream_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, delayed: bool) -> None:
        try:
            while data := a.recv(1 << 16):
                if delayed:
                    self.requests += 1
                    time.sleep(self.delay)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--latency-ms", type=float, default=20.0, help="time the proxy holds each request (default 20)")
    p.add_argument("--rows-per-shard", type=int, default=500, help="shard size of the store (default 500: 20 shards)")
    args = p.parse_args()
    import s3fs

    work = harness.workdir(args)
    report = harness.Report("remote", args)
    pipe = harness.mnist_pipeline(data={"split": "val"}, targets={"layers": ["features.4"]},
                                  extract={"device": "cpu", "rows_per_shard": args.rows_per_shard})
    local = str(work / "mnist.zarr")
    kdcache.extract(pipe, local, overwrite=True)
    dataset = pipe.resolve(pipe.data.factory)("val")
    with moto_server() as endpoint:
        proxy = DelayProxy(int(endpoint.rsplit(":", 1)[1]))
        options: dict[str, Any] = {"endpoint_url": f"http://127.0.0.1:{proxy.port}", "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        fs.put(local, f"{BUCKET}/mnist.zarr", recursive=True)
        targets = [layout.LOGITS, layout.layer_path("features.4")]
        sets = {"local": TransferSet(local, dataset, targets, batch_size=256, memory_budget_mb=0, fingerprint_check=0, fingerprint_recheck=0),
                "s3": TransferSet(f"s3://{BUCKET}/mnist.zarr", dataset, targets, batch_size=256, memory_budget_mb=0, fingerprint_check=0,
                                  fingerprint_recheck=0, storage_options=options)}
        print(f"training input from S3: MNIST val ({len(dataset):,} rows, {len(sets['local'].paths)} columns), shards of {args.rows_per_shard} rows, "
              f"moto in its own process behind a proxy adding {args.latency_ms:g} ms per request")
        epoch = [0]

        def read(name: str, latency_ms: float) -> None:
            proxy.delay = latency_ms / 1000
            transfer = sets[name]
            transfer.set_epoch(epoch[0])  # a new plan each time: the shards in another order
            epoch[0] += 1
            for _ in transfer:
                pass

        read("s3", 0.0)  # the first opens the store (metadata, done flags)
        requests = proxy.requests
        read("s3", 0.0)
        objects = layout.open_store(local).num_shards * len(sets["s3"].paths)
        report.figure("requests_per_epoch", proxy.requests - requests, f"({objects} shard objects read)")
        report.goal("requests per epoch / shard objects read", (proxy.requests - requests) / objects, "<=", 1.0)
        rounds = harness.interleaved({"local": lambda: read("local", 0.0), "s3": lambda: read("s3", 0.0),
                                      "s3_latency": lambda: read("s3", args.latency_ms)}, args.repeats)
    for key in ("local", "s3", "s3_latency"):
        report.figure(f"epoch_s.{key}", harness.median_of(rounds, lambda r, k=key: r[k]))
    report.figure("s3_vs_local", harness.median_of(rounds, lambda r: r["s3"] / r["local"]), "(no goal: moto is a Python server)")
    hidden = harness.median_of(rounds, lambda r: r["s3_latency"] / r["s3"])
    report.figure("latency_vs_none", hidden, harness.spread(rounds, lambda r: r["s3_latency"] / r["s3"]))
    report.goal(f"S3 epoch with {args.latency_ms:g} ms per request / without", hidden, "<=", 1.5)
    report.finish()


if __name__ == "__main__":
    main()
