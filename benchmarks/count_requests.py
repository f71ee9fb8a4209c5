"""Count the requests each kdcache command sends to a store over http (RangeHTTPServer, logged at the server) and over
S3 (moto in its own process, behind a loopback proxy keeping each request's first line). Usage:
python benchmarks/count_requests.py TREE [--detail] [--latency MS]   (TREE: the kdcache checkout to count, e.g. . or an old
worktree)

Not a benchmark (no goal: counts are deterministic, and tests/test_remote.py bounds train's): the tool behind
RESULTS.md's "round trips at a command's start". Prints each command's requests by method (``--detail``: by key too),
then all of them as one JSON line; exits 1 if a command failed. ``--latency MS``: each S3 command is also run with the
proxy holding every request MS ms and without, twice each, and its *waited round trips* printed: (best wall with - best
wall without) / MS, the requests a command waits on one after another (those sent at once count once; wall-clock: noisy
on a loaded box, a few round trips either way), and its *request waves* with the latency: its requests in the order they
reached the proxy, a new wave where one came more than MS / 2 after the one before (it waited on an answer): less noisy,
the figure to compare. RESULTS.md's "round trips waited at opening"."""
import collections
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_remote import DelayProxy, moto_server  # this folder's: moto in its own process, the request-keeping proxy

WT = Path(sys.argv[1]).resolve()
DETAIL = "--detail" in sys.argv
LATENCY = float(sys.argv[sys.argv.index("--latency") + 1]) / 1000 if "--latency" in sys.argv else None
FIX = WT / "tests" / "fixtures"
ENV = {**os.environ, "PYTHONPATH": str(WT), "PYTHONWARNINGS": "ignore"}


def run(*args, cwd=FIX):
    r = subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)
    if r.returncode:
        print("FAILED", args, r.stdout[-2000:], r.stderr[-3000:])
    return r


class Stamped(list):
    """The proxy's request lines, with when each came (``times``)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def append(self, line):
        self.times.append(time.perf_counter())
        super().append(line)


def kind(method, path, prefix):
    path = path.split("?", 1)
    query = path[1] if len(path) > 1 else ""
    key = path[0]
    if "list-type" in query or (method == "GET" and key.endswith("/")):
        return "LIST", key.removeprefix(prefix)
    key = key.removeprefix(prefix).lstrip("/")
    if key.endswith("zarr.json"):
        what = key
    elif key.startswith("progress/done/c/"):
        what = "progress/done/c/*"
    elif key.startswith("progress/digest/c/"):
        what = "progress/digest/c/*"
    elif "/c/" in key:
        what = "data shard objects"
    else:
        what = key or "(root)"
    return method, what


def summary(lines, prefix):
    counts = collections.Counter(kind(m, p, prefix) for m, p in lines)
    total = collections.Counter(m for m, _ in counts.elements())
    return {"total": sum(counts.values()), **dict(total)}, counts


def main():
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="count_requests_"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        store = work / "www" / "tiny.zarr"
        store.parent.mkdir()
        if run("extract", "tiny.toml", "--out", str(store)).returncode:
            return 1
        # http: a Range-capable server logging each request it answers
        from RangeHTTPServer import RangeRequestHandler
        log = []

        class Counted(RangeRequestHandler):
            def log_message(self, *a):
                pass

            def send_head(self):
                log.append((self.command, self.path))
                return super().send_head()

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counted, directory=str(work / "www")))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        stack.callback(server.shutdown)
        base = f"http://127.0.0.1:{server.server_address[1]}/tiny.zarr"
        # s3: moto in its own process, behind bench_remote's proxy (no delay: it keeps each request's first line)
        endpoint = stack.enter_context(moto_server())
        proxy = DelayProxy(int(endpoint.rsplit(":", 1)[1]))
        proxy.requests = Stamped()
        import s3fs
        opts = {"endpoint_url": f"http://127.0.0.1:{proxy.port}", "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
        fs.mkdir("bkt")
        fs.put(str(store), "bkt/tiny.zarr", recursive=True)
        s3opts = [f"--storage-option=endpoint_url={opts['endpoint_url']}", "--storage-option=key=testing", "--storage-option=secret=testing"]
        results, failed = {}, []
        for where, url, extra, lines, prefix in (("http", base, [], log, "/tiny.zarr"), ("s3", "s3://bkt/tiny.zarr", s3opts, proxy.requests, "/bkt/tiny.zarr")):
            commands = {
                "info": ["info", url, *extra],
                "verify": ["verify", url, *extra],
                "stats": ["stats", url, *extra],
                "train": ["train", "tiny.toml", "--cache", url, "--out", str(work / f"run-{where}"), "--epochs", "1", "--overwrite", *extra],
                "train-stream": ["train", "tiny.toml", "--cache", url, "--out", str(work / f"run-{where}-s"), "--epochs", "1", "--overwrite",
                                 "--set", "train.memory_budget_mb=0", *extra],
                "export": ["export", url, str(work / f"{where}.h5"), "--overwrite", *extra],
            }
            for name, args in commands.items():
                before = len(lines)
                r = run(*args)
                got = [(l[0], l[1]) if isinstance(l, tuple) else tuple(l.split(" ")[:2]) for l in lines[before:]]
                total, counts = summary(got, prefix)
                results[f"{where} {name}"] = total
                if r.returncode:
                    failed.append(f"{where} {name}")
                print(f"{where:5} {name:12} rc={r.returncode} {total}")
                if LATENCY and where == "s3" and not r.returncode:
                    walls: dict[float, list[float]] = {0.0: [], LATENCY: []}
                    waves = []
                    for delay in (0.0, LATENCY, 0.0, LATENCY):
                        proxy.delay, began, first = delay, time.perf_counter(), len(lines)
                        run(*args)
                        walls[delay].append(time.perf_counter() - began)
                        came = lines.times[first:]
                        if delay:
                            waves.append(1 + sum(b - a > LATENCY / 2 for a, b in zip(came, came[1:])))
                    proxy.delay = 0.0
                    waited = (min(walls[LATENCY]) - min(walls[0.0])) / LATENCY
                    results[f"{where} {name}"] |= {"waited_round_trips": round(waited, 1), "request_waves": min(waves)}
                    print(f"        waited round trips at {LATENCY * 1000:g} ms: {waited:.1f} ({min(walls[0.0]):.2f} s -> "
                          f"{min(walls[LATENCY]):.2f} s), request waves {min(waves)}")
                if DETAIL:
                    for (m, k), n in sorted(counts.items()):
                        print(f"        {m:5} {k:40} {n}")
    print(json.dumps(results))
    return 1 if failed else 0


sys.exit(main())
