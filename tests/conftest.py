"""Shared fixtures. ``tests/fixtures`` goes on sys.path so tests import the seeded teachers and datasets
(``extract_zoo``, ``tiny``) as the very modules a pipeline's ``file.py:attr`` paths resolve to."""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

# Tiny models run fastest on one thread; on a shared 2-core machine more threads spin and crawl.
torch.set_num_threads(1)

# A test run started in the background without job control (`.ci/run &` in a script) inherits SIGINT ignored, and so
# would the commands the Ctrl-C tests start, which then run to the end (exit 0). Python's own handler here is the
# default in a child after exec, where Python installs KeyboardInterrupt again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On an xdist worker, before it tells the controller that it has finished (xdist's hook wraps this one): collect
    the garbage and freeze what is left. pytest's clean-up after that collects the garbage of the whole heap (some 350,000
    objects: torch, dask, what the tests left), which a loaded box took past 5 s to do (4-12 s measured); execnet then
    sent the worker a SIGINT to end it, whose KeyboardInterrupt landed in whatever finalizer was running (a Popen's, a
    weakref's callback) and was printed after 100 % as a PytestUnraisableExceptionWarning. Frozen, the heap is not
    looked at again: that clean-up takes milliseconds."""
    if hasattr(session.config, "workerinput"):
        gc.collect()
        gc.freeze()


@pytest.fixture(autouse=True)
def zoo_env(monkeypatch: pytest.MonkeyPatch):
    """Set ``ZOO_*`` knobs of the extract_zoo datasets/teachers for one test: ``zoo_env(N=37, SEED=1)``.

    Every ``ZOO_*`` variable starts unset, so a knob never leaks in from the caller's shell.
    """
    for key in [k for k in os.environ if k.startswith("ZOO_")]:
        monkeypatch.delenv(key)

    def set_env(**values: object) -> None:
        for key, value in values.items():
            if value is None:
                monkeypatch.delenv(f"ZOO_{key}", raising=False)
            else:
                monkeypatch.setenv(f"ZOO_{key}", str(value))

    return set_env


@pytest.fixture
def fetch_log(tmp_path: Path, zoo_env):
    """A file the zoo datasets append each fetched index to; returns a reader of the indices so far."""
    path = tmp_path / "fetched.txt"
    zoo_env(LOG=path)

    def read(clear: bool = False) -> list[int]:
        indices = [int(line) for line in path.read_text().split()] if path.exists() else []
        if clear and path.exists():
            path.unlink()
        return indices

    return read


# ------------------------------------------------------------------ stores for the train/cache tests

TINY_TOML = FIXTURES / "tiny.toml"
NUMBERED = {
    "teacher": {"factory": "numbered.py:echo"},
    "data": {"factory": "numbered.py:numbered", "split": "train"},
    "targets": {"logits": True, "dtype": "float32"},
    "extract": {"batch_size": 16, "device": "cpu", "rows_per_shard": 16},
}


def extract_tiny(out: Path, *overrides: str) -> str:
    """Extract ``tiny.toml`` (with ``--set`` style overrides) into ``out``; returns the location."""
    import kdcache

    kdcache.extract(kdcache.load_pipeline(TINY_TOML, list(overrides)), str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tiny.toml as is: train split, float16 logits and ``features.3``, 4 shards of 16 rows (50 samples). Read-only."""
    return extract_tiny(tmp_path_factory.mktemp("stores") / "tiny.zarr")


@pytest.fixture(scope="session")
def numbered_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """100 ``numbered`` samples, float32 ``echo`` logits encoding the index, 7 shards of 16 rows. Read-only."""
    import kdcache
    from kdcache.pipeline import from_dict

    out = tmp_path_factory.mktemp("stores") / "numbered.zarr"
    kdcache.extract(from_dict(NUMBERED, root=FIXTURES), str(out))
    return str(out)


# ------------------------------------------------------------------ an S3-API server

S3_BUCKET = "kdcache-test"


@pytest.fixture(scope="module")
def s3():
    """Storage options for the bucket ``S3_BUCKET`` on a real S3-API server on 127.0.0.1 (moto's threaded server,
    reached through s3fs with dummy credentials; stopped after the module)."""
    import logging
    import urllib.request

    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    # moto keeps its buckets in this process, not in the server: an earlier module's would still be there
    urllib.request.urlopen(urllib.request.Request(f"{options['endpoint_url']}/moto-api/reset", method="POST"), timeout=30)
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(S3_BUCKET)
    yield options
    server.stop()


class Accepted(list):
    """The connections a server accepted; ``times``: when each was (``time.monotonic()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []


@pytest.fixture
def silent_endpoint(monkeypatch):
    """``(url, held)``: an endpoint on 127.0.0.1 that accepts TCP connections and never answers (a proxy or firewall
    that swallows requests); ``held`` lists the connections it accepted, ``held.times`` when (``time.monotonic()``: a
    command's wait on the endpoint, timed from the first, leaves out its start, which a loaded box makes long). The process's endpoints that answered a first
    look (``storage.REACHED``) are forgotten for the test: its port may be one an earlier test's server (moto) answered
    on in this process, and a look there is no first look (its long timeouts held a CI run's test past its 300 s)."""
    from kdcache import storage

    monkeypatch.setattr(storage, "REACHED", set())
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    held = Accepted()
    done = threading.Event()

    def hold() -> None:
        while not done.is_set():
            try:
                conn = server.accept()[0]
            except TimeoutError:
                continue
            held.times.append(time.monotonic())
            held.append(conn)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", held
    done.set()
    socket.create_connection(server.getsockname()).close()  # its accept() returns now, not at its next timeout
    thread.join()
    for conn in (*held, server):
        conn.close()


# ------------------------------------------------------------------ HTTP servers


@pytest.fixture(scope="module")
def faulty_http_root(tmp_path_factory):
    """A folder served by ``tests/fixtures/faulty_http.py``, which fails the requests its ``.faults`` file names: ``(folder, base_url)``."""
    yield from served_folder(tmp_path_factory.mktemp("faulty"), str(FIXTURES / "faulty_http.py"))


def served_folder(root, module: str):
    """``python -m MODULE 0`` (or ``python SCRIPT.py 0``) serving ``root`` on 127.0.0.1 while the caller's fixture
    lasts, on the port it bound and printed: yields ``(root, base_url)``. Not a port found free here and bound later by
    the server: under pytest-xdist another worker's connection or server may take it meanwhile (this server then fails
    to start, or the fixture yields the other worker's)."""
    command = [module, "0"] if module.endswith(".py") else ["-m", module, "0", "--bind", "127.0.0.1"]
    proc = subprocess.Popen([sys.executable, "-u", *command], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    said = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port PORT (http://127.0.0.1:PORT/) ..."; "" if it ended
    port = re.search(r" port (\d+) ", said)
    if port is None:
        proc.kill()
        pytest.fail(f"{module} did not start: {said!r}")
    base = f"http://127.0.0.1:{port.group(1)}"
    yield root, base
    proc.terminate()
    proc.wait(timeout=10)
    proc.stdout.close()
