"""Opening a store never runs code and stays bounded: crafted manifests (import paths, pickles, huge
and deeply nested values, paths that try to leave the store) are read as inert data or refused."""

from __future__ import annotations

import base64
import gc
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.errors import StoreError
from kdcache.stats import stats
from kdcache.store import open_store
from kdcache.verify import verify

SENTINEL = "kdcache_safety_sentinel"


class Boom:
    def __reduce__(self):
        return (exec, (f"import {SENTINEL}",))


def craft(tiny_store: str, tmp_path: Path, edit) -> Path:
    out = tmp_path / "crafted.zarr"
    shutil.copytree(tiny_store, out)
    meta = json.loads((out / "zarr.json").read_text())
    edit(meta["attributes"]["kdcache"])
    (out / "zarr.json").write_text(json.dumps(meta))
    return out


@pytest.fixture
def sentinel(tmp_path, monkeypatch):
    """A module that records being imported; its folder is on sys.path so an import would succeed."""
    folder = tmp_path / "mods"
    folder.mkdir()
    flag = tmp_path / "imported.flag"
    (folder / f"{SENTINEL}.py").write_text(f"open({str(flag)!r}, 'w').write('x')\ndef boom():\n    return None\n")
    monkeypatch.syspath_prepend(str(folder))
    yield flag
    sys.modules.pop(SENTINEL, None)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_nothing_in_a_crafted_store_is_imported_or_unpickled(tiny_store, tmp_path, sentinel, monkeypatch):
    payload = base64.b64encode(pickle.dumps(Boom())).decode()

    def edit(m):
        m["teacher"]["factory"] = f"{SENTINEL}:boom"
        m["dataset"]["factory"] = f"{sentinel.parent / 'mods' / SENTINEL}.py:boom"
        m["teacher"]["class"] = f"{SENTINEL}.Boom"
        m["pipeline"]["teacher"]["factory"] = f"{SENTINEL}:boom"
        m["pickle"] = payload
        m["raw_pickle"] = pickle.dumps(Boom(), protocol=0).decode("latin-1")
        m["py/object"] = f"{SENTINEL}.Boom"
        m["__reduce__"] = ["exec", [f"import {SENTINEL}"]]

    store = craft(tiny_store, tmp_path, edit)
    # dask pickles its own in-memory objects to tokenize them; nothing read from the store may reach pickle
    calls, real_loads = [], pickle.loads

    def loads(data, *args, **kwargs):
        calls.append(SENTINEL.encode() in bytes(data) or payload.encode() in bytes(data))
        return real_loads(data, *args, **kwargs)

    monkeypatch.setattr(pickle, "loads", loads)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    runner = CliRunner()
    for args in (["info", str(store)], ["info", str(store), "--json"], ["verify", str(store)], ["stats", str(store)]):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, (args, r.output)
    out = tmp_path / "p.zarr.zip"
    assert runner.invoke(main, ["pack", str(store), str(out)]).exit_code == 0
    assert runner.invoke(main, ["export", str(store), str(tmp_path / "p.h5")]).exit_code == 0
    assert runner.invoke(main, ["import", str(tmp_path / "p.h5"), str(tmp_path / "back.zarr")]).exit_code == 0
    assert open_store(str(out)).manifest["teacher"]["factory"] == f"{SENTINEL}:boom"  # kept as inert text
    assert SENTINEL not in sys.modules and not sentinel.exists()
    assert not any(calls)


@pytest.mark.slow
def test_huge_values_are_not_echoed_and_memory_stays_bounded(tiny_store, tmp_path):
    huge = "A" * (50 * 2**20)

    def edit(m):
        m["teacher"]["class"] = huge
        m["dataset"]["notes"] = {"blob": huge[:10_000_000], "many": list(range(100_000))}
        m["pipeline"]["deep"] = json.loads("[" * 500 + "]" * 500)

    store = craft(tiny_store, tmp_path, edit)
    del huge
    gc.collect()
    before = rss_bytes()
    info = open_store(str(store)).info()
    text = json.dumps(info)
    assert len(text) < 200_000 and "characters)" in info["teacher"]["class"]
    r = CliRunner().invoke(main, ["info", str(store)])
    assert r.exit_code == 0 and len(r.output) < 20_000
    assert verify(str(store))["ok"] and stats(str(store))["rows"] == 50
    gc.collect()
    assert rss_bytes() - before < 600 * 2**20  # a 60 MB manifest is read, never multiplied


def test_deeply_nested_json_is_an_error_not_a_crash(tiny_store, tmp_path):
    store = tmp_path / "deep.zarr"
    shutil.copytree(tiny_store, store)
    text = (store / "zarr.json").read_text()
    depth = 200_000
    (store / "zarr.json").write_text(text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(StoreError, match="is not a zarr v3 group"):
        open_store(str(store))
    r = CliRunner().invoke(main, ["info", str(store)])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "Traceback" not in r.output


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["targets"]["logits"].update(path="../../outside"), r"targets.logits.path = '../../outside', expected 'targets/logits'"),
        (lambda m: m["targets"]["features.3"].update(path="targets/layers/../../../etc"), "targets.features.3.path"),
        (lambda m: m["targets"]["features.3"].update(path="/abs/path"), "targets.features.3.path"),
        (lambda m: m.update(num_samples=10**30), "num_samples"),
        (lambda m: m.update(num_samples="50"), "num_samples"),
        (lambda m: m["geometry"].update(num_shards=1), "geometry.num_shards"),
        (lambda m: m["targets"]["logits"].update(dtype="object"), "dtype"),
        (lambda m: m["targets"]["logits"].update(shape=[10**15]), "shape"),
        # no values per sample: zarr's chunk shape divided by 0 (a ZeroDivisionError named as a store that cannot be made)
        (lambda m: m["targets"]["features.3"].update(shape=[16, 0, 8]), r"targets.features.3.shape = \[16, 0, 8\], expected a list of sizes of at least 1"),
        (lambda m: m["teacher"].update(num_parameters="many"), "teacher.num_parameters"),
        (lambda m: m.update(targets=[]), "targets"),
    ],
)
def test_damaged_manifests_are_refused_with_the_key(tiny_store, tmp_path, edit, match):
    store = craft(tiny_store, tmp_path, edit)
    with pytest.raises(StoreError, match=match):
        open_store(str(store))
    r = CliRunner().invoke(main, ["verify", str(store), "--json"])
    assert r.exit_code == 1 and "damaged manifest" in r.output


GIANT = 64 * 2**30  # a sparse file: 4 KB on disk (it survives a tarball), 64 GiB to whoever reads it


@pytest.mark.parametrize("command, target", [
    ("verify", "targets/logits/c/1/0"),  # a shard object (read whole by kdcache's own reader, in ranges by zarr's)
    ("verify", "samples/index/c/0"),
    ("verify", "progress/done/c/1"),  # a one-byte done marker
    ("verify", "progress/digest/c/2/0"),  # a digest row
    ("info", "zarr.json"),  # the manifest's object
    ("info", "targets/logits/zarr.json"),
    ("pack", "targets/logits/c/0/0"),
    ("train", "targets/layers/features.3/c/1/0/0/0"),
])
def test_an_object_larger_than_it_can_be_is_refused_unread(tiny_store, tmp_path, command, target):
    """A received store's object may be a sparse file of any size: kdcache reads no object larger than the format lets it
    be (a shard: its chunks at zstd's worst case and its index; a marker, a digest row; metadata: 128 MiB), so memory
    stays bounded and the damage is named in one line, where a whole read took 8 GB for 2 GiB and a 100 GiB one ended in
    a MemoryError traceback."""
    import os
    import resource
    import subprocess

    store = tmp_path / "giant.zarr"
    shutil.copytree(tiny_store, store)
    os.truncate(store / target, GIANT)
    fixtures = Path(__file__).parent / "fixtures"
    args = {"verify": ["verify", str(store)], "info": ["info", str(store)], "pack": ["pack", str(store), str(tmp_path / "p.zarr.zip")],
            "train": ["train", str(fixtures / "tiny.toml"), "--cache", str(store), "--out", str(tmp_path / "run")]}[command]
    # at most 2 GiB of address space (a peak measured by the child's ru_maxrss would include this process's, which
    # Linux carries over fork and exec): an object read whole is a MemoryError, a traceback
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))  # noqa: E731
    r = subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True, cwd=fixtures, preexec_fn=limit, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    said = f"object '{target}' holds {GIANT:,} bytes, more than it can"
    assert said in r.stdout + r.stderr and "Traceback" not in r.stderr and "MemoryError" not in r.stdout, (r.stdout, r.stderr)
    if command != "verify":  # verify lists it among its checks' FAIL lines
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
    assert not (tmp_path / "p.zarr.zip").exists() and not (tmp_path / "run").exists()
